"""An answer's JSON in parts, so that a large one is sent while the rest is still being written.

`orjson.dumps` of a 4096 x 768 answer takes ~120-180 ms on a 2-vCPU VM and makes one 37 MB
bytes object, which the server then holds until the last byte is sent. Written a block of rows
at a time, the first parts are on the wire while the next are serialised, and only a few MB of
JSON exist at once. The parts join to exactly the bytes `orjson.dumps` writes (tests hold them
to it): an array's JSON is `[` + its rows' JSON joined by `,` + `]`, whatever the block each row
is written in.
"""

import secrets
from collections.abc import Iterator
from typing import Any

import numpy as np
import orjson

OPTIONS = orjson.OPT_SERIALIZE_NUMPY
# Answers above this many numbers (~10 MB of JSON) are sent as they are serialised.
STREAMED_ANSWER_FLOATS = 1_000_000
# Numbers per part: ~2.5 MB of JSON, a few ms of serialising, against ~0.1 ms to hand each part
# from the worker thread to the event loop.
PART_FLOATS = 256 * 1024


def dumps_or_parts(payload: dict[str, Any], floats: int) -> bytes | Iterator[bytes]:
    """The payload's JSON bytes, or for one of more than STREAMED_ANSWER_FLOATS numbers the
    same bytes as parts, serialised as they are taken."""
    if floats > STREAMED_ANSWER_FLOATS:
        return dumps_in_parts(payload)
    return orjson.dumps(payload, option=OPTIONS)


def dumps_in_parts(payload: dict[str, Any]) -> Iterator[bytes]:
    """The bytes of `orjson.dumps(payload, OPT_SERIALIZE_NUMPY)`, in parts; each numpy array of
    more than PART_FLOATS numbers is written PART_FLOATS numbers at a time."""
    # Each large array is swapped for a string no answer otherwise holds (a fresh random token),
    # the rest written in one call, and the arrays' parts put where their strings landed.
    token = secrets.token_hex(16)
    arrays: list[np.ndarray] = []
    skeleton = orjson.dumps(with_placeholders(payload, token, arrays), option=OPTIONS)
    position = 0
    for index, array in enumerate(arrays):
        marker = f'"{token}:{index}"'.encode()
        start = skeleton.index(marker, position)
        yield skeleton[position:start]
        yield from array_parts(array)
        position = start + len(marker)
    yield skeleton[position:]


def with_placeholders(value: Any, token: str, arrays: list[np.ndarray]) -> Any:
    """`value` with each large array appended to `arrays` and swapped for `token:<index>`.

    A plain function, not a closure: a closure that calls itself is a reference cycle, which
    kept the answer's arrays (and the tensors under them, 12.6 MB for the long case) alive
    after the answer was sent, until Python's cycle collector happened to run.
    """
    if isinstance(value, dict):
        return {key: with_placeholders(item, token, arrays) for key, item in value.items()}
    if isinstance(value, list):
        return [with_placeholders(item, token, arrays) for item in value]
    if isinstance(value, np.ndarray) and value.size > PART_FLOATS:
        arrays.append(value)
        return f"{token}:{len(arrays) - 1}"
    return value


def array_parts(array: np.ndarray) -> Iterator[bytes]:
    """`orjson.dumps(array)`, a block along the first axis at a time. An entry larger than a
    part (the one batch entry of a (1, H, T, T) array of weights, say) is itself written in
    parts, between the brackets and commas that place it."""
    if array.ndim == 1 or array.size <= PART_FLOATS:
        yield orjson.dumps(array, option=OPTIONS)
        return
    rows = len(array)
    row_floats = array.size // rows
    if row_floats > PART_FLOATS and array.ndim > 2:
        for index in range(rows):
            opening = b"[" if index == 0 else b","
            closing = b"]" if index == rows - 1 else b""
            yield from enclosed(array_parts(array[index]), opening, closing)
        return
    step = max(1, PART_FLOATS // row_floats)
    for start in range(0, rows, step):
        block = orjson.dumps(array[start : start + step], option=OPTIONS)  # (step, ...)
        # `[r1,r2]` + `[r3]` -> `[r1,r2,r3]`: the block's own brackets become the array's or a
        # separating comma.
        opening = b"[" if start == 0 else b","
        closing = b"]" if start + step >= rows else b""
        yield opening + block[1:-1] + closing


def enclosed(parts: Iterator[bytes], opening: bytes, closing: bytes) -> Iterator[bytes]:
    """The parts with `opening` before the first and `closing` after the last."""
    part = opening + next(parts)
    for following in parts:
        yield part
        part = following
    yield part + closing
