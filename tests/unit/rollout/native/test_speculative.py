"""Speculative decoding in the native engine and the online draft trainer (one process, no Ray)."""
import math

import pytest
import torch

from miles_ray.config import TrainConfig
from miles_ray.rollout import SamplingParams
from miles_ray.rollout.native.engine import NativeEngine
from miles_ray.rollout.native.speculative import verify


def _chi2_pvalue_ok(counts: torch.Tensor, probs: torch.Tensor, alpha_z: float = 3.7) -> tuple[bool, float]:
    """Pearson chi-square of ``counts`` against ``probs`` (bins with expected < 5 merged); True when
    the statistic is below the Wilson-Hilferty quantile at z=alpha_z (p ~ 1e-4)."""
    n = counts.sum()
    exp = probs * n
    big = exp >= 5
    obs = torch.cat([counts[big], counts[~big].sum()[None]])
    ex = torch.cat([exp[big], exp[~big].sum()[None]])
    keep = ex > 0
    stat = float(((obs[keep] - ex[keep]) ** 2 / ex[keep]).sum())
    dof = int(keep.sum()) - 1
    crit = dof * (1 - 2 / (9 * dof) + alpha_z * math.sqrt(2 / (9 * dof))) ** 3
    return stat < crit, stat / crit


def _stream(p: torch.Tensor, q: torch.Tensor, k: int, rows: int, length: int, gen) -> torch.Tensor:
    """Token streams from repeated verify rounds with context-free target ``p`` and draft ``q``."""
    out = [[] for _ in range(rows)]
    while min(len(o) for o in out) < length:
        drafts = torch.multinomial(q.expand(rows, -1), k, replacement=True, generator=gen)
        n, nxt = verify(p.expand(rows, k + 1, -1), q.expand(rows, k, -1), drafts, gen)
        for o, d, c, t in zip(out, drafts.tolist(), n.tolist(), nxt.tolist()):
            o.extend(d[:c] + [t])
    return torch.tensor([o[:length] for o in out])


def test_verify_streams_follow_the_target_distribution():
    """Every position of the stream, and pairs of positions, follow the target, whatever the draft."""
    gen = torch.Generator().manual_seed(0)
    p = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.07, 0.03])
    q = torch.tensor([0.05, 0.1, 0.4, 0.05, 0.2, 0.2])  # a poor draft: many rejections
    toks = _stream(p, q, k=3, rows=20000, length=4, gen=gen)
    for pos in range(4):
        ok, ratio = _chi2_pvalue_ok(torch.bincount(toks[:, pos], minlength=6).float(), p)
        assert ok, f"position {pos}: chi2/crit={ratio:.2f}"
    pair = torch.bincount(toks[:, 1] * 6 + toks[:, 2], minlength=36).float()
    assert _chi2_pvalue_ok(pair, torch.outer(p, p).flatten())[0]
    # the test has power: the draft's own tokens would fail it
    drafted = torch.multinomial(q, 20000, replacement=True, generator=gen)
    assert not _chi2_pvalue_ok(torch.bincount(drafted, minlength=6).float(), p)[0]


def test_verify_greedy_and_perfect_draft():
    p = torch.zeros(2, 4, 5)
    p[:, :, 3] = 1.0  # greedy target always says 3
    q = p[:, :3].clone()
    n, nxt = verify(p, q, torch.full((2, 3), 3), None)
    assert n.tolist() == [3, 3] and nxt.tolist() == [3, 3]  # all accepted + bonus
    q2 = torch.zeros(2, 3, 5)
    q2[:, :, 1] = 1.0
    n, nxt = verify(p, q2, torch.full((2, 3), 1), None)
    assert n.tolist() == [0, 0] and nxt.tolist() == [3, 3]  # rejected at once, corrected to the argmax


@pytest.fixture(scope="module")
def smol():
    from miles_ray.models.loading import smollm2_gguf_path

    try:
        smollm2_gguf_path()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    return NativeEngine("smollm2", draft="layers:4", num_draft_tokens=3)


def test_greedy_with_speculation_equals_plain_greedy(smol):
    """A real model, a weak untrained draft (many rejections), eos honoured, odd lengths."""
    prompts = [{"prompt": "The capital of France is"}, {"prompt": "def fibonacci(n):"}, {"prompt": "2 + 2 ="}]
    for params in (SamplingParams(temperature=0.0, max_new_tokens=13, ignore_eos=True),
                   SamplingParams(temperature=0.0, max_new_tokens=20)):
        smol.set_speculation(False)
        plain = smol.generate(prompts, 1, params)
        smol.set_speculation(True)
        spec = smol.generate(prompts, 1, params)
        stats = smol.spec_stats()
        assert [s.response_ids for s in spec] == [s.response_ids for s in plain]
        assert [s.finish_reason for s in spec] == [s.finish_reason for s in plain]
        for a, b in zip(plain, spec):
            assert b.response_logprobs == pytest.approx(a.response_logprobs, abs=1e-4)  # the target's log-probs
        assert 0 <= stats["spec_accept_rate"] < 0.9 and stats["spec_rounds"] > 0


