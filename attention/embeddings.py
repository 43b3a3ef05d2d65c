"""Chapter 2's input embeddings: token table plus absolute positional table.

`torch.manual_seed(embedding_seed); tok = nn.Embedding(50257, dim); pos = nn.Embedding(ctx, dim)`,
drawn here from a generator of its own so concurrent requests cannot disturb each other.
The tables are large (50257 x dim floats), so they are built once per key and cached.
"""

import torch

from attention.cache import BoundedCache
from attention.errors import AttentionInputError
from attention.tokenizer import VOCAB_SIZE


class EmbeddingTables:
    def __init__(self, cache_size: int = 4) -> None:
        self._tables: BoundedCache[tuple[int, int, int], tuple[torch.Tensor, torch.Tensor]]
        self._tables = BoundedCache(cache_size)

    def tables(
        self, embedding_dim: int, context_length: int, seed: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(token table (50257, dim), positional table (context_length, dim))."""

        def build() -> tuple[torch.Tensor, torch.Tensor]:
            generator = torch.Generator().manual_seed(seed)
            # nn.Embedding initialises with init.normal_: the same draw, in the same order.
            token_table = torch.empty(VOCAB_SIZE, embedding_dim).normal_(generator=generator)
            position_table = torch.empty(context_length, embedding_dim).normal_(generator=generator)
            return token_table, position_table

        return self._tables.get_or_create((embedding_dim, context_length, seed), build)

    def embed(
        self, token_ids: list[int], *, embedding_dim: int, context_length: int, seed: int
    ) -> torch.Tensor:
        """(T, embedding_dim): token embeddings plus the positional embeddings of 0..T-1."""
        if len(token_ids) > context_length:
            raise AttentionInputError(
                f"the text has {len(token_ids)} tokens, more than context_length="
                f"{context_length} positions of the positional embedding",
                field="text",
            )
        token_table, position_table = self.tables(embedding_dim, context_length, seed)
        ids = torch.tensor(token_ids, dtype=torch.long)
        return token_table[ids] + position_table[: len(token_ids)]
