"""Files through the gRPC API: the page cache's read and write paths, writeback, reclaim, errors."""

from __future__ import annotations

import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from foliod.server import FoliodServer
from foliod.v1 import foliod_pb2 as pb
from foliod.v1 import foliod_pb2_grpc
from tests.conftest import ServerFactory, connect

Stub = foliod_pb2_grpc.FoliodStub
MIB = 1 << 20
GIB = 1 << 30


def _write(stub: Stub, name: str, offset: int, data: bytes) -> pb.WriteFileResponse:
    reply: pb.WriteFileResponse = stub.WriteFile(
        pb.WriteFileRequest(name=name, offset=offset, data=data)
    )
    return reply


def _read(stub: Stub, name: str, offset: int, length: int) -> pb.ReadFileResponse:
    reply: pb.ReadFileResponse = stub.ReadFile(
        pb.ReadFileRequest(name=name, offset=offset, length=length)
    )
    return reply


def _vmstat(stub: Stub) -> dict[str, int]:
    return {e.name: e.value for e in stub.GetVmstat(pb.GetVmstatRequest()).entries}


def _store(server: FoliodServer) -> Path:
    return server.config.state_dir / "files" / "host"


def test_write_then_read_back_and_holes(stub: Stub) -> None:
    """Written bytes read back; holes read as zeros; reads past EOF are short or empty."""
    stub.CreateFile(pb.CreateFileRequest(name="dir/a.bin"))
    _write(stub, "dir/a.bin", 10_000, b"hello")
    assert stub.StatFile(pb.StatFileRequest(name="dir/a.bin")).size_bytes == 10_005
    reply = _read(stub, "dir/a.bin", 9_998, 100)
    assert reply.data == b"\0\0hello"
    assert _read(stub, "dir/a.bin", 0, 16).data == bytes(16)
    assert _read(stub, "dir/a.bin", 20_000, 10).data == b""


def test_large_write_uses_large_folios_and_dirties_them(stub: Stub) -> None:
    """A 2 MiB aligned write lands in one order-9 folio, dirty until written back."""
    stub.CreateFile(pb.CreateFileRequest(name="f"))
    reply = _write(stub, "f", 0, b"x" * (2 * MIB))
    assert reply.written_bytes == 2 * MIB and reply.stats.pages_missed == 512
    stat = stub.StatFile(pb.StatFileRequest(name="f"))
    assert dict(stat.folios_by_order) == {9: 1}
    assert (stat.nr_cached, stat.nr_dirty) == (512, 512)
    meminfo = stub.GetMeminfo(pb.GetMeminfoRequest())
    assert meminfo.dirty_bytes == 2 * MIB and meminfo.cached_bytes == 2 * MIB
    assert stub.Writeback(pb.WritebackRequest(name="f")).nr_pages == 512
    assert stub.StatFile(pb.StatFileRequest(name="f")).nr_dirty == 0
    assert stub.GetMeminfo(pb.GetMeminfoRequest()).dirty_bytes == 0


def test_max_order_zero_forces_base_pages(stub: Stub) -> None:
    """A file created with max_order 0 caches only base pages."""
    stub.CreateFile(pb.CreateFileRequest(name="small", max_order=0))
    _write(stub, "small", 0, b"y" * (256 * 1024))
    assert dict(stub.StatFile(pb.StatFileRequest(name="small")).folios_by_order) == {0: 64}


def test_fsync_makes_data_durable_in_the_backing_file(stub: Stub, server: FoliodServer) -> None:
    """After Fsync the backing file holds exactly the written bytes."""
    stub.CreateFile(pb.CreateFileRequest(name="d/durable"))
    handle = stub.OpenFile(pb.OpenFileRequest(name="d/durable")).handle
    _write(stub, "d/durable", 5, b"abc")
    assert (_store(server) / "d" / "durable").read_bytes() == b""
    assert stub.Fsync(pb.FsyncRequest(handle=handle)).nr_pages == 1
    assert (_store(server) / "d" / "durable").read_bytes() == b"\0" * 5 + b"abc"
    stub.CloseFile(pb.CloseFileRequest(handle=handle))


