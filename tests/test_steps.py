"""`include`: every intermediate step, each equal to the same step of our own reference
(tests/reference.py), seeded the book's way."""

from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from attention import STEPS, VARIANTS
from tests import reference
from tests.conftest import BOOK

ATOL = 1e-5
SEED = 7

IMPLEMENTATIONS = [
    (name, implementation)
    for name, variant in VARIANTS.items()
    for implementation in variant.implementations
]


def inputs(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def expected_steps(
    name: str, implementation: str | None, x: torch.Tensor, d_out: int, qkv_bias: bool
) -> dict[str, Any]:
    """Every step of our own reference on x (b, T, d_in), dropout 0, with 2 heads."""
    config = reference.Config(name, implementation, d_out=d_out, seed=SEED, qkv_bias=qkv_bias)
    return reference.run(config, x).steps


def assert_step(answer: dict[str, Any], expected: torch.Tensor, name: str) -> None:
    data = answer["data"]
    assert answer["shape"] == list(expected.shape), name
    if expected.dtype == torch.bool:
        assert np.array_equal(np.array(data, dtype=bool), expected.numpy()), name
        return
    got = np.array([[np.nan if v is None else v for v in row] for row in np.array(data).reshape(
        -1, expected.shape[-1]
    ).tolist()], dtype=np.float64).reshape(expected.shape)  # fmt: skip
    want = expected.double().numpy()
    assert np.array_equal(np.isinf(want), np.isnan(got)), f"{name}: -inf is written null"
    finite = np.isfinite(want)
    assert np.allclose(got[finite], want[finite], atol=ATOL), name


def assert_parameters(answer: dict[str, Any], expected: dict[str, Any]) -> None:
    assert list(answer) == list(expected)
    for name, value in expected.items():
        if name == "heads":
            assert len(answer[name]) == len(value)
            for got_head, want_head in zip(answer[name], value, strict=True):
                assert_parameters(got_head, want_head)
        else:
            assert_step(answer[name], value.detach(), name)


@pytest.mark.parametrize("qkv_bias", [False, True])
@pytest.mark.parametrize("batched", [True, False], ids=["3-D", "2-D"])
@pytest.mark.parametrize(("name", "implementation"), IMPLEMENTATIONS)
async def test_every_step_equals_the_reference(client, name, implementation, batched, qkv_bias):
    variant = VARIANTS[name]
    if qkv_bias and (name == "simplified" or implementation == "v1"):
        pytest.skip("no bias in this class")
    x = inputs((2, 5, 4) if batched else (1, 5, 4), seed=len(name))
    d_out = 6
    body: dict[str, Any] = {
        "embeddings": (x if batched else x[0]).tolist(),
        "include": variant.step_names,
    }
    if name != "simplified":
        body |= {"d_out": d_out, "seed": SEED, "qkv_bias": qkv_bias}
    if implementation is not None:
        body["implementation"] = implementation

    response = await client.post(f"/attention/{name}", json=body)

    assert response.status_code == 200, response.text
    steps = response.json()["steps"]
    assert list(steps) == variant.step_names
    expected = expected_steps(name, implementation, x, d_out, qkv_bias)
    assert set(expected) == set(steps)
    for step, value in expected.items():
        if step == "parameters":
            assert_parameters(steps[step], value)
            continue
        if not batched and step != "mask":
            value = value[0]  # a 2-D input's steps have no batch axis, like its outputs
        assert_step(steps[step], value, step)


def torch_multihead_attention(parameters: dict[str, Any], num_heads: int) -> nn.MultiheadAttention:
    """nn.MultiheadAttention holding the weights an answer's `parameters` step returned (with
    qkv_bias): in_proj is [W_q; W_k; W_v] in nn.Linear's layout, the transpose of x @ W."""
    p = {name: torch.tensor(value["data"]) for name, value in parameters.items()}
    embed_dim = p["W_query"].shape[0]
    mha = nn.MultiheadAttention(embed_dim, num_heads, bias=True, batch_first=True)
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([p["W_query"].T, p["W_key"].T, p["W_value"].T]))
        mha.in_proj_bias.copy_(torch.cat([p["b_query"], p["b_key"], p["b_value"]]))
        mha.out_proj.weight.copy_(p["W_out_proj"].T)
        mha.out_proj.bias.copy_(p["b_out_proj"])
    return mha


