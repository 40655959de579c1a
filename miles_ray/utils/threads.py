"""CPU threads for torch in trainer ranks and engines (``cluster.torch_threads``).

Ray sets ``OMP_NUM_THREADS=1`` in actors with fractional ``num_cpus`` (ours ask for 0.5), so torch
would run on one thread even where the node's other cores sit idle. Auto (0) gives each actor its
share of the node's cores among the actors that compute *at the same time*:
- sync driver: trainer ranks train while engines wait, engines generate while trainers wait, so
  trainer ranks share the cores among themselves, and engines among themselves;
- async driver: trainer ranks and engines run concurrently and split the cores.
"""
from __future__ import annotations


def torch_threads(cfg, role: str, node_cpus: int) -> tuple[int, str]:
    """(threads, why) for an actor of ``role`` ("trainer" or "rollout") on a node with ``node_cpus``."""
    c = cfg.cluster
    if c.torch_threads:
        return c.torch_threads, "cluster.torch_threads"
    trainers, engines = c.num_trainers, cfg.rollout.num_engines
    if cfg.async_rl.enabled:
        return max(1, node_cpus // (trainers + engines)), f"auto: async, {trainers + engines} actors share {node_cpus} cores"
    peers = trainers if role == "trainer" else engines
    return max(1, node_cpus // peers), f"auto: sync, {peers} {role} actor(s) take turns with the others on {node_cpus} cores"
