"""Request ids, Prometheus metrics and one structured JSON log line per request.

A pure ASGI middleware: Starlette's BaseHTTPMiddleware would cost more than computing the
book's example.
"""

import logging
import re
import sys
import time
import uuid
from typing import Any

import orjson
from prometheus_client import CollectorRegistry, Counter, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

REQUEST_ID_HEADER = b"x-request-id"
# A caller's id is echoed only when it is short and printable: it goes into logs and headers.
VALID_REQUEST_ID = re.compile(rb"[\x21-\x7e]{1,128}")

access_log = logging.getLogger("service.access")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            **getattr(record, "fields", {}),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


def configure_logging(level: str) -> None:
    """JSON lines on stderr for the service's loggers; idempotent."""
    logger = logging.getLogger("service")
    if not any(getattr(handler, "is_json", False) for handler in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter())
        handler.is_json = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(level.upper())


class Metrics:
    """The app's own registry, so that several apps in one process (tests) do not collide."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "attention_http_requests",
            "HTTP requests by route and status",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "attention_http_request_duration_seconds",
            "HTTP request latency by route",
            ["method", "route"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )
        self.tokens = Counter(
            "attention_tokens_processed",
            "Tokens (rows of input, over the batch) computed, by variant",
            ["variant"],
            registry=self.registry,
        )
        self.refused = Counter(
            "attention_saturated_refusals",
            "Requests answered 503 because the heavy-computation queue was full",
            registry=self.registry,
        )


class ObservabilityMiddleware:
    def __init__(self, app: ASGIApp, metrics: Metrics, log_requests: bool = True) -> None:
        self.app = app
        self.metrics = metrics
        self.log_requests = log_requests

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = next(
            (value for name, value in scope["headers"] if name == REQUEST_ID_HEADER), b""
        )
        if not VALID_REQUEST_ID.fullmatch(request_id):
            request_id = uuid.uuid4().hex.encode()
        scope.setdefault("state", {})["request_id"] = request_id.decode()
        status = 500
        start = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (REQUEST_ID_HEADER, request_id)]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - start
            route = scope.get("route")
            # Route templates, not raw paths: a label per URL typed would grow without end.
            template = getattr(route, "path", "unmatched")
            method = scope["method"]
            self.metrics.requests.labels(method, template, str(status)).inc()
            self.metrics.latency.labels(method, template).observe(elapsed)
            if self.log_requests:
                access_log.info(
                    "request",
                    extra={
                        "fields": {
                            "request_id": request_id.decode(),
                            "method": method,
                            "path": scope["path"],
                            "route": template,
                            "status": status,
                            "duration_ms": round(elapsed * 1e3, 3),
                        }
                    },
                )
