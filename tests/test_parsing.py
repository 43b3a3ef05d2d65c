"""The fast decoder (simdjson) and the careful one (msgspec) agree on every body they both take,
and the fast one declines every shape it could misread."""

import numpy as np
import orjson
import pytest

from service.parsing import NotFast, careful_values, fast_values


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
        b'{"embeddings": [[1, 2]], "include": ["[queries"]}',  # a `[` inside a string
        b'{"embeddings": [[1, 2]], "[": 1}',
    ],
)
def test_fast_decoder_declines_what_it_could_misread(body):
    with pytest.raises(NotFast):
        fast_values(body)
