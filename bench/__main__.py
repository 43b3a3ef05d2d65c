"""`make bench`: the service against baselines measured in the same run, as ratios.

Starts the real server (uvicorn, as `make run` does) on loopback and measures its footprint
against a floor app that loads only what the service cannot do without (bench/floor_app.py):
time from spawn to ready and memory at ready, then the memory a long input leaves behind. Then
four speed cases: a large answer, a small answer, throughput, and a long input without weights
(with the server's peak memory); and the inference protocol's large case through tritonclient,
binary against JSON and gRPC against binary REST (bench/protocol.py). Large bodies are sent
with curl, a C client, so that their figures are the server's and the loopback's rather than a
Python client's (which adds ~50% here).
"""

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import orjson
import torch
import torch.nn.functional as F

from bench import protocol
from bench.measure import (
    HOST,
    MISSED,
    Client,
    body_file,
    check,
    curl_seconds,
    free_port,
    interleaved_medians,
    median_seconds,
    proc_status_bytes,
    report,
    reset_peak_rss,
    server,
)
from service.examples import BOOK_INPUTS

BOOK_BODY = orjson.dumps({"embeddings": BOOK_INPUTS, "d_out": 2, "seed": 789})


def random_body(rows: int, dim: int, seed: int, **fields: object) -> bytes:
    """Numbers as a client's json.dumps of float64 values writes them (~19 characters each)."""
    rows_of_numbers = np.random.default_rng(seed).standard_normal((rows, dim)).tolist()
    return orjson.dumps({"embeddings": rows_of_numbers, **fields})


