"""What a large request leaves behind, handed back to the system once the server is idle.

glibc's malloc keeps what a process frees for its next allocations, and left to itself it keeps
more the larger the buffers it has seen: after freeing a large mapped buffer it raises its
mmap threshold to that size (up to 32 MiB), so that later buffers of that size are carved from
its heaps, whose pages it keeps. With simdjson's kept parser (about twice the largest body it
has parsed), a server that had answered the bench's long input (4096 x 768, a 62 MB body) stayed
~290 MB above its size at ready for as long as it ran: every replica paid for its largest
request ever. Two things bound that:

- a fixed mmap threshold (MMAP_THRESHOLD_BYTES): buffers of that size or more (the request body,
  simdjson's buffers and its matrix of doubles) are mapped for their request and unmapped when
  freed; smaller ones (a 4096 x 768 tensor is 12.6 MB) are reused from the heaps, whose pages
  the next large request finds already in memory (TRIM_THRESHOLD_BYTES keeps glibc from
  cutting the heap back in between, and every thread shares the one heap, ARENAS);
- IDLE_SECONDS after the last large computation ended, none running or queued meanwhile, the
  kept parser is dropped and malloc_trim(0) returns every free page of glibc's heaps.

Large requests that follow one another within IDLE_SECONDS find their memory still in place;
the first after a pause pays the page faults of filling it again (docs/performance.md has the
figures). Nothing here changes a number of any answer. Outside glibc (musl, macOS) there is no
such knob: the release only drops the parser.
"""

import ctypes
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from service import parsing

logger = logging.getLogger(__name__)

# glibc's mallopt parameters, from <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
# Above the long input's 12.6 MB tensors, below its 25 MB buffer of doubles and 62 MB body.
MMAP_THRESHOLD_BYTES = 16 * 1024 * 1024
# How much free memory at the top of a heap glibc keeps rather than return at once. Fixing the
# mmap threshold also fixes this one, at 128 KiB unless set: heaps were then cut back after
# each large request and faulted in again by the next (twice the long input's page faults, and
# the large answer ~20% slower on this VM). Above any one request's heap use, so that the
# release below is what returns it.
TRIM_THRESHOLD_BYTES = 256 * 1024 * 1024
# One heap for every thread. malloc_trim returns the top of the main heap, but of a thread's
# own heap only what lies in its free lists: with the trim threshold above, the worker threads'
# heaps kept their tops (+71-106 MB three seconds after the long input, against +51 with one).
ARENAS = 1
# Longer than the gap between the bench's back-to-back large requests, short enough that an
# idle replica is back to its size at ready within a few seconds.
IDLE_SECONDS = 2.0


def glibc() -> ctypes.CDLL | None:
    """The C library this process runs on, if it is glibc (which has mallopt and malloc_trim)."""
    libc = ctypes.CDLL(None)
    if not hasattr(libc, "gnu_get_libc_version"):
        return None
    libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    return libc


_libc = glibc()


def configure_malloc() -> bool:
    """Fix glibc's mmap and trim thresholds (which also stops them from moving) and its number
    of heaps; False outside glibc. Affects allocations and threads from now on: called at
    import, before the server starts its threads."""
    return (
        _libc is not None
        and _libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
        and _libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1
        and _libc.mallopt(M_ARENA_MAX, ARENAS) == 1
    )


def release() -> None:
    """Drop the kept parser if it sat unused for IDLE_SECONDS, and return glibc's free pages."""
    parsing.drop_idle_parsers(IDLE_SECONDS)
    if _libc is not None:
        _libc.malloc_trim(0)  # ctypes releases the GIL for the call


class IdleRelease:
    """Calls `action` on a thread of its own once `idle_seconds` have passed since the last
    piece of work ended, with none begun meanwhile."""

    def __init__(self, idle_seconds: float, action: Callable[[], None]) -> None:
        self.idle_seconds = idle_seconds
        self.action = action
        self._changed = threading.Condition()
        self._working = 0
        self._due: float | None = None  # time.monotonic() at which to act, if nothing begins
        self._thread: threading.Thread | None = None

    @contextmanager
    def work(self) -> Iterator[None]:
        """Marks a piece of work: no release while it runs, the countdown starts when the last
        one ends."""
        with self._changed:
            self._working += 1
            self._due = None
        try:
            yield
        finally:
            with self._changed:
                self._working -= 1
                if self._working == 0:
                    self._due = time.monotonic() + self.idle_seconds
                    if self._thread is None:
                        self._thread = threading.Thread(
                            target=self._run, name="memory-release", daemon=True
                        )
                        self._thread.start()
                    self._changed.notify()

    def _run(self) -> None:
        while True:
            with self._changed:
                while self._due is None or (wait := self._due - time.monotonic()) > 0:
                    self._changed.wait(None if self._due is None else wait)
                self._due = None
            try:
                self.action()
            except Exception:  # never let the thread die: the next idle period tries again
                logger.exception("releasing memory failed")


configure_malloc()
# Every large computation runs inside this (service.concurrency.ComputeSlots).
after_large_requests = IdleRelease(IDLE_SECONDS, release)
