"""Runs a workload: the open-loop schedule, workers (threads or asyncio tasks), unary or batched
submission, the recorder of every completion and the sampler of the run's timeline.

Open loop (``--rate``): op i is due at ``start + i / rate`` whatever happened before it, and its
latency is measured from that intended start, so a stall shows as the queueing it causes
instead of silently sending fewer requests (coordinated omission). Closed loop (no rate): an op
is due when a worker is free to send it. In batched mode a batch goes out when its last op is
due; each op's latency runs from its own due time to the batch's completion.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from foliod.api import DEFAULT_ADDRESS, DEVICE_PROFILES, PAGE_SIZE, DeviceModel
from foliodclient import Batch, BatchResult, OpResult, Submission
from foliodclient._client import AsyncFoliodClient, FoliodClient
from foliodclient._types import (
    Allocation,
    BuddyInfo,
    FileRead,
    FileWrite,
    MemmapReport,
    MemmapTotal,
    ModelReport,
)
from foliodclient.errors import CallError
from foliodclient.load.histogram import Histogram
from foliodclient.load.progress import Progress
from foliodclient.load.workloads import BATCHABLE, Op, OpKind, Outcome, Stream, Workload

Clock = Callable[[], float]
NS_PER_SECOND = 1_000_000_000


@dataclass(frozen=True, slots=True)
class RunConfig:
    """How to drive the server: connection, workers, submission mode, and how long."""

    target: str = DEFAULT_ADDRESS
    timeout_seconds: float | None = 10.0
    machine: str = ""
    concurrency: int = 4
    engine: str = "threads"
    mode: str = "unary"
    batch_size: int = 32
    rate: float | None = None
    ops: int | None = None
    duration_seconds: float | None = None
    warmup_seconds: float = 0.0
    interval_seconds: float = 1.0
    device: str = "nvme"
    # Connection security, as FoliodClient takes it.
    tls: bool = False
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    token: str | None = None

    def security(self) -> dict[str, Any]:
        """FoliodClient's TLS and token keyword arguments."""
        return {
            "tls": self.tls,
            "tls_ca": self.tls_ca,
            "tls_cert": self.tls_cert,
            "tls_key": self.tls_key,
            "token": self.token,
        }


@dataclass(frozen=True, slots=True)
class Slot:
    """When an op is due (on the schedule's clock) and whether it counts (after warm-up)."""

    intended: float
    measured: bool


class Schedule:
    """Hands out slots to every worker: open loop at `rate` ops/s or closed loop, until `ops`
    measured slots are out or `duration_seconds` after warm-up have passed (with neither, until
    stop())."""

    def __init__(
        self,
        *,
        rate: float | None = None,
        ops: int | None = None,
        duration_seconds: float | None = None,
        warmup_seconds: float = 0.0,
        clock: Clock = time.perf_counter,
    ) -> None:
        self.rate = rate
        self.ops = ops
        self.duration_seconds = duration_seconds
        self.warmup_seconds = warmup_seconds
        self.clock = clock
        self.start_time = self.measure_from = 0.0
        self.end = math.inf
        self.claimed = 0
        self.measured = 0
        self.stopped = False
        self._lock = threading.Lock()

    def start(self) -> None:
        self.start_time = self.clock()
        self.measure_from = self.start_time + self.warmup_seconds
        if self.duration_seconds is not None:
            self.end = self.measure_from + self.duration_seconds

    def stop(self) -> None:
        """No more slots (interrupted, or a trace ran out)."""
        self.stopped = True

    def claim(self) -> Slot | None:
        """The next slot, or None when the run is over."""
        with self._lock:
            if self.stopped:
                return None
            now = self.clock()
            rate = self.rate
            intended = now if rate is None else self.start_time + self.claimed / rate
            if intended >= self.end or (self.rate is None and now >= self.end):
                self.stopped = True
                return None
            measured = intended >= self.measure_from
            if measured:
                if self.ops is not None and self.measured >= self.ops:
                    self.stopped = True
                    return None
                self.measured += 1
            self.claimed += 1
            return Slot(intended, measured)

    def remaining_seconds(self, now: float, done: int) -> float | None:
        """Time left: to the end of the duration, or the ops left at the rate so far."""
        if self.end < math.inf:
            return max(self.end - now, 0.0)
        if self.ops is None or now <= self.measure_from or not done:
            return None
        return (self.ops - done) / (done / (now - self.measure_from))


