"""Request bodies to validated requests, fast for the common case and precise for the rest.

A well-formed body is decoded in one pass by simdjson, whose matrices come out as one flat
buffer of doubles with no Python float per number: about 1.6x faster than orjson or msgspec on
a 60 MB body, and a fraction of their memory. Anything it does not accept, or any doubt about a
matrix's shape, goes to the careful path: msgspec decodes the top level into raw fragments and
the `embeddings` fragment into typed lists, rejecting booleans, strings and NaN/Infinity
literals by position. Either way every failure becomes a 422 in FastAPI's `{"detail": [...]}`
form, and the variant's pydantic model validates every other field.
"""

import re
import threading
import time
from functools import cache
from typing import Annotated, Any

import msgspec
import numpy as np
import simdjson
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from attention import Variant
from attention.small import float32_rows
from service.schemas import ALL_PARAMETERS, RequestBase, accepted_fields, request_model

MATRIX_TYPES = {2: list[list[float]], 3: list[list[list[float]]]}
INDEX = re.compile(r"\[(\d+)\]")
# Where msgspec stopped in a malformed body, and the literals some encoders write for floats
# that JSON has no words for: msgspec stops on their first letter but one (`nan`) or on it.
MALFORMED_AT = re.compile(r"\(byte (\d+)\)")
NON_FINITE_LITERAL = re.compile(rb"(?i)(nan|inf(inity)?)(?![A-Za-z])")
LONE_HIGH_SURROGATE = re.compile(rb"\\u[dD][89abAB][0-9a-fA-F]{2}(?!\\u[dD][c-fC-F])")


def body_error(loc: tuple[Any, ...], msg: str, error_type: str = "value_error", **extra: Any):
    """One entry of a 422's `detail`, located in the body as FastAPI locates its own."""
    return {"type": error_type, "loc": ("body", *loc), "msg": msg, **extra}


def invalid(loc: tuple[Any, ...], msg: str, error_type: str = "value_error", **extra: Any):
    return RequestValidationError([body_error(loc, msg, error_type, **extra)])


def decode_fields(body: bytes | bytearray) -> dict[str, msgspec.Raw]:
    if not body.strip():
        raise invalid((), "the request body is empty: send a JSON object", "missing")
    try:
        return msgspec.json.decode(body, type=dict[str, msgspec.Raw])
    except msgspec.ValidationError:
        raise invalid(
            (), "the request body must be a JSON object", "model_attributes_type"
        ) from None
    except RecursionError:
        raise invalid((), "the body nests lists or objects too deeply", "json_invalid") from None
    except msgspec.DecodeError as error:
        if LONE_HIGH_SURROGATE.search(body):  # msgspec reports these as "truncated"
            message = "a string holds a lone surrogate escape (\\uD800-\\uDBFF without its pair)"
        elif non_finite_literal_at(body, str(error)):
            message = f"{error}; NaN and Infinity are not JSON: send finite numbers"
        else:
            message = str(error)
        raise invalid((), f"the body is not valid JSON: {message}", "json_invalid") from None


def non_finite_literal_at(body: bytes | bytearray, error: str) -> bool:
    """Whether msgspec stopped on a NaN or Infinity literal (any case, signed or not)."""
    match = MALFORMED_AT.search(error)
    if match is None:
        return False
    start = int(match.group(1))
    while 0 < start <= len(body) and chr(body[start - 1]).isalpha():  # back to the word's start
        start -= 1
    return NON_FINITE_LITERAL.match(body, start) is not None


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
        if depth == 1 and raw.strip()[1:].strip() == b"]":
            raise invalid(
                ("embeddings",),
                "embeddings is an empty list: send at least one row of numbers (T x d_in)",
                "too_short",
            )
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
        matrix = as_float32(rows)
    except ValueError:
        raise invalid(("embeddings",), ragged_message(rows, depth)) from None
    if matrix.ndim != depth or 0 in matrix.shape:
        raise invalid(
            ("embeddings",),
            f"embeddings must not be empty: got shape {list(matrix.shape)}",
            "too_short",
        )
    return checked_finite(matrix)


