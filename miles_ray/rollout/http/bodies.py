"""Request bodies and error answers shared by our HTTP servers' handlers."""
from __future__ import annotations

import json

from fastapi import Request
from fastapi.responses import JSONResponse

from miles_ray.rollout.sglang.api import BadRequest


class Conflict(ValueError):
    """Answered with HTTP 409 (a request id already in use)."""


async def read_json(request: Request):
    raw = await request.body()
    if not raw:
        return {}
    try:
        return json.loads(raw)
    except ValueError as err:
        raise BadRequest(f"body is not valid JSON: {err}") from None


async def read_object(request: Request) -> dict:
    body = await read_json(request)
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    return body


def error(status: int, message: str) -> JSONResponse:
    # http_server.py _create_error_response: {"error": {"message": ...}}
    return JSONResponse({"error": {"message": message, "code": status}}, status_code=status)
