"""The framework's floor: a FastAPI endpoint that parses the same body with a pydantic model and
returns a precomputed answer of the same size as the service's. Computing attention should cost
no more than this echo."""

import os

from fastapi import FastAPI
from pydantic import BaseModel
from starlette.responses import Response

ANSWER = os.environ.get("BARE_ANSWER", "{}").encode()

app = FastAPI()


class BareRequest(BaseModel):
    embeddings: list[list[float]]
    d_out: int = 2
    seed: int = 123


@app.post("/echo")
async def echo(request: BareRequest) -> Response:
    return Response(ANSWER, media_type="application/json")


@app.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}
