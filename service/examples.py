"""OpenAPI examples: each reproduces a computation the book prints, so "Try it out" in /docs
shows the book's numbers."""

from typing import Any

# "Your journey starts with one step", embedded in 3 dimensions (section 3.3).
BOOK_INPUTS = [
    [0.43, 0.15, 0.89],  # Your
    [0.55, 0.87, 0.66],  # journey
    [0.57, 0.85, 0.64],  # starts
    [0.22, 0.58, 0.33],  # with
    [0.77, 0.25, 0.10],  # one
    [0.05, 0.80, 0.55],  # step
]
BOOK_BATCH = [BOOK_INPUTS, BOOK_INPUTS]  # torch.stack((inputs, inputs)), section 3.5
BOOK_SENTENCE = "Your journey starts with one step"


def example(summary: str, value: dict[str, Any]) -> dict[str, Any]:
    return {"summary": summary, "value": value}


EXAMPLES: dict[str, dict[str, dict[str, Any]]] = {
    "simplified": {
        "book": example("Book 3.3: the six 3-d inputs", {"embeddings": BOOK_INPUTS}),
        "text": example("A sentence, GPT-2 tokens", {"text": BOOK_SENTENCE, "decimals": 4}),
    },
    "self-attention": {
        "book_v2": example(
            "Book 3.4: SelfAttention_v2, seed 789",
            {"embeddings": BOOK_INPUTS, "d_out": 2, "seed": 789},
        ),
        "book_v1": example(
            "Book 3.4: SelfAttention_v1, seed 123",
            {"embeddings": BOOK_INPUTS, "d_out": 2, "seed": 123, "implementation": "v1"},
        ),
    },
    "causal": {
        "book": example(
            "Book 3.5: CausalAttention, seed 123, two-item batch",
            {"embeddings": BOOK_BATCH, "d_out": 2, "seed": 123},
        ),
        "dropout": example(
            "With dropout 0.5 on the weights",
            {"embeddings": BOOK_INPUTS, "d_out": 2, "seed": 123, "dropout": 0.5},
        ),
        "texts": example(
            "Two texts, the shorter padded (see padding_mask)",
            {"text": [BOOK_SENTENCE, "Your journey"], "embedding_dim": 4, "decimals": 4},
        ),
        "attention_mask": example(
            "A batch whose second item has four real tokens",
            {
                "embeddings": BOOK_BATCH,
                "attention_mask": [[1] * 6, [1, 1, 1, 1, 0, 0]],
                "d_out": 2,
                "seed": 123,
            },
        ),
    },
    "multi-head": {
        "book_fused": example(
            "Book 3.6: MultiHeadAttention, seed 123, 2 heads",
            {"embeddings": BOOK_BATCH, "d_out": 2, "num_heads": 2, "seed": 123},
        ),
        "book_wrapper": example(
            "Book 3.6: MultiHeadAttentionWrapper, seed 123, 2 heads",
            {
                "embeddings": BOOK_BATCH,
                "d_out": 2,
                "num_heads": 2,
                "seed": 123,
                "implementation": "wrapper",
            },
        ),
        "text": example(
            "A sentence, 4 heads over 16-d embeddings",
            {"text": BOOK_SENTENCE, "embedding_dim": 16, "num_heads": 4, "decimals": 4},
        ),
    },
}
