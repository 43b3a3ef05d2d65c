"""Properties every variant of the registry must have, on random inputs.

Weights are distributions, causal weights see no future, shapes follow the contract, the config
reports what ran, rounding rounds, and an answer depends on its request alone.
"""

import asyncio
from typing import Any

import numpy as np
import pytest
import torch

from attention import VARIANTS
from tests import contract
from tests.contract import CAUSAL, MULTI_HEAD, WINDOW

DROPOUT = {name for name, variant in VARIANTS.items() if "dropout" in variant.parameters}

IMPLEMENTATIONS = [
    (name, implementation)
    for name, variant in VARIANTS.items()
    for implementation in (variant.implementation_names or [None])
]


def case_id(variant: str, implementation: str | None) -> str:
    return f"{variant}:{implementation}" if implementation else variant


IDS = [case_id(*case) for case in IMPLEMENTATIONS]
each_implementation = pytest.mark.parametrize(
    ("variant", "implementation"), IMPLEMENTATIONS, ids=IDS
)


def random_inputs(shape: tuple[int, ...], seed: int = 0) -> list[Any]:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)).tolist()


def request(
    variant: str, implementation: str | None, embeddings: list[Any], **params: Any
) -> dict[str, Any]:
    body: dict[str, Any] = {"embeddings": embeddings, **params}
    if implementation is not None:
        body["implementation"] = implementation
    return body