@dataclass(slots=True)
class Interval:
    """What completed since the previous sample."""

    ops: int = 0
    errors: int = 0
    nr_bytes: int = 0
    histogram: Histogram = field(default_factory=Histogram)


class Recorder:
    """Every completion: latency histogram, counts, bytes, page-cache stats and device time
    (what the misses cost, and what every read would have cost missing: one device request of
    all its pages), errors by status code. Warm-up ops count in the timeline only."""

    def __init__(self, device: DeviceModel) -> None:
        self.device = device
        self.histogram = Histogram()
        self.ops = self.errors = self.warmup_ops = 0
        self.bytes_read = self.bytes_written = 0
        self.pages_hit = self.pages_missed = self.pages_readahead = 0
        self.read_pages_hit = self.read_pages_missed = 0
        self.device_seconds = self.read_device_seconds = self.all_miss_device_seconds = 0.0
        self.errors_by_code: Counter[str] = Counter()
        # Page accesses, as the Replay RPC counts them (0 on the other paths).
        self.accesses = 0
        # The first failed op's status and message, to say what went wrong.
        self.first_error = ""
        self.ops_by_kind: Counter[str] = Counter()
        self.last_completion = 0.0
        self._interval = Interval()
        self._lock = threading.Lock()

    def record(
        self, op: Op, outcome: Outcome, latency_seconds: float, slot: Slot, end: float
    ) -> None:
        latency_ns = int(latency_seconds * NS_PER_SECOND)
        with self._lock:
            interval = self._interval
            interval.ops += 1
            interval.histogram.record(latency_ns)
            if not outcome.ok:
                interval.errors += 1
            interval.nr_bytes += outcome.nr_bytes
            if not slot.measured:
                self.warmup_ops += 1
                return
            self.ops += 1
            self.ops_by_kind[op.kind.value] += 1
            self.histogram.record(latency_ns)
            self.last_completion = max(self.last_completion, end)
            if not outcome.ok:
                self.errors += 1
                self.errors_by_code[outcome.code] += 1
                if not self.first_error:
                    self.first_error = f"{outcome.code}: {outcome.message}"
                return
            if op.kind is OpKind.READ:
                self.bytes_read += outcome.nr_bytes
            elif op.kind is OpKind.WRITE:
                self.bytes_written += outcome.nr_bytes
            stats = outcome.stats
            if stats is None:
                return
            self.pages_hit += stats.pages_hit
            self.pages_missed += stats.pages_missed
            self.pages_readahead += stats.pages_readahead
            self.device_seconds += stats.device_seconds
            if op.kind is OpKind.READ:
                self.read_pages_hit += stats.pages_hit
                self.read_pages_missed += stats.pages_missed
                self.read_device_seconds += stats.device_seconds
                nr_pages = stats.pages_hit + stats.pages_missed
                if nr_pages:
                    self.all_miss_device_seconds += self.device.read_seconds(nr_pages * PAGE_SIZE)

    def take_interval(self) -> Interval:
        with self._lock:
            interval, self._interval = self._interval, Interval()
        return interval


# Unary submission: one client method per op kind.


def _unary_call(op: Op) -> tuple[str, tuple[Any, ...], dict[str, Any]]:
    options: dict[str, Any] = {} if op.machine is None else {"machine": op.machine}
    match op.kind:
        case OpKind.READ:
            return "read_file", (op.name, op.length, op.offset), options
        case OpKind.WRITE:
            return "write_file", (op.name, op.data, op.offset), options
        case OpKind.FSYNC:
            return "fsync", (op.handle,), options
        case OpKind.ALLOCATE:
            options.update(order=op.order, count=1)
            return "allocate", (op.owner, op.folio_kind), options
        case OpKind.FREE:
            return "free", ([op.handle],), options
        case OpKind.CREATE:
            return "create_file", (op.name,), options
        case OpKind.DELETE:
            return "delete_file", (op.name,), options
    raise AssertionError(op.kind)


