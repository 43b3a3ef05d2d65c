"""Schemathesis hooks (SCHEMATHESIS_HOOKS=tests/schemathesis_hooks.py): the request rules that
JSON Schema cannot state, as docs/api.md and the OpenAPI descriptions give them, applied to the
positive cases schemathesis generates (tests/test_fuzz.py).

A schema-valid request that breaks one of these rules is rightly refused with a 422, and
schemathesis's `positive_data_acceptance` would count that as the document's fault. So each
positive case is brought within the rules before it is sent, as schemathesis recommends
("extend generators to match runtime rules"): rows cut or repeated to a rectangle, a mask
shaped as its batch, heads that divide d_out, texts whose tokens fit, weights of the documented
shapes. Nothing else changes, and negative cases are left as generated: the service must refuse
them. What comes out stays schema-valid (schemathesis revalidates a case a hook changed, and
would count one that is not as negative). The rules the document does state (v1 takes no
qkv_bias, compare's `implementation` belongs to a variant compared, the weights' names) are the
generator's to follow, and are not repeated here.

This is our own statement of the rules, written from the documentation, not from the service's
code: where the two disagree, the fuzzing says so.
"""

from itertools import cycle, islice
from typing import Any

import schemathesis

from tests.contract import MULTI_HEAD, VARIANTS

# The settings the fuzzed server runs with (as ATTENTION_* variables). Small, so that every
# generated case computes in milliseconds, and below the defaults where that is telling:
# embedding_dim (256 by default) is then required in the document.
LIMITS = {
    "max_tokens": 8,
    "max_batch_size": 3,
    "max_dim": 16,  # at least 16, so that latent_dim's default, max(16, d_out // 8), fits
    "max_heads": 4,
    "max_context_length": 1024,
    "max_text_chars": 64,
}
# The products of sizes (batch x heads x T x T, the numbers of an answer) are held to
# ATTENTION_MAX_ATTENTION_FLOATS and ATTENTION_MAX_ANSWER_FLOATS; under LIMITS they cannot reach
# the defaults (32 Mi and 64 Mi), so no rule here needs to keep a case below them.
LARGEST_WEIGHTS = LIMITS["max_batch_size"] * LIMITS["max_heads"] * LIMITS["max_tokens"] ** 2
assert LARGEST_WEIGHTS * 64 < 32 * 2**20, "the float limits could bind: add their rule"

DEFAULT_EMBEDDING_DIM = 256
DEFAULT_CONTEXT_LENGTH = 1024
DEFAULT_NUM_HEADS = 2
# The variants whose heads split d_out (multi-head's `fused`, the bonus variants).
SPLIT_HEADS = MULTI_HEAD


@schemathesis.hook
def map_case(context: Any, case: Any) -> Any:
    meta = case.meta
    positive = meta is not None and meta.generation.mode.is_positive
    if positive and case.method.upper() == "POST" and isinstance(case.body, dict):
        name = case.path.removeprefix("/attention/")
        if name == "compare" or name in VARIANTS:
            case.body = within_rules(name, case.body)
        elif case.path.startswith("/v2/models/") and case.path.endswith("/infer"):
            case.body = inference_within_rules(case.path.split("/")[3], case.body)
    return case


def inference_within_rules(name: str, body: dict[str, Any]) -> dict[str, Any]:
    """docs/protocol.md's rules for an inference request: the data as many numbers as the
    shape's product (written flat), `num_heads` and `num_kv_groups` dividing as for the native
    endpoint, `return_weights` false only when attention_weights is not asked for, each output
    asked for once."""
    body = dict(body)
    (tensor,) = body["inputs"]
    shape = [given({"dim": dim}, "dim") for dim in tensor["shape"]]
    numbers = [moderate(number) for number in flat(tensor["data"])] or [0.0]
    count = 1
    for dim in shape:
        count *= dim
    body["inputs"] = [{**tensor, "data": resized(numbers, count)}]
    if given(body, "outputs") is not None:
        body["outputs"] = list({output["name"]: output for output in body["outputs"]}.values())
    parameters = dict(given(body, "parameters", {}))
    if name in SPLIT_HEADS:
        dividing_heads(parameters, shape[-1], [name])
    names = [output["name"] for output in given(body, "outputs", [])] or ["attention_weights"]
    if "attention_weights" in names and parameters.get("return_weights") is False:
        del parameters["return_weights"]
    if parameters or "parameters" in body:
        body["parameters"] = parameters
    return body


def moderated(data: Any) -> Any:
    if isinstance(data, list):
        return [moderated(item) for item in data]
    return moderate(data)


def flat(data: Any) -> Any:
    if isinstance(data, list):
        for item in data:
            yield from flat(item)
    else:
        yield data


def given(body: dict[str, Any], name: str, default: Any = None) -> Any:
    """The field's value, a null or a field left out being its default. A whole number may
    come as 2.0 (JSON Schema's `integer` is any whole number): it is 2."""
    value = body.get(name)
    if type(value) is float and value.is_integer():
        return int(value)
    return default if value is None else value


def resized(items: list[Any], length: int) -> list[Any]:
    """`items` cut or repeated to `length`."""
    return list(islice(cycle(items), length))


def within_rules(name: str, body: dict[str, Any]) -> dict[str, Any]:
    body = dict(body)
    compared = (
        list(dict.fromkeys(given(body, "variants", VARIANTS))) if name == "compare" else [name]
    )
    if given(body, "embeddings") is not None:
        d_in = rectangular(body)
    else:
        d_in = given(body, "embedding_dim", DEFAULT_EMBEDDING_DIM)
        fitting_texts(body)
    if any(variant in SPLIT_HEADS for variant in compared):
        dividing_heads(body, d_in, compared)
    if given(body, "parameters") is not None:
        body["parameters"] = documented_weights(name, body, d_in)
    return body


