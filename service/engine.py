"""From a validated request to the answer's JSON bytes: limits, inputs, computation, output.

One Engine per app holds what is expensive to make (seeded modules, embedding tables); the
GPT-2 encoding is loaded once per process.
"""

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from fastapi.exceptions import RequestValidationError

from attention import (
    STEPS,
    AnswerOverflowError,
    AttentionConfig,
    AttentionRunner,
    EmbeddingTables,
    Token,
    Variant,
    gpt2_encoding,
    tokenize,
)
from attention.parameters import Parameters, parameter_shapes
from service.parsing import body_error
from service.schemas import EMBEDDINGS_PARAMETERS, TEXT_PARAMETERS, RequestBase
from service.settings import Settings


# Not frozen: a frozen dataclass sets each of its fields through object.__setattr__, which for
# these twelve costs more per request than computing the book's example's softmax.
@dataclass(slots=True)
class Job:
    """One computation, checked against every limit and ready to run (treat as read-only)."""

    variant: Variant
    request: RequestBase
    config: AttentionConfig
    batched: bool
    embeddings: np.ndarray | None  # (B, T, d_in), or None for text input
    tokens: list[list[Token]] | None  # each text's tokens, for text input
    batch_size: int
    num_tokens: int
    include: tuple[str, ...] = ()  # steps to return, checked against the variant's
    parameters: Parameters | None = None  # supplied weights, as float32 tensors
    padding: np.ndarray | None = None  # (B, T) booleans, True at padded positions
    answer_floats: int = 0  # numbers the answer will hold, as the limits counted them

    @property
    def multiply_adds(self) -> int:
        """Rough size of the computation, to choose between the event loop and a thread."""
        return self.config.multiply_adds(self.batch_size, self.num_tokens)


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

    def prepare(
        self,
        variant: Variant,
        request: RequestBase,
        tokenized: list[list[Token]] | None = None,
    ) -> Job:
        """Resolve the parameters and refuse, before any work, what the limits do not allow.

        `tokenized`: the request's texts as another job of the same text already tokenized
        them (compare runs one text through every variant).
        """
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

        tokens, padding = None, None
        if request.text is not None:
            batched = isinstance(request.text, list)
            texts = request.text if batched else [request.text]
            misplaced = sorted(given & set(EMBEDDINGS_PARAMETERS))
            if misplaced:
                raise RequestValidationError(
                    [
                        body_error(
                            (name,),
                            f"{name!r} applies to batches of 'embeddings' only; a list of "
                            "texts is padded, and its padding_mask given, by the service",
                        )
                        for name in misplaced
                    ]
                )
            characters = sum(len(text) for text in texts)
            limits.at_most(("text",), "characters of text", characters, "max_text_chars")
            limits.at_most(("text",), "batch size", len(texts), "max_batch_size")
            limits.at_most(("embedding_dim",), "embedding_dim", request.embedding_dim, "max_dim")
            limits.at_most(
                ("context_length",),
                "context_length",
                request.context_length,
                "max_context_length",
            )
            limits.raise_if_any()
            tokens = tokenized or [tokenize(text) for text in texts]
            self.check_token_counts(tokens, request.context_length, batched)
            batch_size, num_tokens, d_in = len(tokens), max(map(len, tokens)), request.embedding_dim
            if batched:
                lengths = np.array([len(text_tokens) for text_tokens in tokens])
                padding = np.arange(num_tokens) >= lengths[:, np.newaxis]  # (B, T)
        else:
            if not given.isdisjoint(TEXT_PARAMETERS):
                raise RequestValidationError(
                    [
                        body_error((name,), f"{name!r} applies to 'text' input only")
                        for name in sorted(given.intersection(TEXT_PARAMETERS))
                    ]
                )
            shape = request.embeddings.shape
            batched = len(shape) == 3
            batch_size, num_tokens, d_in = shape if batched else (1, *shape)
            limits.at_most(("embeddings",), "batch size", batch_size, "max_batch_size")
            limits.at_most(("embeddings",), "d_in", d_in, "max_dim")
            if request.attention_mask is not None:
                padding = ~checked_attention_mask(request.attention_mask, shape)

        config = self.resolve(variant, request, d_in)
        include = self.checked_include(variant, request)
        limits.at_most(
            ("embeddings" if tokens is None else "text",), "tokens", num_tokens, "max_tokens"
        )
        if "d_out" in variant.parameters:  # otherwise d_out is d_in, checked above
            limits.at_most(("d_out",), "d_out", config.d_out, "max_dim")
        for option in variant.options:
            if option.is_width:
                limits.at_most((option.name,), option.name, config.option(option.name), "max_dim")
        limits.at_most(("num_heads",), "num_heads", config.num_heads, "max_heads")
        if config.output_dim != config.d_out:
            limits.at_most(
                ("num_heads",),
                "d_out x num_heads (the wrapper's output)",
                config.output_dim,
                "max_dim",
            )
        weights_floats = batch_size * config.num_heads * num_tokens * num_tokens
        if request.return_weights or config.dropout > 0 or include:
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
        if include:
            answer_floats += self.steps_floats(variant, include, config, batch_size, num_tokens)
        limits.at_most((), "numbers in the answer", answer_floats, "max_answer_floats")
        limits.raise_if_any()
        variant.check(config)
        parameters = None
        if vars(request).get("parameters") is not None:
            module, _ = self.runner.module(variant, config)
            parameters = checked_parameters(request.parameters, parameter_shapes(module))

        embeddings = None
        if request.embeddings is not None:
            embeddings = request.embeddings if batched else request.embeddings[np.newaxis]
        return Job(
            variant,
            request,
            config,
            batched,
            embeddings,
            tokens,
            batch_size,
            num_tokens,
            include,
            parameters,
            padding,
            answer_floats,
        )

    @staticmethod
    def check_token_counts(tokens: list[list[Token]], context_length: int, batched: bool) -> None:
        """Every text has a token and fits the positional table, or one 422 naming each text
        that does not."""
        errors = []
        for index, text_tokens in enumerate(tokens):
            loc = ("text", index) if batched else ("text",)
            which = f"text[{index}]" if batched else "the text"
            if not text_tokens:
                errors.append(body_error(loc, f"{which} has no tokens"))
            elif len(text_tokens) > context_length:
                errors.append(
                    body_error(
                        loc,
                        f"{which} has {len(text_tokens)} tokens, more than context_length="
                        f"{context_length}; shorten it or raise context_length",
                        "too_long",
                    )
                )
        if errors:
            raise RequestValidationError(errors)

    @staticmethod
    def checked_include(variant: Variant, request: RequestBase) -> tuple[str, ...]:
        """The requested steps, deduplicated in order; an unknown or inapplicable one is a 422."""
        names = vars(request).get("include")  # a variant's model may lack the field
        if not names:
            return ()
        valid = variant.step_names
        errors = []
        for index, name in enumerate(names):
            if name not in STEPS:
                errors.append(
                    body_error(
                        ("include", index),
                        f"unknown step {name!r}; the steps are: {', '.join(STEPS)} "
                        f"(for variant {variant.name!r}: {', '.join(valid)})",
                        "literal_error",
                    )
                )
            elif name not in valid:
                errors.append(
                    body_error(
                        ("include", index),
                        f"step {name!r} does not apply to variant {variant.name!r}; "
                        f"its steps are: {', '.join(valid)}",
                        "literal_error",
                    )
                )
        if errors:
            raise RequestValidationError(errors)
        return tuple(dict.fromkeys(names))

    @staticmethod
    def steps_floats(
        variant: Variant,
        include: tuple[str, ...],
        config: AttentionConfig,
        batch_size: int,
        num_tokens: int,
    ) -> int:
        """Numbers the steps add to the answer (counted generously: every per-token step as
        wide as the widest)."""
        square = batch_size * config.num_heads * num_tokens * num_tokens
        widths = config.widths(variant)
        per_token = batch_size * num_tokens * max([config.num_heads * config.head_dim, *widths])
        projections = (3 * config.d_in + 4) * config.output_dim + config.d_out**2 + 1
        parameters = projections + sum(widths) * (config.d_in + 2 * config.d_out + 3)
        sizes = {"mask": num_tokens * num_tokens, "parameters": parameters}
        for name in ("attention_scores", "scaled_scores", "weights_before_dropout"):
            sizes[name] = square
        return sum(sizes.get(name, per_token) for name in include)

    @staticmethod
    def resolve(variant: Variant, request: RequestBase, d_in: int) -> AttentionConfig:
        # The validated values as pydantic holds them: a variant's model lacks the fields it does
        # not take, and model_dump or pydantic's __getattr__ for a missing field costs more than
        # computing the book's example.
        fields = vars(request)
        d_out = fields.get("d_out") or d_in
        return attention_config(
            d_in,
            d_out,
            fields.get("num_heads", 1),
            fields.get("seed"),
            fields.get("dropout", 0.0),
            fields.get("qkv_bias", False),
            fields.get("implementation", variant.default_implementation),
            tuple(
                (option.name, option.resolve(fields.get(option.name), d_out))
                for option in variant.options
            ),
        )

    def inputs(self, job: Job) -> np.ndarray | torch.Tensor:
        """(B, T, d_in) float32, either kind (the runner takes both); a list of texts padded on
        the right with zeros."""
        if job.embeddings is not None:
            return job.embeddings
        request = job.request
        inputs = torch.zeros(job.batch_size, job.num_tokens, request.embedding_dim)
        for index, text_tokens in enumerate(job.tokens):
            inputs[index, : len(text_tokens)] = self.tables.embed(
                [token.id for token in text_tokens],
                embedding_dim=request.embedding_dim,
                context_length=request.context_length,
                seed=request.embedding_seed,
            )  # (T_i, d_in)
        return inputs

    def payload(self, job: Job, *, threads: int) -> dict[str, Any]:
        """The answer as a dict whose tensors are C-contiguous numpy arrays.

        `threads` is the torch intra-op team for this call. OpenMP keeps the team size per
        calling thread, so the event loop computes tiny requests on one thread (a team of two
        costs more to wake than the work, and spins on the core the server needs) while a
        worker thread computes large ones on all of them.
        """
        if job.tokens is not None:  # the embedding lookups run in torch too
            torch.set_num_threads(threads)
        request = job.request
        try:
            result = self.runner.run(
                job.variant,
                self.inputs(job),
                job.config,
                return_weights=request.return_weights,
                include=job.include,
                parameters=job.parameters,
                padding=None if job.padding is None else torch.from_numpy(job.padding),
                threads=threads,
            )
        except AnswerOverflowError as error:
            if job.tokens is None:
                raise
            raise AnswerOverflowError(str(error), field="text") from None
        if self.count_tokens is not None:
            self.count_tokens(job.variant.name, job.batch_size * job.num_tokens)
        payload: dict[str, Any] = {"variant": job.variant.name}
        if result.attention_weights is not None:
            payload["attention_weights"] = self.output(result.attention_weights, job)
        payload["context_vectors"] = self.output(result.context_vectors, job)
        if job.tokens is not None:
            tokens = [[{"id": token.id, "text": token.text} for token in row] for row in job.tokens]
            payload["tokens"] = tokens if job.batched else tokens[0]
        if job.padding is not None:
            payload["padding_mask"] = job.padding
        if job.include:
            payload["steps"] = {
                name: self.parameters_output(value, job)
                if name == "parameters"
                else self.step_output(value, job, batch_axis=name != "mask")
                for name, value in result.steps.items()
            }
        if result.kv_cache is not None:
            # One layer's cache over the whole batch (padding included, as a cache of the
            # padded batch would hold it).
            values_per_token, tokens = result.kv_cache
            tokens *= job.batch_size
            payload["kv_cache"] = {
                "values_per_token": values_per_token,
                "tokens": tokens,
                "values": values_per_token * tokens,
            }
        payload["config"] = self.config_report(job)
        return payload

    @staticmethod
    def output(tensor: np.ndarray | torch.Tensor, job: Job) -> np.ndarray:
        """C-contiguous, as orjson writes arrays. The small path's arrays are made so by its
        kernel, and stay so through the steps below: only torch's are made so here."""
        small = isinstance(tensor, np.ndarray)
        array = tensor if small else tensor.numpy()
        if not job.batched:
            array = array[0]  # the request had no batch axis
        if job.request.decimals is not None:
            array = np.round(array, job.request.decimals)
        return array if small else np.ascontiguousarray(array)

    @classmethod
    def step_output(
        cls, tensor: np.ndarray | torch.Tensor, job: Job, *, batch_axis: bool = True
    ) -> dict[str, Any]:
        """`{"shape", "data"}`, following the 2-D/3-D rule and `decimals` as the outputs do."""
        array = as_array(tensor)
        if array.dtype == np.bool_ or not batch_axis:
            if array.dtype != np.bool_ and job.request.decimals is not None:
                array = np.round(array, job.request.decimals)
            array = np.ascontiguousarray(array)
        else:
            array = cls.output(tensor, job)
        return {"shape": list(array.shape), "data": array}

    @classmethod
    def parameters_output(cls, named: Parameters, job: Job) -> dict[str, Any]:
        return {
            name: [cls.parameters_output(head, job) for head in value]
            if name == "heads"
            else cls.step_output(value.detach(), job, batch_axis=False)
            for name, value in named.items()
        }

    @staticmethod
    def config_report(job: Job) -> dict[str, Any]:
        request = job.request
        report = {
            **configuration_report(job.variant, job.config),
            "return_weights": request.return_weights,
            "decimals": request.decimals,
            "batch_size": job.batch_size if job.batched else None,
            "num_tokens": job.num_tokens,
        }
        if job.tokens is not None:
            for name in TEXT_PARAMETERS:
                report[name] = getattr(request, name)
        return report


