"""Batched submission (Submit): ordering, per-operation errors, limits, malformed batches,
pipelining, the asyncio client, guests, and equivalence with unary calls."""

from __future__ import annotations

import asyncio
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from queue import Queue
from types import SimpleNamespace
from typing import Any, cast

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from foliod.api import FolioKind
from foliod.api.pb_enums import FOLIO_KIND, OP_NAMES
from foliod.rpc import batch as batch_module
from foliod.rpc import interceptors
from foliod.rpc.batch import MAX_BATCH_OPS, MAX_BATCH_PAYLOAD_BYTES
from foliod.server import FoliodServer
from foliod.v1 import foliod_pb2 as pb
from foliod.v1 import foliod_pb2_grpc
from foliodclient import (
    AsyncFoliodClient,
    Batch,
    BatchResult,
    FoliodClient,
    InvalidArgument,
    IoStats,
    UnknownFile,
)
from foliodclient.load.workloads import BATCHABLE
from tests.conftest import ServerFactory, connect

OK = grpc.StatusCode.OK
PAGE = 4096


def _target(server: FoliodServer) -> str:
    return f"127.0.0.1:{server.grpc_port}"


@pytest.fixture
def client(server: FoliodServer) -> Iterator[FoliodClient]:
    with FoliodClient(_target(server), timeout=10) as c:
        c.create_file("a")
        yield c


def _state(client: FoliodClient, machine: str = "") -> tuple[Any, ...]:
    """What a batch may change: files, memory, counters, buddy lists."""
    return (
        client.list_files(machine=machine),
        client.get_meminfo(machine=machine),
        client.get_vmstat(machine=machine),
        client.get_buddy_info(machine=machine),
    )


def test_a_write_then_a_read_in_one_batch_reads_the_written_bytes(client: FoliodClient) -> None:
    """Operations apply in order: a read after a write of the same bytes returns them."""
    batch = Batch()
    w = batch.write("a", 100, b"hello, folio")
    r = batch.read("a", 100, 12)
    short = batch.read("a", 107, 100)
    with client.open_submission() as s:
        result = s.submit(batch)
    assert result.ok and result.error is None and len(result) == 3
    written = result[w].stats
    assert result[w].op == "write" and written is not None and written.pages_missed == 1
    assert result[r].data == b"hello, folio"
    assert result[r].stats == IoStats(1, 0, 0, 0.0)
    assert result[short].data == b"folio"  # EOF shortens a read, as in ReadFile
    assert client.read_file("a", 12, offset=100).data == b"hello, folio"


def test_allocate_fsync_and_free_report_handles_and_pages(client: FoliodClient) -> None:
    """ALLOCATE returns its handles, FREE and FSYNC the pages they freed or wrote back."""
    handle = client.open_file("a")
    first = Batch()
    alloc = first.allocate("proc", "slab", order=2, count=3)
    first.write("a", 0, b"x" * 5000)
    sync = first.fsync(handle)
    with client.open_submission() as s:
        done = s.submit(first)
        assert done.ok
        assert (done[alloc].count, done[alloc].nr_pages) == (3, 12)
        assert done[sync].nr_pages == 2
        second = Batch()
        for h in done[alloc].handles:
            second.free(h)
        freed = s.submit(second)
    assert freed.ok and [r.nr_pages for r in freed] == [4, 4, 4]
    assert client.get_meminfo().slab_bytes == 0