async def test_fused_multi_head_matches_torch_multihead_attention(client):
    """nn.MultiheadAttention loaded with the same weights: in_proj is [W_q; W_k; W_v]
    (nn.Linear layout, the transpose of x @ W), out_proj the book's out_proj. It scales before
    masking, the book after: the same numbers, as -inf / sqrt(d_k) is -inf."""
    x = inputs((2, 6, 8), seed=3)
    body = {
        "embeddings": x.tolist(),
        "d_out": 8,
        "num_heads": 4,
        "qkv_bias": True,
        "seed": 11,
        "include": ["parameters", "head_outputs"],
    }
    response = await client.post("/attention/multi-head", json=body)
    assert response.status_code == 200, response.text
    answer = response.json()

    mha = torch_multihead_attention(answer["steps"]["parameters"], num_heads=4)
    with torch.no_grad():
        mask = torch.triu(torch.ones(6, 6, dtype=torch.bool), diagonal=1)
        context, weights = mha(x, x, x, attn_mask=mask, average_attn_weights=False)

    assert torch.allclose(torch.tensor(answer["context_vectors"]), context, atol=ATOL)
    assert torch.allclose(torch.tensor(answer["attention_weights"]), weights, atol=ATOL)


async def test_weights_before_dropout_are_the_softmax_and_dropout_follows_them(client):
    body = {"embeddings": BOOK["inputs"], "d_out": 2, "seed": 123, "dropout": 0.5}
    body["include"] = ["weights_before_dropout", "scaled_scores"]

    response = await client.post("/attention/causal", json=body)

    assert response.status_code == 200, response.text
    answer = response.json()
    before = np.array(answer["steps"]["weights_before_dropout"]["data"])
    after = np.array(answer["attention_weights"])
    kept = after != 0
    assert not kept.all(), "dropout 0.5 drops some weights"
    assert np.allclose(after[kept], 2 * before[kept], atol=ATOL), "kept ones scaled by 1/(1-p)"
    scaled = np.array(answer["steps"]["scaled_scores"]["data"], dtype=np.float64)  # None -> nan
    assert np.allclose(np.nansum(before, axis=-1), 1.0, atol=ATOL)
    assert np.isnan(scaled[0, 1:]).all(), "the future is masked with -inf, written null"


async def test_include_leaves_the_answer_unchanged(client):
    """The steps come from the same computation: weights and context vectors as without them."""
    for name, implementation in IMPLEMENTATIONS:
        body: dict[str, Any] = {"embeddings": BOOK["inputs"]}
        if name != "simplified":
            body["d_out"] = 2  # the fused heads split it in two
        if implementation:
            body["implementation"] = implementation
        plain = (await client.post(f"/attention/{name}", json=body)).json()
        body["include"] = VARIANTS[name].step_names
        stepped = (await client.post(f"/attention/{name}", json=body)).json()
        assert stepped["context_vectors"] == plain["context_vectors"], name
        assert stepped["attention_weights"] == plain["attention_weights"], name


async def test_include_forces_the_explicit_path(client):
    body = {"embeddings": BOOK["inputs"], "return_weights": False, "include": ["attention_scores"]}

    response = await client.post("/attention/simplified", json=body)

    assert response.status_code == 200, response.text
    answer = response.json()
    assert "attention_weights" not in answer
    x = torch.tensor(BOOK["inputs"])
    assert_step(answer["steps"]["attention_scores"], x @ x.T, "attention_scores")


async def test_steps_follow_decimals(client):
    body = {"embeddings": BOOK["inputs"], "decimals": 2, "include": ["queries", "parameters"]}

    response = await client.post("/attention/self-attention", json=body)

    assert response.status_code == 200, response.text
    steps = response.json()["steps"]
    for values in (steps["queries"]["data"], steps["parameters"]["W_query"]["data"]):
        for row in values:
            assert all(round(value, 2) == value for value in row)


async def test_an_unknown_step_is_a_422_listing_the_valid_ones(client):
    body = {"embeddings": BOOK["inputs"], "include": ["queries", "attn_probs"]}

    response = await client.post("/attention/causal", json=body)

    assert response.status_code == 422
    [error] = response.json()["detail"]
    assert error["loc"] == ["body", "include", 1]
    assert "attn_probs" in error["msg"]
    for name in STEPS:
        assert name in error["msg"]


@pytest.mark.parametrize(
    ("name", "step"),
    [("self-attention", "mask"), ("causal", "head_outputs"), ("simplified", "parameters")],
)
async def test_a_step_that_does_not_apply_is_a_422_naming_it(client, name, step):
    body = {"embeddings": BOOK["inputs"], "include": [step]}

    response = await client.post(f"/attention/{name}", json=body)

    assert response.status_code == 422
    [error] = response.json()["detail"]
    assert error["loc"] == ["body", "include", 0]
    assert f"{step!r} does not apply" in error["msg"]
    for valid in VARIANTS[name].step_names:
        assert valid in error["msg"]


@pytest.mark.parametrize("include", ["queries", [1], [None], {"a": 1}])
async def test_a_malformed_include_is_a_422(client, include):
    body = {"embeddings": BOOK["inputs"], "include": include}

    response = await client.post("/attention/causal", json=body)

    assert response.status_code == 422, response.text
