"""RouterActor: runs the HTTP router (miles_ray.rollout.router) in front of the engine servers."""
from __future__ import annotations

import socket
import threading
import time

import ray

from actors.common import ActorBase


@ray.remote
class RouterActor(ActorBase):
    def __init__(self, worker_urls: list, health_interval: float = 1.0, host: str | None = None,
                 token: str | None = None):
        """Binds 127.0.0.1 unless ``host`` (``node_ip``: this node's address); with ``token`` every
        endpoint but /health needs it, and it is sent to the workers."""
        import uvicorn

        from actors.rollout import server_host
        from miles_ray.rollout.http_guard import Guard
        from miles_ray.rollout.router import create_app

        self.host = server_host(host)
        with socket.socket() as s:
            s.bind((self.host, 0))
            self.port = s.getsockname()[1]
        app = Guard(create_app(worker_urls, health_interval, token), token, 64 << 20)
        config = uvicorn.Config(app, host=self.host, port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        threading.Thread(target=self.server.run, daemon=True).start()
        deadline = time.time() + 30
        while not self.server.started and time.time() < deadline:
            time.sleep(0.05)

    def url(self) -> str:
        return f"http://{self.host}:{self.port}"
