"""Our broadcast channel (trainer side) and a process that builds its group exactly as SGLang's
``init_weights_update_group`` does meet on the rendezvous store: 2 processes, gloo, a tensor
broadcast from rank 0 arrives intact."""
import multiprocessing as mp
from datetime import timedelta

import torch

from miles_ray.rollout.http.engine import free_port
from miles_ray.weights.broadcast import BroadcastChannel


def sglang_init_custom_process_group(backend, init_method, world_size, rank, group_name, timeout=timedelta(seconds=60)):
    """SGLang 0.5.5 srt/utils/common.py:1645-1713 ``init_custom_process_group`` as written there (the
    ``store=None`` path; pg_options and device_id left at None), called as model_runner.py:1056 does."""
    from torch.distributed.distributed_c10d import Backend, PrefixStore, _new_process_group_helper, _world, rendezvous

    backend = Backend(backend)
    rendezvous_iterator = rendezvous(init_method, rank, world_size, timeout=timeout)
    store, rank, world_size = next(rendezvous_iterator)
    store.set_timeout(timeout)
    store = PrefixStore(group_name, store)
    pg, _ = _new_process_group_helper(world_size, rank, [], backend, store, group_name=group_name,
                                      backend_options=None, timeout=timeout, device_id=None)
    _world.pg_group_ranks[pg] = {i: i for i in range(world_size)}
    return pg


def _sglang_side(port, queue):
    pg = sglang_init_custom_process_group("gloo", f"tcp://127.0.0.1:{port}", 2, 1, "weight_update_group")
    t = torch.zeros(3, 4)
    torch.distributed.broadcast(t, src=0, group=pg)  # model_runner update_weights_from_distributed
    queue.put(t.tolist())


def test_our_channel_meets_sglangs_group():
    port = free_port()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_sglang_side, args=(port, queue))
    proc.start()
    try:
        channel = BroadcastChannel(0, 2, "127.0.0.1", port, "gloo", 60)
        sent = torch.arange(12, dtype=torch.float32).view(3, 4)
        channel.broadcast(sent)
        assert queue.get(timeout=60) == sent.tolist()
        channel.close()
    finally:
        proc.join(30)
        if proc.is_alive():
            proc.kill()
