"""The footprint's floor: a FastAPI app that loads what the service cannot do without (torch,
the GPT-2 encoding, the default 256-wide embedding tables) and nothing else. The service's
start-up time and memory at ready are measured against this app's, in the same run.

Like the service, it answers /healthz at once and /readyz with 200 once loaded; it loads in
its lifespan, before the port opens, as the service does today (the bench polls /readyz for
200, which times either way of loading).
"""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import torch
from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse

from attention.tokenizer import VOCAB_SIZE, gpt2_encoding

# The service's defaults for text input: embedding_dim 256, context_length 1024, seed 123.
EMBEDDING_DIM, CONTEXT_LENGTH, EMBEDDING_SEED = 256, 1024, 123

tables: list[torch.Tensor] = []


def load() -> None:
    gpt2_encoding()
    generator = torch.Generator().manual_seed(EMBEDDING_SEED)
    # Token table, then positional table, each filled from the same generator: the service's
    # draw (chapter 2's two nn.Embedding tables), so both hold the same pages of memory.
    for rows in (VOCAB_SIZE, CONTEXT_LENGTH):
        tables.append(torch.empty(rows, EMBEDDING_DIM).normal_(generator=generator))


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    await run_in_threadpool(load)
    yield


app = FastAPI(lifespan=lifespan)


@app.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@app.get("/readyz")
async def readyz() -> JSONResponse:
    if len(tables) == 2:
        return JSONResponse({"status": "ready"})
    return JSONResponse({"detail": "loading"}, status_code=503)
