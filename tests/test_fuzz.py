"""The OpenAPI document against the live server: it admits what the server accepts, and nothing
else.

The real server (uvicorn on 127.0.0.1, the settings of tests/schemathesis_hooks.py) is fuzzed
by the schemathesis CLI over every operation of its own /openapi.json, with every check
(`--checks all`: no server error, status codes, content types, response schemas, positive data
accepted and negative data rejected, methods, ...) in every phase: the document's examples,
the coverage phase's boundary and mutated values, and fuzzing; the stateful phase runs where
the document has links (the native operations have none). The hooks bring the positive cases
within the rules JSON Schema cannot state (see that module); nothing else is excused.
"""

import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import free_port, stop
from tests.schemathesis_hooks import LIMITS

ROOT = Path(__file__).resolve().parents[1]
HOOKS = Path(__file__).with_name("schemathesis_hooks.py")
SCHEMATHESIS = Path(sys.executable).with_name("schemathesis")
# Fuzzing examples per operation; the coverage phase adds its own cases (some 5,000 here).
MAX_EXAMPLES = 100
MIN_CASES = 2000
SEED = 18  # fixed, so that `make test` is reproducible; change it to explore
READY_TIMEOUT_S = 120
RUN_TIMEOUT_S = 480


def ready(base_url: str) -> bool:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"{base_url}/readyz", timeout=5) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The service under uvicorn with LIMITS, ready; its base URL."""
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    env = {
        **os.environ,
        "ATTENTION_ACCESS_LOG": "false",
        **{f"ATTENTION_{name.upper()}": str(value) for name, value in LIMITS.items()},
    }
    command = [sys.executable, "-m", "uvicorn", "service.main:app", "--no-access-log"]
    with log.open("w") as output:
        process = subprocess.Popen(
            [*command, "--host", "127.0.0.1", "--port", str(port)],
            cwd=ROOT,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not ready(base_url):
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, f"never ready:\n{log.read_text()}"
            time.sleep(0.2)
        yield base_url
    finally:
        stop(process)


def test_the_document_admits_what_the_server_accepts_and_nothing_else(server, tmp_path):
    command = [
        str(SCHEMATHESIS),
        "run",
        f"{server}/openapi.json",
        "--checks=all",
        "--phases=examples,coverage,fuzzing,stateful",
        f"--max-examples={MAX_EXAMPLES}",
        f"--seed={SEED}",
        "--workers=1",  # the machine's other core serves the requests
        "--generation-database=none",
        "--continue-on-failure",  # every failure of an operation, not its first only
        "--no-color",
    ]
    result = subprocess.run(
        command,
        cwd=tmp_path,  # schemathesis keeps a cache in the working directory
        # The hooks module is loaded from its file; it reads tests/contract.py from the root.
        env={**os.environ, "SCHEMATHESIS_HOOKS": str(HOOKS), "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )
    output = result.stdout + result.stderr

    assert result.returncode == 0, output[-30_000:]
    counts = re.search(r"Test cases:\s+(\d+) generated, (\d+) passed\s*$", output, re.MULTILINE)
    assert counts, output[-5_000:]
    generated, passed = map(int, counts.groups())
    assert generated >= MIN_CASES, output[-5_000:]
    assert passed == generated, output[-5_000:]
    for phase in ("Examples", "Coverage", "Fuzzing"):
        assert re.search(rf"✅ {phase}$", output, re.MULTILINE), (phase, output[-5_000:])
    selected = re.search(r"Operations:\s+(\d+) selected", output)
    assert selected and int(selected.group(1)) >= 12, output[:2_000]  # every native operation
