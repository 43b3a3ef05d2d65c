"""The fast decoders (simdjson for large bodies, msgspec with type checks for small ones) and the
careful one (msgspec) agree on every body they take, and the fast ones decline every shape they
could misread."""

import numpy as np
import orjson
import pytest

from service.parsing import (
    COUNT_CHUNK_BYTES,
    OPEN,
    SMALL_BODY_BYTES,
    NotFast,
    careful_values,
    count_byte,
    fast_values,
    small_values,
)


@pytest.mark.parametrize("case", range(100))
def test_fast_and_careful_decoders_agree_on_valid_bodies(case):
    rng = np.random.default_rng(case)
    shape = tuple(int(size) for size in rng.integers(1, 7, size=rng.integers(2, 4)))
    matrix = rng.standard_normal(shape).astype(np.float32) * float(10.0 ** rng.integers(-6, 6))
    body = orjson.dumps({"embeddings": matrix.tolist(), "seed": case, "qkv_bias": True})

    fast, careful = fast_values(body), careful_values(body)

    assert fast["embeddings"].dtype == np.float32
    assert fast["embeddings"].shape == shape
    np.testing.assert_array_equal(fast["embeddings"], matrix)
    np.testing.assert_array_equal(careful["embeddings"], matrix)
    assert {k: v for k, v in fast.items() if k != "embeddings"} == {"seed": case, "qkv_bias": True}
    assert fast.keys() == careful.keys()


def test_the_fast_decoder_takes_a_batch_with_its_attention_mask():
    matrix = np.arange(12, dtype=np.float32).reshape(2, 3, 2)
    mask = [[1, 1, 1], [1, 0, 0]]
    body = orjson.dumps(
        {"attention_mask": mask, "embeddings": matrix.tolist(), "include": ["keys"]}
    )

    fast, careful = fast_values(body), careful_values(body)

    np.testing.assert_array_equal(fast["embeddings"], matrix)
    assert fast["attention_mask"] == careful["attention_mask"] == mask
    assert fast["include"] == ["keys"]


@pytest.mark.parametrize(
    "body",
    [
        b'{"embeddings": [[1, [2]]]}',  # as_buffer would flatten this to [[1, 2]]
        b'{"embeddings": [[1, 2], [3]]}',
        b'{"embeddings": [[[1, 2]], [[3, 4], [5, 6]]]}',
        b'{"embeddings": [[[1, 2]], [3, 4]]}',
        b'{"embeddings": [[1, true]]}',
        b'{"embeddings": [[1, null]]}',
        b'{"embeddings": [["1", 2]]}',
        b'{"embeddings": [[]]}',
        b'{"embeddings": []}',
        b'{"embeddings": [1, 2]}',
        b'{"embeddings": [[1, NaN]]}',
        b"[1, 2]",
        # The other lists' brackets are counted, so they cannot hide a nested one:
        b'{"embeddings": [[[1, [2]]]], "attention_mask": [[1]]}',
        b'{"attention_mask": [[1]], "embeddings": [[[1, [2]]]]}',
        b'{"embeddings": [[1, [2]]], "include": ["queries"]}',
    ],
)
def test_fast_decoders_decline_what_they_could_misread(body):
    with pytest.raises(NotFast):
        fast_values(body)
    with pytest.raises(NotFast):
        fast_values(bytearray(body))  # as a large body arrives
    with pytest.raises(NotFast):
        small_values(body)


@pytest.mark.parametrize("kind", [bytes, bytearray])
def test_the_chunked_bracket_count_counts_as_python_does(kind):
    rng = np.random.default_rng(0)
    # Bytes drawn mostly from JSON's own characters, so that `[` is common and at the edges.
    alphabet = np.frombuffer(b"[[]],0123456789.e-", np.uint8)
    chunk = COUNT_CHUNK_BYTES
    for size in (0, 1, 2, 31, 32, 33, 1000, chunk - 1, chunk, chunk + 1, 2 * chunk + 7):
        body = kind(rng.choice(alphabet, size).tobytes())
        assert count_byte(np.frombuffer(body, np.uint8), OPEN) == body.count(b"[")
    everything = kind(bytes(range(256)) * 3)
    assert count_byte(np.frombuffer(everything, np.uint8), OPEN) == 3


@pytest.mark.parametrize(
    "body",
    [b'{"embeddings": [[1, 2]], "include": ["[queries"]}', b'{"embeddings": [[1, 2]], "[": 1}'],
)
def test_a_bracket_in_a_string_sends_simdjson_to_the_careful_path(body):
    """simdjson's rows are proved by counting `[`; one it cannot account for means doubt."""
    with pytest.raises(NotFast):
        fast_values(body)
    small, careful = small_values(body), careful_values(body)  # msgspec reads it exactly
    np.testing.assert_array_equal(small.pop("embeddings"), careful.pop("embeddings"))
    assert small == careful


