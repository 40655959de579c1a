"""The native engine (slot KV cache, continuous batching) against transformers and the trainer."""
import pytest
import torch

from miles_ray.config import AlgorithmConfig, TrainConfig
from miles_ray.rollout.native import NativeEngine
from miles_ray.rollout import SamplingParams
from miles_ray.rollout.native.sampling import sample
from miles_ray.training.fsdp import PolicyTrainer

PROMPTS = ["What is 3+4?", "hello world, what is the sum of 12+7 please", "compute 5+5", "x"]


@pytest.fixture(scope="module")
def engine(model_cache, tiny_dir):
    eng = NativeEngine("tiny:qwen3", tiny_cache_dir=model_cache, seed=0, max_running=64)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a random model with sharp, varied logits (the default init repeats one token)
        for p in eng.model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3, generator=g)
    return eng


def _ids(engine, text):
    return engine.tokenizer(text, add_special_tokens=False)["input_ids"]


def _hf_greedy(model, ids, n, eos):
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=eos,
                         pad_token_id=0)[0, len(ids):].tolist()
    return out[: out.index(eos) + 1] if eos in out else out


def test_greedy_equals_transformers_token_for_token(engine):
    eos = engine.tokenizer.eos_token_id
    rids = [engine.add_request(_ids(engine, p), SamplingParams(12, temperature=0)) for p in PROMPTS]
    done = {r.rid: r for r in engine.run_until_done()}
    for rid, p in zip(rids, PROMPTS):
        assert done[rid].output_ids == _hf_greedy(engine.model, _ids(engine, p), 12, eos)
    assert len({tuple(done[r].output_ids) for r in rids}) > 1  # outputs actually differ


def test_logprobs_match_trainer_recomputation(engine, model_cache):
    trainer = PolicyTrainer("tiny:qwen3", TrainConfig(), AlgorithmConfig(), tiny_cache_dir=model_cache, temperature=0.7)
    trainer.module.load_state_dict(engine.model.state_dict())
    reqs = [{"prompt": p, "label": "", "prompt_index": i, "group_id": i} for i, p in enumerate(PROMPTS)]
    samples = engine.generate(reqs, 3, SamplingParams(10, temperature=0.7, top_p=0.9))
    assert len(samples) == 12 and [s.group_id for s in samples[:3]] == [0, 0, 0]
    for s, lp in zip(samples, trainer.compute_logprobs(samples)):
        assert lp == pytest.approx(s.response_logprobs, abs=1e-4)


def test_continuous_batching_matches_one_at_a_time(engine):
    params = [SamplingParams(n, temperature=0) for n in (3, 9, 1, 6, 12)]
    prompts = [_ids(engine, p) for p in PROMPTS + ["What is 1+1?"]]
    alone = []
    for p, sp in zip(prompts, params):
        engine.add_request(p, sp)
        alone.append(engine.run_until_done()[0].output_ids)
    engine.max_running = 2  # requests must queue, join and leave mid-flight
    try:
        rids = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
        seen_running = []
        finished = {}
        while engine.has_work():
            for r in engine.step():
                finished[r.rid] = r
            seen_running.append(len(engine.running))
    finally:
        engine.max_running = 64
    assert max(seen_running) <= 2 and len(finished) == 5
    assert [finished[r].output_ids for r in rids] == alone