def _outcome(result: Any) -> Outcome:
    if isinstance(result, FileRead):
        return Outcome(stats=result.stats, nr_bytes=len(result.data))
    if isinstance(result, FileWrite):
        return Outcome(stats=result.stats, nr_bytes=result.written_bytes)
    if isinstance(result, Allocation):
        return Outcome(handles=result.handles)
    return Outcome()


def execute_unary(client: FoliodClient, ops: Sequence[Op]) -> list[Outcome]:
    outcomes = []
    for op in ops:
        method, args, options = _unary_call(op)
        try:
            outcomes.append(_outcome(getattr(client, method)(*args, **options)))
        except CallError as exc:
            outcomes.append(Outcome(code=exc.code.name, message=exc.message))
    return outcomes


async def execute_unary_async(client: AsyncFoliodClient, ops: Sequence[Op]) -> list[Outcome]:
    outcomes = []
    for op in ops:
        method, args, options = _unary_call(op)
        try:
            outcomes.append(_outcome(await getattr(client, method)(*args, **options)))
        except CallError as exc:
            outcomes.append(Outcome(code=exc.code.name, message=exc.message))
    return outcomes


class BatchExecutor:
    """Sends a worker's ops as Batches on one submission stream per machine; ops a Batch cannot
    carry (create, delete) go unary in between, so every op still applies in order."""

    def __init__(self, client: FoliodClient, default_machine: str) -> None:
        self._client = client
        self._default_machine = default_machine
        self._stack = contextlib.ExitStack()
        self._submissions: dict[str, Submission] = {}

    def close(self) -> None:
        self._stack.close()

    def _submission(self, machine: str) -> Submission:
        sub = self._submissions.get(machine)
        if sub is None:
            sub = self._stack.enter_context(self._client.open_submission(machine=machine))
            self._submissions[machine] = sub
        return sub

    def __call__(self, ops: Sequence[Op]) -> list[Outcome]:
        outcomes: list[Outcome] = []
        run: list[Op] = []
        for op in ops:
            machine = self._default_machine if op.machine is None else op.machine
            run_machine = None
            if run:
                first = run[0].machine
                run_machine = self._default_machine if first is None else first
            if op.kind not in BATCHABLE or (run and run_machine != machine):
                outcomes += self._submit(run)
                run = []
            if op.kind in BATCHABLE:
                run.append(op)
            else:
                outcomes += execute_unary(self._client, [op])
        outcomes += self._submit(run)
        return outcomes

    def _submit(self, ops: list[Op]) -> list[Outcome]:
        """Sends ops in Batches the server takes: at most Batch.MAX_OPS operations and
        Batch.MAX_PAYLOAD_BYTES of write data and read lengths each (which also keeps every
        message under the 4 MiB limit), however large --batch-size is."""
        outcomes: list[Outcome] = []
        start = payload = 0
        for end, op in enumerate(ops):
            size = op.length if op.kind is OpKind.READ else len(op.data)
            if end > start and (
                end - start == Batch.MAX_OPS or payload + size > Batch.MAX_PAYLOAD_BYTES
            ):
                outcomes += self._submit_batch(ops[start:end])
                start, payload = end, 0
            payload += size
        return outcomes + self._submit_batch(ops[start:])

    def _submit_batch(self, ops: list[Op]) -> list[Outcome]:
        if not ops:
            return []
        batch = Batch()
        for op in ops:
            match op.kind:
                case OpKind.READ:
                    batch.read(op.name, op.offset, op.length)
                case OpKind.WRITE:
                    batch.write(op.name, op.offset, op.data)
                case OpKind.FSYNC:
                    batch.fsync(op.handle)
                case OpKind.ALLOCATE:
                    batch.allocate(op.owner, op.folio_kind, order=op.order, count=1)
                case OpKind.FREE:
                    batch.free(op.handle)
        machine = self._default_machine if ops[0].machine is None else ops[0].machine
        try:
            result: BatchResult = self._submission(machine).submit(batch)
        except CallError as exc:
            return [Outcome(code=exc.code.name, message=exc.message) for _ in ops]
        if result.error is not None:
            error = result.error
            return [Outcome(code=error.code.name, message=error.message) for _ in ops]
        return [_batch_outcome(op, r) for op, r in zip(ops, result.results, strict=True)]


