"""miles-ray library: config, data, models, rollout, training, algorithms, rewards, weights.

Pure Python/torch; nothing here imports Ray. The package root is also the public API:

    import miles_ray
    cfg = miles_ray.load_config("examples/grpo_arith_tiny.yaml", ["total_steps=20"])
    summary = miles_ray.run(cfg)   # starts (or joins) Ray and runs the job

``run`` is the one place where the library reaches up to the drivers in ``jobs/``, and only when
called, so ``import miles_ray`` stays free of Ray (and of pydantic, for GPU images without it).
"""
from __future__ import annotations

__version__ = "0.1.0"


def load_config(path=None, overrides=None):
    """A validated :class:`miles_ray.config.Config` from a YAML file and ``key.sub=value`` overrides."""
    from miles_ray.config import load_config as _load

    return _load(path, overrides)


def run(cfg) -> dict:
    """Run a training job (sync or async, per ``cfg``) on a local Ray, or on the cluster in
    ``RAY_ADDRESS``; returns the summary (steps, reward first/last 5, wall time)."""
    from jobs.train import run as _run

    return _run(cfg)
