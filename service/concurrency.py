"""Bounded room for heavy computations: a few run, a few wait, the rest are told to come back.

Queueing without end would let one burst of large requests hold every later one for minutes;
a 503 with Retry-After lets a client or a load balancer go elsewhere.
"""

import functools
from collections.abc import Callable
from typing import TypeVar

import anyio
import anyio.to_thread

from service.memory import after_large_requests

T = TypeVar("T")


class Saturated(Exception):
    def __init__(self, capacity: int) -> None:
        super().__init__(
            f"the service is computing or queueing {capacity} large requests already "
            "(ATTENTION_MAX_CONCURRENT_COMPUTATIONS + ATTENTION_MAX_QUEUED_COMPUTATIONS); "
            "retry shortly"
        )


class ComputeSlots:
    def __init__(self, running: int, queued: int) -> None:
        self.running = running
        self.capacity = running + queued
        self.admitted = 0
        self._limiter: anyio.CapacityLimiter | None = None  # made in the event loop, on first use

    async def run(self, function: Callable[..., T], *args: object, **kwargs: object) -> T:
        """Run `function` on a worker thread once a slot is free, or raise Saturated."""
        if self.admitted >= self.capacity:
            raise Saturated(self.capacity)
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(self.running)
        self.admitted += 1
        try:
            # What a large computation leaves is handed back once none has run for a while.
            with after_large_requests.work():
                return await anyio.to_thread.run_sync(
                    functools.partial(function, *args, **kwargs), limiter=self._limiter
                )
        finally:
            self.admitted -= 1
