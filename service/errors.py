"""Every error the service answers with, mapped once.

422s keep FastAPI's `{"detail": [...]}` form. An error never echoes a large input back: a
matrix of millions of numbers would turn a short refusal into a long download.
"""

import json
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from attention import AttentionInputError
from service.concurrency import Saturated

MAX_ECHOED_INPUT_BYTES = 200


def json_response(status_code: int, content: Any, headers: dict[str, str] | None = None):
    try:
        body = orjson.dumps(content, default=repr)
    except orjson.JSONEncodeError:  # integers beyond 64 bits, which only the stdlib writes
        body = json.dumps(content, default=repr, separators=(",", ":")).encode()
    return Response(
        body,
        status_code=status_code,
        media_type="application/json",
        headers=headers,
    )


def _printable(error: dict[str, Any]) -> dict[str, Any]:
    error = {**error, "loc": list(error["loc"])}
    if "input" in error:
        try:
            too_long = len(repr(error["input"])) > MAX_ECHOED_INPUT_BYTES
        except RecursionError:  # a deeply nested value
            too_long = True
        if too_long:
            del error["input"]
    error.pop("url", None)
    return error


async def validation_error(request: Request, exc: RequestValidationError) -> Response:
    return json_response(422, {"detail": [_printable(error) for error in exc.errors()]})


async def attention_input_error(request: Request, exc: AttentionInputError) -> Response:
    loc = ["body", exc.field] if exc.field else ["body"]
    error = {"type": "value_error", "loc": loc, "msg": str(exc), "input": exc.value}
    return json_response(422, {"detail": [_printable(error)]})


async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
    """FastAPI's `{"detail"}`, but under `/v2`, where the inference protocol answers every error
    as `{"error"}` (an unknown path, a wrong method): its clients read nothing else."""
    path = request.url.path
    if path == "/v2" or path.startswith("/v2/"):
        message = str(exc.detail)
        if exc.status_code == 404 and message == "Not Found":
            message = f"{request.method} {path} is no endpoint of the inference protocol"
        elif exc.status_code == 405:
            allowed = (exc.headers or {}).get("Allow", "")
            message = f"{path} does not take {request.method}; it takes {allowed}"
        return json_response(exc.status_code, {"error": message}, exc.headers)
    return await http_exception_handler(request, exc)


async def saturated(request: Request, exc: Saturated) -> Response:
    request.app.state.metrics.refused.inc()
    return json_response(503, {"detail": str(exc)}, headers={"Retry-After": "1"})


def install(app: FastAPI) -> None:
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(AttentionInputError, attention_input_error)
    app.add_exception_handler(Saturated, saturated)
