"""foliod-calibrate: one access pattern run against the live kernel's page cache and against a
foliod machine set up alike, compared step by step (residency and folio orders).

The kernel side is a temporary file on a real filesystem (``--dir``, on the device whose
``read_ahead_kb`` sets the window), written, fsynced and dropped with POSIX_FADV_DONTNEED, then
read or written with pread/pwrite through one open file (a second descriptor for the patterns
with two handles). After every step:

- residency: mincore() over a fresh shared read-only mapping of the file (mapping faults
  nothing in);
- folios, as root: the resident pages are touched through a mapping of a separate descriptor
  with MADV_RANDOM (VM_RAND_READ: a fault starts no readahead, and the file's own readahead
  state is not the mapping's), their frames read from /proc/self/pagemap and their flags from
  /proc/kpageflags; a folio is a head page (KPF_COMPOUND_HEAD, or a page with neither head nor
  tail bit) and the tails (KPF_COMPOUND_TAIL) on consecutive frames that follow it. Without
  root (no frame numbers in pagemap, no kpageflags) only residency is compared, and the tool
  says so.

The foliod side is a Machine with the same RAM-independent settings: ra_pages from the
device's read_ahead_kb (or --ra-kb), the page cache's largest folio order (--max-order,
MAX_PAGECACHE_ORDER by default as ext4 allows on x86-64), the file written, written back and
dropped (drop_caches: no shadow entries, like FADV_DONTNEED), then the same reads by name (one
open file description, as the kernel's one descriptor) or through handles.

Output: per pattern, each step where either side's cache changed, both sides' cached pages and
the first page where they differ, then the folio orders of the last step; a summary line per
pattern. Exit status 0 when every pattern agrees, 1 when one differs, 2 for a usage error.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import mmap
import os
import random
import struct
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import BinaryIO

from foliod.mm import Machine
from foliod.mm.backing_dev import DEVICE_PROFILES, BackingStore
from foliod.mm.folio_store import MAX_PAGECACHE_ORDER, PG_DIRTY
from foliod.mm.page_alloc import PAGE_SIZE

MIB = 1 << 20
KPF_COMPOUND_HEAD = 1 << 15
KPF_COMPOUND_TAIL = 1 << 16
PM_PRESENT = 1 << 63
PM_PFN_MASK = (1 << 55) - 1
MADV_RANDOM = 1
FILE_NAME = "calibrate.dat"
# cachestat(2) (Linux 6.5+), x86-64 and arm64 alike.
SYS_CACHESTAT = 451
# How long a step's readahead I/O may take to complete before the snapshot is taken anyway.
SETTLE_SECONDS = 0.5


@dataclass(frozen=True, slots=True)
class Step:
    """One access through handle 0 or 1: a read or a write of `length` bytes at `offset`, a
    drop (POSIX_FADV_DONTNEED) of that range, a truncate of the file to `offset` bytes, or an
    fsync."""

    op: str
    offset: int
    length: int
    handle: int = 0


@dataclass(slots=True)
class Snapshot:
    """One side's page cache over the file after a step: resident page indices, and the
    folios as (first page index, order) when known."""

    resident: frozenset[int]
    folios: tuple[tuple[int, int], ...] | None = None


# -- patterns -----------------------------------------------------------------------------------


def _sequential(size: int, io: int, start: int = 0) -> list[Step]:
    return [Step("read", offset, io) for offset in range(start, size, io)]


def _strided(size: int) -> list[Step]:
    return [Step("read", offset, 4096) for offset in range(0, size, 64 * 1024)]


def _backwards(size: int) -> list[Step]:
    return [Step("read", offset, 4096) for offset in range(size - 4096, -1, -4096)][:1024]


def _random(size: int) -> list[Step]:
    rng = random.Random(16)
    return [Step("read", rng.randrange(size // 4096) * 4096, 4096) for _ in range(512)]


def _interleaved(size: int, *, handles: bool) -> list[Step]:
    """Two sequential streams, one from the start and one from the middle, taking turns."""
    half = size // 2
    steps = []
    for offset in range(0, half, 4096):
        steps.append(Step("read", offset, 4096, 0))
        steps.append(Step("read", half + offset, 4096, 1 if handles else 0))
    return steps


def _writes(size: int) -> list[Step]:
    sizes = (3_000_000, 4096, 100, 65536, 1 << 20, 12288, 700_000)
    steps, offset = [], 0
    for n in sizes:
        steps.append(Step("write", offset, n))
        offset += n + 4096 * 3 + 17
    return [s for s in steps if s.offset + s.length <= size]


def _reread_after_drop(size: int) -> list[Step]:
    """The first half read in 64 KiB reads, a range in it dropped (its ends not page-aligned,
    so a partial page stays at each), and the half read again in 4 KiB reads."""
    half = size // 2
    drop = Step("drop", MIB + 5000, half // 2)
    return [*_sequential(half, 65536), drop, *_sequential(half, 4096)]


def _odd_size(size: int) -> int:
    """A file size that is no multiple of any folio's."""
    return size - 2 * MIB - 12345


