"""The one pipeline every way in runs: read, parse, check limits, compute, write.

An adapter (the native routes, compare, the inference protocol over REST or gRPC) reads its
request and says two things: how its body becomes checked jobs (`parse`: decoding, validation
and every limit, in the adapter's own terms and errors) and how the computed payloads become its
answer (`write`). The pipeline decides where each step runs, the same way for all of them:

- a large body (tens of MB of JSON) is parsed on a worker thread, and freed once decoded rather
  than held through the computation: an adapter hands it over in a list the pipeline takes it
  out of, and keeps no reference of its own;
- tiny computations run on the event loop, where the hop to a thread would cost more than the
  work; text and larger ones run on a worker thread, a bounded number at a time
  (`ComputeSlots`, 503 beyond);
- an answer is bytes, or for a large one parts still to be written (`service.json_parts`).
"""

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from service.concurrency import ComputeSlots
from service.engine import Engine, Job

# Bodies above this are decoded on a worker thread: tens of MB of JSON would stall the loop.
INLINE_BODY_BYTES = 64 * 1024

Content = bytes | Iterator[bytes]
P = TypeVar("P", bound="Plan")


@dataclass(slots=True)
class Plan:
    """What a parsed request asks for: checked jobs, and whatever the writer needs besides."""

    jobs: list[Job]
    extra: Any = None

    # Plain loops rather than generator expressions: these run on every request, and a
    # generator's frame costs more than the rest of either for one job.
    @property
    def answer_floats(self) -> int:
        floats = 0
        for job in self.jobs:
            floats += job.answer_floats
        return floats

    def inline(self, work_limit: int) -> bool:
        """Small enough to compute on the event loop. Text goes to a worker: a new embedding
        table takes a while to build."""
        work = 0
        for job in self.jobs:
            if job.tokens is not None:
                return False
            work += job.multiply_adds
        return work <= work_limit


Parse = Callable[[Any], P]
Write = Callable[[P, list[dict[str, Any]]], Content]


async def run(
    engine: Engine,
    slots: ComputeSlots,
    received: list[Any],
    size: int,
    parse: Parse,
    write: Write,
) -> Content:
    """The answer to the one body in `received` (`size` bytes), which is taken out of it: parsed,
    computed and written where it belongs. A body the caller still held would stay alive
    through the computation (62 MB for the bench's long input, over its peak-memory goal)."""
    if size > INLINE_BODY_BYTES:
        return await slots.run(parse_and_answer, engine, received, parse, write)
    plan = parse(received.pop())
    if plan.inline(engine.settings.inline_work_limit):
        return answer(engine, plan, write, threads=1)
    return await slots.run(answer, engine, plan, write, threads=engine.threads)


def answer(engine: Engine, plan: P, write: Write, *, threads: int) -> Content:
    return write(plan, [engine.payload(job, threads=threads) for job in plan.jobs])


def parse_and_answer(engine: Engine, received: list[Any], parse: Parse, write: Write) -> Content:
    """The answer to the one body in `received`, which is taken out of it: once decoded, the
    body (60 MB of JSON for 4096 x 768 numbers) is freed before the computation, not held by
    the caller until the answer is ready."""
    plan = parse(received.pop())
    return answer(engine, plan, write, threads=engine.threads)