def as_float32(values: Any) -> np.ndarray:
    with np.errstate(over="ignore"):  # overflow to inf is reported by checked_finite
        return np.asarray(values, dtype=np.float32)


def checked_finite(matrix: np.ndarray) -> np.ndarray:
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


class NotFast(Exception):
    """The fast decoder declines; the careful one decides, with a precise message if need be."""


def fast_matrix(array: simdjson.Array) -> tuple[np.ndarray, int]:
    """(T, d) or (B, T, d) from a simdjson array and the number of lists it is made of, or
    NotFast for anything but a full box."""
    items = list(array)
    if not items or not isinstance(items[0], simdjson.Array):
        raise NotFast
    rows = items
    if isinstance(items[0][0] if len(items[0]) else None, simdjson.Array):  # a batch
        if not all(isinstance(item, simdjson.Array) for item in items):
            raise NotFast
        rows = [row for item in items for row in item]
        shape: tuple[int, ...] = (len(items), len(items[0]))
        if len(rows) != shape[0] * shape[1]:
            raise NotFast  # ragged batch
    else:
        shape = (len(rows),)
    width = len(rows[0]) if isinstance(rows[0], simdjson.Array) else 0
    if width == 0 or not all(isinstance(row, simdjson.Array) and len(row) == width for row in rows):
        raise NotFast
    try:
        flat = np.frombuffer(array.as_buffer(of_type="d"), dtype=np.float64)
    except (TypeError, ValueError):  # a string, boolean or null among the numbers
        raise NotFast from None
    lists = 1 + len(rows) + (len(items) if len(shape) == 2 else 0)
    return checked_finite(as_float32(flat).reshape(*shape, width)), lists


def count_lists(value: Any) -> int:
    if isinstance(value, list):
        return 1 + sum(count_lists(item) for item in value)
    if isinstance(value, dict):
        return sum(count_lists(item) for item in value.values())
    return 0


# simdjson's Parser sizes its buffers to the document on first use (about twice its bytes) and
# reuses them. A parser per request paid ~60 ms of allocation and page faults for the bench's
# 62 MB body, against a 73 ms parse. So one idle parser is kept for the next body; a parse that
# finds none makes its own. Its buffers (~130 MB after a 62 MB body) are dropped once it has
# gone unused a while (drop_idle_parsers, called by service.memory when the server is idle). A
# parser holds one document at a time: document_values hands plain values back, so the
# document is gone by the time the parser returns to the pool.
_idle_parsers: list[simdjson.Parser] = []
_last_taken = 0.0  # time.monotonic() when a parse last began
_pool_lock = threading.Lock()  # between returning a parser and dropping the idle ones


def fast_values(body: bytes | bytearray) -> dict[str, Any]:
    global _last_taken
    _last_taken = time.monotonic()
    try:
        parser = _idle_parsers.pop()  # atomic: two threads never take the same parser
    except IndexError:
        parser = simdjson.Parser()
    values = document_values(parser, body)
    # Kept only after a parse that succeeded: a NotFast's traceback may still hold the document.
    with _pool_lock:
        if not _idle_parsers:
            _idle_parsers.append(parser)
    return values


def drop_idle_parsers(unused_seconds: float) -> None:
    """Drop the kept parser (and its buffers) unless a parse began within `unused_seconds`."""
    with _pool_lock:
        if time.monotonic() - _last_taken >= unused_seconds:
            _idle_parsers.clear()


