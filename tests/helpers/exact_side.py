"""One side of a true on-policy run in its own process (used by test_exact_capabilities.py).

    python exact_side.py engine <cache> <out.json> <threads> <spec> <max_len>
    python exact_side.py trainer <cache> <in.json> <threads> <spec> <max_len>

The engine side samples with the native engine in true on-policy mode after a release / resume (its
weights then live in fresh allocations, as after colocated training); the trainer side recomputes the
log-probs with the trainer's exact forward, its weights moved 8 bytes off a 64-byte boundary (where
transformers' loader, FSDP buffers or a weight sync may put them). Each side runs under the
ATEN_CPU_CAPABILITY of its environment. The trainer side prints ``max_abs=<x> tokens=<n>``.
"""
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from miles_ray.models import load_model  # noqa: E402


def engine(cache, out, spec, max_len):
    from miles_ray.rollout import SamplingParams
    from miles_ray.rollout.native import NativeEngine

    eng = NativeEngine(spec, tiny_cache_dir=cache, seed=3, exact_max_len=max_len, exact_check=False)
    eng.release_memory()
    eng.resume_memory()
    eng.weights.update(load_model(spec, "float32", cache).state_dict(), 1)
    rng = random.Random(0)
    rids = []
    for i in range(10):  # prompts of 3..40 tokens, 3 samples each: decode batches shrink 30 -> 1
        ids = [rng.randrange(3, 300) for _ in range(rng.randrange(3, 41))]
        params = SamplingParams(max_len - len(ids) - 2, temperature=0.9)
        rids += [eng.add_request(ids, params) for _ in range(3)]
    done = {r.rid: r for r in eng.run_until_done()}
    json.dump([{"prompt": done[r].prompt_ids, "response": done[r].output_ids, "logprobs": done[r].logprobs}
               for r in rids], open(out, "w"))


def trainer(cache, path, spec, max_len):
    from miles_ray.models.exact import ExactLMForTraining
    from miles_ray.models.exact_check import _misaligned
    from miles_ray.sample import Sample
    from miles_ray.training.batching import pack, unpack

    rows = json.load(open(path))
    samples = [Sample(0, 0, "", "", r["prompt"], r["response"], r["logprobs"]) for r in rows]
    model = load_model(spec, "float32", cache)
    core = ExactLMForTraining(model, max_len)
    worst, n = 0.0, 0
    with torch.no_grad(), _misaligned(model, 8):
        for i in range(0, len(samples), 8):  # micro-batches of 8 rows
            chunk = samples[i:i + 8]
            batch = pack(chunk, 0, torch.device("cpu"), packed=False)
            logp, _ = core(batch, 0.9)
            for s, lp in zip(chunk, unpack(logp, batch)):
                worst = max([worst] + [abs(a - b) for a, b in zip(s.response_logprobs, lp)])
                n += len(lp)
    print(f"max_abs={worst!r} tokens={n}")


if __name__ == "__main__":
    side, cache, path, threads, spec, max_len = sys.argv[1:7]
    torch.set_num_threads(int(threads))
    (engine if side == "engine" else trainer)(cache, path, spec, int(max_len))