def plain_multi_head(num_heads: int, d: int, seed: int = 123):
    """The book's MultiHeadAttention arithmetic written out; weights built before the timing."""
    torch.manual_seed(seed)
    projections = [torch.nn.Linear(d, d, bias=False) for _ in range(3)]
    out_proj = torch.nn.Linear(d, d)

    def compute(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        num_tokens, head_dim = x.shape[0], d // num_heads
        with torch.inference_mode():
            queries, keys, values = (
                layer(x).view(num_tokens, num_heads, head_dim).transpose(0, 1)  # (H, T, hd)
                for layer in projections
            )
            scores = queries @ keys.transpose(-2, -1)  # (H, T, T)
            mask = torch.triu(torch.ones(num_tokens, num_tokens, dtype=torch.bool), 1)
            weights = torch.softmax(scores.masked_fill(mask, -torch.inf) / head_dim**0.5, -1)
            context = (weights @ values).transpose(0, 1).reshape(num_tokens, d)  # (T, d)
            return weights, out_proj(context)

    return compute


def large_answer(url: str) -> float:
    body = random_body(512, 768, seed=0, num_heads=12)
    compute = plain_multi_head(12, 768)

    def limit() -> None:
        parsed = orjson.loads(body)
        inputs = torch.from_numpy(np.array(parsed["embeddings"], dtype=np.float32))
        weights, context = compute(inputs)
        orjson.dumps(
            {"attention_weights": weights.numpy(), "context_vectors": context.numpy()},
            option=orjson.OPT_SERIALIZE_NUMPY,
        )

    endpoint = f"{url}/attention/multi-head"
    with body_file(body) as path:
        curl_seconds(endpoint, path)  # builds and caches the seeded module, as repeats find it
        limit()
        ours, baseline = interleaved_medians(lambda: curl_seconds(endpoint, path), limit, 15)
    return report(
        "large answer (T=512, 12 heads)",
        ours * 1e3,
        baseline * 1e3,
        "ms",
        "<= 1.2x the in-process limit",
        at_most=1.2,
    )


def small_answer(url: str, bare_url: str) -> float:
    our_client, bare_client = Client(url), Client(bare_url)

    def ours() -> None:
        our_client.request("POST", "/attention/self-attention", BOOK_BODY)

    def bare() -> None:
        bare_client.request("POST", "/echo", BOOK_BODY)

    for action in (ours, bare):
        median_seconds(action, 100)  # warm up
    # Rounds interleaved, so drift on the machine falls on both alike; short ones (~0.1 s each),
    # so that a burst of load on the host spoils few of them.
    our_times, bare_times = [], []
    for _ in range(11):
        our_times.append(median_seconds(ours, 200))
        bare_times.append(median_seconds(bare, 200))
    our_client.close()
    bare_client.close()
    return report(
        "small answer (book example)",
        statistics.median(our_times) * 1e6,
        statistics.median(bare_times) * 1e6,
        "us",
        "<= 1.0x a bare echo endpoint",
        at_most=1.0,
    )


def throughput(url: str, bare_url: str, pid: int, bare_pid: int) -> float | None:
    """Requests per second with 8 connections (wrk, from a second process), alternated with the
    baseline in short rounds: wrk and the server share this machine's two cores, so each round's
    figure moves with whatever else the host runs. The server's CPU time per request, read from
    /proc over the same rounds, is printed too: it moves less."""
    wrk = shutil.which("wrk")
    if wrk is None:
        print("throughput: skipped, `wrk` is not installed (apt-get install wrk)")
        return None
    with tempfile.NamedTemporaryFile("w", suffix=".lua") as script:
        script.write(
            'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
            f"wrk.body = {json.dumps(BOOK_BODY.decode())}\n"
        )
        script.flush()

        def measured(target: str, server_pid: int) -> tuple[float, float]:
            """(requests per second, server CPU seconds per request) over one round."""
            cpu_before = cpu_seconds(server_pid)
            output = subprocess.run(
                [wrk, "-t1", "-c8", "-d2s", "-s", script.name, target],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            cpu = cpu_seconds(server_pid) - cpu_before
            line = next(line for line in output.splitlines() if line.startswith("Requests/sec"))
            done = next(line for line in output.splitlines() if "requests in" in line)
            return float(line.split()[1]), cpu / int(done.split()[0])

        ours_target, bare_target = f"{url}/attention/self-attention", f"{bare_url}/echo"
        measured(ours_target, pid)  # warm up
        measured(bare_target, bare_pid)
        ours, bare = [], []
        for _ in range(7):
            ours.append(measured(ours_target, pid))
            bare.append(measured(bare_target, bare_pid))
    ratio = report(
        "throughput (8 connections)",
        statistics.median(rate for rate, _ in ours),
        statistics.median(rate for rate, _ in bare),
        "req/s",
        ">= 1.0x a bare echo endpoint",
        at_least=1.0,
    )
    our_cpu = statistics.median(cpu for _, cpu in ours) * 1e6
    bare_cpu = statistics.median(cpu for _, cpu in bare) * 1e6
    print(
        f"{'  server CPU per request':<34} ours {our_cpu:9.4g} us    "
        f"baseline {bare_cpu:9.4g} us    ratio {our_cpu / bare_cpu:5.2f}x  (lower is better)"
    )
    return ratio


def cpu_seconds(pid: int) -> float:
    """User and system time the process has used, from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def long_input(url: str, pid: int, ready_rss: int) -> float:
    """The long input's time against its baseline's, the server's peak memory over one such
    request, and the memory it still holds in the seconds after one: `ready_rss` is its RSS at
    ready, before any request."""
    body = random_body(4096, 768, seed=1, num_heads=12, return_weights=False)

    def baseline() -> None:
        parsed = orjson.loads(body)
        inputs = torch.from_numpy(np.array(parsed["embeddings"], dtype=np.float32))
        heads = inputs.view(1, 4096, 12, 64).transpose(1, 2)  # (1, H, T, head_dim)
        F.scaled_dot_product_attention(heads, heads, heads, is_causal=True)

    endpoint = f"{url}/attention/multi-head"
    small = random_body(8, 768, seed=1, num_heads=12, return_weights=False)
    with body_file(small) as small_path, body_file(body) as path:
        curl_seconds(endpoint, small_path)  # the seeded module is built and cached
        before = proc_status_bytes(pid, "VmRSS")
        reset_peak_rss(pid)
        curl_seconds(endpoint, path)
        growth = proc_status_bytes(pid, "VmHWM") - before
        baseline()
        ours, baseline_time = interleaved_medians(lambda: curl_seconds(endpoint, path), baseline, 9)
        curl_seconds(endpoint, path)  # the last request: what it leaves is sampled from here
        excess = rss_excess_after(pid, ready_rss)
        # The next one finds the memory handed back: its pages are faulted in afresh.
        after_idle = curl_seconds(endpoint, path)
    ratio = report(
        "long input, no weights (T=4096)",
        ours * 1e3,
        baseline_time * 1e3,
        "ms",
        "<= 1.2x parse + one SDPA call",
        at_most=1.2,
    )
    case = "  server peak memory growth"
    print(
        f"{case:<34} {growth / 1e6:.0f} MB "
        f"(goal <= {PEAK_GROWTH_GOAL / 1e6:.0f} MB; request body {len(body) / 1e6:.0f} MB)"
        + check(case, growth <= PEAK_GROWTH_GOAL)
    )
    case = "  RSS over ready after it"
    settled = excess[-1][1]
    within = next((seconds for seconds, over in excess if over <= SETTLED_EXCESS_GOAL), None)
    print(
        f"{case:<34} {excess[0][1] / 1e6:+.0f} MB as it ends, {settled / 1e6:+.0f} MB after "
        f"{SETTLE_SECONDS:.0f} s"
        + ("" if within is None else f", within the goal after {within:.1f} s")
        + f" (goal <= {SETTLED_EXCESS_GOAL / 1e6:.0f} MB within {SETTLE_SECONDS:.0f} s)"
        + check(case, settled <= SETTLED_EXCESS_GOAL)
    )
    print(
        f"{'  the next one, after that idle':<34} {after_idle * 1e3:.0f} ms "
        f"(against the median {ours * 1e3:.0f} ms of those run back to back; no goal)"
    )
    return ratio


PEAK_GROWTH_GOAL = 250e6
SETTLED_EXCESS_GOAL = 64e6
SETTLE_SECONDS = 3.0


def rss_excess_after(pid: int, ready_rss: int) -> list[tuple[float, int]]:
    """(seconds since the call, VmRSS over `ready_rss` in bytes), every 100 ms for
    SETTLE_SECONDS: what a request leaves behind once the server is idle again."""
    start = time.monotonic()
    samples = []
    while True:
        elapsed = time.monotonic() - start
        samples.append((elapsed, proc_status_bytes(pid, "VmRSS") - ready_rss))
        if elapsed >= SETTLE_SECONDS:
            return samples
        time.sleep(0.1)


SERVICE_APP, FLOOR_APP = "service.main:app", "bench.floor_app:app"


def footprint(rounds: int) -> None:
    """Start to ready and RSS at ready, the service against the floor app (which loads torch,
    the GPT-2 encoding and the default embedding tables, and nothing else): each started
    afresh, alternated round by round, after one unmeasured start of each (the first start
    after an install reads the libraries from disk)."""
    measured: dict[str, list[tuple[float, int]]] = {SERVICE_APP: [], FLOOR_APP: []}
    for round_index in range(rounds + 1):
        for app, figures in measured.items():
            with server(app) as (_, pid, seconds):
                if round_index:
                    figures.append((seconds, proc_status_bytes(pid, "VmRSS")))
    (ours_seconds, ours_rss), (floor_seconds, floor_rss) = (
        (statistics.median(s for s, _ in figures), statistics.median(r for _, r in figures))
        for figures in measured.values()
    )
    report(
        "start to ready",
        ours_seconds,
        floor_seconds,
        "s",
        "<= 1.5x the floor app",
        at_most=1.5,
    )
    report(
        "RSS at ready",
        ours_rss / 1e6,
        floor_rss / 1e6,
        "MB",
        "<= 1.25x the floor app",
        at_most=1.25,
    )


def main() -> None:
    print(
        f"machine: {os.cpu_count()} cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), Python {sys.version.split()[0]}; "
        f"load average {' '.join(f'{load:.2f}' for load in os.getloadavg())}"
    )
    footprint(rounds=5)
    grpc_port = free_port()
    with server(SERVICE_APP, {"ATTENTION_GRPC_PORT": str(grpc_port)}) as (url, pid, _):
        ready_rss = proc_status_bytes(pid, "VmRSS")
        # First, on a fresh process, so that its peak memory and what it leaves are its own.
        long_input(url, pid, ready_rss)
        large_answer(url)
        address = url.removeprefix("http://")
        protocol.binary_against_json(address)
        protocol.grpc_against_binary_rest(address, f"{HOST}:{grpc_port}")
        status, answer = Client(url).request("POST", "/attention/self-attention", BOOK_BODY)
        assert status == 200
        bare = server("bench.bare_app:app", {"BARE_ANSWER": answer.decode()}, "/healthz")
        with bare as (bare_url, bare_pid, _):
            small_answer(url, bare_url)
            throughput(url, bare_url, pid, bare_pid)
    print(f"load average {' '.join(f'{load:.2f}' for load in os.getloadavg())}")
    print(f"missed: {', '.join(MISSED)}" if MISSED else "every goal met")


if __name__ == "__main__":
    main()
