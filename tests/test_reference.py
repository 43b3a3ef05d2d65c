"""Inputs the book does not print, compared with our own reference (tests/reference.py).

The reference draws the weights as `torch.manual_seed(seed)` and the book's constructor would,
computes with plain tensor algebra, and draws dropout masks from the global generator right
after the weights, as the book's modules do in training mode.
"""

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from attention import VARIANTS
from attention.functional import attend, book_dropout
from tests import reference
from tests.conftest import BOOK

ATOL = 1e-5
DEFAULT_SEED = 123


@dataclass(frozen=True)
class Case:
    id: str
    variant: str
    implementation: str | None
    shape: tuple[int, ...]  # (T, d_in) or (B, T, d_in)
    params: dict[str, Any] = field(default_factory=dict)  # sent as they are
    input_seed: int = 0

    def inputs(self) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.input_seed)
        return torch.rand(self.shape, generator=generator)

    def body(self, x: torch.Tensor) -> dict[str, Any]:
        body = {"embeddings": x.tolist(), **self.params}
        if self.implementation is not None:
            body["implementation"] = self.implementation
        return body


def weighted_cases(variant: str, implementation: str | None) -> list[Case]:
    """The cases every variant with trainable weights runs."""
    name = f"{variant}:{implementation}" if implementation else variant
    multi_head = VARIANTS[variant].multi_head
    d_out = 6 if multi_head else 4  # split into the 2 default heads

    def case(suffix: str, shape: tuple[int, ...], input_seed: int = 0, **params: Any) -> Case:
        return Case(f"{name}-{suffix}", variant, implementation, shape, params, input_seed)

    cases = [
        case("default-seed", (5, 7), d_out=d_out),
        case("seed0", (5, 7), 1, d_out=d_out, seed=0),
        case("seed1", (5, 7), 2, d_out=d_out, seed=1),
        case("seed2**40", (5, 7), 3, d_out=d_out, seed=2**40),
        case("seed2**64-1", (5, 7), 25, d_out=d_out, seed=2**64 - 1),  # the largest seed
        case("d_out-default", (5, 6), 4, seed=7),
        case("d_out>d_in", (4, 3), 5, d_out=8, seed=11),
        case("batch3", (3, 6, 5), 6, d_out=d_out, seed=3),
        case("2x9x8", (2, 9, 8), 7, d_out=d_out, seed=4),
    ]
    if implementation != "v1":  # SelfAttention_v1 has no bias
        cases += [
            case("qkv_bias", (5, 7), 8, d_out=d_out, seed=5, qkv_bias=True),
            case("qkv_bias-batch3", (3, 4, 5), 9, d_out=d_out, seed=6, qkv_bias=True),
        ]
    if "dropout" in VARIANTS[variant].parameters:
        cases += [
            case("dropout0.1", (6, 5), 10, d_out=d_out, seed=123, dropout=0.1),
            case("dropout0.5", (6, 5), 11, d_out=d_out, seed=123, dropout=0.5),
            case("dropout0.5-seed0", (7, 4), 12, d_out=d_out, seed=0, dropout=0.5),
            case("dropout0.5-seed2**40", (5, 7), 13, d_out=d_out, seed=2**40, dropout=0.5),
            case("dropout0.5-seed2**64-1", (5, 7), 26, d_out=d_out, seed=2**64 - 1, dropout=0.5),
            case("dropout0.1-batch3", (3, 6, 5), 14, d_out=d_out, seed=9, dropout=0.1),
            case(
                "dropout0.5-2x9x8-bias",
                (2, 9, 8),
                15,
                d_out=d_out,
                seed=1,
                dropout=0.5,
                qkv_bias=True,
            ),
        ]
    if multi_head:
        heads_d_out = 3 if implementation == "wrapper" else 12
        cases += [
            case("3heads", (5, 7), 16, d_out=heads_d_out, num_heads=3, seed=2),
            case("4heads", (5, 7), 17, d_out=heads_d_out, num_heads=4, seed=2),
            case("1head", (5, 7), 18, d_out=heads_d_out, num_heads=1, seed=2),
            case(
                "4heads-dropout0.5-batch3",
                (3, 6, 5),
                19,
                d_out=heads_d_out,
                num_heads=4,
                seed=8,
                dropout=0.5,
            ),
            case(
                "3heads-dropout0.1-2x9x8",
                (2, 9, 8),
                20,
                d_out=heads_d_out,
                num_heads=3,
                seed=2**40,
                dropout=0.1,
            ),
        ]
    return cases


