"""Entry point: ``python -m jobs.train [CONFIG.yaml] [key.sub=value ...]``.

Joins the Ray cluster in RAY_ADDRESS when set (``ray job submit --working-dir . -- python -m
jobs.train ...``), otherwise starts a local one.
"""
from __future__ import annotations

import logging
import os
import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not os.environ.get("RAY_ADDRESS"):
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # local Ray binds to 127.0.0.1
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from miles_ray.config import ConfigError, load_config
    from miles_ray.data import DataError

    path = argv.pop(0) if argv and "=" not in argv[0] else None
    try:
        cfg = load_config(path, argv)
        from jobs.sync_driver import run

        summary = run(cfg)
    except (ConfigError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"done: {summary['steps']} steps, reward first 5 = {summary['reward_first5']:.3f}, "
          f"last 5 = {summary['reward_last5']:.3f} (gain {summary['reward_gain']:+.3f}); "
          f"metrics in {cfg.output_dir}/metrics.jsonl")
    return 0


if __name__ == "__main__":
    sys.exit(main())
