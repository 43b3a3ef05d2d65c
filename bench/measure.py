"""What every case of `make bench` uses: servers on loopback, timings alternated with their
baselines, and the report of each ratio against its goal."""

import http.client
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


class Client:
    """A lean keep-alive HTTP client for small requests."""

    def __init__(self, url: str) -> None:
        host, port = url.removeprefix("http://").split(":")
        self.connection = http.client.HTTPConnection(host, int(port), timeout=300)

    def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        self.connection.request(method, path, body, headers)
        response = self.connection.getresponse()
        return response.status, response.read()

    def close(self) -> None:
        self.connection.close()


@contextmanager
def server(
    app: str, env: dict[str, str] | None = None, ready_path: str = "/readyz"
) -> Iterator[tuple[str, int, float]]:
    """The app served by uvicorn on loopback: its URL, its PID and the seconds from spawning it
    until `ready_path` answered 200 (polled every 10 ms; a refused connection or a 503 is not
    ready yet, so an app that opens its port before it has loaded is timed to its load too).
    Its output (the service's access log: one line per request, tens of thousands here) goes to
    a file, as a deployment's would go to its log collector rather than to this benchmark's
    console."""
    port = free_port()
    command = [sys.executable, "-m", "uvicorn", app, "--host", HOST, "--port", str(port)]
    with tempfile.TemporaryFile("w+") as log:
        spawned = time.perf_counter()
        process = subprocess.Popen(
            [*command, "--log-level", "warning"],
            env={**os.environ, "ATTENTION_GRPC_PORT": str(free_port()), **(env or {})},
            stdout=log,
            stderr=log,
        )
        url = f"http://{HOST}:{port}"
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    client = Client(url)
                    status = client.request("GET", ready_path)[0]
                    client.close()
                    if status == 200:
                        break
                except OSError:
                    pass
                if time.monotonic() > deadline or process.poll() is not None:
                    log.seek(0)
                    raise RuntimeError(f"{app} did not start:\n{log.read()[-4000:]}")
                time.sleep(0.01)
            yield url, process.pid, time.perf_counter() - spawned
        finally:
            process.terminate()
            process.wait(timeout=30)


@contextmanager
def body_file(body: bytes) -> Iterator[str]:
    """The body in a file for curl, written once for all of a case's requests: a 60 MB file
    written and deleted per request churned the page cache (and the disk) between timings."""
    with tempfile.NamedTemporaryFile(suffix=".json") as file:
        file.write(body)
        file.flush()
        yield file.name


def curl_seconds(url: str, path: str) -> float:
    """One POST of the body in the file at `path`, its total time as curl measures it."""
    result = subprocess.run(
        [
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{time_total}",
            "-X",
            "POST",
            "-H",
            "Content-Type: application/json",
            "--data-binary",
            f"@{path}",
            url,
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    status, seconds = result.stdout.split()
    assert status == "200", status
    return float(seconds)


def interleaved_medians(
    ours: Callable[[], float], baseline: Callable[[], object], rounds: int
) -> tuple[float, float]:
    """Medians of `ours` (which returns its own seconds) and of timing `baseline`, alternated
    round by round, so that drift in the machine's load falls on both alike."""
    our_times, baseline_times = [], []
    for _ in range(rounds):
        our_times.append(ours())
        baseline_times.append(median_seconds(baseline, 1))
    return statistics.median(our_times), statistics.median(baseline_times)


def median_seconds(action: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def proc_status_bytes(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} for {pid}")


def reset_peak_rss(pid: int) -> None:
    with open(f"/proc/{pid}/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # VmHWM back to the current RSS


MISSED: list[str] = []  # the goals this run missed, named at the end


def report(
    case: str,
    ours: float,
    baseline: float,
    unit: str,
    goal: str,
    *,
    at_most: float | None = None,
    at_least: float | None = None,
) -> float:
    ratio = ours / baseline
    met = (at_most is None or ratio <= at_most) and (at_least is None or ratio >= at_least)
    print(
        f"{case:<34} ours {ours:9.4g} {unit:<5} baseline {baseline:9.4g} {unit:<5} "
        f"ratio {ratio:5.2f}x  (goal {goal}){'' if met else '  MISSED'}"
    )
    if not met:
        MISSED.append(case)
    return ratio


def check(case: str, met: bool) -> str:
    """'' for a goal met; else the case is recorded as missed, and the mark to print."""
    if met:
        return ""
    MISSED.append(case.strip())
    return "  MISSED"
