"""Snapshots: a machine's layout saved, checked and booted again, in the core and the API."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import grpc
import numpy as np
import pytest

from foliod.mm import FolioKind, Machine, check_machine
from foliod.mm import kpageflags as kpf
from foliod.mm import snapshot as snap
from foliod.mm.backing_dev import DEVICE_PROFILES, BackingStore
from foliod.mm.errors import InvalidArgument, OutOfMemory
from foliod.mm.kpageflags import (
    KPF_ANON,
    KPF_BUDDY,
    KPF_COMPOUND_HEAD,
    KPF_COMPOUND_TAIL,
    KPF_LRU,
    KPF_NOPAGE,
    KPF_RESERVED,
    KPF_SLAB,
)
from foliod.v1 import foliod_pb2 as pb
from foliodclient import FoliodClient
from foliodclient import InvalidArgument as ClientInvalidArgument
from foliodclient import OutOfMemory as ClientOutOfMemory
from foliodclient.cli import main as foliodctl
from tests.conftest import ServerFactory, connect

MIB = 1 << 20


def _machine(tmp_path: Path, name: str, ram_bytes: int = 64 * MIB) -> Machine:
    store = BackingStore(tmp_path / name, DEVICE_PROFILES["nvme"])
    return Machine(name, ram_bytes, store=store)


def _fragment(machine: Machine) -> None:
    """Every kind of folio, page tables and page cache, then frees that leave holes."""
    machine.allocate("proc", FolioKind.ANON, nr_bytes=6 * MIB)
    machine.allocate("proc", FolioKind.ANON, nr_bytes=3 * MIB + 64 * 1024)
    slab = machine.allocate("slab", FolioKind.SLAB, order=1, count=700)
    cache = machine.allocate("cache", FolioKind.FILE, order=0, count=3000)
    machine.allocate("huge", FolioKind.HUGETLB, order=9, count=2, hvo=True)
    machine.allocate("tables", FolioKind.PAGETABLE, order=0, count=9)
    machine.free(list(range(cache.first_handle, cache.first_handle + 3000, 3)))
    machine.free(list(range(slab.first_handle + 1, slab.first_handle + 700, 4)))
    files = machine.files
    files.create("data", max_order=4)
    files.write("data", 0, b"x" * (700 * 1024))
    files.write("data", 5 * MIB, b"y" * 8192)
    machine.release_owner("tables")


def _same_layout(a: Machine, b: Machine) -> None:
    assert b.zone.buddyinfo() == a.zone.buddyinfo()
    assert [list(area) for area in b.zone.free_area] == [list(area) for area in a.zone.free_area]
    assert b.nr_folios == a.nr_folios
    assert b.memmap() == a.memmap()


def test_a_fragmented_machine_boots_back_exactly(tmp_path: Path) -> None:
    """Free lists (in list order), folio histogram and memmap survive a round trip through the
    file, the booted machine passes the checker, snapshots to the same runs, and allocates
    the same frames afterwards."""
    machine = _machine(tmp_path, "a")
    _fragment(machine)
    check_machine(machine)
    original = snap.snapshot_machine(machine)
    data = original.encode()
    booted = _machine(tmp_path, "b")
    snap.boot(snap.decode(data), booted)
    check_machine(booted)
    _same_layout(machine, booted)
    assert set(booted.owners) == {
        "imported:anon",
        "imported:file",
        "imported:slab",
        "imported:pagetable",
        "imported:hugetlb",
    }
    again = snap.snapshot_machine(booted)
    for column in ("kind", "order", "count", "flags", "free_pos"):
        assert np.array_equal(getattr(again, column), getattr(original, column)), column
    for m in (machine, booted):
        m.allocate("later", FolioKind.FILE, order=2, count=50)
        m.allocate("later", FolioKind.ANON, order=0, count=100)
    assert [f.pfn for f in machine.owners["later"].folios.values()] == [
        f.pfn for f in booted.owners["later"].folios.values()
    ]
    _same_layout(machine, booted)


def test_a_booted_machine_runs_workloads_and_frees_imports(tmp_path: Path) -> None:
    """Imported folios are ordinary owned folios: releasing an owner frees and merges them."""
    machine = _machine(tmp_path, "a")
    _fragment(machine)
    booted = _machine(tmp_path, "b")
    snap.boot(snap.decode(snap.snapshot_machine(machine).encode()), booted)
    free_before, file_pages = booted.zone.nr_free, booted.nr_pages_of(FolioKind.FILE)
    released = booted.release_owner("imported:file")
    assert released.nr_pages == file_pages > 0
    assert booted.nr_pages_of(FolioKind.FILE) == 0
    assert booted.zone.nr_free == free_before + released.nr_pages
    booted.files.create("new")
    booted.files.write("new", 0, b"z" * MIB)
    check_machine(booted)


def test_a_smaller_snapshot_boots_into_a_larger_machine(tmp_path: Path) -> None:
    """Frames past the snapshot are free, merged with the free blocks before them."""
    machine = _machine(tmp_path, "a", 16 * MIB)
    machine.allocate("x", FolioKind.SLAB, order=0, count=3)
    big = _machine(tmp_path, "b", 64 * MIB)
    snap.boot(snap.decode(snap.snapshot_machine(machine).encode()), big)
    check_machine(big)
    assert big.zone.nr_free == big.nr_pages - 3
    with pytest.raises(OutOfMemory, match="covers 16384 frames"):
        snap.boot(snap.snapshot_machine(big), _machine(tmp_path, "c", 16 * MIB))


# -- bad files -------------------------------------------------------------------------------


def _rewrite(data: bytes, **changes: object) -> bytes:
    """The file with header fields changed or arrays replaced."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        arrays = {
            name.removesuffix(".npy"): np.lib.format.read_array(archive.open(name))
            for name in archive.namelist()
        }
    header = json.loads(arrays["header"].tobytes())
    for key, value in changes.items():
        if key in arrays and key != "header":
            arrays[key] = np.asarray(value, arrays[key].dtype)
        else:
            header[key] = value
    arrays["header"] = np.frombuffer(json.dumps(header).encode(), np.uint8)
    out = io.BytesIO()
    np.savez_compressed(out, **arrays)  # type: ignore[arg-type]
    return out.getvalue()


