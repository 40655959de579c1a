"""Which steps evaluate, and into which metrics row the result goes.

Rows: ``metrics.jsonl`` holds one row per training step (the ledger proves every step once), so
an evaluation is merged into a step's row, never written as a row of its own:

- ``at_start``: the initial weights (``after_steps(0)``), before step 0 of a fresh run: row 0.
- ``every`` N: after step k's weight sync when ``(k + 1) % N == 0`` (weights ``after_steps(k + 1)``,
  the row's ``weight_version``): row k.
- ``at_end``: after the last step's sync: the last row (once, also when ``every`` falls there).

Invariant: a row holds at most one evaluation, named by ``eval/weight_version``. When row 0 would
get two (``every`` = 1, or a one-step run with ``at_end``), the one after step 0 is kept and the
initial weights are not evaluated (:meth:`EvalSchedule.at_start` says so up front).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EvalSchedule:
    every: int
    at_start: bool
    at_end: bool
    total_steps: int
    enabled: bool = True  # False: no datasets, nothing is ever due

    @classmethod
    def from_config(cls, cfg) -> "EvalSchedule":
        e = cfg.eval
        return cls(e.every, e.at_start, e.at_end, cfg.total_steps, bool(e.datasets))

    def after_step(self, step: int) -> bool:
        """Evaluate after step ``step``'s weight sync (0-based)."""
        if not self.enabled:
            return False
        last = step + 1 == self.total_steps
        return bool((self.every and (step + 1) % self.every == 0) or (self.at_end and last))

    def at_start_of(self, start: int) -> bool:
        """Evaluate the initial weights before training (a fresh run only: ``start`` == 0)."""
        return self.enabled and self.at_start and start == 0 and not self.after_step(0)


def dedicated_engines(cfg, engines: bool = True) -> int:
    """Engines a run starts only for evaluation: one for an async run with eval sets and
    ``eval.dedicated_engine`` (the rollout pump never uses it); none otherwise (a synchronous run
    evaluates on its rollout engines between steps)."""
    e = cfg.eval
    return int(bool(engines and cfg.async_rl.enabled and e.dedicated_engine and e.datasets))
