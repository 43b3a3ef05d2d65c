"""The one registry of attention variants: what each is, what it accepts, how to build it.

The service's routes, `GET /attention`, the OpenAPI examples and the tests all read `VARIANTS`.
"""

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields

import torch
from torch import nn

from attention import bonus, variants
from attention.book import BOOK_BATCH, BOOK_INPUTS, BOOK_SENTENCE
from attention.errors import AttentionInputError

# Parameters every variant with trainable weights accepts; `simplified` has none of them.
WEIGHTED = ("d_out", "seed", "qkv_bias", "parameters")

# The intermediate tensors a request may `include`, in the order the computation makes them.
STEPS = (
    "queries",  # x @ W_query: (b, T, d_out); multi-head per head (b, H, T, head_dim)
    "group_keys",  # grouped-query: each group's keys before sharing, (b, G, T, head_dim)
    "group_values",
    "latent",  # latent attention: the shared latent keys and values come from, (b, T, latent)
    "keys",  # multi-head: each head's, after any sharing or up-projection
    "values",
    "attention_scores",  # queries @ keys.T, raw: (b, T, T); multi-head (b, H, T, T)
    "mask",  # (T, T) booleans, True where a query may not look (the future, outside a window)
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
    # The variant's own parameters (see Option), resolved: ((name, value), ...).
    options: tuple[tuple[str, int], ...] = ()

    # Derived from the fields once, in __post_init__: the service makes each configuration once
    # (service.engine.attention_config) and reads these several times per request.
    # MultiHeadAttentionWrapper's heads are each d_out wide, side by side (`stacks_heads`);
    # every other multi-head class splits d_out into its heads.
    stacks_heads: bool = field(init=False, repr=False, compare=False)
    head_dim: int = field(init=False, repr=False, compare=False)  # one head's q, k, v width
    output_dim: int = field(init=False, repr=False, compare=False)  # the context vectors' width

    def __post_init__(self) -> None:
        stacks_heads = self.implementation == "wrapper"
        derived = {
            "stacks_heads": stacks_heads,
            "head_dim": self.d_out if stacks_heads else self.d_out // self.num_heads,
            "output_dim": self.d_out * self.num_heads if stacks_heads else self.d_out,
            # Configurations key the cache of seeded modules, hashed twice per request: the
            # hash is kept rather than built from every field on each call.
            "_hash": hash(tuple(getattr(self, name) for name in _CONFIG_FIELDS)),
        }
        for name, value in derived.items():
            object.__setattr__(self, name, value)

    def __hash__(self) -> int:
        return self._hash

    def option(self, name: str) -> int:
        return dict(self.options)[name]

    def widths(self, variant: "Variant") -> list[int]:
        """The variant's options that are tensor widths (see Option.is_width), resolved."""
        return [self.option(option.name) for option in variant.options if option.is_width]

    def multiply_adds(self, batch_size: int, num_tokens: int) -> int:
        """Rough size of a computation: the projections and the two T x T products."""
        projections = 4 * self.d_in * self.output_dim
        attention = 2 * self.num_heads * num_tokens * self.head_dim
        return batch_size * num_tokens * (projections + attention)


_CONFIG_FIELDS = tuple(f.name for f in fields(AttentionConfig) if f.compare)

Builder = Callable[[AttentionConfig, torch.Generator], nn.Module]
Check = Callable[[AttentionConfig], None]  # raises AttentionInputError


@dataclass(frozen=True)
class Option:
    """A whole-number parameter that only its variant takes (`num_kv_groups`, say); the service
    makes it a request field with these bounds and this description."""

    name: str
    description: str
    default: int | None  # None: `derive(d_out)` gives it
    minimum: int = 1
    maximum: int | None = None
    derive: Callable[[int], int] | None = None
    # A tensor's width (latent_dim): the service holds it to the limit it sets on d_out.
    is_width: bool = False

    def resolve(self, value: int | None, d_out: int) -> int:
        if value is not None:
            return value
        return self.default if self.derive is None else self.derive(d_out)


@dataclass(frozen=True)
class Example:
    """A request body for the variant, shown in the OpenAPI document."""

    summary: str
    body: Mapping[str, object]


# eq=False: each variant is one object of the registry, compared and hashed by identity. Lookups
# keyed by a variant (its request model, its fields) run on every request, and a dataclass's
# hash is a Python call hashing every field, its long description included.
@dataclass(frozen=True, eq=False)
class Variant:
    name: str
    description: str
    book_section: str
    # Request parameters this variant accepts, beyond the input and `return_weights`: the shared
    # ones (the service's schemas describe them) and its options.
    parameters: tuple[str, ...]
    # implementation value -> (book class name, builder); the first is the default.
    implementations: Mapping[str | None, tuple[str | None, Builder]] = field(
        repr=False, compare=False
    )
    multi_head: bool = False
    # The names `include` accepts for this variant (a subset of STEPS).
    steps: tuple[str, ...] = ()
    options: tuple[Option, ...] = ()
    # What the configuration must satisfy beyond each field's own range.
    checks: tuple[Check, ...] = ()
    # Computations small enough run on numpy copies of the weights (attention.small), which
    # knows chapter 3's classes only.
    small_path: bool = True
    # Requests that show the variant, by key; the first reproduces what the book prints.
    examples: Mapping[str, Example] = field(default_factory=dict, repr=False)

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
        for check in self.checks:
            check(config)

    def build(self, config: AttentionConfig, generator: torch.Generator) -> nn.Module:
        self.check(config)
        return self.implementations[config.implementation][1](config, generator)


# --- checks ------------------------------------------------------------------------------------


def no_bias_without_linear_layers(config: AttentionConfig) -> None:
    if config.implementation == "v1" and config.qkv_bias:
        raise AttentionInputError(
            "qkv_bias needs implementation 'v2': SelfAttention_v1 has no bias vectors",
            field="qkv_bias",
            value=config.qkv_bias,
        )


def heads_split_d_out(config: AttentionConfig) -> None:
    if not config.stacks_heads and config.d_out % config.num_heads != 0:
        raise AttentionInputError(
            f"d_out={config.d_out} is not divisible by num_heads={config.num_heads}: "
            "the heads split d_out into equal parts",
            field="d_out",
            value=config.d_out,
        )


def groups_split_heads(config: AttentionConfig) -> None:
    groups = config.option("num_kv_groups")
    if config.num_heads % groups != 0:
        raise AttentionInputError(
            f"num_kv_groups={groups} does not divide num_heads={config.num_heads}: each group "
            "of keys and values serves an equal number of heads",
            field="num_kv_groups",
            value=groups,
        )


# --- the variants ------------------------------------------------------------------------------

MULTI_HEAD = (*WEIGHTED, "dropout", "num_heads")
MULTI_HEAD_STEPS = (*CAUSAL_STEPS, "head_outputs")

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
            examples={
                "book": Example("Book 3.3: the six 3-d inputs", {"embeddings": BOOK_INPUTS}),
                "text": Example("A sentence, GPT-2 tokens", {"text": BOOK_SENTENCE, "decimals": 4}),
            },
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
            checks=(no_bias_without_linear_layers,),
            examples={
                "book_v2": Example(
                    "Book 3.4: SelfAttention_v2, seed 789",
                    {"embeddings": BOOK_INPUTS, "d_out": 2, "seed": 789},
                ),
                "book_v1": Example(
                    "Book 3.4: SelfAttention_v1, seed 123",
                    {"embeddings": BOOK_INPUTS, "d_out": 2, "seed": 123, "implementation": "v1"},
                ),
            },
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
            examples={
                "book": Example(
                    "Book 3.5: CausalAttention, seed 123, two-item batch",
                    {"embeddings": BOOK_BATCH, "d_out": 2, "seed": 123},
                ),
                "dropout": Example(
                    "With dropout 0.5 on the weights",
                    {"embeddings": BOOK_INPUTS, "d_out": 2, "seed": 123, "dropout": 0.5},
                ),
                "texts": Example(
                    "Two texts, the shorter padded (see padding_mask)",
                    {"text": [BOOK_SENTENCE, "Your journey"], "embedding_dim": 4, "decimals": 4},
                ),
                "attention_mask": Example(
                    "A batch whose second item has four real tokens",
                    {
                        "embeddings": BOOK_BATCH,
                        "attention_mask": [[1] * 6, [1, 1, 1, 1, 0, 0]],
                        "d_out": 2,
                        "seed": 123,
                    },
                ),
            },
        ),
        Variant(
            name="multi-head",
            description="Multi-head causal attention: several heads side by side, either "
            "one fused set of weights split into heads or stacked single heads.",
            book_section="3.6",
            parameters=(*MULTI_HEAD, "implementation"),
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
            steps=MULTI_HEAD_STEPS,
            checks=(heads_split_d_out,),
            examples={
                "book_fused": Example(
                    "Book 3.6: MultiHeadAttention, seed 123, 2 heads",
                    {"embeddings": BOOK_BATCH, "d_out": 2, "num_heads": 2, "seed": 123},
                ),
                "book_wrapper": Example(
                    "Book 3.6: MultiHeadAttentionWrapper, seed 123, 2 heads",
                    {
                        "embeddings": BOOK_BATCH,
                        "d_out": 2,
                        "num_heads": 2,
                        "seed": 123,
                        "implementation": "wrapper",
                    },
                ),
                "text": Example(
                    "A sentence, 4 heads over 16-d embeddings",
                    {"text": BOOK_SENTENCE, "embedding_dim": 16, "num_heads": 4, "decimals": 4},
                ),
            },
        ),
        Variant(
            name="grouped-query",
            description="Grouped-query attention: causal multi-head attention whose keys and "
            "values are made for a few groups of heads only, each group shared by its heads "
            "(one group: multi-query attention).",
            book_section="chapter 4 bonus, 04_gqa",
            parameters=(*MULTI_HEAD, "num_kv_groups"),
            implementations={
                None: (
                    "GroupedQueryAttention",
                    lambda config, generator: bonus.GroupedQueryAttention(
                        config.d_in,
                        config.d_out,
                        config.dropout,
                        config.num_heads,
                        config.option("num_kv_groups"),
                        config.qkv_bias,
                        generator=generator,
                    ),
                )
            },
            multi_head=True,
            steps=(*MULTI_HEAD_STEPS, "group_keys", "group_values"),
            options=(
                Option(
                    "num_kv_groups",
                    "groups of heads that share one set of keys and values; must divide "
                    "num_heads (1: multi-query attention; num_heads: multi-head attention)",
                    default=1,
                ),
            ),
            checks=(heads_split_d_out, groups_split_heads),
            small_path=False,
            examples={
                "book": Example(
                    "The book's inputs, 4 heads sharing 2 groups of keys and values",
                    {
                        "embeddings": BOOK_INPUTS,
                        "d_out": 8,
                        "num_heads": 4,
                        "num_kv_groups": 2,
                        "seed": 123,
                        "decimals": 4,
                    },
                ),
                "multi_query": Example(
                    "Multi-query attention: one group for every head",
                    {"text": BOOK_SENTENCE, "embedding_dim": 16, "num_heads": 4, "decimals": 4},
                ),
            },
        ),
        Variant(
            name="sliding-window",
            description="Sliding-window attention: causal multi-head attention in which a "
            "query sees only the window_size latest tokens, itself included.",
            book_section="chapter 4 bonus, 06_swa",
            parameters=(*MULTI_HEAD, "window_size"),
            implementations={
                None: (
                    "MultiHeadAttentionWithSWA",
                    lambda config, generator: bonus.MultiHeadAttentionWithSWA(
                        config.d_in,
                        config.d_out,
                        config.dropout,
                        config.num_heads,
                        config.option("window_size"),
                        config.qkv_bias,
                        generator=generator,
                    ),
                )
            },
            multi_head=True,
            steps=MULTI_HEAD_STEPS,
            options=(
                Option(
                    "window_size",
                    "how many of the latest tokens a query sees, itself included: query i sees "
                    "key j when 0 <= i - j < window_size (at least the input's length: plain "
                    "causal attention)",
                    default=4,
                    maximum=2**31 - 1,
                ),
            ),
            checks=(heads_split_d_out,),
            small_path=False,
            examples={
                "book": Example(
                    "The book's inputs, each token seeing itself and the 2 before it",
                    {
                        "embeddings": BOOK_INPUTS,
                        "d_out": 2,
                        "window_size": 3,
                        "seed": 123,
                        "decimals": 4,
                    },
                ),
                "text": Example(
                    "A sentence, a window of 2 tokens",
                    {"text": BOOK_SENTENCE, "embedding_dim": 16, "window_size": 2, "decimals": 4},
                ),
            },
        ),
        Variant(
            name="latent",
            description="Multi-head latent attention: causal multi-head attention whose keys "
            "and values are up-projected from one small latent per token, all a KV cache keeps.",
            book_section="chapter 4 bonus, 05_mla",
            parameters=(*MULTI_HEAD, "latent_dim"),
            implementations={
                None: (
                    "MultiHeadLatentAttention",
                    lambda config, generator: bonus.MultiHeadLatentAttention(
                        config.d_in,
                        config.d_out,
                        config.dropout,
                        config.num_heads,
                        config.option("latent_dim"),
                        config.qkv_bias,
                        generator=generator,
                    ),
                )
            },
            multi_head=True,
            steps=(*MULTI_HEAD_STEPS, "latent"),
            options=(
                Option(
                    "latent_dim",
                    "width of the latent keys and values are made from; default "
                    "max(16, d_out // 8)",
                    default=None,
                    derive=lambda d_out: max(16, d_out // 8),
                    is_width=True,
                ),
            ),
            checks=(heads_split_d_out,),
            small_path=False,
            examples={
                "book": Example(
                    "The book's inputs, keys and values from a 2-wide latent",
                    {
                        "embeddings": BOOK_INPUTS,
                        "d_out": 4,
                        "latent_dim": 2,
                        "seed": 123,
                        "decimals": 4,
                    },
                ),
                "text": Example(
                    "A sentence, the default latent (16 wide)",
                    {"text": BOOK_SENTENCE, "embedding_dim": 16, "decimals": 4},
                ),
            },
        ),
    )
}
