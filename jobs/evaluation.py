"""Evaluation on held-out sets between training steps (``eval`` section); the maths and the schedule
are in :mod:`miles_ray.eval`.

Where it generates:

- synchronous driver: on the rollout engines, between two steps (after the weight sync);
- async driver with ``eval.dedicated_engine``: on the run's evaluation engine
  (:attr:`RunActors.eval_engines`), which gets every weight sync and which the rollout pump never
  uses, so evaluating does not stop rollout;
- async driver without it: the rollout pump is held, its in-flight calls finish, and the rollout
  engines evaluate.

Invariants (tests/unit/eval/test_eval.py):

- Evaluation samples never reach the buffer, the ledger or the training metrics: they have
  negative group ids (:func:`miles_ray.eval.eval_requests`) and are scored here, in the driver, by
  a :class:`RewardRunner` per reward function (the reward workers keep scoring training samples).
- The training RNG streams are unchanged: evaluation draws no prompts from the run's sampler, and
  on shared rollout engines each engine's sampling RNG state is saved before and restored after
  (the engines are idle then; servers that own their RNG, ``rollout.over_http``, cannot be restored).
- Metrics are ``eval/...`` keys merged into one step's row (:mod:`miles_ray.eval.schedule`).
"""
from __future__ import annotations

import dataclasses
import logging
import time

import ray

from jobs.cluster import reward_options
from jobs.context import Run
from jobs.recovery import is_actor_failure, wait_alive
from miles_ray.eval import EvalSchedule, dataset_metrics, eval_requests, load_eval_sets, overall_metrics
from miles_ray.rewards import RewardRunner

log = logging.getLogger("miles_ray.evaluation")