def test_failed_operations_fail_alone_with_their_own_codes(client: FoliodClient) -> None:
    """Unknown file, offset past the limit, fsync of a closed handle, free of an unknown handle:
    each fails with its code and reason, and its neighbours succeed."""
    closed = client.open_file("a")
    client.close_file(closed)
    batch = Batch()
    batch.write("a", 0, b"before")
    batch.read("missing", 0, 10)
    batch.write("a", 1 << 44, b"too far")
    batch.fsync(closed)
    batch.free(12345)
    batch.allocate("proc", "file", count=1)
    batch.read("a", 0, 6)
    with client.open_submission() as s:
        result = s.submit(batch)
    assert result.error is None and not result.ok
    assert [(r.code, r.reason) for r in result] == [
        (OK, ""),
        (grpc.StatusCode.NOT_FOUND, "UNKNOWN_FILE"),
        (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
        (grpc.StatusCode.FAILED_PRECONDITION, "FILE_HANDLE_CLOSED"),
        (grpc.StatusCode.NOT_FOUND, "UNKNOWN_FOLIO"),
        (OK, ""),
        (OK, ""),
    ]
    assert [r.index for r in result.failed] == [1, 2, 3, 4]
    assert result[2].field == "offset"
    assert isinstance(result[1].error, UnknownFile)
    assert result[1].data == b"" and result[1].stats is None
    assert result[6].data == b"before"
    # The failed operations changed nothing: no file appeared, one folio was allocated.
    assert [f.name for f in client.list_files()] == ["a"]
    assert client.stat_file("a").size_bytes == 6
    assert result[5].handles == range(1, 2)


def test_a_batch_over_the_operation_limit_is_rejected_whole(client: FoliodClient) -> None:
    """MAX_BATCH_OPS + 1 operations: INVALID_ARGUMENT naming the limit, and nothing ran."""
    batch = Batch()
    batch.write("a", 0, b"never")
    for _ in range(MAX_BATCH_OPS):
        batch.read("a", 0, 1)
    before = _state(client)
    with client.open_submission() as s:
        result = s.submit(batch)
        assert isinstance(result.error, InvalidArgument)
        assert result.error.code == grpc.StatusCode.INVALID_ARGUMENT
        assert f"at most {MAX_BATCH_OPS} operations" in result.error.message
        assert f"not {MAX_BATCH_OPS + 1}" in result.error.message
        assert result.results == () and not result.ok
        assert _state(client) == before
        ok = Batch()
        for _ in range(MAX_BATCH_OPS):
            ok.read("a", 0, 1)
        assert s.submit(ok).ok  # exactly the limit is fine, on the same stream


def test_a_batch_over_the_payload_limit_is_rejected_whole(client: FoliodClient) -> None:
    """Write data plus read lengths over MAX_BATCH_PAYLOAD_BYTES: rejected, naming the limit."""
    half = MAX_BATCH_PAYLOAD_BYTES // 2
    batch = Batch()
    batch.write("a", 0, b"w" * half)
    batch.read("a", 0, half + 1)
    assert batch.payload_bytes == MAX_BATCH_PAYLOAD_BYTES + 1
    before = _state(client)
    with client.open_submission() as s:
        result = s.submit(batch)
        assert isinstance(result.error, InvalidArgument)
        assert str(MAX_BATCH_PAYLOAD_BYTES) in result.error.message
        assert "MAX_BATCH_PAYLOAD_BYTES" in result.error.message
        assert _state(client) == before
        fits = Batch()
        fits.write("a", 0, b"w" * half)
        fits.read("a", 0, half)
        assert s.submit(fits).ok


def _raw_submit(server: FoliodServer, *requests: pb.SubmitRequest) -> list[pb.SubmitResponse]:
    chan, stub = connect(server)
    with chan:
        return list(stub.Submit(iter(requests), timeout=10))


MALFORMED = {
    "unknown op code": pb.SubmitRequest(
        ops=[pb.OP_CODE_WRITE, pb.OpCode.ValueType(9)], names=["a"], name_indexes=[0],
        offsets=[0], lengths=[1], data=b"x",
    ),
    "unspecified op code": pb.SubmitRequest(ops=[pb.OP_CODE_UNSPECIFIED]),
    "short column": pb.SubmitRequest(
        ops=[pb.OP_CODE_WRITE, pb.OP_CODE_READ], names=["a"], name_indexes=[0, 0], offsets=[0],
        lengths=[1, 1], data=b"x",
    ),
    "extra column entries": pb.SubmitRequest(
        ops=[pb.OP_CODE_WRITE], names=["a"], name_indexes=[0], offsets=[0], lengths=[1],
        data=b"x", handles=[1],
    ),
    "name index out of range": pb.SubmitRequest(
        ops=[pb.OP_CODE_WRITE, pb.OP_CODE_READ], names=["a"], name_indexes=[0, 1],
        offsets=[0, 0], lengths=[1, 1], data=b"x",
    ),
    "data longer than the writes": pb.SubmitRequest(
        ops=[pb.OP_CODE_WRITE], names=["a"], name_indexes=[0], offsets=[0], lengths=[1],
        data=b"xy",
    ),
    "data shorter than the writes": pb.SubmitRequest(
        ops=[pb.OP_CODE_WRITE, pb.OP_CODE_WRITE], names=["a"], name_indexes=[0, 0],
        offsets=[0, 1], lengths=[1, 2], data=b"xy",
    ),
}  # fmt: skip


def test_the_server_and_foliod_load_batch_every_op_code_of_the_proto() -> None:
    """The server runs exactly the op codes the proto declares, and foliod-load batches exactly
    the operations they name."""
    assert set(OP_NAMES) == batch_module._OP_CODES
    assert {str(kind) for kind in BATCHABLE} == set(OP_NAMES.values())


@pytest.mark.parametrize("case", MALFORMED)
def test_a_malformed_batch_is_rejected_whole_and_changes_nothing(
    server: FoliodServer, client: FoliodClient, case: str
) -> None:
    """Inconsistent columns, unknown op codes, bad name indexes: batch-level INVALID_ARGUMENT,
    state unchanged, and the next batch on the same stream runs."""
    before = _state(client)
    good = pb.SubmitRequest(
        id=8, ops=[pb.OP_CODE_READ], names=["a"], name_indexes=[0], offsets=[0], lengths=[1]
    )
    bad = pb.SubmitRequest(id=7)
    bad.CopyFrom(MALFORMED[case])
    bad.id = 7
    rejected, accepted = _raw_submit(server, bad, good)
    assert rejected.id == 7 and rejected.HasField("error")
    assert rejected.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert rejected.error.reason == "INVALID_ARGUMENT" and rejected.error.field
    assert list(rejected.codes) == [] and rejected.data == b""
    assert _state(client) == before
    assert accepted.id == 8 and not accepted.HasField("error") and list(accepted.codes) == [0]


def test_an_unknown_machine_rejects_the_batch(client: FoliodClient) -> None:
    """A batch for a machine that does not exist: batch-level NOT_FOUND (UNKNOWN_MACHINE)."""
    batch = Batch()
    batch.read("a", 0, 1)
    with client.open_submission("nowhere") as s:
        result = s.submit(batch)
    assert result.error is not None and result.error.code == grpc.StatusCode.NOT_FOUND
    assert result.error.reason == "UNKNOWN_MACHINE"


def test_the_stream_stays_open_after_errors(client: FoliodClient) -> None:
    """Per-operation and batch-level errors leave the stream usable; closing it ends it OK."""
    failing, malformed, fine = Batch(), Batch(), Batch()
    failing.read("missing", 0, 1)
    for _ in range(MAX_BATCH_OPS + 1):
        malformed.free(1)
    fine.write("a", 0, b"ok")
    with client.open_submission() as s:
        results = [s.submit(b) for b in (failing, malformed, fine, failing, fine)]
    assert [r.id for r in results] == [1, 2, 3, 4, 5]
    assert [r.error is None for r in results] == [True, False, True, True, True]
    assert [r.ok for r in results] == [False, False, True, False, True]


def test_half_close_ends_the_stream_cleanly(server: FoliodServer) -> None:
    """A client that sends two batches and half-closes gets both completions and status OK."""
    chan, stub = connect(server)
    with chan:
        request = pb.SubmitRequest(id=1, ops=[pb.OP_CODE_FREE], handles=[5])
        call = stub.Submit(iter([request, request]), timeout=10)
        replies = list(call)
        assert call.code() == grpc.StatusCode.OK
        assert [list(r.codes) for r in replies] == [[grpc.StatusCode.NOT_FOUND.value[0]]] * 2
        assert list(stub.Submit(iter([]), timeout=10)) == []


def test_many_batches_pipelined(client: FoliodClient) -> None:
    """submit_many keeps batches in flight and yields every result in order."""
    batches = []
    for n in range(40):
        batch = Batch()
        batch.write("a", n * PAGE, bytes([n]) * PAGE)
        batch.read("a", n * PAGE, PAGE)
        batches.append(batch)
    with client.open_submission() as s:
        results = list(s.submit_many(batches, window=8))
        assert [r.id for r in results] == list(range(1, 41))
        assert all(r.ok for r in results)
        assert [r[1].data for r in results] == [bytes([n]) * PAGE for n in range(40)]
        # Abandoning submit_many early drains what is in flight (batches 41..48; 49 and 50 are
        # never sent): submit still gets its own completion.
        stream = s.submit_many(batches[:10], window=8)
        assert next(stream).id == 41
        stream.close()
        check = Batch()
        check.read("a", 39 * PAGE, 1)
        last = s.submit(check)
    assert last.id == 49 and last[0].data == bytes([39])


def test_the_async_client_submits(server: FoliodServer, client: FoliodClient) -> None:
    """AsyncFoliodClient: submit and submit_many on one stream, inside async with."""

    async def scenario() -> tuple[BatchResult, list[BatchResult]]:
        async with (
            AsyncFoliodClient(_target(server), timeout=10) as aclient,
            aclient.open_submission() as s,
        ):
            batch = Batch()
            batch.write("a", 0, b"async")
            batch.read("a", 0, 5)
            batch.read("missing", 0, 5)
            first = await s.submit(batch)
            more = [r async for r in s.submit_many([batch] * 5, window=2)]
        return first, more

    first, more = asyncio.run(scenario())
    assert [r.code for r in first] == [OK, OK, grpc.StatusCode.NOT_FOUND]
    assert first[1].data == b"async"
    assert [r.id for r in more] == [2, 3, 4, 5, 6]
    assert all(r[1].data == b"async" for r in more)


def test_guests_are_addressed_through_the_machine(client: FoliodClient) -> None:
    """A submission opened on a guest reads and writes the guest's files, not the host's."""
    client.create_guest("vm", 64 << 20, "base")
    client.create_file("g", machine="vm")
    host_before = client.list_files()
    batch = Batch()
    batch.write("g", 0, b"guest bytes")
    batch.read("g", 0, 11)
    batch.read("a", 0, 1)  # a host file: unknown in the guest
    with client.open_submission(machine="vm") as s:
        result = s.submit(batch)
    assert result[1].data == b"guest bytes"
    assert result[2].reason == "UNKNOWN_FILE"
    assert client.read_file("g", 11, machine="vm").data == b"guest bytes"
    assert client.list_files() == host_before
    with (
        FoliodClient(client.target, machine="vm") as guest_client,
        guest_client.open_submission() as s,  # "" takes the client's machine
    ):
        assert s.submit(batch)[1].data == b"guest bytes"


# -- equivalence with unary calls on a twin server ------------------------------------------------

NAMES = ("a", "b", "missing", "../escape")
OWNERS = ("p", "q", "bad owner")
KINDS = ("file", "slab", "anon", "hugetlb")


def _op() -> st.SearchStrategy[tuple[Any, ...]]:
    offsets = st.integers(0, 40_000) | st.sampled_from([1 << 44, (1 << 44) - 1])
    lengths = st.integers(0, 20_000)
    return st.one_of(
        st.tuples(st.just("read"), st.sampled_from(NAMES), offsets, lengths),
        st.tuples(
            st.just("write"), st.sampled_from(NAMES), offsets, st.binary(min_size=0, max_size=9000)
        ),
        st.tuples(st.just("fsync"), st.integers(0, 4)),
        st.tuples(
            st.just("allocate"),
            st.sampled_from(OWNERS),
            st.sampled_from(KINDS),
            st.integers(0, 3),
            st.integers(0, 3),
        ),
        st.tuples(st.just("free"), st.integers(0, 12)),
    )


def _unary(stub: foliod_pb2_grpc.FoliodStub, op: tuple[Any, ...]) -> tuple[Any, ...]:
    """One operation as a unary call: (code, message, reason, field, data, stats, alloc, pages)."""
    kind, *args = op
    try:
        if kind == "read":
            name, offset, length = args
            read = stub.ReadFile(pb.ReadFileRequest(name=name, offset=offset, length=length))
            return (OK, "", "", "", read.data, _stats(read.stats), (0, 0), 0)
        if kind == "write":
            name, offset, data = args
            wrote = stub.WriteFile(pb.WriteFileRequest(name=name, offset=offset, data=data))
            return (OK, "", "", "", b"", _stats(wrote.stats), (0, 0), 0)
        if kind == "fsync":
            synced = stub.Fsync(pb.FsyncRequest(handle=args[0]))
            return (OK, "", "", "", b"", None, (0, 0), synced.nr_pages)
        if kind == "allocate":
            owner, folio_kind, order, count = args
            kind_pb = FOLIO_KIND.to_pb[FolioKind(folio_kind)]
            made = stub.Allocate(
                pb.AllocateRequest(owner=owner, kind=kind_pb, order=order, count=count)
            )
            return (OK, "", "", "", b"", None, (made.first_handle, made.count), made.nr_pages)
        freed = stub.Free(pb.FreeRequest(handles=[args[0]]))
        return (OK, "", "", "", b"", None, (0, 0), freed.nr_pages)
    except grpc.RpcError as exc:
        status = rpc_status.from_call(exc)
        assert status is not None
        reason = field = ""
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                reason = info.reason
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                field = bad.field_violations[0].field
        return (exc.code(), exc.details(), reason, field, b"", None, (0, 0), 0)


def _stats(stats: pb.IoStats) -> IoStats:
    return IoStats(stats.pages_hit, stats.pages_missed, stats.pages_readahead, stats.device_seconds)


def _batched(result: BatchResult) -> list[tuple[Any, ...]]:
    return [
        (
            r.code,
            r.message,
            r.reason,
            r.field,
            r.data,
            r.stats,
            (r.first_handle, r.count),
            r.nr_pages,
        )
        for r in result
    ]


def _add(batch: Batch, op: tuple[Any, ...]) -> None:
    kind, *args = op
    if kind == "allocate":
        owner, folio_kind, order, count = args
        batch.allocate(owner, folio_kind, order=order, count=count)
    else:
        getattr(batch, kind)(*args)


def _twin_state(stub: foliod_pb2_grpc.FoliodStub) -> tuple[Any, ...]:
    return (
        stub.ListFiles(pb.ListFilesRequest()),
        stub.GetMeminfo(pb.GetMeminfoRequest()),
        stub.GetVmstat(pb.GetVmstatRequest()),
        stub.GetBuddyInfo(pb.GetBuddyInfoRequest()),
        stub.GetMemmap(pb.GetMemmapRequest()),
    )


def test_a_batch_does_what_the_same_unary_calls_do(
    make_server: ServerFactory, tmp_path: Path
) -> None:
    """Any batch gives the results and the state that its operations give one by one as unary
    calls on a twin server."""
    batched_server = make_server()
    unary_server = make_server(state_dir=tmp_path / "twin")  # a server per state directory
    twin_chan, twin = connect(unary_server)
    with FoliodClient(_target(batched_server), timeout=10) as client, twin_chan:
        for name in ("a", "b"):
            client.create_file(name, max_order=2 if name == "b" else None)
            twin.CreateFile(pb.CreateFileRequest(name=name, max_order=2 if name == "b" else None))
        for _ in range(3):
            assert client.open_file("a") == twin.OpenFile(pb.OpenFileRequest(name="a")).handle
        client.close_file(2)
        twin.CloseFile(pb.CloseFileRequest(handle=2))
        with client.open_submission() as submission:

            @settings(
                max_examples=40,
                deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
            )
            @given(ops=st.lists(_op(), min_size=1, max_size=12))
            def check(ops: list[tuple[Any, ...]]) -> None:
                batch = Batch()
                for op in ops:
                    _add(batch, op)
                result = submission.submit(batch)
                assert result.error is None
                assert _batched(result) == [_unary(twin, op) for op in ops]
                assert _twin_state(connect_stub(client)) == _twin_state(twin)

            check()


def connect_stub(client: FoliodClient) -> foliod_pb2_grpc.FoliodStub:
    """A raw stub over the client's channel (for comparing raw messages)."""
    return foliod_pb2_grpc.FoliodStub(client._channel)


def _requests(queue: Queue[pb.SubmitRequest | None]) -> Iterator[pb.SubmitRequest]:
    """Batches from a queue until None: the stream stays open while the queue is empty."""
    while (request := queue.get(timeout=20)) is not None:
        yield request


def test_open_streams_are_capped_and_hold_no_worker(make_server: ServerFactory) -> None:
    """With max_streams 2, 2 Submit streams may be open; a third is RESOURCE_EXHAUSTED, unary
    calls still run on the one worker the open streams do not hold, and closing a stream lets
    a new one in."""
    server = make_server(workers=1, max_streams=2)
    request = pb.SubmitRequest(id=1, ops=[pb.OP_CODE_FREE], handles=[5])
    chan, stub = connect(server)
    with chan:
        held = []
        for _ in range(2):
            queue: Queue[pb.SubmitRequest | None] = Queue()
            call = stub.Submit(_requests(queue), timeout=20)
            queue.put(request)
            assert next(call).id == 1  # open and served
            held.append((queue, call))
        with pytest.raises(grpc.RpcError) as refused:
            list(stub.Submit(iter([request]), timeout=10))
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "2 Submit streams" in (refused.value.details() or "")
        assert stub.GetMachine(pb.GetMachineRequest(), timeout=10).ram_bytes > 0
        for queue, call in held:
            queue.put(None)  # the request iterator ends: the stream half-closes
            assert list(call) == []
        assert [r.id for r in stub.Submit(iter([request]), timeout=10)] == [1]


def test_grpc_private_cancel_mark_is_read_only_behind_a_guard(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The interceptor finds grpc's cancel mark on this grpcio; a context without grpc's call
    state, or a grpcio without the mark, counts as not ended by its client (public checks)."""
    # If this fails on a newer grpcio, the race _client_cancelled_mark describes is back.
    assert isinstance(interceptors._CLIENT_CANCELLED, str)
    foreign = cast(grpc.ServicerContext, object())
    assert not interceptors._ended_by_client(foreign)
    monkeypatch.setattr(interceptors, "_CLIENT_CANCELLED", None)
    cancelled = SimpleNamespace(_state=SimpleNamespace(client="cancelled"))
    assert not interceptors._ended_by_client(cast(grpc.ServicerContext, cancelled))


@pytest.mark.parametrize(
    ("ending", "code"), [("cancel", "CANCELLED"), ("deadline", "DEADLINE_EXCEEDED")]
)
def test_a_stream_the_client_ends_is_counted_with_its_code(
    make_server: ServerFactory, ending: str, code: str
) -> None:
    """A Submit stream the client cancels, or whose deadline passes, is reported once, with
    CANCELLED or DEADLINE_EXCEEDED and the messages it carried, once the stream is over."""
    server = make_server()
    request = pb.SubmitRequest(id=1, ops=[pb.OP_CODE_FREE], handles=[5])

    def submit_samples() -> dict[tuple[str, str], float]:
        url = f"http://127.0.0.1:{server.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        return {
            (sample.name, sample.labels.get("grpc_code", "")): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.labels.get("grpc_method") == "Submit"
        }

    chan, stub = connect(server)
    with chan:
        queue: Queue[pb.SubmitRequest | None] = Queue()
        call = stub.Submit(_requests(queue), timeout=20 if ending == "cancel" else 1)
        queue.put(request)
        assert next(call).id == 1
        if ending == "cancel":
            call.cancel()
        else:
            with pytest.raises(grpc.RpcError) as ended:
                next(call)  # nothing more comes: the deadline passes
            assert ended.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        queue.put(None)
        deadline = time.monotonic() + 10
        samples = submit_samples()
        while time.monotonic() < deadline and not any(
            name == "grpc_server_handled_total" for name, _ in samples
        ):  # the server ends the stream on its own schedule
            time.sleep(0.05)
            samples = submit_samples()
    handled = {
        code: v for (name, code), v in samples.items() if name == "grpc_server_handled_total"
    }
    assert handled == {code: 1.0}
    assert samples[("grpc_server_started_total", "")] == 1.0
    assert samples[("grpc_server_msg_received_total", "")] == 1.0
    assert samples[("grpc_server_msg_sent_total", "")] == 1.0
