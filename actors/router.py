"""RouterActor: runs the HTTP router (miles_ray.rollout.router) in front of the engine servers."""
from __future__ import annotations

import socket
import threading
import time

import ray

from actors.common import ActorBase


@ray.remote
class RouterActor(ActorBase):
    def __init__(self, worker_urls: list, health_interval: float = 1.0, host: str = "127.0.0.1"):
        import uvicorn

        from miles_ray.rollout.router import create_app

        with socket.socket() as s:
            s.bind(("", 0))
            self.port = s.getsockname()[1]
        self.host = host
        config = uvicorn.Config(create_app(worker_urls, health_interval), host=host, port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        threading.Thread(target=self.server.run, daemon=True).start()
        deadline = time.time() + 30
        while not self.server.started and time.time() < deadline:
            time.sleep(0.05)

    def url(self) -> str:
        return f"http://{self.host}:{self.port}"