# The computation must stay within float32: inputs this large or larger could overflow it
# (their scores, products of d_in of them, reach 1e38 long before the inputs reach 1e19).
LARGEST_INPUT = 1e6


def moderate(number: float) -> float:
    """A number within +-LARGEST_INPUT: large ones scaled down by powers of ten."""
    while abs(number) > LARGEST_INPUT:
        number /= 1e10
    return number


def rectangular(body: dict[str, Any]) -> int:
    """Rows cut or repeated to the first row's length (and a batch's items to the first item's
    number of rows), their numbers moderate; an attention_mask shaped B x T with a real token in
    each row. d_in."""
    body["embeddings"] = moderated(body["embeddings"])
    embeddings = body["embeddings"]
    if isinstance(embeddings[0][0], list):  # B x T x d_in
        rows, width = len(embeddings[0]), len(embeddings[0][0])
        body["embeddings"] = [
            [resized(row, width) for row in resized(item, rows)] for item in embeddings
        ]
        mask = given(body, "attention_mask")
        if mask is not None:
            shaped = [resized(row, rows) for row in resized(mask, len(embeddings))]
            body["attention_mask"] = [
                row if any(entry == 1 for entry in row) else [1, *row[1:]] for row in shaped
            ]
        return width
    width = len(embeddings[0])
    body["embeddings"] = [resized(row, width) for row in embeddings]
    return width


def fitting_texts(body: dict[str, Any]) -> None:
    """Each text at most min(context_length, ATTENTION_MAX_TOKENS) tokens: cut to that many
    UTF-8 bytes, since every GPT-2 token stands for at least one byte. All of them together at
    most ATTENTION_MAX_TEXT_CHARS characters."""
    budget = min(given(body, "context_length", DEFAULT_CONTEXT_LENGTH), LIMITS["max_tokens"])
    text = body["text"]
    texts = [cut_to_bytes(item, budget) for item in (text if isinstance(text, list) else [text])]
    while sum(map(len, texts)) > LIMITS["max_text_chars"]:
        longest = max(range(len(texts)), key=lambda index: len(texts[index]))
        texts[longest] = texts[longest][:-1]
    body["text"] = texts if isinstance(text, list) else texts[0]


def cut_to_bytes(text: str, budget: int) -> str:
    kept, size = [], 0
    for character in text:
        size += len(character.encode("utf-8", "surrogatepass"))
        if size > budget:
            break
        kept.append(character)
    return "".join(kept) or "a"  # at least one character, as the schema asks


def largest_divisor(number: int, at_most: int) -> int:
    return max(d for d in range(1, min(number, at_most) + 1) if number % d == 0)


def dividing_heads(body: dict[str, Any], d_in: int, compared: list[str]) -> None:
    """num_heads divides d_out (d_in when it is left out), or for the wrapper keeps
    d_out x num_heads within ATTENTION_MAX_DIM; num_kv_groups divides num_heads."""
    d_out = given(body, "d_out", d_in)
    heads = given(body, "num_heads", DEFAULT_NUM_HEADS)
    wrapper = "multi-head" in compared and given(body, "implementation") == "wrapper"
    if wrapper:
        heads = min(heads, LIMITS["max_dim"] // d_out)
    if wrapper is False or len([v for v in compared if v in SPLIT_HEADS]) > 1:
        heads = largest_divisor(d_out, heads)
    if heads != given(body, "num_heads", DEFAULT_NUM_HEADS):
        body["num_heads"] = heads
    groups = given(body, "num_kv_groups")
    if "grouped-query" in compared and groups is not None:
        body["num_kv_groups"] = largest_divisor(heads, groups)


def documented_weights(name: str, body: dict[str, Any], d_in: int) -> dict[str, Any]:
    """The weights docs/api.md names for this variant and configuration, in the shapes it
    gives (`x @ W`: W is in x out), filled with small numbers."""
    d_out = given(body, "d_out", d_in)
    heads = given(body, "num_heads", DEFAULT_NUM_HEADS)
    bias = given(body, "qkv_bias", False)
    layers = {"query": (d_in, d_out), "key": (d_in, d_out), "value": (d_in, d_out)}
    if name == "grouped-query":
        groups = given(body, "num_kv_groups", 1)
        layers["key"] = layers["value"] = (d_in, groups * d_out // heads)
    if name == "latent":
        latent = given(body, "latent_dim", max(16, d_out // 8))
        layers = {
            "query": (d_in, d_out),
            "DKV": (d_in, latent),
            "UK": (latent, d_out),
            "UV": (latent, d_out),
        }
    weights: dict[str, Any] = {}
    for layer, (inputs, outputs) in layers.items():
        weights[f"W_{layer}"] = numbers(inputs, outputs)
        if bias:
            weights[f"b_{layer}"] = numbers(outputs)
    if name == "multi-head" and given(body, "implementation") == "wrapper":
        return {"heads": [weights] * given(body, "num_heads", DEFAULT_NUM_HEADS)}
    if name in SPLIT_HEADS:
        weights["W_out_proj"] = numbers(d_out, d_out)
        if name != "grouped-query":  # GroupedQueryAttention's out_proj has no bias
            weights["b_out_proj"] = numbers(d_out)
    return weights


def numbers(*shape: int) -> list[Any]:
    """A matrix or vector of small numbers of this shape."""
    if len(shape) == 1:
        return [round(0.1 * ((index % 7) - 3), 1) for index in range(shape[0])]
    return [numbers(shape[1]) for _ in range(shape[0])]
