"""Every bad input answers the right 4xx with a message a person can act on, never a 500.

422s keep FastAPI's `{"detail": [{"type", "loc", "msg", ...}]}` form; `loc` points into the body
(down to the matrix entry where one is at fault) and `msg` names what was expected and what came.
Limits are exercised on an app with tiny limits; their messages name the value, the limit and the
environment variable that raises it.
"""

import json
import re
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from attention import VARIANTS as REGISTRY
from service.main import create_app
from service.settings import Settings

VARIANTS = ("simplified", "self-attention", "causal", "multi-head")
ALL_VARIANTS = tuple(REGISTRY)
E = [[1.0, 2.0], [3.0, 4.0]]  # a valid 2 x 2 input
E4 = [[0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8]]  # d_in 4: fused multi-head's default fits
JSON = {"content-type": "application/json"}

LIMITS = {
    "max_tokens": 4,
    "max_dim": 4,
    "max_heads": 2,
    "max_batch_size": 2,
    "max_attention_floats": 100,
    "max_body_bytes": 2000,
    "max_text_chars": 50,
    "max_context_length": 64,
}
# Text parameters that fit LIMITS (the defaults, 256 and 1024, do not).
SMALL_TEXT = {"embedding_dim": 4, "context_length": 64}


# A JSON string, escapes included: what may hold spaces in a compact document.
JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')


def is_compact_json(body: bytes) -> bool:
    """No whitespace between the tokens, as FastAPI (and orjson) write JSON."""
    return not re.search(rb"\s", JSON_STRING.sub(b'""', body))


def errors_of(response: httpx.Response) -> list[dict[str, Any]]:
    """The 422's detail list, checked to be FastAPI's usual form, written compactly."""
    assert response.status_code == 422, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json")
    assert is_compact_json(response.content), response.text
    detail = response.json()["detail"]
    assert isinstance(detail, list) and detail, detail
    for error in detail:
        assert {"type", "loc", "msg"} <= error.keys(), error
        assert isinstance(error["msg"], str) and error["msg"], error
        assert isinstance(error["loc"], list) and error["loc"][0] == "body", error
    return detail


def only_error(response: httpx.Response) -> dict[str, Any]:
    detail = errors_of(response)
    assert len(detail) == 1, detail
    return detail[0]


def error_at(response: httpx.Response, loc: list[Any]) -> dict[str, Any]:
    """The error located at `loc`, which must be there."""
    detail = errors_of(response)
    found = [error for error in detail if error["loc"] == loc]
    assert found, f"no error at {loc}: {detail}"
    return found[0]


async def post_raw(client: httpx.AsyncClient, variant: str, body: bytes) -> httpx.Response:
    return await client.post(f"/attention/{variant}", content=body, headers=JSON)


def answering_client(app: FastAPI) -> httpx.AsyncClient:
    """Like conftest's clients, but a crash answers 500 as a server would instead of raising
    inside the test: a failure then shows the request and the 500 it got."""
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app, raise_app_exceptions=False),
        base_url="http://testserver",
    )


@pytest.fixture(scope="module")
async def client(app) -> AsyncIterator[httpx.AsyncClient]:
    """conftest's `client` over the same app, answering 500s (see `answering_client`)."""
    async with answering_client(app) as client:
        yield client


def small_client(**overrides: Any) -> httpx.AsyncClient:
    """`make_client(Settings(**LIMITS))`, answering 500s."""
    return answering_client(create_app(Settings(**{**LIMITS, **overrides})))


@pytest.fixture(scope="module")
async def limited() -> AsyncIterator[httpx.AsyncClient]:
    async with small_client() as client:
        yield client


# ---------------------------------------------------------------------------------------------
# Parameters that do not apply, unknown fields


@pytest.mark.parametrize(
    ("variant", "field", "value"),
    [
        ("self-attention", "dropout", 0.1),
        ("simplified", "dropout", 0.0),
        ("causal", "num_heads", 2),
        ("self-attention", "num_heads", 2),
        ("simplified", "d_out", 2),
        ("simplified", "seed", 1),
        ("simplified", "qkv_bias", False),
        ("simplified", "implementation", "v2"),
        ("causal", "implementation", "v1"),
    ],
)
async def test_a_parameter_that_does_not_apply_names_itself_and_the_variant(
    client, variant, field, value
):
    response = await client.post(f"/attention/{variant}", json={"embeddings": E, field: value})

    error = only_error(response)
    assert error["loc"] == ["body", field]
    assert repr(field) in error["msg"] or f"`{field}`" in error["msg"], error
    assert variant in error["msg"]
    assert "does not apply" in error["msg"] or "not accept" in error["msg"], error


