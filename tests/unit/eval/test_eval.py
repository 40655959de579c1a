"""Evaluation on held-out sets (``eval`` section): the pass@k estimator, the metrics, the schedule
and the loading (pure), then real runs on a local Ray: a synchronous run evaluates on its rollout
engines, an async run on its dedicated evaluation engine; both log ``eval/<name>/...`` into the
rows of step 0 and the last step (and wandb), and their ledger still proves every training step
once with no evaluation sample in it."""
import itertools
import json
from pathlib import Path

import pytest

from miles_ray.config import load_config
from miles_ray.errors import UserError
from miles_ray.eval import EvalSchedule, dataset_metrics, eval_requests, load_eval_sets, pass_at_k
from miles_ray.eval.schedule import dedicated_engines
from miles_ray.sample import Sample
from placement.plan import plan_placement

from helpers.paths import DATA  # noqa: E402
JSONL = ('{name: arith_file, source: "%s", prompt_key: question, label_key: answer, n_samples: 2, max_prompts: 4, '
         'reward_fn: math}'
         % (DATA / "eval_arith.jsonl"))
SYNTH = ("{name: synth, source: 'synthetic:arithmetic', num_synthetic: 6, n_samples: 3, temperature: 1.0, "
         "max_new_tokens: 6, reward_fn: 'tests.helpers.custom_rewards:length_reward', pass_threshold: 12.0}")


# -- pure ---------------------------------------------------------------------------------------
def _brute_pass_at_k(n: int, c: int, k: int) -> float:
    answers = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(answers[i] for i in s) for s in subsets) / len(subsets)


def test_pass_at_k_equals_brute_force_over_all_subsets():
    for n in range(1, 8):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(_brute_pass_at_k(n, c, k), abs=1e-12), (n, c, k)
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 = c / n
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 4)


def _s(reward: float, length: int = 2) -> Sample:
    return Sample(prompt_index=0, group_id=-1, prompt="", label="", prompt_ids=[1], response_ids=[5] * length,
                  reward=reward)


def test_dataset_metrics_by_hand():
    sampled = [[_s(1.0, 2), _s(0.0, 4)], [_s(0.0, 2), _s(0.0, 4)], [_s(1.0, 2), _s(1.0, 2)]]
    m = dataset_metrics("d", sampled, [_s(1.0), _s(0.0), _s(0.5)], threshold=1.0)
    assert m == pytest.approx({
        "eval/d/reward_mean": 3 / 6, "eval/d/pass@1": (0.5 + 0 + 1) / 3, "eval/d/pass@2": (1 + 0 + 1) / 3,
        "eval/d/greedy_pass@1": 1 / 3, "eval/d/greedy_reward_mean": 1.5 / 3, "eval/d/response_len_mean": 16 / 6,
        "eval/d/num_prompts": 3})
    low = dataset_metrics("d", sampled, None, threshold=0.0)  # everything passes; no greedy keys
    assert low["eval/d/pass@1"] == low["eval/d/pass@2"] == 1.0 and "eval/d/greedy_pass@1" not in low
    with pytest.raises(ValueError):
        dataset_metrics("d", [[_s(1.0)], [_s(1.0), _s(0.0)]], None, 1.0)


def test_schedule_one_evaluation_per_row():
    s = EvalSchedule(every=2, at_start=True, at_end=True, total_steps=5)
    assert s.at_start_of(0) and not s.at_start_of(3)  # a resumed run does not evaluate "at start"
    assert [k for k in range(5) if s.after_step(k)] == [1, 3, 4]  # after steps 2, 4 and the end
    every1 = EvalSchedule(every=1, at_start=True, at_end=True, total_steps=3)
    assert not every1.at_start_of(0) and all(every1.after_step(k) for k in range(3))  # row 0: after step 0
    assert [k for k in range(4) if EvalSchedule(0, True, True, 4).after_step(k)] == [3]
    assert not EvalSchedule(2, True, True, 4, enabled=False).after_step(1)


def test_eval_config_rules():
    ok = load_config(None, [f"eval.datasets=[{SYNTH}]", "async_rl.enabled=true"])
    assert dedicated_engines(ok) == 1 and dedicated_engines(ok, engines=False) == 0
    assert dedicated_engines(load_config(None, [f"eval.datasets=[{SYNTH}]"])) == 0  # sync: rollout engines
    bad = {"unique": f"eval.datasets=[{SYNTH}, {SYNTH}]",
           "unknown synthetic": "eval.datasets=[{name: x, source: 'synthetic:nope'}]",
           "jsonl / .parquet": "eval.datasets=[{name: x, source: data.csv}]",
           "pattern": "eval.datasets=[{name: 'a/b', source: 'synthetic:arithmetic'}]"}
    for why, override in bad.items():
        with pytest.raises(UserError, match=why):
            load_config(None, [override])


