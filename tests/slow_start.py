"""The service under uvicorn on 127.0.0.1, its warm-up held until the test releases it.

`python -m tests.slow_start --port PORT --gate PATH`: `Engine.warm_up` waits for the file PATH
to exist before it runs, so a test that starts the real server sees, for certain, the window
between the port opening and readiness, and ends it when it has looked (tests/test_startup.py).
"""

import argparse
import time
from pathlib import Path

import uvicorn

from service.engine import Engine

GATE_TIMEOUT_S = 120  # a test that never opens the gate leaves a server that never gets ready


def held(warm_up, gate: Path):
    def held_warm_up(self: Engine) -> None:
        deadline = time.monotonic() + GATE_TIMEOUT_S
        while not gate.exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{gate} never appeared")
            time.sleep(0.02)
        warm_up(self)

    return held_warm_up


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--gate", type=Path, required=True)
    arguments = parser.parse_args()
    Engine.warm_up = held(Engine.warm_up, arguments.gate)
    uvicorn.run(
        "service.main:app",
        host="127.0.0.1",
        port=arguments.port,
        access_log=False,
        log_level="info",  # uvicorn's own lines: started, shutting down, finished
    )


if __name__ == "__main__":
    main()
