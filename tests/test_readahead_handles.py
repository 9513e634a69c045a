"""Readahead state per open file description (file->f_ra): reads through a handle use its own.

Reads through a handle keep their windows in the handle, taken from the file's ra_pages at open;
reads by name share the file's one state. Two readers through their own handles each ramp as a
lone reader would, however their reads interleave.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from foliod.mm import PAGE_SIZE, FileHandleClosed, Machine
from foliod.mm.filemap import IoStats
from foliod.mm.readahead import RaState
from foliod.rpc.status import status_code_of
from foliod.server import FoliodServer
from foliod.v1 import foliod_pb2 as pb
from foliod.v1 import foliod_pb2_grpc
from foliodclient import FoliodClient
from tests.test_pagecache_stateful import cold_file as pagecache_cold_file

Stub = foliod_pb2_grpc.FoliodStub
KIB = 1 << 10
MIB = 1 << 20
FILE_PAGES = 2000
# Where the second reader starts: far from the first one's pages and windows.
SECOND_START = 1000
NR_READS = 100

# A read's stats and the readahead window after it: (start, size, async_size).
Step = tuple[IoStats, tuple[int, int, int]]


def cold_file(root: Path, ra_pages: int = 32) -> tuple[Machine, bytes]:
    """A machine with file "f" of FILE_PAGES pages (a ra_pages window), written back, not cached."""
    return pagecache_cold_file(root, FILE_PAGES, ra_pages=ra_pages)


def window(ra: RaState) -> tuple[int, int, int]:
    return ra.start, ra.size, ra.async_size


def lone_reader(root: Path, first_page: int, read_bytes: int, ra_pages: int = 32) -> list[Step]:
    """NR_READS sequential reads by name from first_page on a fresh machine, nothing else."""
    machine, _ = cold_file(root, ra_pages)
    fs, ra = machine.files, machine.files.files["f"].ra
    steps = []
    for i in range(NR_READS):
        _, stats = fs.read("f", first_page * PAGE_SIZE + i * read_bytes, read_bytes)
        steps.append((stats, window(ra)))
    return steps


def total(steps: list[Step], field: str) -> int:
    return sum(getattr(stats, field) for stats, _ in steps)


@pytest.mark.parametrize("read_bytes", [4 * KIB, 16 * KIB])
def test_interleaved_readers_through_handles_each_ramp_like_a_lone_reader(
    tmp_path: Path, read_bytes: int
) -> None:
    """Two handles reading one file in alternation each see a lone reader's stats and windows."""
    machine, data = cold_file(tmp_path / "handles")
    fs = machine.files
    a, b = fs.open("f"), fs.open("f")
    steps_a: list[Step] = []
    steps_b: list[Step] = []
    for i in range(NR_READS):
        offset_a = i * read_bytes
        got, stats = fs.read("", offset_a, read_bytes, a.number)
        assert got == data[offset_a : offset_a + read_bytes]
        steps_a.append((stats, window(a.ra)))
        offset_b = SECOND_START * PAGE_SIZE + i * read_bytes
        got, stats = fs.read("f", offset_b, read_bytes, b.number)
        assert got == data[offset_b : offset_b + read_bytes]
        steps_b.append((stats, window(b.ra)))
    assert steps_a == lone_reader(tmp_path / "lone_a", 0, read_bytes)
    assert steps_b == lone_reader(tmp_path / "lone_b", SECOND_START, read_bytes)
    # Reads through handles leave the file's own state (that of reads by name) alone.
    assert window(fs.files["f"].ra) == (0, 0, 0)

    # The same interleaving by name: one state for both streams, which each resets.
    shared, _ = cold_file(tmp_path / "shared")
    steps_by_name: list[Step] = []
    for i in range(NR_READS):
        for offset in (i * read_bytes, SECOND_START * PAGE_SIZE + i * read_bytes):
            _, stats = shared.files.read("f", offset, read_bytes)
            steps_by_name.append((stats, window(shared.files.files["f"].ra)))
    missed_by_handle = total(steps_a, "pages_missed") + total(steps_b, "pages_missed")
    assert total(steps_by_name, "pages_missed") > missed_by_handle
    sync_reads_by_handle = sum(1 for stats, _ in steps_a + steps_b if stats.pages_missed)
    assert sum(1 for stats, _ in steps_by_name if stats.pages_missed) > sync_reads_by_handle
    # The second stream ramps later: it reaches its largest window after more reads.
    by_name_b = [stats.pages_readahead for stats, _ in steps_by_name[1::2]]
    by_handle_b = [stats.pages_readahead for stats, _ in steps_b]
    assert by_name_b.index(32) > by_handle_b.index(32)


def test_a_handle_keeps_the_ra_pages_it_was_opened_with(tmp_path: Path) -> None:
    """A handle opened before the file's ra_pages changes keeps the old window; a later one not."""
    machine, data = cold_file(tmp_path / "f")
    fs = machine.files
    before = fs.open("f")
    # No call changes a file's ra_pages after CreateFile: set it as a tunable would.
    fs.files["f"].ra.ra_pages = 128
    after = fs.open("f")
    assert (before.ra.ra_pages, after.ra.ra_pages, fs.stat("f").ra_pages) == (32, 128, 128)

    def read_through(number: int) -> list[Step]:
        ra = fs.handles[number].ra
        steps = []
        for i in range(NR_READS):
            got, stats = fs.read("f", i * 16 * KIB, 16 * KIB, number)
            assert got == data[i * 16 * KIB : (i + 1) * 16 * KIB]
            steps.append((stats, window(ra)))
        machine.drop_caches()
        return steps

    old_steps, new_steps = read_through(before.number), read_through(after.number)
    assert old_steps == lone_reader(tmp_path / "lone32", 0, 16 * KIB, ra_pages=32)
    assert new_steps == lone_reader(tmp_path / "lone128", 0, 16 * KIB, ra_pages=128)
    assert max(size for _, (_, size, _) in old_steps) == 32
    assert max(size for _, (_, size, _) in new_steps) == 128


