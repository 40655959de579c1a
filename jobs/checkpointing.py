"""Save and restore a run: trainer (and critic, draft) states as sharded DCP folders (resumable at
another number of ranks), engine sampling RNG, the prompt cursor, step and weight version; the
policy as an HF folder at the end (and every ``checkpoint.export_hf_every`` steps); for the async
driver also its buffered groups and in-flight requests (``async_state.json``). Nothing here is
loaded with pickle: JSON, DCP (:mod:`miles_ray.training.fsdp.checkpoint`) and ``weights_only`` tensors.

Invariant: a checkpoint after ``step`` train steps holds weight version
``versioning.after_steps(step)`` (written into its meta, asserted on restore)."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import ray
import torch

from jobs.cluster import RunActors
from miles_ray.training import checkpoint_format as ckpt
from miles_ray import versioning
from miles_ray.config import Config
from miles_ray.errors import UserPathError, UserValueError
from miles_ray.sample import Sample

log = logging.getLogger("miles_ray.training.checkpoint_format")


def root(cfg: Config) -> Path:
    return Path(cfg.checkpoint.dir or Path(cfg.output_dir) / "checkpoints")


def exports_hf(cfg: Config, step: int) -> bool:
    """Whether the checkpoint of ``step`` holds an HF export: the final one, and every
    ``checkpoint.export_hf_every``-th."""
    c = cfg.checkpoint
    return c.export_hf and (step >= cfg.total_steps or bool(c.export_hf_every and step % c.export_hf_every == 0))


def save(cfg: Config, actors: RunActors, sampler, step: int, engine_rng: list,
         async_state: dict | None = None) -> Path:
    """Checkpoint after ``step`` train steps. ``sampler``: the sampler or its state dict;
    ``engine_rng``: each engine's sampling RNG state; ``async_state``: the async driver's pump
    state and buffered groups (samples as dicts)."""
    version = versioning.after_steps(step)
    tmp = ckpt.begin(root(cfg), step)
    actors.policy.get(actors.policy.call("save_state", str(tmp), "policy"))
    if actors.critic is not None:
        ray.get(actors.critic.call("save_state", str(tmp), "critic"))
    if actors.draft is not None:
        ray.get(actors.draft.save_state.remote(str(tmp)))
    torch.save(engine_rng, tmp / "engines_rng.pt")
    if exports_hf(cfg, step):
        actors.policy.get(actors.policy.call("export_hf", str(tmp / "hf")))
    cursor = sampler if isinstance(sampler, dict) else sampler.state_dict()
    meta = {"step": step, "version": version, "sampler": cursor, "run_name": cfg.run_name}
    if async_state is not None:
        (tmp / "async_state.json").write_text(json.dumps(_to_json(async_state)))
        meta["async"] = {"buffered_groups": len(async_state["buffer"]), "inflight_groups": len(async_state["inflight"]),
                         "next_group": async_state["next_group"]}
    final = ckpt.commit(tmp, meta, cfg.checkpoint.keep)
    log.info("checkpoint saved: %s", final)
    return final


def _to_json(state: dict) -> dict:
    return {**state, "buffer": [[s.to_dict() for s in group] for group in state["buffer"]]}


def load_async_state(path: Path) -> dict | None:
    """The async driver's buffered groups (as Samples) and in-flight requests, or None (a sync
    checkpoint)."""
    file = Path(path) / "async_state.json"
    if not file.is_file():
        return None
    state = json.loads(file.read_text())
    state["buffer"] = [[Sample(**s) for s in group] for group in state["buffer"]]
    return state


def find(cfg: Config) -> Path | None:
    """The checkpoint to resume from (``resume``), checked before any actor starts."""
    if cfg.resume == "none":
        return None
    path = ckpt.latest(root(cfg)) if cfg.resume == "auto" else Path(cfg.resume)
    if path is None:
        return None
    if not (path / "meta.json").is_file():
        raise UserPathError(f"resume={cfg.resume!r} is not a checkpoint folder (no meta.json)")
    if not (path / "policy").is_dir():
        raise UserPathError(f"checkpoint {path} predates sharded checkpoints (per-rank pickles, which are not loaded "
                            "for safety); start a new run or point resume= at a newer checkpoint")
    pending = ckpt.read_meta(path).get("async", {})
    if not cfg.async_rl.enabled and pending.get("buffered_groups", 0) + pending.get("inflight_groups", 0):
        raise UserValueError(f"checkpoint {path} was written by the async driver and holds {pending['buffered_groups']} "
                           f"buffered and {pending['inflight_groups']} in-flight groups the synchronous driver would "
                           "drop; resume it with async_rl.enabled=true")
    return path


def restore(cfg: Config, actors: RunActors, sampler, path: Path) -> dict:
    """Load a checkpoint into running actors; returns its meta (step, version, sampler)."""
    meta = ckpt.read_meta(path)
    if meta["version"] != versioning.after_steps(meta["step"]):
        raise RuntimeError(f"checkpoint {path}: weight version {meta['version']} does not follow step {meta['step']} "
                           f"(expected {versioning.after_steps(meta['step'])}, see miles_ray.versioning)")
    actors.policy.get(actors.policy.call("load_state", str(path), "policy"))
    if actors.critic is not None:
        ray.get(actors.critic.call("load_state", str(path), "critic"))
    if actors.draft is not None and (Path(path) / "draft").is_dir():
        ray.get(actors.draft.load_state.remote(str(path)))
    states = torch.load(path / "engines_rng.pt", weights_only=True)
    ray.get([e.set_rng_state.remote(s) for e, s in zip(actors.engines, states)])
    sampler.load_state_dict(meta["sampler"])
    log.info("resumed from %s (step %d, weight version %d)", path, meta["step"], meta["version"])
    return meta


def truncate_metrics(out_dir: Path, step: int) -> None:
    """Drop rows of steps >= ``step`` from ``metrics.jsonl`` and ``samples.jsonl``: a run that died
    wrote them after its last checkpoint, and the resumed run redoes those steps, so every step
    appears once. A torn last line (killed mid-write) is dropped too."""
    for name in ("metrics.jsonl", "samples.jsonl"):
        path = Path(out_dir) / name
        if path.is_file():
            rows = [line for line in path.read_text().splitlines() if _row_step(line) < step]
            path.write_text("".join(r + "\n" for r in rows))


def set_aside_logs(out_dir: Path) -> list:
    """A fresh run (no resume) in a folder that holds an earlier run's ``metrics.jsonl`` /
    ``samples.jsonl``: those are renamed ``<name>.<mtime>.jsonl`` (kept, not appended to), so the
    new files hold this run's steps only and its ledger checks out. Returns the new names."""
    moved = []
    for name in ("metrics.jsonl", "samples.jsonl"):
        path = Path(out_dir) / name
        if path.is_file() and path.stat().st_size:
            stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(path.stat().st_mtime))
            target = path.with_name(f"{path.stem}.{stamp}.jsonl")
            path.rename(target)
            moved.append(target.name)
    return moved


def _row_step(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")
