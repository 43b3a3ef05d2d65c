"""Runs a variant on a batch of inputs, reproducibly and safely across threads.

Every computation draws from its own `torch.Generator`, never the process-wide RNG, so the answer
depends on the request alone however many run at once. Seeded modules are built once and kept in
a bounded cache together with the generator state their construction left behind: dropout then
continues the stream from exactly where `torch.manual_seed(seed); BookClass(...)` would.

Computations below `small.SMALL_WORK_LIMIT` without dropout run the same arithmetic in one call
of a C kernel (see `attention.small`), on numpy copies of the weights kept with the cached module.
"""

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from attention import small
from attention.cache import BoundedCache
from attention.errors import AnswerOverflowError
from attention.parameters import Parameters, named_parameters, with_parameters
from attention.registry import AttentionConfig, Variant

Array = torch.Tensor | np.ndarray


# Not frozen: a frozen dataclass sets its fields through object.__setattr__, a cost paid on every
# request of the small path for no safety the callers need.
@dataclass(slots=True)
class AttentionResult:
    """Tensors from the torch path, numpy arrays from the small path (treat as read-only)."""

    context_vectors: Array  # (b, T, output_dim)
    attention_weights: Array | None  # (b, T, T), or (b, H, T, T) for multi-head
    # The steps asked for by name (see registry.STEPS); "parameters" holds named_parameters.
    steps: dict[str, object] = field(default_factory=dict)
    # (values kept per token, tokens kept per sequence) by one layer's KV cache; None for a
    # variant without keys and values of its own.
    kv_cache: tuple[int, int] | None = None


@dataclass
class SeededModule:
    module: nn.Module
    state_after_init: torch.Tensor
    # Made on the first small computation: a large module never needs a second copy.
    numpy_weights: small.NumpyWeights | None = None
    # num_tokens -> the module's kv_cache(num_tokens), None for a module without one: the
    # module's answer reads its layers through nn.Module's __getattr__, a cost on every request
    # for a figure fixed by the configuration and the length.
    kv_cache_sizes: dict[int, tuple[int, int] | None] = field(default_factory=dict)

    def small_weights(self) -> small.NumpyWeights:
        if self.numpy_weights is None:  # two threads may both copy: the copies are equal
            self.numpy_weights = small.numpy_weights(self.module)
        return self.numpy_weights

    def kv_cache(self, num_tokens: int) -> tuple[int, int] | None:
        """(values kept per token, tokens kept per sequence) by one layer's KV cache."""
        sizes = self.kv_cache_sizes.get(num_tokens, _UNKNOWN)
        if sizes is _UNKNOWN:
            kv_cache = getattr(self.module, "kv_cache", None)
            sizes = None if kv_cache is None else kv_cache(num_tokens)
            if len(self.kv_cache_sizes) < KV_CACHE_SIZES_KEPT:
                self.kv_cache_sizes[num_tokens] = sizes
        return sizes


_UNKNOWN = object()
KV_CACHE_SIZES_KEPT = 4096  # lengths remembered per module: a few dozen kB at most


