"""OpenAPI examples: each variant's from the registry (the first reproduces the book's printed
numbers, so "Try it out" in /docs shows them), in the form OpenAPI takes."""

from typing import Any

from attention import VARIANTS
from attention.book import BOOK_BATCH, BOOK_INPUTS, BOOK_SENTENCE

__all__ = ["BOOK_BATCH", "BOOK_INPUTS", "BOOK_SENTENCE", "EXAMPLES", "example"]


def example(summary: str, value: dict[str, Any]) -> dict[str, Any]:
    return {"summary": summary, "value": value}


EXAMPLES: dict[str, dict[str, dict[str, Any]]] = {
    variant.name: {
        key: example(shown.summary, dict(shown.body)) for key, shown in variant.examples.items()
    }
    for variant in VARIANTS.values()
}
