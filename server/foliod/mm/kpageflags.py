"""Observing a real Linux host: classify every physical frame from /proc/kpageflags.

Sources: Documentation/admin-guide/mm/pagemap.rst (the flags), include/uapi/linux/
kernel-page-flags.h (bit numbers), include/linux/kernel-page-flags.h (KPF_RESERVED, bit 32),
fs/proc/page.c (stable_page_flags: which flag is set on which page of a folio), mm/page_alloc.c
(free blocks), tools/mm/page-types.c (the kernel's own reader).

/proc/kpageflags is one little-endian u64 per PFN, a root-owned file of mode 0400 (fs/proc/page.c,
no capability check of its own): uid 0 reads it with no capability at all, any other uid needs
CAP_DAC_READ_SEARCH (or CAP_DAC_OVERRIDE); CAP_SYS_ADMIN alone does not do (measured). It is read in
chunks of CHUNK_FRAMES (2 MiB each), so memory stays bounded whatever the host's size; every
chunk is classified with numpy and the GIL is given up between chunks.

Classification of a frame (first rule that matches, in this order):
- hole: NOPAGE (no struct page at this PFN), or in a memory section (128 MiB) without any
  "System RAM" of /proc/iomem: the kernel reports flags 0, not NOPAGE, for such frames (e.g. the
  PCI hole below 4 GiB on x86 guests), yet has no memmap for them.
- tail: COMPOUND_TAIL; the frame belongs to the folio of the last head before it.
- reserved: RESERVED (bit 32, PG_reserved: memblock-reserved, the kernel image, the memmap).
- free: BUDDY. pagemap.rst says PageBuddy marks only the first frame of a free block; measured
  on 6.18, every frame of a free block carries KPF_BUDDY (5.2 M flagged frames against the
  5.2 M pages /proc/buddyinfo sums to). On a kernel that flags only heads, the other frames
  fall to "other"; the models take free memory from buddyinfo either way (free_frames). The
  block's order is in page_private, which kpageflags does not export: orders come from
  buddyinfo.
- otherwise a folio head (COMPOUND_HEAD, or a single page) whose kind is, first match:
  hugetlb (HUGE), slab (SLAB), pagetable (PGTABLE), balloon (OFFLINE: pages a balloon driver or
  memory offlining took), anon (ANON, also KSM), file (LRU, MMAP or SWAPCACHE without ANON:
  page cache and shmem), zero (ZERO_PAGE: the huge zero folio), other (none of these: kernel
  allocations without a page type: vmalloc, stacks, per-cpu free lists, drivers).
A folio's order is log2 of the run of its head and the tails after it.

What kpageflags cannot tell: the order of a free block (use buddyinfo), whether a flag-less
frame is a free page on a per-cpu list or a kernel allocation, which file or
process owns a folio, and a consistent snapshot (frames change while they are read; runs that
are not a power of two or tails without a head are counted as inconsistent).
"""

from __future__ import annotations

import os
import platform
import re
import socket
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Self

import numpy as np
import numpy.typing as npt

from foliod.mm.memmap import DescriptorSizes, ModelCost, memmap_report
from foliod.mm.mm_types import FolioKind

KPAGEFLAGS = Path("/proc/kpageflags")
PAGE_SIZE = 4096
# Frames per read: 256 Ki frames = 2 MiB of flags (1 GiB of RAM). A power of two, so naturally
# aligned folios up to order 18 (1 GiB HugeTLB) never straddle two chunks (the carry below
# handles any that would). Measured on 2 cores: the worst pause another Python thread sees is
# 4 ms with this size, 21 ms with 1 Mi frames; the scan is no slower.
CHUNK_FRAMES = 1 << 18
# A SPARSEMEM memory section: 128 MiB on x86-64 and arm64 with 4 KiB pages (SECTION_SIZE_BITS 27).
SECTION_FRAMES = 1 << 15

# include/uapi/linux/kernel-page-flags.h
KPF_LOCKED = 0
KPF_ERROR = 1
KPF_REFERENCED = 2
KPF_UPTODATE = 3
KPF_DIRTY = 4
KPF_LRU = 5
KPF_ACTIVE = 6
KPF_SLAB = 7
KPF_WRITEBACK = 8
KPF_RECLAIM = 9
KPF_BUDDY = 10
KPF_MMAP = 11
KPF_ANON = 12
KPF_SWAPCACHE = 13
KPF_SWAPBACKED = 14
KPF_COMPOUND_HEAD = 15
KPF_COMPOUND_TAIL = 16
KPF_HUGE = 17
KPF_UNEVICTABLE = 18
KPF_HWPOISON = 19
KPF_NOPAGE = 20
KPF_KSM = 21
KPF_THP = 22
KPF_OFFLINE = 23
KPF_ZERO_PAGE = 24
KPF_IDLE = 25
KPF_PGTABLE = 26
# include/linux/kernel-page-flags.h ("kernel hacking assistances"), exported all the same.
KPF_RESERVED = 32

