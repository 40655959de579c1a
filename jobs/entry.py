"""What every command-line entry shares: process environment, config arguments, and the rule for
user errors (one ``error: ...`` line, exit 2; the traceback only with ``--debug``)."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Callable

from miles_ray.errors import UserError


def environment() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not os.environ.get("RAY_ADDRESS"):
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # local Ray binds to 127.0.0.1
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def add_config_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("config", nargs="?", help="YAML config file (optional: defaults otherwise)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides, values parsed as YAML")
    p.add_argument("--debug", action="store_true", help="show the traceback of errors")
    return p


def config_from(args: argparse.Namespace):
    """The validated config named by ``config`` and ``overrides`` (an override in the config slot
    counts as an override), its plug-ins checked (:func:`jobs.plugins.check_plugins`)."""
    from jobs.plugins import check_plugins
    from miles_ray.config import load_config

    path, overrides = args.config, list(args.overrides)
    if path is not None and "=" in path:
        path, overrides = None, [path, *overrides]
    cfg = load_config(path, overrides)
    check_plugins(cfg)
    return cfg


def guarded(fn: Callable[[], int], debug: bool) -> int:
    """Run a command; a :class:`UserError` becomes one line on stderr and exit code 2."""
    environment()
    try:
        return fn()
    except UserError as err:
        if debug:
            raise
        print(f"error: {getattr(err, 'cause', None) or err}", file=sys.stderr)  # a remote error: its cause only
        return 2


def standalone(prog: str, description: str, command: Callable[[argparse.Namespace], int], argv=None,
               extend: Callable[[argparse.ArgumentParser], object] | None = None) -> int:
    """``python -m jobs.<module> CONFIG [overrides]``: the same arguments as the miles-ray subcommand
    (``extend`` adds the subcommand's own flags)."""
    p = add_config_args(argparse.ArgumentParser(prog=prog, description=description))
    if extend is not None:
        extend(p)
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    return guarded(lambda: command(args), args.debug)