@pytest.fixture
def snapshot_bytes(tmp_path: Path) -> bytes:
    machine = _machine(tmp_path, "src", 16 * MIB)
    machine.allocate("x", FolioKind.FILE, order=2, count=100)
    machine.allocate("y", FolioKind.ANON, order=0, count=7)
    return snap.snapshot_machine(machine).encode()


def test_bad_files_name_what_is_wrong(snapshot_bytes: bytes) -> None:
    """Truncated, corrupt, foreign and inconsistent files are InvalidArgument, each saying why."""
    original = snap.decode(snapshot_bytes)
    middle = len(snapshot_bytes) // 2
    corrupt = bytearray(snapshot_bytes)
    for i in range(middle - 64, middle + 64):
        corrupt[i] ^= 0x5A
    foreign = io.BytesIO()
    np.savez_compressed(foreign, data=np.arange(10))
    kinds = original.kind.copy()
    kinds[0] = 200
    counts = original.count.copy()
    counts[-1] += 1
    cases = {
        "truncated": (snapshot_bytes[:middle], "truncated or corrupt"),
        "corrupt": (bytes(corrupt), "truncated or corrupt"),
        "not a zip": (b"hello, world\n" * 100, "truncated or corrupt"),
        "foreign zip": (foreign.getvalue(), "member header.npy is missing"),
        "empty": (b"", "truncated or corrupt"),
        "version": (_rewrite(snapshot_bytes, format_version=99), "format version 99"),
        "magic": (_rewrite(snapshot_bytes, magic="x"), "no magic"),
        "page size": (_rewrite(snapshot_bytes, page_size_bytes=65536), "page size 65536"),
        "kind": (_rewrite(snapshot_bytes, run_kind=kinds), "unknown kind"),
        "tiling": (_rewrite(snapshot_bytes, run_count=counts), "cover"),
        "counts": (_rewrite(snapshot_bytes, folios={"anon:0": 1}), "folios disagrees"),
    }
    for name, (data, message) in cases.items():
        with pytest.raises(InvalidArgument, match=message) as caught:
            snap.decode(data)
        assert caught.value.field == "snapshot", name