async def test_simplified_names_every_parameter_it_does_not_take(client):
    response = await client.post(
        "/attention/simplified", json={"embeddings": E, "d_out": 2, "seed": 1}
    )

    detail = errors_of(response)
    assert sorted(tuple(error["loc"]) for error in detail) == [("body", "d_out"), ("body", "seed")]


async def test_an_unknown_field_is_named_with_what_the_variant_accepts(client):
    response = await client.post("/attention/causal", json={"embeddings": E, "temperature": 2})

    error = only_error(response)
    assert error["loc"] == ["body", "temperature"]
    assert "temperature" in error["msg"] and "unknown" in error["msg"]
    for accepted in ("embeddings", "text", "d_out", "seed", "dropout"):
        assert accepted in error["msg"], error


# ---------------------------------------------------------------------------------------------
# Content-Type: JSON or a 415

NATIVE_PATHS = [f"/attention/{name}" for name in ALL_VARIANTS] + ["/attention/compare"]


@pytest.mark.parametrize("path", NATIVE_PATHS)
@pytest.mark.parametrize(
    ("content_type", "detail"),
    [
        ("text/plain", "Content-Type 'text/plain' is not accepted: send application/json"),
        (
            "application/x-www-form-urlencoded",
            "Content-Type 'application/x-www-form-urlencoded' is not accepted: "
            "send application/json",
        ),
        (
            "application/jsonx",
            "Content-Type 'application/jsonx' is not accepted: send application/json",
        ),
        (
            "application/json; charset=latin-1",
            "charset 'latin-1' is not accepted: send application/json in UTF-8",
        ),
        (None, "the request has no Content-Type: send application/json"),
    ],
    ids=["text", "form", "jsonx", "latin-1", "none"],
)
async def test_a_body_that_is_not_labelled_json_is_a_415(client, path, content_type, detail):
    # A JSON body the endpoint would take: only its label is wrong.
    body = json.dumps({"embeddings": E4}).encode()
    headers = {} if content_type is None else {"content-type": content_type}

    response = await client.post(path, content=body, headers=headers)

    assert response.status_code == 415, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {"detail": detail}


@pytest.mark.parametrize(
    "content_type",
    [
        "application/json",
        "application/json; charset=utf-8",
        "application/json;charset=UTF-8",
        'application/json; charset="utf-8"',
        "Application/JSON",
    ],
)
async def test_json_with_or_without_a_utf8_charset_is_accepted(client, content_type):
    body = json.dumps({"embeddings": E4}).encode()

    for path in ("/attention/causal", "/attention/compare"):
        response = await client.post(path, content=body, headers={"content-type": content_type})
        assert response.status_code == 200, (path, response.text)


# ---------------------------------------------------------------------------------------------
# Malformed matrices


@pytest.mark.parametrize(
    ("embeddings", "row"),
    [
        ([[1, 2], [3]], "embeddings[1]"),
        ([[1, 2], [3, 4], [5, 6, 7]], "embeddings[2]"),
        ([[[1, 2], [3, 4]], [[1, 2], [3]]], "embeddings[1][1]"),
        ([[[1, 2], [3, 4]], [[1, 2]]], "embeddings[1]"),
    ],
    ids=["2d", "2d-longer", "3d-row", "3d-matrix"],
)
async def test_a_ragged_matrix_names_the_row(client, embeddings, row):
    response = await client.post("/attention/simplified", json={"embeddings": embeddings})

    error = only_error(response)
    assert error["loc"][:2] == ["body", "embeddings"]
    assert "rectangular" in error["msg"]
    assert f"{row} has" in error["msg"], error


@pytest.mark.parametrize(
    "embeddings",
    [[], [[]], [[[]]], [[], []], [[[]], [[]]]],
    ids=["[]", "[[]]", "[[[]]]", "2x0", "2x1x0"],
)
async def test_an_empty_matrix_is_refused(client, embeddings):
    response = await client.post("/attention/simplified", json={"embeddings": embeddings})

    error = only_error(response)
    assert error["loc"] == ["body", "embeddings"]
    assert "empty" in error["msg"] or "rows of numbers" in error["msg"], error


@pytest.mark.parametrize("raw", [b"[]", b"[ ]", b"[\n]"])
async def test_an_empty_list_is_named_empty_not_flat(client, raw):
    response = await post_raw(client, "causal", b'{"embeddings": ' + raw + b"}")

    error = only_error(response)
    assert error == {
        "type": "too_short",
        "loc": ["body", "embeddings"],
        "msg": "embeddings is an empty list: send at least one row of numbers (T x d_in)",
    }


async def test_a_flat_list_is_refused_as_such(client):
    response = await client.post("/attention/causal", json={"embeddings": [1, 2, 3]})

    error = only_error(response)
    assert error["loc"] == ["body", "embeddings"]
    assert "flat list" in error["msg"] and "T x d_in" in error["msg"], error


