"""Observing a real host: the kpageflags classification, its live invariants, and serving it."""

from __future__ import annotations

import json
import platform
import re
import time
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from foliod.api.pb_enums import FOLIO_KIND
from foliod.config import ConfigError, load_config
from foliod.main import main as foliod_main
from foliod.mm import DescriptorSizes, FolioKind
from foliod.mm import kpageflags as kpf
from foliod.mm.guest import BackingSpec
from foliod.mm.kpageflags import (
    KPF_ANON,
    KPF_BUDDY,
    KPF_COMPOUND_HEAD,
    KPF_COMPOUND_TAIL,
    KPF_HUGE,
    KPF_KSM,
    KPF_LRU,
    KPF_MMAP,
    KPF_NOPAGE,
    KPF_OFFLINE,
    KPF_PGTABLE,
    KPF_RESERVED,
    KPF_SLAB,
    KPF_SWAPBACKED,
    KPF_SWAPCACHE,
    KPF_THP,
    KPF_UPTODATE,
    KPF_ZERO_PAGE,
    ObserveUnavailable,
    classify,
)
from foliod.mm.meminfo import MeminfoEstimate, estimate_host
from foliod.mm.memmap import memmap_report
from foliod.rpc.observe import ObservedGuest, ObservedMachine
from foliod.v1 import foliod_pb2 as pb
from foliodclient import FoliodClient
from foliodclient.cli import render_memmap
from tests.conftest import ServerFactory, connect

FIXTURES = Path(__file__).resolve().parent / "fixtures"
LIVE = FIXTURES / "observe-linux-6.18.json"
# A hand-written /proc/meminfo: a 2 MiB HugeTLB default plus one 1 GiB page, THPs of each kind.
MEMINFO = FIXTURES / "meminfo-estimate.txt"


def flags(*bits: int) -> int:
    return sum(1 << b for b in bits)


HEAD, TAIL = KPF_COMPOUND_HEAD, KPF_COMPOUND_TAIL


def frames(*words: int) -> np.ndarray[Any, np.dtype[np.uint64]]:
    return np.array(words, np.uint64)


# One frame each: the frame class, or the folio kind of a single-page folio.
CASES = [
    ((KPF_NOPAGE,), "hole", None),
    ((KPF_NOPAGE, KPF_BUDDY), "hole", None),
    ((KPF_RESERVED,), "reserved", None),
    ((KPF_RESERVED, KPF_ZERO_PAGE), "reserved", None),  # the 4 KiB zero page is in .bss
    ((KPF_BUDDY,), "free", None),
    ((), "folio", "other"),
    ((KPF_UPTODATE,), "folio", "other"),
    ((KPF_ANON,), "folio", "anon"),
    ((KPF_ANON, KPF_LRU, KPF_SWAPBACKED), "folio", "anon"),
    ((KPF_ANON, KPF_KSM, KPF_MMAP), "folio", "anon"),
    ((KPF_ANON, KPF_SWAPCACHE), "folio", "anon"),
    ((KPF_LRU,), "folio", "file"),
    ((KPF_LRU, KPF_SWAPBACKED), "folio", "file"),  # shmem is page cache
    ((KPF_MMAP,), "folio", "file"),
    ((KPF_SWAPCACHE,), "folio", "file"),
    ((KPF_SLAB,), "folio", "slab"),
    ((KPF_PGTABLE,), "folio", "pagetable"),
    ((KPF_OFFLINE,), "folio", "balloon"),
    ((KPF_ZERO_PAGE,), "folio", "zero"),
    ((KPF_HUGE,), "folio", "hugetlb"),
    ((KPF_HUGE, KPF_ANON, KPF_MMAP), "folio", "hugetlb"),
    ((KPF_SLAB, KPF_LRU), "folio", "slab"),
    ((KPF_PGTABLE, KPF_LRU), "folio", "pagetable"),
    ((KPF_OFFLINE, KPF_ANON), "folio", "balloon"),
]


@pytest.mark.parametrize(("bits", "frame_class", "kind"), CASES)
def test_each_flag_combination_is_classified(
    bits: tuple[int, ...], frame_class: str, kind: str | None
) -> None:
    scan = classify(frames(flags(*bits)))
    assert scan.frames[frame_class] == 1
    assert sum(scan.frames.values()) == 1
    if kind is not None:
        assert scan.folios == {(kind, 0): 1}
        assert scan.kind_frames[kind] == 1
    else:
        assert scan.folios == {}


