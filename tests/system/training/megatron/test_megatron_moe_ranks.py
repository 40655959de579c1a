"""Megatron backend with Qwen3-MoE on CPU over real gloo groups (spawned ranks, as test_megatron.py):
expert parallelism (megatron's MoE layer, alltoall token dispatcher over gloo), TP x EP, MoE at
PP=2, each against the HF model (log-probs) and the FSDP backend (one GRPO step); the HF <->
Megatron conversion round trip per EP rank (bit-identical), layout errors. R3 (routing replay on
megatron's router) against the FSDP backend's R3 on the same traces."""
import copy

import pytest
import torch
import torch.multiprocessing as mp

from miles_ray.config import AlgorithmConfig, TrainConfig
from helpers.ranks import free_port, random_samples

MODEL = "tiny:qwen3_moe"
TRAIN = dict(packing=False, micro_batch_size=2, grad_clip=1.0)
ALGO = dict(kl_coef=0.05, eps_low=0.1, eps_high=0.1, entropy_coef=0.01)


def _traces(batch, layers=2, experts=8, k=2, seed=1):
    """Recorded experts (as an engine records them) for every token but the last of each sample:
    random distinct top-k sets, so that they mostly differ from the trainer router's own choice."""
    from miles_ray.models.moe import encode

    gen = torch.Generator().manual_seed(seed)
    for s in batch:
        n = len(s.prompt_ids) + len(s.response_ids) - 1
        s.routed_experts = encode(torch.rand(n, layers, experts, generator=gen).topk(k, dim=-1).indices)
    return batch


def _reference(model_cache, algo: dict, batch: list) -> dict:
    """The FSDP backend at one rank: log-probs (= HF's), and its parameters after one GRPO step."""
    from miles_ray.training.fsdp import PolicyTrainer

    torch.set_num_threads(1)
    trainer = PolicyTrainer(MODEL, TrainConfig(**TRAIN), AlgorithmConfig(**algo), tiny_cache_dir=model_cache)
    logprobs = trainer.compute_logprobs(batch)
    for s, lp in zip(batch, logprobs):  # old log-probs off the policy: ratios != 1, some clipped
        s.old_logprobs = [x + 0.15 * ((k % 3) - 1) for k, x in enumerate(lp)]
    initial = {k: v.clone() for k, v in trainer.export_state().items()}
    stepped = copy.deepcopy(batch)
    trainer.prepare(stepped, old=False)
    metrics = trainer.train_step([stepped])
    return {"logprobs": logprobs, "batch": batch, "initial": initial, "stepped": trainer.export_state(),
            "metrics": metrics, "algo": algo}


@pytest.fixture(scope="module")
def reference(model_cache):
    return _reference(model_cache, ALGO, random_samples())


@pytest.fixture(scope="module")
def r3_reference(model_cache):
    """The same with R3 (``algorithm.routing_replay=r3``) on recorded experts."""
    return _reference(model_cache, {**ALGO, "routing_replay": "r3"}, _traces(random_samples()))


def _worker(rank, world, port, cache, par, ref, out):
    from miles_ray.training.batching import shard_minibatches
    from miles_ray.training.collectives import init_distributed
    from miles_ray.training.megatron.trainer import MegatronPolicyTrainer
    from miles_ray.weights.buckets import iter_tensors

    torch.set_num_threads(1)
    init_distributed(rank, world, "127.0.0.1", port)
    trainer = MegatronPolicyTrainer(MODEL, TrainConfig(**TRAIN), AlgorithmConfig(**ref["algo"]), tiny_cache_dir=cache,
                                    parallel_cfg=par)
    layer = trainer.model.decoder.layers[0].mlp
    found = {"roundtrip": trainer.full_state_dict(), "local_experts": len(layer.experts.local_experts),
             "dispatcher": type(layer.token_dispatcher).__name__}
    buckets = list(trainer.iter_export(trainer.engine_state(), 1, 64 << 10))
    found["exported"] = {k: v for b in buckets for k, v in iter_tensors(b)}
    parts = [None] * world
    torch.distributed.all_gather_object(parts, trainer.compute_logprobs(copy.deepcopy(ref["batch"])[rank::world]))
    found["logprobs"] = parts
    mine = shard_minibatches([copy.deepcopy(ref["batch"])], world)[rank]
    trainer.prepare(mine[0], old=False)
    found["metrics"] = trainer.train_step(mine)
    found["stepped"] = trainer.full_state_dict()
    if rank == 0:
        torch.save(found, out)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def _run(tmp_path, model_cache, reference, par, world):
    out = str(tmp_path / "found.pt")
    mp.spawn(_worker, args=(world, free_port(), model_cache, par, reference, out), nprocs=world, join=True)
    return torch.load(out, weights_only=True)  # plain tensors, numbers, strings written by our own worker


