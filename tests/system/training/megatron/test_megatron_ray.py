"""The megatron backend in the real job on local Ray: examples/grpo_arith_tiny_megatron.yaml (TP=2
over two trainer ranks), shortened; trainer rank 1 is killed in step 2, the group is rebuilt from
the last megatron distributed checkpoint and the run finishes with every step once (the ledger)."""
import json

import pytest

from miles_ray.config import load_config
from tests.helpers.ledger import check_run, final_weights

pytestmark = pytest.mark.ray


def test_megatron_tp2_run_survives_trainer_rank_death(local_ray, tmp_path, model_cache, tokenizer):
    from jobs.train import run

    cfg = load_config("examples/grpo_arith_tiny_megatron.yaml", [
        f"output_dir={tmp_path}", f"model.tiny_cache_dir={model_cache}", "run_name=mkill", "total_steps=3",
        "rollout.prompts_per_step=4", "rollout.n_samples_per_prompt=4", "train.sft_warmup_steps=1",
        "checkpoint.every=1", "logging.progress_bar=false", "logging.wandb=false",
        'faults.kills=[{"role": "trainer", "rank": 1, "step": 2}]'])
    summary = run(cfg)
    rows = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    assert summary["steps"] == 3 and [r["step"] for r in rows] == [0, 1, 2]
    assert rows[-1]["fault/recoveries"] >= 1  # the group was rebuilt
    assert all(r["train/mismatch_abs"] < 1e-4 for r in rows)  # engines serve exactly the synced megatron weights
    weights = final_weights(tmp_path)  # the HF export of the gathered TP shards
    assert "model.layers.1.mlp.gate_proj.weight" in weights
    check_run(tmp_path, cfg, tokenizer)  # every step once, no sample lost or trained twice
