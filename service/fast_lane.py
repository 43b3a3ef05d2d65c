"""A lane for `POST /attention/<variant>` past FastAPI's router, straight to the route's endpoint.

FastAPI's routing and its per-request scaffolding (route matching over every route, exit stacks,
exception wrapping) cost more than the book's example now costs to compute: measured in process,
~40% of a small request. These endpoints take the bare Request already (`OwnBodyRoute`), so this
middleware, innermost of the app's own, hands such a request to the same endpoint with the same
scope keys the router would set, and answers its exceptions with the app's own handlers. The
routes stay registered with the router, so the OpenAPI document, `405`s and everything else are
unchanged; a path this lane does not know goes to the router as before.
"""

import inspect
from collections.abc import Iterable

from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send


class FastLane:
    def __init__(self, app: ASGIApp, routes: Iterable[APIRoute]) -> None:
        self.app = app
        self.routes = {route.path: route for route in routes if route.methods == {"POST"}}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = None
        # With a root_path the router strips it from the path first: leave such apps to it.
        if scope["type"] == "http" and scope["method"] == "POST" and not scope.get("root_path"):
            route = self.routes.get(scope["path"])
        if route is None:
            await self.app(scope, receive, send)
            return
        scope["route"] = route  # what the router sets; the metrics label requests by it
        scope["endpoint"] = route.endpoint
        scope["path_params"] = {}
        request = Request(scope, receive, send)
        try:
            response = await route.endpoint(request)
        except Exception as exc:
            handler = exception_handler(scope["app"].exception_handlers, exc)
            if handler is None:
                raise  # to ServerErrorMiddleware, as the router's 500s go
            if inspect.iscoroutinefunction(handler):
                response = await handler(request, exc)
            else:
                response = await run_in_threadpool(handler, request, exc)
        await response(scope, receive, send)


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
