"""Chaos run, one command: N steps (synchronous, or ``--async`` with staleness 1) on a multi-node
Ray cluster of this machine (``ray.cluster_utils``: a head with the 2 trainer ranks, the reward
workers and the buffer; two worker nodes with one rollout engine each; fake GPUs), under every
fault kind:

- ``--faults K`` random kills of engines and reward workers (``faults.random_kills``);
- a trainer-rank kill at step N/2 (``--no-trainer-kill`` leaves it out);
- the loss of engine 0's node at step N/3, and a spare node joining ``--spare-after-s`` later, as an
  autoscaler would (``--no-node-kill`` leaves it out).

Checkpoints every ``--ckpt-every`` steps (a fresh run also checkpoints step 0). Prints steps
completed, samples lost and trained twice (from the per-step ledger in metrics.jsonl; async: plus
the live ledger of the run's summary), the faults requested, fired (hit their actor) and recovered
(their actor back in service), and each recovery's seconds.

    .venv/bin/python benchmarks/chaos.py [--async] [--steps 12] [--faults 4] [--seed 0]

Last line: RESULT mode=<sync|async> requested=<k> fired=<k> recovered=<k> steps=<n> lost=<n>
duplicates=<n> max_recovery_s=<s> node_recovery_s=<s>
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
FAST_DETECTION = {"health_check_period_ms": 500, "health_check_timeout_ms": 500, "health_check_failure_threshold": 3}
PROMPTS, N = 8, 4


def parse_args():
    ap = argparse.ArgumentParser()
    ap.add_argument("--async", dest="async_mode", action="store_true", help="the async driver (staleness 1)")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--faults", type=int, default=4, help="random kills of engines and reward workers")
    ap.add_argument("--trainer-kill", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--node-kill", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--spare-after-s", type=float, default=5.0)
    ap.add_argument("--ckpt-every", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args()


def start_cluster():
    """Head: 2 fake GPUs (the trainer group, PACK) and CPUs for the services; two 1-GPU nodes,
    one engine each (the rollout group is SPREAD)."""
    import ray
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 4, "num_gpus": 2, "include_dashboard": False,
                                                      "_system_config": FAST_DETECTION})
    for _ in range(2):
        c.add_node(num_cpus=1, num_gpus=1)
    c.wait_for_nodes()
    ray.init(address=c.address)
    return c


def make_config(args, out: Path):
    from miles_ray.config import load_config

    kills = [{"role": "trainer", "rank": 1, "step": args.steps // 2}] if args.trainer_kill else []
    mode = ["async_rl.enabled=true", "async_rl.staleness=1", "async_rl.off_policy.mode=tis"] if args.async_mode else []
    return load_config(None, [
        f"output_dir={out}", "run_name=chaos", f"total_steps={args.steps}", "rollout.backend=native",
        f"rollout.prompts_per_step={PROMPTS}", f"rollout.n_samples_per_prompt={N}", "rollout.num_engines=2",
        "rollout.max_new_tokens=48", "rollout.ignore_eos=true", "reward.num_workers=2", "cluster.num_trainers=2",
        "cluster.use_gpu=true", f"checkpoint.every={args.ckpt_every}", "checkpoint.export_hf=false",
        f"faults.random_kills={args.faults}", f"faults.seed={args.seed}", f"faults.kills={json.dumps(kills)}",
        "logging.wandb=false", "logging.progress_bar=false", *mode])


def rows_of(out: Path) -> list:
    path = out / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x] if path.is_file() else []


def kill_node(cluster, out: Path, step: int, spare_after_s: float, driver: threading.Thread) -> dict:
    """At ``step``, remove the node of engine 0 (no grace); a spare node joins ``spare_after_s``
    later. Recovered once engine 0 answers READY from another node (restarted and refit)."""
    import ray

    while len(rows_of(out)) < step:
        if not driver.is_alive():
            return {"fired": 0, "recovered": 0, "seconds": 0.0}
        time.sleep(0.2)
    engine = ray.get_actor("chaos-rollout-0")
    node = ray.get(engine.where.remote())["node_id"]
    [victim] = [n for n in cluster.worker_nodes if n.node_id == node]
    t0 = time.time()
    cluster.remove_node(victim, allow_graceful=False)
    print(f"fault: node {node[:8]} (engine 0) removed at step {step}", flush=True)
    time.sleep(spare_after_s)
    cluster.add_node(num_cpus=1, num_gpus=1)  # Ray's node processes are started from the main thread only
    while driver.is_alive():
        try:
            where = ray.get(engine.where.remote(), timeout=5)
            if where["node_id"] != node and ray.get(engine.health.remote(), timeout=5)["state"] == "ready":
                return {"fired": 1, "recovered": 1, "seconds": time.time() - t0}
        except Exception:  # noqa: BLE001 - restarting, or waiting for a node
            pass
        time.sleep(0.5)
    return {"fired": 1, "recovered": 0, "seconds": time.time() - t0}


def main() -> None:
    args = parse_args()
    import ray

    from jobs.train import run
    from miles_ray.ledger import check_rows

    out = Path(tempfile.mkdtemp(prefix="chaos-"))
    cluster = start_cluster()
    cfg, result = make_config(args, out), {}

    def drive():
        try:
            result["summary"] = run(cfg)
        except BaseException as err:  # noqa: BLE001 - reported below
            result["error"] = err

    driver = threading.Thread(target=drive, daemon=True)
    driver.start()
    node = kill_node(cluster, out, args.steps // 3, args.spare_after_s, driver) if args.node_kill else \
        {"fired": 0, "recovered": 0, "seconds": 0.0}
    driver.join()
    ray.shutdown()  # its log stream must not trail the RESULT line
    for n in [*cluster.worker_nodes, cluster.head_node]:
        cluster.remove_node(n, allow_graceful=False)
    if "error" in result:
        print(f"the run failed: {result['error']!r}")
    rows, summary = rows_of(out), result.get("summary", {})
    counts = check_rows(rows, N, None if args.async_mode else range(args.steps * PROMPTS))
    lost, dups = counts["lost"] + summary.get("lost", 0), counts["duplicates"] + summary.get("duplicates", 0)
    last = rows[-1] if rows else {}
    requested = last.get("fault/requested", 0) + int(args.node_kill)
    fired, recovered = last.get("fault/fired", 0) + node["fired"], last.get("fault/recovered", 0) + node["recovered"]
    each = last.get("fault/recovery_s_each", [])
    mode = "async" if args.async_mode else "sync"
    print(f"mode {mode}: steps completed {counts['steps']}/{args.steps} ({summary.get('steps', 0)} run in this job)")
    print(f"faults requested {requested}, fired {fired}, recovered {recovered} (node: {node}); driver recoveries "
          f"{last.get('fault/recoveries', 0)}, seconds {each}; generate calls moved {sum(r.get('fault/generate_moved', 0) for r in rows)}")
    print(f"samples lost {lost}, samples trained twice {dups} ({counts['groups']} groups trained)")
    print(f"RESULT mode={mode} requested={requested} fired={fired} recovered={recovered} steps={counts['steps']} "
          f"lost={lost} duplicates={dups} max_recovery_s={max(each, default=0.0):.2f} "
          f"node_recovery_s={node['seconds']:.2f}")


if __name__ == "__main__":
    main()