@lru_cache(maxsize=4096)
def configuration_report(variant: Variant, config: AttentionConfig) -> dict[str, Any]:
    """The answer's `config` as far as the configuration alone decides it: made once per
    configuration (read-only; the answer copies it), as repeats of one configuration are the
    usual traffic and building it was a measurable part of a small request."""
    return {
        "d_in": config.d_in,
        "d_out": config.d_out,
        "num_heads": config.num_heads,
        "head_dim": config.head_dim,
        "output_dim": config.output_dim,
        "seed": config.seed,
        "dropout": config.dropout,
        "qkv_bias": config.qkv_bias,
        "implementation": config.implementation,
        **dict(config.options),
        "book_class": variant.book_class(config.implementation),
    }


# The same configurations come again and again. Made once, a repeat is one lookup rather than a
# frozen dataclass's construction, and the module cache then finds its key by identity rather
# than through the dataclass's Python __eq__. `typed`: a dropout of 0 and of 0.0 stay apart, as
# the answer's config reports them.
attention_config = lru_cache(maxsize=4096, typed=True)(AttentionConfig)


def as_array(tensor: np.ndarray | torch.Tensor) -> np.ndarray:
    """The small path answers numpy arrays already; torch's tensors share their memory."""
    return tensor if isinstance(tensor, np.ndarray) else tensor.numpy()


