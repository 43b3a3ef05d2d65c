"""Liveness and readiness, for health checks and orchestrators."""

from fastapi import APIRouter, Request
from pydantic import BaseModel
from starlette.responses import Response

from service.errors import json_response
from service.schemas import ErrorMessage

router = APIRouter(tags=["operations"])


class Status(BaseModel):
    status: str


@router.get(
    "/healthz",
    summary="Liveness: the process answers (200 while it warms up too)",
    response_model=Status,
    responses={
        503: {
            "model": ErrorMessage,
            "description": "The warm-up failed: the process will never be ready; restart it",
        }
    },
)
async def healthz(request: Request) -> Response:
    failure = request.app.state.warm_up_error
    if failure is not None:
        return json_response(503, {"detail": f"the warm-up failed ({failure}): restart"})
    return json_response(200, {"status": "ok"})


@router.get(
    "/readyz",
    summary="Readiness: the GPT-2 encoding and default embedding tables are loaded",
    response_model=Status,
    responses={
        503: {
            "model": ErrorMessage,
            "description": "Still loading (the port opens at once and the warm-up follows), "
            "stopping, or the warm-up failed",
        }
    },
)
async def readyz(request: Request) -> Response:
    state = request.app.state
    if state.ready:
        return json_response(200, {"status": "ready"})
    if state.warm_up_error is not None:
        return json_response(503, {"detail": f"the warm-up failed ({state.warm_up_error})"})
    return json_response(503, {"detail": "loading the encoding and embedding tables"})