def _batch_outcome(op: Op, result: OpResult) -> Outcome:
    if not result.ok:
        return Outcome(code=result.code.name, message=result.message)
    stats = result.stats
    if op.kind is OpKind.READ:
        return Outcome(stats=stats, nr_bytes=len(result.data))
    if op.kind is OpKind.WRITE:
        return Outcome(stats=stats, nr_bytes=len(op.data))
    if op.kind is OpKind.ALLOCATE:
        return Outcome(handles=range(result.first_handle, result.first_handle + result.count))
    return Outcome()


# Workers.


def _fill(stream: Stream, schedule: Schedule, size: int) -> tuple[list[Slot], list[Op]]:
    slots: list[Slot] = []
    ops: list[Op] = []
    while len(ops) < size:
        slot = schedule.claim()
        if slot is None:
            break
        op = stream.next_op()
        if op is None:
            schedule.stop()
            break
        slots.append(slot)
        ops.append(op)
    return slots, ops


def _complete(
    *,
    stream: Stream,
    recorder: Recorder,
    slots: list[Slot],
    ops: list[Op],
    outcomes: list[Outcome],
    end: float,
) -> None:
    for slot, op, outcome in zip(slots, ops, outcomes, strict=True):
        stream.complete(op, outcome)
        recorder.record(op, outcome, end - slot.intended, slot, end)


