"""Estimating a real host's folios from /proc/meminfo alone (fs/proc/meminfo.c): what
`foliod --observe-host --observe-fallback meminfo` serves when /proc/kpageflags cannot be read.

/proc/meminfo is readable by anyone. It says how much memory each use holds, not in which
folios, so the estimate is a Scan (foliod.mm.kpageflags) of the following shape, x86-64 with
4 KiB pages:
- frames: MemTotal (totalram_pages: every present frame but the reserved ones, which
  /proc/meminfo does not count; the memmap itself is among them); free: MemFree (the per-cpu
  lists included).
- hugetlb: HugePages_Total folios of Hugepagesize (the default size); what Hugetlb (every size)
  holds beyond them, in folios of x86-64's other size (1 GiB beside a 2 MiB default, 2 MiB
  beside a 1 GiB one).
- anon: AnonHugePages in PMD-size (order 9) folios; the rest of AnonPages (which counts them)
  in order 0.
- file: FileHugePages and ShmemHugePages in order-9 folios; the rest of Cached + Buffers (the
  page cache, shmem, block devices' cache; SwapCached is anon) in order 0.
- slab (Slab), pagetable (PageTables), balloon (Balloon, where the kernel has it): order 0.
- other: what MemTotal holds beyond all these and MemFree, order 0, no descriptor.

Large folios of orders 1 to 8 (mTHP, a file's readahead folios, slab's higher-order pages) are
invisible here and counted as order-0 folios: the estimate has more and smaller folios than the
host, so its descriptors are an upper bound, while its per-frame entries are a lower bound (the
reserved frames are missing).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path

from foliod.mm.huge_memory import HPAGE_PMD_ORDER
from foliod.mm.kpageflags import PAGE_SIZE, HostObservation, ObserveUnavailable, Scan, read_meminfo

MEMINFO = Path("/proc/meminfo")
_PMD_BYTES = PAGE_SIZE << HPAGE_PMD_ORDER
# x86-64's HugeTLB sizes: beside the default one (Hugepagesize), the other.
_OTHER_HUGETLB_BYTES = {2 << 20: 1 << 30, 1 << 30: 2 << 20}


class MeminfoEstimate(HostObservation):
    """An observation whose frames and folios are estimated from /proc/meminfo."""

    source = "meminfo-estimate"

    @property
    def free_frames(self) -> int:
        """MemFree: buddyinfo is not part of the estimate."""
        return self.scan.frames["free"]


def estimate_scan(meminfo: Mapping[str, int]) -> Scan:
    """The Scan /proc/meminfo's values (bytes; counts for HugePages_*) stand for (see the module
    docstring); raises ValueError without MemTotal."""
    if "MemTotal" not in meminfo:
        raise ValueError("no MemTotal, nothing to estimate from")

    def nr_pages(*names: str) -> int:
        return sum(meminfo.get(name, 0) for name in names) // PAGE_SIZE

    folios: dict[tuple[str, int], int] = {}

    def add(kind: str, order: int, count: int) -> None:
        if count > 0:
            folios[kind, order] = folios.get((kind, order), 0) + count

    hugetlb_bytes = meminfo.get("Hugepagesize", 0)
    if hugetlb_bytes >= PAGE_SIZE:
        default = meminfo.get("HugePages_Total", 0)
        add("hugetlb", (hugetlb_bytes // PAGE_SIZE).bit_length() - 1, default)
        other_bytes = _OTHER_HUGETLB_BYTES.get(hugetlb_bytes)
        if other_bytes is not None:
            rest = meminfo.get("Hugetlb", 0) - default * hugetlb_bytes
            add("hugetlb", (other_bytes // PAGE_SIZE).bit_length() - 1, rest // other_bytes)
    anon_thp = meminfo.get("AnonHugePages", 0) // _PMD_BYTES
    add("anon", HPAGE_PMD_ORDER, anon_thp)
    add("anon", 0, nr_pages("AnonPages") - (anon_thp << HPAGE_PMD_ORDER))
    file_thp = (meminfo.get("FileHugePages", 0) + meminfo.get("ShmemHugePages", 0)) // _PMD_BYTES
    add("file", HPAGE_PMD_ORDER, file_thp)
    add("file", 0, nr_pages("Cached", "Buffers") - (file_thp << HPAGE_PMD_ORDER))
    add("slab", 0, nr_pages("Slab"))
    add("pagetable", 0, nr_pages("PageTables"))
    add("balloon", 0, nr_pages("Balloon"))

    scan = Scan(nr_frames=nr_pages("MemTotal"))
    scan.frames["free"] = min(nr_pages("MemFree"), scan.nr_frames)
    used = sum(count << order for (_, order), count in folios.items())
    add("other", 0, scan.nr_frames - scan.frames["free"] - used)
    scan.folios = folios
    for (kind, order), count in folios.items():
        scan.kind_frames[kind] += count << order
        scan.frames["folio"] += count
        scan.frames["tail"] += count * ((1 << order) - 1)
    for kind, count in (("anon", anon_thp), ("file", file_thp)):
        if count:
            scan.thp_frames[kind] = count << HPAGE_PMD_ORDER
    return scan


def estimate_host(path: Path = MEMINFO, *, hostname: str = "") -> MeminfoEstimate:
    """This host, named real:<hostname>, estimated from path; raises ObserveUnavailable if path
    cannot be read or has no MemTotal."""
    started = time.perf_counter()
    try:
        meminfo = read_meminfo(path)
        scan = estimate_scan(meminfo)
    except OSError as exc:
        raise ObserveUnavailable(f"cannot read {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise ObserveUnavailable(f"{path} is not /proc/meminfo: {exc}") from None
    scan.seconds = time.perf_counter() - started
    return MeminfoEstimate.taken(scan, meminfo, hostname=hostname)
