"""The ``miles-ray`` command (``[project.scripts]``).

    miles-ray train CONFIG [key.sub=value ...]     train (sync or async, per the config)
    miles-ray rollout CONFIG [key.sub=value ...]   inference only: generate, score, dump samples
    miles-ray serve --model-path SPEC [...]        one engine server (SGLang-compatible HTTP API)
    miles-ray config show [CONFIG] [key=value ...] the resolved config, defaults and descriptions
    miles-ray plan CONFIG [key.sub=value ...]      per-GPU memory of every role and placement, and the verdict
    miles-ray plot RUN_DIR [--out DIR]             PNGs of a run (reward, lengths, KL, staleness, faults...)
    miles-ray analyze RUN_DIR [--json]             a run's summary: reward rise, speed, faults, ledger

A user error found at start (config, data, model path, reward function, resume folder) prints one
``error: ...`` line and exits 2; ``--debug`` shows the traceback as well. A mistyped command gets
argparse's usage message (exit 2), never a traceback.
"""
from __future__ import annotations

import argparse
import os
import sys

from jobs import rollout_only, train
from jobs.entry import add_config_args, config_from, guarded

EXAMPLES = """examples:
  miles-ray train examples/grpo_arith_tiny.yaml total_steps=20 train.lr=5e-4
  miles-ray rollout examples/grpo_arith_tiny.yaml rollout.dump_path=runs/dump.jsonl
  miles-ray serve --model-path tiny:qwen3 --port 30000
  miles-ray config show examples/grpo_arith_tiny_async.yaml async_rl.staleness=2
  miles-ray plan examples/plan_8xH100.yaml model.path=examples/models/Qwen3-30B-A3B
  miles-ray plot runs/grpo-arith-tiny --out plots/
  miles-ray analyze runs/grpo-arith-tiny
"""


def cmd_serve(args) -> int:
    from miles_ray.rollout.http.server import main as serve

    serve(args.server_args)
    return 0


def cmd_config_show(args) -> int:
    from miles_ray.config_doc import render_config

    sys.stdout.write(render_config(config_from(args)))
    return 0


def cmd_plan(args) -> int:
    """Print the memory plan; exit 0 when the configured placement fits cluster.gpu_memory_gib, else 1."""
    from miles_ray.plan import plan_for, render_plan

    cfg = config_from(args)
    plan = plan_for(cfg)
    sys.stdout.write(render_plan(plan, cfg.model.path))
    return 0 if plan.fits else 1


def cmd_plot(args) -> int:
    from miles_ray.ops.plot import plot_run

    for name, path in plot_run(args.run_dir, args.out).items():
        print(f"wrote {path}" if path else f"skipped {name}: the run has none of its metrics")
    return 0


def cmd_analyze(args) -> int:
    import json

    from miles_ray.ops.analyze import analyze_run, render

    report = analyze_run(args.run_dir)
    sys.stdout.write(json.dumps(report, indent=2) + "\n" if args.json else render(report, args.run_dir))
    return 0


def _run_dir_command(sub, name: str, help_: str, fn) -> argparse.ArgumentParser:
    p = _sub(sub, name, help_, fn, config_args=False)
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run's output_dir (holds metrics.jsonl)")
    p.add_argument("--debug", action="store_true", help="show the traceback of errors")
    return p


def _sub(sub, name: str, help_: str, fn, config_args: bool = True, **kw):
    p = sub.add_parser(name, help=help_, description=help_, **kw)
    if config_args:
        add_config_args(p)
    p.set_defaults(fn=fn)
    return p


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="miles-ray", description="Ray-native RL post-training for LLMs.",
                                 epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", required=True)
    train.add_train_args(_sub(sub, "train", "Train a policy (sync or async driver, per the config).", train.command))
    _sub(sub, "rollout", "Inference only: generate and score batches, dump them as jsonl.", rollout_only.command)
    _sub(sub, "plan", "Per-GPU memory of every role (trainer, critic, engine) and placement (colocated, "
         "disaggregated) from the model's config.json alone, and whether it fits cluster.gpu_memory_gib "
         "(exit 1 when not).", cmd_plan)
    serve = _sub(sub, "serve", "Run one engine server (SGLang-compatible HTTP API); `miles-ray serve --help` lists "
                 "its arguments.", cmd_serve, config_args=False, add_help=False)
    serve.add_argument("server_args", nargs=argparse.REMAINDER)
    plot = _run_dir_command(sub, "plot", "Write PNGs of a run: reward (with eval), response length, KL and "
                            "mismatch, IS weights, staleness, tokens/s, a timeline of faults and recoveries.", cmd_plot)
    plot.add_argument("--out", metavar="DIR", help="where the PNGs go (default: RUN_DIR/plots)")
    analyze = _run_dir_command(sub, "analyze", "Summarize a run: reward rise, steps/s, faults, lost and duplicated "
                               "samples (from the ledger in metrics.jsonl).", cmd_analyze)
    analyze.add_argument("--json", action="store_true", help="print the summary as JSON")
    config = sub.add_parser("config", help="Inspect configs.", description="Inspect configs.")
    actions = config.add_subparsers(dest="action", metavar="ACTION", required=True)
    _sub(actions, "show", "Print the resolved config: every key, its value (defaults included), type and "
         "description.", cmd_config_show)
    return ap


def main(argv: list[str] | None = None) -> int:
    """The ``miles-ray`` console script. The working directory goes first on ``sys.path``, as with
    ``python -m jobs.train``, so ``pkg.module:attr`` plug-ins beside the config resolve either way."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    if argv[:1] == ["serve"]:  # everything after `serve` (--help included) belongs to the server
        return cmd_serve(argparse.Namespace(server_args=argv[1:]))
    args = parser().parse_args(argv)
    return guarded(lambda: args.fn(args), getattr(args, "debug", False))


if __name__ == "__main__":
    sys.exit(main())