def test_orders_come_from_head_and_tail_runs() -> None:
    anon2 = [flags(HEAD, KPF_ANON)] + [flags(TAIL, KPF_ANON)] * 3
    file9 = [flags(HEAD, KPF_LRU, KPF_THP)] + [flags(TAIL, KPF_LRU, KPF_THP)] * 511
    slab1 = [flags(HEAD, KPF_SLAB), flags(TAIL, KPF_SLAB)]
    words = [flags(KPF_LRU), *anon2, flags(KPF_BUDDY), *file9, *slab1, flags(KPF_ANON)]
    scan = classify(frames(*words))
    assert scan.folios == {
        ("file", 0): 1,
        ("anon", 2): 1,
        ("file", 9): 1,
        ("slab", 1): 1,
        ("anon", 0): 1,
    }
    assert scan.frames == {
        "hole": 0,
        "reserved": 0,
        "free": 1,
        "folio": 5,
        "tail": 3 + 511 + 1,
        "orphan_tail": 0,
    }
    assert scan.kind_frames["file"] == 513
    assert scan.thp_frames == {"file": 512}
    assert scan.inconsistent_runs == 0


def test_chunking_does_not_change_the_result() -> None:
    """Folios straddling chunk ends (including a chunk of tails only) are carried over."""
    rng = np.random.default_rng(7)
    words: list[int] = []
    kinds = [flags(KPF_ANON), flags(KPF_LRU), flags(KPF_SLAB), flags(KPF_PGTABLE)]
    while len(words) < 5000:
        order = int(rng.integers(0, 7))
        base = kinds[int(rng.integers(0, len(kinds)))]
        if order:
            words += [base | flags(HEAD)] + [base | flags(TAIL)] * ((1 << order) - 1)
        else:
            words.append(base)
        words += [flags(KPF_BUDDY)] * int(rng.integers(0, 3))
    whole = classify(frames(*words), chunk_frames=1 << 20)
    for chunk in (1, 3, 7, 64, 1000):
        assert classify(frames(*words), chunk_frames=chunk).as_dict() == whole.as_dict()


def test_broken_runs_are_counted_not_hidden() -> None:
    """Tails with no head before them, and runs that are not a power of two."""
    words = [flags(TAIL), flags(KPF_BUDDY), flags(TAIL), flags(HEAD, KPF_ANON)]
    words += [flags(TAIL, KPF_ANON)] * 2
    scan = classify(frames(*words))
    assert scan.frames["orphan_tail"] == 2
    assert scan.inconsistent_runs == 1  # head + 2 tails = 3 frames
    assert scan.folios == {("anon", 1): 1}


def test_sections_without_ram_are_holes() -> None:
    """Flag-less frames of a section with no System RAM are holes; the rest of a section
    with some RAM counts (it has a memmap)."""
    words = frames(*([0] * 40))
    scan = classify(words, ram_ranges=[(2, 5)])
    assert scan.present_frames == 40  # one 32768-frame section holds all of them
    classifier = kpf.Classifier([(2, 5)], section_frames=8)
    classifier.feed(words)
    assert classifier.finish().present_frames == 8


def test_models_are_the_simulators_arithmetic() -> None:
    words = [flags(KPF_ANON)] * 3 + [flags(HEAD, KPF_LRU)] + [flags(TAIL, KPF_LRU)] * 3
    words += [flags(KPF_SLAB), flags(KPF_PGTABLE), flags(KPF_BUDDY), flags(KPF_RESERVED), 0]
    scan = classify(frames(*words))
    counts = scan.folio_counts()
    assert counts == {
        (FolioKind.ANON, 0): 3,
        (FolioKind.FILE, 2): 1,
        (FolioKind.SLAB, 0): 1,
        (FolioKind.PAGETABLE, 0): 1,
    }
    struct_page, interim, memdesc = memmap_report(
        scan.present_frames, 1, counts, DescriptorSizes(), 4096
    )
    assert struct_page.total_bytes == 12 * 64
    assert interim.total_bytes == 12 * 32 + 3 * 80 + 112 + 64 + 64
    assert memdesc.total_bytes == 12 * 8 + 3 * 80 + 112 + 64 + 64


def test_scan_reads_a_file_in_bounded_chunks(tmp_path: Path) -> None:
    words = frames(*([flags(KPF_BUDDY)] * 10 + [flags(KPF_ANON)] * 5))
    path = tmp_path / "kpageflags"
    path.write_bytes(words.tobytes())
    pauses: list[int] = []
    scan = kpf.scan_kpageflags(path, chunk_frames=4, between_chunks=lambda: pauses.append(1))
    assert scan.frames["free"] == 10
    assert scan.folios == {("anon", 0): 5}
    assert len(pauses) == 4  # 4 + 4 + 4 + 3 frames


