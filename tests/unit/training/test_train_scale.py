"""The large-model training path on CPU: packing, memory-bounded log-probs, mixed precision,
activation checkpointing, token-balanced partitions, LR schedules, PPO epochs, out-of-memory
errors, sharded checkpoints (safe, resumable at another world size)."""
import copy
import pickle
import random

import pytest
import torch

from miles_ray.config import AlgorithmConfig, TrainConfig
from miles_ray.sample import Sample
from miles_ray.training.fsdp import PolicyTrainer
from miles_ray.training.base import TrainerOutOfMemory
from miles_ray.training.batching import make_minibatches, pack
from miles_ray.training.fsdp.logprobs import head_logprobs, naive_logprobs
from miles_ray.training.packing import karmarkar_karp, plan_micro_batches, rank_parts, tokens
from miles_ray.training.schedule import lr_factor


def _samples(n=12, seed=0, long=False):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        p, r = rng.randint(2, 9), rng.randint(1, 40 if long else 9)
        resp = [rng.randint(3, 300) for _ in range(r)]
        out.append(Sample(i, i // 2, "p", "1", [rng.randint(3, 300) for _ in range(p)], response_ids=resp,
                          response_logprobs=[-1.0] * r, advantages=[rng.uniform(-2, 2)] * r))
    return out


def _trainer(model_cache, spec="tiny:qwen3", **train):
    return PolicyTrainer(spec, TrainConfig(**{"micro_batch_size": 3, **train}),
                         AlgorithmConfig(entropy_coef=0.01), tiny_cache_dir=model_cache)


@pytest.mark.parametrize("spec", ["tiny:qwen3", "tiny:llama"])
def test_packed_logprobs_equal_padded(model_cache, spec):
    samples = _samples(long=True)
    padded = _trainer(model_cache, spec, packing=False).compute_logprobs(samples)
    packed_trainer = _trainer(model_cache, spec, packing=True, max_tokens_per_micro_batch=96)
    packed = packed_trainer.compute_logprobs(samples)
    assert [len(x) for x in packed] == [len(s.response_ids) for s in samples]
    diff = max(abs(a - b) for u, v in zip(padded, packed) for a, b in zip(u, v))
    assert diff < 1e-5, diff
    batch = pack(samples[:4], packed=True)
    assert batch.input_ids.shape[0] == 1 and batch.seqlens == [tokens(s) for s in samples[:4]]
    assert batch.position_ids[0, batch.seqlens[0]] == 0  # positions restart for the second sample


def test_packing_changes_nothing_in_a_train_step(model_cache):
    results = []
    for packing in (False, True):
        torch.manual_seed(0)
        t = _trainer(model_cache, packing=packing)
        samples = copy.deepcopy(_samples())
        t.prepare(samples)
        metrics = t.train_step(make_minibatches(samples, 2))
        results.append((metrics, [p.detach().clone() for p in t.module.parameters()]))
    for key in ("loss", "pg_loss", "entropy", "grad_norm"):
        assert results[0][0][key] == pytest.approx(results[1][0][key], rel=1e-4, abs=1e-6), key
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(results[0][1], results[1][1]))


@pytest.mark.parametrize("entropy", ["none", "log", "loss"])
def test_chunked_head_equals_naive(entropy):
    torch.manual_seed(0)
    head = torch.nn.Linear(32, 1000, bias=False)
    h = torch.randn(70, 32, requires_grad=True)
    tgt = torch.randint(0, 1000, (70,))
    logp, ent = head_logprobs(h, head, tgt, temperature=0.7, chunk_tokens=16, entropy=entropy)
    logits = head(h).float() / 0.7
    ref_logp = torch.log_softmax(logits, -1).gather(-1, tgt[:, None])[:, 0]
    ref_ent = -(torch.softmax(logits, -1) * torch.log_softmax(logits, -1)).sum(-1)
    assert torch.allclose(logp, ref_logp, atol=1e-5)
    if entropy != "none":
        assert torch.allclose(ent, ref_ent, atol=1e-5)
        assert ent.requires_grad == (entropy == "loss")
    (logp.sum() + (ent.sum() if entropy == "loss" else 0)).backward()
    got = (h.grad.clone(), head.weight.grad.clone())
    h.grad, head.weight.grad = None, None
    (ref_logp.sum() + (ref_ent.sum() if entropy == "loss" else 0)).backward()
    assert torch.allclose(got[0], h.grad, atol=1e-5) and torch.allclose(got[1], head.weight.grad, atol=1e-5)