class AttentionRunner:
    def __init__(self, module_cache_size: int = 32) -> None:
        self._modules: BoundedCache[tuple[str, AttentionConfig], SeededModule]
        self._modules = BoundedCache(module_cache_size)

    def seeded(self, variant: Variant, config: AttentionConfig) -> SeededModule:
        key = (variant.name, config)
        seeded = self._modules.get(key)  # the usual case: no builder to make
        if seeded is not None:
            return seeded

        def build() -> SeededModule:
            generator = torch.Generator()
            if config.seed is not None:
                generator.manual_seed(config.seed)
            module = variant.build(config, generator).eval()
            return SeededModule(module, generator.get_state())

        return self._modules.get_or_create(key, build)

    def module(self, variant: Variant, config: AttentionConfig) -> tuple[nn.Module, torch.Tensor]:
        """The seeded module and the generator state right after its construction."""
        seeded = self.seeded(variant, config)
        return seeded.module, seeded.state_after_init

    def run(
        self,
        variant: Variant,
        inputs: Array,
        config: AttentionConfig,
        *,
        return_weights: bool = True,
        include: tuple[str, ...] = (),
        parameters: Parameters | None = None,
        padding: torch.Tensor | None = None,
        threads: int | None = None,
    ) -> AttentionResult:
        """inputs: (b, T, d_in) float32; padding: (b, T) booleans, True at padded positions.

        `threads`: torch's intra-op threads for a computation torch runs (set for the calling
        thread; OpenMP keeps the setting per thread). The small path does not run in torch and
        leaves it alone: setting it costs a few microseconds, as much as a small computation.

        `include` names the steps to return. `parameters` (named and shaped as
        `named_parameters` gives them) replace the seeded weights, as `load_state_dict` would
        after `torch.manual_seed(seed); BookClass(...)`: dropout still continues the seed's stream.
        Padded keys get no attention; whatever a padded position computes comes back as NaN, so
        no number in the answer stands for padding. An answer that overflowed float32 is
        refused (AnswerOverflowError): its NaNs would read as padding.
        """
        variant.check(config)
        if padding is not None and not padding.any():
            padding = None  # a full mask: the same computation, to the bit, as no mask
        seeded = self.seeded(variant, config)
        weights = self.small_path_weights(variant, seeded, config, inputs, padding, parameters)
        result = None
        if weights is not None:  # the small path cannot overflow: no check needed
            result = self.run_small(seeded, weights, inputs, return_weights, include, parameters)
        if result is None:
            result = self.run_torch(
                seeded, inputs, config, return_weights, include, parameters, padding, threads
            )
            checked_no_overflow(result.context_vectors, padding)
        result.kv_cache = seeded.kv_cache(inputs.shape[1])
        return result

    @staticmethod
    def small_path_weights(
        variant: Variant,
        seeded: SeededModule,
        config: AttentionConfig,
        inputs: Array,
        padding: torch.Tensor | None,
        parameters: Parameters | None,
    ) -> small.NumpyWeights | None:
        """The weights the small path computes with, or None where torch computes: dropout
        (its masks come from torch's stream), padding, work beyond SMALL_WORK_LIMIT, and
        supplied weights large enough to overflow (see small.moderate_weights; the small path
        declines inputs of that kind itself)."""
        if not (
            variant.small_path
            and config.dropout == 0
            and padding is None
            and config.multiply_adds(inputs.shape[0], inputs.shape[1]) <= small.SMALL_WORK_LIMIT
        ):
            return None
        if parameters is None:
            return seeded.small_weights()
        weights = small.numpy_weights(seeded.module, parameters)
        return weights if small.moderate_weights(weights) else None

    @staticmethod
    def run_torch(
        seeded: SeededModule,
        inputs: Array,
        config: AttentionConfig,
        return_weights: bool,
        include: tuple[str, ...],
        parameters: Parameters | None,
        padding: torch.Tensor | None,
        threads: int | None,
    ) -> AttentionResult:
        if threads is not None:
            torch.set_num_threads(threads)
        module, state_after_init = seeded.module, seeded.state_after_init
        if parameters is not None:
            module = with_parameters(module, parameters)
        generator = None
        if config.dropout > 0:  # the only draw after construction
            generator = torch.Generator()
            generator.set_state(state_after_init)
        if isinstance(inputs, np.ndarray):
            inputs = torch.from_numpy(inputs)
        steps: dict[str, torch.Tensor] | None = {} if include else None
        with torch.inference_mode():
            context_vec, attn_weights = module(
                inputs,
                generator=generator,
                return_weights=return_weights,
                steps=steps,
                padding=padding,
            )
            if padding is not None:
                context_vec = blank_padding(context_vec, padding, "rows")
                if attn_weights is not None:
                    attn_weights = blank_padding(attn_weights, padding, "rows")
                for name, step in (steps or {}).items():
                    if name in PADDED_STEP_AXES:
                        steps[name] = blank_padding(step, padding, PADDED_STEP_AXES[name])
        if not include:
            return AttentionResult(context_vec, attn_weights)
        recorded: dict[str, object] = {**steps, "parameters": named_parameters(module)}
        chosen = {name: recorded[name] for name in include}
        return AttentionResult(context_vec, attn_weights, chosen)

    @staticmethod
    def run_small(
        seeded: SeededModule,
        weights: small.NumpyWeights,
        inputs: Array,
        return_weights: bool,
        include: tuple[str, ...],
        parameters: Parameters | None,
    ) -> AttentionResult | None:
        """The small path's result, or None where it declines the inputs (see small.forward)."""
        if isinstance(inputs, torch.Tensor):
            inputs = inputs.numpy()
        steps: small.Steps | None = {} if include else None
        computed = small.forward(weights, inputs, steps=steps)
        if computed is None:
            return None
        context_vec, attn_weights = computed
        attn_weights = attn_weights if return_weights else None
        if not include:
            return AttentionResult(context_vec, attn_weights)
        recorded: dict[str, object] = {
            **steps,
            "parameters": named_parameters(seeded.module) if parameters is None else parameters,
        }
        chosen = {name: recorded[name] for name in include}
        return AttentionResult(context_vec, attn_weights, chosen)


def checked_no_overflow(context_vectors: torch.Tensor, padding: torch.Tensor | None) -> None:
    """Refuse an answer of torch's whose arithmetic overflowed float32 (inputs of ~1e19 and more
    make scores beyond its range): its weights and context vectors would be NaN, which the
    service writes as null, the mark of padding. The context vectors (b, T, d) carry any
    overflow on to the answer, so they alone are checked, over the real positions (padded ones
    are NaN by design)."""
    if padding is not None:
        context_vectors = context_vectors[~padding]  # (real tokens, d)
    if not torch.isfinite(context_vectors).all():
        raise AnswerOverflowError(
            "the computation overflowed float32 (its largest number is about 3.4e38): the "
            "scores of inputs this large are beyond it; scale the inputs down",
            field="embeddings",
        )


# Which axes of each step belong to padded positions: the rows (queries, or tokens) always; the
# columns too for raw scores, which pair queries with padded keys before any mask hides them.
# The masked steps already say -inf (scaled_scores) or 0 (weights) in padded key columns.
PADDED_STEP_AXES = {
    "queries": "rows",
    "group_keys": "rows",
    "group_values": "rows",
    "latent": "rows",
    "keys": "rows",
    "values": "rows",
    "head_outputs": "rows",
    "attention_scores": "rows and columns",
    "scaled_scores": "rows",
    "weights_before_dropout": "rows",
}


def blank_padding(tensor: torch.Tensor, padding: torch.Tensor, axes: str) -> torch.Tensor:
    """NaN wherever `tensor` (b, ..., T, n) belongs to a padded position; padding: (b, T)."""
    middle = [1] * (tensor.dim() - 3)  # the head axis, if any
    batch, num_tokens = padding.shape
    blanked = padding.view(batch, *middle, num_tokens, 1)  # (b, 1.., T, 1): rows
    if axes == "rows and columns":
        blanked = blanked | padding.view(batch, *middle, 1, num_tokens)  # (b, 1.., T, T)
    return tensor.masked_fill(blanked, torch.nan)