@pytest.mark.parametrize(
    "embeddings",
    ["[[1, 2]]", 5, {"rows": [[1, 2]]}, True],
    ids=["string", "number", "object", "bool"],
)
async def test_embeddings_that_are_not_a_list(client, embeddings):
    response = await client.post("/attention/causal", json={"embeddings": embeddings})

    error = only_error(response)
    assert error["loc"] == ["body", "embeddings"]
    assert "T x d_in" in error["msg"], error


@pytest.mark.parametrize(
    "embeddings", [[[[[1.0]]]], [[[[1.0, 2.0]], [[3.0, 4.0]]]]], ids=["1x1x1x1", "1x2x1x2"]
)
async def test_four_dimensional_nesting_is_refused(client, embeddings):
    response = await client.post("/attention/multi-head", json={"embeddings": embeddings})

    error = only_error(response)
    assert error["loc"][:2] == ["body", "embeddings"]
    assert "B x T x d_in" in error["msg"], error


@pytest.mark.parametrize(
    ("embeddings", "loc", "got"),
    [
        ([[1, "a"], [3, 4]], [0, 1], "str"),
        ([[1, 2], [True, 4]], [1, 0], "bool"),
        ([[1, 2], [3, None]], [1, 1], "null"),
        ([[[1, 2], [3, 4]], [[1, 2], ["x", 4]]], [1, 1, 0], "str"),
        ([[1, 2], [3, {"a": 1}]], [1, 1], "object"),
    ],
    ids=["string", "bool", "null", "batch-string", "object"],
)
async def test_a_non_number_in_the_matrix_is_located(client, embeddings, loc, got):
    response = await client.post("/attention/self-attention", json={"embeddings": embeddings})

    error = only_error(response)
    assert error["loc"] == ["body", "embeddings", *loc]
    assert "number" in error["msg"] and got in error["msg"], error


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity", b"nan", b"inf"])
async def test_nan_and_infinity_literals_are_invalid_json(client, literal):
    body = b'{"embeddings": [[1.0, 2.0], [3.0, ' + literal + b"]]}"
    response = await post_raw(client, "simplified", body)

    error = only_error(response)
    assert error["type"] == "json_invalid"
    assert error["loc"] == ["body"]
    assert error["msg"].endswith("; NaN and Infinity are not JSON: send finite numbers"), error


@pytest.mark.parametrize(
    "body",
    [b"a=1&b=2", b'{"embeddings": [[1, 2]]', b'{"embeddings": [[1, 2],]}', b'{"text": Hi}'],
    ids=["form", "unclosed", "trailing-comma", "bare-word"],
)
async def test_other_malformed_json_is_not_blamed_on_nan(client, body):
    response = await post_raw(client, "simplified", body)

    error = only_error(response)
    assert error["type"] == "json_invalid"
    assert error["msg"].startswith("the body is not valid JSON: "), error
    assert "NaN" not in error["msg"], error


@pytest.mark.parametrize(
    ("embeddings", "loc"),
    [
        (b"[[1, 2], [3, 1e39]]", [1, 1]),
        (b"[[1, 2], [-1e39, 4]]", [1, 0]),
        (b"[[[1, 2], [3, 4]], [[1, 2], [3e38, 4e38]]]", [1, 1, 1]),
    ],
    ids=["1e39", "-1e39", "batch-4e38"],
)
async def test_a_finite_json_number_that_overflows_float32_is_located(client, embeddings, loc):
    response = await post_raw(client, "simplified", b'{"embeddings": ' + embeddings + b"}")

    error = only_error(response)
    assert error["loc"] == ["body", "embeddings", *loc]
    assert "float32" in error["msg"] and "finite" in error["msg"], error


@pytest.mark.parametrize("number", [b"1e400", b"-1e400"])
async def test_a_number_beyond_float64_is_a_422(client, number):
    response = await post_raw(
        client, "simplified", b'{"embeddings": [[1, 2], [3, ' + number + b"]]}"
    )

    error = only_error(response)
    assert error["loc"][:2] == ["body", "embeddings"]
    assert "range" in error["msg"] or "finite" in error["msg"], error


async def test_an_integer_beyond_64_bits_in_the_matrix_is_a_422(client):
    response = await post_raw(
        client, "simplified", b'{"embeddings": [[1, 2], [3, 1' + b"0" * 40 + b"]]}"
    )

    error = only_error(response)
    assert error["loc"][:2] == ["body", "embeddings"]


# ---------------------------------------------------------------------------------------------
# Inputs: embeddings or text