def test_sequential_read_is_served_by_readahead(stub: Stub) -> None:
    """A cold 4 MiB file read in 64 KiB steps misses only at its start: readahead does the rest."""
    payload = bytes(range(256)) * (4 * MIB // 256)
    stub.CreateFile(pb.CreateFileRequest(name="warm"))
    for offset in range(0, 4 * MIB, MIB):
        _write(stub, "warm", offset, payload[offset : offset + MIB])
    stub.Writeback(pb.WritebackRequest(name="warm"))
    stub.DropCaches(pb.DropCachesRequest())
    assert stub.StatFile(pb.StatFileRequest(name="warm")).nr_cached == 0
    hits = missed = ahead = 0
    device = 0.0
    for offset in range(0, 4 * MIB, 64 * 1024):
        reply = _read(stub, "warm", offset, 64 * 1024)
        assert reply.data == payload[offset : offset + 64 * 1024]
        assert reply.stats.pages_hit + reply.stats.pages_missed == 16
        hits += reply.stats.pages_hit
        missed += reply.stats.pages_missed
        ahead += reply.stats.pages_readahead
        device += reply.stats.device_seconds
    assert missed == 16  # the first request; every later page was read ahead
    assert hits == 1024 - 16 and ahead > 0 and device > 0
    orders = dict(stub.StatFile(pb.StatFileRequest(name="warm")).folios_by_order)
    assert max(orders) >= 4  # readahead raised the folio order round by round
    again = _read(stub, "warm", 0, 64 * 1024)
    assert again.stats.pages_hit == 16 and again.stats.device_seconds == 0


def test_reading_more_than_ram_reclaims_and_stays_correct(make_server: ServerFactory) -> None:
    """A 24 MiB file on a 16 MiB machine reads back correctly; reclaim made room for it."""
    server = make_server(ram=16 * MIB)
    _, stub = connect(server)
    stub.CreateFile(pb.CreateFileRequest(name="big"))
    chunk = 1 * MIB
    for i in range(24):
        _write(stub, "big", i * chunk, bytes([i]) * chunk)
    for i in range(24):
        assert _read(stub, "big", i * chunk + 100, 50).data == bytes([i]) * 50
    vmstat = _vmstat(stub)
    assert vmstat["pgsteal_kswapd"] + vmstat["pgsteal_direct"] > 0
    assert vmstat["nr_written"] > 0
    meminfo = stub.GetMeminfo(pb.GetMeminfoRequest())
    assert meminfo.cached_bytes <= 16 * MIB


def test_reclaim_and_drop_caches(stub: Stub) -> None:
    """Reclaim frees what it is asked for from clean cache; DropCaches frees the rest."""
    stub.CreateFile(pb.CreateFileRequest(name="c", max_order=0))
    _write(stub, "c", 0, b"z" * MIB)
    stub.Writeback(pb.WritebackRequest())
    freed = stub.Reclaim(pb.ReclaimRequest(bytes=64 * 4096)).reclaimed_bytes
    assert freed == 64 * 4096
    assert stub.StatFile(pb.StatFileRequest(name="c")).nr_cached == 256 - 64
    dropped = stub.DropCaches(pb.DropCachesRequest()).dropped_bytes
    assert dropped == (256 - 64) * 4096
    assert _read(stub, "c", MIB - 3, 3).data == b"zzz"


def test_truncate_splits_a_straddling_large_folio(stub: Stub) -> None:
    """Truncating into a clean 2 MiB folio splits it as Linux 6.18 does: the page holding the
    new end alone, the kept rest in buddy pieces (an order-2 folio and page 4 here); a dirty
    one cannot be split and stays whole."""
    stub.CreateFile(pb.CreateFileRequest(name="d"))
    _write(stub, "d", 0, b"q" * (2 * MIB))
    stat = stub.TruncateFile(pb.TruncateFileRequest(name="d", size_bytes=5 * 4096 + 10))
    assert dict(stat.folios_by_order) == {9: 1}
    assert _vmstat(stub)["thp_split_page"] == 0
    stub.CreateFile(pb.CreateFileRequest(name="t"))
    _write(stub, "t", 0, b"q" * (2 * MIB))
    stub.Writeback(pb.WritebackRequest(name="t"))
    stat = stub.TruncateFile(pb.TruncateFileRequest(name="t", size_bytes=5 * 4096 + 10))
    assert stat.size_bytes == 5 * 4096 + 10
    assert dict(stat.folios_by_order) == {2: 1, 0: 2}
    assert _vmstat(stub)["thp_split_page"] == 1
    stub.TruncateFile(pb.TruncateFileRequest(name="t", size_bytes=8 * 4096))
    data = _read(stub, "t", 5 * 4096, 3 * 4096).data
    assert data == b"q" * 10 + bytes(3 * 4096 - 10)


def test_list_and_delete(stub: Stub, server: FoliodServer) -> None:
    """ListFiles shows every file sorted; DeleteFile frees its cache and its backing file."""
    for name in ("b", "a/x", "a/y"):
        stub.CreateFile(pb.CreateFileRequest(name=name))
        _write(stub, name, 0, b"1" * 8192)
    names = [f.name for f in stub.ListFiles(pb.ListFilesRequest()).files]
    assert names == ["a/x", "a/y", "b"]
    before = stub.GetMachine(pb.GetMachineRequest()).nr_free_pages
    stub.DeleteFile(pb.DeleteFileRequest(name="a/x"))
    assert stub.GetMachine(pb.GetMachineRequest()).nr_free_pages > before
    assert not (_store(server) / "a" / "x").exists()
    assert [f.name for f in stub.ListFiles(pb.ListFilesRequest()).files] == ["a/y", "b"]


def test_files_survive_a_restart_on_the_same_store(
    make_server: ServerFactory, tmp_path: Path
) -> None:
    """A server started on a store directory sees the files a previous one left there."""
    state = tmp_path / "shared-state"
    first = make_server(state_dir=state)
    _, stub = connect(first)
    stub.CreateFile(pb.CreateFileRequest(name="keep"))
    _write(stub, "keep", 0, b"persisted")
    first.stop(0)  # a graceful stop writes everything back
    second = make_server(state_dir=state)
    _, stub2 = connect(second)
    assert _read(stub2, "keep", 0, 9).data == b"persisted"


@pytest.mark.slow
def test_memmap_of_one_gib_cached_in_base_pages(make_server: ServerFactory) -> None:
    """Reading a 1 GiB file in base pages moves the file cost to 16 MiB and 22 MiB of memdesc."""
    server = make_server(ram=4 * GIB, debug_checks=False)
    _, stub = connect(server)
    stub.CreateFile(pb.CreateFileRequest(name="gig", max_order=0))
    stub.TruncateFile(pb.TruncateFileRequest(name="gig", size_bytes=GIB))
    for offset in range(0, GIB, 2 * MIB):
        assert len(_read(stub, "gig", offset, 2 * MIB).data) == 2 * MIB
    report = stub.GetMemmap(pb.GetMemmapRequest())
    by_kind = {m.model: {k.kind: k.total_bytes for k in m.by_kind} for m in report.models}
    assert by_kind[pb.MEMMAP_MODEL_STRUCT_PAGE][pb.FOLIO_KIND_FILE] == 16 * MIB
    assert by_kind[pb.MEMMAP_MODEL_MEMDESC][pb.FOLIO_KIND_FILE] == 22 * MIB


@pytest.mark.slow
def test_memmap_of_one_gib_written_in_four_page_folios(make_server: ServerFactory) -> None:
    """Writing a 1 GiB file with max_order 2 caches 65,536 four-page folios: 9 MiB of memdesc."""
    server = make_server(ram=4 * GIB, debug_checks=False)
    _, stub = connect(server)
    stub.CreateFile(pb.CreateFileRequest(name="gig", max_order=2))
    chunk = bytes(2 * MIB)
    for offset in range(0, GIB, 2 * MIB):
        _write(stub, "gig", offset, chunk)
    assert dict(stub.StatFile(pb.StatFileRequest(name="gig")).folios_by_order) == {2: 65_536}
    report = stub.GetMemmap(pb.GetMemmapRequest())
    memdesc = next(m for m in report.models if m.model == pb.MEMMAP_MODEL_MEMDESC)
    assert {k.kind: k.total_bytes for k in memdesc.by_kind}[pb.FOLIO_KIND_FILE] == 9 * MIB
    stub.DeleteFile(pb.DeleteFileRequest(name="gig"))  # spares the stop its writeback


def _expect(call: Callable[[], Any], code: grpc.StatusCode) -> None:
    with pytest.raises(grpc.RpcError) as err:
        call()
    assert err.value.code() == code, err.value.details()


@pytest.mark.parametrize(
    "name", ["", "/etc/passwd", "../escape", "a/../../b", "a//b", "x\0y", ".", "a/./b", "n" * 256]
)
def test_bad_file_names_are_invalid(stub: Stub, server: FoliodServer, name: str) -> None:
    """Absolute, dotted, empty, NUL and over-long names are INVALID_ARGUMENT and touch nothing."""
    before = sorted(p.name for p in server.config.state_dir.rglob("*"))
    _expect(
        lambda: stub.CreateFile(pb.CreateFileRequest(name=name)), grpc.StatusCode.INVALID_ARGUMENT
    )
    _expect(lambda: _write(stub, name, 0, b"x"), grpc.StatusCode.INVALID_ARGUMENT)
    assert sorted(p.name for p in server.config.state_dir.rglob("*")) == before


def test_file_errors(stub: Stub) -> None:
    """Unknown files and handles, duplicates, bad sizes and closed handles get clear codes."""
    not_found, invalid = grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT
    _expect(lambda: _read(stub, "nope", 0, 1), not_found)
    _expect(lambda: _write(stub, "nope", 0, b"x"), not_found)
    _expect(lambda: stub.OpenFile(pb.OpenFileRequest(name="nope")), not_found)
    _expect(lambda: stub.Fsync(pb.FsyncRequest(handle=999)), not_found)
    stub.CreateFile(pb.CreateFileRequest(name="e"))
    _expect(lambda: stub.CreateFile(pb.CreateFileRequest(name="e")), grpc.StatusCode.ALREADY_EXISTS)
    _expect(lambda: stub.CreateFile(pb.CreateFileRequest(name="f", max_order=10)), invalid)
    _expect(lambda: _read(stub, "e", 0, 0), invalid)
    _expect(lambda: _read(stub, "e", 0, 2 * MIB + 1), invalid)
    _expect(lambda: _write(stub, "e", 0, b""), invalid)
    _expect(lambda: _write(stub, "e", 1 << 60, b"x"), invalid)
    _expect(
        lambda: stub.TruncateFile(pb.TruncateFileRequest(name="e", size_bytes=1 << 60)), invalid
    )
    _expect(lambda: stub.Reclaim(pb.ReclaimRequest(bytes=100)), invalid)
    handle = stub.OpenFile(pb.OpenFileRequest(name="e")).handle
    stub.CloseFile(pb.CloseFileRequest(handle=handle))
    _expect(lambda: stub.Fsync(pb.FsyncRequest(handle=handle)), grpc.StatusCode.FAILED_PRECONDITION)
    stub.DeleteFile(pb.DeleteFileRequest(name="e"))
    _expect(lambda: _write(stub, "e", 0, b"x"), not_found)
    assert [f.name for f in stub.ListFiles(pb.ListFilesRequest()).files] == []


def test_page_cache_metrics_follow_the_api(make_server: ServerFactory) -> None:
    """Scraped meminfo, LRU and dirty-threshold gauges match the API's figures."""
    server = make_server(ram=64 * MIB)
    _, stub = connect(server)
    stub.CreateFile(pb.CreateFileRequest(name="m"))
    _write(stub, "m", 0, b"d" * (256 * 1024))
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics") as response:
        text = response.read().decode()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    meminfo = stub.GetMeminfo(pb.GetMeminfoRequest())

    def gauge(name: str, **labels: str) -> float:
        return samples[(name, tuple(sorted({"machine": "host", **labels}.items())))]

    assert gauge("foliod_meminfo_bytes", field="cached") == meminfo.cached_bytes == 256 * 1024
    assert gauge("foliod_meminfo_bytes", field="dirty") == meminfo.dirty_bytes
    assert gauge("foliod_lru_folios", lru="inactive_file") == 1  # one order-6 folio
    assert (
        gauge("foliod_lru_pages", lru="inactive_file") == 64 == meminfo.inactive_file_bytes / 4096
    )
    assert gauge("foliod_lru_pages", lru="active_file") == 0
    background = gauge("foliod_dirty_threshold_bytes", level="background")
    limit = gauge("foliod_dirty_threshold_bytes", level="limit")
    assert 0 < background < limit < 64 * MIB
    assert gauge("foliod_vmstat_events_total", event="nr_dirtied") == 64


def test_read_page_counters_add_up_what_the_replies_said(make_server: ServerFactory) -> None:
    """foliod_pagecache_read_pages_total counts the hits, misses and readahead the replies carry."""
    server = make_server(ram=64 * MIB)
    _, stub = connect(server)
    stub.CreateFile(pb.CreateFileRequest(name="r"))
    _write(stub, "r", 0, b"x" * (64 * 1024))
    stub.Writeback(pb.WritebackRequest(name="r"))
    stub.DropCaches(pb.DropCachesRequest())
    replies = [
        stub.ReadFile(pb.ReadFileRequest(name="r", offset=offset, length=8192))
        for offset in (0, 0, 40960, 8192)
    ]
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics") as response:
        text = response.read().decode()
    counted = {
        s.labels["result"]: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "foliod_pagecache_read_pages_total" and s.labels["machine"] == "host"
    }
    assert counted == {
        "hit": sum(r.stats.pages_hit for r in replies),
        "miss": sum(r.stats.pages_missed for r in replies),
        "readahead": sum(r.stats.pages_readahead for r in replies),
    }
    assert counted["miss"] > 0 and counted["hit"] > 0 and counted["readahead"] > 0


def test_drop_file_range_drops_clean_pages_and_keeps_dirty_ones(stub: Stub) -> None:
    """DropFileRange is POSIX_FADV_DONTNEED: dirty folios are written back and stay, a second
    call drops them clean; only full pages of the range count; an unknown file is NOT_FOUND
    and changes nothing."""
    stub.CreateFile(pb.CreateFileRequest(name="d"))
    _write(stub, "d", 0, b"z" * (16 * 4096))  # dirty: one order-4 folio
    reply = stub.DropFileRange(pb.DropFileRangeRequest(name="d"))
    assert reply.dropped_bytes == 0
    assert stub.StatFile(pb.StatFileRequest(name="d")).nr_cached == 16
    assert stub.StatFile(pb.StatFileRequest(name="d")).nr_dirty == 0
    # The folio reaches past the range's full pages 1..14: it stays.
    reply = stub.DropFileRange(pb.DropFileRangeRequest(name="d", offset=4096, length=14 * 4096))
    assert reply.dropped_bytes == 0
    reply = stub.DropFileRange(pb.DropFileRangeRequest(name="d", offset=0, length=0))
    assert reply.dropped_bytes == 16 * 4096
    assert stub.StatFile(pb.StatFileRequest(name="d")).nr_cached == 0
    assert _read(stub, "d", 0, 4096).data == b"z" * 4096  # from the backing file
    with pytest.raises(grpc.RpcError) as error:
        stub.DropFileRange(pb.DropFileRangeRequest(name="nope"))
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