def checked_parameters(
    supplied: dict[str, Any], expected: dict[str, Any], loc: tuple[Any, ...] = ("parameters",)
) -> Parameters:
    """The supplied weights as float32 tensors, or a 422 naming what was expected."""
    if not isinstance(supplied, dict):
        raise RequestValidationError(
            [body_error(loc, f"expected an object with {', '.join(expected)}", "dict_type")]
        )
    wanted = ", ".join(
        f"{name} (a list of {len(shape)} heads)" if name == "heads" else f"{name} {shape}"
        for name, shape in expected.items()
    )
    errors = [
        body_error((*loc, name), f"missing {name!r}; this configuration takes {wanted}", "missing")
        for name in expected
        if name not in supplied
    ] + [
        body_error(
            (*loc, name),
            f"unexpected {name!r}; this configuration takes {wanted}",
            "extra_forbidden",
        )
        for name in supplied
        if name not in expected
    ]
    if errors:
        raise RequestValidationError(errors)
    converted: Parameters = {}
    for name, shape in expected.items():
        value = supplied[name]
        if name == "heads":
            if not isinstance(value, list) or len(value) != len(shape):
                raise RequestValidationError(
                    [body_error((*loc, name), f"expected a list of {len(shape)} heads' weights")]
                )
            converted[name] = [
                checked_parameters(head, head_shapes, (*loc, name, index))
                for index, (head, head_shapes) in enumerate(zip(value, shape, strict=True))
            ]
            continue
        converted[name] = checked_tensor(value, shape, (*loc, name))
    return converted


