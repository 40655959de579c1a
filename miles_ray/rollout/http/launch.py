"""Start an engine server as a subprocess: our native server or ``sglang.launch_server`` (GPU),
through the same code path, and wait until it serves.

On CPU machines only the native backend runs; the SGLang command is built the same way and its
import happens in the child process, so sglang is never imported here.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys

from miles_ray.rollout.sglang.client import EngineClient, ServerExited


def server_command(backend: str, model_path: str, port: int, host: str = "127.0.0.1", extra: list | None = None) -> list:
    if backend == "native":
        cmd = [sys.executable, "-m", "miles_ray.rollout.http.server", "--model-path", model_path]
    elif backend == "sglang":
        # --enable-memory-saver gives release/resume_memory_occupation for colocation
        cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", model_path, "--enable-memory-saver",
               "--skip-server-warmup"]
    else:
        raise ValueError(f"unknown engine server backend '{backend}' (native or sglang)")
    return cmd + ["--host", host, "--port", str(port), *(extra or [])]


def _die_with_parent() -> None:
    """Linux: the server gets SIGKILL when the process that launched it dies (an actor killed by
    Ray must not leave an orphan server holding its GPU)."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def launch_server(backend: str, model_path: str, port: int, host: str = "127.0.0.1", extra: list | None = None,
                  wait_s: float = 180.0, log_path: str | None = None, env: dict | None = None, token: str | None = None):
    """Start the server and block until /health answers 200. Returns (process, client).
    ``token``: the bearer token the server requires (given to it in its environment, not argv)."""
    from miles_ray.rollout.http.guard import TOKEN_ENV

    log = open(log_path, "ab") if log_path else subprocess.DEVNULL
    child_env = {**os.environ, **(env or {}), **({TOKEN_ENV: token} if token else {})}
    process = subprocess.Popen(server_command(backend, model_path, port, host, extra), stdout=log,
                               stderr=subprocess.STDOUT, env=child_env, start_new_session=True,
                               preexec_fn=_die_with_parent)
    client = EngineClient(f"http://{host}:{port}", token=token)
    try:
        client.wait_healthy(wait_s, process)
    except Exception:
        process.kill()
        raise
    return process, client


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


BIND_FAILED = 3  # uvicorn's STARTUP_FAILURE: the port chosen was taken before the server bound it


def launch_on_free_port(backend: str, model_path: str, host: str, extra: list | None = None, tries: int = 3,
                        first_port: int | None = None, **kwargs):
    """:func:`launch_server` on a free port (``first_port`` first, when given); a server that could
    not bind it (another process took the port between choosing and binding: a race on a shared
    machine) is started again on another."""
    for attempt in range(tries):
        port = first_port if attempt == 0 and first_port else free_port(host)
        try:
            return launch_server(backend, model_path, port, host, extra, **kwargs)
        except ServerExited as err:
            if err.code != BIND_FAILED or attempt == tries - 1:
                raise


def router_command(worker_urls: list, host: str, port: int, token: str | None = None) -> list:
    """``sglang_router`` (pip sglang-router; SGLang's router / model gateway): workers, bind
    address, and the run's token as its API key. NOT VERIFIED (not installable here)."""
    cmd = [sys.executable, "-m", "sglang_router.launch_router", "--worker-urls", *worker_urls, "--host", host,
           "--port", str(port), "--policy", "round_robin"]
    return cmd + (["--api-key", token] if token else [])


def start_router_process(worker_urls: list, host: str, port: int, token: str | None = None, wait_s: float = 120.0):
    """Start ``sglang_router`` and wait until its /health answers 200."""
    process = subprocess.Popen(router_command(worker_urls, host, port, token), stdout=subprocess.DEVNULL,
                               stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_die_with_parent)
    try:
        EngineClient(f"http://{host}:{port}", token=token).wait_healthy(wait_s, process)
    except Exception:
        process.kill()
        raise
    return process