def test_placement_gives_the_eval_engine_its_own_bundle():
    cfg = load_config(None, ["cluster.gpus_per_engine=2", "cluster.use_gpu=true", "rollout.num_engines=2"])
    plan = plan_placement(cfg.cluster, 2, 1, eval_engines=1)
    (a,) = plan.for_role("eval")
    assert (a.group, a.bundle_index, a.num_gpus) == ("eval", 0, 2.0)
    c = cfg.cluster.cpus_per_actor
    assert [g.bundles for g in plan.groups if g.name == "eval"] == [[{"CPU": c, "GPU": 2.0}]]
    assert plan.total_resources()["GPU"] == plan_placement(cfg.cluster, 2, 1).total_resources()["GPU"] + 2


def test_load_eval_sets_with_the_data_loaders(tokenizer):
    cfg = load_config(None, [f"eval.datasets=[{JSONL}, {SYNTH}]", "seed=3"])
    files, synth = load_eval_sets(cfg, tokenizer)
    assert [p.label for p in files.items] == ["5", "8", "8", "9"]  # row 3 (no question) skipped; max_prompts=4
    assert [p.index for p in files.items] == [0, 1, 2, 4] and "What is 2+3?" in files.items[0].prompt
    assert "<|im_start|>" in files.items[0].prompt  # the run's chat template, as for training prompts
    train, _ = load_config(None, ["seed=3"]), None
    from miles_ray.data import load_prompts

    train_items, _ = load_prompts(train.data.model_copy(update={"num_synthetic": 6}), tokenizer, seed=3)
    assert [p.prompt for p in synth.items] != [p.prompt for p in train_items]  # seed + 1: another stream
    reqs = eval_requests(files.items, first=6)
    assert [r["group_id"] for r in reqs] == [-7, -8, -9, -10] and reqs[3]["prompt_index"] == 4


def test_eval_keys_keep_their_names_in_jsonl_wandb_and_ray(tmp_path):
    """``eval/<name>/...`` keys are already grouped: the logger writes them as they are, wandb and
    the Ray exporter (sinks) get them as scalars, and their Prometheus names are valid and distinct."""
    import re

    from miles_ray.config import LoggingConfig
    from miles_ray.utils.metric_names import group_of, prom_name, scalars
    from miles_ray.utils.tracking import MetricsLogger

    sampled = [[_s(1.0), _s(0.0)], [_s(0.0), _s(0.0)]]
    metrics = {**dataset_metrics("gsm-dev.v1", sampled, [_s(1.0), _s(0.0)], 1.0), "eval/reward_mean": 0.25}
    seen = []
    logger = MetricsLogger(tmp_path, LoggingConfig(wandb=False), "t", {}, sinks=[lambda step, row: seen.append(row)])
    logger.log(4, {"reward_mean": 0.5, **metrics})
    logger.close()
    (row,) = seen
    assert {k: v for k, v in row.items() if k.startswith("eval/")} == metrics == {
        k: v for k, v in scalars(json.loads((tmp_path / "metrics.jsonl").read_text())).items() if k.startswith("eval/")}
    assert row["rollout/reward_mean"] == 0.5 and all(group_of(k) == "eval" for k in metrics)
    names = {prom_name(k) for k in metrics}
    assert len(names) == len(metrics) and all(re.fullmatch(r"[a-zA-Z_:][a-zA-Z0-9_:]*", n) for n in names)
    assert "miles_eval_reward_mean" in names  # the Grafana "Eval reward" panel's series


# -- real runs ----------------------------------------------------------------------------------


BASE = ("rollout.prompts_per_step=2", "rollout.n_samples_per_prompt=2", "rollout.backend=native",
        "rollout.num_engines=2", "rollout.max_new_tokens=8", "train.sft_warmup_steps=0", "data.num_synthetic=16",
        "checkpoint.export_hf=false", "logging.progress_bar=false", "total_steps=3", "eval.every=2",
        "reward.fn=tests.helpers.custom_rewards:length_reward")  # training rewards that vary with the samples
