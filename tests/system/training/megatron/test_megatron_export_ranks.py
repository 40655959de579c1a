"""Megatron backend: bucketed weight export with tensor collectives only, and sharded loading
(each rank reads its own TP / PP / EP slices of the safetensors files), on CPU over real gloo
groups (spawned ranks, as test_megatron.py): TP=2, PP=2 (tiny Qwen3), EP=2 (tiny Qwen3-MoE, its
experts stored per expert in the files)."""

import torch
import torch.multiprocessing as mp
from helpers.ranks import free_port

OBJECT_COLLECTIVES = ("all_gather_object", "broadcast_object_list", "send_object_list", "recv_object_list",
                      "gather_object", "scatter_object_list")


class _Refused(RuntimeError):
    pass


def _refuse_object_collectives():
    """Replace torch.distributed's pickling collectives by ones that raise; returns the originals."""
    import torch.distributed as dist

    def refuse(*args, **kwargs):
        raise _Refused("a pickled object collective was used")

    saved = {name: getattr(dist, name) for name in OBJECT_COLLECTIVES}
    for name in OBJECT_COLLECTIVES:
        setattr(dist, name, refuse)
    return saved


def _legacy_mismatches(trainer, spec, cache) -> list:
    """Parameters that differ from today's loading (the full HF state dict through convert)."""
    from miles_ray.models import load_model
    from miles_ray.training.megatron import convert, weights
    from miles_ray.training.megatron.parallel import layout

    full, where = load_model(spec, "float32", cache).state_dict(), layout()
    params = dict(trainer.model.named_parameters())
    want = convert.to_megatron(full, list(params), trainer.hf_config, where["tp_rank"], where["tp"],
                               weights.layer_offset(trainer.model), weights.experts_of(trainer.hf_config))
    return [k for k, p in params.items() if not torch.equal(p.detach(), want[k])]


def _collective_checks(rank) -> dict:
    """reduce_disjoint_ is byte-exact (-0.0, NaN); all_gather_json returns every rank's object."""
    from miles_ray.training import collectives

    t = torch.zeros(6, dtype=torch.bfloat16)
    mine = torch.tensor([-0.0, float("nan"), 1.5], dtype=torch.bfloat16)
    t[3 * rank:3 * rank + 3] = mine
    collectives.reduce_disjoint_(t, 0)
    return {"reduced": t.view(torch.int16).clone(), "json": collectives.all_gather_json({"r": rank, "k": ["a"] * rank})}


def _worker(rank, world, port, cache, spec, par, out):
    from miles_ray.config import AlgorithmConfig, TrainConfig
    from miles_ray.models import load_model
    from miles_ray.training import collectives
    from miles_ray.training.collectives import init_distributed
    from miles_ray.training.megatron.trainer import MegatronPolicyTrainer
    from miles_ray.weights.buckets import iter_tensors

    torch.set_num_threads(1)
    init_distributed(rank, world, "127.0.0.1", port)
    trainer = MegatronPolicyTrainer(spec, TrainConfig(packing=False), AlgorithmConfig(kl_coef=0.0), tiny_cache_dir=cache,
                                    parallel_cfg=par)
    found = {"read": trainer.hf_files.read_bytes, "legacy_mismatch": _legacy_mismatches(trainer, spec, cache),
             "collectives": _collective_checks(rank)}
    saved = _refuse_object_collectives()
    try:
        collectives.all_gather_object(rank)
        found["guard"] = False
    except _Refused:
        found["guard"] = True
    buckets = list(trainer.iter_export(trainer.engine_state(), 1, 16 << 10))  # many small buckets
    found["buckets"] = [(b.index, b.count, b.flat.numel(), dict(iter_tensors(b))) for b in buckets]
    found["full"] = trainer.full_state_dict()
    for name, fn in saved.items():
        setattr(torch.distributed, name, fn)
    parts = [None] * world
    torch.distributed.all_gather_object(parts, {k: found[k] for k in ("read", "legacy_mismatch")})
    if rank == 0:
        hf = load_model(spec, "float32", cache)
        found["ranks"], found["file_bytes"] = parts, sum(t.numel() * t.element_size() for t in hf.state_dict().values())
        found["hf"] = {k: v for k, v in hf.state_dict().items() if not (k == "lm_head.weight" and hf.config.tie_word_embeddings)}
        torch.save(found, out)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def _run(tmp_path, cache, spec, par, world):
    from miles_ray.models.loading import resolve_model_path

    resolve_model_path(spec, cache)  # written once here, not raced by the spawned ranks
    out = str(tmp_path / "found.pt")
    mp.spawn(_worker, args=(world, free_port(), cache, spec, par, out), nprocs=world, join=True)
    return torch.load(out, weights_only=True)  # plain tensors, numbers, strings written by our own worker


def _check(found, world, max_read):
    assert found["guard"]  # object collectives were refused during the export below
    buckets, hf = found["buckets"], found["hf"]
    assert len(buckets) > 3 and [b[0] for b in buckets] == list(range(buckets[0][1]))
    assert all(n <= (16 << 10) // 4 or len(t) == 1 for _, _, n, t in buckets)  # fp32: a bucket's bound, or one tensor
    exported = {k: v for *_, tensors in buckets for k, v in tensors.items()}
    assert exported.keys() == hf.keys()
    assert [k for k, v in hf.items() if not torch.equal(exported[k], v)] == []  # bit-identical
    assert [k for k, v in hf.items() if not torch.equal(found["full"][k], v)] == []
    # sharded loading: parameters equal today's full-state loading; each rank read only its slices
    assert all(part["legacy_mismatch"] == [] for part in found["ranks"])
    assert all(0 < part["read"] <= max_read * found["file_bytes"] for part in found["ranks"]), found["ranks"]
    checks = found["collectives"]
    want = torch.tensor([-0.0, float("nan"), 1.5] * 2, dtype=torch.bfloat16).view(torch.int16)
    assert torch.equal(checks["reduced"], want)
    assert checks["json"] == [{"r": r, "k": ["a"] * r} for r in range(world)]


def test_tp2_export_and_sharded_load(tmp_path, model_cache):
    _check(_run(tmp_path, model_cache, "tiny:qwen3", {"tensor_parallel": 2}, 2), 2, max_read=0.55)


def test_pp2_export_and_sharded_load(tmp_path, model_cache):
    _check(_run(tmp_path, model_cache, "tiny:qwen3", {"pipeline_parallel": 2}, 2), 2, max_read=0.65)


def test_ep2_export_and_sharded_load(tmp_path, model_cache):
    """Experts: 4 of 8 per rank, read from the files' per-expert tensors."""
    _check(_run(tmp_path, model_cache, "tiny:qwen3_moe", {"expert_parallel": 2}, 2), 2, max_read=0.65)
