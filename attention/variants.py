"""The book's attention classes of chapter 3, in the book's vocabulary.

Each class takes (b, num_tokens, d_in) and returns `(context_vec, attn_weights)`; the weights are
None when not asked for. Constructors draw their weights from a `generator` in the order the
book's constructors do, so `torch.Generator().manual_seed(seed)` reproduces
`torch.manual_seed(seed); BookClass(...)`. Dropout masks come from the generator passed to
`forward`, continuing the same stream. A `padding` (b, num_tokens) of booleans, True at padded
positions of a batch, hides those keys from every query (see `functional.attend`).

Every class with trainable keys and values says what one layer's KV cache would hold for its
configuration: `kv_cache(num_tokens)` -> (values per token, tokens kept).
"""

import torch
from torch import nn

from attention.functional import attend
from attention.initialisation import seeded_linear, seeded_rand_parameter

Output = tuple[torch.Tensor, torch.Tensor | None]
Steps = dict[str, torch.Tensor]  # intermediate tensors by the book's names, filled when given


def record(steps: Steps | None, **tensors: torch.Tensor) -> None:
    if steps is not None:
        steps.update(tensors)


class SimplifiedSelfAttention(nn.Module):
    """Section 3.3: the inputs are their own queries, keys and values; no weights, no scaling."""

    def forward(
        self,
        x: torch.Tensor,
        *,
        generator: torch.Generator | None = None,
        return_weights: bool = True,
        steps: Steps | None = None,
        padding: torch.Tensor | None = None,
    ) -> Output:
        return attend(
            x,
            x,
            x,
            causal=False,
            scaled=False,
            return_weights=return_weights,
            steps=steps,
            padding=padding,
        )


class SelfAttention_v1(nn.Module):  # the book's name
    """Section 3.4.1: weight matrices as `nn.Parameter(torch.rand(d_in, d_out))`."""

    def __init__(self, d_in: int, d_out: int, *, generator: torch.Generator) -> None:
        super().__init__()
        self.W_query = seeded_rand_parameter(d_in, d_out, generator=generator)
        self.W_key = seeded_rand_parameter(d_in, d_out, generator=generator)
        self.W_value = seeded_rand_parameter(d_in, d_out, generator=generator)

    def kv_cache(self, num_tokens: int) -> tuple[int, int]:
        return 2 * self.W_key.shape[1], num_tokens

    def forward(
        self,
        x: torch.Tensor,
        *,
        generator: torch.Generator | None = None,
        return_weights: bool = True,
        steps: Steps | None = None,
        padding: torch.Tensor | None = None,
    ) -> Output:
        keys = x @ self.W_key  # (b, T, d_out)
        queries = x @ self.W_query
        values = x @ self.W_value
        record(steps, queries=queries, keys=keys, values=values)
        return attend(
            queries,
            keys,
            values,
            causal=False,
            return_weights=return_weights,
            steps=steps,
            padding=padding,
        )


class SelfAttention_v2(nn.Module):  # the book's name
    """Section 3.4.2: `nn.Linear` projections, with their better-behaved initialisation."""

    def __init__(
        self, d_in: int, d_out: int, qkv_bias: bool = False, *, generator: torch.Generator
    ) -> None:
        super().__init__()
        self.W_query = seeded_linear(d_in, d_out, bias=qkv_bias, generator=generator)
        self.W_key = seeded_linear(d_in, d_out, bias=qkv_bias, generator=generator)
        self.W_value = seeded_linear(d_in, d_out, bias=qkv_bias, generator=generator)

    def kv_cache(self, num_tokens: int) -> tuple[int, int]:
        return 2 * self.W_key.out_features, num_tokens

    def forward(
        self,
        x: torch.Tensor,
        *,
        generator: torch.Generator | None = None,
        return_weights: bool = True,
        steps: Steps | None = None,
        padding: torch.Tensor | None = None,
    ) -> Output:
        keys = self.W_key(x)  # (b, T, d_out)
        queries = self.W_query(x)
        values = self.W_value(x)
        record(steps, queries=queries, keys=keys, values=values)
        return attend(
            queries,
            keys,
            values,
            causal=False,
            return_weights=return_weights,
            steps=steps,
            padding=padding,
        )


class CausalAttention(nn.Module):
    """Section 3.5: SelfAttention_v2 plus the causal mask and dropout on the weights."""

    def __init__(
        self,
        d_in: int,
        d_out: int,
        dropout: float,
        qkv_bias: bool = False,
        *,
        generator: torch.Generator,
    ) -> None:
        super().__init__()
        self.W_query = seeded_linear(d_in, d_out, bias=qkv_bias, generator=generator)
        self.W_key = seeded_linear(d_in, d_out, bias=qkv_bias, generator=generator)
        self.W_value = seeded_linear(d_in, d_out, bias=qkv_bias, generator=generator)
        self.dropout = dropout

    def kv_cache(self, num_tokens: int) -> tuple[int, int]:
        return 2 * self.W_key.out_features, num_tokens

    def forward(
        self,
        x: torch.Tensor,
        *,
        generator: torch.Generator | None = None,
        return_weights: bool = True,
        steps: Steps | None = None,
        padding: torch.Tensor | None = None,
    ) -> Output:
        keys = self.W_key(x)  # (b, T, d_out)
        queries = self.W_query(x)
        values = self.W_value(x)
        record(steps, queries=queries, keys=keys, values=values)
        return attend(
            queries,
            keys,
            values,
            causal=True,
            dropout=self.dropout,
            generator=generator,
            return_weights=return_weights,
            steps=steps,
            padding=padding,
        )


