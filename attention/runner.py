"""Runs a variant on a batch of inputs, reproducibly and safely across threads.

Every computation draws from its own `torch.Generator`, never the process-wide RNG, so the answer
depends on the request alone however many run at once. Seeded modules are built once and kept in
a bounded cache together with the generator state their construction left behind: dropout then
continues the stream from exactly where `torch.manual_seed(seed); BookClass(...)` would.
"""

from dataclasses import dataclass, field

import torch
from torch import nn

from attention.cache import BoundedCache
from attention.parameters import Parameters, named_parameters, with_parameters
from attention.registry import AttentionConfig, Variant


@dataclass(frozen=True)
class AttentionResult:
    context_vectors: torch.Tensor  # (b, T, output_dim)
    attention_weights: torch.Tensor | None  # (b, T, T), or (b, H, T, T) for multi-head
    # The steps asked for by name (see registry.STEPS); "parameters" holds named_parameters.
    steps: dict[str, object] = field(default_factory=dict)


class AttentionRunner:
    def __init__(self, module_cache_size: int = 32) -> None:
        self._modules: BoundedCache[tuple[str, AttentionConfig], tuple[nn.Module, torch.Tensor]]
        self._modules = BoundedCache(module_cache_size)

    def module(self, variant: Variant, config: AttentionConfig) -> tuple[nn.Module, torch.Tensor]:
        """The seeded module and the generator state right after its construction."""

        def build() -> tuple[nn.Module, torch.Tensor]:
            generator = torch.Generator()
            if config.seed is not None:
                generator.manual_seed(config.seed)
            module = variant.build(config, generator).eval()
            return module, generator.get_state()

        return self._modules.get_or_create((variant.name, config), build)

    def run(
        self,
        variant: Variant,
        inputs: torch.Tensor,
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
        module, state_after_init = self.module(variant, config)
        if parameters is not None:
            module = with_parameters(module, parameters)
        generator = None
        if config.dropout > 0:  # the only draw after construction
            generator = torch.Generator()
            generator.set_state(state_after_init)
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
