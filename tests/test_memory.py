"""Memory handed back when idle (service.memory): when the release runs, and what it drops."""

import threading
import time

import orjson
import pytest

from service import memory, parsing
from service.memory import IdleRelease


def test_the_release_runs_once_the_last_piece_of_work_has_ended_and_not_before():
    released = threading.Event()
    idle = IdleRelease(0.05, released.set)
    with idle.work():
        with idle.work():
            pass
        time.sleep(0.2)  # one piece ended, another still runs
        assert not released.is_set()
    assert released.wait(5)


def test_work_begun_within_the_idle_period_postpones_the_release():
    releases: list[float] = []
    idle = IdleRelease(0.3, lambda: releases.append(time.monotonic()))
    with idle.work():
        pass
    time.sleep(0.1)
    with idle.work():
        ended = time.monotonic()
    deadline = time.monotonic() + 5
    while not releases and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(releases) == 1
    assert releases[0] - ended >= 0.3  # counted from the end of the second piece of work


def test_a_failing_release_leaves_the_next_idle_period_its_own():
    calls: list[int] = []
    second = threading.Event()

    def action() -> None:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("first release fails")
        second.set()

    idle = IdleRelease(0.01, action)
    with idle.work():
        pass
    deadline = time.monotonic() + 5
    while not calls and time.monotonic() < deadline:
        time.sleep(0.01)
    with idle.work():
        pass
    assert second.wait(5)


@pytest.fixture
def body() -> bytes:
    return orjson.dumps({"embeddings": [[float(i), 2.0] for i in range(100)]})


def test_the_kept_parser_is_dropped_only_once_unused_for_the_given_time(body):
    parsing.fast_values(body)
    (kept,) = parsing._idle_parsers

    parsing.drop_idle_parsers(60)  # used just now
    assert parsing._idle_parsers == [kept]

    parsing.drop_idle_parsers(0)
    assert parsing._idle_parsers == []
    parsing.fast_values(body)  # a new one is made, and kept
    assert len(parsing._idle_parsers) == 1


def test_the_release_drops_an_idle_parser_and_trims(monkeypatch, body):
    parsing.fast_values(body)
    monkeypatch.setattr(memory, "IDLE_SECONDS", 0)
    memory.release()
    assert parsing._idle_parsers == []


def test_on_glibc_malloc_is_configured():
    if memory.glibc() is None:
        pytest.skip("not glibc: there is nothing to configure")
    assert memory.configure_malloc()
