"""Done-when runs of issue 25: whole training runs over the router against strict servers that
behave as SGLang 0.5.5 and as 0.5.23 (``rollout.sglang_version``), the update protocol on every
sync (pause in the version's mode, update, flush, version, continue): every step's ledger intact,
no in-flight request aborted by a weight update (only by a pause whose mode aborts: 0.5.5, whose
aborted requests the client re-submits), the prefix cache flushed at every update (each step's row:
``rollout/cache_flushes``, ``rollout/update_aborts``). Counters come
from the stand-ins' stats files (``--stats-path``, :mod:`miles_ray.rollout.http.server_sglang`)."""
import json

import pytest

from miles_ray.config import load_config

pytestmark = pytest.mark.ray
STRICT = ("rollout.backend=native", "rollout.serve_http=true", "rollout.strict_sglang=true", "rollout.num_engines=2",
          "logging.progress_bar=false", "logging.wandb=false", "checkpoint.every=0")


def _cfg(tmp_path, model_cache, version, *extra):
    return load_config(None, [f"output_dir={tmp_path}/run", f"model.tiny_cache_dir={model_cache}",
                              f"rollout.sglang_version={version}", *STRICT, *extra])


def _stats(tmp_path) -> list[dict]:
    files = sorted((tmp_path / "run").glob("sglang-stand-in-*.json"))
    assert len(files) == 2, files
    return [json.loads(f.read_text()) for f in files]


def _rows(tmp_path) -> list[dict]:
    return [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")]


def _check_rows(rows: list[dict], stats: list[dict], engines: int = 2) -> None:
    """Every step's row counts its sync's flushes (one per engine server) and the pause aborts its
    samples went through (each one also counted by a stand-in: never more than they saw)."""
    assert [r["rollout/cache_flushes"] for r in rows] == [engines] * len(rows)
    assert sum(r["rollout/update_aborts"] for r in rows) <= sum(s["aborts"]["pause"] for s in stats)


def _check_protocol(stats: list[dict], version: str, pause_may_abort: bool) -> None:
    for s in stats:
        assert s["sglang_version"] == version
        assert s["aborts"]["weight_update"] == 0 and s["aborts"]["update_weight_version"] == 0
        assert s["version_updates"] >= 2 and s["cache_flushes"] == s["version_updates"]  # flushed at every update
        assert pause_may_abort or s["aborts"]["pause"] == 0
        assert s["paused"] is None and not s["session"]


@pytest.mark.parametrize("version", ["0.5.5", "0.5.23"])
def test_sync_run_per_sglang_version(local_ray_gpus, tmp_path, model_cache, tokenizer, version):
    from helpers.ledger import check_run
    from jobs.train import run

    cfg = _cfg(tmp_path, model_cache, version, f"run_name=sync-{version}", "total_steps=2",
               "rollout.prompts_per_step=4", "rollout.n_samples_per_prompt=2", "rollout.max_new_tokens=8",
               "weight_sync.transport=broadcast")
    summary = run(cfg)
    assert summary["steps"] == 2
    check_run(tmp_path / "run", cfg, tokenizer)
    _check_protocol(_stats(tmp_path), version, pause_may_abort=False)
    rows = _rows(tmp_path)
    _check_rows(rows, _stats(tmp_path))
    assert all(r["rollout/update_aborts"] == 0 for r in rows)  # sync: nothing in flight at an update


@pytest.mark.parametrize("version", ["0.5.5", "0.5.23"])
def test_async_partial_rollout_per_sglang_version(local_ray_gpus, tmp_path, model_cache, tokenizer, version):
    """0.5.23 pauses with mode=retract: in-flight requests survive; 0.5.5's pause aborts them and the
    client re-submits their prefixes (the spans record both versions)."""
    from helpers.ledger import check_run
    from jobs.train import run

    cfg = _cfg(tmp_path, model_cache, version, f"run_name=async-{version}", "total_steps=3",
               "rollout.prompts_per_step=4", "rollout.n_samples_per_prompt=4", "async_rl.enabled=true",
               "async_rl.staleness=1", "rollout.max_new_tokens=12", "train.sft_warmup_steps=2")
    summary = run(cfg)
    rows = _rows(tmp_path)
    assert summary["steps"] == len(rows) == 3 and summary["lost"] == 0 and summary["duplicates"] == 0
    assert all(r["async/staleness_max"] <= 1 for r in rows)
    check_run(tmp_path / "run", cfg, tokenizer)
    _check_protocol(_stats(tmp_path), version, pause_may_abort=version == "0.5.5")
    _check_rows(rows, _stats(tmp_path))
    assert version == "0.5.5" or all(r["rollout/update_aborts"] == 0 for r in rows)  # retract: none aborted


def test_r3_uses_sglang_routed_experts_on_0_5_23(local_ray_gpus, tmp_path, model_cache, tokenizer):
    """A MoE model with routing replay against 0.5.23 stand-ins: the engines return SGLang's base64
    int32 [seqlen-1, layers, topk] traces (--enable-return-routed-experts, return_routed_experts),
    the client decodes them and the trainer replays them (its metrics report routing agreement)."""
    from jobs.train import run

    cfg = _cfg(tmp_path, model_cache, "0.5.23", "run_name=r3-0.5.23", "model.path=tiny:qwen3_moe", "total_steps=2",
               "rollout.prompts_per_step=2", "rollout.n_samples_per_prompt=2", "rollout.max_new_tokens=6",
               "algorithm.routing_replay=r3")
    assert run(cfg)["steps"] == 2
    rows = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["train/routing_agreement"] for r in rows] == [1.0, 1.0]  # the trainer used the engines' experts
    assert all(0.0 <= r["train/routing_agreement_own"] <= 1.0 for r in rows)
    _check_protocol(_stats(tmp_path), "0.5.23", pause_may_abort=False)