def checked_tensor(value: Any, shape: list[int], loc: tuple[Any, ...]) -> torch.Tensor:
    if isinstance(value, dict) and "data" in value:  # a step's {"shape", "data"} sent back
        value = value["data"]
    what = f"a {' x '.join(map(str, shape))} " + ("matrix" if len(shape) == 2 else "vector")
    try:
        array = np.asarray(value)
    except (ValueError, TypeError, RecursionError):
        array = None
    if array is None or array.dtype.kind not in "iuf":
        raise RequestValidationError(
            [body_error(loc, f"expected {what} of numbers, shape {shape}", "list_type")]
        )
    if list(array.shape) != shape:
        raise RequestValidationError(
            [
                body_error(
                    loc,
                    f"expected shape {shape} ({what}, x @ W convention: W is d_in x d_out), "
                    f"got shape {list(array.shape)}",
                )
            ]
        )
    with np.errstate(over="ignore"):
        array = array.astype(np.float32)
    if not np.isfinite(array).all():
        raise RequestValidationError(
            [body_error(loc, "weights must be finite float32 values (|x| < 3.4e38)")]
        )
    return torch.from_numpy(np.ascontiguousarray(array))


def checked_attention_mask(mask: np.ndarray, embeddings_shape: tuple[int, ...]) -> np.ndarray:
    """The (B, T) mask of real tokens, once it fits the batch and every row has a real token."""
    if len(embeddings_shape) != 3:
        raise RequestValidationError(
            [
                body_error(
                    ("attention_mask",),
                    "attention_mask applies to a batch of embeddings (B x T x d_in); a single "
                    "sequence (T x d_in) has no padding: send its real rows only",
                )
            ]
        )
    expected = list(embeddings_shape[:2])
    if list(mask.shape) != expected:
        raise RequestValidationError(
            [
                body_error(
                    ("attention_mask",),
                    f"attention_mask must be B x T = {expected[0]} x {expected[1]}, one entry "
                    f"per token of the embeddings; got {mask.shape[0]} x {mask.shape[1]}",
                )
            ]
        )
    empty = np.flatnonzero(~mask.any(axis=1))
    if empty.size:
        raise RequestValidationError(
            [
                body_error(
                    ("attention_mask", int(row)),
                    f"attention_mask[{row}] has no real token (no 1): a sequence of padding "
                    "alone has nothing to attend to",
                )
                for row in empty
            ]
        )
    return mask


class LimitCheck:
    """Collects every limit a request exceeds, so one 422 names them all."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
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