def _write_over_cached(size: int) -> list[Step]:
    """Pages read alone here and there, then one write across them: the write's folios shrink
    around what is cached."""
    reads = [Step("read", index * 4096, 4096) for index in range(512, 1536, 37)]
    return [*reads, Step("write", 2 * MIB + 777, 3 * MIB)]


def _truncate_split(size: int) -> list[Step]:
    """The first 4 MiB written (two order-9 folios) and synced, then cut shorter and shorter
    inside them: each cut splits the clean folio holding the new end as
    truncate_inode_partial_folio does; then the first 2 MiB written again and cut: a dirty
    folio's split fails and it stays whole."""
    cuts = (3 * MIB + 4096 * 5 + 1, 3 * MIB - 1, 2 * MIB + 12289)
    return [
        Step("write", 0, 4 * MIB),
        Step("fsync", 0, 0),
        *(Step("truncate", cut, 0) for cut in cuts),
        Step("write", 0, 2 * MIB),
        Step("truncate", MIB + 5000, 0),
        Step("fsync", 0, 0),
        Step("truncate", MIB - 1, 0),
        Step("truncate", 12345, 0),
    ]


def _seq_after_random(size: int) -> list[Step]:
    """Pages read alone here and there in the first quarter, then the first half read in 64 KiB
    reads: windows meet cached pages and go on in base pages (page_cache_ra_order's fallback)."""
    rng = random.Random(17)
    pages = size // 4 // 4096
    reads = [Step("read", rng.randrange(pages) * 4096, 4096) for _ in range(64)]
    return [*reads, *_sequential(size // 2, 65536)]


PATTERNS: dict[str, Callable[[int], list[Step]]] = {
    "seq-4k": lambda size: _sequential(size, 4096),
    "seq-64k": lambda size: _sequential(size, 65536),
    "seq-1m": lambda size: _sequential(size, MIB),
    "strided-64k": _strided,
    "backwards": _backwards,
    "random": _random,
    "mid-file": lambda size: _sequential(size, 4096, start=size // 3 // 4096 * 4096)[:1024],
    "interleaved-one-fd": lambda size: _interleaved(size, handles=False)[:2048],
    "interleaved-two-fds": lambda size: _interleaved(size, handles=True)[:2048],
    "writes": _writes,
    "seq-5000": lambda size: _sequential(size // 4, 5000),
    "stride-8k": lambda size: [Step("read", o, 4096) for o in range(0, size // 4, 8192)],
    "reread-after-drop": _reread_after_drop,
    # On a file of _odd_size: windows and folios trimmed at EOF.
    "odd-eof": lambda size: _sequential(size, 65536),
    "write-over-cached": _write_over_cached,
    "seq-after-random": _seq_after_random,
    "truncate-split": _truncate_split,
}
# Patterns run on a file of another size than --size-mib's.
FILE_SIZES: dict[str, Callable[[int], int]] = {"odd-eof": _odd_size}


def pattern_file_size(name: str, size: int) -> int:
    """The size of the file a pattern runs on, for --size-mib's size."""
    sized = FILE_SIZES.get(name)
    return size if sized is None else sized(size)


# -- the live kernel ----------------------------------------------------------------------------


class _Libc:
    def __init__(self) -> None:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_long,
        ]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        libc.syscall.restype = ctypes.c_long
        self.libc = libc

    def cachestat(self, fd: int) -> int | None:
        """Pages of fd's file in the page cache, whether or not their read has completed
        (cachestat(2)); None where the kernel has no cachestat."""
        request = (ctypes.c_uint64 * 2)(0, 0)  # struct cachestat_range: the whole file
        result = (ctypes.c_uint64 * 5)()  # struct cachestat: nr_cache first
        done = self.libc.syscall(
            ctypes.c_long(SYS_CACHESTAT),
            ctypes.c_int(fd),
            ctypes.byref(request),
            ctypes.byref(result),
            ctypes.c_uint(0),
        )
        return None if done != 0 else int(result[0])

    def map(self, fd: int, size: int) -> int:
        addr = self.libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), "mmap failed")
        return int(addr)

    def unmap(self, addr: int, size: int) -> None:
        self.libc.munmap(addr, size)


def can_read_frames() -> bool:
    """Whether this process sees frame numbers in pagemap and may read kpageflags (root)."""
    return os.geteuid() == 0 and os.access("/proc/kpageflags", os.R_OK)


class KernelSide:
    """A file on a real filesystem, read and written through the kernel's page cache."""

    def __init__(self, directory: Path, size: int, *, frames: bool) -> None:
        self.size = size
        self.frames = frames
        self.libc = _Libc()
        self.path = directory / f".foliod-calibrate-{os.getpid()}.dat"
        self.fds = [os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)]
        data = random.Random(5).randbytes(size)
        os.write(self.fds[0], data)
        os.fsync(self.fds[0])
        os.posix_fadvise(self.fds[0], 0, 0, os.POSIX_FADV_DONTNEED)
        self.fds.append(os.open(self.path, os.O_RDONLY))
        # Mappings get a descriptor (and so a readahead state) of their own.
        self.map_fd = os.open(self.path, os.O_RDONLY)

    def close(self) -> None:
        for fd in (*self.fds, self.map_fd):
            os.close(fd)
        self.path.unlink(missing_ok=True)

    def apply(self, step: Step) -> None:
        fd = self.fds[step.handle]
        if step.op == "read":
            os.pread(fd, step.length, step.offset)
        elif step.op == "write":
            os.pwrite(fd, random.Random(step.offset).randbytes(step.length), step.offset)
        elif step.op == "drop":
            os.posix_fadvise(fd, step.offset, step.length, os.POSIX_FADV_DONTNEED)
        elif step.op == "fsync":
            os.fsync(fd)
        else:
            os.ftruncate(fd, step.offset)

    def snapshot(self, *, with_folios: bool) -> Snapshot:
        """The cache after the last step, once the reads it started have completed: mincore
        counts a page only when it is uptodate, and asynchronous readahead may still be in
        flight when the read that started it returns; cachestat counts the pages added, so
        the snapshot waits (up to SETTLE_SECONDS) until mincore sees them all."""
        size = max(self.size, os.fstat(self.fds[0]).st_size)
        addr = self.libc.map(self.map_fd, size)
        try:
            vec = ctypes.create_string_buffer(-(-size // PAGE_SIZE))  # the last page may be partial
            deadline = time.monotonic() + SETTLE_SECONDS
            while True:
                cached = self.libc.cachestat(self.fds[0])
                if self.libc.libc.mincore(addr, size, vec) != 0:
                    raise OSError(ctypes.get_errno(), "mincore failed")
                resident = frozenset(i for i, b in enumerate(vec.raw) if b & 1)
                if cached is None or len(resident) >= cached or time.monotonic() > deadline:
                    break
                time.sleep(0.0002)
            folios = self._folios(addr, size, resident) if with_folios and self.frames else None
        finally:
            self.libc.unmap(addr, size)
        return Snapshot(resident, folios)

    def _folios(
        self, addr: int, size: int, resident: frozenset[int]
    ) -> tuple[tuple[int, int], ...]:
        self.libc.libc.madvise(addr, size, MADV_RANDOM)
        frames: dict[int, tuple[int, int]] = {}
        with (
            open("/proc/self/pagemap", "rb", buffering=0) as pagemap,
            open("/proc/kpageflags", "rb", buffering=0) as kpageflags,
        ):
            # Pages past the end of the file fault with SIGBUS when touched: none is cached.
            in_file = -(-os.fstat(self.map_fd).st_size // PAGE_SIZE)
            for index in sorted(i for i in resident if i < in_file):
                ctypes.string_at(addr + index * PAGE_SIZE, 1)  # maps it; no I/O: it is cached
                pagemap.seek((addr // PAGE_SIZE + index) * 8)
                (entry,) = struct.unpack("<Q", pagemap.read(8))
                if not entry & PM_PRESENT:
                    continue
                pfn = entry & PM_PFN_MASK
                kpageflags.seek(pfn * 8)
                (flags,) = struct.unpack("<Q", kpageflags.read(8))
                frames[index] = (pfn, flags)
            folios = folios_from_frames(frames)
            # A folio reaching past the end of the file (a dirty one truncated) has tails
            # that cannot be touched: its size comes from the frames after its head.
            last = max((i for i in frames if i + 1 == in_file), default=None)
            if last is not None and folios:
                head, order = folios[-1]
                pfn, flags = frames[head]
                if flags & KPF_COMPOUND_HEAD and head + (1 << order) == in_file:
                    nr = compound_nr_pages(kpageflags, pfn)
                    folios = (*folios[:-1], (head, nr.bit_length() - 1))
        return folios


def compound_nr_pages(kpageflags: BinaryIO, head_pfn: int) -> int:
    """Pages of the compound page whose head frame is head_pfn: the head and the tail frames
    right after it, read from /proc/kpageflags."""
    limit = 1 << MAX_PAGECACHE_ORDER
    kpageflags.seek((head_pfn + 1) * 8)
    raw = kpageflags.read(8 * (limit - 1))
    nr = 1
    for (flags,) in struct.iter_unpack("<Q", raw):
        if not flags & KPF_COMPOUND_TAIL:
            break
        nr += 1
    return nr


def folios_from_frames(frames: dict[int, tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    """(first index, order) of each folio, from page index -> (pfn, kpageflags) of resident
    pages: a head (or a page that is neither head nor tail) and the tails on the frames after
    it."""
    out = []
    for index in sorted(frames):
        pfn, flags = frames[index]
        if flags & KPF_COMPOUND_TAIL:
            continue
        n = 1
        if flags & KPF_COMPOUND_HEAD:
            while (
                index + n in frames
                and frames[index + n][1] & KPF_COMPOUND_TAIL
                and frames[index + n][0] == pfn + n
            ):
                n += 1
        out.append((index, n.bit_length() - 1))
    return tuple(out)


# -- foliod -------------------------------------------------------------------------------------


class FoliodSide:
    """A foliod machine with the file, read and written through its page cache."""

    def __init__(self, directory: Path, size: int, *, ra_pages: int, max_order: int) -> None:
        store = BackingStore(directory, DEVICE_PROFILES["nvme"])
        self.machine = Machine("calibrate", 1 << 30, store=store, max_file_order=max_order)
        files = self.machine.files
        files.create(FILE_NAME, ra_pages=ra_pages)
        data = random.Random(5).randbytes(size)
        for offset in range(0, size, 2 * MIB):
            files.write(FILE_NAME, offset, data[offset : offset + 2 * MIB])
        files.writeback(FILE_NAME)
        files.drop_caches()
        self.handles = [0, files.open(FILE_NAME).number]

    def apply(self, step: Step) -> None:
        files = self.machine.files
        if step.op == "read":
            handle = self.handles[step.handle] or None
            files.read(FILE_NAME if handle is None else "", step.offset, step.length, handle)
        elif step.op == "write":
            data = random.Random(step.offset).randbytes(step.length)
            # In pieces that end on 2 MiB boundaries of the file, as generic_perform_write
            # takes a write (the largest folio's size at a time): the folios come out the same.
            pos, end = step.offset, step.offset + step.length
            while pos < end:
                stop = min(end, (pos // (2 * MIB) + 1) * 2 * MIB)
                files.write(FILE_NAME, pos, data[pos - step.offset : stop - step.offset])
                pos = stop
        elif step.op == "drop":
            files.fadvise_dontneed(FILE_NAME, step.offset, step.length)
        elif step.op == "fsync":
            files.writeback(FILE_NAME)
        else:
            files.truncate(FILE_NAME, step.offset)

    def evict(self, pages: frozenset[int]) -> None:
        """Reclaims the folios holding pages (written back first if dirty), leaving shadow
        entries, as the kernel's reclaim would."""
        files = self.machine.files
        inode = files.lookup(FILE_NAME)
        store = files.folio_store
        for index in sorted(pages):
            f = inode.get(index)
            if f < 0:
                continue
            if store.flags[f] & PG_DIRTY:
                files.writeback_folio(f)
            files.evict_folio(f)

    def snapshot(self, *, with_folios: bool) -> Snapshot:
        inode = self.machine.files.lookup(FILE_NAME)
        folios = sorted((index, folio.order) for index, folio in inode.folios.items())
        resident = frozenset(
            i for index, order in folios for i in range(index, index + (1 << order))
        )
        return Snapshot(resident, tuple(folios) if with_folios else None)


# -- the comparison -----------------------------------------------------------------------------


@dataclass(slots=True)
class Row:
    """A step after which either side's cache changed."""

    step: int
    op: str
    offset_page: int
    kernel_pages: int
    foliod_pages: int
    first_difference: int | None


@dataclass(slots=True)
class PatternResult:
    pattern: str
    steps: int
    rows: list[Row] = field(default_factory=list)
    kernel_orders: dict[int, int] = field(default_factory=dict)
    foliod_orders: dict[int, int] = field(default_factory=dict)
    first_divergent_step: int | None = None
    folios_compared: bool = False
    folios_agree: bool = True
    # The kernel's folios after the last step, (first page index, order): what fixtures keep.
    kernel_folios: list[tuple[int, int]] = field(default_factory=list)
    # Pages the kernel's cache lost to something besides the pattern (DAMON's pageout, memory
    # pressure), taken off the foliod side too.
    reclaimed_outside: int = 0
    # Runs it took (calibrate tries again when something else reclaimed pages).
    attempts: int = 1

    @property
    def agrees(self) -> bool:
        return self.first_divergent_step is None and self.folios_agree


def first_difference(a: frozenset[int], b: frozenset[int]) -> int | None:
    """The lowest page index cached on one side only; None when both hold the same pages."""
    differ = a ^ b
    return min(differ) if differ else None


def run_pattern(
    name: str,
    steps: Sequence[Step],
    kernel: KernelSide,
    foliod: FoliodSide,
) -> PatternResult:
    result = PatternResult(name, len(steps))
    before_k: frozenset[int] = frozenset()
    before_f: frozenset[int] = frozenset()
    for number, step in enumerate(steps):
        kernel.apply(step)
        foliod.apply(step)
        k = kernel.snapshot(with_folios=False).resident
        gone = before_k - k
        if step.op == "drop":
            gone -= frozenset(
                range(step.offset // PAGE_SIZE, -(-(step.offset + step.length) // PAGE_SIZE))
            )
        elif step.op == "truncate":
            gone = frozenset(i for i in gone if i < -(-step.offset // PAGE_SIZE))
        if gone:
            # Reclaimed from outside: both sides go on from the same cache.
            foliod.evict(gone)
            result.reclaimed_outside += len(gone)
        f = foliod.snapshot(with_folios=False).resident
        if k != before_k or f != before_f:
            diff = first_difference(k, f)
            result.rows.append(Row(number, step.op, step.offset // PAGE_SIZE, len(k), len(f), diff))
            if diff is not None and result.first_divergent_step is None:
                result.first_divergent_step = number
        before_k, before_f = k, f
    k_last, f_last = kernel.snapshot(with_folios=True), foliod.snapshot(with_folios=True)
    result.foliod_orders = dict(sorted(Counter(o for _, o in f_last.folios or ()).items()))
    if k_last.folios is not None:
        result.folios_compared = True
        result.kernel_orders = dict(sorted(Counter(o for _, o in k_last.folios).items()))
        result.folios_agree = k_last.folios == f_last.folios
        result.kernel_folios = list(k_last.folios)
    return result


def calibrate(
    names: Sequence[str],
    directory: Path,
    size: int,
    *,
    ra_pages: int,
    max_order: int,
    frames: bool,
    retries: int = 2,
) -> Iterator[PatternResult]:
    """Runs each pattern on a fresh file on each side; a run during which something else
    reclaimed the kernel's pages is tried again, up to retries times (the last run counts)."""
    for name in names:
        attempts = 0
        while True:
            attempts += 1
            result = _run_once(
                name, directory, size, ra_pages=ra_pages, max_order=max_order, frames=frames
            )
            if not result.reclaimed_outside or attempts > retries:
                break
        result.attempts = attempts
        yield result


def _run_once(
    name: str, directory: Path, size: int, *, ra_pages: int, max_order: int, frames: bool
) -> PatternResult:
    file_size = pattern_file_size(name, size)
    steps = PATTERNS[name](file_size)
    kernel = KernelSide(directory, file_size, frames=frames)
    try:
        with tempfile.TemporaryDirectory(prefix="foliod-calibrate-") as store:
            foliod = FoliodSide(Path(store), file_size, ra_pages=ra_pages, max_order=max_order)
            return run_pattern(name, steps, kernel, foliod)
    finally:
        kernel.close()


def device_read_ahead_kb(directory: Path) -> int | None:
    """read_ahead_kb of the block device holding directory, from sysfs (None if unknown)."""
    try:
        dev = os.stat(directory).st_dev
        queue = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}")
        for candidate in (queue / "queue", queue / ".." / "queue"):
            path = candidate / "read_ahead_kb"
            if path.exists():
                return int(path.read_text())
    except (OSError, ValueError):
        return None
    return None


def _print(result: PatternResult, *, verbose: bool) -> None:
    print(f"== {result.pattern}: {result.steps} steps")
    if verbose or not result.agrees:
        print(
            f"  {'step':>6} {'op':5} {'at page':>8} {'kernel':>8} {'foliod':>8}  first difference"
        )
        for row in result.rows[:60]:
            mark = "" if row.first_difference is None else f"page {row.first_difference}"
            print(
                f"  {row.step:6d} {row.op:5} {row.offset_page:8d} {row.kernel_pages:8d} "
                f"{row.foliod_pages:8d}  {mark}"
            )
        if len(result.rows) > 60:
            print(f"  ... {len(result.rows) - 60} more rows")
    if result.folios_compared:
        print(f"  folio orders at the end: kernel {result.kernel_orders}")
        print(f"                           foliod {result.foliod_orders}")
    verdict = "agrees" if result.agrees else "DIFFERS"
    where = (
        ""
        if result.first_divergent_step is None
        else f" (residency first differs after step {result.first_divergent_step})"
    )
    folios = "" if result.folios_agree else " (folios differ)"
    print(f"  {verdict}{where}{folios}")
    if result.reclaimed_outside:
        print(
            f"  {result.reclaimed_outside} pages were reclaimed from the kernel's cache by "
            "something else (see the warning above); foliod evicted them too"
        )


def outside_reclaimers() -> list[str]:
    """What else may reclaim page cache here while a pattern runs: DAMON contexts with a
    pageout scheme (the kernel's proactive reclaim; some virtual machines run one)."""
    found = []
    for kdamond in sorted(Path("/sys/kernel/mm/damon/admin/kdamonds").glob("[0-9]*")):
        try:
            if (kdamond / "state").read_text().strip() != "on":
                continue
            for scheme in sorted(kdamond.glob("contexts/*/schemes/[0-9]*")):
                if (scheme / "action").read_text().strip() == "pageout":
                    age = (scheme / "access_pattern/age/min").read_text().strip()
                    found.append(
                        f"DAMON kdamond {kdamond.name} pageout (min age {age} aggregations)"
                    )
        except OSError:
            continue
    return found


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="foliod-calibrate",
        description="Compares foliod's page cache with the live kernel's, step by step.",
    )
    parser.add_argument("--pattern", action="append", choices=sorted(PATTERNS), help="repeatable")
    parser.add_argument("--dir", type=Path, default=Path.cwd(), help="a directory on a real fs")
    parser.add_argument("--size-mib", type=int, default=16)
    parser.add_argument("--ra-kb", type=int, help="default: the device's read_ahead_kb")
    parser.add_argument("--max-order", type=int, default=MAX_PAGECACHE_ORDER)
    parser.add_argument("--json", action="store_true", help="one JSON object per pattern")
    parser.add_argument("-v", "--verbose", action="store_true", help="every row, even agreeing")
    parser.add_argument(
        "--record", type=Path, help="also write the kernel's results to this JSON file (a fixture)"
    )
    parser.add_argument(
        "--retries",
        type=int,
        default=2,
        help="runs again a pattern during which something else reclaimed the file's pages",
    )
    args = parser.parse_args(argv)
    if not 1 <= args.size_mib <= 1024 or not 0 <= args.max_order <= MAX_PAGECACHE_ORDER:
        parser.error(f"--size-mib 1..1024, --max-order 0..{MAX_PAGECACHE_ORDER}")
    if not 0 <= args.retries <= 10:
        parser.error("--retries 0..10")
    if not args.dir.is_dir():
        parser.error(f"--dir {args.dir} is not a directory")
    ra_kb = args.ra_kb if args.ra_kb is not None else device_read_ahead_kb(args.dir)
    if ra_kb is None:
        parser.error("cannot read the device's read_ahead_kb: give --ra-kb")
    frames = can_read_frames()
    if not frames:
        print(
            "foliod-calibrate: not root (or no /proc/kpageflags): comparing residency only",
            file=sys.stderr,
        )
    for reclaimer in outside_reclaimers():
        print(
            f"foliod-calibrate: warning: {reclaimer} may reclaim the file's pages mid-pattern; "
            "pages it takes are evicted on the foliod side too",
            file=sys.stderr,
        )
    names = args.pattern or list(PATTERNS)
    agree = True
    recorded: dict[str, object] = {}
    for result in calibrate(
        names,
        args.dir,
        args.size_mib * MIB,
        ra_pages=ra_kb // 4,
        max_order=args.max_order,
        frames=frames,
        retries=args.retries,
    ):
        agree &= result.agrees
        recorded[result.pattern] = kernel_record(result)
        if args.json:
            print(json.dumps(asdict(result)))
        else:
            _print(result, verbose=args.verbose)
    if args.record is not None:
        document = {
            "kernel": os.uname().release,
            "filesystem": filesystem_of(args.dir),
            "read_ahead_kb": ra_kb,
            "max_order": args.max_order,
            "size_mib": args.size_mib,
            "frames": frames,
            "note": (
                "windows: the kernel's cached page count after each step that changed it, "
                "taken once the step's readahead I/O completed (cachestat); folios: after the "
                "last step. reclaimed_outside: pages something else (DAMON pageout) took "
                "mid-run; 0 means the run is the kernel's own behaviour throughout."
            ),
            "patterns": recorded,
        }
        # One line per pattern: diffs of a re-recorded fixture stay readable.
        patterns = ",\n".join(
            f"  {json.dumps(name)}: {json.dumps(entry, separators=(',', ':'))}"
            for name, entry in recorded.items()
        )
        head = json.dumps({k: v for k, v in document.items() if k != "patterns"}, indent=1)
        args.record.write_text(f'{head[:-2]},\n "patterns": {{\n{patterns}\n }}\n}}\n')
    return 0 if agree else 1


def kernel_record(result: PatternResult) -> dict[str, object]:
    """What a fixture keeps of the kernel's side: the cached page counts it went through and
    its folios at the end."""
    windows: list[int] = []
    for row in result.rows:
        if not windows or windows[-1] != row.kernel_pages:
            windows.append(row.kernel_pages)
    return {
        "steps": result.steps,
        "windows": windows,
        "folios": result.kernel_folios,
        "reclaimed_outside": result.reclaimed_outside,
    }


def filesystem_of(directory: Path) -> str:
    """The type of the filesystem holding directory, from /proc/self/mounts."""
    best, kind = "", "unknown"
    target = str(directory.resolve())
    for line in Path("/proc/self/mounts").read_text().splitlines():
        parts = line.split()
        mount = parts[1]
        if (target == mount or target.startswith(mount.rstrip("/") + "/")) and len(mount) > len(
            best
        ):
            best, kind = mount, parts[2]
    return kind


if __name__ == "__main__":
    sys.exit(main())
