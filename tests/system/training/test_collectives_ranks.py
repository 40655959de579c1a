"""Collectives follow the backend's rules, checked on CPU in the test mode of
:mod:`miles_ray.training.collectives` (``emulate=True``): the group is created with the device
coverage the GPU backend has, every backend gloo. A group made the old way (bare ``nccl``, i.e.
``cuda:gloo`` here) refuses the CPU tensors the trainers reduce, with torch's own error, as NCCL
does on GPUs; the trainer group (``cpu:gloo,cuda:nccl`` -> ``cpu:gloo,cuda:gloo``) takes them:
every collective of the module, a subgroup (megatron's groups inherit the backend), FSDP2 policy
(with its reference) and critic steps, SFT, and a megatron TP=2 step (its grad norm is reduced
over the model-parallel group), all at 2 ranks."""
import copy
import os
import random

import pytest
import torch
import torch.multiprocessing as mp

from miles_ray.config import AlgorithmConfig, TrainConfig
from miles_ray.sample import Sample
from miles_ray.training import collectives as co
from helpers.ranks import free_port

REFUSAL = "No backend type associated with device type cpu"  # torch's words


def _samples(n=6, seed=0):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        p, r = rng.randint(2, 6), rng.randint(1, 6)
        out.append(Sample(i, i // 2, "p", "1", [rng.randint(3, 300) for _ in range(p)],
                          response_ids=[rng.randint(3, 300) for _ in range(r)], response_logprobs=[-1.0] * r,
                          advantages=[rng.uniform(-2, 2)] * r, returns=[rng.uniform(-1, 1)] * r))
    return out


def _old_group(rank, world, port) -> dict:
    """The group the old code made on GPUs (bare nccl), emulated: CPU reductions are refused."""
    co.init_distributed(rank, world, "127.0.0.1", port, backend=co.emulated("nccl"))
    found = {"old_covers": (co.covers("cpu"), co.covers("cuda"))}
    for name, call in (("all_sum", lambda: co.all_sum([1.0])), ("all_max", lambda: co.all_max(1))):
        try:
            call()
            found[name] = "accepted"
        except RuntimeError as err:
            found[name] = str(err)
    torch.distributed.destroy_process_group()
    return found


def _primitives(rank, world) -> dict:
    sub = torch.distributed.new_group([0, 1])  # as megatron's groups are made: the default backend
    found = {"spec": torch.distributed.get_backend_config(), "covers": (co.covers("cpu"), co.covers("cuda")),
             "sum": co.all_sum([rank + 1.0, 2.0]), "max": co.all_max(rank), "fmax": co.all_max(rank * 0.5),
             "sub_sum": co.all_sum([1.0], group=sub), "sub_covers": co.covers("cpu", sub),
             "reduce": co.all_reduce_(torch.tensor([rank + 1.0], dtype=torch.float64), "max", sub).tolist(),
             "gather": [t.tolist() for t in co.all_gather(torch.tensor([rank, rank]))],
             "objects": co.all_gather_object({"rank": rank}), "bcast": co.broadcast_object(f"from {rank}", 1)}
    if rank == 1:
        co.send_object({"hello": 1}, 0)
    else:
        found["recv"] = co.recv_object(1)
    co.barrier()
    return found


def _trainer_steps(cache) -> dict:
    from miles_ray.training.fsdp import PolicyTrainer
    from miles_ray.training.fsdp.critic import CriticTrainer

    rank = co.world()[0]
    mine = _samples()[rank::2]
    train = TrainConfig(strategy="fsdp2", micro_batch_size=2)
    policy = PolicyTrainer("tiny:qwen3", train, AlgorithmConfig(kl_coef=0.1, entropy_coef=0.01), tiny_cache_dir=cache)
    policy.prepare(mine)
    step = policy.train_step([mine])
    sft = policy.sft_step(copy.deepcopy(mine), 1e-3)
    critic = CriticTrainer("tiny:qwen3", train, tiny_cache_dir=cache)
    critic.compute_values(mine)
    value = critic.train_step([mine])
    return {"loss": step["loss"], "sft_loss": sft["sft_loss"], "value_loss": value["value_loss"]}


def _megatron_step(cache) -> dict:
    from miles_ray.training.megatron import parallel
    from miles_ray.training.megatron.trainer import MegatronPolicyTrainer

    trainer = MegatronPolicyTrainer("tiny:qwen3", TrainConfig(packing=False, micro_batch_size=2, grad_clip=1.0),
                                    AlgorithmConfig(), tiny_cache_dir=cache,
                                    parallel_cfg={"tensor_parallel": 2, "pipeline_parallel": 1})
    batch = _samples(4)[co.world()[0]::2]  # the TP group gathers both halves
    trainer.prepare(batch, old=False)
    metrics = trainer.train_step([batch])
    parallel.destroy()
    return {"megatron_grad_norm": metrics["grad_norm"]}


def _worker(rank, world, ports, cache, out):
    torch.set_num_threads(1)
    found = _old_group(rank, world, ports[0])
    co.init_distributed(rank, world, "127.0.0.1", ports[1], backend="nccl", emulate=True)
    found.update(_primitives(rank, world))
    found.update(_trainer_steps(cache))
    found.update(_megatron_step(cache))
    torch.save(found, os.path.join(out, f"rank{rank}.pt"))
    co.barrier()
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def emulated_run(model_cache, tiny_dir, tmp_path_factory):  # tiny_dir: written once, before the ranks start
    out = tmp_path_factory.mktemp("emulated")
    mp.spawn(_worker, args=(2, (free_port(), free_port()), model_cache, str(out)), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]


def test_old_nccl_group_refuses_cpu_reductions(emulated_run):
    """The bug class, caught on CPU: torch refuses the CPU tensors of all_sum / all_max."""
    for found in emulated_run:
        assert found["old_covers"] == (False, True)
        assert REFUSAL in found["all_sum"] and REFUSAL in found["all_max"]


def test_trainer_group_covers_cpu_and_device(emulated_run):
    for rank, found in enumerate(emulated_run):
        assert found["spec"] == "cpu:gloo,cuda:gloo" and found["covers"] == (True, True)
        assert found["sum"] == [3.0, 4.0] and found["max"] == 1 and isinstance(found["max"], int)
        assert found["fmax"] == 0.5 and found["sub_sum"] == [2.0] and found["sub_covers"]
        assert found["reduce"] == [2.0] and found["gather"] == [[0, 0], [1, 1]]
        assert found["objects"] == [{"rank": 0}, {"rank": 1}] and found["bcast"] == "from 1"
    assert emulated_run[0]["recv"] == {"hello": 1}


def test_trainer_steps_run_in_the_gpu_shaped_group(emulated_run):
    """FSDP2 policy (with reference), SFT, critic and megatron TP=2 steps: every reduction they
    issue is accepted, and the ranks agree on the reduced numbers."""
    a, b = emulated_run
    for key in ("loss", "sft_loss", "value_loss", "megatron_grad_norm"):
        assert a[key] == b[key] and a[key] == a[key], key  # equal on both ranks, not NaN
    assert a["megatron_grad_norm"] > 0
