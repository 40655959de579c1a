"""Weight-sync time per transport for a ~135M-parameter model (SmolLM2-135M architecture, random
weights, fp32: ~540 MB) from trainer rank 0 to 1, 2 and 4 engines, against one plain memory copy of
the same bytes measured in the same run.

    .venv/bin/python benchmarks/weight_sync.py [--repeats 3] [--engines 1,2,4]

Last line: RESULT sync_vs_memcpy_1=<ratio> sync_vs_memcpy_4=<ratio> (best transport per count).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import ray  # noqa: E402
import torch  # noqa: E402


def write_model(folder: Path) -> int:
    from transformers import AutoModelForCausalLM, LlamaConfig

    from miles_ray.models.tiny import train_tokenizer

    config = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=2048)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    train_tokenizer().save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def memcpy_seconds(nbytes: int, repeats: int) -> float:
    src = torch.empty(nbytes // 4, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--engines", default="1,2,4")
    ap.add_argument("--transports", default="object_store,broadcast,shm")
    ap.add_argument("--bucket-mb", type=float, default=128)
    ap.add_argument("--warmup", type=int, default=3)
    args = ap.parse_args()
    counts = [int(x) for x in args.engines.split(",")]
    from jobs.cluster import RunActors, start_actors, stop_actors
    from jobs.weight_sync import WeightSync
    from miles_ray.config import load_config

    tmp = Path(tempfile.mkdtemp(prefix="wsync-"))
    n_params = write_model(tmp / "model")
    nbytes = n_params * 4
    print(f"model: {n_params / 1e6:.1f}M params, {nbytes / 2**20:.0f} MiB fp32", flush=True)
    cfg = load_config(None, [f"model.path={tmp / 'model'}", f"rollout.num_engines={max(counts)}", "run_name=wsbench",
                             "logging.wandb=false", "cluster.cpus_per_actor=0.25", "reward.isolate=false",
                             f"weight_sync.bucket_mb={args.bucket_mb}"])
    ray.init(address="local", num_cpus=8, include_dashboard=False)
    actors = start_actors(cfg)
    copies = []  # memcpy is re-measured next to every sync: this VM's bandwidth drifts by 1.5x
    results, version = {}, 1
    try:
        for transport in args.transports.split(","):
            for n in counts:
                view = RunActors(actors.policy, actors.engines[:n], [], actors.buffer)
                sync = WeightSync(view, transport)
                for _ in range(args.warmup):  # opens the broadcast group, touches object-store pages
                    sync.sync(version)
                    version += 1
                times = []
                for _ in range(args.repeats):
                    copies.append(memcpy_seconds(nbytes, 3))
                    times.append(sync.sync(version))
                    version += 1
                t = statistics.median(times)
                results[(transport, n)] = t
                copy_s = statistics.median(copies)
                print(f"{transport:13s} engines={n}: {t * 1e3:8.1f} ms  ({t / copy_s:5.2f}x memcpy, "
                      f"{nbytes / t / 2**30:.2f} GiB/s per engine)", flush=True)
    finally:
        stop_actors(actors)
        ray.shutdown()
    copy_s = statistics.median(copies)
    print(f"memcpy of {nbytes / 2**20:.0f} MiB (median over the run): {copy_s * 1e3:.1f} ms "
          f"({nbytes / copy_s / 2**30:.1f} GiB/s)")
    best = {n: min(results[(tr, n)] for tr in args.transports.split(",")) for n in counts}
    parts = [f"sync_vs_memcpy_{n}={best[n] / copy_s:.2f}" for n in counts if n in (1, 4)]
    print("RESULT " + " ".join(parts))


if __name__ == "__main__":
    main()
