"""Measure one worker's memory, to size the Kubernetes requests and limits.

Starts `uvicorn service.main:app` on loopback (one worker, as the image runs it), then reads
the worker's VmRSS (now) and VmHWM (peak) from /proc after each stage: idle, the book's
example, the benchmark's 512 x 768 x 12-head request with weights (alone, then two at once),
the longest input the limits admit without weights (ATTENTION_MAX_TOKENS x 768), and the
caches filled to their sizes at the largest dimension (embedding tables and seeded modules).
The settings are the environment's, as the server reads them: to measure a pod's worst case,
export the ConfigMap's values first (deploy/kubernetes/configmap.yaml), e.g.

    env $(.venv/bin/python deploy/measure_memory.py --configmap-env) .venv/bin/python \
        deploy/measure_memory.py
"""

import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time

import numpy as np

from service.settings import Settings

HOST = "127.0.0.1"
BOOK = [[0.43, 0.15, 0.89], [0.55, 0.87, 0.66], [0.57, 0.85, 0.64],
        [0.22, 0.58, 0.33], [0.77, 0.25, 0.10], [0.05, 0.80, 0.55]]  # fmt: skip


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def post(port: int, path: str, body: dict) -> int:
    connection = http.client.HTTPConnection(HOST, port, timeout=600)
    connection.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    response = connection.getresponse()
    response.read()
    connection.close()
    assert response.status == 200, (path, response.status)
    return response.status


def memory_mib(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) in MiB."""
    fields = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            fields[key] = value.split()
    return int(fields["VmRSS"][0]) / 1024, int(fields["VmHWM"][0]) / 1024


def matrix(rows: int, width: int, seed: int = 0) -> list:
    return np.random.default_rng(seed).standard_normal((rows, width)).astype(np.float32).tolist()


def concurrently(port: int, body: dict, count: int) -> None:
    threads = [
        threading.Thread(target=post, args=(port, "/attention/multi-head", body))
        for _ in range(count)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def configmap_env() -> str:
    """The ConfigMap's data as NAME=value words, for env(1)."""
    from ruamel.yaml import YAML

    path = os.path.join(os.path.dirname(__file__), "kubernetes", "configmap.yaml")
    with open(path) as file:
        data = YAML(typ="safe", pure=True).load(file)["data"]
    return " ".join(f"{name}={value}" for name, value in data.items())


def main() -> None:
    settings = Settings()
    dim = min(settings.max_dim, 1024)
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "service.main:app", "--host", HOST, "--port", str(port),
         "--log-level", "warning"],
        env={**os.environ, "ATTENTION_ACCESS_LOG": "false"},
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                connection = http.client.HTTPConnection(HOST, port, timeout=5)
                connection.request("GET", "/readyz")
                if connection.getresponse().status == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the server did not become ready")
            time.sleep(0.2)

        def report(stage: str) -> None:
            rss, hwm = memory_mib(process.pid)
            print(f"{stage:<58} RSS {rss:7.0f} MiB   peak {hwm:7.0f} MiB", flush=True)

        report("idle, ready (encoding and default tables loaded)")
        for _ in range(100):
            post(port, "/attention/self-attention", {"embeddings": BOOK, "d_out": 2, "seed": 789})
        report("after 100 x the book's example")

        bench = {"embeddings": matrix(512, 768), "d_out": 768, "num_heads": 12}
        for _ in range(3):
            post(port, "/attention/multi-head", bench)
        report("after 3 x 512 x 768, 12 heads, with weights")

        concurrently(port, bench, 2)
        report("after 2 of them at once")

        tokens = settings.max_tokens
        long = {"embeddings": matrix(tokens, 768), "d_out": 768, "num_heads": 12,
                "return_weights": False}  # fmt: skip
        post(port, "/attention/multi-head", long)
        report(f"after {tokens} x 768, 12 heads, no weights")

        tables = settings.embedding_cache_size
        for seed in range(tables):
            post(port, "/attention/causal",
                 {"text": "Your journey starts with one step", "embedding_dim": dim,
                  "embedding_seed": seed})  # fmt: skip
        report(f"after {tables} embedding tables of 50257 x {dim}")

        small = matrix(8, dim)
        modules = settings.module_cache_size
        for seed in range(modules):
            post(port, "/attention/multi-head",
                 {"embeddings": small, "d_out": dim, "num_heads": 16, "seed": seed})  # fmt: skip
        report(f"after {modules} cached multi-head modules of {dim} x {dim}")

        post(port, "/attention/multi-head", long)
        report("after the long input again, caches full")
        at_once = settings.max_concurrent_computations
        concurrently(port, bench, at_once)
        report(f"after {at_once} x 512 x 768 with weights at once, caches full")
        concurrently(port, long, at_once)
        report(f"after {at_once} x the long input at once, caches full")
    finally:
        process.terminate()
        process.wait(timeout=30)


if __name__ == "__main__":
    if sys.argv[1:] == ["--configmap-env"]:
        print(configmap_env())
    else:
        main()
