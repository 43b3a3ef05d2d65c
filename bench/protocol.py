"""The inference protocol's cases of `make bench`, end to end through tritonclient: the request,
the server, and the client's decoding to numpy, as a Triton user's call costs them.

The large case (T=512, d_in 768, 12 heads, with weights): a 1.5 MB input, a 12.6 MB weights
output. JSON is the wrong wire format for it (31 MB of text); Triton's binary tensor data sends
the tensors' own bytes. Both are measured through the same client, alternated round by round.
"""

import time
from collections.abc import Callable

import numpy as np
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http

from bench.measure import interleaved_medians, report

SHAPE = (512, 768)
PARAMETERS = {"num_heads": 12}
OUTPUTS = ("attention_weights", "context_vectors")
ROUNDS = 9


def embeddings() -> np.ndarray:
    return np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)


def http_call(address: str, binary: bool) -> Callable[[], float]:
    """One inference through tritonclient.http, binary (its defaults) or JSON both ways; the
    seconds from the call to both outputs decoded."""
    client = triton_http.InferenceServerClient(address, connection_timeout=300.0)
    x = embeddings()

    def call() -> float:
        start = time.perf_counter()
        tensor = triton_http.InferInput("embeddings", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x, binary_data=binary)
        outputs = None
        if not binary:  # the defaults ask for binary outputs: JSON must be asked for
            outputs = [
                triton_http.InferRequestedOutput(name, binary_data=False) for name in OUTPUTS
            ]
        result = client.infer("multi-head", [tensor], outputs=outputs, parameters=PARAMETERS)
        for name in OUTPUTS:
            result.as_numpy(name)
        return time.perf_counter() - start

    return call


def grpc_call(address: str) -> Callable[[], float]:
    """One inference through tritonclient.grpc with its defaults (raw contents both ways)."""
    client = triton_grpc.InferenceServerClient(address)
    x = embeddings()

    def call() -> float:
        start = time.perf_counter()
        tensor = triton_grpc.InferInput("embeddings", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        result = client.infer("multi-head", [tensor], parameters=PARAMETERS)
        for name in OUTPUTS:
            result.as_numpy(name)
        return time.perf_counter() - start

    return call


def binary_against_json(rest_address: str) -> float:
    return side_by_side(
        "protocol: binary against JSON",
        http_call(rest_address, True),
        http_call(rest_address, False),
        "binary >= 4x faster: <= 0.25x",
        at_most=0.25,
    )


def grpc_against_binary_rest(rest_address: str, grpc_address: str) -> float:
    return side_by_side(
        "protocol: gRPC against binary REST",
        grpc_call(grpc_address),
        http_call(rest_address, True),
        "<= 1.2x",
        at_most=1.2,
    )


def side_by_side(
    case: str, ours: Callable[[], float], baseline: Callable[[], float], goal: str, at_most: float
) -> float:
    ours(), baseline()  # the seeded module built and cached, connections open
    our_seconds, baseline_seconds = interleaved_medians(ours, baseline, ROUNDS)
    return report(case, our_seconds * 1e3, baseline_seconds * 1e3, "ms", goal, at_most=at_most)
