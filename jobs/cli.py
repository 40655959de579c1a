"""The ``miles-ray`` command (``[project.scripts]``).

    miles-ray train CONFIG [key.sub=value ...]     train (sync or async, per the config)
    miles-ray rollout CONFIG [key.sub=value ...]   inference only: generate, score, dump samples
    miles-ray serve --model-path SPEC [...]        one engine server (SGLang-compatible HTTP API)
    miles-ray config show [CONFIG] [key=value ...] the resolved config, defaults and descriptions

A user error found at start (config, data, model path, reward function, resume folder) prints one
``error: ...`` line and exits 2; ``--debug`` shows the traceback as well. A mistyped command gets
argparse's usage message (exit 2), never a traceback.
"""
from __future__ import annotations

import argparse
import sys

from jobs import rollout_only, train
from jobs.entry import add_config_args, config_from, guarded

EXAMPLES = """examples:
  miles-ray train examples/grpo_arith_tiny.yaml total_steps=20 train.lr=5e-4
  miles-ray rollout examples/grpo_arith_tiny.yaml rollout.dump_path=runs/dump.jsonl
  miles-ray serve --model-path tiny:qwen3 --port 30000
  miles-ray config show examples/grpo_arith_tiny_async.yaml async_rl.staleness=2
"""


def cmd_serve(args) -> int:
    from miles_ray.rollout.server import main as serve

    serve(args.server_args)
    return 0


def cmd_config_show(args) -> int:
    from miles_ray.config_doc import render_config

    sys.stdout.write(render_config(config_from(args)))
    return 0


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
    _sub(sub, "train", "Train a policy (sync or async driver, per the config).", train.command)
    _sub(sub, "rollout", "Inference only: generate and score batches, dump them as jsonl.", rollout_only.command)
    serve = _sub(sub, "serve", "Run one engine server (SGLang-compatible HTTP API); `miles-ray serve --help` lists "
                 "its arguments.", cmd_serve, config_args=False, add_help=False)
    serve.add_argument("server_args", nargs=argparse.REMAINDER)
    config = sub.add_parser("config", help="Inspect configs.", description="Inspect configs.")
    actions = config.add_subparsers(dest="action", metavar="ACTION", required=True)
    _sub(actions, "show", "Print the resolved config: every key, its value (defaults included), type and "
         "description.", cmd_config_show)
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:  # everything after `serve` (--help included) belongs to the server
        return cmd_serve(argparse.Namespace(server_args=argv[1:]))
    args = parser().parse_args(argv)
    return guarded(lambda: args.fn(args), getattr(args, "debug", False))


if __name__ == "__main__":
    sys.exit(main())