def _pit_ks(model, samples, seed: int = 1) -> float:
    """sqrt(n) x KS distance from Uniform(0, 1) of the randomised probability-integral transform of
    every sampled token (after the first) under ``model``'s exact conditional distribution."""
    gen = torch.Generator().manual_seed(seed)
    by_prompt: dict = {}
    for s in samples:
        by_prompt.setdefault(tuple(s.prompt_ids), []).append(s.response_ids)
    us = []
    for prompt, responses in by_prompt.items():
        ids = torch.tensor([list(prompt) + r for r in responses])
        with torch.no_grad():
            logits = model(ids.to(model.device)).logits[:, len(prompt):-1].float().cpu()
        probs = torch.softmax(logits, -1)  # predicts tokens 1..
        tok = ids[:, len(prompt) + 1:, None]
        p_tok = probs.gather(-1, tok).squeeze(-1)
        below = probs.cumsum(-1).gather(-1, tok).squeeze(-1) - p_tok
        us.append((below + torch.rand(p_tok.shape, generator=gen) * p_tok).flatten())
    u = torch.cat(us).sort().values
    grid = torch.arange(1, len(u) + 1) / len(u)
    return float(torch.maximum(grid - u, u - (grid - 1 / len(u))).max()) * math.sqrt(len(u))


def _lr_z(target, draft, samples) -> float:
    """z-score of the summed log-likelihood ratio log p/q of every sampled token (after the first)
    around its exact mean under the target: N(0, 1) when tokens follow p, very negative when they
    lean toward the draft q (a martingale CLT: each term is centred given its prefix)."""
    total, var = 0.0, 0.0
    by_prompt: dict = {}
    for s in samples:
        by_prompt.setdefault(tuple(s.prompt_ids), []).append(s.response_ids)
    for prompt, responses in by_prompt.items():
        ids = torch.tensor([list(prompt) + r for r in responses])
        with torch.no_grad():
            lp = torch.log_softmax(target(ids.to(target.device)).logits[:, len(prompt):-1].float().cpu(), -1)
            lq = torch.log_softmax(draft(ids.to(draft.device)).logits[:, len(prompt):-1].float().cpu(), -1)
        r, p = lp - lq, lp.exp()
        mean = (p * r).sum(-1)
        obs = r.gather(-1, ids[:, len(prompt) + 1:, None]).squeeze(-1)
        total += float((obs - mean).sum())
        var += float(((p * r * r).sum(-1) - mean ** 2).sum())
    return total / math.sqrt(var)


def test_sampled_tokens_follow_the_target(model_cache):
    """Speculative samples pass a KS test (probability-integral transform) and a likelihood-ratio
    test against the target's exact conditionals; samples from the draft alone fail the latter.
    The first token comes from the prefill, so tokens 2.. are tested."""
    from miles_ray.rollout.native.model import NativeForward

    eng = NativeEngine("tiny:qwen3", tiny_cache_dir=model_cache, draft="layers:1", num_draft_tokens=3, seed=3)
    params = SamplingParams(temperature=1.0, max_new_tokens=6, ignore_eos=True)
    reqs = [{"prompt": "What is 3+4?"}, {"prompt": "hello"}]
    samples = eng.generate(reqs, 400, params)
    assert 0.05 < eng.spec_stats()["spec_accept_rate"] < 0.95  # the draft differs from the target
    target, draft = eng.model, eng.spec.model
    assert _pit_ks(target, samples) < 1.95  # KS critical value at alpha = 0.001
    assert abs(_lr_z(target, draft, samples)) < 3.9
    eng.set_speculation(False)
    eng.model, eng.forward = draft, NativeForward(draft)  # decode with the draft alone
    assert _lr_z(target, draft, eng.generate(reqs, 400, params)) < -3.9


def test_draft_trainer_loss_falls_and_acceptance_rises(model_cache):
    """Training the draft online on the policy's rollouts lowers its loss and raises acceptance."""
    from miles_ray.training.fsdp.draft import DraftTrainer

    eng = NativeEngine("tiny:qwen3", tiny_cache_dir=model_cache, draft="layers:1", num_draft_tokens=4, seed=0)
    drafter = DraftTrainer("layers:1", "tiny:qwen3", TrainConfig(micro_batch_size=64), lr=3e-3,
                           tiny_cache_dir=model_cache)
    with torch.no_grad():  # a peaked target (a random one is near uniform: nothing to learn)
        eng.model.lm_head.weight.mul_(8.0)
    params = SamplingParams(temperature=1.0, max_new_tokens=12, ignore_eos=True)
    reqs = [{"prompt": f"What is {i}+{i + 1}?"} for i in range(8)]
    eng.generate(reqs, 4, params)
    before = eng.spec_stats()["spec_accept_rate"]
    losses = []
    for _ in range(12):
        losses.append(drafter.train_on(eng.generate(reqs, 4, params))["draft_loss"])
        eng.load_draft(drafter.get_weights())
    eng.spec_stats()
    eng.generate(reqs, 4, params)
    after = eng.spec_stats()["spec_accept_rate"]
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3
    assert after > before + 0.05, (before, after)


def test_draft_config_errors(tmp_path, model_cache):
    from miles_ray.config import ConfigError, load_config
    from miles_ray.models.draft import build_draft

    with pytest.raises((ConfigError, ValueError), match="needs rollout.backend=native or sglang"):
        load_config(None, ["draft.enabled=true", "rollout.backend=hf"])
    with pytest.raises(ValueError, match="the target has 2 layers"):
        build_draft("layers:2", "tiny:qwen3", tiny_cache_dir=model_cache)
    try:
        from miles_ray.models.loading import smollm2_gguf_path

        smollm2_gguf_path()
    except FileNotFoundError:
        return  # no second tokenizer to compare with
    with pytest.raises(ValueError, match="does not share the tokenizer"):
        build_draft("smollm2", "tiny:qwen3", tiny_cache_dir=model_cache)
