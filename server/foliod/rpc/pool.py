"""The gRPC server's threads: a few run calls, and a call that will block for long (a stream
waiting for its client) hands its place to a new thread, as Go's scheduler hands a blocked
goroutine's processor to another thread.

grpcio's sync server runs every call on a thread of the executor it is given. Python code runs
one thread at a time (the GIL), so threads beyond the cores buy no throughput for calls that
compute, and each one costs: with a ThreadPoolExecutor of 8 and 8 calls in flight, every call
wakes a sleeping thread, which then sleeps again until its request arrives, and the GIL passes
between nine threads. Measured on 2 cores (docs/operations.md, "Worker threads"): 4 KiB
ReadFile cache hits, 8 in flight, 11-14 context switches per call with 8 threads and about 6
with 2, which served 1.2-1.4x the calls per second. With few threads, calls wait in the queue
instead, and a thread that ends a call takes the next without sleeping.

Streams must not hold those few threads: a Submit stream or a health Watch occupies its thread
for as long as the client keeps it open. Such a handler runs inside blocking(), which counts
its thread out of the `workers` running calls and starts another thread if calls are waiting.
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from contextlib import contextmanager
from typing import Any, TypeAlias

# A queued call: its future, the function and its arguments.
_Work: TypeAlias = tuple["futures.Future[Any]", Callable[..., Any], tuple[Any, ...], dict[str, Any]]


class WorkerPool(futures.Executor):
    """An executor that runs submitted calls on at most `workers` threads at a time, not
    counting threads inside blocking(); it never has more than `max_threads` threads. Threads
    start when work is waiting and none is free, and a thread beyond the `workers` that are
    not blocking exits when it finishes its call."""

    def __init__(self, workers: int, max_threads: int, name: str = "rpc") -> None:
        if not 1 <= workers <= max_threads:
            raise ValueError(f"need 1 <= workers ({workers}) <= max_threads ({max_threads})")
        self.workers = workers
        self.max_threads = max_threads
        self._name = name
        self._numbers = itertools.count()
        self._queue: queue.SimpleQueue[_Work | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads: set[threading.Thread] = set()
        self._queued = 0  # work put and not yet taken
        self._idle = 0  # threads waiting for work
        self._blocking = 0  # threads inside blocking()
        self._shutdown = False

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> futures.Future[Any]:
        future: futures.Future[Any] = futures.Future()
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot submit calls to a pool that is shut down")
            self._queue.put((future, fn, args, kwargs))
            self._queued += 1
            self._start_if_needed()
        return future

    @contextmanager
    def blocking(self) -> Iterator[None]:
        """Marks the calling thread's work as long and blocking for the duration: it stops
        counting towards `workers`, and waiting calls get a thread of their own."""
        with self._lock:
            self._blocking += 1
            self._start_if_needed()
        try:
            yield
        finally:
            with self._lock:
                self._blocking -= 1

    def stats(self) -> tuple[int, int, int]:
        """(threads, idle threads, threads inside blocking())."""
        with self._lock:
            return len(self._threads), self._idle, self._blocking

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._shutdown = True
            threads = list(self._threads)
            if cancel_futures:
                while True:
                    try:
                        work = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if work is not None:
                        self._queued -= 1
                        work[0].cancel()
            for _ in threads:
                self._queue.put(None)
        if wait:
            for thread in threads:
                if thread is not threading.current_thread():
                    thread.join()

    def _start_if_needed(self) -> None:
        """With the lock held: starts a thread if work waits that no idle thread will take
        and fewer than `workers` threads are running calls."""
        running = len(self._threads) - self._blocking
        if (
            self._queued > self._idle
            and running < self.workers
            and len(self._threads) < self.max_threads
        ):
            thread = threading.Thread(
                target=self._run, name=f"{self._name}_{next(self._numbers)}", daemon=True
            )
            self._threads.add(thread)
            thread.start()

    def _run(self) -> None:
        me = threading.current_thread()
        get, lock = self._queue.get, self._lock
        while True:
            with lock:
                self._idle += 1
            work = get()
            with lock:
                self._idle -= 1
                if work is None:
                    self._threads.discard(me)
                    return
                self._queued -= 1
            future, fn, args, kwargs = work
            if future.set_running_or_notify_cancel():
                try:
                    result = fn(*args, **kwargs)
                except BaseException as exc:
                    future.set_exception(exc)
                else:
                    future.set_result(result)
            del work, future, fn, args, kwargs
            with lock:
                # Surplus once a blocking call ended: more threads running calls than workers.
                if len(self._threads) - self._blocking > self.workers:
                    self._threads.discard(me)
                    return
