"""Request ids, Prometheus metrics and one structured JSON log line per request.

A pure ASGI middleware: Starlette's BaseHTTPMiddleware would cost more than computing the
book's example. For the same reason the per-request work is kept to what it must do: labelled
metric children are looked up once, the access log line is written without a LogRecord, and
the formatter writes each second's timestamp once.
"""

import asyncio
import atexit
import logging
import random
import re
import sys
import threading
import time
from bisect import bisect_left
from collections.abc import Iterator
from itertools import accumulate
from typing import Any

import orjson
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.settings import ACCESS_LOG_FLUSH_SECONDS

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
    line is written directly: Python's logging spends ~15 us per record on a LogRecord and the
    handler chain, more than the service spends computing the book's example. A request keeps
    only its fields and time; every ACCESS_LOG_FLUSH_SECONDS the lines waiting are formatted in
    one loop and written in one call. Measured under load, formatting and writing each turn of
    the event loop's lines cost ~20 us per request in the server, batching them ~9 us. What
    that costs: a process killed outright (SIGKILL, out of memory) loses at most that interval
    of its access log; an orderly exit writes every line (atexit). Anything else (another
    handler, a filter, propagation) gets the record through logging at once, as usual.
    """
    if not access_log.isEnabledFor(logging.INFO):
        return
    handler = json_handler_alone()
    if handler is None:
        access_log.info("request", extra={"fields": fields})
        return
    global _flush_scheduled_on
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # no loop to wait for
        write_lines([(handler, time.time(), fields)])
        return
    # A flush waiting on another loop (a closed one, another thread's) may never run: this
    # loop schedules its own, which writes whatever is waiting, from either.
    if _flush_scheduled_on is not loop:
        _flush_scheduled_on = loop
        loop.call_later(ACCESS_LOG_FLUSH_SECONDS, write_waiting_lines)
    _waiting_lines.append((handler, time.time(), fields))


# (handler, time, fields) of the lines still to write; at exit, whatever a loop closed on is
# written too.
_waiting_lines: list[tuple[logging.StreamHandler, float, dict[str, Any]]] = []
_flush_scheduled_on: asyncio.AbstractEventLoop | None = None


def write_waiting_lines() -> None:
    global _flush_scheduled_on
    _flush_scheduled_on = None
    lines = _waiting_lines[:]
    # Only the lines taken: another thread may have appended since (each step is atomic).
    del _waiting_lines[: len(lines)]
    write_lines(lines)


atexit.register(write_waiting_lines)


def write_lines(lines: list[tuple[logging.StreamHandler, float, dict[str, Any]]]) -> None:
    for handler in {id(handler): handler for handler, _, _ in lines}.values():
        formatter: JsonFormatter = handler.formatter  # type: ignore[assignment]
        name, terminator = access_log.name, handler.terminator
        text = "".join(
            [
                formatter.line(created, "info", name, "request", fields) + terminator
                for line_handler, created, fields in lines
                if line_handler is handler
            ]
        )
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


# Latency buckets, in seconds: the book's example takes well under a millisecond, a 4096-token
# input seconds.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
BUCKET_LABELS = [floatToGoString(bound) for bound in LATENCY_BUCKETS] + ["+Inf"]  # `le` values


class Metrics:
    """The app's own registry, so that several apps in one process (tests) do not collide.

    Requests, their latency and tokens are counted in plain numbers under one lock and turned
    into Prometheus families when scraped (a custom collector): prometheus_client's labelled
    Counter and Histogram take a lock and a validation per call, ~4 us a request, more than the
    service spends computing the book's example.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.refused = Counter(
            "attention_saturated_refusals",
            "Requests answered 503 because the heavy-computation queue was full",
            registry=self.registry,
        )
        self._lock = threading.Lock()  # tokens are counted on worker threads too
        self._requests: dict[tuple[str, str, str], Tally] = {}  # (method, route, status)
        self._latency: dict[tuple[str, str], LatencyCounts] = {}  # (method, route)
        self._tokens: dict[str, Tally] = {}  # variant
        self._grpc: dict[tuple[str, str], Tally] = {}  # (method, code)
        self.registry.register(self)

    def count_request(self, method: str, route: str, status: int, seconds: float) -> None:
        key = (method, route, str(status))
        bucket = bisect_left(LATENCY_BUCKETS, seconds)  # the first bound >= seconds
        with self._lock:
            tally = self._requests.get(key)
            if tally is None:
                tally = self._requests[key] = Tally()
            tally.value += 1
            histogram = self._latency.get(key[:2])
            if histogram is None:
                histogram = self._latency[key[:2]] = LatencyCounts()
            histogram.counts[bucket] += 1
            histogram.sum += seconds

    def count_grpc(self, method: str, code: str) -> None:
        with self._lock:
            tally = self._grpc.get((method, code))
            if tally is None:
                tally = self._grpc[method, code] = Tally()
            tally.value += 1

    def count_tokens(self, variant: str, tokens: int) -> None:
        with self._lock:
            tally = self._tokens.get(variant)
            if tally is None:
                tally = self._tokens[variant] = Tally()
            tally.value += tokens

    def collect(self) -> Iterator[Metric]:
        """The families prometheus_client's Counter and Histogram would expose."""
        with self._lock:
            requests = [(key, tally.value, tally.created) for key, tally in self._requests.items()]
            latency = [
                (key, list(histogram.counts), histogram.sum, histogram.created)
                for key, histogram in self._latency.items()
            ]
            tokens = [(key, tally.value, tally.created) for key, tally in self._tokens.items()]
            grpc_calls = [(key, tally.value, tally.created) for key, tally in self._grpc.items()]
        request_family = CounterMetricFamily(
            "attention_http_requests",
            "HTTP requests by route and status",
            labels=["method", "route", "status"],
        )
        for labels, value, created in requests:
            request_family.add_metric(labels, value, created=created)
        latency_family = HistogramMetricFamily(
            "attention_http_request_duration_seconds",
            "HTTP request latency by route",
            labels=["method", "route"],
        )
        for labels, counts, total, created in latency:
            buckets = list(zip(BUCKET_LABELS, accumulate(counts), strict=True))
            latency_family.add_metric(labels, buckets, total)
            latency_family.add_sample(
                "attention_http_request_duration_seconds_created",
                dict(zip(["method", "route"], labels, strict=True)),
                created,
            )
        token_family = CounterMetricFamily(
            "attention_tokens_processed",
            "Tokens (rows of input, over the batch) computed, by variant",
            labels=["variant"],
        )
        for variant, value, created in tokens:
            token_family.add_metric([variant], value, created=created)
        grpc_family = CounterMetricFamily(
            "attention_grpc_requests",
            "gRPC calls by method and status code",
            labels=["method", "code"],
        )
        for labels, value, created in grpc_calls:
            grpc_family.add_metric(labels, value, created=created)
        yield from (request_family, latency_family, token_family, grpc_family)


class Tally:
    __slots__ = ("created", "value")

    def __init__(self) -> None:
        self.value = 0
        self.created = time.time()


class LatencyCounts:
    """Counts per latency bucket (not cumulative; the last is +Inf) and their sum."""

    __slots__ = ("counts", "created", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.sum = 0.0
        self.created = time.time()


class ObservabilityMiddleware:
    def __init__(self, app: ASGIApp, metrics: Metrics, log_requests: bool = True) -> None:
        self.app = app
        self.metrics = metrics
        self.log_requests = log_requests

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = b""
        for name, value in scope["headers"]:
            if name == REQUEST_ID_HEADER:
                request_id = value
                break
        if request_id and VALID_REQUEST_ID.fullmatch(request_id):
            request_id_text = request_id.decode()
        else:
            # 128 random bits as uuid4().hex has them, from Python's generator (reseeded in each
            # forked worker) rather than os.urandom: an id needs to be unique, not secret, and
            # the getrandom call per request costs more than the rest of choosing the id.
            request_id_text = f"{random.getrandbits(128):032x}"
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
