"""RouterActor: runs the router in front of the engine servers: ours (:mod:`miles_ray.rollout.http.router`,
in this actor) or SGLang's ``sglang_router`` (a subprocess; what SGLang users deploy).

Binds 127.0.0.1 unless ``host`` (``node_ip``: this node's address); with ``token`` every endpoint
but /health needs it, and it is sent to the workers.
"""
from __future__ import annotations

import socket
import threading
import time

import ray

from actors.common import ActorBase


def _native(self, worker_urls: list, health_interval: float, token: str | None) -> None:
    import uvicorn

    from miles_ray.rollout.http.guard import Guard
    from miles_ray.rollout.http.router import create_app

    app = Guard(create_app(worker_urls, health_interval, token), token, 64 << 20)
    self.server = uvicorn.Server(uvicorn.Config(app, host=self.host, port=self.port, log_level="warning"))
    threading.Thread(target=self.server.run, daemon=True).start()
    deadline = time.time() + 30
    while not self.server.started and time.time() < deadline:
        time.sleep(0.05)


def _sglang_router(self, worker_urls: list, health_interval: float, token: str | None) -> None:
    from miles_ray.rollout.http.launch import start_router_process

    self.process = start_router_process(worker_urls, self.host, self.port, token)


ROUTERS = {"native": _native, "sglang_router": _sglang_router}


@ray.remote
class RouterActor(ActorBase):
    def __init__(self, worker_urls: list, health_interval: float = 1.0, host: str | None = None,
                 token: str | None = None, kind: str = "native"):
        from actors.rollout import server_host

        self.host, self.process = server_host(host), None
        with socket.socket() as s:
            s.bind((self.host, 0))
            self.port = s.getsockname()[1]
        ROUTERS[kind](self, worker_urls, health_interval, token)

    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __del__(self):
        if getattr(self, "process", None) is not None and self.process.poll() is None:
            self.process.kill()