@pytest.mark.parametrize("variant", VARIANTS)
async def test_both_inputs_are_refused(client, variant):
    response = await client.post(f"/attention/{variant}", json={"embeddings": E4, "text": "Hi"})

    error = only_error(response)
    assert "exactly one" in error["msg"] and "not both" in error["msg"], error


@pytest.mark.parametrize(
    "body", [{}, {"embeddings": None}, {"text": None}, {"return_weights": True}]
)
async def test_no_input_is_refused(client, body):
    response = await client.post("/attention/simplified", json=body)

    error = only_error(response)
    assert "embeddings" in error["msg"] and "text" in error["msg"], error


async def test_empty_text_is_refused(client):
    response = await client.post("/attention/simplified", json={"text": ""})

    error = only_error(response)
    assert error["loc"] == ["body", "text"]


@pytest.mark.parametrize(
    "escaped",
    [b"\\ud800", b"a\\ud800", b"\\udc00", b"\\udc00x\\ud800"],
    ids=["hi", "a-hi", "lo", "lo-hi"],
)
async def test_a_lone_surrogate_in_text_is_named_as_such(client, escaped):
    """Not "truncated" or "malformed" without a word on why: the person must find the escape."""
    response = await post_raw(client, "simplified", b'{"text": "' + escaped + b'"}')

    error = only_error(response)
    assert "surrogate" in error["msg"], error


async def test_text_longer_than_context_length_names_both_counts(client):
    sentence = "one two three four five six seven eight nine ten"  # 10 GPT-2 tokens
    response = await client.post(
        "/attention/causal", json={"text": sentence, "context_length": 4, "embedding_dim": 8}
    )

    error = only_error(response)
    assert error["loc"] == ["body", "text"]
    assert "10 tokens" in error["msg"] and "context_length" in error["msg"] and "4" in error["msg"]


@pytest.mark.parametrize(
    ("field", "value"), [("embedding_dim", 8), ("context_length", 16), ("embedding_seed", 1)]
)
async def test_text_parameters_with_embeddings_are_refused(client, field, value):
    response = await client.post("/attention/causal", json={"embeddings": E, field: value})

    error = only_error(response)
    assert error["loc"] == ["body", field]
    assert field in error["msg"] and "text" in error["msg"], error


# ---------------------------------------------------------------------------------------------
# Combinations a variant cannot run


async def test_fused_heads_must_divide_d_out(client):
    response = await client.post(
        "/attention/multi-head", json={"embeddings": E4, "d_out": 3, "num_heads": 2}
    )

    error = only_error(response)
    assert error["loc"] in (["body", "d_out"], ["body", "num_heads"], ["body"])
    assert "d_out" in error["msg"] and "num_heads" in error["msg"]
    assert "3" in error["msg"] and "2" in error["msg"]


async def test_the_wrapper_needs_no_divisibility(client):
    response = await client.post(
        "/attention/multi-head",
        json={"embeddings": E4, "d_out": 3, "num_heads": 2, "implementation": "wrapper"},
    )

    assert response.status_code == 200, response.text


async def test_v1_has_no_bias(client):
    response = await client.post(
        "/attention/self-attention",
        json={"embeddings": E, "implementation": "v1", "qkv_bias": True},
    )

    error = only_error(response)
    assert error["loc"] in (["body", "qkv_bias"], ["body", "implementation"])
    assert "qkv_bias" in error["msg"] and "v2" in error["msg"], error


@pytest.mark.parametrize(
    ("variant", "valid"), [("self-attention", ("v2", "v1")), ("multi-head", ("fused", "wrapper"))]
)
@pytest.mark.parametrize("implementation", ["v3", "", "V2", 2])
async def test_an_unknown_implementation_lists_the_valid_ones(
    client, variant, valid, implementation
):
    response = await client.post(
        f"/attention/{variant}", json={"embeddings": E4, "implementation": implementation}
    )

    error = only_error(response)
    assert error["loc"] == ["body", "implementation"]
    for name in valid:
        assert name in error["msg"], error


# ---------------------------------------------------------------------------------------------
# Types and ranges


