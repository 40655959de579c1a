"""Megatron backend with Qwen3-MoE on CPU over real gloo groups (spawned ranks, as test_megatron.py):
expert parallelism (megatron's MoE layer, alltoall token dispatcher over gloo), TP x EP, MoE at
PP=2, each against the HF model (log-probs) and the FSDP backend (one GRPO step); the HF <->
Megatron conversion round trip per EP rank (bit-identical), layout errors. R3 (routing replay on
megatron's router) against the FSDP backend's R3 on the same traces."""
import copy
import random
import socket

import pytest
import torch
import torch.multiprocessing as mp

from miles_ray.config import AlgorithmConfig, TrainConfig
from miles_ray.errors import UserValueError
from miles_ray.models.tiny import tiny_model_config
from miles_ray.sample import Sample
from miles_ray.training.megatron import convert
from miles_ray.training.megatron.validate import validate_layout

MODEL = "tiny:qwen3_moe"
TRAIN = dict(packing=False, micro_batch_size=2, grad_clip=1.0)
ALGO = dict(kl_coef=0.05, eps_low=0.1, eps_high=0.1, entropy_coef=0.01)


def _samples(n=6, seed=0):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        p, r = rng.randint(2, 7), rng.randint(1, 8)
        resp = [rng.randint(3, 300) for _ in range(r)]
        out.append(Sample(i, i // 2, "p", "1", [rng.randint(3, 300) for _ in range(p)], response_ids=resp,
                          response_logprobs=[-1.0] * r, advantages=[rng.uniform(-2, 2)] * r))
    return out


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    return _reference(model_cache, ALGO, _samples())


@pytest.fixture(scope="module")
def r3_reference(model_cache):
    """The same with R3 (``algorithm.routing_replay=r3``) on recorded experts."""
    return _reference(model_cache, {**ALGO, "routing_replay": "r3"}, _traces(_samples()))


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
    mp.spawn(_worker, args=(world, _port(), model_cache, par, reference, out), nprocs=world, join=True)
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


@pytest.mark.parametrize("tp,ep,etp", [(1, 2, None), (2, 2, None), (2, 2, 1), (1, 4, None)])
def test_conversion_round_trip_per_ep_rank(tp, ep, etp):
    """HF -> Megatron (every TP x EP rank, expert-TP ``etp``) -> HF is bit-identical."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_model_config("qwen3_moe", 512, 1, 2, hidden=64, layers=2)
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(cfg).state_dict()
    hf.pop("lm_head.weight", None)  # tied: HF ties it, the export leaves it out
    local, size = cfg.num_experts // ep, etp or tp
    names = convert.stage_names(cfg, 2, True, True, ep)
    assert sum(convert.is_expert(n) for n in names) == 2 * 2 * local

    def parts():
        for e in range(ep):
            for key in names:
                if not convert.exported(key, cfg):
                    continue
                if convert.is_expert(key):  # this EP rank's block, from its expert-TP shards
                    shards = [convert.to_megatron(hf, [key], cfg, 0, tp, 0, convert.Experts(e * local, r, size))[key]
                              for r in range(size)]
                    yield from convert.to_hf(key, shards, cfg, 0, e * local).items()
                elif e == 0:  # dense: the same on every EP rank
                    ranks = range(tp) if convert.tp_dim(key) is not None else [0]
                    yield from convert.to_hf(key, [convert.to_megatron(hf, [key], cfg, r, tp, 0)[key] for r in ranks],
                                             cfg, 0).items()

    back = dict(convert.fuse_experts(parts(), cfg))
    assert back.keys() == hf.keys()
    assert all(torch.equal(back[k], v) for k, v in hf.items())


@pytest.mark.parametrize("tp,pp,world,ep,etp,needle", [
    (1, 1, 2, 3, None, "megatron.expert_parallel=3 does not divide the model's 8 experts; use one of [1, 2, 4, 8]"),
    (1, 1, 2, 4, None, "cluster.num_trainers=2 is not a multiple of megatron.expert_tensor_parallel x "
                       "megatron.expert_parallel x megatron.pipeline_parallel = 1 x 4 x 1 = 4"),
    (1, 1, 2, 1, 3, "megatron.expert_tensor_parallel=3 does not divide the model's 128 expert FFN columns"),
])
def test_bad_expert_layout_fails_with_numbers_and_fix(tp, pp, world, ep, etp, needle):
    cfg = tiny_model_config("qwen3_moe", 512, 1, 2)
    with pytest.raises(UserValueError) as err:
        validate_layout(cfg, tp, pp, world, ep, etp)
    assert needle in str(err.value)


def test_expert_parallel_on_a_dense_model_fails():
    with pytest.raises(UserValueError, match="megatron.expert_parallel=2 / expert_tensor_parallel=None with a dense"):
        validate_layout(tiny_model_config("qwen3", 512, 1, 2), 1, 1, 2, 2, None)
