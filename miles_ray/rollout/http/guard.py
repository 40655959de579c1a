"""The guard in front of our HTTP servers (engine server and router): bearer token, body size
limit, and the token registry of the processes that call them.

Security model (docs/sglang_http.md): servers bind 127.0.0.1 unless ``rollout.server_host`` is
set. Beyond loopback the driver makes a random token (:func:`new_token`) and hands it to the
actors; every endpoint but ``/health`` then requires ``Authorization: Bearer <token>`` (SGLang's
own ``--api-key`` does the same). Bodies larger than the limit get 413 before they are parsed.

Invariant (tested): with a token set, a request without it never reaches a handler.
"""
from __future__ import annotations

import hmac
import json
import os
import secrets

TOKEN_ENV = "MILES_API_TOKEN"  # how a launched server receives its token (not on its command line)
OPEN_PATHS = frozenset({"/health"})
_TOKENS: dict[str, str] = {}  # base URL -> token, in the processes that call those URLs


def new_token() -> str:
    return secrets.token_urlsafe(32)


def register(url: str, token: str | None) -> None:
    """Calls from this process to ``url`` send ``token`` (EngineClient looks it up)."""
    if token:
        _TOKENS[url.rstrip("/")] = token


def token_for(url: str) -> str | None:
    return _TOKENS.get(url.rstrip("/"))


def auth_headers(token: str | None) -> dict:
    return {"Authorization": f"Bearer {token}"} if token else {}


def take_env_token() -> str | None:
    """The token a launcher put in this server's environment (removed from it afterwards)."""
    return os.environ.pop(TOKEN_ENV, None) or None


async def _reply(send, status: int, message: str) -> None:
    body = json.dumps({"error": message, "code": status}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class Guard:
    """ASGI middleware: token check, then the body read whole (at most ``max_body_bytes``) and
    replayed to the app."""

    def __init__(self, app, token: str | None, max_body_bytes: int):
        self.app, self.token, self.max_body = app, token, max_body_bytes

    def _authorized(self, scope) -> bool:
        if not self.token or scope["path"] in OPEN_PATHS:
            return True
        given = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
        return hmac.compare_digest(given.encode(), f"Bearer {self.token}".encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if not self._authorized(scope):
            return await _reply(send, 401, "missing or wrong bearer token (Authorization: Bearer <token>)")
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            return await _reply(send, 413, f"request body larger than the server's limit of {self.max_body} bytes")
        chunks, size, more = [], 0, True
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return None
            chunks.append(msg.get("body", b""))
            size += len(chunks[-1])
            more = msg.get("more_body", False)
            if size > self.max_body:
                return await _reply(send, 413, f"request body larger than the server's limit of {self.max_body} bytes")
        body, sent = b"".join(chunks), False

        async def replay():
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)