@pytest.mark.parametrize(
    ("variant", "field", "value"),
    [
        ("causal", "seed", "1"),
        ("causal", "seed", 1.5),
        ("causal", "seed", True),
        ("causal", "seed", -1),
        ("causal", "seed", 2**64),
        ("causal", "seed", 10**30),
        ("causal", "dropout", "x"),
        ("causal", "dropout", 1.0),
        ("causal", "dropout", 1),
        ("causal", "dropout", -0.1),
        ("multi-head", "dropout", 1.5),
        ("simplified", "return_weights", 1),
        ("simplified", "return_weights", "true"),
        ("causal", "qkv_bias", 0),
        ("causal", "d_out", 0),
        ("causal", "d_out", -2),
        ("causal", "d_out", 2.5),
        ("multi-head", "num_heads", 1.5),
        ("multi-head", "num_heads", 0),
        ("multi-head", "num_heads", "2"),
        ("simplified", "decimals", 9),
        ("simplified", "decimals", -1),
        ("simplified", "decimals", 10**30),
        ("simplified", "text", 5),
        ("simplified", "text", []),
        ("simplified", "text", ["a", 5]),
        ("simplified", "text", ["a", ""]),
        ("simplified", "attention_mask", [[1, 2]]),
        ("simplified", "attention_mask", [[1, 0.5]]),
        ("simplified", "attention_mask", [["1"]]),
        ("simplified", "attention_mask", [1, 0]),
    ],
)
async def test_a_wrong_type_or_range_names_the_field(client, variant, field, value):
    body: dict[str, Any] = {field: value} if field == "text" else {"embeddings": E4, field: value}
    response = await client.post(f"/attention/{variant}", json=body)

    error = error_at(response, ["body", field])
    assert error["type"] != "value_error" or field in error["msg"], error


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (b"not json", "JSON"),
        (b'{"embeddings": [[1, 2]]', "JSON"),
        (b'{"embeddings": [[1, 2]]} trailing', "JSON"),
        (b"[1, 2, 3]", "object"),
        (b'"a string"', "object"),
        (b"null", "object"),
        (b"42", "object"),
        (b"", "empty"),
        (b"   ", "empty"),
    ],
    ids=["text", "unclosed", "trailing", "array", "string", "null", "number", "empty", "blank"],
)
async def test_a_body_that_is_not_a_json_object(client, body, words):
    response = await post_raw(client, "causal", body)

    error = only_error(response)
    assert error["loc"] == ["body"]
    assert words in error["msg"], error


async def test_an_unknown_variant_is_a_404_listing_the_valid_ones(client):
    response = await client.post("/attention/nope", json={"embeddings": E})

    assert response.status_code == 404
    detail = response.json()["detail"]
    assert "nope" in detail
    for name in VARIANTS:
        assert name in detail, detail


@pytest.mark.parametrize(
    ("variant", "body", "alone"),
    [
        ("causal", {"embeddings": E4, "text": None}, {"embeddings": E4}),
        (
            "causal",
            {"text": "Hi", "embeddings": None, "embedding_dim": 4},
            {"text": "Hi", "embedding_dim": 4},
        ),
        (
            "causal",
            {"text": "Hi", "attention_mask": None, "embedding_dim": 4},
            {"text": "Hi", "embedding_dim": 4},
        ),
        (
            "causal",
            {"embeddings": E4, "embedding_dim": None, "context_length": None},
            {"embeddings": E4},
        ),
        ("causal", {"embeddings": E4, "attention_mask": None}, {"embeddings": E4}),
        (
            "multi-head",
            {"embeddings": E4, "seed": None, "num_heads": None, "d_out": None},
            {"embeddings": E4},
        ),
        (
            "self-attention",
            {"embeddings": E4, "implementation": None, "qkv_bias": None},
            {"embeddings": E4},
        ),
        (
            "simplified",
            {"embeddings": E4, "return_weights": None, "decimals": None},
            {"embeddings": E4},
        ),
        ("latent", {"embeddings": E4, "latent_dim": None, "include": None}, {"embeddings": E4}),
        (
            "grouped-query",
            {"embeddings": E4, "num_kv_groups": None, "parameters": None},
            {"embeddings": E4},
        ),
    ],
    ids=[
        "text",
        "embeddings",
        "mask-with-text",
        "text-parameters",
        "mask",
        "defaults",
        "implementation",
        "return_weights",
        "latent",
        "groups",
    ],
)
async def test_a_null_is_the_field_left_out(client, variant, body, alone):
    """Every field of the variant may be null, as a client generated from the document (where
    each is optional) sends the ones it leaves unset."""
    with_nulls = await client.post(f"/attention/{variant}", json=body)
    without = await client.post(f"/attention/{variant}", json=alone)

    assert with_nulls.status_code == 200, with_nulls.text
    assert with_nulls.json() == without.json()


async def test_a_null_of_a_field_the_variant_does_not_take_is_still_refused(client):
    response = await client.post("/attention/simplified", json={"embeddings": E4, "seed": None})

    error = only_error(response)
    assert error["loc"] == ["body", "seed"] and error["type"] == "extra_forbidden", error


