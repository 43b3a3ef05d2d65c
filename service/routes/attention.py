"""`POST /attention/{variant}` for each variant of the registry, and `GET /attention`."""

import asyncio
import functools
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.routing import APIRoute
from starlette.requests import ClientDisconnect
from starlette.responses import Response, StreamingResponse
from starlette.types import Message, Scope

from attention import VARIANTS, Variant
from service import pipeline
from service.engine import Engine
from service.examples import EXAMPLES
from service.json_parts import dumps_or_parts
from service.parsing import parse_request
from service.pipeline import Plan
from service.schemas import (
    AttentionResponse,
    ErrorMessage,
    ValidationErrorResponse,
    VariantInfo,
    request_model,
    variant_info,
)


class OwnBodyRoute(APIRoute):
    """An operation that reads and validates its own body; its schema comes from openapi_extra.

    FastAPI's dependency solving and body handling cost more than computing the book's example
    (measured: ~35 us of ~100 us), so these endpoints take the bare Request.
    """

    def get_route_handler(self) -> Callable[[Request], Awaitable[Response]]:
        return self.endpoint


router = APIRouter(tags=["attention"])


@router.get("/attention", summary="List the attention variants")
async def list_variants() -> list[VariantInfo]:
    return [variant_info(variant) for variant in VARIANTS.values()]


# The media type of every body the native endpoints read. JSON is UTF-8 (RFC 8259), so a charset
# parameter may say so and nothing else.
JSON_MEDIA_TYPES = ("application/json",)


def require_media_type(
    scope: Scope, accepted: tuple[str, ...], *, absent_allowed: bool = False
) -> None:
    """A 415 naming the accepted types unless the body's Content-Type is one of `accepted`
    (compared without case; a `charset=utf-8` parameter allowed, other parameters ignored).

    Read off the scope, as `declared_length` reads the length: a body sent as text/plain, as a
    form or with no type at all is refused rather than parsed as JSON on a guess. The inference
    protocol's clients name no type (tritonclient's synchronous one): `absent_allowed` there.
    """
    value = None
    for name, header in scope["headers"]:
        if name == b"content-type":
            if header in exact_headers(accepted):  # the common case, with nothing to parse
                return
            value = header.decode("latin-1")
            break
    wanted = " or ".join(accepted)
    if value is None:
        if absent_allowed:
            return
        raise HTTPException(415, f"the request has no Content-Type: send {wanted}")
    media_type, *parameters = value.split(";")
    if media_type.strip().lower() not in accepted:
        raise HTTPException(
            415, f"Content-Type {media_type.strip()!r} is not accepted: send {wanted}"
        )
    for parameter in parameters:
        key, _, charset = parameter.partition("=")
        charset = charset.strip().strip('"').lower()
        if key.strip().lower() == "charset" and charset not in ("utf-8", "utf8"):
            raise HTTPException(415, f"charset {charset!r} is not accepted: send {wanted} in UTF-8")


@functools.cache
def exact_headers(accepted: tuple[str, ...]) -> frozenset[bytes]:
    """The Content-Type values that are an accepted type as it is written, bare."""
    return frozenset(media_type.encode() for media_type in accepted)


async def read_body(request: Request, limit: int) -> bytes | bytearray:
    """The body, refused with a 413 as soon as it is known to exceed `limit` bytes.

    A small body comes in one message, returned as it is. Otherwise, with a Content-Length the
    chunks land in one buffer of that size: joining a list of chunks would hold a 60 MB body
    twice.
    """

    def too_large(size: str = "the request body") -> HTTPException:
        message = f"{size} exceeds the limit of {limit} bytes (ATTENTION_MAX_BODY_BYTES)"
        return HTTPException(413, message)

    def longer_than_declared() -> HTTPException:
        return HTTPException(400, "the request body is longer than its Content-Length")

    size = declared_length(request.scope)
    if size is not None and size > limit:
        raise too_large(f"the request body of {size} bytes")
    # request.receive rather than request.stream(): an async generator per request costs more
    # than the rest of reading a small body.
    receive = request.receive
    chunk, more = body_chunk(await receive())
    if not more:
        if size is not None and len(chunk) > size:
            raise longer_than_declared()
        if len(chunk) > limit:
            raise too_large()
        return chunk
    if size is not None:
        body, received = bytearray(size), 0
        while True:
            if received + len(chunk) > size:
                raise longer_than_declared()
            body[received : received + len(chunk)] = chunk
            received += len(chunk)
            if not more:
                return body if received == size else body[:received]
            chunk, more = body_chunk(await receive())
    chunks, received = [], 0
    while True:
        received += len(chunk)
        if received > limit:
            raise too_large()
        chunks.append(chunk)
        if not more:
            return b"".join(chunks)
        chunk, more = body_chunk(await receive())