def test_unreadable_kpageflags_names_the_file_and_capability(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ObserveUnavailable, match="does not exist"):
        kpf.check_readable(tmp_path / "missing")

    def denied(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("builtins.open", denied)
    with pytest.raises(ObserveUnavailable, match=r"/proc/kpageflags.*uid 0.*CAP_DAC_READ_SEARCH"):
        kpf.check_readable()


def test_proc_parsers(tmp_path: Path) -> None:
    iomem = tmp_path / "iomem"
    iomem.write_text(
        "00000000-00000fff : Reserved\n00001000-0009fbff : System RAM\n"
        "00100000-bfffffff : System RAM\n  01000000-01ffffff : Kernel code\n"
        "100000000-63fffffff : System RAM\n"
    )
    assert kpf.read_ram_ranges(iomem) == [(1, 0x9F), (0x100, 0xBFFFF), (0x100000, 0x63FFFF)]
    iomem.write_text("00000000-00000000 : System RAM\n")  # not root: addresses hidden
    assert kpf.read_ram_ranges(iomem) is None
    buddy = tmp_path / "buddyinfo"
    buddy.write_text(
        "Node 0, zone      DMA      0      1      0      0      0      0      0      0      1"
        "      1      3\nNode 0, zone   Normal      5      0      0      0      0      0      0"
        "      0      0      0      1\n"
    )
    zones = kpf.read_buddyinfo(buddy)
    assert kpf.buddy_totals(zones) == [5, 1, 0, 0, 0, 0, 0, 0, 1, 1, 4]
    cpuinfo, dmi = tmp_path / "cpuinfo", tmp_path / "dmi"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu vme hypervisor lahf_lm\n")
    assert kpf.detect_virtualization(cpuinfo, dmi).guest
    cpuinfo.write_text("flags\t\t: fpu vme\n")
    dmi.mkdir()
    (dmi / "sys_vendor").write_text("QEMU\n")
    virt = kpf.detect_virtualization(cpuinfo, dmi)
    assert (virt.guest, virt.hypervisor_flag, virt.sys_vendor) == (True, False, "QEMU")
    (dmi / "sys_vendor").write_text("Dell Inc.\n")
    assert not kpf.detect_virtualization(cpuinfo, dmi).guest


def test_memory_blocks_give_the_sections_with_ram(tmp_path: Path) -> None:
    """Present memory blocks in sysfs are PFN ranges of block_size_bytes each; without the
    directory there are none."""
    root = tmp_path / "memory"
    root.mkdir()
    (root / "block_size_bytes").write_text("8000000\n")  # 128 MiB
    for name in ("memory0", "memory2", "auto_online_blocks", "power", "uevent"):
        (root / name).mkdir()
    assert kpf.read_memory_blocks(root) == [(0, 32767), (65536, 98303)]
    assert kpf.read_memory_blocks(tmp_path / "missing") is None


def test_recorded_host_is_consistent() -> None:
    """The fixture measured here: its models follow from its folio counts."""
    data = json.loads(LIVE.read_text())
    scan = kpf.Scan(nr_frames=data["scan"]["nr_frames"])
    scan.frames = data["scan"]["frames"]
    for key, n in data["scan"]["folios"].items():
        kind, order = key.split(":")
        scan.folios[kind, int(order)] = n
    reports = memmap_report(
        data["scan"]["present_frames"],
        data["free_frames_buddyinfo"],
        scan.folio_counts(),
        DescriptorSizes(),
        4096,
    )
    for report in reports:
        assert report.total_bytes == data["memmap"][str(report.model)]["total_bytes"]
    assert data["kernel"].startswith("6.18")


# -- the live host -------------------------------------------------------------------------

live = pytest.mark.skipif(
    not kpf.readable(),
    reason="/proc/kpageflags is not readable (needs uid 0 or CAP_DAC_READ_SEARCH)",
)


@live
def test_memory_blocks_and_iomem_agree_on_this_host() -> None:
    """Without CAP_SYS_ADMIN iomem hides its addresses and the scan takes the sections with RAM
    from sysfs's memory blocks: on this host both give the same sections."""
    iomem, blocks = kpf.read_ram_ranges(), kpf.read_memory_blocks()
    if iomem is None or blocks is None:
        pytest.skip("needs /proc/iomem's addresses and /sys/devices/system/memory")

    def sections(ranges: list[tuple[int, int]]) -> set[int]:
        step = kpf.SECTION_FRAMES
        return {s for first, last in ranges for s in range(first // step, last // step + 1)}

    assert sections(iomem) == sections(blocks)


@pytest.mark.slow
@live
def test_live_host_matches_meminfo() -> None:
    """Invariants against /proc/meminfo, read before and after the ~1 s scan: a value the
    scan found must lie between the two readings, within SLACK for memory that changed and
    changed back while the scan was running (other processes share this host)."""
    slack = 64 << 20
    before = kpf.read_meminfo()
    obs = kpf.observe_host()
    after = kpf.read_meminfo()
    scan, page = obs.scan, 4096

    def between(found: int, field: str, scale: int = 1) -> None:
        low = min(before[field], after[field]) * scale - slack
        high = max(before[field], after[field]) * scale + slack
        assert low <= found <= high, (field, found, before[field], after[field])

    # MemTotal is totalram_pages: every present frame but the PG_reserved ones (memblock,
    # kernel image, the memmap itself). Pages the kernel hands back or takes away later
    # (balloon, hotplug, bootmem HugeTLB) would break the equality: 0.5% allows for them.
    managed = (scan.present_frames - scan.frames["reserved"]) * page
    assert abs(managed - before["MemTotal"]) <= before["MemTotal"] // 200
    # AnonHugePages counts PMD-mapped anon THPs: order-9 anon folios mapped by PTEs only
    # (after a partial munmap or mprotect) are found by the scan but not counted there.
    anon_thp = scan.folios.get(("anon", 9), 0) * 512 * page
    assert anon_thp >= min(before["AnonHugePages"], after["AnonHugePages"]) - slack
    # FileHugePages counts PMD-size page-cache folios, mapped or not.
    between(scan.folios.get(("file", 9), 0) * 512 * page, "FileHugePages")
    hugetlb = scan.kind_frames["hugetlb"] * page
    assert before["HugePages_Total"] * before["Hugepagesize"] <= hugetlb + slack
    between(scan.kind_frames["pagetable"] * page, "PageTables")
    # Slab also counts kmalloc allocations too large for a slab (plain compound pages without
    # the slab flag, "other" here): measured 100,300 kB found against 107,148 kB.
    between(scan.kind_frames["slab"] * page, "Slab")
    # MemFree also counts the per-cpu lists' pages, which carry no BUDDY flag.
    between(scan.frames["free"] * page, "MemFree")
    # The struct page model is the kernel's own memmap (Linux 6.11+ counts it in vmstat).
    struct_page, interim, memdesc = obs.memmap()
    if "nr_memmap_boot_pages" in obs.vmstat and not obs.hvo:
        kernel = obs.vmstat["nr_memmap_boot_pages"] + obs.vmstat.get("nr_memmap_pages", 0)
        assert struct_page.total_bytes == kernel * page
    for report in (struct_page, interim, memdesc):
        assert report.total_bytes == sum(c.total_bytes for c in report.breakdown)
    assert memdesc.total_bytes < interim.total_bytes < struct_page.total_bytes
    assert scan.inconsistent_runs <= scan.frames["folio"] // 1000
    assert obs.kernel == platform.release()


# -- serving it ----------------------------------------------------------------------------


@pytest.fixture
def synthetic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> kpf.HostObservation:
    """The server observes a made-up kpageflags file (plus this host's /proc)."""
    words = [flags(KPF_ANON)] * 4 + [flags(HEAD, KPF_LRU)] + [flags(TAIL, KPF_LRU)] * 7
    words += [flags(KPF_BUDDY)] * 20 + [flags(KPF_SLAB), flags(KPF_RESERVED)]
    path = tmp_path / "kpageflags"
    path.write_bytes(frames(*words).tobytes())

    monkeypatch.setattr("foliod.rpc.observe.KPAGEFLAGS", path)
    return kpf.observe_host(path)


def test_observed_host_is_served_read_only(
    make_server: ServerFactory, synthetic: kpf.HostObservation
) -> None:
    server = make_server(
        observe_host=True, observe_interval_seconds=0.0, observe_hostname="node-7.example"
    )
    name = "real:node-7.example"
    chan, stub = connect(server)
    with chan:
        memmap = stub.GetMemmap(pb.GetMemmapRequest(machine=name))
        assert memmap.machine == name
        totals = {m.model: m.total_bytes for m in memmap.models}
        assert totals[pb.MEMMAP_MODEL_STRUCT_PAGE] == 34 * 64
        assert totals[pb.MEMMAP_MODEL_MEMDESC] == 34 * 8 + 4 * 80 + 112 + 64
        assert {(f.kind, f.order, f.folios) for f in memmap.folios} == {
            (pb.FOLIO_KIND_ANON, 0, 4),
            (pb.FOLIO_KIND_FILE, 3, 1),
            (pb.FOLIO_KIND_SLAB, 0, 1),
        }
        meminfo = stub.GetMeminfo(pb.GetMeminfoRequest(machine=name))
        assert meminfo.mem_total_bytes == kpf.read_meminfo()["MemTotal"]
        buddy = stub.GetBuddyInfo(pb.GetBuddyInfoRequest(machine=name))
        assert len(buddy.free_blocks) == 11
        info = stub.GetMachine(pb.GetMachineRequest(machine=name))
        assert (info.name, info.nr_pages) == (name, 34)
        assert stub.GetVmstat(pb.GetVmstatRequest(machine=name)).entries
        for call in (
            lambda: stub.Allocate(
                pb.AllocateRequest(machine=name, owner="a", kind=pb.FOLIO_KIND_ANON, count=1)
            ),
            lambda: stub.GetFolio(pb.GetFolioRequest(machine=name, handle=1)),
            lambda: stub.CreateFile(pb.CreateFileRequest(machine=name, name="f")),
            lambda: stub.DropCaches(pb.DropCachesRequest(machine=name)),
        ):
            with pytest.raises(grpc.RpcError) as caught:
                call()
            assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "read-only" in (caught.value.details() or "")
        # The simulated host is untouched.
        assert stub.GetMachine(pb.GetMachineRequest()).name != name
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    assert f'foliod_memmap_bytes{{machine="{name}",model="memdesc"}}' in text
    assert f'foliod_observed_host_info{{guest="{str(synthetic.virtualization.guest).lower()}"' in (
        text
    )


def test_observe_only_serves_and_exports_the_real_host_alone(
    make_server: ServerFactory, synthetic: kpf.HostObservation
) -> None:
    """--observe-only: the real host is the default machine and the only one exported; the
    simulated host and guests on it are FAILED_PRECONDITION."""
    server = make_server(
        observe_host=True,
        observe_only=True,
        observe_interval_seconds=0.0,
        observe_hostname="n1",
        ram=1 << 20,
    )
    chan, stub = connect(server)
    with chan:
        assert stub.GetMachine(pb.GetMachineRequest()).name == "real:n1"
        assert stub.GetMemmap(pb.GetMemmapRequest()).machine == "real:n1"
        for call in (
            lambda: stub.GetMachine(pb.GetMachineRequest(machine="host")),
            lambda: stub.Allocate(pb.AllocateRequest(owner="a", kind=pb.FOLIO_KIND_ANON, count=1)),
            lambda: stub.CreateGuest(
                pb.CreateGuestRequest(name="g", ram_bytes=1 << 20, backing=pb.GUEST_BACKING_BASE)
            ),
        ):
            with pytest.raises(grpc.RpcError) as caught:
                call()
            assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    machines = set(re.findall(r'foliod_ram_bytes\{machine="([^"]+)"\}', text))
    assert machines == {"real:n1"}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--observe-only"], "observe_only: it needs observe_host"),
        (["--observe-host", "--observe-hostname", "bad name"], "not a host name"),
        (["--observe-host", "--observe-hostname=-x"], "not a host name"),
        (["--observe-host", "--observe-backing", "mthp"], "not a backing: 'mthp'"),
        (["--observe-host", "--observe-backing", "hugetlb"], "hugetlb_2m, hugetlb_1g"),
        (["--observe-backing", "thp"], "observe_backing: it needs observe_host"),
        (["--observe-host", "--observe-hvo", "true"], "HVO needs .* not none"),
        (
            ["--observe-host", "--observe-backing", "thp", "--observe-hvo", "1"],
            "HVO needs observe_backing hugetlb_2m or hugetlb_1g, not thp",
        ),
        (["--observe-host", "--observe-hvo", "maybe"], "--observe-hvo: not a boolean"),
        (
            ["--observe-host", "--observe-fallback", "kpageflags"],
            r"--observe-fallback: not a fallback: 'kpageflags' \(meminfo or none\)",
        ),
        (["--observe-host", "--observe-fallback", "meminfo,none"], "not a fallback"),
        (["--observe-fallback", "meminfo"], "observe_fallback: it needs observe_host"),
    ],
)
def test_bad_observe_options_are_start_up_errors(argv: list[str], message: str) -> None:
    """Each bad observe option stops foliod before it starts: exit code 2 and a message naming
    the option."""
    with pytest.raises(ConfigError, match=message):
        load_config(argv, environ={})
    assert foliod_main(argv) == 2


def _observation(nr_frames: int, folios: dict[tuple[str, int], int]) -> kpf.HostObservation:
    """A made-up observation: nr_frames present, the given folios, the rest free."""
    scan = kpf.Scan(nr_frames=nr_frames)
    used = sum(n << order for (_, order), n in folios.items())
    scan.frames["free"] = nr_frames - used
    scan.folios = dict(folios)
    free = nr_frames - used
    return kpf.HostObservation(
        name="real:vm",
        kernel="6.18",
        scan=scan,
        meminfo={},
        buddyinfo={"node0/Normal": [free]},
        vmstat={},
        mthp={},
        virtualization=kpf.Virtualization(
            guest=True, hypervisor_flag=True, sys_vendor="QEMU", product_name="Standard PC"
        ),
        hvo=False,
        taken_at=0.0,
    )


GIB16 = 16 << 18  # frames of a 16 GiB guest
MIB = 1 << 20


# The host side of a 16 GiB guest per model (struct_page, interim, memdesc), fully backed:
# The table of simulated guests in docs/guests.md, which tests/test_guests.py asserts through
# the API.
HOST_SIDE = {
    ("base", False): (256 * MIB, GIB16 * (32 + 80), GIB16 * (8 + 80)),
    ("thp", False): (256 * MIB, 128 * MIB + 8192 * 112, 32 * MIB + 8192 * 112),
    ("hugetlb_2m", False): (256 * MIB, 128 * MIB + 8192 * 112, 32 * MIB + 8192 * 112),
    # HVO keeps one memmap page of a huge page's: struct page 1 of 8, interim 1 of 4, memdesc's
    # single page stays.
    ("hugetlb_2m", True): (32 * MIB, 32 * MIB + 8192 * 112, 32 * MIB + 8192 * 112),
    # A 1 GiB page: one page of 4096 (struct page, 64 KiB in all), of 2048, of 512.
    ("hugetlb_1g", True): (64 << 10, 16 * 4096 + 16 * 112, 16 * 4096 + 16 * 112),
}


@pytest.mark.parametrize(("backing", "hvo"), sorted(HOST_SIDE))
def test_an_observed_guest_gets_the_simulated_guests_arithmetic(backing: str, hvo: bool) -> None:
    """With a stated host backing, the observed host's duplication is Guest.duplication: the
    guest side its scan's memory map, the host side what a simulated guest of that size and
    backing pays when fully backed."""
    observation = _observation(GIB16, {("anon", 0): 1000, ("file", 9): 10, ("slab", 0): 50})
    machine = ObservedMachine(observation, DescriptorSizes())
    guest = ObservedGuest(machine, BackingSpec.of(backing, hvo=hvo), DescriptorSizes())
    duplication = guest.duplication()
    assert [d.guest_memmap_bytes for d in duplication] == [m.total_bytes for m in machine.memmap()]
    assert tuple(d.host_memmap_bytes for d in duplication) == HOST_SIDE[backing, hvo]
    assert guest.backing.nr_backed_pages == GIB16


def test_ballooned_memory_is_not_backed() -> None:
    """Frames a balloon driver took are not backed by the host: a granule fewer per granule
    the balloon holds."""
    observation = _observation(GIB16, {("balloon", 0): 1024})
    observation.scan.kind_frames["balloon"] = 1024
    machine = ObservedMachine(observation, DescriptorSizes())
    guest = ObservedGuest(machine, BackingSpec.of("hugetlb_2m"), DescriptorSizes())
    assert guest.backing.nr_backed == GIB16 // 512 - 2


def test_an_observed_guest_is_served_read_only(
    make_server: ServerFactory, synthetic: kpf.HostObservation
) -> None:
    """--observe-backing: GetGuest, ListGuests and the foliod_guest_* metrics show the observed
    host as a guest; SetBalloon, ReportFreePages and DestroyGuest on it are
    FAILED_PRECONDITION; simulated guests still work beside it."""
    server = make_server(
        observe_host=True,
        observe_interval_seconds=0.0,
        observe_hostname="vm1",
        observe_backing="hugetlb_2m",
        observe_hvo=True,
    )
    chan, stub = connect(server)
    with chan:
        guest = stub.GetGuest(pb.GetGuestRequest(name="real:vm1"))
        assert (guest.backing, guest.hvo, guest.ram_bytes) == (
            pb.GUEST_BACKING_HUGETLB_2M,
            True,
            34 * 4096,
        )
        memmap = stub.GetMemmap(pb.GetMemmapRequest(machine="real:vm1"))
        assert [d.guest_memmap_bytes for d in guest.duplication] == [
            m.total_bytes for m in memmap.models
        ]
        # 34 frames: no 2 MiB granule, so the host side is the per-frame entries alone.
        assert [d.host_memmap_bytes for d in guest.duplication] == [34 * 64, 34 * 32, 34 * 8]
        stub.CreateGuest(
            pb.CreateGuestRequest(name="g", ram_bytes=4 * MIB, backing=pb.GUEST_BACKING_BASE)
        )
        names = [g.name for g in stub.ListGuests(pb.ListGuestsRequest()).guests]
        assert names == ["g", "real:vm1"]
        for call in (
            lambda: stub.SetBalloon(pb.SetBalloonRequest(name="real:vm1", size_bytes=4096)),
            lambda: stub.ReportFreePages(pb.ReportFreePagesRequest(name="real:vm1")),
            lambda: stub.DestroyGuest(pb.DestroyGuestRequest(name="real:vm1")),
        ):
            with pytest.raises(grpc.RpcError) as caught:
                call()
            assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        stub.DestroyGuest(pb.DestroyGuestRequest(name="g"))
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    assert 'foliod_guest_memmap_duplicate_bytes{guest="real:vm1",model="struct_page"} 4352.0' in (
        text
    )


def _unreadable(how: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """Points the observer at a kpageflags file it cannot read (missing, or permission
    denied); returns the pattern of the start-up error that gives."""
    path = tmp_path / "kpageflags"
    if how == "denied":
        path.write_bytes(bytes(8))

        def denied(*args: object, **kwargs: object) -> None:
            raise PermissionError(13, "Permission denied")

        # Only kpageflags.py's open: the meminfo file and the rest of /proc still read.
        monkeypatch.setattr(kpf, "open", denied, raising=False)
        pattern = f"cannot read {re.escape(str(path))}: permission denied.*CAP_DAC_READ_SEARCH"
    else:
        pattern = f"{re.escape(str(path))} does not exist"
    monkeypatch.setattr("foliod.rpc.observe.KPAGEFLAGS", path)
    return pattern


def _read_fixture(path: Path) -> dict[str, int]:
    """A meminfo file's fields, in bytes (kB) or counts (HugePages_*), read here on their own."""
    values = {}
    for line in path.read_text().splitlines():
        name, _, value = line.partition(":")
        number, *unit = value.split()
        values[name] = int(number) * (1024 if unit == ["kB"] else 1)
    return values


def _estimated_folios(meminfo: dict[str, int]) -> dict[tuple[FolioKind, int], int]:
    """The folios docs/observe.md's rules take from meminfo: PMD-size THPs and HugeTLB pages at
    their order, everything else at order 0 (the fixture's HugeTLB default is 2 MiB, the rest
    1 GiB)."""
    page, pmd = 4096, 512 * 4096
    assert meminfo["Hugepagesize"] == 2 << 20
    anon_thp = meminfo["AnonHugePages"] // pmd
    file_thp = (meminfo["FileHugePages"] + meminfo["ShmemHugePages"]) // pmd
    huge_1g = (meminfo["Hugetlb"] - meminfo["HugePages_Total"] * (2 << 20)) // (1 << 30)
    return {
        (FolioKind.HUGETLB, 9): meminfo["HugePages_Total"],
        (FolioKind.HUGETLB, 18): huge_1g,
        (FolioKind.ANON, 9): anon_thp,
        (FolioKind.ANON, 0): meminfo["AnonPages"] // page - anon_thp * 512,
        (FolioKind.FILE, 9): file_thp,
        (FolioKind.FILE, 0): (meminfo["Cached"] + meminfo["Buffers"]) // page - file_thp * 512,
        (FolioKind.SLAB, 0): meminfo["Slab"] // page,
        (FolioKind.PAGETABLE, 0): meminfo["PageTables"] // page,
        (FolioKind.BALLOON, 0): meminfo["Balloon"] // page,
    }


def _descriptor_bytes(kind: FolioKind, order: int) -> int:
    """A folio's own descriptor under interim and memdesc, at the default sizes."""
    if kind in (FolioKind.SLAB, FolioKind.PAGETABLE):
        return 64
    return 112 if order else 80


def test_meminfo_estimate_follows_the_file() -> None:
    """The estimate's frames, free frames and folios are the meminfo file's fields by the
    documented rules; the rest of MemTotal is kind other, with no descriptor."""
    meminfo = _read_fixture(MEMINFO)
    estimate = estimate_host(MEMINFO, hostname="n1")
    assert isinstance(estimate, MeminfoEstimate)
    assert (estimate.name, estimate.source) == ("real:n1", "meminfo-estimate")
    scan = estimate.scan
    expected = _estimated_folios(meminfo)
    assert all(expected.values())  # the fixture exercises every rule
    assert scan.folio_counts() == expected
    assert scan.present_frames == meminfo["MemTotal"] // 4096
    assert estimate.free_frames == scan.frames["free"] == meminfo["MemFree"] // 4096
    used = sum(n << order for (_, order), n in expected.items())
    assert scan.kind_frames["other"] == scan.present_frames - estimate.free_frames - used
    assert scan.thp_frames == {
        "anon": expected[FolioKind.ANON, 9] * 512,
        "file": expected[FolioKind.FILE, 9] * 512,
    }
    assert sum(scan.frames.values()) == scan.present_frames


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (None, "cannot read .*meminfo: No such file"),
        ("MemFree: 4 kB\n", "is not /proc/meminfo: no MemTotal"),
        ("MemTotal: lots kB\n", "is not /proc/meminfo: invalid literal"),
    ],
)
def test_a_bad_meminfo_is_named(tmp_path: Path, text: str | None, message: str) -> None:
    """A meminfo file that is missing, lacks MemTotal or is not meminfo: ObserveUnavailable
    naming it."""
    path = tmp_path / "meminfo"
    if text is not None:
        path.write_text(text)
    with pytest.raises(ObserveUnavailable, match=message):
        estimate_host(path)