@pytest.mark.parametrize(
    ("variant", "fields", "resolved"),
    [
        ("causal", {"d_out": 2.0, "seed": 789.0}, {"d_out": 2, "seed": 789}),
        ("multi-head", {"num_heads": 1.0, "decimals": 3.0}, {"num_heads": 1, "decimals": 3}),
        ("grouped-query", {"d_out": 4.0, "num_kv_groups": 2.0}, {"num_kv_groups": 2}),
        ("latent", {"latent_dim": 2e0}, {"latent_dim": 2}),
        ("sliding-window", {"window_size": 3.0}, {"window_size": 3}),
    ],
)
async def test_a_whole_number_with_a_fraction_of_zeros_is_that_integer(
    client, variant, fields, resolved
):
    """JSON Schema's `integer` is any whole number, so the document admits 2.0: so does the
    service, as 2."""
    response = await client.post(f"/attention/{variant}", json={"embeddings": E4, **fields})

    assert response.status_code == 200, response.text
    config = response.json()["config"]
    for name, value in resolved.items():
        assert config[name] == value and type(config[name]) is int, (name, config)


async def test_a_text_parameter_as_a_whole_float_is_that_integer(client):
    response = await client.post(
        "/attention/simplified",
        json={"text": "Hi", "embedding_dim": 4.0, "context_length": 8.0, "embedding_seed": 1.0},
    )

    assert response.status_code == 200, response.text
    config = response.json()["config"]
    assert (config["embedding_dim"], config["context_length"], config["embedding_seed"]) == (
        4,
        8,
        1,
    )


async def test_a_mask_of_whole_floats_is_a_mask(client):
    batch = [E4, E4]
    with_floats = {"embeddings": batch, "attention_mask": [[1.0, 1.0], [1.0, 0.0]]}
    with_ints = {"embeddings": batch, "attention_mask": [[1, 1], [1, 0]]}

    floats = await client.post("/attention/causal", json=with_floats)
    ints = await client.post("/attention/causal", json=with_ints)

    assert floats.status_code == 200, floats.text
    assert floats.json() == ints.json()


# ---------------------------------------------------------------------------------------------
# Limits


TOKENS, TEXT_CHARS = "ATTENTION_MAX_TOKENS", "ATTENTION_MAX_TEXT_CHARS"


@pytest.mark.parametrize(
    ("variant", "body", "loc", "value", "limit", "variable"),
    [
        (
            "simplified",
            {"embeddings": [[1.0, 2.0]] * 5},
            "embeddings",
            5,
            4,
            "ATTENTION_MAX_TOKENS",
        ),
        ("causal", {"embeddings": [[1.0] * 5]}, "embeddings", 5, 4, "ATTENTION_MAX_DIM"),
        ("causal", {"embeddings": [[1.0, 2.0]], "d_out": 5}, "d_out", 5, 4, "ATTENTION_MAX_DIM"),
        (
            "multi-head",
            {"embeddings": [[1.0, 2.0]], "d_out": 3, "num_heads": 3},
            "num_heads",
            3,
            2,
            "ATTENTION_MAX_HEADS",
        ),
        (
            "multi-head",
            {"embeddings": [[1.0, 2.0]], "d_out": 3, "num_heads": 2, "implementation": "wrapper"},
            None,
            6,
            4,
            "ATTENTION_MAX_DIM",
        ),
        (
            "self-attention",
            {"embeddings": [[[1.0, 2.0]]] * 3},
            "embeddings",
            3,
            2,
            "ATTENTION_MAX_BATCH_SIZE",
        ),
        (
            "simplified",
            {"text": "a" * 51, **SMALL_TEXT},
            "text",
            51,
            50,
            "ATTENTION_MAX_TEXT_CHARS",
        ),
        (
            "simplified",
            {"text": "one two three four five", **SMALL_TEXT},
            "text",
            5,
            4,
            "ATTENTION_MAX_TOKENS",
        ),
        (
            "causal",
            {"text": "Hi", "embedding_dim": 5, "context_length": 64},
            "embedding_dim",
            5,
            4,
            "ATTENTION_MAX_DIM",
        ),
        (
            "causal",
            {"text": "Hi", "embedding_dim": 4, "context_length": 65},
            "context_length",
            65,
            64,
            "ATTENTION_MAX_CONTEXT_LENGTH",
        ),
    ],
    ids=[
        "tokens",
        "d_in",
        "d_out",
        "heads",
        "wrapper-width",
        "batch",
        "text-chars",
        "text-tokens",
        "embedding_dim",
        "context_length",
    ],
)
async def test_an_exceeded_limit_names_value_limit_and_variable(
    limited, variant, body, loc, value, limit, variable
):
    response = await limited.post(f"/attention/{variant}", json=body)

    detail = errors_of(response)
    named = [error for error in detail if variable in error["msg"]]
    assert named, detail
    error = named[0]
    if loc is not None:
        assert error["loc"] == ["body", loc]
    assert f"{value}" in error["msg"] and f"{limit}" in error["msg"], error


