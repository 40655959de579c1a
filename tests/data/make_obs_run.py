"""Writes tests/data/obs_run: the metrics of a real async run (4 steps, TIS importance weights,
engine 0 killed at step 1), read by tests/unit/ops/test_observability.py (plot, analyze). Regenerate after a
change of metric names::

    PYTHONPATH=. python tests/data/make_obs_run.py
"""
import shutil
import sys
import tempfile
from pathlib import Path

OUT = Path(__file__).resolve().parent / "obs_run"


def main() -> None:
    from jobs.train import run
    from miles_ray.config import load_config

    tmp = Path(tempfile.mkdtemp(prefix="obs-run-"))
    cfg = load_config(None, [
        f"output_dir={tmp}", "run_name=obs-fixture", "total_steps=4", "rollout.prompts_per_step=4",
        "rollout.n_samples_per_prompt=4", "rollout.max_new_tokens=8", "train.sft_warmup_steps=4",
        "async_rl.enabled=true", "async_rl.staleness=1", "async_rl.off_policy.mode=tis", "checkpoint.every=0",
        "checkpoint.export_hf=false", 'faults.kills=[{"role": "rollout", "rank": 0, "step": 1}]',
        "cluster.dashboard=false", "logging.wandb=false", "logging.progress_bar=false"])
    run(cfg)
    OUT.mkdir(exist_ok=True)
    for name in ("metrics.jsonl", "config.yaml", "summary.json"):
        shutil.copy(tmp / name, OUT / name)
    shutil.rmtree(tmp)


if __name__ == "__main__":
    sys.exit(main())