def declared_length(scope: Scope) -> int | None:
    """The Content-Length, read off the scope: building Request.headers costs more than the
    rest of reading a small body."""
    for name, value in scope["headers"]:
        if name == b"content-length":
            return int(value) if value.isdigit() else None
    return None


def body_chunk(message: Message) -> tuple[bytes, bool]:
    """A message's bytes and whether more follow; a client gone is ClientDisconnect, as
    `Request.stream()` has it."""
    if message["type"] == "http.disconnect":
        raise ClientDisconnect()
    return message.get("body", b""), message.get("more_body", False)


def compute_endpoint(variant: Variant) -> Callable[..., Awaitable[Response]]:
    async def compute(request: Request) -> Response:
        engine: Engine = request.app.state.engine
        require_media_type(request.scope, JSON_MEDIA_TYPES)
        received = [await read_body(request, engine.settings.max_body_bytes)]
        parse = functools.partial(parse_one, engine, variant)
        content = await pipeline.run(
            engine, request.app.state.compute_slots, received, len(received[0]), parse, write_one
        )
        return answer_response(content)

    return compute


def parse_one(engine: Engine, variant: Variant, body: bytes | bytearray) -> Plan:
    return Plan([engine.prepare(variant, parse_request(body, variant))])


def write_one(plan: Plan, payloads: list[dict[str, Any]]) -> bytes | Iterator[bytes]:
    return dumps_or_parts(payloads[0], plan.answer_floats)


class JSONAnswer(Response):
    """An answer already serialised to JSON: its two headers made directly, where
    Response.init_headers parses the media type for a charset on every call."""

    media_type = "application/json"

    def init_headers(self, headers: Mapping[str, str] | None = None) -> None:
        if headers is not None:
            super().init_headers(headers)
            return
        self.raw_headers = [
            (b"content-length", str(len(self.body)).encode()),
            (b"content-type", b"application/json"),
        ]


def answer_response(content: bytes | Iterator[bytes]) -> Response:
    if isinstance(content, bytes):
        return JSONAnswer(content)
    # Sent with chunked transfer encoding, each part as soon as it is written.
    return StreamingResponse(written_ahead(content), media_type="application/json")


async def written_ahead(parts: Iterator[bytes]) -> AsyncIterator[bytes]:
    """The parts, the next one being written on a worker thread (the loop's default executor)
    while this one is sent.

    Taken one at a time (as StreamingResponse takes a plain iterator), a part would be written
    only after the one before had drained to the client, since the server waits for its write
    buffer to empty before the next send: writing and sending would take turns, not overlap.
    """
    loop = asyncio.get_running_loop()
    pending = loop.run_in_executor(None, next, parts, None)
    try:
        while (part := await pending) is not None:
            pending = loop.run_in_executor(None, next, parts, None)
            yield part
    finally:
        pending.cancel()  # the client is gone: a part not started is not written


def json_request_body(schema: dict[str, Any], examples: dict[str, Any]) -> dict[str, Any]:
    """`openapi_extra` documenting a body that an OwnBodyRoute reads and validates itself."""
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": schema, "examples": examples}},
        }
    }


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    413: {"model": ErrorMessage, "description": "The request body exceeds its limit"},
    415: {
        "model": ErrorMessage,
        "description": "The body's Content-Type is not application/json (a charset, if "
        "given, must be utf-8)",
    },
    503: {
        "model": ErrorMessage,
        "description": "Too many large computations running and queued; see Retry-After",
    },
    422: {
        "model": ValidationErrorResponse,
        "description": "Malformed or out-of-range input, or a limit exceeded: each entry names "
        "the field (`loc`) and what was expected (`msg`)",
    },
}

for variant in VARIANTS.values():
    schema = request_model(variant).model_json_schema()
    assert "$defs" not in schema, "request models are flat, so their schema can be inlined"
    router.add_api_route(
        f"/attention/{variant.name}",
        compute_endpoint(variant),
        methods=["POST"],
        route_class_override=OwnBodyRoute,
        name=f"attention_{variant.name.replace('-', '_')}",
        summary=f"{variant.description.split(':')[0]} (book section {variant.book_section})",
        description=variant.description,
        response_model=AttentionResponse,
        responses=ERROR_RESPONSES,
        openapi_extra=json_request_body(schema, EXAMPLES[variant.name]),
    )


@router.post("/attention/{variant}", include_in_schema=False)
async def unknown_variant(variant: str) -> Response:
    raise HTTPException(404, f"unknown variant {variant!r}; valid variants: {', '.join(VARIANTS)}")
