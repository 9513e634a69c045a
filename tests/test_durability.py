"""Durability and consistency of file data: fsync across SIGKILL, atomic concurrent writes, and
reads under memory pressure, each checked byte for byte against a model kept by the client."""

from __future__ import annotations

import random
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from foliod.server import FoliodServer
from foliod.v1 import foliod_pb2 as pb
from foliod.v1 import foliod_pb2_grpc
from tests.conftest import ServerFactory, ServerProcess, connect

Stub = foliod_pb2_grpc.FoliodStub
KIB = 1 << 10
MIB = 1 << 20
MAX_IO = 2 * MIB
RPC_TIMEOUT = 30.0


def _read_all(stub: Stub, name: str, length: int, chunk: int = MAX_IO) -> bytes:
    """The first length bytes of a file, read in chunks of at most 2 MiB."""
    out = bytearray()
    offset = 0
    while offset < length:
        size = min(chunk, length - offset)
        reply = stub.ReadFile(
            pb.ReadFileRequest(name=name, offset=offset, length=size), timeout=RPC_TIMEOUT
        )
        assert len(reply.data) == size, f"{name}: short read at {offset}"
        out += reply.data
        offset += size
    return bytes(out)


def _apply(model: bytearray, offset: int, data: bytes) -> None:
    """Writes data into a file model at offset, growing it (with a zero hole) as a file grows."""
    if offset > len(model):
        model.extend(bytes(offset - len(model)))
    model[offset : offset + len(data)] = data


def _first_difference(got: bytes, want: bytes) -> int:
    return next((i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), -1)


# -- 1. fsync survives SIGKILL -----------------------------------------------------------------


@dataclass
class _DurableFile:
    """A file as the client wrote it, and the snapshot its last successful Fsync acknowledged."""

    handle: int
    model: bytearray = field(default_factory=bytearray)
    acked: bytes = b""


@dataclass
class _Workload:
    files: dict[str, _DurableFile]
    killed: threading.Event
    enough: threading.Event = field(default_factory=threading.Event)
    writes: int = 0
    fsyncs: int = 0
    # The RPC error that ended the workload, and whether the kill had been sent by then.
    error: grpc.RpcError | None = None
    error_after_kill: bool = False
    unexpected: BaseException | None = None


MAX_DURABLE_FILE = 8 * MIB


def _durability_workload(stub: Stub, work: _Workload, seed: int) -> None:
    """Batches of writes beyond each file's acknowledged end, each batch made durable by Fsync;
    every byte once acknowledged is never written again, so the oracle is exact."""
    rng = random.Random(seed)
    names = sorted(work.files)
    deadline = time.monotonic() + 20
    try:
        for _ in range(20_000):
            if time.monotonic() > deadline or work.killed.is_set():
                break
            open_names = [n for n in names if len(work.files[n].model) < MAX_DURABLE_FILE]
            if not open_names:
                break
            name = rng.choice(open_names)
            tracked = work.files[name]
            for _ in range(rng.randint(1, 6)):
                # Anywhere from the acknowledged end to a little past the current end: later
                # writes overwrite unacknowledged bytes, leave holes, share the acknowledged
                # tail's page, but never touch an acknowledged byte.
                offset = rng.randrange(len(tracked.acked), len(tracked.model) + 3 * 4096 + 1)
                size = rng.choice((rng.randint(1, 4096), rng.randint(1, 192 * KIB)))
                data = rng.randbytes(size)
                stub.WriteFile(
                    pb.WriteFileRequest(name=name, offset=offset, data=data), timeout=RPC_TIMEOUT
                )
                _apply(tracked.model, offset, data)
                work.writes += 1
            stub.Fsync(pb.FsyncRequest(handle=tracked.handle), timeout=RPC_TIMEOUT)
            tracked.acked = bytes(tracked.model)
            work.fsyncs += 1
            if work.fsyncs >= 12:
                work.enough.set()
    except grpc.RpcError as exc:
        work.error = exc
        work.error_after_kill = work.killed.is_set()
    except BaseException as exc:
        work.unexpected = exc
    finally:
        work.enough.set()