def _check(found, reference, world):
    for name in ("roundtrip", "exported"):  # HF -> Megatron (per TP / EP rank) -> HF, and the bucketed export
        assert found[name].keys() == reference["initial"].keys(), name
        assert all(torch.equal(found[name][k], v) for k, v in reference["initial"].items()), name
    got = [None] * len(reference["logprobs"])
    for rank, part in enumerate(found["logprobs"]):
        for i, lp in zip(range(rank, len(got), world), part):
            got[i] = lp
    assert max(abs(x - y) for u, v in zip(got, reference["logprobs"]) for x, y in zip(u, v)) <= 1e-5
    for k in ("loss", "pg_loss", "entropy", "grad_norm"):
        assert found["metrics"][k] == pytest.approx(reference["metrics"][k], rel=1e-4, abs=1e-6), k
    stepped, want = found["stepped"], reference["stepped"]
    assert max(float((stepped[k] - v).abs().max() / v.abs().max()) for k, v in want.items()) <= 1e-4


def test_ep2_logprobs_round_trip_and_step(tmp_path, model_cache, reference):
    """EP=2 over 2 ranks (TP=1, DP=2): 4 of the 8 experts per rank, tokens by all-to-all."""
    found = _run(tmp_path, model_cache, reference, {"expert_parallel": 2}, world=2)
    assert found["local_experts"] == 4 and found["dispatcher"] == "MoEAlltoAllTokenDispatcher"
    _check(found, reference, 2)


def test_tp2_ep2_logprobs_round_trip_and_step(tmp_path, model_cache, reference):
    """TP=2 x EP=2 over 4 ranks (experts split over EP and, expert-TP = TP, over TP)."""
    found = _run(tmp_path, model_cache, reference, {"tensor_parallel": 2, "expert_parallel": 2}, world=4)
    assert found["local_experts"] == 4
    _check(found, reference, 4)


def test_pp2_moe_logprobs_round_trip_and_step(tmp_path, model_cache, reference):
    """PP=2 with MoE (the alltoall dispatcher takes variable sequence lengths: shapes travel by p2p)."""
    _check(_run(tmp_path, model_cache, reference, {"pipeline_parallel": 2}, world=2), reference, 2)


def test_r3_replays_recorded_experts_like_fsdp(tmp_path, model_cache, r3_reference, reference):
    """R3 on megatron's router at TP=2 (sequence-parallel token shards) x EP=2 with expert-TP 1,
    against the FSDP backend's R3 on the same traces: log-probs (``r3_logprob_max_abs``), the
    agreement metrics and one GRPO step."""
    par = {"tensor_parallel": 2, "expert_parallel": 2, "expert_tensor_parallel": 1}
    found = _run(tmp_path, model_cache, r3_reference, par, world=2)
    _check(found, r3_reference, 2)
    assert found["metrics"]["routing_agreement"] == 1.0
    assert found["metrics"]["routing_agreement_own"] == pytest.approx(
        r3_reference["metrics"]["routing_agreement_own"], abs=1e-9)
    assert r3_reference["metrics"]["routing_agreement_own"] < 0.5  # the replay changed the experts used
    unreplayed = max(abs(x - y) for u, v in zip(r3_reference["logprobs"], reference["logprobs"]) for x, y in zip(u, v))
    assert unreplayed > 1e-2  # so the log-probs above are those of the recorded experts