# -- through the gRPC API --------------------------------------------------------------------


def _files_state(server: FoliodServer) -> dict[str, Any]:
    """Every file's cached folios and readahead states, its handles' states, and the counters."""
    fs = server.machines.host.files
    return {
        "files": {
            name: (
                inode.size,
                sorted((i, f.order, f.readahead, f.dirty) for i, f in inode.folios.items()),
                window(inode.ra),
                inode.ra.prev_pos,
                sorted(inode.handles),
            )
            for name, inode in fs.files.items()
        },
        "handles": {n: (h.inode.name, window(h.ra), h.ra.prev_pos) for n, h in fs.handles.items()},
        "reads": (fs.nr_read_hits, fs.nr_read_misses, fs.nr_read_ahead),
        "events": dict(server.machines.host.events),
    }


def test_bad_handles_fail_with_their_codes_and_change_nothing(
    stub: Stub, server: FoliodServer
) -> None:
    """Unknown, closed and other-file handles fail (NOT_FOUND, as closed maps, INVALID_ARGUMENT)."""
    contents = {name: random.Random(name).randbytes(256 * KIB) for name in ("a", "b")}
    for name, data in contents.items():
        stub.CreateFile(pb.CreateFileRequest(name=name))
        stub.WriteFile(pb.WriteFileRequest(name=name, offset=0, data=data))
    stub.Writeback(pb.WritebackRequest())
    handle_a = stub.OpenFile(pb.OpenFileRequest(name="a")).handle
    handle_b = stub.OpenFile(pb.OpenFileRequest(name="b")).handle
    closed = stub.OpenFile(pb.OpenFileRequest(name="a")).handle
    stub.CloseFile(pb.CloseFileRequest(handle=closed))
    stub.DropCaches(pb.DropCachesRequest())
    for offset in range(0, 64 * KIB, 16 * KIB):
        stub.ReadFile(pb.ReadFileRequest(name="a", offset=offset, length=16 * KIB))
        stub.ReadFile(pb.ReadFileRequest(offset=offset, length=16 * KIB, handle=handle_a))

    closed_code = status_code_of(FileHandleClosed("closed"))
    assert closed_code == grpc.StatusCode.FAILED_PRECONDITION
    cases = [
        ("a", handle_b + 100, grpc.StatusCode.NOT_FOUND, "UNKNOWN_FILE_HANDLE"),
        ("", handle_b + 100, grpc.StatusCode.NOT_FOUND, "UNKNOWN_FILE_HANDLE"),
        ("a", closed, closed_code, "FILE_HANDLE_CLOSED"),
        ("", closed, closed_code, "FILE_HANDLE_CLOSED"),
        ("a", handle_b, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
        ("b", handle_a, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
    ]
    for name, handle, code, reason in cases:
        before = _files_state(server)
        request = pb.ReadFileRequest(name=name, offset=16 * KIB, length=16 * KIB, handle=handle)
        with pytest.raises(grpc.RpcError) as raised:
            stub.ReadFile(request)
        err: Any = raised.value
        assert err.code() == code, err.details()
        status = rpc_status.from_call(err)
        assert status is not None
        reasons: list[str] = []
        fields: list[str] = []
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                reasons.append(info.reason)
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                fields.extend(v.field for v in bad.field_violations)
        assert reasons == [reason]
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            assert fields == ["handle"]
        assert _files_state(server) == before
    for name, data in contents.items():
        got = stub.ReadFile(pb.ReadFileRequest(name=name, offset=0, length=len(data))).data
        assert got == data


def test_a_read_through_a_handle_returns_what_a_read_by_name_does(
    stub: Stub, server: FoliodServer
) -> None:
    """A read through a handle (raw API or client) returns the bytes a read by name does."""
    data = random.Random(3).randbytes(300 * KIB + 123)
    stub.CreateFile(pb.CreateFileRequest(name="dir/f"))
    stub.WriteFile(pb.WriteFileRequest(name="dir/f", offset=0, data=data[: 200 * KIB]))
    stub.Writeback(pb.WritebackRequest())
    # The rest stays dirty: reads see it from memory, not from the backing file.
    stub.WriteFile(pb.WriteFileRequest(name="dir/f", offset=200 * KIB, data=data[200 * KIB :]))
    handle = stub.OpenFile(pb.OpenFileRequest(name="dir/f")).handle
    with FoliodClient(f"127.0.0.1:{server.grpc_port}", timeout=10) as client:
        for offset, length in ((0, 4 * KIB), (5000, 70_000), (190 * KIB, 64 * KIB), (0, MIB)):
            by_name = stub.ReadFile(pb.ReadFileRequest(name="dir/f", offset=offset, length=length))
            raw = stub.ReadFile(pb.ReadFileRequest(offset=offset, length=length, handle=handle))
            named = stub.ReadFile(
                pb.ReadFileRequest(name="dir/f", offset=offset, length=length, handle=handle)
            )
            through_client = client.read_file("", length, offset, handle=handle)
            assert by_name.data == data[offset : offset + length]
            assert raw.data == named.data == through_client.data == by_name.data
