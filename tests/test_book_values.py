"""The book's printed numbers of chapter 3, reproduced over HTTP.

Every example of tests/data/book-chapter3-values.json, the book's dropout mask, the GPT-2 ids of
the book's sentence, and the OpenAPI "Book" examples that /docs offers under "Try it out".
"""

from typing import Any

import numpy as np
import pytest
import torch

from attention.functional import book_dropout
from service.main import create_app
from service.settings import Settings
from tests.conftest import BOOK, book_input

ATOL = 1e-4  # the book prints 4 decimals

EXAMPLES = BOOK["examples"]


def book_request(example: dict[str, Any]) -> dict[str, Any]:
    """The example's request with its named input ("inputs", "batch") resolved."""
    request = dict(example["request"])
    request["embeddings"] = book_input(request["embeddings"])
    return request


def assert_close(actual: Any, expected: Any, what: str) -> None:
    actual, expected = np.asarray(actual, dtype=np.float64), np.asarray(expected)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    np.testing.assert_allclose(actual, expected, rtol=0, atol=ATOL, err_msg=what)


def assert_book_numbers(body: dict[str, Any], example: dict[str, Any]) -> None:
    assert body["variant"] == example["variant"]
    assert_close(body["attention_weights"], example["attention_weights"], "attention_weights")
    assert_close(body["context_vectors"], example["context_vectors"], "context_vectors")


def test_the_data_file_holds_the_book_examples():
    """A guard on the data itself: six examples, over the book's six 3-d inputs."""
    assert len(EXAMPLES) == 6
    assert np.asarray(BOOK["inputs"]).shape == (6, 3)
    assert {example["variant"] for example in EXAMPLES} == {
        "simplified",
        "self-attention",
        "causal",
        "multi-head",
    }


@pytest.mark.parametrize("example", EXAMPLES, ids=[example["name"] for example in EXAMPLES])
async def test_book_example_over_http(client, example):
    response = await client.post(f"/attention/{example['variant']}", json=book_request(example))
    assert response.status_code == 200, response.text
    assert_book_numbers(response.json(), example)


def test_book_dropout_mask():
    """torch.manual_seed(123); nn.Dropout(0.5)(torch.ones(6, 6)), from the library's own dropout."""
    generator = torch.Generator().manual_seed(123)
    result = book_dropout(torch.ones(6, 6), 0.5, generator)
    expected = torch.tensor(BOOK["dropout_example"]["result"])
    assert result.shape == (6, 6)
    assert torch.equal(result, expected), f"mask\n{result}\n!= the book's\n{expected}"


async def test_gpt2_ids_of_the_book_sentence(client):
    text, ids = BOOK["gpt2_tokens"]["text"], BOOK["gpt2_tokens"]["ids"]
    response = await client.post("/attention/simplified", json={"text": text})
    assert response.status_code == 200, response.text
    tokens = response.json()["tokens"]
    assert [token["id"] for token in tokens] == ids
    assert "".join(token["text"] for token in tokens) == text
    # One row of output per token.
    assert len(response.json()["context_vectors"]) == len(ids)


# --- the OpenAPI examples ----------------------------------------------------------------------


def request_body_examples(openapi: dict[str, Any], variant: str) -> dict[str, Any]:
    operation = openapi["paths"][f"/attention/{variant}"]["post"]
    return operation["requestBody"]["content"]["application/json"]["examples"]


def openapi_book_examples() -> list[tuple[str, str]]:
    """(variant, example key) of every example whose summary starts with "Book"."""
    openapi = create_app(Settings()).openapi()
    return [
        (variant, key)
        for variant in {example["variant"] for example in EXAMPLES}
        for key, example in request_body_examples(openapi, variant).items()
        if example["summary"].startswith("Book")
    ]


OPENAPI_BOOK_EXAMPLES = sorted(openapi_book_examples())
MATCHED_FIELDS = ("d_out", "seed", "implementation", "embeddings")


def matching_book_example(variant: str, value: dict[str, Any]) -> dict[str, Any]:
    matches = [
        example
        for example in EXAMPLES
        if example["variant"] == variant
        and all(book_request(example).get(name) == value.get(name) for name in MATCHED_FIELDS)
    ]
    assert len(matches) == 1, f"{len(matches)} book examples match the OpenAPI example {value}"
    return matches[0]


def test_every_book_example_is_offered_in_the_docs():
    """Each book example has an OpenAPI "Book" example that runs it; so /docs shows them all."""
    assert len(OPENAPI_BOOK_EXAMPLES) == len(EXAMPLES)
    openapi = create_app(Settings()).openapi()
    matched = {
        matching_book_example(variant, request_body_examples(openapi, variant)[key]["value"])[
            "name"
        ]
        for variant, key in OPENAPI_BOOK_EXAMPLES
    }
    assert matched == {example["name"] for example in EXAMPLES}


@pytest.mark.parametrize(
    ("variant", "key"), OPENAPI_BOOK_EXAMPLES, ids=[f"{v}:{k}" for v, k in OPENAPI_BOOK_EXAMPLES]
)
async def test_openapi_book_example_gives_the_book_numbers(client, variant, key):
    response = await client.get("/openapi.json")
    assert response.status_code == 200
    example = request_body_examples(response.json(), variant)[key]
    assert example["summary"].startswith("Book")
    book = matching_book_example(variant, example["value"])

    response = await client.post(f"/attention/{variant}", json=example["value"])
    assert response.status_code == 200, response.text
    assert_book_numbers(response.json(), book)