def run_worker(
    stream: Stream,
    schedule: Schedule,
    recorder: Recorder,
    execute: Callable[[Sequence[Op]], list[Outcome]],
    *,
    batch_size: int = 1,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Claims slots, waits until they are due, sends their ops and records the outcomes."""
    while True:
        slots, ops = _fill(stream, schedule, batch_size)
        if not ops:
            return
        wait = slots[-1].intended - schedule.clock()
        if wait > 0:
            sleep(wait)
        outcomes = execute(ops)
        _complete(
            stream=stream,
            recorder=recorder,
            slots=slots,
            ops=ops,
            outcomes=outcomes,
            end=schedule.clock(),
        )


async def run_worker_async(
    stream: Stream,
    schedule: Schedule,
    recorder: Recorder,
    execute: Callable[[Sequence[Op]], Awaitable[list[Outcome]]],
) -> None:
    """run_worker as an asyncio task (unary: one op at a time)."""
    while True:
        slots, ops = _fill(stream, schedule, 1)
        if not ops:
            return
        wait = slots[-1].intended - schedule.clock()
        if wait > 0:
            await asyncio.sleep(wait)
        outcomes = await execute(ops)
        _complete(
            stream=stream,
            recorder=recorder,
            slots=slots,
            ops=ops,
            outcomes=outcomes,
            end=schedule.clock(),
        )


# The run.


@dataclass(frozen=True, slots=True)
class Sample:
    """One point of the timeline: seconds since the start, what completed in the interval,
    and the memmap total per model (bytes) at its end."""

    t_seconds: float
    warmup: bool
    ops: int
    errors: int
    ops_per_second: float
    bytes_per_second: float
    p50_seconds: float
    p99_seconds: float
    max_seconds: float
    memmap_bytes: dict[str, int]


@dataclass(slots=True)
class RunResult:
    workload: str
    config: RunConfig
    recorder: Recorder
    schedule: Schedule
    elapsed_seconds: float
    samples: list[Sample]
    memmap_before: MemmapReport
    memmap_after: MemmapReport
    buddy_before: BuddyInfo
    buddy_after: BuddyInfo
    interrupted: bool = False
    # What failed around the measured run (its teardown): (stage, error).
    failures: list[tuple[str, CallError]] = field(default_factory=list)


class RunFailed(Exception):
    """The run could not be measured (its setup failed): (stage, error) of each failure,
    the teardown's after the setup's."""

    def __init__(self, failures: list[tuple[str, CallError]]) -> None:
        super().__init__("; ".join(f"{stage} failed: {exc}" for stage, exc in failures))
        self.failures = failures


def teardown(workload: Workload, client: FoliodClient) -> list[tuple[str, CallError]]:
    """Undoes the workload's setup; its failure as a list, for the report to name."""
    try:
        workload.teardown(client)
    except CallError as exc:
        return [("teardown", exc)]
    return []


def setup(workload: Workload, client: FoliodClient) -> None:
    """Sets the workload up; if that fails, tears down what was made and raises RunFailed."""
    try:
        workload.setup(client)
    except CallError as exc:
        raise RunFailed([("setup", exc), *teardown(workload, client)]) from exc


def memmap_bytes(models: Iterable[ModelReport | MemmapTotal]) -> dict[str, int]:
    """The memory map's bytes by model name, from a MemmapReport's or a ReplayTotals'."""
    return {str(model.model): model.total_bytes for model in models}


class _Sampler:
    """Takes a Sample every interval; `memmap` fetches the report (None when it failed)."""

    def __init__(self, schedule: Schedule, recorder: Recorder, interval_seconds: float) -> None:
        self.schedule = schedule
        self.recorder = recorder
        self.interval_seconds = interval_seconds
        self.samples: list[Sample] = []
        self._last = 0.0

    def start(self) -> None:
        self._last = self.schedule.clock()

    def sample(self, memmap: MemmapReport | None) -> None:
        now = self.schedule.clock()
        span = max(now - self._last, 1e-9)
        self._last = now
        interval = self.recorder.take_interval()
        h = interval.histogram
        self.samples.append(
            Sample(
                t_seconds=round(now - self.schedule.start_time, 6),
                warmup=now <= self.schedule.measure_from,
                ops=interval.ops,
                errors=interval.errors,
                ops_per_second=interval.ops / span,
                bytes_per_second=interval.nr_bytes / span,
                p50_seconds=h.percentile(50) / NS_PER_SECOND,
                p99_seconds=h.percentile(99) / NS_PER_SECOND,
                max_seconds=h.max / NS_PER_SECOND,
                memmap_bytes=memmap_bytes(memmap.models if memmap else ()),
            )
        )


def _progress_update(progress: Progress, schedule: Schedule, recorder: Recorder) -> None:
    now = schedule.clock()
    progress.update(
        ops=recorder.ops,
        errors=recorder.errors,
        elapsed_seconds=max(now - schedule.measure_from, 0.0),
        remaining_seconds=schedule.remaining_seconds(now, recorder.ops),
        warmup=now < schedule.measure_from,
    )


def run(
    config: RunConfig,
    workload: Workload,
    progress: Progress,
    *,
    clock: Clock = time.perf_counter,
) -> RunResult:
    """Sets the workload up, runs it on `concurrency` workers, samples the timeline, and tears
    it down; memmap and buddyinfo are taken before setup and after the run."""
    if config.engine == "asyncio" and config.mode == "batched":
        raise ValueError("batched mode runs on threads (--engine threads)")
    device = DEVICE_PROFILES[config.device]
    with FoliodClient(
        config.target,
        timeout=config.timeout_seconds,
        machine=config.machine,
        **config.security(),
    ) as client:
        memmap_before, buddy_before = client.get_memmap(), client.get_buddy_info()
        setup(workload, client)
        failures: list[tuple[str, CallError]] = []
        try:
            schedule = Schedule(
                rate=config.rate,
                ops=config.ops,
                duration_seconds=config.duration_seconds,
                warmup_seconds=config.warmup_seconds,
                clock=clock,
            )
            recorder = Recorder(device)
            sampler = _Sampler(schedule, recorder, config.interval_seconds)
            streams = [workload.stream(i) for i in range(config.concurrency)]
            if config.engine == "asyncio":
                interrupted = asyncio.run(
                    _run_async(
                        config,
                        streams=streams,
                        schedule=schedule,
                        recorder=recorder,
                        sampler=sampler,
                        progress=progress,
                    )
                )
            else:
                interrupted = _run_threads(
                    config,
                    client,
                    streams=streams,
                    schedule=schedule,
                    recorder=recorder,
                    sampler=sampler,
                    progress=progress,
                )
            elapsed = max(recorder.last_completion - schedule.measure_from, 1e-9)
            memmap_after, buddy_after = client.get_memmap(), client.get_buddy_info()
        finally:
            failures = teardown(workload, client)
    return RunResult(
        workload=workload.name,
        config=config,
        recorder=recorder,
        schedule=schedule,
        elapsed_seconds=elapsed if recorder.ops else 0.0,
        samples=sampler.samples,
        memmap_before=memmap_before,
        memmap_after=memmap_after,
        buddy_before=buddy_before,
        buddy_after=buddy_after,
        interrupted=interrupted,
        failures=failures,
    )


def _try_memmap(client: FoliodClient) -> MemmapReport | None:
    try:
        return client.get_memmap()
    except CallError:
        return None


def _run_threads(
    config: RunConfig,
    client: FoliodClient,
    *,
    streams: list[Stream],
    schedule: Schedule,
    recorder: Recorder,
    sampler: _Sampler,
    progress: Progress,
) -> bool:
    executors: list[Callable[[Sequence[Op]], list[Outcome]]] = []
    batchers: list[BatchExecutor] = []
    for _ in streams:
        if config.mode == "batched":
            batcher = BatchExecutor(client, config.machine)
            batchers.append(batcher)
            executors.append(batcher)
        else:
            executors.append(lambda ops: execute_unary(client, ops))
    size = config.batch_size if config.mode == "batched" else 1
    errors: list[BaseException] = []

    def work(stream: Stream, execute: Callable[[Sequence[Op]], list[Outcome]]) -> None:
        try:
            run_worker(stream, schedule, recorder, execute, batch_size=size)
        except BaseException as exc:
            errors.append(exc)
            schedule.stop()

    threads = [
        threading.Thread(target=work, args=(s, e), name=f"foliod-load-{i}", daemon=True)
        for i, (s, e) in enumerate(zip(streams, executors, strict=True))
    ]
    interrupted = False
    schedule.start()
    sampler.start()
    for thread in threads:
        thread.start()
    next_sample = schedule.clock() + config.interval_seconds
    try:
        while any(t.is_alive() for t in threads):
            time.sleep(0.1)
            _progress_update(progress, schedule, recorder)
            if schedule.clock() >= next_sample:
                sampler.sample(_try_memmap(client))
                next_sample += config.interval_seconds
    except KeyboardInterrupt:
        interrupted = True
        schedule.stop()
        for thread in threads:
            thread.join()
    finally:
        for batcher in batchers:
            batcher.close()
    sampler.sample(_try_memmap(client))
    progress.close()
    if errors:
        raise errors[0]
    return interrupted


async def _run_async(
    config: RunConfig,
    *,
    streams: list[Stream],
    schedule: Schedule,
    recorder: Recorder,
    sampler: _Sampler,
    progress: Progress,
) -> bool:
    async with AsyncFoliodClient(
        config.target,
        timeout=config.timeout_seconds,
        machine=config.machine,
        **config.security(),
    ) as client:

        async def memmap() -> MemmapReport | None:
            try:
                return await client.get_memmap()
            except CallError:
                return None

        async def execute(ops: Sequence[Op]) -> list[Outcome]:
            return await execute_unary_async(client, ops)

        schedule.start()
        sampler.start()
        tasks = [
            asyncio.create_task(run_worker_async(s, schedule, recorder, execute)) for s in streams
        ]
        next_sample = schedule.clock() + config.interval_seconds
        try:
            while not all(t.done() for t in tasks):
                await asyncio.wait(tasks, timeout=0.1)
                _progress_update(progress, schedule, recorder)
                if schedule.clock() >= next_sample:
                    sampler.sample(await memmap())
                    next_sample += config.interval_seconds
        finally:
            schedule.stop()
            await asyncio.gather(*tasks, return_exceptions=True)
        for task in tasks:
            task.result()
        sampler.sample(await memmap())
        progress.close()
    return False
