"""Low precision: FP8 blocks and INT4 groups, engines serving them, trainers reproducing them."""
import json

import pytest

from miles_ray.config import AlgorithmConfig, TrainConfig, load_config

REQS = [{"prompt": f"What is {i % 10}+{(3 * i) % 10}?", "label": "", "prompt_index": i, "group_id": i} for i in range(8)]


@pytest.mark.ray
def test_int4_qat_run_end_to_end(local_ray, tmp_path, model_cache):
    from jobs.train import run

    cfg = load_config(None, [f"output_dir={tmp_path}", f"model.tiny_cache_dir={model_cache}", "total_steps=2",
                             "rollout.prompts_per_step=4", "rollout.n_samples_per_prompt=2", "train.qat=int4",
                             "rollout.precision=int4", "rollout.backend=native", "logging.wandb=false",
                             "logging.progress_bar=false", "run_name=int4"])
    assert run(cfg)["steps"] == 2
    rows = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    assert all(r["train/mismatch_abs"] < 1e-5 for r in rows)  # engines serve exactly what QAT trains on
