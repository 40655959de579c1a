"""Parameter counts of the memory plan (miles_ray.plan.count_parameters, from config.json alone)
against the sizes the model cards publish, for the example configs in examples/models/.

    .venv/bin/python benchmarks/plan_accuracy.py

Published totals: Qwen3-0.6B 0.6B (0.44B without embeddings), Qwen3-8B 8.2B (6.95B), Qwen3-30B-A3B
30.5B (29.9B; 3.3B active), DeepSeek-V3 671B (the main model: embedding, 61 layers, LM head; the
14B multi-token-prediction module, 685B in all on Hugging Face, is not in it; 37B active).
Last line: RESULT plan_param_err=<relative error of Qwen3-30B-A3B's count against 30.5B>
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from miles_ray.plan import active_parameters, count_parameters  # noqa: E402

PUBLISHED = {"Qwen3-0.6B": 0.6e9, "Qwen3-8B": 8.2e9, "Qwen3-30B-A3B": 30.5e9, "DeepSeek-V3": 671e9}


def main() -> None:
    errors = {}
    print(f"{'model':<15} {'counted':>17} {'active':>15} {'published':>10} {'error':>8}")
    for name, published in PUBLISHED.items():
        config = json.loads((ROOT / "examples" / "models" / name / "config.json").read_text())
        n = count_parameters(config)
        errors[name] = abs(n - published) / published
        print(f"{name:<15} {n:>17,} {active_parameters(config):>15,} {published / 1e9:>9g}B {errors[name]:>8.2%}")
    print(f"RESULT plan_param_err={errors['Qwen3-30B-A3B']:.5f}")


if __name__ == "__main__":
    main()
