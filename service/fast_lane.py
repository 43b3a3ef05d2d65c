"""A lane for `POST /attention/<variant>` ahead of Starlette's whole stack, straight to the route's
endpoint.

FastAPI's routing, its per-request scaffolding (route matching over every route, exit stacks,
exception wrapping) and the middleware layers Starlette puts around every app cost more than the
book's example costs to compute: measured in process, over half of a small request. These
endpoints take the bare Request already (`OwnBodyRoute`), so the lane hands such a request to the
same endpoint with the same scope keys the router would set, answers its exceptions with the
app's own handlers, and an exception no handler takes as ServerErrorMiddleware would: a plain 500,
then the exception raised on to the server, which logs it. The routes stay registered with the
router, so the OpenAPI document, `405`s and everything else are unchanged; a request the lane
does not take goes through the whole stack as before.
"""

import inspect
from collections.abc import Iterable

from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send


class FastLane:
    def __init__(self, stack: ASGIApp, routes: Iterable[APIRoute]) -> None:
        self.stack = stack  # Starlette's middleware and the router, for what the lane leaves
        self.routes = {route.path: route for route in routes if route.methods == {"POST"}}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = None
        # With a root_path the router strips it from the path first: leave such apps to it.
        if scope["type"] == "http" and scope["method"] == "POST" and not scope.get("root_path"):
            route = self.routes.get(scope["path"])
        if route is None:
            await self.stack(scope, receive, send)
            return
        scope["route"] = route  # what the router sets; the metrics label requests by it
        scope["endpoint"] = route.endpoint
        scope["path_params"] = {}
        request = Request(scope, receive, send)
        try:
            response = await route.endpoint(request)
        except Exception as exc:
            handlers = scope["app"].exception_handlers
            handler = exception_handler(handlers, exc)
            if handler is None:  # as ServerErrorMiddleware answers: a 500, then raise
                handler = handlers.get(500) or handlers.get(Exception)
                if handler is None:
                    response = PlainTextResponse("Internal Server Error", status_code=500)
                else:
                    response = await call_handler(handler, request, exc)
                await response(scope, receive, send)
                raise
            response = await call_handler(handler, request, exc)
        await response(scope, receive, send)


async def call_handler(handler, request: Request, exc: Exception) -> Response:
    if inspect.iscoroutinefunction(handler):
        return await handler(request, exc)
    return await run_in_threadpool(handler, request, exc)


def exception_handler(handlers: dict, exc: Exception):
    """The handler Starlette's ExceptionMiddleware would choose: by status for an HTTPException,
    else by the exception's class; None for what only ServerErrorMiddleware handles."""
    if isinstance(exc, HTTPException) and exc.status_code != 500 and exc.status_code in handlers:
        return handlers[exc.status_code]
    for cls in type(exc).__mro__:
        if cls is Exception:
            return None
        if cls in handlers:
            return handlers[cls]
    return None