class Evaluator:
    """One run's evaluation: the loaded sets, the schedule, the reward runners. With no
    ``eval.datasets`` every call is a no-op returning ``{}``."""

    def __init__(self, run: Run):
        self.run, self.schedule = run, EvalSchedule.from_config(run.cfg)
        if not (run.actors.engines or run.actors.eval_engines):  # training from a dump: nothing generates
            self.schedule = dataclasses.replace(self.schedule, enabled=False)
        self.sets = load_eval_sets(run.cfg, run.tokenizer) if self.schedule.enabled else []
        self.runners: dict[str, RewardRunner] = {}
        self.pending: dict = {}  # the initial evaluation, until row 0 is logged

    # -- hooks the drivers call ------------------------------------------------------------------
    def start(self, start: int, pump=None) -> None:
        """Before training (a fresh run): evaluate the initial weights; they go into row 0."""
        if self.schedule.at_start_of(start):
            self.pending = self.evaluate(pump)

    def after_step(self, step: int, pump=None) -> dict:
        """After step ``step``'s weight sync: the ``eval/`` fields of that step's row (the initial
        evaluation, or this one when due; ``{}`` otherwise)."""
        out, self.pending = self.pending, {}
        if self.schedule.after_step(step):
            out.update(self.evaluate(pump))
        return out

    def close(self) -> None:
        for runner in self.runners.values():
            runner.close()
        self.runners.clear()

    # -- one evaluation ------------------------------------------------------------------------
    def evaluate(self, pump=None) -> dict:
        """Every set on the engines this run evaluates on (see the module docstring)."""
        actors, t0 = self.run.actors, time.time()
        if actors.eval_engines:
            self._refit_eval_engines()
            generated = self._generate(actors.eval_engines, dedicated=True)
        elif pump is not None:
            with pump.held():
                inflight = list(pump.inflight)  # let the pump's calls finish: the engines are idle then
                if inflight:
                    ray.wait(inflight, num_returns=len(inflight), fetch_local=False)
                generated = self._on_rollout_engines()
                pump.last_progress = time.time()  # the pump was held, not stalled
        else:
            generated = self._on_rollout_engines()
        per_set, versions = generated
        out = {k: v for m in per_set.values() for k, v in m.items()}
        if versions != {self.run.recovery.version}:  # an engine that missed a sync would evaluate stale weights
            raise RuntimeError(f"evaluation samples come from weight versions {sorted(versions)}, not the served "
                               f"version {self.run.recovery.version}")
        out.update(overall_metrics(per_set))
        out.update({"eval/weight_version": versions.pop(), "eval/time_s": time.time() - t0})
        log.info("evaluation of weight version %d: reward_mean %.3f (%.1fs)", out["eval/weight_version"],
                 out["eval/reward_mean"], out["eval/time_s"])
        return out

    def _on_rollout_engines(self) -> tuple[dict, set]:
        engines = self.run.actors.engines
        states = ray.get([e.rng_state.remote() for e in engines])
        try:
            return self._generate(engines, dedicated=False)
        finally:
            ray.get([e.set_rng_state.remote(s) for e, s in zip(engines, states)])

    def _generate(self, engines: list, dedicated: bool) -> tuple[dict, set]:
        """Generate every set (sampled and greedy calls, all in flight at once), then score.
        Returns each set's metrics and the weight versions the samples came from."""
        calls, first = [], 0
        for ev in self.sets:
            reqs = eval_requests(ev.items, first)
            first += len(reqs)
            spec = ev.spec
            max_new = spec.max_new_tokens or self.run.cfg.rollout.max_new_tokens
            sampled = dataclasses.replace(self.run.params, temperature=spec.temperature, max_new_tokens=max_new)
            modes = [("sampled", spec.n_samples, sampled)]
            if spec.greedy:
                modes.append(("greedy", 1, dataclasses.replace(sampled, temperature=0.0)))
            for mode, n, params in modes:
                for i in range(len(engines)):
                    chunk = reqs[i::len(engines)]
                    if chunk:
                        calls.append((ev.name, mode, i, chunk, n, params))
        refs = [engines[i].generate.remote(chunk, n, params) for _, _, i, chunk, n, params in calls]
        got: dict = {}
        for call, ref in zip(calls, refs):
            name, mode, i, chunk, n, params = call
            samples = self._get(ref, engines, i, lambda c=call: engines[c[2]].generate.remote(*c[3:]), dedicated)
            got.setdefault((name, mode), []).extend(samples)
        per_set = {ev.name: self._score(ev, got.get((ev.name, "sampled"), []), got.get((ev.name, "greedy")))
                   for ev in self.sets}
        return per_set, {s.weight_version for samples in got.values() for s in samples}

    def _get(self, ref, engines: list, i: int, resubmit, dedicated: bool) -> list:
        """A generate call's samples; a dead engine is waited for, refit and asked again."""
        if not dedicated:
            return self.run.recovery.get(ref, resubmit, "rollout", i)
        try:
            return ray.get(ref)
        except Exception as err:  # noqa: BLE001 - only actor failures are recovered
            if not is_actor_failure(err):
                raise
            log.warning("evaluation engine %d failed (%s); waiting for its restart", i, type(err).__name__)
            self._refit_eval_engines()
            return ray.get(resubmit())

    def _refit_eval_engines(self) -> None:
        """Evaluation engines serve the version the rollout engines serve: they get every weight
        sync; one restarted since (STALE) is refit here (the recovery of a failed sync refits only
        the rollout engines). A READY one at another version missed a sync: an error."""
        rec = self.run.recovery
        for i, engine in enumerate(self.run.actors.eval_engines):
            wait_alive(engine, name=f"eval-{i}", groups=self.run.actors.groups)
            health = ray.get(engine.health.remote())
            if health["state"] != "ready":
                log.warning("evaluation engine %d is %s: refit to weight version %d", i, health["state"], rec.version)
                with rec.sync_lock:
                    self.run.weights.refit([engine], rec.version)
            elif health["weight_version"] != rec.version:
                raise RuntimeError(f"evaluation engine {i} serves weight version {health['weight_version']}, not "
                                   f"{rec.version}: it missed a weight sync")

    def _score(self, ev, sampled: list, greedy: list | None) -> dict:
        runner = self._runner(ev.spec.reward_fn or self.run.cfg.reward.fn)
        everything = sampled + (greedy or [])
        scores, stats = runner.score([(s.prompt, s.response_text, s.label) for s in everything],
                                     [s.error for s in everything])
        for s, r in zip(everything, scores):
            s.reward = r

        def by_prompt(samples: list) -> list[list]:  # request order: group ids -1, -2, ...
            groups: dict = {}
            for s in samples:
                groups.setdefault(s.group_id, []).append(s)
            return [groups[g] for g in sorted(groups, reverse=True)]

        out = dataset_metrics(ev.name, by_prompt(sampled), [g[0] for g in by_prompt(greedy)] if greedy else None,
                              ev.spec.pass_threshold)
        out[f"eval/{ev.name}/reward_errors"] = stats.errors + stats.timeouts
        return out

    def _runner(self, spec: str) -> RewardRunner:
        if spec not in self.runners:
            r, options = self.run.cfg.reward, reward_options(self.run.cfg)
            self.runners[spec] = RewardRunner(spec, r.timeout_s, r.failure_score, r.isolate, options)
        return self.runners[spec]
