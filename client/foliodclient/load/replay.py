"""foliod-load replay through the Replay RPC (``--mode rpc``, replay's default): the trace laid
over its files as columns and sent in order, in calls of at most CALL_ACCESSES page accesses,
one after another on one stream, so the server sees every access in the trace's order (with
``--reclaim-policy lru`` its misses are an exact LRU's, page for page). The report's figures
come from the calls' totals and per-interval series; latency is per Replay call.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from foliod.api import DEVICE_PROFILES, MAX_REPLAY_ACCESSES, PAGE_SIZE
from foliodclient._client import FoliodClient
from foliodclient._types import ReplayTotals
from foliodclient.errors import CallError
from foliodclient.load.progress import Progress
from foliodclient.load.runner import (
    NS_PER_SECOND,
    Recorder,
    RunConfig,
    RunResult,
    Sample,
    Schedule,
    memmap_bytes,
    setup,
    teardown,
)
from foliodclient.load.workloads import Replay, ReplayColumns

# Page accesses a Replay call carries at most (the server takes MAX_REPLAY_ACCESSES): a call
# holds the machine's lock while it runs, so calls of about a second leave room for others.
CALL_ACCESSES = min(1 << 20, MAX_REPLAY_ACCESSES)
# Points of the timeline: the series asks for one interval per 1/TIMELINE_POINTS of the trace.
TIMELINE_POINTS = 100


def calls(columns: ReplayColumns, limit: int = CALL_ACCESSES) -> Iterator[tuple[int, int]]:
    """[start, end) operation ranges of at most `limit` page accesses each (an operation
    larger than that alone), in order."""
    start = total = 0
    for row, nr_pages in enumerate(columns.accesses):
        if total + nr_pages > limit and row > start:
            yield start, row
            start, total = row, 0
        total += nr_pages
    if start < len(columns.accesses):
        yield start, len(columns.accesses)


def _sample(t_seconds: float, interval: ReplayTotals) -> Sample:
    span = max(interval.elapsed_seconds, 1e-9)
    return Sample(
        t_seconds=round(t_seconds, 6),
        warmup=False,
        ops=interval.operations,
        errors=0,
        ops_per_second=interval.operations / span,
        bytes_per_second=interval.accesses * PAGE_SIZE / span,
        p50_seconds=0.0,
        p99_seconds=0.0,
        max_seconds=0.0,
        memmap_bytes=memmap_bytes(interval.memmap),
    )


def _add(recorder: Recorder, totals: ReplayTotals, reads: int, writes: int) -> None:
    stats, read_stats = totals.stats, totals.read_stats
    recorder.ops += totals.operations
    recorder.accesses += totals.accesses
    if reads:
        recorder.ops_by_kind["read"] += reads
    if writes:
        recorder.ops_by_kind["write"] += writes
    recorder.pages_hit += stats.pages_hit
    recorder.pages_missed += stats.pages_missed
    recorder.pages_readahead += stats.pages_readahead
    recorder.device_seconds += stats.device_seconds
    recorder.read_pages_hit += read_stats.pages_hit
    recorder.read_pages_missed += read_stats.pages_missed
    recorder.read_device_seconds += read_stats.device_seconds


def run_replay(config: RunConfig, workload: Replay, progress: Progress) -> RunResult:
    """Sets the trace's files up, replays the trace through Replay calls and tears the files
    down. A failed call ends the replay: the report holds the calls before it and names it in
    `failures`, as it names a failed teardown; a failed setup raises RunFailed."""
    device = DEVICE_PROFILES[config.device]
    recorder = Recorder(device)
    schedule = Schedule()
    samples: list[Sample] = []
    failures: list[tuple[str, CallError]] = []
    with FoliodClient(
        config.target,
        timeout=config.timeout_seconds,
        machine=config.machine,
        **config.security(),
    ) as client:
        memmap_before, buddy_before = client.get_memmap(), client.get_buddy_info()
        setup(workload, client)
        try:
            columns = workload.columns(device)
            total_accesses = sum(columns.accesses)
            interval = max(total_accesses // TIMELINE_POINTS, 1)
            ranges = list(calls(columns, CALL_ACCESSES))
            started = time.perf_counter()
            for number, (start, end) in enumerate(ranges):
                writes = columns.writes[start:end]
                nr_writes = sum(writes)
                called = time.perf_counter()
                try:
                    result = client.replay(
                        columns.names,
                        columns.offsets[start:end],
                        columns.lengths[start:end],
                        writes,
                        columns.files[start:end],
                        interval_accesses=interval,
                    )
                except CallError as exc:
                    failures.append(
                        (f"Replay call {number + 1} of {len(ranges)} (operations {start}..)", exc)
                    )
                    break
                done = time.perf_counter()
                recorder.histogram.record(int((done - called) * NS_PER_SECOND))
                _add(recorder, result.totals, end - start - nr_writes, nr_writes)
                for length, write in zip(columns.lengths[start:end], writes, strict=True):
                    if write:
                        recorder.bytes_written += length
                    else:
                        recorder.bytes_read += length
                recorder.all_miss_device_seconds += sum(columns.all_miss_seconds[start:end])
                t = called - started
                for point in result.intervals:
                    t += point.elapsed_seconds
                    samples.append(_sample(t, point))
                progress.update(
                    ops=recorder.ops,
                    errors=0,
                    elapsed_seconds=done - started,
                    remaining_seconds=None,
                    warmup=False,
                )
            elapsed = time.perf_counter() - started
            progress.close()
            memmap_after, buddy_after = client.get_memmap(), client.get_buddy_info()
        finally:
            failures += teardown(workload, client)
    return RunResult(
        workload=workload.name,
        config=config,
        recorder=recorder,
        schedule=schedule,
        elapsed_seconds=elapsed if recorder.ops else 0.0,
        samples=samples,
        memmap_before=memmap_before,
        memmap_after=memmap_after,
        buddy_before=buddy_before,
        buddy_after=buddy_after,
        failures=failures,
    )