def test_model_logprobs_equal_naive_full_vocab(model_cache):
    t = _trainer(model_cache, packing=False, logprob_chunk_tokens=5)
    samples = _samples(4)
    batch = pack(samples, device=t.device)
    with torch.no_grad():
        chunked, _ = t.model(batch, 1.0, "none")
        naive, _ = naive_logprobs(t.module, batch)
    assert torch.allclose(chunked, naive, atol=1e-5)


def test_bf16_mixed_keeps_updates_below_bf16_resolution(model_cache):
    """RMSNorm weights are 1.0; an Adam step of 1e-3 is below bf16's spacing there (2^-8), so pure
    bf16 never moves them while fp32 master weights accumulate the steps."""
    moved = {}
    for precision in ("bf16", "bf16_mixed"):
        torch.manual_seed(0)
        t = PolicyTrainer("tiny:qwen3", TrainConfig(precision=precision, lr=1e-3, grad_clip=1e9),
                          AlgorithmConfig(), dtype="bfloat16", tiny_cache_dir=model_cache)
        norm = t.module.model.norm.weight
        assert norm.dtype == (torch.bfloat16 if precision == "bf16" else torch.float32)
        for _ in range(10):
            t.sft_step(_samples(4), lr=1e-3)
        exported = t.full_state_dict()["model.norm.weight"].to(torch.bfloat16)  # what an engine would load
        moved[precision] = (exported != 1.0).float().mean().item()
    assert moved["bf16"] == 0.0
    assert moved["bf16_mixed"] > 0.3  # 10 steps of 1e-3 cross the spacing below 1.0 (2^-8), not always above


def test_gradient_checkpointing_same_gradients(model_cache):
    grads = {}
    for ckpt in (False, True):
        torch.manual_seed(0)
        t = _trainer(model_cache, gradient_checkpointing=ckpt)
        t.optimizer.step = lambda: None
        samples = copy.deepcopy(_samples())
        t.prepare(samples)
        t.train_step([samples])
        assert t.module.is_gradient_checkpointing == ckpt
        grads[ckpt] = [p.grad.clone() for p in t.module.parameters()]
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads[False], grads[True]))


def test_karmarkar_karp_balances_and_keeps_every_index():
    rng = random.Random(1)
    sizes = [int(rng.lognormvariate(4, 1)) + 1 for _ in range(101)]
    parts = karmarkar_karp(sizes, 4)
    assert sorted(i for p in parts for i in p) == list(range(101))
    sums = [sum(sizes[i] for i in p) for p in parts]
    assert max(sums) - min(sums) <= max(sizes)  # far better than a contiguous split in general
    samples = _samples(20, long=True)
    assert all(rank_parts(samples, 3))  # every rank gets a sample


