"""Batches with padding: a list of texts, or embeddings with an `attention_mask`.

Each item of a padded batch must come back as our reference computes that item alone, over its
real tokens; padded keys get weight 0 from every query, and every number a padded position
computes is null.
"""

from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from attention import VARIANTS
from service.settings import Settings
from tests.conftest import make_client
from tests.test_reference import Case, post, reference_run
from tests.test_steps import torch_multihead_attention

ATOL = 1e-5
TEXTS = ["Your journey starts with one step", "Hi", "Attention is all"]  # 6, 1 and 4 GPT-2 tokens
TEXT_SETTINGS = {"embedding_dim": 8, "context_length": 16, "embedding_seed": 7}

VARIANT_CASES = [
    (name, implementation)
    for name, variant in VARIANTS.items()
    for implementation in (variant.implementation_names or [None])
]
CASE_IDS = [f"{name}:{impl}" if impl else name for name, impl in VARIANT_CASES]


def case_for(variant: str, implementation: str | None, **params: Any) -> Case:
    if variant != "simplified":
        params.setdefault("d_out", 4)
        params.setdefault("seed", 5)
    return Case("padding", variant, implementation, (), params)


def body_of(case: Case, **inputs: Any) -> dict[str, Any]:
    body = {**inputs, **case.params}
    if case.implementation is not None:
        body["implementation"] = case.implementation
    return body


def chapter_2_embeddings(ids: list[int]) -> torch.Tensor:
    """(T, 8): the text embedded as chapter 2 does, with TEXT_SETTINGS."""
    with torch.no_grad():
        torch.manual_seed(TEXT_SETTINGS["embedding_seed"])
        token_embedding = nn.Embedding(50257, TEXT_SETTINGS["embedding_dim"])
        position_embedding = nn.Embedding(
            TEXT_SETTINGS["context_length"], TEXT_SETTINGS["embedding_dim"]
        )
        return token_embedding(torch.tensor(ids)) + position_embedding(torch.arange(len(ids)))


def as_array(value: Any) -> np.ndarray:
    """JSON numbers to float64, null to NaN."""
    return np.array(value, dtype=np.float64)


def weights_of(answer: dict[str, Any], item: int, multi_head: bool) -> np.ndarray:
    """One item's weights as (H, T, T), so single- and multi-head read alike."""
    weights = as_array(answer["attention_weights"])[item]
    return weights if multi_head else weights[np.newaxis]


def assert_item_is_alone(
    answer: dict[str, Any], item: int, real: np.ndarray, case: Case, x_alone: torch.Tensor
) -> None:
    """The batch's item `item`, whose real positions are `real` (T booleans), against our
    reference run on that item's real rows alone (x_alone: T_real x d_in)."""
    context, weights = reference_run(case, x_alone)  # (T_real, d), (T_real, T_real) or (H, ...)
    multi_head = VARIANTS[case.variant].multi_head
    batch_context = as_array(answer["context_vectors"])[item]  # (T, d)
    np.testing.assert_allclose(batch_context[real], context.numpy(), rtol=0, atol=ATOL)
    assert np.isnan(batch_context[~real]).all(), "a padded query's context vector is not null"
    if "attention_weights" not in answer:
        return
    batch_weights = weights_of(answer, item, multi_head)  # (H, T, T)
    expected = (weights if multi_head else weights.unsqueeze(0)).numpy()
    real_rows = batch_weights[:, real]  # (H, T_real, T)
    np.testing.assert_allclose(real_rows[:, :, real], expected, rtol=0, atol=ATOL)
    assert (real_rows[:, :, ~real] == 0).all(), "a padded key got attention"
    assert np.isnan(batch_weights[:, ~real]).all(), "a padded query's weights are not null"


@pytest.mark.parametrize(("variant", "implementation"), VARIANT_CASES, ids=CASE_IDS)
@pytest.mark.parametrize("return_weights", [True, False], ids=["weights", "fused"])
async def test_each_text_of_a_batch_is_as_if_sent_alone(
    client, variant, implementation, return_weights
):
    case = case_for(variant, implementation)
    body = body_of(case, text=TEXTS, return_weights=return_weights, **TEXT_SETTINGS)
    answer = await post(client, variant, body)

    lengths = [len(tokens) for tokens in answer["tokens"]]
    assert lengths == [6, 1, 4]
    padding_mask = np.array(answer["padding_mask"])
    assert padding_mask.tolist() == [[i >= n for i in range(6)] for n in lengths]
    assert answer["config"]["batch_size"] == 3 and answer["config"]["num_tokens"] == 6
    for item, text in enumerate(TEXTS):
        alone = await post(client, variant, body_of(case, text=text, **TEXT_SETTINGS))
        assert answer["tokens"][item] == alone["tokens"], "each item's tokens, unpadded"
        ids = [token["id"] for token in alone["tokens"]]
        real = ~padding_mask[item]
        assert_item_is_alone(answer, item, real, case, chapter_2_embeddings(ids))
        # And the same numbers as the service gives the text alone.
        np.testing.assert_allclose(
            as_array(answer["context_vectors"])[item][real],
            as_array(alone["context_vectors"]),
            rtol=0,
            atol=1e-6,
        )


