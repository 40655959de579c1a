"""Megatron backend at scale, on CPU over real gloo groups (spawned ranks): packed THD rows vs
padded rows (TP=2 with SP, PP=2), chunked vocab-parallel log-probs vs the unchunked ones (values
and gradients), activation recompute (same gradients at TP=2), bf16_mixed with the distributed
optimizer (fp32 main shards per DP rank, checkpoint at DP=2 loaded at DP=1)."""

import pytest
import torch
import torch.multiprocessing as mp

from miles_ray.config import AlgorithmConfig, TrainConfig
from helpers.ranks import free_port, random_samples


def _samples(n=6, seed=0):
    return random_samples(n, seed, old_logprobs=True)


TRAIN = dict(packing=False, micro_batch_size=2, grad_clip=1.0)
ALGO = dict(kl_coef=0.05, eps_low=0.1, eps_high=0.1, entropy_coef=0.01)


def _trainer(cache, par, **train):
    from miles_ray.training.megatron.trainer import MegatronPolicyTrainer

    return MegatronPolicyTrainer("tiny:qwen3", TrainConfig(**{**TRAIN, **train}), AlgorithmConfig(**ALGO),
                                 tiny_cache_dir=cache, parallel_cfg=par)


def _packed_vs_padded(trainer, rank, world) -> float:
    mine = _samples()[rank::world]
    padded = trainer.compute_logprobs(mine)
    trainer.cfg = trainer.cfg.model_copy(update={"packing": True, "max_tokens_per_micro_batch": 24})
    packed = trainer.compute_logprobs(mine)
    trainer.cfg = trainer.cfg.model_copy(update={"packing": False, "max_tokens_per_micro_batch": 0})
    return max(abs(x - y) for u, v in zip(packed, padded) for x, y in zip(u, v))


def _chunked_vs_unchunked(trainer) -> dict:
    """Values and gradients (w.r.t. the hidden states and the output weight) of the chunked head vs
    full logits + :func:`forward.vocab_parallel_logprobs`."""
    from miles_ray.training.batching import pack
    from miles_ray.training.megatron.forward import stage_forward, vocab_parallel_logprobs
    from miles_ray.training.megatron.logprobs import _full_sequence, head_logprobs, output_weight

    model = trainer.model
    batch = pack(_samples(), trainer.pad_id, length_multiple=2)
    hidden = stage_forward(model, batch, hidden=True).detach().requires_grad_(True)
    weight = output_weight(model)
    coef = torch.linspace(-1, 1, batch.mask.numel()).view(batch.mask.shape)
    out = {}
    for name, chunk in (("chunked", 3), ("one", 10 ** 6)):
        trainer.optimizer.zero_grad()  # the weight's gradient accumulates in its fp32 main_grad
        hidden.grad = None
        logp, ent = head_logprobs(model, hidden, batch, 0.7, chunk, "loss", trainer.sequence_parallel)
        ((logp * coef).sum() + ent.sum()).backward()
        out[name] = (logp.detach(), ent.detach(), hidden.grad.clone(), weight.main_grad.clone())
    trainer.optimizer.zero_grad()
    hidden.grad = None
    full = _full_sequence(hidden, trainer.sequence_parallel)
    logits = torch.nn.functional.linear(full, weight).transpose(0, 1).contiguous()  # [b, s, V/tp]: the whole thing
    logp, ent = vocab_parallel_logprobs(logits, batch.targets, 0.7, entropy=True)
    ((logp * batch.mask * coef).sum() + (ent * batch.mask).sum()).backward()
    ref = ((logp * batch.mask).detach(), (ent * batch.mask).detach(), hidden.grad.clone(), weight.main_grad.clone())
    return {name: max(float((a - b).abs().max()) for a, b in zip(got, ref)) for name, got in out.items()}


def _step(trainer, rank, world):
    from miles_ray.training.batching import shard_minibatches

    mine = shard_minibatches([_samples()], world)[rank]
    trainer.prepare(mine[0], old=False)
    return trainer.train_step(mine), trainer.full_state_dict()


def _worker_tp2(rank, world, port, cache, out):
    from miles_ray.training.collectives import init_distributed

    torch.set_num_threads(1)
    init_distributed(rank, world, "127.0.0.1", port)
    par = {"tensor_parallel": 2, "sequence_parallel": True}
    trainer = _trainer(cache, par)
    found = {"packed": _packed_vs_padded(trainer, rank, world), "chunked": _chunked_vs_unchunked(trainer)}
    found["plain_metrics"], found["plain"] = _step(trainer, rank, world)
    for granularity in ("full", "selective"):
        recompute = _trainer(cache, {**par, "recompute": granularity}, gradient_checkpointing=True)
        found[f"{granularity}_cfg"] = recompute.mconfig.recompute_granularity
        found[f"{granularity}_metrics"], found[granularity] = _step(recompute, rank, world)
    if rank == 0:
        torch.save(found, out)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def _worker_pp2(rank, world, port, cache, out):
    from miles_ray.training.collectives import init_distributed

    torch.set_num_threads(1)
    init_distributed(rank, world, "127.0.0.1", port)
    found = {"packed": _packed_vs_padded(_trainer(cache, {"pipeline_parallel": 2}), rank, world)}
    if rank == 0:
        torch.save(found, out)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def _run(worker, tmp_path, cache, *extra):
    from miles_ray.models import resolve_model_path

    resolve_model_path("tiny:qwen3", cache)  # written once here, not raced by the spawned ranks
    out = str(tmp_path / "found.pt")
    mp.spawn(worker, args=(2, free_port(), cache, out, *extra), nprocs=2, join=True)
    return torch.load(out, weights_only=True)  # plain tensors / numbers written by our own worker