@pytest.mark.parametrize("how", ["missing", "denied"])
def test_unreadable_kpageflags_stops_start_up_or_falls_back_on_meminfo(
    make_server: ServerFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """Without a fallback foliod does not start, naming the file, the capability and the
    fallback; with --observe-fallback meminfo it serves the meminfo file's estimate, labelled
    source="meminfo-estimate" in GetMemmap and on /metrics."""
    pattern = _unreadable(how, tmp_path, monkeypatch)
    monkeypatch.setattr("foliod.rpc.observe.MEMINFO", MEMINFO)
    with pytest.raises(ObserveUnavailable, match=f"{pattern}.*--observe-fallback meminfo"):
        make_server(observe_host=True)

    server = make_server(
        observe_host=True,
        observe_fallback="meminfo",
        observe_interval_seconds=0.0,
        observe_hostname="n1",
    )
    meminfo = _read_fixture(MEMINFO)
    nr_frames, nr_free = meminfo["MemTotal"] // 4096, meminfo["MemFree"] // 4096
    folios = _estimated_folios(meminfo)
    descriptors = sum(n * _descriptor_bytes(kind, order) for (kind, order), n in folios.items())
    chan, stub = connect(server)
    with chan:
        memmap = stub.GetMemmap(pb.GetMemmapRequest(machine="real:n1"))
        assert memmap.source == "meminfo-estimate"
        assert memmap.ram_bytes == nr_frames * 4096
        assert {(f.kind, f.order): f.folios for f in memmap.folios} == {
            (FOLIO_KIND.to_pb[kind], order): n for (kind, order), n in folios.items()
        }
        models = {m.model: m for m in memmap.models}
        struct_page, memdesc = models[pb.MEMMAP_MODEL_STRUCT_PAGE], models[pb.MEMMAP_MODEL_MEMDESC]
        assert struct_page.total_bytes == nr_frames * 64
        assert struct_page.free_memory_bytes == nr_free * 64
        assert memdesc.total_bytes == nr_frames * 8 + descriptors
        assert stub.GetMachine(pb.GetMachineRequest(machine="real:n1")).nr_pages == nr_frames
        real = stub.GetMeminfo(pb.GetMeminfoRequest(machine="real:n1"))
        assert real.mem_total_bytes == meminfo["MemTotal"]
        # A simulated machine has no source.
        assert stub.GetMemmap(pb.GetMemmapRequest()).source == ""
    with FoliodClient(f"127.0.0.1:{server.grpc_port}", timeout=10, machine="real:n1") as client:
        title = render_memmap(client.get_memmap()).splitlines()[0]
    assert title.startswith("memory map of real:n1 (meminfo-estimate): ")
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    (labels,) = re.findall(r"foliod_observed_host_info\{([^}]*)\}", text)
    assert 'machine="real:n1"' in labels
    assert 'source="meminfo-estimate"' in labels
    (value,) = re.findall(
        r'foliod_memmap_bytes\{machine="real:n1",model="struct_page"\} (\S+)', text
    )
    assert float(value) == nr_frames * 64


def test_the_fallback_needs_a_readable_meminfo(
    make_server: ServerFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With neither kpageflags nor meminfo readable the fallback cannot start either, and says
    which file it could not read."""
    _unreadable("missing", tmp_path, monkeypatch)
    missing = tmp_path / "meminfo"
    monkeypatch.setattr("foliod.rpc.observe.MEMINFO", missing)
    with pytest.raises(ObserveUnavailable, match=f"cannot read {re.escape(str(missing))}"):
        make_server(observe_host=True, observe_fallback="meminfo")


def test_kpageflags_scans_are_labelled_kpageflags(
    make_server: ServerFactory, synthetic: kpf.HostObservation
) -> None:
    """A readable kpageflags is scanned, fallback or not, and labelled so."""
    server = make_server(
        observe_host=True, observe_fallback="meminfo", observe_interval_seconds=0.0
    )
    chan, stub = connect(server)
    with chan:
        memmap = stub.GetMemmap(pb.GetMemmapRequest(machine=synthetic.name))
        assert (memmap.source, memmap.ram_bytes) == ("kpageflags", 34 * 4096)


@live
def test_a_scan_lets_other_threads_run() -> None:
    """A thread ticking every millisecond keeps ticking while a full scan runs: the scan reads
    and classifies in chunks, releasing the GIL between them, so RPC threads are served. (How
    long the worst stall is, is a figure for the benchmark, benchmarks/bench_observe.py, not a
    bound here: this machine is shared.)"""
    import threading  # noqa: PLC0415

    ticks = 0
    done = threading.Event()
    started = threading.Event()

    def tick() -> None:
        nonlocal ticks
        started.set()
        while not done.is_set():
            time.sleep(0.001)
            ticks += 1

    ticker = threading.Thread(target=tick)
    ticker.start()
    started.wait()
    try:
        before = ticks
        kpf.scan_kpageflags()
        during = ticks - before
    finally:
        done.set()
        ticker.join()
    # A scan holding the GIL throughout would let the ticker through about once; here it
    # ticks hundreds of times (one per millisecond of a scan of about a second).
    assert during >= 20, during