def test_unmerged_or_misaligned_runs_are_refused() -> None:
    """Free buddies both free at one order, or a run off its alignment, are refused."""
    free = np.array([snap.FREE, snap.FREE], np.uint8)
    buddies = snap.Snapshot(
        2,
        free,
        np.zeros(2, np.uint8),
        np.array([1, 1]),
        np.zeros(2, np.uint8),
        np.empty(0, np.uint32),
    )
    with pytest.raises(InvalidArgument, match="unmerged"):
        snap.decode(buddies.encode())
    anon = np.array([snap.CODE["anon"], snap.CODE["anon"]], np.uint8)
    unaligned = snap.Snapshot(
        3,
        anon,
        np.array([0, 1], np.uint8),
        np.array([1, 1]),
        np.zeros(2, np.uint8),
        np.empty(0, np.uint32),
    )
    with pytest.raises(InvalidArgument, match="unaligned"):
        snap.decode(unaligned.encode())


def test_members_over_their_limit_are_not_decompressed(
    snapshot_bytes: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A member whose stated size passes the limit is refused before it is read."""
    monkeypatch.setattr(snap, "MAX_MEMBER_BYTES", 64)
    with pytest.raises(InvalidArgument, match="over 64"):
        snap.decode(snapshot_bytes)


# -- from kpageflags ---------------------------------------------------------------------------


def _words(*flags: int) -> np.ndarray:
    return np.array(flags, np.uint64)


def _f(*bits: int) -> int:
    return sum(1 << b for b in bits)


def test_kpageflags_runs(tmp_path: Path) -> None:
    """Heads and tails make folios of their order, free frames the largest aligned blocks,
    reserved frames and holes withheld runs, orphan tails and broken runs "other"; a folio
    across a chunk end is carried over; the result does not depend on the chunk size."""
    head, tail = _f(KPF_COMPOUND_HEAD, KPF_LRU), _f(KPF_COMPOUND_TAIL, KPF_LRU)
    words = [_f(KPF_RESERVED)] * 4 + [_f(KPF_ANON)] * 4  # 0..7
    words += [_f(KPF_BUDDY)] * 8  # 8..15: one order-3 block
    words += [_f(KPF_SLAB)] * 1016  # 16..1031
    words += [head] + [tail] * 7  # 1032..1039: file order 3, crossing no chunk end
    words += [_f(KPF_BUDDY)] * 1000  # 1040..2039
    words += [_f(KPF_BUDDY)] * 8  # 2040..2047
    words += [head] + [tail] * 2047  # 2048..4095: file order 11 (crosses a 1024-frame chunk end)
    words += [_f(KPF_NOPAGE)] * 2 + [tail] * 2  # 4096..4099: holes, then orphan tails
    words += [head] + [tail] * 2 + [_f(KPF_ANON)]  # 4100..4103: a broken run of 3, an anon
    path = tmp_path / "kpageflags"
    path.write_bytes(_words(*words).tobytes())
    results = [snap.snapshot_kpageflags(path, chunk) for chunk in (1024, 4096, 1 << 18)]
    for other in results[1:]:
        for column in ("kind", "order", "count", "flags"):
            assert np.array_equal(getattr(other, column), getattr(results[0], column))
    result = snap.decode(results[0].encode())
    assert result.nr_frames == len(words)
    folios = result.folio_histogram()
    assert folios["anon:0"] == 4 + 1
    assert folios["slab:0"] == 1016
    assert folios["file:3"] == 1 and folios["file:11"] == 1
    assert folios["file:1"] == 1  # the broken run of 3 keeps an aligned order-1 piece
    frames = result.frames_by_kind()
    assert frames["reserved"] == 4 and frames["hole"] == 2
    assert frames["free"] == 8 + 1000 + 8
    assert frames["other"] == 2 + 1  # the orphans, and the broken run's last frame
    assert result.meta["notes"] == {"inconsistent_folios": 1, "orphan_tails": 2}
    pfn, _, order = result.units([snap.FREE])
    assert list(zip(pfn.tolist(), order.tolist(), strict=True))[:2] == [(8, 3), (1040, 4)]
    machine = Machine("b", 32 * MIB)
    snap.boot(result, machine)
    check_machine(machine)
    assert machine.zone.nr_free == 1016 + machine.nr_pages - len(words)
    assert machine.nr_hole_pages == 2


# -- through the API --------------------------------------------------------------------------


def _fill(client: FoliodClient) -> None:
    client.allocate("proc", FolioKind.ANON, size_bytes=10 * MIB)
    slab = client.allocate("slab", FolioKind.SLAB, order=0, count=2000)
    client.free(list(range(slab.first_handle, slab.first_handle + 2000, 2)))
    client.create_file("cache", max_order=9)
    client.write_file("cache", b"c" * (2 * MIB))
    client.allocate("huge", FolioKind.HUGETLB, order=9, count=3)
    client.release_owner("huge")
    client.allocate("big", FolioKind.FILE, order=5, count=40)


def _views(client: FoliodClient, machine: str) -> tuple[object, ...]:
    memmap = client.get_memmap(machine=machine)
    return (
        client.get_buddy_info(machine=machine).free_blocks,
        tuple((m.model, m.total_bytes, m.breakdown, m.by_kind) for m in memmap.models),
        memmap.folios,
        client.get_machine(machine=machine).nr_free_pages,
    )


def test_snapshot_and_boot_through_the_api(make_server: ServerFactory, tmp_path: Path) -> None:
    """foliodctl snapshot writes the file; a guest booted from it and a host started with
    --boot-from show the same buddyinfo, memmap per model and folio histogram."""
    source = make_server(ram=64 * MIB, state_dir=tmp_path / "source")
    path = tmp_path / "host.snapshot"
    with FoliodClient(f"127.0.0.1:{source.grpc_port}") as client:
        _fill(client)
        expected = _views(client, "")
        server = f"127.0.0.1:{source.grpc_port}"
        assert foliodctl(["snapshot", "--server", server, "-o", str(path)]) == 0
        info = client.snapshot_machine()
    assert info.data == path.read_bytes()
    assert info.info.source == "simulated" and info.info.nr_frames == 64 * MIB // 4096
    assert info.info.size_bytes == len(info.data) < 64 * 1024
    target = make_server(ram=256 * MIB, state_dir=tmp_path / "target")
    with FoliodClient(f"127.0.0.1:{target.grpc_port}") as client:
        guest = client.boot_guest("copy", path, backing="thp")
        assert guest.ram_bytes == 64 * MIB
        assert _views(client, "copy") == expected
        assert guest.backed_bytes > 0
        # The booted guest snapshots to the same runs; its host, with the guest's backing, too.
        again, first = snap.decode(client.snapshot_machine("copy").data), snap.decode(info.data)
        for column in ("kind", "order", "count", "flags", "free_pos"):
            assert np.array_equal(getattr(again, column), getattr(first, column)), column
        host = snap.decode(client.snapshot_machine("").data)
        assert host.frames_by_kind()["anon"] == guest.backed_bytes // 4096
        with pytest.raises(ClientOutOfMemory, match="covers 16384 frames"):
            client.boot_guest("small", path, 32 * MIB)
        assert [g.name for g in client.list_guests().guests] == ["copy"]
        assert (
            foliodctl(
                ["guests", "boot", "copy2", str(path), "--server", f"127.0.0.1:{target.grpc_port}"]
            )
            == 0
        )
    booted = make_server(ram=64 * MIB, state_dir=tmp_path / "booted", boot_from=path)
    with FoliodClient(f"127.0.0.1:{booted.grpc_port}") as client:
        assert _views(client, "") == expected
    with pytest.raises(ValueError, match=r"--boot-from .*covers 16384 frames"):
        make_server(ram=32 * MIB, state_dir=tmp_path / "small", boot_from=path)


def test_bad_snapshots_create_nothing(make_server: ServerFactory, snapshot_bytes: bytes) -> None:
    """A truncated, corrupt or foreign file is INVALID_ARGUMENT and a snapshot larger than the
    guest RESOURCE_EXHAUSTED; no guest is created and the host's memory is unchanged."""
    server = make_server()
    chan, stub = connect(server)
    settings = pb.CreateGuestRequest(name="g", backing=pb.GUEST_BACKING_BASE)
    small = pb.CreateGuestRequest(name="g", ram_bytes=8 * MIB, backing=pb.GUEST_BACKING_BASE)
    cases = [
        (settings, snapshot_bytes[: len(snapshot_bytes) // 2], grpc.StatusCode.INVALID_ARGUMENT),
        (
            settings,
            snapshot_bytes[:100] + b"\0" * 50 + snapshot_bytes[150:],
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (settings, b"PK\x03\x04 not really", grpc.StatusCode.INVALID_ARGUMENT),
        (small, snapshot_bytes, grpc.StatusCode.RESOURCE_EXHAUSTED),
    ]
    with chan:
        before = stub.GetMachine(pb.GetMachineRequest()).nr_free_pages
        for request, data, code in cases:
            chunks = [pb.BootGuestChunk(guest=request, data=data[:1000])]
            chunks += [
                pb.BootGuestChunk(data=data[i : i + 1000]) for i in range(1000, len(data), 1000)
            ]
            with pytest.raises(grpc.RpcError) as caught:
                stub.BootGuest(iter(chunks), timeout=30)
            assert caught.value.code() == code, caught.value.details()
            assert "snapshot" in (caught.value.details() or "")
        with pytest.raises(grpc.RpcError) as caught:
            stub.BootGuest(iter([pb.BootGuestChunk(data=snapshot_bytes)]), timeout=30)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert not stub.ListGuests(pb.ListGuestsRequest()).guests
        assert stub.GetMachine(pb.GetMachineRequest()).nr_free_pages == before
    address = f"127.0.0.1:{server.grpc_port}"
    with FoliodClient(address) as client, pytest.raises(ClientInvalidArgument, match="truncated"):
        client.boot_guest("g", snapshot_bytes[:-10])


def test_foliodctl_exit_codes_for_bad_snapshots(
    make_server: ServerFactory, tmp_path: Path, snapshot_bytes: bytes
) -> None:
    """foliodctl guests boot exits 3 for a corrupt file and 6 for one too large."""
    server = make_server()
    address = f"127.0.0.1:{server.grpc_port}"
    bad = tmp_path / "bad.snapshot"
    bad.write_bytes(snapshot_bytes[:-1])
    good = tmp_path / "good.snapshot"
    good.write_bytes(snapshot_bytes)
    assert foliodctl(["guests", "boot", "g", str(bad), "--server", address]) == 3
    assert foliodctl(["guests", "boot", "g", str(good), "--size", "8MiB", "--server", address]) == 6


# -- the real host ------------------------------------------------------------------------------

live = pytest.mark.skipif(
    not kpf.readable(), reason="/proc/kpageflags is not readable (needs root or CAP_SYS_ADMIN)"
)


@live
@pytest.mark.slow
def test_live_host_snapshot_is_small_and_boots(make_server: ServerFactory) -> None:
    """The observed real host snapshots to a file of a few MB at most, whose folio counts are
    those the scan classified, and boots as a guest with the same free blocks and folios."""
    server = make_server(
        ram=64 << 30, observe_host=True, observe_interval_seconds=0.0, debug_checks=False
    )
    assert server.observer is not None
    name = server.observer.name
    with FoliodClient(f"127.0.0.1:{server.grpc_port}", timeout=60) as client:
        taken = client.snapshot_machine(name)
        info = taken.info
        assert (info.source, info.machine) == ("kpageflags", name)
        gib = info.nr_frames * 4096 / (1 << 30)
        assert info.size_bytes == len(taken.data) <= max(4 * MIB, 0.2 * MIB * gib)
        meminfo = kpf.read_meminfo()
        assert info.nr_frames * 4096 >= meminfo["MemTotal"]
        layout = snap.decode(taken.data)
        histogram = layout.folio_histogram()
        guest = client.boot_guest("real", taken.data, backing="thp")
        assert guest.ram_bytes >= info.nr_frames * 4096
        memmap = client.get_memmap(machine="real")
        got = {f"{f.kind}:{f.order}": f.folios for f in memmap.folios}
        assert got == {k: n for k, n in histogram.items() if k.split(":")[0] in set(FolioKind)}
        buddy = client.get_buddy_info(machine="real").free_blocks
        _, _, orders = layout.units([snap.FREE])
        assert list(buddy) == np.bincount(orders, minlength=11).tolist()