def document_values(parser: simdjson.Parser, body: bytes | bytearray) -> dict[str, Any]:
    """The fields of a body simdjson parses, with no simdjson object left alive on return."""
    try:
        document = parser.parse(body)
        if not isinstance(document, simdjson.Object):
            raise NotFast
        values: dict[str, Any] = {}
        lists = 0  # how many `[` the decoded values account for
        for name in document:
            value = document[name]  # strings are checked for UTF-8 here, not at parse
            if name == "embeddings":
                if not isinstance(value, simdjson.Array):
                    raise NotFast  # null or not a list: the careful path words the answer
                values[name], matrix_lists = fast_matrix(value)
                lists += matrix_lists
            elif isinstance(value, simdjson.Array):
                values[name] = value.as_list()
                lists += count_lists(values[name])
            elif isinstance(value, simdjson.Object):
                values[name] = value.as_dict()
                lists += count_lists(values[name])
            else:
                values[name] = value
        # as_buffer flattens nested lists, so `[1, [2]]` would pass as a row of two numbers:
        # every `[` of the body accounted for proves each row holds numbers only (a `[` inside
        # a string just means the careful path).
        if "embeddings" in values and count_byte(np.frombuffer(body, np.uint8), OPEN) != lists:
            raise NotFast
        return values
    except NotFast:
        raise
    except Exception:  # malformed JSON, big integers, invalid UTF-8: the careful path judges
        raise NotFast from None


OPEN = ord("[")
# A chunk and its comparison's booleans stay in the core's L2 cache together.
COUNT_CHUNK_BYTES = 256 * 1024


def count_byte(buffer: np.ndarray, byte: int) -> int:
    """How many times `byte` occurs in `buffer` (uint8). bytes.count checks one byte at a time
    (~18-25 ms for the bench's 62 MB body here); numpy compares a chunk at a time in vector
    instructions, the GIL released for each chunk (~6-7 ms), its booleans never a body's size."""
    count = 0
    for start in range(0, len(buffer), COUNT_CHUNK_BYTES):
        count += int(np.count_nonzero(buffer[start : start + COUNT_CHUNK_BYTES] == byte))
    return count


# Below this many bytes (~50 numbers) a body is decoded to Python objects in one call and its
# matrix checked by type: faster than building simdjson's proxies for the book's 140-byte example
# (~5 us against ~8), while at 3 KB simdjson's single buffer is already ahead (20 us against 30).
SMALL_BODY_BYTES = 1024
NUMBER_TYPES = {float, int}  # bool is neither: `type(True) is bool`
FLOAT32_MAX = float(np.finfo(np.float32).max)


# The book's shape of body: fields of plain values and one matrix of numbers. Decoding to this
# type checks in C that every entry of a matrix is a number (never a boolean, string or null,
# integers made floats as the other decoders make them), which is most of the small path's
# checking. A body of another shape (a batch, a list of steps or texts) fails it, and one with
# another list (an attention_mask, whose 1s must stay integers) is not taken from it: those are
# decoded untyped and checked in Python instead. The matrix's numbers are held to float32's range
# by the decoder too (a number beyond it fails the type, and the careful path locates it): in C,
# where min() and max() over the rows took ~3 us, as long as the rest of the decoding.
_float32_range = Annotated[float, msgspec.Meta(ge=-FLOAT32_MAX, le=FLOAT32_MAX)]
_book_shaped = msgspec.json.Decoder(
    dict[str, bool | int | float | str | list[list[_float32_range]] | dict[str, Any] | None]
)


def small_values(body: bytes | bytearray) -> dict[str, Any]:
    """The fields of a small body, decoded as the careful path decodes them (msgspec), or
    NotFast for anything the careful path must judge, so its messages stay the only ones."""
    try:
        values = _book_shaped.decode(body)
    except msgspec.ValidationError:
        values = None
    except (msgspec.MsgspecError, ValueError, RecursionError):  # ValueError: invalid UTF-8
        raise NotFast from None
    if values is not None and type(values.get("embeddings")) is list:
        matrix = values["embeddings"]
        del values["embeddings"]
        for value in values.values():  # a loop: a generator's frame costs more, per request
            if type(value) is list:
                break
        else:
            values["embeddings"] = small_float_rows(matrix)  # rows of floats, as decoded
            return values
    try:
        values = msgspec.json.decode(body)
    except (msgspec.MsgspecError, ValueError, RecursionError):
        raise NotFast from None
    if type(values) is not dict:
        raise NotFast
    if "embeddings" in values:
        values["embeddings"] = small_matrix(values["embeddings"])
    return values


