"""From a validated request to the answer's JSON bytes: limits, inputs, computation, output.

One Engine per app holds what is expensive to make (seeded modules, embedding tables); the
GPT-2 encoding is loaded once per process.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
import torch
from fastapi.exceptions import RequestValidationError

from attention import (
    AttentionConfig,
    AttentionRunner,
    EmbeddingTables,
    Token,
    Variant,
    gpt2_encoding,
    tokenize,
)
from service.parsing import body_error
from service.schemas import TEXT_PARAMETERS, RequestBase
from service.settings import Settings


@dataclass(frozen=True)
class Job:
    """One computation, checked against every limit and ready to run."""

    variant: Variant
    request: RequestBase
    config: AttentionConfig
    batched: bool
    embeddings: np.ndarray | None  # (B, T, d_in), or None for text input
    tokens: list[Token] | None
    batch_size: int
    num_tokens: int

    @property
    def multiply_adds(self) -> int:
        """Rough size of the computation, to choose between the event loop and a thread."""
        projections = 4 * self.config.d_in * self.config.output_dim
        attention = 2 * self.config.num_heads * self.num_tokens * self.config.head_dim
        return self.batch_size * self.num_tokens * (projections + attention)


class Engine:
    def __init__(
        self, settings: Settings, count_tokens: Callable[[str, int], None] | None = None
    ) -> None:
        self.settings = settings
        self.count_tokens = count_tokens  # (variant, tokens computed), for the metrics
        self.runner = AttentionRunner(settings.module_cache_size)
        self.tables = EmbeddingTables(settings.embedding_cache_size)
        self.threads = settings.torch_threads or torch.get_num_threads()

    def warm_up(self) -> None:
        """Load the encoding and the default embedding tables before the first request."""
        gpt2_encoding()
        defaults = RequestBase.model_fields
        self.tables.tables(
            defaults["embedding_dim"].default,
            defaults["context_length"].default,
            defaults["embedding_seed"].default,
        )

    def prepare(self, variant: Variant, request: RequestBase) -> Job:
        """Resolve the parameters and refuse, before any work, what the limits do not allow."""
        limits = LimitCheck(self.settings)
        given = request.model_fields_set
        if (request.embeddings is None) == (request.text is None):
            raise RequestValidationError(
                [
                    body_error(
                        (),
                        "send exactly one input: 'embeddings' (rows of numbers) or 'text'"
                        + (", not both" if request.text is not None else ""),
                        "missing" if request.text is None else "value_error",
                    )
                ]
            )

        tokens = None
        if request.text is not None:
            limits.at_most(("text",), "characters of text", len(request.text), "max_text_chars")
            limits.at_most(("embedding_dim",), "embedding_dim", request.embedding_dim, "max_dim")
            limits.at_most(
                ("context_length",),
                "context_length",
                request.context_length,
                "max_context_length",
            )
            limits.raise_if_any()
            tokens = tokenize(request.text)
            if not tokens:
                raise RequestValidationError([body_error(("text",), "text has no tokens")])
            if len(tokens) > request.context_length:
                raise RequestValidationError(
                    [
                        body_error(
                            ("text",),
                            f"the text has {len(tokens)} tokens, more than context_length="
                            f"{request.context_length}; shorten it or raise context_length",
                            "too_long",
                        )
                    ]
                )
            batched, batch_size, num_tokens, d_in = False, 1, len(tokens), request.embedding_dim
        else:
            misplaced = sorted(given & set(TEXT_PARAMETERS))
            if misplaced:
                raise RequestValidationError(
                    [
                        body_error((name,), f"{name!r} applies to 'text' input only")
                        for name in misplaced
                    ]
                )
            shape = request.embeddings.shape
            batched = len(shape) == 3
            batch_size, num_tokens, d_in = shape if batched else (1, *shape)
            limits.at_most(("embeddings",), "batch size", batch_size, "max_batch_size")
            limits.at_most(("embeddings",), "d_in", d_in, "max_dim")

        config = self.resolve(variant, request, d_in)
        limits.at_most(
            ("embeddings" if tokens is None else "text",), "tokens", num_tokens, "max_tokens"
        )
        if "d_out" in variant.parameters:  # otherwise d_out is d_in, checked above
            limits.at_most(("d_out",), "d_out", config.d_out, "max_dim")
        limits.at_most(("num_heads",), "num_heads", config.num_heads, "max_heads")
        if config.output_dim != config.d_out:
            limits.at_most(
                ("num_heads",),
                "d_out x num_heads (the wrapper's output)",
                config.output_dim,
                "max_dim",
            )
        weights_floats = batch_size * config.num_heads * num_tokens * num_tokens
        if request.return_weights or config.dropout > 0:
            limits.at_most(
                (),
                "attention weights (batch x heads x T x T)",
                weights_floats,
                "max_attention_floats",
                hint='send "return_weights": false (and no dropout) for the fused path',
            )
        answer_floats = batch_size * num_tokens * config.output_dim
        if request.return_weights:
            answer_floats += weights_floats
        limits.at_most((), "numbers in the answer", answer_floats, "max_answer_floats")
        limits.raise_if_any()
        variant.check(config)

        embeddings = None
        if request.embeddings is not None:
            embeddings = request.embeddings if batched else request.embeddings[np.newaxis]
        return Job(variant, request, config, batched, embeddings, tokens, batch_size, num_tokens)

    @staticmethod
    def resolve(variant: Variant, request: RequestBase, d_in: int) -> AttentionConfig:
        fields = request.model_dump(exclude={"embeddings", "text"})
        d_out = fields.get("d_out") or d_in
        return AttentionConfig(
            d_in=d_in,
            d_out=d_out,
            num_heads=fields.get("num_heads", 1),
            seed=fields.get("seed"),
            dropout=fields.get("dropout", 0.0),
            qkv_bias=fields.get("qkv_bias", False),
            implementation=fields.get("implementation", variant.default_implementation),
        )

    def inputs(self, job: Job) -> torch.Tensor:
        """(B, T, d_in) float32."""
        if job.embeddings is not None:
            return torch.from_numpy(job.embeddings)
        request = job.request
        embedded = self.tables.embed(
            [token.id for token in job.tokens],
            embedding_dim=request.embedding_dim,
            context_length=request.context_length,
            seed=request.embedding_seed,
        )  # (T, d_in)
        return embedded.unsqueeze(0)  # (1, T, d_in)

    def answer(self, job: Job, *, threads: int) -> bytes:
        """The 200 answer's JSON bytes, serialised straight from numpy arrays."""
        return orjson.dumps(self.payload(job, threads=threads), option=orjson.OPT_SERIALIZE_NUMPY)

    def payload(self, job: Job, *, threads: int) -> dict[str, Any]:
        """The answer as a dict whose tensors are C-contiguous numpy arrays.

        `threads` is the torch intra-op team for this call. OpenMP keeps the team size per
        calling thread, so the event loop computes tiny requests on one thread (a team of two
        costs more to wake than the work, and spins on the core the server needs) while a
        worker thread computes large ones on all of them.
        """
        torch.set_num_threads(threads)
        request = job.request
        result = self.runner.run(
            job.variant, self.inputs(job), job.config, return_weights=request.return_weights
        )
        if self.count_tokens is not None:
            self.count_tokens(job.variant.name, job.batch_size * job.num_tokens)
        payload: dict[str, Any] = {"variant": job.variant.name}
        if result.attention_weights is not None:
            payload["attention_weights"] = self.output(result.attention_weights, job)
        payload["context_vectors"] = self.output(result.context_vectors, job)
        if job.tokens is not None:
            payload["tokens"] = [{"id": token.id, "text": token.text} for token in job.tokens]
        payload["config"] = self.config_report(job)
        return payload

    @staticmethod
    def output(tensor: torch.Tensor, job: Job) -> np.ndarray:
        array = tensor.numpy()
        if not job.batched:
            array = array[0]  # the request had no batch axis
        if job.request.decimals is not None:
            array = np.round(array, job.request.decimals)
        return np.ascontiguousarray(array)

    @staticmethod
    def config_report(job: Job) -> dict[str, Any]:
        config, request = job.config, job.request
        report: dict[str, Any] = {
            "d_in": config.d_in,
            "d_out": config.d_out,
            "num_heads": config.num_heads,
            "head_dim": config.head_dim,
            "output_dim": config.output_dim,
            "seed": config.seed,
            "dropout": config.dropout,
            "qkv_bias": config.qkv_bias,
            "implementation": config.implementation,
            "book_class": job.variant.book_class(config.implementation),
            "return_weights": request.return_weights,
            "decimals": request.decimals,
            "batch_size": job.batch_size if job.batched else None,
            "num_tokens": job.num_tokens,
        }
        if job.tokens is not None:
            for name in TEXT_PARAMETERS:
                report[name] = getattr(request, name)
        return report


class LimitCheck:
    """Collects every limit a request exceeds, so one 422 names them all."""

    def __init__(
        self, settings: Settings, count_tokens: Callable[[str, int], None] | None = None
    ) -> None:
        self.settings = settings
        self.count_tokens = count_tokens  # (variant, tokens computed), for the metrics
        self.errors: list[dict[str, Any]] = []

    def at_most(
        self, loc: tuple[Any, ...], what: str, value: int, setting: str, hint: str = ""
    ) -> None:
        limit = getattr(self.settings, setting)
        if value > limit:
            variable = f"ATTENTION_{setting.upper()}"
            self.errors.append(
                body_error(
                    loc,
                    f"{what} = {value} exceeds the limit of {limit} ({variable})"
                    + (f"; {hint}" if hint else ""),
                    "limit_exceeded",
                    ctx={"limit": limit, "value": value, "setting": variable},
                )
            )

    def raise_if_any(self) -> None:
        if self.errors:
            raise RequestValidationError(self.errors)
