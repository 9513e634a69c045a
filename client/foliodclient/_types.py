"""What the client's calls return: frozen dataclasses named and shaped like the API's messages.

A field has the name of the message field it comes from, so _convert reads every message by the
type hints here alone. Sizes are ``*_bytes`` or ``nr_*`` (4 KiB pages), as in the API.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from foliod.api import Backing, FolioKind, MemmapModel, ThpSetting


@dataclass(frozen=True, slots=True)
class Allocation:
    """Folios of one Allocate call: handles first_handle .. first_handle + count - 1."""

    first_handle: int
    count: int
    nr_pages: int
    folios_by_order: Mapping[int, int]
    nr_pagetable_pages: int

    @property
    def handles(self) -> range:
        return range(self.first_handle, self.first_handle + self.count)


@dataclass(frozen=True, slots=True)
class FreeResult:
    """Pages a Free returned to the buddy allocator, page tables included."""

    nr_pages: int
    nr_pagetable_pages: int


@dataclass(frozen=True, slots=True)
class ReleaseResult:
    """Folios and pages a ReleaseOwner freed."""

    folios: int
    nr_pages: int


@dataclass(frozen=True, slots=True)
class FolioInfo:
    handle: int
    pfn: int
    order: int
    kind: FolioKind
    owner: str
    size_bytes: int
    virtual_address: int
    pmd_mapped: bool


@dataclass(frozen=True, slots=True)
class Watermarks:
    nr_min: int
    nr_low: int
    nr_high: int
    min_free_kbytes: int


@dataclass(frozen=True, slots=True)
class MachineInfo:
    name: str
    ram_bytes: int
    nr_pages: int
    nr_free_pages: int
    page_size_bytes: int
    max_order: int
    watermarks: Watermarks
    below_low_watermark: bool


@dataclass(frozen=True, slots=True)
class BuddyInfo:
    """Free blocks per order (index = order), as /proc/buddyinfo."""

    zone: str
    free_blocks: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Meminfo:
    """Selected /proc/meminfo fields, in bytes."""

    mem_total_bytes: int
    mem_free_bytes: int
    anon_pages_bytes: int
    anon_huge_pages_bytes: int
    file_pages_bytes: int
    slab_bytes: int
    page_tables_bytes: int
    hugetlb_bytes: int
    memmap_bytes: int
    cached_bytes: int
    dirty_bytes: int
    active_file_bytes: int
    inactive_file_bytes: int
    writeback_bytes: int


@dataclass(frozen=True, slots=True)
class DescriptorBytes:
    descriptor: str
    size_bytes: int
    count: int
    total_bytes: int


@dataclass(frozen=True, slots=True)
class KindBytes:
    kind: FolioKind
    total_bytes: int


@dataclass(frozen=True, slots=True)
class ModelReport:
    model: MemmapModel
    total_bytes: int
    fraction_of_ram: float
    breakdown: tuple[DescriptorBytes, ...]
    by_kind: tuple[KindBytes, ...]
    free_memory_bytes: int
    hvo_freed_bytes: int


@dataclass(frozen=True, slots=True)
class FolioCount:
    kind: FolioKind
    order: int
    folios: int
    nr_pages: int


@dataclass(frozen=True, slots=True)
class MemmapReport:
    """The memory map under the three models (struct_page, interim, memdesc) and the folios."""

    machine: str
    ram_bytes: int
    models: tuple[ModelReport, ...]
    folios: tuple[FolioCount, ...]
    # An observed real host's: "kpageflags" or "meminfo-estimate"; empty when simulated.
    source: str


@dataclass(frozen=True, slots=True)
class MthpSize:
    size_kb: int
    order: int
    enabled: ThpSetting
    anon_fault_alloc: int
    anon_fault_fallback: int
    split: int
    split_failed: int
    nr_anon: int


@dataclass(frozen=True, slots=True)
class ThpPolicy:
    enabled: ThpSetting
    sizes: tuple[MthpSize, ...]


@dataclass(frozen=True, slots=True)
class FileStat:
    name: str
    size_bytes: int
    nr_cached: int
    nr_dirty: int
    folios_by_order: Mapping[int, int]
    max_order: int
    ra_pages: int
    open_handles: int


@dataclass(frozen=True, slots=True)
class IoStats:
    """What one read or write did in the page cache, the simulated device time it cost and the
    simulated time balance_dirty_pages paused the writer for."""

    pages_hit: int
    pages_missed: int
    pages_readahead: int
    device_seconds: float
    throttle_seconds: float = 0.0


@dataclass(frozen=True, slots=True)
class FileRead:
    data: bytes
    stats: IoStats


@dataclass(frozen=True, slots=True)
class FileWrite:
    written_bytes: int
    stats: IoStats


@dataclass(frozen=True, slots=True)
class MemmapTotal:
    """The memory map's bytes under one model."""

    model: MemmapModel
    total_bytes: int


