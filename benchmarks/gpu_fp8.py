"""FP8 on a GPU: the block-scaled GEMM backends side by side (one GPU, no Ray).

    python benchmarks/gpu_fp8.py

1. Numerics: for the linear shapes of Qwen2.5-0.5B and 1 / 32 / 256 tokens, each backend's output
   against the dequantize path on the same FP8 operands (1 x 128 activation scales, 128 x 128
   weight scales): max relative error.
2. Decode tokens/s of a random-init model of Qwen2.5-0.5B's shape served by the native engine:
   bf16 weights, and FP8 weights on each backend (batch 32, 64 new tokens).
Each backend is tried on its own; a failure is reported, not fatal.
Last line: RESULT gpu=<name> scaled_mm_max_rel=<x> deep_gemm_max_rel=<x> tok_s_bf16=<x>
tok_s_dequant=<x> tok_s_scaled_mm=<x> tok_s_deep_gemm=<x>
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = [(896, 896), (4864, 896), (896, 4864), (1024, 2048), (2048, 512)]  # 0.5B linears; K/128 % 4 == 0


def numerics() -> dict:
    import torch

    from miles_ray.quant import formats as fmt
    from miles_ray.quant.kernels import BACKENDS

    worst = {"scaled_mm": 0.0, "deep_gemm": 0.0}
    torch.manual_seed(0)
    for n, k in SHAPES:
        w = (torch.randn(n, k, device="cuda") * 0.02).to(torch.bfloat16)
        wq, ws = fmt.fp8_quantize_weight(w)
        for m in (1, 32, 256):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = BACKENDS["dequant"](x, wq, ws, None, torch.float32)
            for name in worst:
                if isinstance(worst[name], str):
                    continue
                try:
                    got = BACKENDS[name](x, wq, ws, None, torch.float32)
                    rel = ((got - ref).abs().max() / ref.abs().max()).item()
                    worst[name] = max(worst[name], rel)
                    print(json.dumps({"backend": name, "shape": [m, n, k], "max_rel": rel}), flush=True)
                except Exception as err:  # noqa: BLE001 - report, go on
                    worst[name] = f"failed: {type(err).__name__}: {str(err)[:200]}"
                    print(json.dumps({"backend": name, "shape": [m, n, k], "error": worst[name]}), flush=True)
    print(json.dumps({"numerics_max_rel_vs_dequant": worst}), flush=True)
    return worst


def write_model(folder: Path) -> Path:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from miles_ray.models.tiny import train_tokenizer

    tok = train_tokenizer()
    cfg = Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                      num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Qwen2ForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def decode_speed(folder: Path, quantization, backend: str) -> float | str:
    import torch

    from miles_ray.rollout.native import NativeEngine
    from miles_ray.rollout import SamplingParams

    try:
        engine = NativeEngine(str(folder), dtype="bfloat16", tiny_cache_dir=str(folder.parent), seed=0,
                              quantization=quantization, fp8_backend=backend)
        reqs = [{"prompt": f"What is {i}+{i}?", "label": "", "prompt_index": i, "group_id": i} for i in range(32)]
        engine.generate(reqs[:4], 1, SamplingParams(4, ignore_eos=True))  # warm up
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = engine.generate(reqs, 1, SamplingParams(64, ignore_eos=True))
        torch.cuda.synchronize()
        return sum(s.response_length for s in out) / (time.perf_counter() - t0)
    except Exception as err:  # noqa: BLE001 - report, go on
        return f"failed: {type(err).__name__}: {str(err)[:200]}"


def main() -> None:
    import torch

    gpu = torch.cuda.get_device_name()
    print(json.dumps({"gpu": gpu, "capability": torch.cuda.get_device_capability(), "torch": torch.__version__}))
    worst = numerics()
    folder = write_model(Path(tempfile.mkdtemp(prefix="fp8-")) / "model")
    speeds = {}
    for backend in ("dequant", "scaled_mm", "deep_gemm"):
        speeds[backend] = decode_speed(folder, "fp8", backend)
    speeds["bf16"] = decode_speed(folder, None, "dequant")  # after the FP8 runs: no first-run warm-up bias
    print(json.dumps({"decode_tokens_per_s": speeds}), flush=True)
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else "failed"  # noqa: E731
    print(f"RESULT gpu={gpu.replace(' ', '_')} scaled_mm_max_rel={fmt(worst['scaled_mm'])} "
          f"deep_gemm_max_rel={fmt(worst['deep_gemm'])} tok_s_bf16={fmt(speeds['bf16'])} "
          f"tok_s_dequant={fmt(speeds['dequant'])} tok_s_scaled_mm={fmt(speeds['scaled_mm'])} "
          f"tok_s_deep_gemm={fmt(speeds['deep_gemm'])}")


if __name__ == "__main__":
    main()