def test_packed_micro_batches_fit_the_budget():
    samples = _samples(30, long=True)
    micro = plan_micro_batches(samples, 4, budget=64, packed=True)
    assert sorted(s.prompt_index for m in micro for s in m) == list(range(30))
    assert all(sum(tokens(s) for s in m) <= 64 for m in micro if len(m) > 1)
    assert len(micro) <= -(-sum(tokens(s) for s in samples) // 64) + 2


def test_lr_schedules():
    assert lr_factor("constant", 5, 10) == 1.0
    assert [lr_factor("linear", s, 10, warmup_steps=2) for s in (0, 1)] == [0.5, 1.0]
    assert lr_factor("linear", 2, 10, warmup_steps=2) == 1.0 and lr_factor("linear", 10, 10, 2) == 0.0
    assert lr_factor("cosine", 6, 10, warmup_steps=2, min_ratio=0.1) == pytest.approx(0.1 + 0.9 * 0.5)


def test_ppo_epochs_and_schedule_in_the_trainer(model_cache):
    t = PolicyTrainer("tiny:qwen3", TrainConfig(ppo_epochs=3, lr=1e-3, lr_schedule="linear", warmup_steps=1),
                      AlgorithmConfig(), tiny_cache_dir=model_cache, schedule_steps=12)
    samples = _samples()
    t.prepare(samples)
    m = t.train_step(make_minibatches(samples, 2))
    assert t.opt_steps == 6  # 3 epochs x 2 mini-batches
    assert m["lr"] == pytest.approx(sum(1e-3 * lr_factor("linear", s, 12, 1) for s in range(6)) / 6)


def test_out_of_memory_names_rank_tokens_and_knobs(model_cache):
    t = _trainer(model_cache, max_tokens_per_micro_batch=512)

    def loss_fn(chunk):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    with pytest.raises(TrainerOutOfMemory, match=r"trainer rank 0 .* samples, \d+ tokens .* train.max_tokens_per"):
        t.backward_micro_batches([(_samples(3), 1.0)], loss_fn)


def test_sharded_checkpoint_round_trip_and_safe_metadata(model_cache, tmp_path):
    t = _trainer(model_cache)
    t.sft_step(_samples(4), lr=1e-2)
    t.save_checkpoint(str(tmp_path / "ck"))
    fresh = PolicyTrainer("tiny:qwen3", TrainConfig(), AlgorithmConfig(), tiny_cache_dir=model_cache, seed=7)
    fresh.load_checkpoint(str(tmp_path / "ck"))
    a, b = t.module.state_dict(), fresh.module.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a) and fresh.version == t.version == 1
    sa, sb = t.optimizer.state_dict()["state"], fresh.optimizer.state_dict()["state"]
    assert all(torch.equal(sa[k]["exp_avg_sq"], sb[k]["exp_avg_sq"]) for k in sa)

    class Evil:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    (tmp_path / "ck" / ".metadata").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(Exception, match="refusing to load it"):
        fresh.load_checkpoint(str(tmp_path / "ck"))
    assert not (tmp_path / "pwned").exists()


@pytest.mark.gpu
def test_cuda_varlen_kernel_matches_padded_in_bf16(model_cache):
    """On CUDA, packed rows run one flash varlen call per layer; bf16 log-probs match padded ones."""
    from miles_ray.training.fsdp.varlen import _flash_kernel

    assert _flash_kernel() is not None
    samples = _samples(long=True)
    kw = dict(precision="bf16_mixed", max_tokens_per_micro_batch=96)
    padded = PolicyTrainer("tiny:qwen3", TrainConfig(packing=False, **kw), AlgorithmConfig(),
                           tiny_cache_dir=model_cache).compute_logprobs(samples)
    packed = PolicyTrainer("tiny:qwen3", TrainConfig(packing=True, **kw), AlgorithmConfig(),
                           tiny_cache_dir=model_cache).compute_logprobs(samples)
    diff = max(abs(a - b) for u, v in zip(padded, packed) for a, b in zip(u, v))
    assert diff < 0.05, diff


def test_torch_threads_per_actor():
    from miles_ray.utils.threads import torch_threads

    sync = load_config_for_threads([])
    assert torch_threads(sync, "trainer", 16)[0] == 8 and torch_threads(sync, "rollout", 16)[0] == 4  # 2 ranks, 4 engines
    asyn = load_config_for_threads(["async_rl.enabled=true"])
    assert torch_threads(asyn, "trainer", 16)[0] == 2  # 6 actors compute at once
    fixed = load_config_for_threads(["cluster.torch_threads=3"])
    assert torch_threads(fixed, "rollout", 16) == (3, "cluster.torch_threads")


def load_config_for_threads(extra):
    from miles_ray.config import load_config

    return load_config(None, ["cluster.num_trainers=2", "rollout.num_engines=4", *extra])