async def test_within_the_limits_is_a_200(limited):
    for variant, body in [
        ("multi-head", {"embeddings": [[[1.0, 2.0, 3.0, 4.0]] * 4] * 2, "num_heads": 2}),
        ("causal", {"text": "one two three four", **SMALL_TEXT}),
    ]:
        response = await limited.post(f"/attention/{variant}", json=body)
        assert response.status_code == 200, (variant, response.text)


async def test_the_default_text_parameters_beyond_the_limits_are_named(limited):
    """embedding_dim 256 and context_length 1024 by default: a small deployment says so."""
    response = await limited.post("/attention/simplified", json={"text": "Hi"})

    messages = " ".join(error["msg"] for error in errors_of(response))
    assert "embedding_dim" in messages and "ATTENTION_MAX_DIM" in messages
    assert "context_length" in messages and "ATTENTION_MAX_CONTEXT_LENGTH" in messages


def oversized_body() -> bytes:
    body = b'{"embeddings": [[1.0, 2.0]], "text": "' + b"x" * 2500 + b'"}'
    assert len(body) > LIMITS["max_body_bytes"]
    return body


async def test_a_body_over_the_byte_limit_is_a_413_naming_limit_and_variable(limited):
    response = await post_raw(limited, "simplified", oversized_body())

    assert response.status_code == 413, response.text
    detail = response.json()["detail"]
    text = detail if isinstance(detail, str) else str(detail)
    assert "2000" in text and "ATTENTION_MAX_BODY_BYTES" in text


async def test_a_body_over_the_byte_limit_names_its_size(limited):
    """The declared Content-Length is known: the refusal says how large the body was."""
    body = oversized_body()
    response = await post_raw(limited, "simplified", body)

    assert response.status_code == 413
    assert str(len(body)) in str(response.json()["detail"]), response.json()


async def test_a_streamed_body_over_the_byte_limit_is_a_413(limited):
    """No Content-Length (chunked): the limit holds while reading."""

    async def chunks() -> AsyncIterator[bytes]:
        body = oversized_body()
        for start in range(0, len(body), 500):
            yield body[start : start + 500]

    response = await limited.post("/attention/simplified", content=chunks(), headers=JSON)

    assert response.status_code == 413, response.text
    assert "ATTENTION_MAX_BODY_BYTES" in str(response.json()["detail"])


# With the limits above, batch 2 x heads 2 x 4 x 4 = 64 floats never exceeds 100; a smaller
# max_attention_floats makes that request too large for its weights.
FLOATS_LIMIT = 40
FOUR_BY_FOUR_BATCH = [[[0.1, 0.2, 0.3, 0.4]] * 4] * 2


@pytest.mark.parametrize(
    ("extra", "status"),
    [
        ({}, 422),
        ({"return_weights": False}, 200),
        ({"return_weights": False, "dropout": 0.1}, 422),
        ({"return_weights": False, "implementation": "wrapper", "d_out": 2}, 200),
    ],
    ids=["weights", "fused-path", "dropout-needs-weights", "wrapper-no-weights"],
)
async def test_max_attention_floats_binds_only_when_the_weights_are_held(extra, status):
    async with small_client(max_attention_floats=FLOATS_LIMIT) as c:
        response = await c.post(
            "/attention/multi-head",
            json={"embeddings": FOUR_BY_FOUR_BATCH, "num_heads": 2, **extra},
        )

    if status == 200:
        assert response.status_code == 200, response.text
        assert "attention_weights" not in response.json()
        return
    messages = [error["msg"] for error in errors_of(response)]
    floats = [m for m in messages if "ATTENTION_MAX_ATTENTION_FLOATS" in m]
    assert floats, messages
    assert "64" in floats[0] and str(FLOATS_LIMIT) in floats[0]
    assert "return_weights" in floats[0], "the message says how to escape the limit"


# ---------------------------------------------------------------------------------------------
# No 500, whatever comes

