"""Per-GPU totals for a placement, and the verdict against ``cluster.gpu_memory_gib``.

- colocated (``cluster.colocate``): one GPU holds a trainer rank (and a critic rank, PPO with GAE)
  and an engine, time-shared as the drivers do (``jobs/steps.py::colocate_phase``): in the train
  phase the engines have released their weights and KV cache; in the rollout phase the trainers have
  offloaded their optimizer state (parameters, gradients and the reference model stay). The GPU's
  need is the larger phase;
- disaggregated: a trainer GPU (everything resident: nothing is offloaded), a critic GPU (PPO with
  GAE), an engine GPU (each of its ``gpus_per_engine`` under SGLang), and an evaluation engine GPU
  (async runs with a dedicated evaluation engine).

Invariant: a plan fits when every GPU's need is at most ``cluster.gpu_memory_gib`` GiB.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from miles_ray.plan.engine import engine_items
from miles_ray.plan.params import Inventory, count_parameters, inventory
from miles_ray.plan.trainer import critic_rank, policy_rank, trainer_items
from miles_ray.plan.types import GIB, Item

PHASES = ("train", "rollout")


@dataclass
class Gpu:
    """One GPU of a placement: ``items`` as ``(role, Item)``."""
    name: str
    items: list = field(default_factory=list)
    colocated: bool = False

    def total(self, phase: str) -> int:
        return sum(i.bytes for _, i in self.resident(phase))

    def resident(self, phase: str) -> list:
        if not self.colocated:
            return list(self.items)
        return [(role, i) for role, i in self.items if i.phase in ("both", phase)]

    @property
    def peak_phase(self) -> str:
        return max(PHASES, key=self.total) if self.colocated else "all"

    @property
    def peak(self) -> int:
        return self.total(self.peak_phase)

    def biggest(self) -> tuple:
        return max(self.resident(self.peak_phase), key=lambda ri: ri[1].bytes)


@dataclass
class Plan:
    """Per-role items and per-placement GPUs of one config; ``placement`` is the configured one."""
    model: dict
    parameters: int
    roles: dict  # role -> list[Item] (one GPU of that role)
    placements: dict  # "colocated" | "disaggregated" -> list[Gpu]
    placement: str
    limit: int  # bytes per GPU

    @property
    def gpus(self) -> list:
        return self.placements[self.placement]

    @property
    def fits(self) -> bool:
        return all(g.peak <= self.limit for g in self.gpus)

    def problem(self) -> str:
        """One line naming the fullest GPU, its biggest item and the knob that shrinks it ("" if it fits)."""
        if self.fits:
            return ""
        gpu = max(self.gpus, key=lambda g: g.peak)
        role, item = gpu.biggest()
        phase = f" in the {gpu.peak_phase} phase" if gpu.colocated else ""
        return (f"memory plan: the {self.placement} {gpu.name} needs {gpu.peak / GIB:.1f} GiB{phase}, more than "
                f"cluster.gpu_memory_gib={self.limit / GIB:g}; biggest item: {role} {item.name} "
                f"({item.gib:.1f} GiB); to shrink it: {item.knob} (miles-ray plan shows every item; --force "
                "runs anyway)")


def roles(cfg, inv: Inventory, model: dict) -> dict:
    out = {"trainer": trainer_items(policy_rank(cfg, inv, model))}
    if cfg.uses_critic:
        out["critic"] = trainer_items(critic_rank(cfg, inv, model))
    if not cfg.rollout.replay_dump:
        out["engine"] = engine_items(cfg, inv, model)
    return out


def _tagged(role: str, items: list) -> list:
    return [(role, i) for i in items]


def _eval_gpu(cfg, per_role: dict) -> list:
    """An async run's dedicated evaluation engine: its own GPU in both layouts (never released)."""
    if "engine" in per_role and cfg.async_rl.enabled and cfg.eval.datasets and cfg.eval.dedicated_engine:
        return [Gpu("eval engine GPU", _tagged("eval engine", per_role["engine"]))]
    return []


def colocated(cfg, per_role: dict) -> list:
    gpu = Gpu("GPU (" + " + ".join(per_role) + ")", colocated=True)
    for role, items in per_role.items():
        gpu.items += _tagged(role, items)
    return [gpu, *_eval_gpu(cfg, per_role)]


def disaggregated(cfg, per_role: dict) -> list:
    gpus = [Gpu(f"{role} GPU", _tagged(role, items)) for role, items in per_role.items()]
    return gpus + _eval_gpu(cfg, per_role)


def memory_plan(cfg, model: dict) -> Plan:
    """The plan of ``cfg`` (a :class:`miles_ray.config.Config`) for the model whose config.json is ``model``."""
    inv = inventory(model)
    per_role = roles(cfg, inv, model)
    placements = {"colocated": colocated(cfg, per_role), "disaggregated": disaggregated(cfg, per_role)}
    placement = "colocated" if cfg.cluster.colocate else "disaggregated"
    return Plan(model, count_parameters(model), per_role, placements, placement,
                int(cfg.cluster.gpu_memory_gib * GIB))