CASES = [
    Case("simplified-5x7", "simplified", None, (5, 7), {}, 21),
    Case("simplified-2x9x8", "simplified", None, (2, 9, 8), {}, 22),
    Case("simplified-batch3", "simplified", None, (3, 6, 5), {}, 23),
    Case("simplified-1x4", "simplified", None, (1, 4), {}, 24),
    *weighted_cases("self-attention", "v2"),
    *weighted_cases("self-attention", "v1"),
    *weighted_cases("causal", None),
    *weighted_cases("multi-head", "fused"),
    *weighted_cases("multi-head", "wrapper"),
    *weighted_cases("grouped-query", None),
    *weighted_cases("sliding-window", None),
    *weighted_cases("latent", None),
    # Each bonus variant's own parameter, at its edges.
    Case(
        "grouped-query-groups=heads",
        "grouped-query",
        None,
        (5, 7),
        {"d_out": 8, "num_heads": 4, "num_kv_groups": 4},
        30,
    ),
    Case(
        "grouped-query-2of4-bias-dropout",
        "grouped-query",
        None,
        (2, 6, 5),
        {
            "d_out": 8,
            "num_heads": 4,
            "num_kv_groups": 2,
            "qkv_bias": True,
            "dropout": 0.5,
            "seed": 3,
        },
        31,
    ),
    Case(
        "grouped-query-1of3-batch",
        "grouped-query",
        None,
        (3, 5, 4),
        {"d_out": 6, "num_heads": 3, "num_kv_groups": 1, "seed": 4},
        32,
    ),
    Case("sliding-window-1", "sliding-window", None, (6, 5), {"d_out": 6, "window_size": 1}, 33),
    Case(
        "sliding-window-3-batch-bias",
        "sliding-window",
        None,
        (2, 9, 8),
        {"d_out": 8, "num_heads": 4, "window_size": 3, "qkv_bias": True, "seed": 9},
        34,
    ),
    Case(
        "sliding-window-2-dropout",
        "sliding-window",
        None,
        (7, 4),
        {"d_out": 4, "window_size": 2, "dropout": 0.5},
        35,
    ),
    Case("sliding-window-T", "sliding-window", None, (5, 7), {"d_out": 6, "window_size": 5}, 36),
    Case(
        "latent-3-bias-dropout",
        "latent",
        None,
        (2, 6, 5),
        {"d_out": 8, "num_heads": 4, "latent_dim": 3, "qkv_bias": True, "dropout": 0.1, "seed": 1},
        37,
    ),
    Case("latent-default-d_out-200", "latent", None, (4, 10), {"d_out": 200, "num_heads": 4}, 38),
    Case("latent-1", "latent", None, (5, 7), {"d_out": 6, "latent_dim": 1}, 39),
]


# --- the reference ------------------------------------------------------------------------------