DEEP = 5000
ODD_BODIES: dict[str, bytes] = {
    "deep-embeddings": b'{"embeddings": ' + b"[" * DEEP + b"]" * DEEP + b"}",
    "deep-unclosed": b'{"embeddings": ' + b"[" * DEEP,
    "deep-in-seed": b'{"embeddings": [[1, 2]], "seed": ' + b"[" * DEEP + b"]" * DEEP + b"}",
    "deep-objects": b'{"seed": ' + b'{"a": ' * 2000 + b"1" + b"}" * 2000 + b"}",
    "huge-int-matrix": b'{"embeddings": [[1' + b"0" * 400 + b", 2]]}",
    "huge-int-seed": b'{"embeddings": [[1, 2]], "seed": 1' + b"0" * 30 + b"}",
    "2**64-seed": b'{"embeddings": [[1, 2]], "seed": 18446744073709551616}',
    "negative-huge-seed": b'{"embeddings": [[1, 2]], "seed": -1' + b"0" * 30 + b"}",
    "huge-int-decimals": b'{"embeddings": [[1, 2]], "decimals": 1' + b"0" * 25 + b"}",
    "huge-int-d_out": b'{"embeddings": [[1, 2]], "d_out": 1' + b"0" * 25 + b"}",
    "huge-int-num_heads": b'{"embeddings": [[1, 2]], "num_heads": 1' + b"0" * 25 + b"}",
    "huge-int-dropout": b'{"embeddings": [[1, 2]], "dropout": 1' + b"0" * 25 + b"}",
    "huge-embedding_dim": b'{"text": "Hi", "embedding_dim": 1' + b"0" * 25 + b"}",
    "huge-context_length": b'{"text": "Hi", "context_length": 1' + b"0" * 25 + b"}",
    "huge-embedding_seed": b'{"text": "Hi", "embedding_seed": 1' + b"0" * 25 + b"}",
    "long-decimal": b'{"embeddings": [[1.' + b"0" * 10000 + b"1, 2]]}",
    "long-tiny": b'{"embeddings": [[0.' + b"0" * 5000 + b"1, 2]]}",
    "long-exponent": b'{"embeddings": [[1e' + b"9" * 500 + b", 2]]}",
    "underflow": b'{"embeddings": [[1e-400, 2]]}',
    "negative-zero": b'{"embeddings": [[-0, -0.0], [0, 0e0]]}',
    "mixed-depth": b'{"embeddings": [[[1, 2]], [3, 4]]}',
    "row-in-row": b'{"embeddings": [[1, [2]]]}',
    "embeddings-object": b'{"embeddings": {"a": 1}}',
    "embeddings-string": b'{"embeddings": "[[1, 2]]"}',
    "embeddings-number": b'{"embeddings": 5}',
    "lone-surrogate": b'{"text": "\\ud800"}',
    "lone-low-surrogate": b'{"text": "a\\udc00b"}',
    "surrogate-pair": b'{"text": "\\ud83d\\ude00"}',
    "surrogate-key": b'{"\\ud800": 1, "embeddings": [[1, 2]]}',
    "endoftext-only": b'{"text": "<|endoftext|>"}',
    "endoftext-thrice": b'{"text": "<|endoftext|><|endoftext|><|endoftext|>"}',
    "almost-special": b'{"text": "<|endoftext"}',
    "other-special": b'{"text": "<|fim_prefix|>"}',
    "emoji": '{"text": "😀👍🏽👨‍👩‍👧 日本語 ✓"}'.encode(),
    "whitespace-only": b'{"text": " \\t\\n "}',
    "nul-char": b'{"text": "a\\u0000b"}',
    "invalid-utf8": b'{"text": "\xff\xfe"}',
    "bom": b'\xef\xbb\xbf{"embeddings": [[1, 2]]}',
    "duplicate-keys": b'{"embeddings": [[1, 2]], "embeddings": [[1, 2, 3]]}',
    "empty-key": b'{"": 1, "embeddings": [[1, 2]]}',
    "long-text-over-context": ('{"text": "' + "word " * 1500 + '"}').encode(),
}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", list(ODD_BODIES))
async def test_no_body_makes_a_500(client, variant, name):
    response = await post_raw(client, variant, ODD_BODIES[name])

    assert response.status_code < 500, (variant, name, response.status_code, response.text)
    if response.status_code == 422:
        errors_of(response)  # and in the usual form


@pytest.mark.parametrize("variant", ["simplified", "causal", "multi-head", "latent"])
async def test_inputs_so_large_the_computation_overflows_are_a_422(client, variant):
    """Each input is a finite float32, yet their scores are beyond float32: the answer would be
    NaN, written null, the mark of padding. Refused, naming the input."""
    body = {"embeddings": [[1e20, 1e20], [1e19, -1e20]]}
    if variant != "simplified":
        body["d_out"] = 2

    response = await client.post(f"/attention/{variant}", json=body)

    assert response.status_code == 422, response.text
    [error] = response.json()["detail"]
    assert error["loc"] == ["body", "embeddings"]
    assert error["msg"].startswith("the computation overflowed float32")


async def test_padding_is_not_an_overflow(client):
    """A padded position's numbers are null by design; a huge padded row computes nothing."""
    body = {
        "embeddings": [[[1e20, 1e20], [1.0, 2.0]], [[1.0, 2.0], [3.0, 1.0]]],
        "attention_mask": [[0, 1], [1, 1]],
    }

    response = await client.post("/attention/causal", json=body)

    assert response.status_code == 200, response.text
    assert response.json()["context_vectors"][0][0] == [None, None]