@dataclass(frozen=True, slots=True)
class ReplayTotals:
    """What a stretch of a replayed trace did: operations, page accesses, the page-cache stats
    of every operation and of the reads alone, folios reclaimed (pgsteal), refaults of evicted
    pages, the server's time running it, and the page cache and memory map at its end."""

    operations: int
    accesses: int
    stats: IoStats
    read_stats: IoStats
    evictions: int
    refaults: int
    elapsed_seconds: float
    nr_cached: int
    memmap: tuple[MemmapTotal, ...]


@dataclass(frozen=True, slots=True)
class ReplayResult:
    """A Replay call's totals and its per-interval series."""

    totals: ReplayTotals
    intervals: tuple[ReplayTotals, ...]


@dataclass(frozen=True, slots=True)
class FaultRule:
    """A backing-store fault: writes to `name` overlapping [offset, offset + length) fail or stall.

    `errno` is "EIO", "ENOSPC", or "" for a rule that only delays; `count` and `probability`
    left None mean every matching write; `injected` is output only.
    """

    errno: str = ""
    name: str = ""
    offset: int = 0
    length: int = 0
    count: int | None = None
    probability: float | None = None
    delay_ms: int = 0
    injected: int = 0


@dataclass(frozen=True, slots=True)
class Faults:
    rules: tuple[FaultRule, ...]
    seed: int


@dataclass(frozen=True, slots=True)
class Duplication:
    """One model's cost of describing a guest's RAM twice: in the guest's memmap and in the
    host's (per-frame entries less what HVO freed, plus the backing folios' descriptors)."""

    model: MemmapModel
    guest_memmap_bytes: int
    host_memmap_bytes: int
    total_bytes: int
    fraction_of_guest_ram: float


@dataclass(frozen=True, slots=True)
class Guest:
    """A guest machine: its RAM, the host memory backing it, balloon, free page reporting, and
    the memmap duplication per model (struct_page, interim, memdesc)."""

    name: str
    host: str
    ram_bytes: int
    backing: Backing
    mthp_size_kb: int
    hvo: bool
    lazy: bool
    backed_bytes: int
    host_folios: int
    host_folio_order: int
    balloon_bytes: int
    balloon_returned_bytes: int
    reported_bytes: int
    reporting_batches: int
    reported_blocks: int
    free_page_reporting: bool
    duplication: tuple[Duplication, ...]


@dataclass(frozen=True, slots=True)
class GuestList:
    """Every guest, sorted by name, and the duplication per model summed over them."""

    guests: tuple[Guest, ...]
    totals: tuple[Duplication, ...]


@dataclass(frozen=True, slots=True)
class BalloonResult:
    """What one SetBalloon did, and the guest after it."""

    inflated_bytes: int
    deflated_bytes: int
    balloon_bytes: int
    host_freed_bytes: int
    guest: Guest


@dataclass(frozen=True, slots=True)
class ReportResult:
    """What one free page reporting pass did, and the guest after it."""

    batches: int
    blocks: int
    host_freed_bytes: int
    guest: Guest


@dataclass(frozen=True, slots=True)
class SnapshotInfo:
    """What a snapshot file holds: its source ("simulated" or "kpageflags"), machine, frames,
    free pages, runs, size, and folios by "kind:order"."""

    source: str
    machine: str
    hostname: str
    kernel: str
    nr_frames: int
    nr_free_pages: int
    nr_runs: int
    size_bytes: int
    folios: Mapping[str, int]


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A machine's snapshot: its summary and the file's bytes (save them with write_to)."""

    info: SnapshotInfo
    data: bytes

    def write_to(self, path: str | os.PathLike[str]) -> int:
        """Writes the file; returns its size in bytes."""
        return Path(path).write_bytes(self.data)
