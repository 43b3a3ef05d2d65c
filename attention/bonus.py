"""Attention of the book's bonus material that current LLMs use, beside chapter 3's classes.

Each is chapter 3's fused multi-head attention with one idea changed, and each saves KV-cache
memory in its own way (`kv_cache`):

- `GroupedQueryAttention` (bonus 04_gqa): keys and values projected for `num_kv_groups` groups
  only, each group shared by `num_heads / num_kv_groups` consecutive heads;
- `MultiHeadAttentionWithSWA` (bonus 06_swa): a query sees only the `window_size` latest keys,
  itself included;
- `MultiHeadLatentAttention` (bonus 05_mla): keys and values up-projected from one shared
  `latent_dim`-wide latent per token, which is all a cache keeps.

Constructors draw their weights in the bonus classes' order (see each), from the request's
generator, so `torch.manual_seed(seed); BonusClass(...)` is reproduced; the calling convention
is `attention.variants`'.
"""

import torch

from attention.initialisation import seeded_linear
from attention.variants import (
    MultiHeadAttention,
    SplitHeadsAttention,
    Steps,
    record,
    split_heads,
)


class GroupedQueryAttention(SplitHeadsAttention):
    """Keys and values for a few groups of heads; one group is multi-query attention, as many
    groups as heads is multi-head attention. Draws W_key, W_value, W_query, then out_proj,
    which has no bias."""

    def __init__(
        self,
        d_in: int,
        d_out: int,
        dropout: float,
        num_heads: int,
        num_kv_groups: int,
        qkv_bias: bool = False,
        *,
        generator: torch.Generator,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_groups = num_kv_groups
        self.head_dim = d_out // num_heads
        group_width = num_kv_groups * self.head_dim
        self.W_key = seeded_linear(d_in, group_width, bias=qkv_bias, generator=generator)
        self.W_value = seeded_linear(d_in, group_width, bias=qkv_bias, generator=generator)
        self.W_query = seeded_linear(d_in, d_out, bias=qkv_bias, generator=generator)
        self.out_proj = seeded_linear(d_out, d_out, bias=False, generator=generator)
        self.dropout = dropout

    def kv_cache(self, num_tokens: int) -> tuple[int, int]:
        """(values cached per token, tokens cached): one key and one value per group."""
        return 2 * self.num_kv_groups * self.head_dim, num_tokens

    def heads(self, x: torch.Tensor, steps: Steps | None) -> tuple[torch.Tensor, ...]:
        queries = split_heads(self.W_query(x), self.num_heads)  # (b, H, T, head_dim)
        group_keys = split_heads(self.W_key(x), self.num_kv_groups)  # (b, G, T, head_dim)
        group_values = split_heads(self.W_value(x), self.num_kv_groups)
        record(steps, group_keys=group_keys, group_values=group_values)
        # Group g serves heads g * H/G .. (g + 1) * H/G - 1: [K1, K2] -> [K1, K1, K2, K2].
        heads_per_group = self.num_heads // self.num_kv_groups
        keys = group_keys.repeat_interleave(heads_per_group, dim=1)  # (b, H, T, head_dim)
        values = group_values.repeat_interleave(heads_per_group, dim=1)
        return queries, keys, values


class MultiHeadAttentionWithSWA(MultiHeadAttention):
    """Chapter 3's MultiHeadAttention, weights and all, whose causal mask also hides the keys
    `window_size` or more tokens back."""

    def __init__(
        self,
        d_in: int,
        d_out: int,
        dropout: float,
        num_heads: int,
        window_size: int,
        qkv_bias: bool = False,
        *,
        generator: torch.Generator,
    ) -> None:
        super().__init__(d_in, d_out, dropout, num_heads, qkv_bias, generator=generator)
        self.window_size = window_size  # read by MultiHeadAttention.forward

    def kv_cache(self, num_tokens: int) -> tuple[int, int]:
        """A key and a value per token, for the last `window_size` tokens only."""
        return 2 * self.d_out, min(num_tokens, self.window_size)


class MultiHeadLatentAttention(SplitHeadsAttention):
    """Keys and values up-projected from a shared latent. Draws W_query, W_DKV (down to the
    latent), W_UK and W_UV (latent up to keys and values), then out_proj with its bias."""

    # Every weight, in the order `include: ["parameters"]` lists them.
    projection_names = ("W_query", "W_DKV", "W_UK", "W_UV", "out_proj")

    def __init__(
        self,
        d_in: int,
        d_out: int,
        dropout: float,
        num_heads: int,
        latent_dim: int,
        qkv_bias: bool = False,
        *,
        generator: torch.Generator,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.latent_dim = latent_dim
        self.W_query = seeded_linear(d_in, d_out, bias=qkv_bias, generator=generator)
        self.W_DKV = seeded_linear(d_in, latent_dim, bias=qkv_bias, generator=generator)
        self.W_UK = seeded_linear(latent_dim, d_out, bias=qkv_bias, generator=generator)
        self.W_UV = seeded_linear(latent_dim, d_out, bias=qkv_bias, generator=generator)
        self.out_proj = seeded_linear(d_out, d_out, bias=True, generator=generator)
        self.dropout = dropout

    def kv_cache(self, num_tokens: int) -> tuple[int, int]:
        """Only the latent is cached: keys and values are made from it again."""
        return self.latent_dim, num_tokens

    def heads(self, x: torch.Tensor, steps: Steps | None) -> tuple[torch.Tensor, ...]:
        queries = split_heads(self.W_query(x), self.num_heads)  # (b, H, T, head_dim)
        latent = self.W_DKV(x)  # (b, T, latent_dim)
        record(steps, latent=latent)
        keys = split_heads(self.W_UK(latent), self.num_heads)  # (b, H, T, head_dim)
        values = split_heads(self.W_UV(latent), self.num_heads)
        return queries, keys, values