def _max_rel(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max() / b[k].float().abs().max()) for k in b)


def test_tp2_packed_chunked_and_recompute(tmp_path, model_cache):
    found = _run(_worker_tp2, tmp_path, model_cache)
    assert found["packed"] <= 1e-5  # THD rows (with a padding segment under SP) = padded rows
    assert found["chunked"]["chunked"] <= 1e-5 and found["chunked"]["one"] <= 1e-5
    for granularity in ("full", "selective"):
        assert found[f"{granularity}_cfg"] == granularity
        assert found[f"{granularity}_metrics"]["grad_norm"] == pytest.approx(found["plain_metrics"]["grad_norm"],
                                                                             rel=1e-6)
        assert _max_rel(found[granularity], found["plain"]) <= 1e-6


def test_pp2_packed_equals_padded(tmp_path, model_cache):
    assert _run(_worker_pp2, tmp_path, model_cache)["packed"] <= 1e-5


def _optimizer_hf(trainer) -> dict:
    """The distributed optimizer's fp32 main weights and moments per HF name (TP shards gathered
    and converted like the weights: comparable across layouts)."""
    from miles_ray.training.megatron import convert
    from miles_ray.training.megatron.parallel import gather_tp_shards
    from miles_ray.training.megatron.weights import layer_offset

    sd, out = trainer.optimizer.state_dict(), {}
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    for i, p in enumerate(trainer.optimizer.model_params):
        key = names[id(p)]
        for field in ("main_param", "exp_avg", "exp_avg_sq"):
            shards = gather_tp_shards(sd["state"][i][field], convert.tp_dim(key) is not None)
            for hf, t in convert.to_hf(key, shards, trainer.hf_config, layer_offset(trainer.model)).items():
                out[f"{hf}:{field}"] = t
    return out


def _worker_bf16(rank, world, port, cache, out, folder):
    """bf16_mixed at TP=1 x DP=2: bf16 parameters, fp32 main shards of half the model per rank; a
    checkpoint saved there loads at TP=2 x DP=1 (the fp32 main weights and moments resharded)."""
    from miles_ray.training.collectives import init_distributed
    from miles_ray.training.megatron import parallel

    torch.set_num_threads(1)
    init_distributed(rank, world, "127.0.0.1", port)
    trainer = _trainer(cache, {"precision": "bf16_mixed"})
    numel = sum(p.numel() for p in trainer.model.parameters())
    found = {"dtypes": sorted({str(p.dtype) for p in trainer.model.parameters()}),
             "main_dtypes": sorted({str(g["params"][0].dtype) for g in trainer.optimizer.param_groups}),
             "shard_fraction": sum(p.numel() for g in trainer.optimizer.param_groups for p in g["params"]) / numel}
    found["metrics"], found["stepped"] = _step(trainer, rank, world)
    trainer.save_checkpoint(folder)
    found["optimizer"] = _optimizer_hf(trainer)
    found["second_metrics"], found["second"] = _step(trainer, rank, world)
    parallel.destroy()
    resharded = _trainer(cache, {"precision": "bf16_mixed", "tensor_parallel": 2})
    resharded.load_checkpoint(folder)
    found["loaded"] = resharded.full_state_dict()
    found["loaded_optimizer"] = _optimizer_hf(resharded)
    found["resharded_metrics"], found["resharded_second"] = _step(resharded, rank, world)
    if rank == 0:
        torch.save(found, out)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def test_bf16_mixed_distributed_optimizer_and_resharded_checkpoint(tmp_path, model_cache):
    found = _run(_worker_bf16, tmp_path, model_cache, str(tmp_path / "ckpt"))
    assert found["dtypes"] == ["torch.bfloat16"] and found["main_dtypes"] == ["torch.float32"]
    assert 0.5 <= found["shard_fraction"] <= 0.51  # each DP rank holds half of the fp32 main weights
    assert all(torch.equal(found["loaded"][k], v) for k, v in found["stepped"].items())  # DP=2 -> DP=1
    # fp32 main weights and AdamW moments, saved as DP=2 shards, come back whole at TP=2 x DP=1
    assert found["optimizer"].keys() == found["loaded_optimizer"].keys()
    assert all(torch.equal(found["loaded_optimizer"][k], v) for k, v in found["optimizer"].items())
    assert any(k.endswith("exp_avg_sq") and v.abs().max() > 0 for k, v in found["optimizer"].items())
    # the next step from the resharded checkpoint is the same step (bf16 compute at TP=1 vs TP=2 aside)
    assert found["resharded_metrics"]["grad_norm"] == pytest.approx(found["second_metrics"]["grad_norm"], rel=1e-2)
    assert _max_rel(found["resharded_second"], found["second"]) <= 1e-2
