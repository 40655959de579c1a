"""Evaluation on held-out sets (``eval`` section): the pass@k estimator, the metrics, the schedule
and the loading (pure), then real runs on a local Ray: a synchronous run evaluates on its rollout
engines, an async run on its dedicated evaluation engine; both log ``eval/<name>/...`` into the
rows of step 0 and the last step (and wandb), and their ledger still proves every training step
once with no evaluation sample in it."""
import json
from pathlib import Path

import pytest

from miles_ray.config import load_config

from helpers.paths import DATA  # noqa: E402
JSONL = ('{name: arith_file, source: "%s", prompt_key: question, label_key: answer, n_samples: 2, max_prompts: 4, '
         'reward_fn: math}'
         % (DATA / "eval_arith.jsonl"))
SYNTH = ("{name: synth, source: 'synthetic:arithmetic', num_synthetic: 6, n_samples: 3, temperature: 1.0, "
         "max_new_tokens: 6, reward_fn: 'tests.helpers.custom_rewards:length_reward', pass_threshold: 12.0}")


# -- pure ---------------------------------------------------------------------------------------


# -- real runs ----------------------------------------------------------------------------------
def _wandb_history(run_dir: Path) -> list[dict]:
    """History rows of the offline wandb run under ``run_dir``, read from its ``.wandb`` file: a
    LevelDB-log-format record stream (7-byte ``:W&B`` header, 32 KiB blocks, records of 4-byte
    checksum, 2-byte length, 1-byte type: 1 full, 2 first, 3 middle, 4 last) of
    ``wandb_internal_pb2.Record`` protobufs (wandb/sdk/internal/datastore.py, wandb <= 0.17)."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    data, pos, block, buf, out = path.read_bytes(), 7, 32768, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        buf, pos = buf + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            buf = b""
            if rec.WhichOneof("record_type") == "history":
                out.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item})
    return out


BASE = ("rollout.prompts_per_step=2", "rollout.n_samples_per_prompt=2", "rollout.backend=native",
        "rollout.num_engines=2", "rollout.max_new_tokens=8", "train.sft_warmup_steps=0", "data.num_synthetic=16",
        "checkpoint.export_hf=false", "logging.progress_bar=false", "total_steps=3", "eval.every=2",
        "reward.fn=tests.helpers.custom_rewards:length_reward")  # training rewards that vary with the samples


def _cfg(out, model_cache, *extra):
    return load_config(None, [f"output_dir={out}", f"model.tiny_cache_dir={model_cache}", *BASE,
                              f"eval.datasets=[{JSONL}, {SYNTH}]", *extra])


def _check_eval_rows(rows: list) -> None:
    """Row 0: the initial weights; row 1: after step 1 (every=2); row 2: after the last step."""
    versions = [r.get("eval/weight_version") for r in rows]
    assert versions == [1, 3, 4] == [1] + [r["train/weight_version"] for r in rows[1:]]
    for r in rows:
        assert r["eval/arith_file/num_prompts"] == 4 and r["eval/synth/num_prompts"] == 6
        for name, k in (("arith_file", 2), ("synth", 3)):
            p1, pk = r[f"eval/{name}/pass@1"], r[f"eval/{name}/pass@{k}"]
            assert 0.0 <= p1 <= pk <= 1.0 and 0.0 <= r[f"eval/{name}/greedy_pass@1"] <= 1.0
            assert 0 < r[f"eval/{name}/response_len_mean"] <= 8
        assert r["eval/synth/response_len_mean"] <= 6  # the set's own max_new_tokens
        assert r["eval/synth/reward_mean"] > 0  # length_reward: the set's own reward function
        both = (r["eval/arith_file/reward_mean"] + r["eval/synth/reward_mean"]) / 2
        assert r["eval/reward_mean"] == pytest.approx(both)
    assert all(g >= 0 for r in rows for g in r["train/ledger_groups"])


@pytest.mark.ray
def test_sync_run_evaluates_at_start_every_and_end(local_ray, tmp_path, model_cache, tokenizer):
    from jobs.train import run
    from tests.helpers.ledger import check_run, rows

    out = tmp_path / "sync"
    cfg = _cfg(out, model_cache, "run_name=evalsync", "logging.wandb=true", "logging.wandb_mode=offline")
    run(cfg)
    got = rows(out)
    _check_eval_rows(got)
    check_run(out, cfg, tokenizer)  # every step once, groups 0..5 only: no evaluation sample in the ledger
    history = _wandb_history(out)
    logged = {h["_step"]: h for h in history if "eval/reward_mean" in h}
    assert sorted(logged) == [0, 1, 2]
    for r in got:
        assert logged[r["step"]]["eval/synth/pass@3"] == pytest.approx(r["eval/synth/pass@3"])
        assert logged[r["step"]]["eval/arith_file/greedy_pass@1"] == pytest.approx(r["eval/arith_file/greedy_pass@1"])

    # evaluating does not change training: the same run without eval trains on the same samples
    plain = tmp_path / "plain"
    run(load_config(None, [f"output_dir={plain}", f"model.tiny_cache_dir={model_cache}", *BASE, "run_name=evalplain",
                           "logging.wandb=false"]))
    for a, b in zip(got, rows(plain)):
        assert a["train/ledger_prompts"] == b["train/ledger_prompts"]
        for key in ("rollout/reward_mean", "rollout/response_len_mean", "train/loss", "train/grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-7), (a["step"], key)


def _run_watching_actors(cfg) -> tuple[dict, set]:
    """Run ``cfg`` in a thread; returns its summary and the named actors seen while it ran."""
    import threading
    import time

    import ray

    from jobs.train import run

    result, seen = {}, set()
    driver = threading.Thread(target=lambda: result.update(summary=run(cfg)))
    driver.start()
    while driver.is_alive():
        seen.update(ray.util.list_named_actors())
        time.sleep(0.5)
    driver.join()
    assert "summary" in result, "the run failed (see its log)"
    return result["summary"], seen


@pytest.mark.ray
@pytest.mark.parametrize("dedicated", [True, False])
def test_async_run_evaluates_on_a_dedicated_engine_or_with_the_pump_held(local_ray, tmp_path, model_cache, tokenizer,
                                                                        dedicated):
    """With ``eval.dedicated_engine`` a third engine (``<run>-eval-0``) evaluates while the pump
    generates; without it the pump is held and the rollout engines evaluate. Either way the
    evaluation rows are the synchronous run's and the ledger loses and repeats nothing."""
    import ray

    from tests.helpers.ledger import check_run, rows

    out, name = tmp_path / "async", f"evalasync{int(dedicated)}"
    cfg = _cfg(out, model_cache, f"run_name={name}", "logging.wandb=false", "async_rl.enabled=true",
               "async_rl.staleness=1", "async_rl.off_policy.mode=tis", "checkpoint.every=0",
               f"eval.dedicated_engine={str(dedicated).lower()}")
    summary, seen = _run_watching_actors(cfg)
    assert summary["lost"] == 0 and summary["duplicates"] == 0
    assert (f"{name}-eval-0" in seen) == dedicated and f"{name}-rollout-1" in seen
    _check_eval_rows(rows(out))
    check_run(out, cfg, tokenizer)
    assert f"{name}-eval-0" not in ray.util.list_named_actors()  # stopped with the run
