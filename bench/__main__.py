"""`make bench`: the service against baselines measured in the same run, as ratios.

Starts the real server (uvicorn, as `make run` does) on loopback and measures four cases:
large answer, small answer, throughput and long input without weights (with peak memory).
"""

import http.client
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager

import httpx
import numpy as np
import orjson
import torch
import torch.nn.functional as F

from service.examples import BOOK_INPUTS

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


@contextmanager
def server(app: str, env: dict[str, str] | None = None):
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            app,
            "--host",
            HOST,
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        env={**os.environ, **(env or {})},
    )
    url = f"http://{HOST}:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        else:
            raise RuntimeError(f"{app} did not start")
        yield url, process.pid
    finally:
        process.terminate()
        process.wait(timeout=30)


class Client:
    """A lean keep-alive HTTP client, so the figures measure the server rather than the client."""

    def __init__(self, url: str) -> None:
        host, port = url.removeprefix("http://").split(":")
        self.connection = http.client.HTTPConnection(host, int(port), timeout=300)

    def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        self.connection.request("POST", path, body, {"Content-Type": "application/json"})
        response = self.connection.getresponse()
        return response.status, response.read()

    def close(self) -> None:
        self.connection.close()


def median_seconds(action: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def reset_peak_rss(pid: int) -> None:
    with open(f"/proc/{pid}/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # resets VmHWM to the current RSS


def report(case: str, ours: float, baseline: float, unit: str, goal: str, higher_is_better=False):
    ratio = ours / baseline
    verdict = (ratio >= 1.0) if higher_is_better else None
    print(
        f"{case:<34} ours {ours:10.4g} {unit:<6} baseline {baseline:10.4g} {unit:<6} "
        f"ratio {ratio:5.2f}x  (goal {goal})" + ("" if verdict is None else "")
    )
    return ratio


def random_rows(rows: int, dim: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, dim), dtype=np.float32)


def plain_multi_head(x: torch.Tensor, num_heads: int, seed: int = 123):
    """The book's MultiHeadAttention arithmetic, written out; weights built outside the timing."""
    num_tokens, d = x.shape
    head_dim = d // num_heads
    torch.manual_seed(seed)
    layers = [torch.nn.Linear(d, d, bias=False) for _ in range(3)] + [torch.nn.Linear(d, d)]

    def compute():
        with torch.inference_mode():
            q, k, v = (
                layer(x).view(num_tokens, num_heads, head_dim).transpose(0, 1)
                for layer in layers[:3]
            )  # (H, T, head_dim)
            scores = q @ k.transpose(-2, -1)  # (H, T, T)
            mask = torch.triu(torch.ones(num_tokens, num_tokens, dtype=torch.bool), 1)
            weights = torch.softmax(scores.masked_fill(mask, -torch.inf) / head_dim**0.5, -1)
            context = (weights @ v).transpose(0, 1).reshape(num_tokens, d)
            return weights, layers[3](context)

    return compute


def large_answer(url: str) -> float:
    x = random_rows(512, 768)
    body = orjson.dumps({"embeddings": x.tolist(), "num_heads": 12})

    compute = None

    def limit():
        nonlocal compute
        parsed = orjson.loads(body)
        inputs = torch.from_numpy(np.array(parsed["embeddings"], dtype=np.float32))
        weights, context = plain_multi_head(inputs, 12)()
        orjson.dumps(
            {"attention_weights": weights.numpy(), "context_vectors": context.numpy()},
            option=orjson.OPT_SERIALIZE_NUMPY,
        )

    with httpx.Client(timeout=120) as client:

        def ours():
            response = client.post(f"{url}/attention/multi-head", content=body)
            assert response.status_code == 200, response.text[:500]

        ours()  # builds and caches the seeded module, as any repeated request finds it
        limit()
        baseline_time = median_seconds(limit, 5)
        our_time = median_seconds(ours, 5)
    return report(
        "large answer (T=512, 12 heads)",
        our_time * 1e3,
        baseline_time * 1e3,
        "ms",
        "<= 1.2x the in-process limit",
    )


BOOK_BODY = orjson.dumps({"embeddings": BOOK_INPUTS, "d_out": 2, "seed": 789})


def small_answer(url: str, bare_url: str) -> float:
    with httpx.Client() as client:

        def ours():
            client.post(f"{url}/attention/self-attention", content=BOOK_BODY)

        def bare():
            client.post(f"{bare_url}/echo", content=BOOK_BODY)

        for action in (ours, bare):
            for _ in range(50):
                action()
        # Interleave rounds so drift on the machine falls on both alike.
        our_times, bare_times = [], []
        for _ in range(5):
            our_times.append(median_seconds(ours, 200))
            bare_times.append(median_seconds(bare, 200))
    return report(
        "small answer (book example)",
        statistics.median(our_times) * 1e6,
        statistics.median(bare_times) * 1e6,
        "us",
        "<= 1.0x a bare echo endpoint",
    )


def throughput(url: str, bare_url: str) -> float | None:
    wrk = shutil.which("wrk")
    if wrk is None:
        print("throughput: skipped, `wrk` is not installed (apt-get install wrk)")
        return None
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(
            'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
            f"wrk.body = {json.dumps(BOOK_BODY.decode())}\n"
        )

    def requests_per_second(target: str) -> float:
        output = subprocess.run(
            [wrk, "-t1", "-c8", "-d5s", "-s", script.name, target],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        line = next(line for line in output.splitlines() if line.startswith("Requests/sec"))
        return float(line.split()[1])

    requests_per_second(f"{url}/attention/self-attention")  # warm up
    ours = statistics.median(
        requests_per_second(f"{url}/attention/self-attention") for _ in range(3)
    )
    bare = statistics.median(requests_per_second(f"{bare_url}/echo") for _ in range(3))
    os.unlink(script.name)
    return report(
        "throughput (8 connections)",
        ours,
        bare,
        "req/s",
        ">= 1.0x a bare echo endpoint",
        higher_is_better=True,
    )


def long_input(url: str, pid: int) -> tuple[float, float]:
    x = random_rows(4096, 768, seed=1)
    body = orjson.dumps(
        {"embeddings": x, "num_heads": 12, "return_weights": False},
        option=orjson.OPT_SERIALIZE_NUMPY,
    )

    def baseline():
        parsed = orjson.loads(body)
        inputs = torch.from_numpy(np.array(parsed["embeddings"], dtype=np.float32))
        heads = inputs.view(1, 4096, 12, 64).transpose(1, 2)  # (1, H, T, head_dim)
        F.scaled_dot_product_attention(heads, heads, heads, is_causal=True)

    with httpx.Client(timeout=300) as client:

        def ours():
            response = client.post(f"{url}/attention/multi-head", content=body)
            assert response.status_code == 200, response.text[:500]

        small = orjson.dumps(
            {"embeddings": x[:8], "num_heads": 12, "return_weights": False},
            option=orjson.OPT_SERIALIZE_NUMPY,
        )
        client.post(f"{url}/attention/multi-head", content=small)  # seeded module cached
        before = rss_bytes(pid)
        reset_peak_rss(pid)
        ours()
        growth = peak_rss_bytes(pid) - before
        baseline()
        baseline_time = median_seconds(baseline, 3)
        our_time = median_seconds(ours, 3)
    ratio = report(
        "long input, no weights (T=4096)",
        our_time * 1e3,
        baseline_time * 1e3,
        "ms",
        "<= 1.2x parse + one SDPA call",
    )
    print(
        f"{'  server peak memory growth':<34} {growth / 2**20:.0f} MiB (goal <= 250 MB)"
        f" (request body {len(body) / 1e6:.0f} MB)"
    )
    return ratio, growth


def main() -> None:
    print(
        f"machine: {os.cpu_count()} cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), Python {sys.version.split()[0]}"
    )
    with server("service.main:app") as (url, pid):
        long_input(url, pid)  # first, on a fresh process, so its peak memory is its own
        large_answer(url)
        answer = httpx.post(f"{url}/attention/self-attention", content=BOOK_BODY).text
        with server("bench.bare_app:app", {"BARE_ANSWER": answer}) as (bare_url, _):
            small_answer(url, bare_url)
            throughput(url, bare_url)


if __name__ == "__main__":
    main()
