"""Request ids, Prometheus metrics and one structured JSON log line per request.

A pure ASGI middleware: Starlette's BaseHTTPMiddleware would cost more than computing the
book's example. For the same reason the per-request work is kept to what it must do: labelled
metric children are looked up once, the access log line is written without a LogRecord, and
the formatter writes each second's timestamp once.
"""

import asyncio
import atexit
import logging
import os
import re
import sys
import time
from typing import Any

import orjson
from prometheus_client import CollectorRegistry, Counter, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

REQUEST_ID_HEADER = b"x-request-id"
# A caller's id is echoed only when it is short and printable: it goes into logs and headers.
VALID_REQUEST_ID = re.compile(rb"[\x21-\x7e]{1,128}")

access_log = logging.getLogger("service.access")


class JsonFormatter(logging.Formatter):
    _second: int | None = None
    _formatted_second = ""

    def timestamp(self, created: float) -> str:
        second = int(created)
        if second != self._second:  # strftime costs more than the rest of the line
            self._formatted_second = time.strftime("%Y-%m-%dT%H:%M:%S", self.converter(second))
            self._second = second
        return self._formatted_second

    def format(self, record: logging.LogRecord) -> str:
        extra = {"exception": self.formatException(record.exc_info)} if record.exc_info else {}
        return self.line(
            record.created,
            record.levelname,
            record.name,
            record.getMessage(),
            {**getattr(record, "fields", {}), **extra},
        )

    def line(self, created: float, level: str, logger: str, message: str, fields: dict) -> str:
        """One JSON line: the time to the second, the level, the logger, the message, then
        the fields."""
        entry = {
            "time": self.timestamp(created),
            "level": level.lower(),
            "logger": logger,
            "message": message,
            **fields,
        }
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


def log_request(fields: dict[str, Any]) -> None:
    """The access log's line for one request, as the JSON handler would write it.

    When that handler is the line's only destination (as configure_logging sets it up), the
    line is written here directly: Python's logging spends ~15 us per record on a LogRecord and
    the handler chain, more than the service spends computing the book's example. The lines of
    one turn of the event loop are written together at its end: one write and flush for all the
    requests that finished in it, rather than one each. Anything else (another handler, a
    filter, propagation) gets the record through logging as usual.
    """
    if not access_log.isEnabledFor(logging.INFO):
        return
    handler = json_handler_alone()
    if handler is None:
        access_log.info("request", extra={"fields": fields})
        return
    formatter: JsonFormatter = handler.formatter  # type: ignore[assignment]
    line = formatter.line(time.time(), "info", access_log.name, "request", fields)
    line += handler.terminator
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # no loop to wait for
        write_lines([(handler, line, fields)])
        return
    if not _waiting_lines:
        loop.call_soon(write_waiting_lines)
    _waiting_lines.append((handler, line, fields))


# (handler, line, fields) for lines to write at the end of the loop's turn; at exit, whatever a
# loop closed on is written too.
_waiting_lines: list[tuple[logging.StreamHandler, str, dict[str, Any]]] = []


def write_waiting_lines() -> None:
    lines = _waiting_lines.copy()
    _waiting_lines.clear()
    write_lines(lines)


atexit.register(write_waiting_lines)


def write_lines(lines: list[tuple[logging.StreamHandler, str, dict[str, Any]]]) -> None:
    for handler in {id(handler): handler for handler, _, _ in lines}.values():
        text = "".join(line for line_handler, line, _ in lines if line_handler is handler)
        try:
            with handler.lock:  # type: ignore[union-attr]
                handler.stream.write(text)
                handler.flush()
        except Exception:  # a closed or broken stream: logging's own handling reports it, as
            for line_handler, _, fields in lines:  # for any other record
                if line_handler is handler:
                    access_log.info("request", extra={"fields": fields})


def json_handler_alone() -> logging.StreamHandler | None:
    """configure_logging's handler, when an access log record would reach it and nothing else."""
    service = access_log.parent
    if (
        access_log.handlers
        or access_log.filters
        or not access_log.propagate
        or service is None
        or service.name != "service"
        or service.propagate
        or service.filters
        or len(service.handlers) != 1
    ):
        return None
    handler = service.handlers[0]
    if (
        not getattr(handler, "is_json", False)
        or handler.filters
        or handler.level > logging.INFO
        or not isinstance(handler.formatter, JsonFormatter)
    ):
        return None
    return handler  # type: ignore[return-value]


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
        # `labels()` validates and locks on every call; the children it returns never change.
        self._request_children: dict[tuple[str, str, str], tuple[Any, Any]] = {}
        self._token_children: dict[str, Any] = {}

    def count_request(self, method: str, route: str, status: int, seconds: float) -> None:
        key = (method, route, str(status))
        children = self._request_children.get(key)
        if children is None:
            children = self.requests.labels(*key), self.latency.labels(method, route)
            self._request_children[key] = children
        children[0].inc()
        children[1].observe(seconds)

    def count_tokens(self, variant: str, tokens: int) -> None:
        child = self._token_children.get(variant)
        if child is None:
            child = self._token_children[variant] = self.tokens.labels(variant)
        child.inc(tokens)


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
        if VALID_REQUEST_ID.fullmatch(request_id):
            request_id_text = request_id.decode()
        else:
            request_id_text = os.urandom(16).hex()  # as random as uuid4().hex, at a fifth the cost
            request_id = request_id_text.encode()
        scope.setdefault("state", {})["request_id"] = request_id_text
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
            self.metrics.count_request(method, template, status, elapsed)
            if self.log_requests:
                log_request(
                    {
                        "request_id": request_id_text,
                        "method": method,
                        "path": scope["path"],
                        "route": template,
                        "status": status,
                        "duration_ms": round(elapsed * 1e3, 3),
                    }
                )