@pytest.mark.parametrize("case", range(100))
def test_small_and_careful_decoders_agree_on_valid_bodies(case):
    rng = np.random.default_rng(case)
    shape = tuple(int(size) for size in rng.integers(1, 4, size=rng.integers(2, 4)))
    matrix = rng.standard_normal(shape).astype(np.float32) * float(10.0 ** rng.integers(-6, 6))
    fields = {"embeddings": matrix.tolist(), "seed": case, "qkv_bias": True, "include": ["keys"]}
    if case % 3 == 0:  # integers in the matrix, as a client may send them
        fields["embeddings"] = np.round(matrix).astype(int).tolist()
    if case % 2 == 0:  # the book's shape of body, which the small path decodes typed
        del fields["include"]
    body = orjson.dumps(fields)
    assert len(body) <= SMALL_BODY_BYTES

    small, careful = small_values(body), careful_values(body)

    assert small["embeddings"].dtype == np.float32
    np.testing.assert_array_equal(small["embeddings"], careful["embeddings"])
    assert {k: v for k, v in small.items() if k != "embeddings"} == {
        k: v for k, v in careful.items() if k != "embeddings"
    }


@pytest.mark.parametrize(
    "body",
    [
        b'{"embeddings": [[1, 2]], "seed": 18446744073709551616}',  # beyond 64 bits: an int
        b'{"embeddings": [[1, 2]], "text": "\\u00e9"}',
        b'{"embeddings": [[1, 2]], "attention_mask": [[1, 0]]}',  # integers stay integers
        b'{"attention_mask": [[1, true]], "embeddings": [[1, 2]], "parameters": {"W": [[1]]}}',
    ],
)
def test_the_small_decoder_keeps_other_fields_as_the_careful_one_does(body):
    small, careful = small_values(body), careful_values(body)
    small_fields = {k: v for k, v in small.items() if k != "embeddings"}
    assert small_fields == {k: v for k, v in careful.items() if k != "embeddings"}
    assert repr(small_fields) == repr({k: v for k, v in careful.items() if k != "embeddings"})


@pytest.mark.parametrize(
    "body",
    [
        b'{"embeddings": [[3.5e38, 1]]}',  # beyond float32: the careful path words it
        b'{"embeddings": [[3.5e38, 1.0]]}',  # the same, all floats (cast straight to float32)
        b'{"embeddings": [[-1.0, -3.5e38]]}',
        b'{"embeddings": [[1e400, 1]]}',
        b'{"embeddings": [[1, 2]], "text": "\xff"}',
        b'{"embeddings": [[1' + b"0" * 400 + b", 2]]}",
    ],
)
def test_the_small_decoder_declines_what_the_careful_one_must_word(body):
    with pytest.raises(NotFast):
        small_values(body)


@pytest.mark.parametrize(
    "rows",
    [
        [[3.4028234e38, -3.4e38, 1e-45, 1e-46]],  # float32's edges, rounded as float64 is
        [[16777217, 0.5], [2**60 + 1, -3]],  # integers beyond float32's 24 bits, among floats
        [[0.1, 1 / 3], [2.5e-38, 123456789.123456789]],
    ],
)
def test_small_and_careful_decoders_round_to_the_same_float32(rows):
    body = orjson.dumps({"embeddings": rows})
    small, careful = small_values(body)["embeddings"], careful_values(body)["embeddings"]
    assert small.dtype == careful.dtype == np.float32
    assert small.tobytes() == careful.tobytes()
    assert small.tobytes() == np.array(rows, dtype=np.float64).astype(np.float32).tobytes()


def test_the_fast_decoder_reuses_one_parser_and_threads_never_share_it():
    from concurrent.futures import ThreadPoolExecutor

    from service import parsing

    bodies = [
        orjson.dumps({"embeddings": np.full((50 + index, 8), index, np.float32).tolist()})
        for index in range(16)
    ]
    fast_values(bodies[0])
    (kept,) = parsing._idle_parsers
    fast_values(bodies[1])
    assert parsing._idle_parsers == [kept]  # the same parser, not a new one per body

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(fast_values, bodies * 8))
    for index, values in enumerate(results):
        body_index = index % len(bodies)
        assert values["embeddings"].shape == (50 + body_index, 8)
        assert (values["embeddings"] == body_index).all()
    assert len(parsing._idle_parsers) == 1


def test_a_body_the_fast_decoder_declines_leaves_no_parser_in_use():
    from service import parsing

    with pytest.raises(NotFast):
        fast_values(b'{"embeddings": [[1, [2]]]}')  # a nested list: the careful path's to word
    values = fast_values(orjson.dumps({"embeddings": [[1.0, 2.0]]}))
    np.testing.assert_array_equal(values["embeddings"], [[1.0, 2.0]])
    assert len(parsing._idle_parsers) == 1