async def post(client, variant: str, body: dict[str, Any]) -> dict[str, Any]:
    response = await client.post(f"/attention/{variant}", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def test_the_registry_has_the_variants_of_the_contract():
    assert list(VARIANTS) == list(contract.VARIANTS)
    assert DROPOUT == CAUSAL
    assert {name for name, variant in VARIANTS.items() if variant.multi_head} == MULTI_HEAD
    assert VARIANTS["self-attention"].implementation_names == ["v2", "v1"]
    assert VARIANTS["multi-head"].implementation_names == ["fused", "wrapper"]


# --- weights -----------------------------------------------------------------------------------


@each_implementation
@pytest.mark.parametrize("shape", [(5, 6), (2, 6, 4)], ids=["2d", "batch"])
async def test_weight_rows_sum_to_one(client, variant, implementation, shape):
    body = await post(client, variant, request(variant, implementation, random_inputs(shape, 1)))
    weights = np.asarray(body["attention_weights"])
    assert weights.shape[-1] == weights.shape[-2] == shape[-2]
    assert (weights >= 0).all()
    np.testing.assert_allclose(weights.sum(axis=-1), 1.0, rtol=0, atol=1e-5)


MASK_CASES = [
    (variant, implementation, dropout)
    for variant, implementation in IMPLEMENTATIONS
    for dropout in ([0.0, 0.5] if variant in DROPOUT else [0.0])
]


@pytest.mark.parametrize(
    ("variant", "implementation", "dropout"),
    MASK_CASES,
    ids=[f"{case_id(v, i)}-dropout{dropout}" for v, i, dropout in MASK_CASES],
)
async def test_causal_weights_see_no_future(client, variant, implementation, dropout):
    params = {"dropout": dropout} if dropout else {}
    embeddings = random_inputs((2, 7, 4), 2)
    body = await post(client, variant, request(variant, implementation, embeddings, **params))
    weights = np.asarray(body["attention_weights"])
    upper = weights[..., *np.triu_indices(7, k=1)]
    if variant in CAUSAL:
        assert (upper == 0.0).all(), f"weights above the diagonal: {upper[upper != 0]}"
        # Below the diagonal, without dropout, every earlier token has some weight (within the
        # window, for sliding-window attention, and none beyond it).
        lower = np.tril_indices(7)
        if variant == "sliding-window":
            within = lower[0] - lower[1] < WINDOW
            beyond = weights[..., lower[0][~within], lower[1][~within]]
            assert (beyond == 0.0).all(), "a key beyond the window got weight"
            lower = (lower[0][within], lower[1][within])
        if not dropout:
            assert (weights[..., *lower] > 0).all()
    else:
        assert (upper > 0.0).all(), f"{variant} is not causal, yet weights above it are 0"


# --- shapes ------------------------------------------------------------------------------------


def expected_shapes(
    variant: str, implementation: str | None, shape: tuple[int, ...], d_out: int, heads: int
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(weights shape, context shape) per the contract."""
    *batch, num_tokens, _ = shape
    weights = (heads, num_tokens, num_tokens) if variant in MULTI_HEAD else (num_tokens,) * 2
    width = d_out * heads if implementation == "wrapper" else d_out
    return (*batch, *weights), (*batch, num_tokens, width)


@each_implementation
@pytest.mark.parametrize("shape", [(5, 7), (3, 4, 6), (1, 1, 3), (1, 2)], ids=str)
async def test_shapes(client, variant, implementation, shape):
    params: dict[str, Any] = {}
    d_out = shape[-1]  # simplified: always d_in
    heads = 3
    if variant != "simplified":
        d_out = 6 if shape[-1] != 6 else 9  # differs from d_in, divisible by 3 heads
        params["d_out"] = d_out
    if variant in MULTI_HEAD:
        params["num_heads"] = heads
    body = await post(
        client, variant, request(variant, implementation, random_inputs(shape, 3), **params)
    )
    weights_shape, context_shape = expected_shapes(variant, implementation, shape, d_out, heads)
    assert np.asarray(body["attention_weights"]).shape == weights_shape
    assert np.asarray(body["context_vectors"]).shape == context_shape
    assert body["variant"] == variant


@each_implementation
async def test_two_dimensional_input_has_no_batch_axis(client, variant, implementation):
    embeddings = random_inputs((4, 6), 4)
    single = await post(client, variant, request(variant, implementation, embeddings))
    batch = await post(client, variant, request(variant, implementation, [embeddings]))
    heads = (2,) if variant in MULTI_HEAD else ()  # the default num_heads
    width = 6 * 2 if implementation == "wrapper" else 6
    assert np.asarray(single["attention_weights"]).shape == (*heads, 4, 4)
    assert np.asarray(single["context_vectors"]).shape == (4, width)
    assert np.asarray(batch["attention_weights"]).shape == (1, *heads, 4, 4)
    assert np.asarray(batch["context_vectors"]).shape == (1, 4, width)
    # The one-item batch is the same computation.
    for key in ("attention_weights", "context_vectors"):
        np.testing.assert_allclose(
            np.asarray(batch[key])[0], np.asarray(single[key]), rtol=0, atol=1e-6
        )


@each_implementation
async def test_identical_batch_items_give_identical_outputs(client, variant, implementation):
    item = random_inputs((6, 4), 5)
    body = await post(client, variant, request(variant, implementation, [item, item]))
    single = await post(client, variant, request(variant, implementation, item))
    for key in ("attention_weights", "context_vectors"):
        first, second = np.asarray(body[key])
        assert first.shape == second.shape == np.asarray(single[key]).shape
        # Equal up to float32 rounding: batched matmuls, the book's classes' too, may sum a
        # row in another order by its place in the batch (differences of ~1e-8).
        np.testing.assert_allclose(first, second, rtol=0, atol=1e-6, err_msg=key)
        np.testing.assert_allclose(first, single[key], rtol=0, atol=1e-6, err_msg=key)


# --- config ------------------------------------------------------------------------------------


def expected_config(variant: str, d_in: int, sent: dict[str, Any]) -> dict[str, Any]:
    """The resolved parameters of a request that sent `sent`: defaults for the rest."""
    registered = VARIANTS[variant]
    weighted = variant != "simplified"
    d_out = sent.get("d_out", d_in) if weighted else d_in
    num_heads = sent.get("num_heads", 2) if variant in MULTI_HEAD else 1
    implementation = sent.get("implementation", registered.default_implementation)
    return {
        "d_in": d_in,
        "d_out": d_out,
        "num_heads": num_heads,
        "head_dim": d_out if implementation == "wrapper" else d_out // num_heads,
        "seed": sent.get("seed", 123) if weighted else None,
        "dropout": sent.get("dropout", 0.0),
        "qkv_bias": sent.get("qkv_bias", False),
        "implementation": implementation,
    }


@pytest.mark.parametrize("variant", list(VARIANTS))
async def test_config_resolves_the_defaults(client, variant):
    body = {"embeddings": random_inputs((4, 6), 6)}  # no implementation: the default one
    config = (await post(client, variant, body))["config"]
    expected = expected_config(variant, 6, {})
    assert {key: config[key] for key in expected} == expected
    assert config["implementation"] == VARIANTS[variant].default_implementation


@each_implementation
async def test_config_reports_the_parameters_sent(client, variant, implementation):
    accepted = VARIANTS[variant].parameters
    given = {
        "d_out": 6,
        "seed": 2**40,
        "qkv_bias": implementation != "v1",
        "dropout": 0.25,
        "num_heads": 3,
    }
    params = {name: value for name, value in given.items() if name in accepted}
    body = request(variant, implementation, random_inputs((2, 4, 5), 7), **params)
    config = (await post(client, variant, body))["config"]
    expected = expected_config(variant, 5, {**params, "implementation": implementation})
    assert {key: config[key] for key in expected} == expected
    if variant in MULTI_HEAD:
        assert config["head_dim"] == (6 if implementation == "wrapper" else 2)


# --- output options ----------------------------------------------------------------------------


def numbers(value: Any) -> list[float]:
    """Every number in a JSON value (booleans are not numbers)."""
    if isinstance(value, dict):
        return [number for item in value.values() for number in numbers(item)]
    if isinstance(value, list):
        return [number for item in value for number in numbers(item)]
    if isinstance(value, int | float) and not isinstance(value, bool):
        return [value]
    return []


@each_implementation
async def test_decimals_rounds_every_number(client, variant, implementation):
    params = {"dropout": 0.3} if variant in DROPOUT else {}
    body = request(variant, implementation, random_inputs((2, 5, 4), 8), **params)
    exact = await post(client, variant, body)
    rounded = await post(client, variant, {**body, "decimals": 4})
    values = numbers({k: rounded[k] for k in ("attention_weights", "context_vectors")})
    assert len(values) > 50
    for value in numbers(rounded):
        assert abs(value * 1e4 - round(value * 1e4)) < 1e-3, f"{value} has more than 4 decimals"
    for key in ("attention_weights", "context_vectors"):
        difference = np.abs(np.asarray(rounded[key]) - np.asarray(exact[key]))
        assert difference.max() <= 5e-5 + 1e-6, f"{key}: rounding moved a number too far"
    assert rounded["config"]["decimals"] == 4


@each_implementation
@pytest.mark.parametrize("batched", [False, True], ids=["2d", "batch"])
async def test_return_weights_false_omits_the_weights(client, variant, implementation, batched):
    params = {"dropout": 0.2} if variant in DROPOUT else {}
    embeddings = random_inputs((2, 5, 4) if batched else (5, 4), 9)
    body = request(variant, implementation, embeddings, **params)
    with_weights = await post(client, variant, body)
    without = await post(client, variant, {**body, "return_weights": False})
    assert "attention_weights" not in without
    assert "attention_weights" in with_weights
    context = np.asarray(without["context_vectors"])
    assert context.shape == np.asarray(with_weights["context_vectors"]).shape
    # With dropout the plain path runs either way, drawing the same mask: the same numbers.
    np.testing.assert_allclose(
        context, np.asarray(with_weights["context_vectors"]), rtol=0, atol=1e-5
    )


# --- determinism -------------------------------------------------------------------------------


@each_implementation
async def test_the_same_request_gives_the_same_bytes(client, variant, implementation):
    params = {"dropout": 0.5, "seed": 3} if variant in DROPOUT else {}
    body = request(variant, implementation, random_inputs((2, 6, 4), 10), **params)
    first = await client.post(f"/attention/{variant}", json=body)
    second = await client.post(f"/attention/{variant}", json=body)
    assert first.status_code == second.status_code == 200
    assert first.content == second.content


@pytest.mark.parametrize("implementation", VARIANTS["multi-head"].implementation_names)
async def test_concurrent_requests_with_different_seeds(client, implementation):
    """16 requests over 4 seeds at once, large enough to run on worker threads, each equal to
    its serial answer: no request's RNG stream leaks into another's."""
    embeddings = random_inputs((2, 64, 16), 11)
    seeds = [0, 1, 123, 2**40]

    def body(seed: int) -> dict[str, Any]:
        return request(
            "multi-head",
            implementation,
            embeddings,
            seed=seed,
            dropout=0.3,
            num_heads=4,
            d_out=16,
        )

    serial = {}
    for seed in seeds:
        response = await client.post("/attention/multi-head", json=body(seed))
        assert response.status_code == 200, response.text
        serial[seed] = response.content
    assert len(set(serial.values())) == len(seeds), "different seeds gave the same answer"

    order = [seeds[i % len(seeds)] for i in range(16)]
    responses = await asyncio.gather(
        *(client.post("/attention/multi-head", json=body(seed)) for seed in order)
    )
    for seed, response in zip(order, responses, strict=True):
        assert response.status_code == 200, response.text
        assert response.content == serial[seed], f"seed {seed}: the concurrent answer differs"