# Frame classes (one per frame) and folio kinds (one per head).
CLASSES = ("hole", "reserved", "free", "folio", "tail", "orphan_tail")
KINDS = ("hugetlb", "slab", "pagetable", "balloon", "anon", "file", "zero", "other")
_K = {name: i for i, name in enumerate(KINDS)}
# The simulator's kinds; zero and other have no descriptor of their own in the models.
KIND_TO_FOLIO_KIND = {
    "anon": FolioKind.ANON,
    "file": FolioKind.FILE,
    "slab": FolioKind.SLAB,
    "pagetable": FolioKind.PAGETABLE,
    "hugetlb": FolioKind.HUGETLB,
    "balloon": FolioKind.BALLOON,
}

U64Array = npt.NDArray[np.uint64]


def _bit(n: int) -> np.uint64:
    return np.uint64(1 << n)


class ObserveUnavailable(RuntimeError):
    """The host cannot be observed (no kpageflags, or no permission to read it)."""


@dataclass
class Scan:
    """What one scan of kpageflags found."""

    nr_frames: int = 0
    frames: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CLASSES, 0))
    # Frames per folio kind (heads and their tails).
    kind_frames: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    # Folios per (kind, order).
    folios: dict[tuple[str, int], int] = field(default_factory=dict)
    # Frames of folios carrying THP (large anon or LRU folios, fs/proc/page.c), by kind.
    thp_frames: dict[str, int] = field(default_factory=dict)
    # Head + tail runs that are not a power of two (the folio changed while being read).
    inconsistent_runs: int = 0
    seconds: float = 0.0

    @property
    def present_frames(self) -> int:
        """Frames with a struct page: everything but holes."""
        return self.nr_frames - self.frames["hole"]

    def add_folios(self, kinds: npt.NDArray[np.int8], runs: npt.NDArray[np.int64]) -> None:
        if not len(runs):
            return
        orders = np.zeros(len(runs), np.int64)
        ok = runs > 0
        orders[ok] = np.floor(np.log2(runs[ok])).astype(np.int64)
        self.inconsistent_runs += int(np.count_nonzero((runs & (runs - 1)) != 0))
        key = kinds.astype(np.int64) * 64 + orders
        values, counts = np.unique(key, return_counts=True)
        for value, count in zip(values.tolist(), counts.tolist(), strict=True):
            name = KINDS[value // 64]
            self.folios[name, value % 64] = self.folios.get((name, value % 64), 0) + count
        frames = np.bincount(kinds.astype(np.int64), weights=runs, minlength=len(KINDS))
        for i, name in enumerate(KINDS):
            self.kind_frames[name] += int(frames[i])

    def folio_counts(self) -> dict[tuple[FolioKind, int], int]:
        """Folios per (simulator kind, order): what the memmap models take."""
        counts: dict[tuple[FolioKind, int], int] = {}
        for (name, order), n in self.folios.items():
            kind = KIND_TO_FOLIO_KIND.get(name)
            if kind is not None:
                counts[kind, order] = counts.get((kind, order), 0) + n
        return counts

    def as_dict(self) -> dict[str, Any]:
        return {
            "nr_frames": self.nr_frames,
            "present_frames": self.present_frames,
            "frames": dict(self.frames),
            "kind_frames": dict(self.kind_frames),
            "folios": {f"{k}:{o}": n for (k, o), n in sorted(self.folios.items())},
            "thp_frames": dict(self.thp_frames),
            "inconsistent_runs": self.inconsistent_runs,
            "seconds": round(self.seconds, 3),
        }


def kinds_of(flags: U64Array) -> npt.NDArray[np.int8]:
    """The kind (index into KINDS) of each head's flags, first matching rule."""
    kinds = np.full(len(flags), _K["other"], np.int8)

    def has(bit: int) -> npt.NDArray[np.bool_]:
        mask: npt.NDArray[np.bool_] = (flags & _bit(bit)) != 0
        return mask

    file_like = (has(KPF_LRU) | has(KPF_MMAP) | has(KPF_SWAPCACHE)) & ~has(KPF_ANON)
    # Lowest priority first, so that later (higher priority) rules overwrite.
    for name, mask in (
        ("zero", has(KPF_ZERO_PAGE)),
        ("file", file_like),
        ("anon", has(KPF_ANON)),
        ("balloon", has(KPF_OFFLINE)),
        ("pagetable", has(KPF_PGTABLE)),
        ("slab", has(KPF_SLAB)),
        ("hugetlb", has(KPF_HUGE)),
    ):
        kinds[mask] = _K[name]
    return kinds


class Classifier:
    """Classifies consecutive chunks of kpageflags, carrying a folio across chunk ends;
    ram_ranges (first, last PFN inclusive), when given, makes every frame of a memory section
    without RAM a hole: SPARSEMEM allocates the memmap per section, so the frames around RAM
    inside a section have a struct page and count (measured: the frames the scan finds present
    are exactly nr_memmap_boot_pages x 64 in /proc/vmstat)."""

    def __init__(
        self,
        ram_ranges: Iterable[tuple[int, int]] | None = None,
        section_frames: int = SECTION_FRAMES,
    ) -> None:
        self.scan = Scan()
        self._ram = (
            None
            if ram_ranges is None
            else [
                (
                    first // section_frames * section_frames,
                    (last // section_frames + 1) * section_frames - 1,
                )
                for first, last in sorted(ram_ranges)
            ]
        )
        # The last head of the previous chunk whose tails reached its end: kind, run so far.
        self._carry: tuple[int, int] | None = None

    def feed(self, flags: U64Array) -> None:
        scan = self.scan
        n = len(flags)
        scan.nr_frames += n
        if not n:
            return
        hole = (flags & _bit(KPF_NOPAGE)) != 0
        if self._ram is not None:
            base = scan.nr_frames - n
            ram = np.zeros(n, np.bool_)
            for first, last in self._ram:
                lo, hi = max(first - base, 0), min(last + 1 - base, n)
                if lo < hi:
                    ram[lo:hi] = True
            hole |= ~ram
        tail = ((flags & _bit(KPF_COMPOUND_TAIL)) != 0) & ~hole
        reserved = ((flags & _bit(KPF_RESERVED)) != 0) & ~hole & ~tail
        buddy = ((flags & _bit(KPF_BUDDY)) != 0) & ~hole & ~tail & ~reserved
        head = ~(hole | tail | reserved | buddy)
        scan.frames["hole"] += int(np.count_nonzero(hole))
        scan.frames["reserved"] += int(np.count_nonzero(reserved))
        scan.frames["free"] += int(np.count_nonzero(buddy))
        # Every frame that is not a tail starts a run; a head's run is its folio, the tails
        # after anything else (hole, reserved, free) have no head: orphans.
        starts = np.flatnonzero(~tail)
        lead = int(starts[0]) if len(starts) else n
        tails = int(np.count_nonzero(tail))
        orphans = 0
        if self._carry is None:
            orphans += lead
        elif lead:
            kind, run = self._carry
            self._carry = (kind, run + lead)
        if len(starts) and self._carry is not None:
            kind, run = self._carry
            scan.add_folios(np.array([kind], np.int8), np.array([run], np.int64))
            self._carry = None
        if len(starts):
            ends = np.empty_like(starts)
            ends[:-1] = starts[1:]
            ends[-1] = n
            runs = (ends - starts).astype(np.int64)
            is_head = head[starts]
            orphans += int(np.sum(runs[~is_head] - 1))
            kinds = kinds_of(flags[starts[is_head]])
            head_runs = runs[is_head]
            scan.frames["folio"] += len(head_runs)
            if is_head[-1]:
                # The last folio may go on in the next chunk.
                self._carry = (int(kinds[-1]), int(head_runs[-1]))
                kinds, head_runs = kinds[:-1], head_runs[:-1]
            else:
                self._carry = None
            scan.add_folios(kinds, head_runs)
        scan.frames["tail"] += tails - orphans
        scan.frames["orphan_tail"] += orphans
        thp = (flags & _bit(KPF_THP)) != 0
        if np.any(thp):
            # THP frames by the kind of their own flags (tails carry the folio's flags).
            thp_kinds = kinds_of(flags[thp & ~hole])
            counts = np.bincount(thp_kinds.astype(np.int64), minlength=len(KINDS))
            for i, name in enumerate(KINDS):
                if counts[i]:
                    scan.thp_frames[name] = scan.thp_frames.get(name, 0) + int(counts[i])

    def finish(self) -> Scan:
        if self._carry is not None:
            kind, run = self._carry
            self.scan.add_folios(np.array([kind], np.int8), np.array([run], np.int64))
            self._carry = None
        return self.scan


def classify(
    flags: U64Array,
    chunk_frames: int = CHUNK_FRAMES,
    ram_ranges: Iterable[tuple[int, int]] | None = None,
) -> Scan:
    """Classifies an in-memory array of kpageflags words, chunk by chunk."""
    classifier = Classifier(ram_ranges)
    for start in range(0, len(flags), chunk_frames):
        classifier.feed(flags[start : start + chunk_frames])
    return classifier.finish()


def check_readable(path: Path = KPAGEFLAGS) -> None:
    """Raises ObserveUnavailable, naming the file and the capability, unless path is readable."""
    try:
        with open(path, "rb", buffering=0) as handle:
            handle.read(8)
    except FileNotFoundError:
        raise ObserveUnavailable(
            f"{path} does not exist: the kernel has no /proc/kpageflags (CONFIG_PROC_PAGE_MONITOR)"
        ) from None
    except PermissionError:
        raise ObserveUnavailable(
            f"cannot read {path}: permission denied; the file is root's, mode 0400: run as "
            "uid 0 (no capability needed) or give this uid CAP_DAC_READ_SEARCH "
            "(CAP_SYS_ADMIN does not help)"
        ) from None
    except OSError as exc:
        raise ObserveUnavailable(f"cannot read {path}: {exc.strerror}") from None


def read_chunks(
    path: Path, chunk_frames: int, between_chunks: Callable[[], None] | None = None
) -> Iterator[npt.NDArray[np.uint64]]:
    """path's 64-bit flags, chunk_frames of them at a time in one reused buffer (use each
    chunk before asking for the next); calls between_chunks (default: yield the GIL) after
    each chunk."""
    pause = between_chunks or (lambda: time.sleep(0))
    buffer = np.empty(chunk_frames, np.uint64)
    view = buffer.data.cast("B")
    with open(path, "rb", buffering=0) as handle:
        while True:
            got = 0
            while got < len(view):
                n = handle.readinto(view[got:])
                if not n:
                    break
                got += n
            if got // 8:
                yield buffer[: got // 8]
            pause()
            if got < len(view):
                return


def scan_kpageflags(
    path: Path = KPAGEFLAGS,
    chunk_frames: int = CHUNK_FRAMES,
    *,
    between_chunks: Callable[[], None] | None = None,
    ram_ranges: Iterable[tuple[int, int]] | None = None,
) -> Scan:
    """Reads and classifies path chunk by chunk (8 bytes x chunk_frames of memory); calls
    between_chunks (default: yield the GIL) after each chunk."""
    started = time.perf_counter()
    classifier = Classifier(ram_ranges)
    for chunk in read_chunks(path, chunk_frames, between_chunks):
        classifier.feed(chunk)
    scan = classifier.finish()
    scan.seconds = time.perf_counter() - started
    return scan


# -- the rest of /proc and /sys ------------------------------------------------------------


def read_ram_ranges(path: Path = Path("/proc/iomem")) -> list[tuple[int, int]] | None:
    """PFN ranges (first, last) of top-level "System RAM" in /proc/iomem; None when the file
    hides addresses (not root: every address reads as zero) or cannot be read."""
    try:
        text = path.read_text()
    except OSError:
        return None
    ranges = []
    for line in text.splitlines():
        if line.startswith(" "):
            continue
        span, _, name = line.partition(" : ")
        if name.strip() != "System RAM":
            continue
        start, _, end = span.partition("-")
        first, last = int(start, 16), int(end, 16)
        # Partial pages at a range's ends still have a struct page.
        ranges.append((first // PAGE_SIZE, last // PAGE_SIZE))
    if not ranges or all(last == 0 for _, last in ranges):
        return None
    return ranges


def read_memory_blocks(
    root: Path = Path("/sys/devices/system/memory"),
) -> list[tuple[int, int]] | None:
    """PFN ranges (first, last) of the present memory blocks in sysfs (drivers/base/memory.c;
    block_size_bytes is a multiple of the section size), readable without privileges, unlike
    /proc/iomem's addresses (CAP_SYS_ADMIN); None without memory hotplug's sysfs."""
    try:
        block_frames = int((root / "block_size_bytes").read_text().strip(), 16) // PAGE_SIZE
        ids = sorted(
            int(entry.name.removeprefix("memory"))
            for entry in root.iterdir()
            if entry.name.removeprefix("memory").isdigit()
        )
    except (OSError, ValueError):
        return None
    return [(i * block_frames, (i + 1) * block_frames - 1) for i in ids] or None


def read_meminfo(path: Path = Path("/proc/meminfo")) -> dict[str, int]:
    """/proc/meminfo in bytes (kB fields) or counts (HugePages_*)."""
    values = {}
    for line in path.read_text().splitlines():
        name, _, rest = line.partition(":")
        parts = rest.split()
        if parts:
            values[name.strip()] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    return values


def read_buddyinfo(path: Path = Path("/proc/buddyinfo")) -> dict[str, list[int]]:
    """Free blocks per order, by "node N zone NAME"."""
    zones = {}
    for line in path.read_text().splitlines():
        match = re.match(r"Node\s+(\d+),\s+zone\s+(\S+)\s+(.*)", line)
        if match:
            zones[f"node{match.group(1)}/{match.group(2)}"] = [
                int(x) for x in match.group(3).split()
            ]
    return zones


def buddy_totals(zones: Mapping[str, Iterable[int]]) -> list[int]:
    """Free blocks per order summed over zones."""
    totals: list[int] = []
    for blocks in zones.values():
        for order, count in enumerate(blocks):
            if order == len(totals):
                totals.append(0)
            totals[order] += count
    return totals


def read_watermarks(
    zoneinfo: Path = Path("/proc/zoneinfo"),
    min_free_kbytes: Path = Path("/proc/sys/vm/min_free_kbytes"),
) -> tuple[int, int, int, int]:
    """Zone watermarks min, low, high in pages summed over zones, and vm.min_free_kbytes."""
    marks = {"min": 0, "low": 0, "high": 0}
    try:
        for line in zoneinfo.read_text().splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[0] in marks and parts[1].isdigit():
                marks[parts[0]] += int(parts[1])
        kbytes = int(min_free_kbytes.read_text().strip())
    except (OSError, ValueError):
        kbytes = 0
    return marks["min"], marks["low"], marks["high"], kbytes


def read_vmstat(path: Path = Path("/proc/vmstat")) -> dict[str, int]:
    values = {}
    for line in path.read_text().splitlines():
        name, _, value = line.partition(" ")
        if value.strip().lstrip("-").isdigit():
            values[name] = int(value)
    return values


def read_mthp_stats(root: Path = Path("/sys/kernel/mm/transparent_hugepage")) -> dict[str, Any]:
    """Per-size mTHP knobs and counters (hugepages-<N>kB/enabled and stats/*)."""
    sizes: dict[str, Any] = {}
    for directory in sorted(root.glob("hugepages-*kB")):
        entry: dict[str, Any] = {}
        try:
            enabled = (directory / "enabled").read_text()
            chosen = re.search(r"\[(\w+)\]", enabled)
            entry["enabled"] = chosen.group(1) if chosen else enabled.strip()
            for stat in sorted((directory / "stats").glob("*")):
                entry[stat.name] = int(stat.read_text().strip())
        except (OSError, ValueError):
            pass
        sizes[directory.name.removeprefix("hugepages-")] = entry
    return sizes


def hugetlb_vmemmap_optimized(path: Path = Path("/proc/sys/vm/hugetlb_optimize_vmemmap")) -> bool:
    try:
        return path.read_text().strip() == "1"
    except OSError:
        return False


@dataclass(frozen=True)
class Virtualization:
    """Whether the host is a virtual machine, and what says so."""

    guest: bool
    hypervisor_flag: bool
    sys_vendor: str
    product_name: str


def detect_virtualization(
    cpuinfo: Path = Path("/proc/cpuinfo"), dmi: Path = Path("/sys/class/dmi/id")
) -> Virtualization:
    """The hypervisor CPUID bit (x86 "hypervisor" flag) and the DMI system vendor."""

    def read(path: Path) -> str:
        try:
            return path.read_text().strip()
        except OSError:
            return ""

    flag = False
    for line in read(cpuinfo).splitlines():
        if line.startswith("flags"):
            flag = "hypervisor" in line.split(":", 1)[1].split()
            break
    vendor, product = read(dmi / "sys_vendor"), read(dmi / "product_name")
    known = ("QEMU", "KVM", "VMware", "Xen", "Microsoft Corporation", "Amazon EC2", "Google")
    by_dmi = any(name.lower() in f"{vendor} {product}".lower() for name in known)
    return Virtualization(flag or by_dmi, flag, vendor, product)


@dataclass
class HostObservation:
    """One observation of a real host: the scan and what /proc said around it."""

    # Where the scan's frames and folios come from (foliod.mm.meminfo has the other source).
    source: ClassVar[str] = "kpageflags"

    name: str
    kernel: str
    scan: Scan
    meminfo: dict[str, int]
    buddyinfo: dict[str, list[int]]
    vmstat: dict[str, int]
    mthp: dict[str, Any]
    virtualization: Virtualization
    hvo: bool
    taken_at: float

    @classmethod
    def taken(cls, scan: Scan, meminfo: dict[str, int], *, hostname: str = "") -> Self:
        """An observation of this host, named real:<hostname> (default: this host's name), made
        of scan, meminfo and the rest of /proc and /sys read now (none of it privileged)."""
        return cls(
            name=f"real:{hostname or socket.gethostname()}",
            kernel=platform.release(),
            scan=scan,
            meminfo=meminfo,
            buddyinfo=read_buddyinfo(),
            vmstat=read_vmstat(),
            mthp=read_mthp_stats(),
            virtualization=detect_virtualization(),
            hvo=hugetlb_vmemmap_optimized(),
            taken_at=time.time(),
        )

    @property
    def free_frames(self) -> int:
        """Free frames by buddyinfo (kpageflags marks only the first frame of a free block)."""
        return sum(n << order for order, n in enumerate(buddy_totals(self.buddyinfo)))

    def memmap(self, sizes: DescriptorSizes | None = None) -> tuple[ModelCost, ...]:
        """The three models, by the same arithmetic as a simulated machine (memmap_report):
        one per-frame entry per present frame, one descriptor per folio that has a kind."""
        folio_counts = self.scan.folio_counts()
        hvo = (
            {o: n for (k, o), n in folio_counts.items() if k is FolioKind.HUGETLB}
            if self.hvo
            else None
        )
        return memmap_report(
            self.scan.present_frames,
            self.free_frames,
            folio_counts,
            sizes or DescriptorSizes(),
            PAGE_SIZE,
            hvo_folios=hvo,
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "source": self.source,
            "kernel": self.kernel,
            "virtualization": self.virtualization.__dict__,
            "hugetlb_vmemmap_optimized": self.hvo,
            "free_frames_buddyinfo": self.free_frames,
            "buddyinfo": self.buddyinfo,
            "scan": self.scan.as_dict(),
            "memmap": {
                str(r.model): {
                    "total_bytes": r.total_bytes,
                    "fraction_of_ram": round(r.fraction_of_ram, 6),
                    "breakdown": {str(c.descriptor): c.count for c in r.breakdown},
                }
                for r in self.memmap()
            },
        }


def observe_host(
    path: Path = KPAGEFLAGS,
    *,
    hostname: str = "",
    chunk_frames: int = CHUNK_FRAMES,
    between_chunks: Callable[[], None] | None = None,
) -> HostObservation:
    """Scans this host, named real:<hostname> (default: this host's name); raises
    ObserveUnavailable if kpageflags cannot be read. Sections without RAM come from /proc/iomem,
    or from the memory blocks in sysfs when iomem hides its addresses (no CAP_SYS_ADMIN)."""
    check_readable(path)
    ram_ranges = read_ram_ranges() or read_memory_blocks()
    scan = scan_kpageflags(path, chunk_frames, between_chunks=between_chunks, ram_ranges=ram_ranges)
    return HostObservation.taken(scan, read_meminfo(), hostname=hostname)


def readable() -> bool:
    """Whether this process can read /proc/kpageflags."""
    return os.access(KPAGEFLAGS, os.R_OK) and _try_read()


def _try_read() -> bool:
    try:
        check_readable()
    except ObserveUnavailable:
        return False
    return True


def main() -> int:
    """`python -m foliod.mm.kpageflags`: prints this host's classification and the three models
    as JSON."""
    import json  # noqa: PLC0415
    import sys  # noqa: PLC0415

    try:
        observation = observe_host()
    except ObserveUnavailable as exc:
        print(f"foliod observe: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(observation.as_dict(), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