class MultiHeadAttentionWrapper(nn.Module):
    """Section 3.6.1: `num_heads` independent CausalAttention heads, outputs concatenated."""

    def __init__(
        self,
        d_in: int,
        d_out: int,
        dropout: float,
        num_heads: int,
        qkv_bias: bool = False,
        *,
        generator: torch.Generator,
    ) -> None:
        super().__init__()
        self.heads = nn.ModuleList(
            CausalAttention(d_in, d_out, dropout, qkv_bias, generator=generator)
            for _ in range(num_heads)
        )

    def kv_cache(self, num_tokens: int) -> tuple[int, int]:
        """Every head keeps its own keys and values."""
        return sum(head.kv_cache(num_tokens)[0] for head in self.heads), num_tokens

    def forward(
        self,
        x: torch.Tensor,
        *,
        generator: torch.Generator | None = None,
        return_weights: bool = True,
        steps: Steps | None = None,
        padding: torch.Tensor | None = None,
    ) -> Output:
        # Heads run in order, so each draws its dropout mask after the previous one, as in the book.
        head_steps: list[Steps | None] = [None if steps is None else {} for _ in self.heads]
        outputs = [
            head(x, generator=generator, return_weights=return_weights, steps=own, padding=padding)
            for head, own in zip(self.heads, head_steps, strict=True)
        ]
        if steps is not None:  # each head's steps stacked on a head axis: (b, H, ...)
            for name in head_steps[0]:
                if name == "mask":  # (T, T), the same for every head
                    steps[name] = head_steps[0][name]
                else:
                    steps[name] = torch.stack([own[name] for own in head_steps], dim=1)
            steps["head_outputs"] = torch.stack([context for context, _ in outputs], dim=1)
        context_vec = torch.cat([context for context, _ in outputs], dim=-1)  # (b, T, H * d_out)
        if not return_weights:
            return context_vec, None
        return context_vec, torch.stack([weights for _, weights in outputs], dim=1)  # (b, H, T, T)


def split_heads(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(b, T, num_heads x width) -> (b, num_heads, T, width)."""
    b, num_tokens, width = t.shape
    return t.view(b, num_tokens, num_heads, width // num_heads).transpose(1, 2)


def merge_heads(t: torch.Tensor) -> torch.Tensor:
    """(b, num_heads, T, width) -> (b, T, num_heads x width)."""
    b, num_heads, num_tokens, width = t.shape
    return t.transpose(1, 2).reshape(b, num_tokens, num_heads * width)


class SplitHeadsAttention(nn.Module):
    """Causal attention over heads that split d_out, their outputs merged by `out_proj`: section
    3.6.2's shape, which the bonus material's classes keep. A subclass makes each head's
    queries, keys and values (`heads`), and may set a sliding `window_size`."""

    window_size: int | None = None
    num_heads: int
    dropout: float
    out_proj: nn.Linear

    def heads(self, x: torch.Tensor, steps: Steps | None) -> tuple[torch.Tensor, ...]:
        """Queries, keys and values, each (b, H, T, head_dim); a subclass records its own
        intermediate steps."""
        raise NotImplementedError

    def forward(
        self,
        x: torch.Tensor,
        *,
        generator: torch.Generator | None = None,
        return_weights: bool = True,
        steps: Steps | None = None,
        padding: torch.Tensor | None = None,
    ) -> Output:
        queries, keys, values = self.heads(x, steps)  # (b, H, T, head_dim) each
        record(steps, queries=queries, keys=keys, values=values)
        context_vec, attn_weights = attend(
            queries,
            keys,
            values,
            causal=True,
            dropout=self.dropout,
            generator=generator,
            return_weights=return_weights,
            steps=steps,
            padding=padding,
            window=self.window_size,
        )  # (b, H, T, head_dim), (b, H, T, T)
        record(steps, head_outputs=context_vec)
        return self.out_proj(merge_heads(context_vec)), attn_weights  # (b, T, d_out)


class MultiHeadAttention(SplitHeadsAttention):
    """Section 3.6.2: one set of projections split into heads, recombined by `out_proj`."""

    def __init__(
        self,
        d_in: int,
        d_out: int,
        dropout: float,
        num_heads: int,
        qkv_bias: bool = False,
        *,
        generator: torch.Generator,
    ) -> None:
        super().__init__()
        if d_out % num_heads != 0:
            raise ValueError("d_out must be divisible by num_heads")
        self.d_out = d_out
        self.num_heads = num_heads
        self.W_query = seeded_linear(d_in, d_out, bias=qkv_bias, generator=generator)
        self.W_key = seeded_linear(d_in, d_out, bias=qkv_bias, generator=generator)
        self.W_value = seeded_linear(d_in, d_out, bias=qkv_bias, generator=generator)
        self.out_proj = seeded_linear(d_out, d_out, bias=True, generator=generator)
        self.dropout = dropout

    def kv_cache(self, num_tokens: int) -> tuple[int, int]:
        return 2 * self.d_out, num_tokens

    def heads(self, x: torch.Tensor, steps: Steps | None) -> tuple[torch.Tensor, ...]:
        return tuple(
            split_heads(layer(x), self.num_heads)  # (b, T, d_out) -> (b, H, T, head_dim)
            for layer in (self.W_query, self.W_key, self.W_value)
        )
