"""The one registry of attention variants: what each is, what it accepts, how to build it.

The service's routes, `GET /attention`, the OpenAPI examples and the tests all read `VARIANTS`.
"""

from collections.abc import Callable, Mapping
from dataclasses import astuple, dataclass, field

import torch
from torch import nn

from attention import variants
from attention.errors import AttentionInputError

# Parameters every variant with trainable weights accepts; `simplified` has none of them.
WEIGHTED = ("d_out", "seed", "qkv_bias", "parameters")

# The intermediate tensors a request may `include`, in the order the computation makes them.
STEPS = (
    "queries",  # x @ W_query: (b, T, d_out); multi-head per head (b, H, T, head_dim)
    "keys",
    "values",
    "attention_scores",  # queries @ keys.T, raw: (b, T, T); multi-head (b, H, T, T)
    "mask",  # (T, T) booleans, True where a query may not look (the future)
    "scaled_scores",  # what the softmax sees: masked with -inf, divided by sqrt(d_k)
    "weights_before_dropout",  # the softmax's output, before dropout
    "head_outputs",  # each head's context vectors, before out_proj or concatenation
    "parameters",  # every weight matrix and bias, x @ W convention
)
TRAINED_STEPS = ("queries", "keys", "values", "attention_scores", "scaled_scores", "parameters")
CAUSAL_STEPS = (*TRAINED_STEPS, "mask", "weights_before_dropout")


@dataclass(frozen=True)
class AttentionConfig:
    """Every parameter of one computation, resolved (no defaults left to apply)."""

    d_in: int
    d_out: int
    num_heads: int = 1
    seed: int | None = None
    dropout: float = 0.0
    qkv_bias: bool = False
    implementation: str | None = None

    def __post_init__(self) -> None:
        # Configurations key the cache of seeded modules, hashed twice per request, and the
        # service makes each one once (service.engine.attention_config): its hash is kept
        # rather than built from every field on each call.
        object.__setattr__(self, "_hash", hash(astuple(self)))

    def __hash__(self) -> int:
        return self._hash

    @property
    def head_dim(self) -> int:
        """Width of one head's queries, keys and values."""
        if self.implementation == "fused":
            return self.d_out // self.num_heads
        return self.d_out

    @property
    def output_dim(self) -> int:
        """Width of the context vectors: the wrapper concatenates its heads."""
        if self.implementation == "wrapper":
            return self.d_out * self.num_heads
        return self.d_out

    def multiply_adds(self, batch_size: int, num_tokens: int) -> int:
        """Rough size of a computation: the projections and the two T x T products."""
        projections = 4 * self.d_in * self.output_dim
        attention = 2 * self.num_heads * num_tokens * self.head_dim
        return batch_size * num_tokens * (projections + attention)


Builder = Callable[[AttentionConfig, torch.Generator], nn.Module]


# eq=False: each variant is one object of the registry, compared and hashed by identity. Lookups
# keyed by a variant (its request model, its fields) run on every request, and a dataclass's
# hash is a Python call hashing every field, its long description included.
@dataclass(frozen=True, eq=False)
class Variant:
    name: str
    description: str
    book_section: str
    # Request parameters this variant accepts, beyond the input and `return_weights`.
    parameters: tuple[str, ...]
    # implementation value -> (book class name, builder); the first is the default.
    implementations: Mapping[str | None, tuple[str | None, Builder]] = field(
        repr=False, compare=False
    )
    multi_head: bool = False
    # The names `include` accepts for this variant (a subset of STEPS).
    steps: tuple[str, ...] = ()

    @property
    def step_names(self) -> list[str]:
        """This variant's steps, in STEPS's order."""
        return [name for name in STEPS if name in self.steps]

    @property
    def default_implementation(self) -> str | None:
        return next(iter(self.implementations))

    @property
    def implementation_names(self) -> list[str]:
        return [name for name in self.implementations if name is not None]

    def book_class(self, implementation: str | None) -> str | None:
        return self.implementations[implementation][0]

    def check(self, config: AttentionConfig) -> None:
        """Raise AttentionInputError for a combination of parameters this variant cannot run."""
        if config.implementation not in self.implementations:
            raise AttentionInputError(
                f"implementation {config.implementation!r} is not one of "
                f"{self.implementation_names} for variant {self.name!r}",
                field="implementation",
                value=config.implementation,
            )
        if config.implementation == "v1" and config.qkv_bias:
            raise AttentionInputError(
                "qkv_bias needs implementation 'v2': SelfAttention_v1 has no bias vectors",
                field="qkv_bias",
                value=config.qkv_bias,
            )
        if config.implementation == "fused" and config.d_out % config.num_heads != 0:
            raise AttentionInputError(
                f"d_out={config.d_out} is not divisible by num_heads={config.num_heads}: "
                f"the fused implementation splits d_out into equal heads",
                field="d_out",
                value=config.d_out,
            )

    def build(self, config: AttentionConfig, generator: torch.Generator) -> nn.Module:
        self.check(config)
        return self.implementations[config.implementation][1](config, generator)


VARIANTS: dict[str, Variant] = {
    variant.name: variant
    for variant in (
        Variant(
            name="simplified",
            description="Simplified self-attention: dot products of the inputs themselves, "
            "no trainable weights.",
            book_section="3.3",
            parameters=(),
            implementations={
                None: (None, lambda config, generator: variants.SimplifiedSelfAttention())
            },
            steps=("attention_scores",),
        ),
        Variant(
            name="self-attention",
            description="Scaled dot-product self-attention with trainable query, key and "
            "value weights.",
            book_section="3.4",
            parameters=(*WEIGHTED, "implementation"),
            implementations={
                "v2": (
                    "SelfAttention_v2",
                    lambda config, generator: variants.SelfAttention_v2(
                        config.d_in, config.d_out, config.qkv_bias, generator=generator
                    ),
                ),
                "v1": (
                    "SelfAttention_v1",
                    lambda config, generator: variants.SelfAttention_v1(
                        config.d_in, config.d_out, generator=generator
                    ),
                ),
            },
            steps=TRAINED_STEPS,
        ),
        Variant(
            name="causal",
            description="Causal (masked) self-attention: each token attends only to itself "
            "and earlier tokens, with dropout on the weights.",
            book_section="3.5",
            parameters=(*WEIGHTED, "dropout"),
            implementations={
                None: (
                    "CausalAttention",
                    lambda config, generator: variants.CausalAttention(
                        config.d_in,
                        config.d_out,
                        config.dropout,
                        config.qkv_bias,
                        generator=generator,
                    ),
                )
            },
            steps=CAUSAL_STEPS,
        ),
        Variant(
            name="multi-head",
            description="Multi-head causal attention: several heads side by side, either "
            "one fused set of weights split into heads or stacked single heads.",
            book_section="3.6",
            parameters=(*WEIGHTED, "dropout", "num_heads", "implementation"),
            implementations={
                "fused": (
                    "MultiHeadAttention",
                    lambda config, generator: variants.MultiHeadAttention(
                        config.d_in,
                        config.d_out,
                        config.dropout,
                        config.num_heads,
                        config.qkv_bias,
                        generator=generator,
                    ),
                ),
                "wrapper": (
                    "MultiHeadAttentionWrapper",
                    lambda config, generator: variants.MultiHeadAttentionWrapper(
                        config.d_in,
                        config.d_out,
                        config.dropout,
                        config.num_heads,
                        config.qkv_bias,
                        generator=generator,
                    ),
                ),
            },
            multi_head=True,
            steps=(*CAUSAL_STEPS, "head_outputs"),
        ),
    )
}