MASKS = {
    "right": [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]],
    "left": [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]],
    "holes": [[1, 0, 1, 0, 1], [True, True, False, True, False], [0, 1, 1, 1, 0]],
}


@pytest.mark.parametrize(("variant", "implementation"), VARIANT_CASES, ids=CASE_IDS)
@pytest.mark.parametrize("mask_name", MASKS)
@pytest.mark.parametrize("return_weights", [True, False], ids=["weights", "fused"])
async def test_an_attention_mask_hides_padding_wherever_it_is(
    client, variant, implementation, mask_name, return_weights
):
    """Real tokens keep their order, so causal attention among them is the item's own."""
    with_bias = variant != "simplified" and implementation != "v1"  # v1 has no bias vectors
    case = case_for(variant, implementation, **({"qkv_bias": True} if with_bias else {}))
    mask = MASKS[mask_name]
    x = torch.rand((3, 5, 4), generator=torch.Generator().manual_seed(3)) * 4 - 2
    body = body_of(case, embeddings=x.tolist(), attention_mask=mask, return_weights=return_weights)
    answer = await post(client, variant, body)

    real_positions = np.array(mask, dtype=bool)
    assert answer["padding_mask"] == (~real_positions).tolist()
    for item in range(3):
        real = real_positions[item]
        assert_item_is_alone(answer, item, real, case, x[item][torch.from_numpy(real)])


async def test_a_full_mask_changes_nothing(client):
    x = torch.rand((2, 4, 6), generator=torch.Generator().manual_seed(1)).tolist()
    plain = await post(client, "multi-head", {"embeddings": x, "d_out": 6})
    masked = await post(
        client, "multi-head", {"embeddings": x, "d_out": 6, "attention_mask": [[1] * 4] * 2}
    )
    assert masked["context_vectors"] == plain["context_vectors"]
    assert masked["attention_weights"] == plain["attention_weights"]
    assert masked["padding_mask"] == [[False] * 4] * 2 and "padding_mask" not in plain


async def test_steps_of_padded_positions_are_null(client):
    x = torch.rand((2, 3, 4), generator=torch.Generator().manual_seed(2)).tolist()
    steps = ["queries", "keys", "values", "attention_scores", "scaled_scores", "mask"]
    steps += ["weights_before_dropout", "head_outputs"]
    answer = await post(
        client,
        "multi-head",
        {"embeddings": x, "d_out": 4, "attention_mask": [[1, 1, 1], [1, 1, 0]], "include": steps},
    )
    got = {name: as_array(answer["steps"][name]["data"]) for name in steps if name != "mask"}
    for name in ("queries", "keys", "values", "head_outputs"):  # (B, H, T, head_dim)
        assert np.isnan(got[name][1, :, 2]).all(), name
        assert not np.isnan(got[name][1, :, :2]).any(), name
        assert not np.isnan(got[name][0]).any(), name
    for name in ("attention_scores", "scaled_scores", "weights_before_dropout"):  # (B, H, T, T)
        assert np.isnan(got[name][1, :, 2]).all(), f"{name}: the padded query's row"
    # Raw scores pair queries with the padded key too: null; the masked ones say -inf (null).
    assert np.isnan(got["attention_scores"][1, :, :, 2]).all()
    assert np.isnan(got["scaled_scores"][1, :, :, 2]).all()
    assert (got["weights_before_dropout"][1, :, :2, 2] == 0).all()
    # Raw scores of real pairs are the real queries and keys' dot products.
    queries, keys = got["queries"][1, :, :2], got["keys"][1, :, :2]  # (H, 2, head_dim)
    np.testing.assert_allclose(
        got["attention_scores"][1, :, :2, :2], queries @ keys.transpose(0, 2, 1), atol=1e-6
    )
    assert answer["steps"]["mask"]["shape"] == [3, 3], "the causal mask; padding is its own"


async def test_padded_batches_are_reproducible_with_dropout(client):
    body = {"text": TEXTS, "dropout": 0.5, "seed": 9, **TEXT_SETTINGS}
    first = await post(client, "causal", body)
    second = await post(client, "causal", body)
    assert first["attention_weights"] == second["attention_weights"]
    weights = as_array(first["attention_weights"])  # (3, 6, 6)
    assert (weights[1, 0, 1:] == 0).all(), "padded keys stay at weight 0 after dropout"
    assert np.isnan(weights[1, 1:]).all()


# --- errors -------------------------------------------------------------------------------------


def only_error(response) -> dict[str, Any]:
    assert response.status_code == 422, response.text
    errors = response.json()["detail"]
    assert len(errors) == 1, errors
    return errors[0]