def small_float_rows(rows: list[list[float]]) -> np.ndarray:
    """(T, d) from rows of Python floats within float32's range (as _book_shaped decodes them),
    or NotFast unless they make a non-empty box."""
    # Within float32's range, a float64 rounds to float32 as the other decoders' cast rounds it.
    matrix = float32_rows(rows)
    if matrix is None:
        raise NotFast  # ragged or empty: the careful path words it
    return matrix


def small_matrix(embeddings: Any) -> np.ndarray:
    """(T, d) or (B, T, d) from lists of numbers, or NotFast for anything but a full box."""
    if type(embeddings) is not list or not embeddings or type(embeddings[0]) is not list:
        raise NotFast
    rows = embeddings
    batch_shape: tuple[int, ...] = ()
    if embeddings[0] and type(embeddings[0][0]) is list:  # a batch of matrices
        if any(type(matrix) is not list for matrix in embeddings):
            raise NotFast
        if len({len(matrix) for matrix in embeddings}) != 1:
            raise NotFast  # ragged batch
        rows = [row for matrix in embeddings for row in matrix]
        batch_shape = (len(embeddings), len(embeddings[0]))
    if any(type(row) is not list for row in rows):
        raise NotFast
    if not {type(number) for row in rows for number in row} <= NUMBER_TYPES:
        raise NotFast
    try:
        # Through float64, as the other decoders go: an integer is rounded the same way.
        wide = np.array(rows, dtype=np.float64)
    except (ValueError, OverflowError):  # ragged rows, or an integer beyond float64
        raise NotFast from None
    # Within float32's range the cast cannot overflow (JSON has no inf or nan); beyond it the
    # careful path locates the number.
    if wide.ndim != 2 or 0 in wide.shape or not np.abs(wide).max() <= FLOAT32_MAX:
        raise NotFast
    matrix = wide.astype(np.float32)
    return matrix.reshape(*batch_shape, matrix.shape[1]) if batch_shape else matrix


@cache
def accepted_field_set(variant: Variant) -> frozenset[str]:
    return frozenset(accepted_fields(variant))


def careful_values(body: bytes | bytearray) -> dict[str, Any]:
    fields = decode_fields(body)
    values: dict[str, Any] = {}
    for name, fragment in fields.items():
        raw = bytes(fragment)
        if name == "embeddings" and raw.strip() != b"null":
            values[name] = decode_embeddings(raw)
        else:
            try:
                values[name] = msgspec.json.decode(raw)
            except (msgspec.MsgspecError, ValueError, RecursionError) as error:  # out of range,
                # invalid UTF-8, nested too deeply
                raise invalid((name,), f"{name}: {error}") from None
    return values


def parse_request(body: bytes | bytearray, variant: Variant) -> RequestBase:
    try:
        values = small_values(body) if len(body) <= SMALL_BODY_BYTES else fast_values(body)
    except NotFast:
        values = careful_values(body)
    if not values.keys() <= accepted_field_set(variant):
        accepted = accepted_fields(variant)
        raise RequestValidationError(
            [
                body_error(
                    (name,),
                    f"{name!r} does not apply to variant {variant.name!r}; it accepts: "
                    + ", ".join(accepted)
                    if name in ALL_PARAMETERS
                    else f"unknown field {name!r}; variant {variant.name!r} accepts: "
                    + ", ".join(accepted),
                    "extra_forbidden",
                )
                for name in values
                if name not in accepted
            ]
        )
    try:
        return request_model(variant).model_validate(values)
    except ValidationError as error:
        raise RequestValidationError(
            [
                body_error(e["loc"], e["msg"], e["type"], input=e.get("input"))
                for e in error.errors(include_url=False, include_context=False)
            ]
        ) from None
