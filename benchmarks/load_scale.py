"""Peak memory of loading a >= 1B-parameter model on 2 FSDP2 ranks (gloo, CPU), sharded loading
(:mod:`miles_ray.models.sharded`: parameters on meta, each rank reading only the rows it keeps)
against the old path (every rank ``from_pretrained`` the whole model in fp32, then shards it).

A random Qwen3-shaped model is written once as bf16 safetensors (several files and an index, as
HF writes large models) under ``--cache``; ranks load it in fp32 (the trainers' master weights).
Per rank: the peak RSS increase during the load (``VmHWM`` after resetting it through
``/proc/self/clear_refs``, minus ``VmRSS`` before) over the bytes of the shard it keeps. The old
path needs a full fp32 copy per rank (about 2 x world size of the shard, plus the file pages it
maps), too much for a small machine at 1B, so it is measured on a ~0.27B model of the same shape
(the ratio does not depend on the size), beside the new path on that model.

``plan_param_err``: :func:`miles_ray.plan.count_parameters` on
``examples/models/Qwen3-30B-A3B/config.json`` against the published 30.5e9 (relative error).

    python benchmarks/load_scale.py [--cache runs/_models] [--skip-old]

Last line: ``RESULT load_peak_rss_ratio=<x> plan_param_err=<x>`` (ratio: the worse rank, 1B model).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import socket
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
SIZES = {  # name -> (hidden, intermediate, layers, heads, kv heads); head_dim 128, vocab 32000, untied
    "1b": (2048, 6144, 20, 16, 8),
    "small": (1024, 3072, 16, 8, 4),
}
FILE_BYTES = 1 << 30  # per safetensors file


def _config(size: str):
    from transformers import Qwen3Config

    hidden, inter, layers, heads, kv = SIZES[size]
    return Qwen3Config(vocab_size=32000, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv, head_dim=128, tie_word_embeddings=False,
                       max_position_embeddings=4096)


def write_model(folder: Path, size: str) -> Path:
    """A random model of ``size`` as bf16 safetensors files + index + config (once; renamed into place)."""
    from safetensors.torch import save_file

    from miles_ray.models.sharded import INDEX, params_on_meta

    if (folder / "config.json").is_file():
        return folder
    from transformers import AutoModelForCausalLM

    config = _config(size)
    with params_on_meta():
        names = {k: tuple(v.shape) for k, v in AutoModelForCausalLM.from_config(config).state_dict().items()}
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    gen, part, parts, weight_map = torch.Generator().manual_seed(0), {}, 0, {}
    for i, (name, shape) in enumerate(names.items()):
        part[name] = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
        if sum(t.numel() * 2 for t in part.values()) >= FILE_BYTES or i == len(names) - 1:
            parts += 1
            save_file(part, str(tmp / f"model-{parts:05d}.safetensors"), metadata={"format": "pt"})
            weight_map.update({k: f"model-{parts:05d}.safetensors" for k in part})
            part = {}
    (tmp / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config.save_pretrained(tmp)
    tmp.rename(folder)
    return folder


def _status(key: str) -> int:
    return int(re.search(rf"{key}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


def _new_path(folder: str):
    from miles_ray.models.loading import load_empty
    from miles_ray.training.fsdp.base import place
    from miles_ray.training.fsdp.logprobs import CausalLMForTraining

    model, files = load_empty(folder, "float32")
    assert files is not None
    place(CausalLMForTraining(model), model, "fsdp2", "fp32", torch.device("cpu"), files)
    return model


def _old_path(folder: str):
    from miles_ray.models.loading import load_model
    from miles_ray.training.fsdp.base import shard_fsdp2
    from miles_ray.training.fsdp.logprobs import CausalLMForTraining

    model = load_model(folder, "float32")
    shard_fsdp2(CausalLMForTraining(model), model, "fp32")
    return model


PATHS = {"new": _new_path, "old": _old_path}


def _rank(rank, world, port, folder, path, out):
    from miles_ray.training.collectives import barrier, init_distributed

    torch.set_num_threads(1)
    init_distributed(rank, world, "127.0.0.1", port)
    barrier()
    before = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    start = time.perf_counter()
    model = PATHS[path](folder)
    seconds = time.perf_counter() - start
    peak = _status("VmHWM")
    kept = sum((p.to_local() if hasattr(p, "to_local") else p).numel() * 4 for p in model.parameters())
    Path(out, f"{path}-rank{rank}.json").write_text(json.dumps(
        {"ratio": (peak - before) / kept, "kept_gb": kept / 1e9, "peak_increase_gb": (peak - before) / 1e9,
         "seconds": seconds, "params": sum(p.numel() for p in model.parameters())}))
    barrier()
    torch.distributed.destroy_process_group()


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(folder: Path, path: str, out: Path) -> list[dict]:
    mp.spawn(_rank, args=(2, _port(), str(folder), path, str(out)), nprocs=2, join=True)
    return [json.loads((out / f"{path}-rank{r}.json").read_text()) for r in range(2)]


def plan_param_err() -> float:
    try:
        from miles_ray.plan import count_parameters
    except ImportError:
        return float("nan")
    config = json.loads((ROOT / "examples/models/Qwen3-30B-A3B/config.json").read_text())
    return abs(count_parameters(config) - 30.5e9) / 30.5e9


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", default=str(ROOT / "runs/_models"))
    parser.add_argument("--skip-old", action="store_true", help="do not measure the old path (small model)")
    args = parser.parse_args(argv)
    out = Path(args.cache) / "load-scale-results"
    out.mkdir(parents=True, exist_ok=True)
    runs = [("1b", "new")] + ([] if args.skip_old else [("small", "new"), ("small", "old")])
    worst = {}
    for size, path in runs:
        start = time.perf_counter()
        folder = write_model(Path(args.cache) / f"load-scale-{size}", size)
        written = time.perf_counter() - start
        ranks = measure(folder, path, out)
        worst[(size, path)] = max(r["ratio"] for r in ranks)
        print(f"{size} model ({ranks[0]['params'] / 1e9:.3f}B params, write {written:.0f}s) {path} loading: "
              + "; ".join(f"rank {i}: +{r['peak_increase_gb']:.2f} GB peak for a {r['kept_gb']:.2f} GB shard "
                          f"(ratio {r['ratio']:.3f}, {r['seconds']:.1f}s)" for i, r in enumerate(ranks)), flush=True)
    if not args.skip_old:
        print(f"old_load_peak_rss_ratio={worst[('small', 'old')]:.3f} (small model; new path there: "
              f"{worst[('small', 'new')]:.3f})")
    print(f"RESULT load_peak_rss_ratio={worst[('1b', 'new')]:.3f} plan_param_err={plan_param_err():.4f}")


if __name__ == "__main__":
    main()
