"""Liveness and readiness, for health checks and orchestrators."""

from fastapi import APIRouter, Request
from starlette.responses import Response

from service.errors import json_response
from service.schemas import ErrorMessage

router = APIRouter(tags=["operations"])


@router.get("/healthz", summary="Liveness: the process answers")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="Readiness: the GPT-2 encoding and default embedding tables are loaded",
    responses={503: {"model": ErrorMessage, "description": "Still loading"}},
)
async def readyz(request: Request) -> Response:
    if getattr(request.app.state, "ready", False):
        return json_response(200, {"status": "ready"})
    return json_response(503, {"detail": "loading the encoding and embedding tables"})
