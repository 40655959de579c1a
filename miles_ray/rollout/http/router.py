"""A router that balances /generate over engine servers (native or SGLang) and survives engine loss.

    python -m miles_ray.rollout.http.router --worker-urls http://127.0.0.1:30000 http://127.0.0.1:30001 --port 30100

Picks the healthy worker with the fewest requests in flight. A worker that refuses a connection or
answers 503 is marked unhealthy and the request is re-sent to another; a background check of
/health every ``--health-interval`` seconds brings restarted workers back once they serve.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse


class Router:
    def __init__(self, urls: list[str], health_interval: float = 1.0, max_attempts: int = 4, token: str | None = None,
                 health_timeout_s: float = 25.0):
        """``token``: sent to the workers (a run's servers share one token); ``health_timeout_s``:
        longer than SGLang's 20 s health probe (:meth:`check_health`)."""
        self.health_timeout_s = health_timeout_s
        from miles_ray.rollout.http.guard import auth_headers

        self.workers = {u.rstrip("/"): {"healthy": True, "inflight": 0, "served": 0, "failures": 0} for u in urls}
        self.health_interval, self.max_attempts = health_interval, max_attempts
        self.owner: dict[str, str] = {}  # rid -> worker serving it
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=5.0), headers=auth_headers(token))

    def pick(self) -> str | None:
        healthy = [u for u, w in self.workers.items() if w["healthy"]]
        return min(healthy, key=lambda u: self.workers[u]["inflight"]) if healthy else None

    async def generate(self, body: dict) -> tuple[int, object]:
        last = "no healthy engine"
        for _ in range(self.max_attempts):
            url = self.pick()
            if url is None:
                await asyncio.sleep(self.health_interval)
                continue
            w = self.workers[url]
            w["inflight"] += 1
            if body.get("rid"):
                self.owner[body["rid"]] = url
            try:
                r = await self.client.post(f"{url}/generate", json=body)
                if r.status_code == 503:
                    w["healthy"], last = False, f"{url} not ready: {r.text}"
                    continue
                w["served"] += 1
                return r.status_code, r.json()
            except httpx.TransportError as err:
                w["healthy"], w["failures"], last = False, w["failures"] + 1, f"{url}: {err!r}"
            finally:
                w["inflight"] -= 1
                self.owner.pop(body.get("rid"), None)
        return 503, {"error": f"generate failed after {self.max_attempts} attempts; last: {last}"}

    async def check_health(self) -> None:
        """SGLang's /health runs a generation probe that waits behind a pause or a weight update
        (up to its HEALTH_CHECK_TIMEOUT, 20 s: http_server.py health_generate), so a slow answer
        is not a failure: a health read that times out keeps the worker's state."""
        await asyncio.gather(*(self._check(url, w) for url, w in list(self.workers.items())))

    async def _check(self, url: str, w: dict) -> None:
        try:
            r = await self.client.get(f"{url}/health", timeout=self.health_timeout_s)
            w["healthy"] = r.status_code == 200
        except httpx.TimeoutException:
            return
        except httpx.TransportError:
            w["healthy"] = False

    async def health_loop(self) -> None:
        while True:
            await self.check_health()
            await asyncio.sleep(self.health_interval)

    async def abort(self, rid: str) -> dict:
        urls = [self.owner[rid]] if rid in self.owner else list(self.workers)
        results = {}
        for url in urls:
            with contextlib.suppress(httpx.TransportError):
                r = await self.client.post(f"{url}/abort_request", json={"rid": rid})
                results[url] = r.json()
        return results


def create_app(urls: list[str], health_interval: float = 1.0, token: str | None = None):
    router = Router(urls, health_interval, token=token)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        task = asyncio.create_task(router.health_loop())
        yield
        task.cancel()

    app = FastAPI(title="miles-ray router", lifespan=lifespan)
    app.state.router = router

    @app.post("/generate")
    async def generate(request: Request):
        status, body = await router.generate(await request.json())
        return JSONResponse(body, status_code=status)

    @app.get("/health")
    async def health():
        ok = any(w["healthy"] for w in router.workers.values())
        return JSONResponse({"healthy_workers": sum(w["healthy"] for w in router.workers.values())},
                            status_code=200 if ok else 503)

    @app.get("/list_workers")
    async def list_workers():
        return router.workers

    @app.post("/add_worker")
    async def add_worker(request: Request):
        url = (await request.json())["url"].rstrip("/")
        router.workers.setdefault(url, {"healthy": False, "inflight": 0, "served": 0, "failures": 0})
        await router.check_health()
        return router.workers[url]

    @app.post("/remove_worker")
    async def remove_worker(request: Request):
        return {"removed": router.workers.pop((await request.json())["url"].rstrip("/"), None) is not None}

    @app.post("/abort_request")
    async def abort(request: Request):
        return await router.abort((await request.json())["rid"])

    return app


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker-urls", nargs="+", required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=30100)
    ap.add_argument("--health-interval", type=float, default=1.0)
    args = ap.parse_args(argv)
    import uvicorn

    from miles_ray.rollout.http.guard import Guard, take_env_token

    token = take_env_token()
    app = Guard(create_app(args.worker_urls, args.health_interval, token), token, 64 << 20)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
