"""Save and restore a run: trainer (and critic) rank states, engine sampling RNG, the prompt
cursor, step and weight version; optionally the policy as an HF folder. Used by the drivers."""
from __future__ import annotations

import logging
from pathlib import Path

import ray
import torch

from jobs.cluster import RunActors
from miles_ray import checkpoint as ckpt

log = logging.getLogger("miles_ray.checkpoint")


def root(cfg) -> Path:
    return Path(cfg.checkpoint.dir or Path(cfg.output_dir) / "checkpoints")


def save(cfg, actors: RunActors, sampler, step: int, version: int) -> Path:
    """Checkpoint after ``step`` train steps (weights of ``version``)."""
    tmp = ckpt.begin(root(cfg), step)
    actors.policy.get(actors.policy.call("save_state", str(tmp), "policy"))
    if actors.critic is not None:
        ray.get(actors.critic.call("save_state", str(tmp), "critic"))
    torch.save(ray.get([e.rng_state.remote() for e in actors.engines]), tmp / "engines_rng.pt")
    if cfg.checkpoint.export_hf:
        actors.policy.get(actors.policy.call("export_hf", str(tmp / "hf")))
    meta = {"step": step, "version": version, "sampler": sampler.state_dict(), "run_name": cfg.run_name}
    final = ckpt.commit(tmp, meta, cfg.checkpoint.keep)
    log.info("checkpoint saved: %s", final)
    return final


def find(cfg) -> Path | None:
    if cfg.resume == "none":
        return None
    if cfg.resume == "auto":
        return ckpt.latest(root(cfg))
    path = Path(cfg.resume)
    if not (path / "meta.json").is_file():
        raise FileNotFoundError(f"resume={cfg.resume!r} is not a checkpoint folder (no meta.json)")
    return path


def restore(cfg, actors: RunActors, sampler, path: Path) -> dict:
    """Load a checkpoint into running actors; returns its meta (step, version, sampler)."""
    meta = ckpt.read_meta(path)
    actors.policy.get(actors.policy.call("load_state", str(path), "policy"))
    if actors.critic is not None:
        ray.get(actors.critic.call("load_state", str(path), "critic"))
    states = torch.load(path / "engines_rng.pt", weights_only=False)
    ray.get([e.set_rng_state.remote(s) for e, s in zip(actors.engines, states)])
    sampler.load_state_dict(meta["sampler"])
    log.info("resumed from %s (step %d, weight version %d)", path, meta["step"], meta["version"])
    return meta


def truncate_metrics(out_dir: Path, step: int) -> None:
    """Drop metric rows of steps >= ``step`` (written after the checkpoint by a run that died)."""
    import json

    path = out_dir / "metrics.jsonl"
    if path.is_file():
        rows = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] < step]
        path.write_text("".join(r + "\n" for r in rows))