@pytest.mark.slow
def test_sigkill_keeps_every_fsynced_byte(
    spawn: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    """Every byte acknowledged by a successful Fsync survives a SIGKILL and a restart intact."""
    server = spawn("--ram", "64MiB")
    names = [f"durable/f{i}.bin" for i in range(4)]
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = foliod_pb2_grpc.FoliodStub(channel)
        files: dict[str, _DurableFile] = {}
        for name in names:
            stub.CreateFile(pb.CreateFileRequest(name=name), timeout=RPC_TIMEOUT)
            handle = stub.OpenFile(pb.OpenFileRequest(name=name), timeout=RPC_TIMEOUT).handle
            files[name] = _DurableFile(handle)
        work = _Workload(files, threading.Event())
        worker = threading.Thread(target=_durability_workload, args=(stub, work, 20240611))
        started = time.monotonic()
        worker.start()
        assert work.enough.wait(30), "the workload made no progress"
        time.sleep(max(0.0, started + 1.5 - time.monotonic()))
        work.killed.set()
        server.proc.kill()
        worker.join(60)
        assert not worker.is_alive(), "the workload did not stop after the kill"
    assert server.wait(10) == -signal.SIGKILL
    if work.unexpected is not None:
        raise work.unexpected
    assert work.error is None or work.error_after_kill, f"RPC failed before the kill: {work.error}"
    assert work.fsyncs >= 12, f"only {work.fsyncs} fsyncs before the kill"
    acked_total = sum(len(f.acked) for f in files.values())
    assert acked_total > 0

    restarted = spawn("--ram", "64MiB")
    store = tmp_path / "var" / "files" / "host"
    with grpc.insecure_channel(f"127.0.0.1:{restarted.port}") as channel:
        stub = foliod_pb2_grpc.FoliodStub(channel)
        listed = {f.name for f in stub.ListFiles(pb.ListFilesRequest(), timeout=RPC_TIMEOUT).files}
        assert set(names) <= listed
        for name, tracked in files.items():
            want = tracked.acked
            size = stub.StatFile(pb.StatFileRequest(name=name), timeout=RPC_TIMEOUT).size_bytes
            assert size >= len(want), f"{name}: {size} bytes after restart, {len(want)} acked"
            got = _read_all(stub, name, len(want))
            assert got == want, (
                f"{name}: acknowledged byte {_first_difference(got, want)} of {len(want)} "
                "changed across SIGKILL"
            )
            on_disk = (store / name).read_bytes()
            assert on_disk[: len(want)] == want, f"{name}: backing file lost acknowledged bytes"


# -- 2. concurrent clients ---------------------------------------------------------------------


@dataclass
class _History:
    """Real-time order of RPCs: a ticket before each call is sent and after it returns."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    clock: int = 0
    # (file, value) -> (ticket before the write was sent, ticket after it returned).
    writes: dict[tuple[str, int], tuple[int, int]] = field(default_factory=dict)
    # (file, value seen, ticket before the read was sent, ticket after it returned).
    reads: list[tuple[str, int, int, int]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)

    def tick(self) -> int:
        with self.lock:
            self.clock += 1
            return self.clock


INITIAL = 0xFF
# (name, offset, length): every write and every read covers exactly this range.
SHARED_RANGES = {"shared/a": (0, 64 * KIB + 123), "shared/b": (3000, 70_000)}
THREADS = 6
OPS = 150
WRITES_PER_THREAD = len(range(0, OPS, 4))


def _shared_client(server: FoliodServer, history: _History, thread: int, deadline: float) -> None:
    """One client on its own channel: writes (every fourth op) and reads of the shared ranges."""
    rng = random.Random(1000 + thread)
    channel, stub = connect(server)
    try:
        writes = 0
        for op in range(OPS):
            if time.monotonic() > deadline:
                break
            name = rng.choice(sorted(SHARED_RANGES))
            offset, length = SHARED_RANGES[name]
            if op % 4 == 0:
                value = 1 + thread * WRITES_PER_THREAD + writes
                writes += 1
                start = history.tick()
                with history.lock:
                    history.writes[name, value] = (start, -1)
                stub.WriteFile(
                    pb.WriteFileRequest(name=name, offset=offset, data=bytes([value]) * length),
                    timeout=RPC_TIMEOUT,
                )
                end = history.tick()
                with history.lock:
                    history.writes[name, value] = (start, end)
            elif op % 25 == 13:
                stub.Writeback(pb.WritebackRequest(name=name), timeout=RPC_TIMEOUT)
            elif op % 50 == 37:
                stub.DropCaches(pb.DropCachesRequest(), timeout=RPC_TIMEOUT)
            else:
                start = history.tick()
                data = stub.ReadFile(
                    pb.ReadFileRequest(name=name, offset=offset, length=length),
                    timeout=RPC_TIMEOUT,
                ).data
                end = history.tick()
                value = data[0] if data else -1
                with history.lock:
                    if value < 0 or data != bytes([value]) * length:
                        mixed = sorted(set(data))[:8]
                        history.problems.append(
                            f"torn read of {name}: {len(data)} bytes with values {mixed}"
                        )
                    elif value != INITIAL and (name, value) not in history.writes:
                        history.problems.append(f"{name} read {value}, which no one wrote")
                    history.reads.append((name, value, start, end))
    except BaseException as exc:
        with history.lock:
            history.errors.append(exc)
    finally:
        channel.close()


def _check_shared_history(history: _History, finals: dict[str, bytes]) -> list[str]:
    """Reads and final contents agree with some order of the writes consistent with real time."""
    problems: list[str] = []
    by_file: dict[str, list[tuple[int, int]]] = {}
    for (name, _), span in history.writes.items():
        by_file.setdefault(name, []).append(span)
    for name, value, r_start, r_end in history.reads:
        spans = by_file.get(name, [])
        if value == INITIAL:
            if any(w_end < r_start for _, w_end in spans):
                problems.append(f"{name}: a read saw the initial fill after a write completed")
            continue
        w_start, w_end = history.writes[name, value]
        if w_start > r_end:
            problems.append(f"{name}: a read saw value {value} before its write was sent")
        if any(w_end < x_start and x_end < r_start for x_start, x_end in spans):
            problems.append(f"{name}: a read saw value {value} after a later write completed")
    for name, data in finals.items():
        value = data[0]
        if data != bytes([value]) * len(data):
            problems.append(f"{name}: final content is not one write")
            continue
        if (name, value) not in history.writes:
            problems.append(f"{name}: final value {value} was never written")
            continue
        _, w_end = history.writes[name, value]
        if any(x_start > w_end for x_start, _ in by_file[name]):
            problems.append(f"{name}: final value {value} is older than a write sent after it")
    return problems


ADJACENT = 5000


def _adjacent_client(
    server: FoliodServer, thread: int, deadline: float, last: list[int], problems: list[str]
) -> None:
    """Writes its own unaligned 5000-byte range again and again and reads it back each time."""
    channel, stub = connect(server)
    offset = thread * ADJACENT
    try:
        for op in range(OPS):
            if time.monotonic() > deadline:
                break
            if op % 2 == 0:
                value = op // 2 + 1
                stub.WriteFile(
                    pb.WriteFileRequest(
                        name="adjacent", offset=offset, data=bytes([value]) * ADJACENT
                    ),
                    timeout=RPC_TIMEOUT,
                )
                last[thread] = value
            else:
                data = stub.ReadFile(
                    pb.ReadFileRequest(name="adjacent", offset=offset, length=ADJACENT),
                    timeout=RPC_TIMEOUT,
                ).data
                if data != bytes([last[thread]]) * ADJACENT:
                    problems.append(
                        f"thread {thread} wrote {last[thread]} but read back "
                        f"{sorted(set(data))[:8]} ({len(data)} bytes)"
                    )
            if thread == 0 and op % 20 == 7:
                stub.Writeback(pb.WritebackRequest(name="adjacent"), timeout=RPC_TIMEOUT)
            if thread == 1 and op % 30 == 11:
                stub.DropCaches(pb.DropCachesRequest(), timeout=RPC_TIMEOUT)
    except BaseException as exc:
        problems.append(f"thread {thread}: {exc!r}")
    finally:
        channel.close()


@pytest.mark.slow
def test_concurrent_clients_see_whole_writes(make_server: ServerFactory) -> None:
    """Concurrent clients never see a torn write, and adjacent unaligned writes lose nothing."""
    server = make_server(ram=32 << 20)
    _, stub = connect(server)
    for name, (offset, length) in SHARED_RANGES.items():
        stub.CreateFile(pb.CreateFileRequest(name=name), timeout=RPC_TIMEOUT)
        stub.WriteFile(
            pb.WriteFileRequest(name=name, offset=offset, data=bytes([INITIAL]) * length),
            timeout=RPC_TIMEOUT,
        )
    assert THREADS * WRITES_PER_THREAD < INITIAL  # every write has a value of its own

    history = _History()
    deadline = time.monotonic() + 60
    threads = [
        threading.Thread(target=_shared_client, args=(server, history, t, deadline))
        for t in range(THREADS)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(90)
    assert not any(t.is_alive() for t in threads)
    assert not history.errors, history.errors[:3]
    assert not history.problems, history.problems[:5]
    assert len(history.writes) == THREADS * WRITES_PER_THREAD
    assert len(history.reads) > THREADS * OPS // 2
    finals: dict[str, bytes] = {}
    for name, (offset, length) in SHARED_RANGES.items():
        reply = stub.ReadFile(
            pb.ReadFileRequest(name=name, offset=offset, length=length), timeout=RPC_TIMEOUT
        )
        finals[name] = reply.data
        assert stub.StatFile(pb.StatFileRequest(name=name)).size_bytes == offset + length
    assert _read_all(stub, "shared/b", 3000) == bytes(3000)  # the hole before the range
    problems = _check_shared_history(history, finals)
    assert not problems, problems[:5]

    # Phase 2: disjoint, adjacent, unaligned ranges that share pages at every boundary.
    stub.CreateFile(pb.CreateFileRequest(name="adjacent"), timeout=RPC_TIMEOUT)
    last = [0] * THREADS
    adjacent_problems: list[str] = []
    deadline = time.monotonic() + 60
    threads = [
        threading.Thread(
            target=_adjacent_client, args=(server, t, deadline, last, adjacent_problems)
        )
        for t in range(THREADS)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(90)
    assert not any(t.is_alive() for t in threads)
    assert not adjacent_problems, adjacent_problems[:5]
    assert all(value == OPS // 2 for value in last)
    want = b"".join(bytes([value]) * ADJACENT for value in last)
    assert stub.StatFile(pb.StatFileRequest(name="adjacent")).size_bytes == len(want)
    assert _read_all(stub, "adjacent", len(want)) == want
    stub.Writeback(pb.WritebackRequest(name="adjacent"), timeout=RPC_TIMEOUT)
    on_disk = (server.config.state_dir / "files" / "host" / "adjacent").read_bytes()
    assert on_disk == want
    stub.DropCaches(pb.DropCachesRequest(), timeout=RPC_TIMEOUT)
    assert _read_all(stub, "adjacent", len(want), chunk=4093) == want


# -- 3. memory pressure ------------------------------------------------------------------------


def _squeeze(stub: Stub, step: int) -> None:
    """One round of pressure: drop clean cache, reclaim, or take and give back 4 MiB of anon."""
    kind = step % 3
    if kind == 0:
        stub.DropCaches(pb.DropCachesRequest(), timeout=RPC_TIMEOUT)
    elif kind == 1:
        stub.Reclaim(pb.ReclaimRequest(bytes=2 * MIB), timeout=RPC_TIMEOUT)
    else:
        stub.Allocate(
            pb.AllocateRequest(owner="hog", kind=pb.FOLIO_KIND_ANON, bytes=4 * MIB),
            timeout=RPC_TIMEOUT,
        )
        stub.ReleaseOwner(pb.ReleaseOwnerRequest(owner="hog"), timeout=RPC_TIMEOUT)


@pytest.mark.slow
def test_reads_under_memory_pressure_return_latest_bytes(make_server: ServerFactory) -> None:
    """Files three times the size of RAM read back byte for byte while the cache is squeezed."""
    server = make_server(ram=16 << 20)
    _, stub = connect(server)
    rng = random.Random(77)
    sizes = {
        "p/a": 8 * MIB,
        "p/b": 8 * MIB + 4095,
        "p/c": 6 * MIB + 1,
        "p/d": 9 * MIB,
        "p/e": 7 * MIB + 777,
        "p/f": 10 * MIB - 3,
    }
    assert sum(sizes.values()) > 3 * (16 << 20)
    models: dict[str, bytearray] = {}
    step = 0
    for number, (name, size) in enumerate(sizes.items()):
        stub.CreateFile(
            pb.CreateFileRequest(name=name, max_order=rng.choice((0, 4, 9))), timeout=RPC_TIMEOUT
        )
        models[name] = bytearray(rng.randbytes(size))
        offset = 0
        while offset < size:
            length = min(rng.randint(1, MAX_IO), size - offset)
            stub.WriteFile(
                pb.WriteFileRequest(
                    name=name, offset=offset, data=bytes(models[name][offset : offset + length])
                ),
                timeout=RPC_TIMEOUT,
            )
            offset += length
            if rng.random() < 0.2:
                _squeeze(stub, step)
                step += 1
        if number % 2 == 0:
            stub.Writeback(pb.WritebackRequest(name=name), timeout=RPC_TIMEOUT)
        _squeeze(stub, step)
        step += 1

    # Overwrite and extend: partial pages of evicted folios must be read in before they change.
    for _ in range(60):
        name = rng.choice(sorted(models))
        model = models[name]
        if rng.random() < 0.15:
            offset = len(model) + rng.randrange(0, 3 * 4096)
        else:
            offset = rng.randrange(0, len(model))
        data = rng.randbytes(rng.choice((rng.randint(1, 300), rng.randint(1, 512 * KIB))))
        stub.WriteFile(
            pb.WriteFileRequest(name=name, offset=offset, data=data), timeout=RPC_TIMEOUT
        )
        _apply(model, offset, data)
        if rng.random() < 0.3:
            _squeeze(stub, step)
            step += 1

    stub.Allocate(
        pb.AllocateRequest(owner="hog", kind=pb.FOLIO_KIND_ANON, bytes=4 * MIB),
        timeout=RPC_TIMEOUT,
    )
    for name, model in models.items():
        stat = stub.StatFile(pb.StatFileRequest(name=name), timeout=RPC_TIMEOUT)
        assert stat.size_bytes == len(model)
        got = _read_all(stub, name, len(model), chunk=rng.randint(MIB, MAX_IO))
        assert got == bytes(model), f"{name}: byte {_first_difference(got, bytes(model))} differs"
    stub.ReleaseOwner(pb.ReleaseOwnerRequest(owner="hog"), timeout=RPC_TIMEOUT)

    vmstat = {e.name: e.value for e in stub.GetVmstat(pb.GetVmstatRequest()).entries}
    assert vmstat["pgsteal_kswapd"] + vmstat["pgsteal_direct"] > 0
    meminfo = stub.GetMeminfo(pb.GetMeminfoRequest(), timeout=RPC_TIMEOUT)
    assert meminfo.cached_bytes <= 16 << 20
    stub.Writeback(pb.WritebackRequest(), timeout=RPC_TIMEOUT)
    store = server.config.state_dir / "files" / "host"
    for name, model in models.items():
        assert (store / name).read_bytes() == bytes(model), f"{name}: backing file differs"
