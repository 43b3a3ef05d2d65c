"""Request bodies to validated requests, without a second copy of the floats.

The body is decoded once: its top level into raw JSON fragments, the `embeddings` fragment
straight into typed lists (msgspec rejects booleans, strings and NaN/Infinity literals, and names
the position) and then into one float32 array; every other field through the variant's pydantic
model. Every failure becomes a 422 in FastAPI's usual `{"detail": [...]}` form.
"""

import re
from typing import Any

import msgspec
import numpy as np
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from attention import Variant
from service.schemas import ALL_PARAMETERS, RequestBase, accepted_fields, request_model

MATRIX_TYPES = {2: list[list[float]], 3: list[list[list[float]]]}
INDEX = re.compile(r"\[(\d+)\]")


def body_error(loc: tuple[Any, ...], msg: str, error_type: str = "value_error", **extra: Any):
    """One entry of a 422's `detail`, located in the body as FastAPI locates its own."""
    return {"type": error_type, "loc": ("body", *loc), "msg": msg, **extra}


def invalid(loc: tuple[Any, ...], msg: str, error_type: str = "value_error", **extra: Any):
    return RequestValidationError([body_error(loc, msg, error_type, **extra)])


def decode_fields(body: bytes) -> dict[str, msgspec.Raw]:
    if not body.strip():
        raise invalid((), "the request body is empty: send a JSON object", "missing")
    try:
        return msgspec.json.decode(body, type=dict[str, msgspec.Raw])
    except msgspec.ValidationError:
        raise invalid(
            (), "the request body must be a JSON object", "model_attributes_type"
        ) from None
    except msgspec.DecodeError as error:
        raise invalid(
            (),
            f"the body is not valid JSON ({error}); note that NaN and Infinity are not JSON",
            "json_invalid",
        ) from None


def nesting_depth(raw: bytes) -> int:
    """How many `[` open the fragment: 2 for a matrix, 3 for a batch."""
    depth = 0
    for byte in raw:
        if byte == ord("["):
            depth += 1
        elif byte not in b" \t\r\n":
            break
    return depth


def decode_embeddings(raw: bytes) -> np.ndarray:
    """The `embeddings` fragment as a float32 array of shape (T, d_in) or (B, T, d_in)."""
    depth = nesting_depth(raw)
    if depth not in MATRIX_TYPES:
        if raw.strip() == b"null":
            raise invalid(("embeddings",), "embeddings is null: send rows of numbers or omit it")
        raise invalid(
            ("embeddings",),
            "embeddings must be a list of rows of numbers (T x d_in) or a batch of such "
            f"lists (B x T x d_in); got {'a flat list' if depth == 1 else 'something else'}",
            "list_type",
        )
    try:
        rows = msgspec.json.decode(raw, type=MATRIX_TYPES[depth])
    except msgspec.ValidationError as error:
        message, _, path = str(error).partition(" - at `$")
        position = tuple(int(index) for index in INDEX.findall(path))
        message = message.replace("`float`", "a number").replace("`array`", "a list")
        if message == "Number out of range":
            message = "number out of range: embeddings must be finite float32 values"
        raise invalid(("embeddings", *position), f"embeddings: {message}") from None
    except msgspec.DecodeError as error:  # cannot happen after decode_fields; kept for safety
        raise invalid(
            ("embeddings",), f"embeddings is not valid JSON ({error})", "json_invalid"
        ) from None
    try:
        with np.errstate(over="ignore"):  # overflow to inf is reported below, by position
            matrix = np.array(rows, dtype=np.float32)
    except ValueError:
        raise invalid(("embeddings",), ragged_message(rows, depth)) from None
    if matrix.ndim != depth or 0 in matrix.shape:
        raise invalid(
            ("embeddings",),
            f"embeddings must not be empty: got shape {list(matrix.shape)}",
            "too_short",
        )
    finite = np.isfinite(matrix)
    if not finite.all():
        position = tuple(int(index) for index in np.argwhere(~finite)[0])
        raise invalid(
            ("embeddings", *position),
            "embeddings must be finite float32 values (|x| < 3.4e38); this one overflows",
        )
    return matrix


def ragged_message(rows: list, depth: int) -> str:
    """Name the first row whose length differs from the first one's."""

    def first_mismatch(items: list, where: tuple[int, ...]) -> str | None:
        expected = len(items[0])
        for index, item in enumerate(items):
            if len(item) != expected:
                at = "".join(f"[{i}]" for i in (*where, index))
                first = "".join(f"[{i}]" for i in (*where, 0))
                return (
                    f"embeddings must be rectangular: embeddings{at} has {len(item)} entries "
                    f"but embeddings{first} has {expected}"
                )
        return None

    if depth == 3:
        message = first_mismatch(rows, ())
        for batch_index, matrix in enumerate(rows):
            message = message or (matrix and first_mismatch(matrix, (batch_index,)))
        if message:
            return message
    return first_mismatch(rows, ()) or "embeddings must be rectangular"


def parse_request(body: bytes, variant: Variant) -> RequestBase:
    fields = decode_fields(body)
    accepted = accepted_fields(variant)
    errors = [
        body_error(
            (name,),
            f"{name!r} does not apply to variant {variant.name!r}; it accepts: "
            + ", ".join(accepted)
            if name in ALL_PARAMETERS
            else f"unknown field {name!r}; variant {variant.name!r} accepts: "
            + ", ".join(accepted),
            "extra_forbidden",
        )
        for name in fields
        if name not in accepted
    ]
    if errors:
        raise RequestValidationError(errors)

    values: dict[str, Any] = {}
    for name, fragment in fields.items():
        raw = bytes(fragment)
        if name == "embeddings" and raw.strip() != b"null":
            values[name] = decode_embeddings(raw)
        else:
            try:
                values[name] = msgspec.json.decode(raw)
            except msgspec.MsgspecError as error:  # a number beyond float64, say
                raise invalid((name,), f"{name}: {error}") from None
    try:
        return request_model(variant).model_validate(values)
    except ValidationError as error:
        raise RequestValidationError(
            [
                body_error(e["loc"], e["msg"], e["type"], input=e.get("input"))
                for e in error.errors(include_url=False, include_context=False)
            ]
        ) from None
