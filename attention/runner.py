"""Runs a variant on a batch of inputs, reproducibly and safely across threads.

Every computation draws from its own `torch.Generator`, never the process-wide RNG, so the answer
depends on the request alone however many run at once. Seeded modules are built once and kept in
a bounded cache together with the generator state their construction left behind: dropout then
continues the stream from exactly where `torch.manual_seed(seed); BookClass(...)` would.

Computations below `small.SMALL_WORK_LIMIT` without dropout run the same arithmetic in numpy
(see `attention.small`), on numpy copies of the weights kept with the cached module.
"""

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from attention import small
from attention.cache import BoundedCache
from attention.parameters import Parameters, named_parameters, with_parameters
from attention.registry import AttentionConfig, Variant

Array = torch.Tensor | np.ndarray


@dataclass(frozen=True)
class AttentionResult:
    """Tensors from the torch path, numpy arrays from the small path."""

    context_vectors: Array  # (b, T, output_dim)
    attention_weights: Array | None  # (b, T, T), or (b, H, T, T) for multi-head
    # The steps asked for by name (see registry.STEPS); "parameters" holds named_parameters.
    steps: dict[str, object] = field(default_factory=dict)


@dataclass
class SeededModule:
    module: nn.Module
    state_after_init: torch.Tensor
    # Made on the first small computation: a large module never needs a second copy.
    numpy_weights: small.NumpyWeights | None = None

    def small_weights(self) -> small.NumpyWeights:
        if self.numpy_weights is None:  # two threads may both copy: the copies are equal
            self.numpy_weights = small.numpy_weights(self.module)
        return self.numpy_weights


class AttentionRunner:
    def __init__(self, module_cache_size: int = 32) -> None:
        self._modules: BoundedCache[tuple[str, AttentionConfig], SeededModule]
        self._modules = BoundedCache(module_cache_size)

    def seeded(self, variant: Variant, config: AttentionConfig) -> SeededModule:
        def build() -> SeededModule:
            generator = torch.Generator()
            if config.seed is not None:
                generator.manual_seed(config.seed)
            module = variant.build(config, generator).eval()
            return SeededModule(module, generator.get_state())

        return self._modules.get_or_create((variant.name, config), build)

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
    ) -> AttentionResult:
        """inputs: (b, T, d_in) float32.

        `include` names the steps to return. `parameters` (named and shaped as
        `named_parameters` gives them) replace the seeded weights, as `load_state_dict` would
        after `torch.manual_seed(seed); BookClass(...)`: dropout still continues the seed's stream.
        """
        variant.check(config)
        seeded = self.seeded(variant, config)
        batch_size, num_tokens = inputs.shape[0], inputs.shape[1]
        if config.dropout == 0 and config.multiply_adds(batch_size, num_tokens) <= (
            small.SMALL_WORK_LIMIT
        ):
            return self.run_small(seeded, inputs, return_weights, include, parameters)
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
                inputs, generator=generator, return_weights=return_weights, steps=steps
            )
        if not include:
            return AttentionResult(context_vec, attn_weights)
        recorded: dict[str, object] = {**steps, "parameters": named_parameters(module)}
        chosen = {name: recorded[name] for name in include}
        return AttentionResult(context_vec, attn_weights, chosen)

    @staticmethod
    def run_small(
        seeded: SeededModule,
        inputs: Array,
        return_weights: bool,
        include: tuple[str, ...],
        parameters: Parameters | None,
    ) -> AttentionResult:
        if parameters is None:
            weights = seeded.small_weights()
        else:
            weights = small.numpy_weights(seeded.module, parameters)
        if isinstance(inputs, torch.Tensor):
            inputs = inputs.numpy()
        steps: small.Steps | None = {} if include else None
        context_vec, attn_weights = small.forward(weights, inputs, steps=steps)
        attn_weights = attn_weights if return_weights else None
        if not include:
            return AttentionResult(context_vec, attn_weights)
        recorded: dict[str, object] = {
            **steps,
            "parameters": named_parameters(seeded.module) if parameters is None else parameters,
        }
        chosen = {name: recorded[name] for name in include}
        return AttentionResult(context_vec, attn_weights, chosen)
