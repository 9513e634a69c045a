"""WorkerPool: the gRPC server's executor (few threads run calls; blocking calls hand off)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures

import pytest

from foliod.rpc.pool import WorkerPool

WAIT = 10.0  # bound on every wait below; a correct pool needs far less


def _until(condition: Callable[[], bool]) -> bool:
    deadline = time.monotonic() + WAIT
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


@pytest.fixture
def pools() -> Iterator[Callable[[int, int], WorkerPool]]:
    made: list[WorkerPool] = []

    def make(workers: int, max_threads: int) -> WorkerPool:
        pool = WorkerPool(workers, max_threads, name="test")
        made.append(pool)
        return pool

    yield make
    for pool in made:
        pool.shutdown(wait=False, cancel_futures=True)


def test_calls_return_their_results_and_exceptions(pools: Callable[..., WorkerPool]) -> None:
    pool = pools(2, 4)
    assert pool.submit(lambda a, b=0: a + b, 2, b=3).result(WAIT) == 5
    error = pool.submit(lambda: 1 // 0).exception(WAIT)
    assert isinstance(error, ZeroDivisionError)


def test_at_most_workers_calls_run_at_once(pools: Callable[..., WorkerPool]) -> None:
    """Six calls on 2 workers: two run, the others wait in the queue, not on threads of their
    own, and all run once the first ones end."""
    pool = pools(2, 8)
    release = threading.Event()
    lock = threading.Lock()
    running = [0, 0]  # now, most at once

    def call() -> None:
        with lock:
            running[0] += 1
            running[1] = max(running[1], running[0])
        release.wait(WAIT)
        with lock:
            running[0] -= 1

    calls = [pool.submit(call) for _ in range(6)]
    assert _until(lambda: running[0] == 2)
    time.sleep(0.1)  # a third call would have started by now
    assert running[0] == 2 and pool.stats()[0] == 2
    release.set()
    futures.wait(calls, WAIT)
    assert all(c.done() and c.exception() is None for c in calls)
    assert running[1] == 2


def test_a_blocking_call_hands_its_place_to_waiting_calls(
    pools: Callable[..., WorkerPool],
) -> None:
    """With one worker, a call that blocks (as a stream waits on its client) until a later call
    has run would wait forever on a plain pool of one thread; inside blocking() it does not.
    The extra thread exits once the blocking call is over."""
    pool = pools(1, 4)
    queued, later_ran = threading.Event(), threading.Event()

    started = threading.Event()

    def stream() -> bool:
        started.set()
        queued.wait(WAIT)  # the later call is already waiting when this one starts to block
        with pool.blocking():
            return later_ran.wait(WAIT)

    first = pool.submit(stream)
    assert started.wait(WAIT)
    later = pool.submit(later_ran.set)
    assert pool.stats()[0] == 1  # queued behind the one worker
    queued.set()
    assert first.result(WAIT) is True
    later.result(WAIT)
    assert _until(lambda: pool.stats() == (1, 1, 0))


def test_max_threads_bounds_the_threads(pools: Callable[..., WorkerPool]) -> None:
    """Two blocking calls on a pool of at most 2 threads: a third call waits for one to end."""
    pool = pools(1, 2)
    release = threading.Event()

    def stream() -> None:
        with pool.blocking():
            release.wait(WAIT)

    streams = [pool.submit(stream) for _ in range(2)]
    assert _until(lambda: pool.stats()[2] == 2)
    third = pool.submit(lambda: "ran")
    time.sleep(0.1)
    assert not third.done() and pool.stats()[0] == 2
    release.set()
    assert third.result(WAIT) == "ran"
    futures.wait(streams, WAIT)


def test_calls_from_many_threads_all_run_once(pools: Callable[..., WorkerPool]) -> None:
    pool = pools(2, 6)
    results: list[futures.Future[int]] = []
    lock = threading.Lock()

    def submitter(base: int) -> None:
        for i in range(200):
            future = pool.submit(lambda n: n * 2, base + i)
            with lock:
                results.append(future)

    threads = [threading.Thread(target=submitter, args=(k * 1000,)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT)
    values = sorted(f.result(WAIT) for f in results)
    assert values == sorted(2 * (k * 1000 + i) for k in range(4) for i in range(200))
    assert pool.stats()[0] <= 2


def test_shutdown_refuses_new_calls_and_cancels_queued_ones(
    pools: Callable[..., WorkerPool],
) -> None:
    pool = pools(1, 1)
    started, release = threading.Event(), threading.Event()

    def call() -> bool:
        started.set()
        return release.wait(WAIT)

    running = pool.submit(call)
    assert started.wait(WAIT)  # taken off the queue: shutdown leaves it running
    queued = pool.submit(lambda: "never")
    pool.shutdown(wait=False, cancel_futures=True)
    assert queued.cancelled()
    with pytest.raises(RuntimeError, match="shut down"):
        pool.submit(lambda: None)
    release.set()
    assert running.result(WAIT) is True
    assert _until(lambda: pool.stats()[0] == 0)


def test_bad_sizes_are_refused() -> None:
    with pytest.raises(ValueError, match="workers"):
        WorkerPool(0, 4)
    with pytest.raises(ValueError, match="max_threads"):
        WorkerPool(3, 2)