E_BATCH = [[[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], [[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]]


@pytest.mark.parametrize(
    ("body", "loc", "words"),
    [
        (
            {"embeddings": E_BATCH[0], "attention_mask": [[1, 1, 1]]},
            ["body", "attention_mask"],
            ["batch", "real rows only"],
        ),
        (
            {"embeddings": E_BATCH, "attention_mask": [[1, 1], [1, 1]]},
            ["body", "attention_mask"],
            ["2 x 3", "got 2 x 2"],
        ),
        (
            {"embeddings": E_BATCH, "attention_mask": [[1, 1, 1]]},
            ["body", "attention_mask"],
            ["2 x 3", "got 1 x 3"],
        ),
        (
            {"embeddings": E_BATCH, "attention_mask": [[1, 1, 1], [0, 0, 0]]},
            ["body", "attention_mask", 1],
            ["attention_mask[1]", "no real token"],
        ),
        (
            {"embeddings": E_BATCH, "attention_mask": [[1, 1, 1], [1, 2, 0]]},
            ["body", "attention_mask"],
            ["attention_mask[1][1] is 2", "1 (or true)", "0 (or false)"],
        ),
        (
            {"embeddings": E_BATCH, "attention_mask": [[1, 1, 1], [1, 1]]},
            ["body", "attention_mask"],
            ["rectangular", "attention_mask[1] has 2"],
        ),
        (
            {"text": ["Hi", "there"], "attention_mask": [[1], [1]]},
            ["body", "attention_mask"],
            ["embeddings", "padding_mask"],
        ),
        ({"text": ["Hi", ""]}, ["body", "text"], ["text[1] is empty"]),
        ({"text": ["Hi", 5]}, ["body", "text"], ["text[1] is not a string"]),
        ({"text": []}, ["body", "text"], ["empty list"]),
        (
            {"text": ["Hi", "one two three four five six"], "context_length": 4},
            ["body", "text", 1],
            ["text[1] has 6 tokens", "context_length=4"],
        ),
    ],
)
async def test_bad_padding_input_is_a_clear_422(client, body, loc, words):
    if "text" in body:
        body = {"embedding_dim": 4, **body}
    response = await client.post("/attention/causal", json=body)
    error = only_error(response)
    assert error["loc"] == loc, error
    for word in words:
        assert word in error["msg"], error


async def test_text_batches_obey_the_batch_and_character_limits():
    async with make_client(Settings(max_batch_size=2, max_text_chars=10)) as client:
        response = await client.post(
            "/attention/simplified", json={"text": ["abcd", "efgh", "ijkl"]}
        )
    assert response.status_code == 422
    messages = " ".join(error["msg"] for error in response.json()["detail"])
    assert "batch size = 3 exceeds the limit of 2 (ATTENTION_MAX_BATCH_SIZE)" in messages
    assert "characters of text = 12 exceeds the limit of 10" in messages


async def test_compare_pads_for_every_variant(client):
    answer = (
        await client.post(
            "/attention/compare",
            json={"embeddings": E_BATCH, "attention_mask": [[1, 1, 1], [1, 1, 0]], "d_out": 2},
        )
    ).json()
    for name, variant_answer in answer["answers"].items():
        assert variant_answer["padding_mask"] == [[False] * 3, [False, False, True]], name
        assert np.isnan(as_array(variant_answer["context_vectors"])[1, 2]).all(), name


async def test_fused_multi_head_matches_torch_with_a_key_padding_mask(client):
    """nn.MultiheadAttention, loaded with the answer's weights, masks padded keys with its own
    `key_padding_mask` (True: padding, as our padding_mask)."""
    x = torch.rand((2, 5, 8), generator=torch.Generator().manual_seed(4))
    mask = [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    body = {
        "embeddings": x.tolist(),
        "attention_mask": mask,
        "d_out": 8,
        "num_heads": 4,
        "qkv_bias": True,
        "include": ["parameters"],
    }
    answer = await post(client, "multi-head", body)
    mha = torch_multihead_attention(answer["steps"]["parameters"], num_heads=4)
    with torch.no_grad():
        causal = torch.triu(torch.ones(5, 5, dtype=torch.bool), diagonal=1)
        padding = ~torch.tensor(mask, dtype=torch.bool)
        context, weights = mha(
            x, x, x, attn_mask=causal, key_padding_mask=padding, average_attn_weights=False
        )

    real = ~padding.numpy()
    ours_context = as_array(answer["context_vectors"])
    ours_weights = as_array(answer["attention_weights"])  # (B, H, T, T)
    np.testing.assert_allclose(ours_context[real], context.numpy()[real], atol=ATOL)
    for item in range(2):
        rows = ours_weights[item][:, real[item]]  # (H, T_real, T)
        np.testing.assert_allclose(rows, weights[item][:, real[item]].numpy(), atol=ATOL)


async def test_every_text_over_context_length_is_named_in_one_422(client):
    body = {"text": ["one two three four five", "Hi", "six seven eight nine ten eleven"]}
    response = await client.post(
        "/attention/causal", json={**body, "context_length": 4, "embedding_dim": 4}
    )

    assert response.status_code == 422
    errors = response.json()["detail"]
    assert [error["loc"] for error in errors] == [["body", "text", 0], ["body", "text", 2]]
    assert "text[0] has 5 tokens" in errors[0]["msg"]
    assert "text[2] has 6 tokens" in errors[1]["msg"]
