"""The FastAPI application: `service.main:app`."""

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from types import SimpleNamespace

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline

from service import errors, openapi
from service.concurrency import ComputeSlots
from service.engine import Engine
from service.fast_lane import FastLane
from service.grpc_server import GrpcServer
from service.observability import Metrics, ObservabilityMiddleware, configure_logging
from service.routes import attention, compare, health, inference_protocol, playground
from service.routes import metrics as metrics_routes
from service.settings import Settings, get_settings

startup_log = logging.getLogger("service.startup")
# How long calls in flight may take to finish once the app stops (uvicorn has drained HTTP).
GRPC_STOP_GRACE_SECONDS = 10

DESCRIPTION = """
The attention mechanisms of *Build a Large Language Model From Scratch* (S. Raschka):
chapter 3's simplified self-attention, self-attention with trainable weights, causal attention
and multi-head attention, and the bonus material's grouped-query, sliding-window and latent
attention. POST embeddings or text, get the attention weights, the context vectors and what a
KV cache would hold. Each chapter-3 variant's first example reproduces the book's printed
numbers.
Try them in the [playground](/): type a sentence, see each head's weights as a heatmap.
"""


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    configure_logging(settings.log_level)
    metrics = Metrics()
    engine = Engine(settings, count_tokens=metrics.count_tokens)

    async def warm_up(app: FastAPI, grpc: GrpcServer | None) -> None:
        try:
            await asyncio.to_thread(engine.warm_up)
        except Exception as error:
            startup_log.exception("the warm-up failed; the service will not become ready")
            app.state.warm_up_error = f"{type(error).__name__}: {error}"
            if grpc is not None:
                await grpc.set_alive(False)  # as /healthz: the orchestrator restarts it
        else:
            app.state.ready = True
            if grpc is not None:
                await grpc.set_serving(True)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # The warm-up runs behind open ports: an orchestrator sees a live process (/healthz,
        # the gRPC server's health) that is not ready yet (/readyz 503, the inference service
        # NOT_SERVING), not a refused connection, which is also what a dead one gives. Requests
        # before it is done are served, loading what they need.
        grpc = GrpcServer(settings, app.state, app.version) if settings.grpc_port else None
        if grpc is not None:
            await grpc.start()
        warming = asyncio.create_task(warm_up(app, grpc))
        yield
        app.state.ready = False
        # The thread cannot be interrupted: a stop during the warm-up leaves it to finish
        # while the server winds down, and the interpreter waits for it on exit.
        warming.cancel()
        if grpc is not None:
            await grpc.stop(GRPC_STOP_GRACE_SECONDS)

    # Swagger UI's assets are served from the installed package: /docs needs no network.
    app = FastAPIOffline(
        title="Attention service",
        version="0.1.0",
        description=DESCRIPTION,
        lifespan=lifespan,
        redoc_url=None,
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    # A plain namespace rather than Starlette's State, which answers each attribute in its
    # __getattr__ after a failed lookup (~0.7 us): every computation reads two of them.
    app.state = SimpleNamespace(
        ready=False,  # the warm-up is done (see lifespan)
        warm_up_error=None,  # why it failed, if it did: /healthz then fails too
        engine=engine,
        metrics=metrics,
        compute_slots=ComputeSlots(
            settings.max_concurrent_computations, settings.max_queued_computations
        ),
    )
    errors.install(app)
    app.include_router(compare.router)  # before the attention router's catch-all 404
    app.include_router(attention.router)
    app.include_router(health.router)
    app.include_router(metrics_routes.router)
    app.include_router(inference_protocol.router)
    app.include_router(playground.router)
    openapi.install(app, settings)  # the request bodies, exact for these settings
    own_body_routes = [
        route
        for router in (compare.router, attention.router)
        for route in router.routes
        if isinstance(route, attention.OwnBodyRoute)
    ]
    # The stack Starlette would build on the first request, built now and put behind the fast
    # lane (see service.fast_lane), with the observability middleware outermost: its request id
    # and status cover the 500s ServerErrorMiddleware sends. Starlette refuses middleware added
    # after this, rather than leaving it out.
    app.fast_lane = FastLane(app.build_middleware_stack(), own_body_routes)
    app.middleware_stack = ObservabilityMiddleware(
        app.fast_lane, metrics=metrics, log_requests=settings.access_log
    )
    return app


app = create_app()
