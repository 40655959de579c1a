"""A weight transport given only by its import path (``tests/helpers/toy_transport.py``: bucket bytes
plus a checksum, one file, no registration) carries a real synchronous run on Ray: every engine
loads every version through it, serves exactly the trainer's weights, and the ledger is whole.

The run starts its own local Ray (not the shared one): the toy's load log folder reaches the
engine processes through the environment they inherit."""
import json
import os
import re

import pytest
import ray

from miles_ray.config import load_config
from tests.helpers.ledger import check_run
from tests.helpers.paths import ROOT

pytestmark = pytest.mark.ray

TOY = "tests.helpers.toy_transport:ChecksumTransport"
STEPS, ENGINES = 3, 2


def test_sync_run_over_a_plugin_transport(tmp_path, model_cache, tokenizer, monkeypatch):
    from jobs.train import run

    loads = tmp_path / "loads"
    loads.mkdir()
    monkeypatch.setenv("MILES_TOY_TRANSPORT_LOG", str(loads))  # inherited by the Ray this run starts
    monkeypatch.chdir(ROOT)  # the import path is rooted at the repository (workers start in the driver's folder)
    assert not ray.is_initialized()
    cfg = load_config(str(ROOT / "examples" / "grpo_arith_tiny.yaml"), [
        f"output_dir={tmp_path / 'run'}", f"model.tiny_cache_dir={model_cache}", "run_name=toy-transport",
        f"total_steps={STEPS}", "rollout.prompts_per_step=4", "rollout.n_samples_per_prompt=4",
        f"rollout.num_engines={ENGINES}", "train.sft_warmup_steps=1", "train.sft_batch_size=8",
        f"weight_sync.transport={TOY}", "weight_sync.bucket_mb=0.05",  # small buckets: many per version
        "cluster.local_num_cpus=8", "cluster.dashboard=false", "checkpoint.export_hf=false",
        "logging.wandb=false", "logging.progress_bar=false"])
    try:
        summary = run(cfg)
    finally:
        ray.shutdown()
    rows = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")]
    assert summary["steps"] == STEPS and [r["train/weight_version"] for r in rows] == [2, 3, 4]
    assert all(r["train/mismatch_abs"] < 1e-4 for r in rows)  # the engines served exactly the trainer's weights
    check_run(tmp_path / "run", cfg, tokenizer)  # every step once, no group lost or trained twice

    got: dict = {}  # version -> engine pid -> bucket indices loaded through the toy
    for f in loads.iterdir():
        version, index, pid = map(int, re.fullmatch(r"v(\d+)-b(\d+)-(\d+)", f.name).groups())
        got.setdefault(version, {}).setdefault(pid, set()).add(index)
    assert sorted(got) == [1, 2, 3, 4]  # the first sync, then one per step
    for version, by_engine in got.items():
        assert len(by_engine) == ENGINES and os.getpid() not in by_engine, version
        counts = {len(indices) for indices in by_engine.values()}
        assert len(counts) == 1 and counts.pop() > 1, version
        assert all(indices == set(range(len(indices))) for indices in by_engine.values()), version