def test_stop_strings_stop_tokens_abort_pause(engine):
    ids = _ids(engine, PROMPTS[1])
    engine.add_request(ids, SamplingParams(12, temperature=0, ignore_eos=True))
    full = engine.run_until_done()[0]
    assert len(full.output_ids) == 12
    text = engine.tokenizer.decode(full.output_ids, skip_special_tokens=True)
    stop = text[2:4] if len(text) >= 4 else text[-1:]
    engine.add_request(ids, SamplingParams(12, temperature=0, stop=[stop], ignore_eos=True))
    r = engine.run_until_done()[0]
    assert r.finish_reason == "stop" and len(r.output_ids) < len(full.output_ids) and stop in r.text
    engine.add_request(ids, SamplingParams(12, temperature=0, stop_token_ids=[full.output_ids[1]], ignore_eos=True))
    r = engine.run_until_done()[0]
    assert r.finish_reason == "stop" and r.output_ids == full.output_ids[:2]
    # abort a running request; the others finish normally
    a = engine.add_request(ids, SamplingParams(12, temperature=0, ignore_eos=True))
    b = engine.add_request(ids, SamplingParams(5, temperature=0, ignore_eos=True))
    engine.step()
    aborted = engine.abort(a)
    assert aborted.finish_reason == "abort" and 0 < len(aborted.output_ids) < 12
    rest = engine.run_until_done()
    assert [x.rid for x in rest] == [b] and rest[0].output_ids == full.output_ids[:5]
    # pause keeps requests, resume continues them
    engine.add_request(ids, SamplingParams(4, temperature=0, ignore_eos=True))
    engine.pause()
    assert engine.step() == [] and engine.has_work()
    engine.resume()
    assert engine.run_until_done()[0].output_ids == full.output_ids[:4]


def test_n_samples_share_prefill_but_differ(engine):
    reqs = [{"prompt": PROMPTS[0], "label": "", "prompt_index": 0, "group_id": 0}]
    samples = engine.generate(reqs, 6, SamplingParams(8, temperature=1.0))
    assert len(samples) == 6 and len({tuple(s.response_ids) for s in samples}) > 1


def test_sampling_truncation_rules():
    logits = torch.tensor([[0.0, 2.0, 1.0, -1.0]] * 3)
    one = torch.ones(3)
    # top-k 1, top-p tiny, min-p 1: all keep only the argmax
    toks, lp = sample(logits, one, torch.tensor([1, 0, 0]), torch.tensor([1.0, 1e-6, 1.0]),
                      torch.tensor([0.0, 0.0, 1.0]))
    assert toks.tolist() == [1, 1, 1]
    assert lp[0].item() == pytest.approx(torch.log_softmax(logits[0], -1)[1].item())
    g = torch.Generator().manual_seed(0)
    draws = [sample(logits[:1], one[:1], torch.tensor([2]), one[:1], torch.zeros(1), g)[0].item() for _ in range(200)]
    assert set(draws) == {1, 2}  # top-k 2 never draws the other tokens


def test_smollm2_greedy_equals_transformers():
    from miles_ray.models.loading import smollm2_gguf_path

    try:
        smollm2_gguf_path()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    eng = NativeEngine("smollm2")
    tok = eng.tokenizer
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
               for q in ("What is 2+3?", "Name a colour.")]
    reqs = [{"prompt": p, "label": "", "prompt_index": i, "group_id": i} for i, p in enumerate(prompts)]
    samples = eng.generate(reqs, 1, SamplingParams(16, temperature=0))
    for s in samples:
        assert s.response_ids == _hf_greedy(eng.model, s.prompt_ids, 16, tok.eos_token_id)
    trainer = PolicyTrainer("smollm2", TrainConfig(micro_batch_size=2), AlgorithmConfig(), temperature=0.8)
    sampled = eng.generate(reqs, 2, SamplingParams(12, temperature=0.8))
    for s, lp in zip(sampled, trainer.compute_logprobs(sampled)):
        assert lp == pytest.approx(s.response_logprobs, abs=1e-4)


def test_sampler_frequencies_match_the_distribution():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0])
    logits = probs.clamp(min=1e-12).log()[None].repeat(20000, 1)
    one = torch.ones(20000)
    toks, _ = sample(logits, one, torch.zeros(20000, dtype=torch.long), one, torch.zeros(20000),
                     torch.Generator().manual_seed(0))
    freq = torch.bincount(toks, minlength=5).float() / 20000
    assert (freq - probs).abs().max() < 0.015 and freq[4] == 0