def reference_run(case: Case, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(context vectors, attention weights) from our own reference, with x's batch axis."""
    batched = x.dim() == 3
    items = x if batched else x.unsqueeze(0)
    params = case.params
    config = reference.Config(
        case.variant,
        case.implementation,
        d_out=params.get("d_out"),
        num_heads=params.get("num_heads", 2),
        seed=params.get("seed", DEFAULT_SEED),
        qkv_bias=params.get("qkv_bias", False),
        dropout=params.get("dropout", 0.0),
        num_kv_groups=params.get("num_kv_groups", 1),
        window_size=params.get("window_size", 4),
        latent_dim=params.get("latent_dim"),
    )
    result = reference.run(config, items)
    if not batched:
        return result.context[0], result.weights[0]
    return result.context, result.weights


async def post(client, variant: str, body: dict[str, Any]) -> dict[str, Any]:
    response = await client.post(f"/attention/{variant}", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def assert_close(actual: Any, expected: torch.Tensor, what: str) -> None:
    actual = np.asarray(actual, dtype=np.float32)
    assert actual.shape == tuple(expected.shape), f"{what}: {actual.shape} != {expected.shape}"
    np.testing.assert_allclose(actual, expected.numpy(), rtol=0, atol=ATOL, err_msg=what)


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
async def test_matches_the_reference(client, case):
    x = case.inputs()
    body = await post(client, case.variant, case.body(x))
    context, weights = reference_run(case, x)
    assert_close(body["context_vectors"], context, "context_vectors")
    assert_close(body["attention_weights"], weights, "attention_weights")
    if case.params.get("dropout", 0.0) > 0:
        # The same dropout mask: the same weights zeroed, exactly.
        dropped = np.asarray(body["attention_weights"]) == 0.0
        assert np.array_equal(dropped, (weights == 0.0).numpy()), "dropout masks differ"


def test_cases_cover_every_variant_and_implementation():
    covered = {(case.variant, case.implementation) for case in CASES}
    expected = {
        (name, implementation)
        for name, variant in VARIANTS.items()
        for implementation in (variant.implementation_names or [None])
    }
    assert covered == expected


async def test_dropout_zeroes_some_weights_and_scales_the_rest(client):
    """A guard that the dropout cases above do drop: p = 0.5 zeroes weights below the diagonal."""
    case = next(case for case in CASES if case.id == "causal-dropout0.5")
    body = await post(client, "causal", case.body(case.inputs()))
    weights = np.asarray(body["attention_weights"])
    lower = weights[np.tril_indices(weights.shape[0])]
    assert (lower == 0.0).any()
    assert (lower > 0.0).any()
    # Kept weights are scaled by 1 / (1 - p): the first row's only weight, 1, becomes 2 or 0.
    assert weights[0, 0] in (0.0, 2.0)


@pytest.mark.parametrize(
    ("shape", "p", "seed"),
    [((6, 6), 0.5, 123), ((2, 3, 5, 5), 0.1, 0), ((4, 7), 0.9, 2**40), ((3, 3), 0.5, 1)],
)
def test_book_dropout_is_nn_dropout(shape, p, seed):
    """The library's dropout draws the mask nn.Dropout draws from the global RNG, bit for bit."""
    x = torch.rand(shape, generator=torch.Generator().manual_seed(seed))
    torch.manual_seed(seed)
    expected = nn.Dropout(p)(x)
    actual = book_dropout(x, p, torch.Generator().manual_seed(seed))
    assert torch.equal(actual, expected)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("padded", [False, True])
def test_scores_masked_in_place_give_the_bits_of_the_kept_steps(causal, padded):
    """Without steps to keep, attend masks and scales its fresh scores in place; with them, out
    of place. Same kernels, same bits; the inputs and the kept raw scores stay untouched."""
    generator = torch.Generator().manual_seed(0)
    queries, keys, values = (torch.randn(2, 3, 9, 4, generator=generator) for _ in range(3))
    originals = [tensor.clone() for tensor in (queries, keys, values)]
    padding = torch.tensor([[False] * 9, [False] * 6 + [True] * 3]) if padded else None

    context, weights = attend(queries, keys, values, causal=causal, padding=padding)
    steps: dict[str, torch.Tensor] = {}
    kept_context, kept_weights = attend(
        queries, keys, values, causal=causal, padding=padding, steps=steps
    )

    assert torch.equal(context, kept_context)
    assert torch.equal(weights, kept_weights)
    for tensor, original in zip((queries, keys, values), originals, strict=True):
        assert torch.equal(tensor, original)
    raw = np.einsum("bhqd,bhkd->bhqk", queries.numpy(), keys.numpy())
    np.testing.assert_allclose(steps["attention_scores"].numpy(), raw, rtol=1e-5, atol=1e-5)


# --- text input --------------------------------------------------------------------------------


async def test_text_input_is_embedded_as_chapter_2_does(client):
    text, ids = BOOK["gpt2_tokens"]["text"], BOOK["gpt2_tokens"]["ids"]
    body = await post(
        client,
        "causal",
        {
            "text": text,
            "embedding_dim": 8,
            "context_length": 32,
            "embedding_seed": 7,
            "seed": 5,
            "d_out": 4,
        },
    )
    assert [token["id"] for token in body["tokens"]] == ids

    num_tokens = len(ids)
    with torch.no_grad():
        torch.manual_seed(7)
        token_embedding = nn.Embedding(50257, 8)
        position_embedding = nn.Embedding(32, 8)
        x = token_embedding(torch.tensor(ids)) + position_embedding(torch.arange(num_tokens))
        config = reference.Config("causal", d_out=4, seed=5)
        expected = reference.run(config, x.unsqueeze(0)).context[0]
    assert expected.shape == (num_tokens, 4)
    assert_close(body["context_vectors"], expected, "context_vectors")
    assert body["config"]["d_in"] == 8


# --- the fused path (return_weights: false) ----------------------------------------------------

FUSED_CASES = [
    (name, implementation, batched, num_tokens)
    for name, variant in VARIANTS.items()
    for implementation in (variant.implementation_names or [None])
    for batched in (False, True)
    for num_tokens in (1, 2, 17, 64)
]


@pytest.mark.parametrize(
    ("variant", "implementation", "batched", "num_tokens"),
    FUSED_CASES,
    ids=[f"{v}{':' + i if i else ''}-{'batch' if b else '2d'}-T{t}" for v, i, b, t in FUSED_CASES],
)
async def test_fused_path_equals_the_plain_path(
    client, variant, implementation, batched, num_tokens
):
    shape = (2, num_tokens, 8) if batched else (num_tokens, 8)
    x = torch.rand(shape, generator=torch.Generator().manual_seed(num_tokens))
    body = {"embeddings": x.tolist()}
    if implementation is not None:
        body["implementation"] = implementation
    if variant != "simplified":
        body["seed"] = 42

    plain = await post(client, variant, body)
    fused = await post(client, variant, {**body, "return_weights": False})
    assert "attention_weights" not in fused
    assert "attention_weights" in plain
    actual, expected = np.asarray(fused["context_vectors"]), np.asarray(plain["context_vectors"])
    assert actual.shape == expected.shape
    assert actual.shape[:-1] == shape[:-1]
    np.testing.assert_allclose(actual, expected, rtol=0, atol=ATOL)
