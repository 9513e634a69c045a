"""Dirty page accounting, the dirty limits and throttling, the flusher, writeback and fsync
(mm/page-writeback.c, fs/fs-writeback.c, fs/sync.c).

A folio is dirty (PG_dirty) from the write that dirtied it until it is written back, and the
time it was dirtied is kept while it is; folio_mark_dirty and folio_clear_dirty are the one
place the dirty counts change (folio_account_dirtied and folio_account_cleaned in the kernel).

Writeback errors follow the kernel: the folio is marked clean and the error is recorded in the
file's errseq for fsync to report, once per open handle; the written data stays in the cached
folio (reads still see it) until the folio is evicted, when it is lost, as in Linux.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from foliod.mm.backing_dev import BackingStore
from foliod.mm.errors import InvalidArgument, WritebackFailed
from foliod.mm.errseq import errseq_check_and_advance, errseq_set
from foliod.mm.folio_store import PG_DIRTY, FolioStore
from foliod.mm.page_alloc import PAGE_SHIFT, PAGE_SIZE
from foliod.mm.vmstat import VmEvent

if TYPE_CHECKING:
    from foliod.mm.filemap import FileHandle, Inode, IoStats

# The longest a writer is paused (MAX_PAUSE, HZ / 5).
MAX_PAUSE_SECONDS = 0.2
_KIB_PER_PAGE = PAGE_SIZE >> 10


@dataclass(frozen=True, slots=True)
class DirtyLimits:
    """vm.dirty_background_ratio, vm.dirty_ratio (percent of dirtyable memory) and
    vm.dirty_expire_centisecs, in seconds."""

    background_ratio: int = 10
    ratio: int = 20
    expire_seconds: float = 30.0

    def __post_init__(self) -> None:
        if not 0 < self.background_ratio < self.ratio <= 100:
            raise InvalidArgument(
                "dirty ratios must satisfy 0 < background < ratio <= 100", field="dirty_ratio"
            )
        if self.expire_seconds < 0:
            raise InvalidArgument("dirty expiry must not be negative", field="dirty_expire")


class Writeback:
    """The writeback half of the page cache (PageCache): dirty accounting, balance_dirty_pages,
    the flusher, writeback, sync and fsync."""

    folio_store: FolioStore
    inodes: dict[int, Inode]
    files: dict[str, Inode]
    store: BackingStore
    events: dict[VmEvent, int]
    nr_dirty: int
    limits: DirtyLimits
    clock: Callable[[], float]
    dirtyable: Callable[[], int]
    nr_throttled: int
    nr_paused: int
    pause_seconds: float

    if TYPE_CHECKING:

        def lookup(self, name: str) -> Inode: ...

        def handle(self, number: int) -> FileHandle: ...

    def folio_mark_dirty(self, inode: Inode, f: int, when: float, *, dirtied: bool = True) -> None:
        """A clean folio becomes dirty at time when (folio_account_dirtied); dirtied=False for
        pages that were dirty already (a split folio's), which nr_dirtied counted then."""
        store = self.folio_store
        nr = 1 << store.order[f]
        store.flags[f] |= PG_DIRTY
        store.dirtied_at[f] = when
        inode.nr_dirty += nr
        self.nr_dirty += nr
        if dirtied:
            self.events[VmEvent.NR_DIRTIED] += nr

    def folio_clear_dirty(self, inode: Inode, f: int) -> None:
        """A dirty folio is clean again, written back or gone (folio_account_cleaned)."""
        store = self.folio_store
        nr = 1 << store.order[f]
        store.flags[f] &= ~PG_DIRTY
        del store.dirtied_at[f]
        inode.nr_dirty -= nr
        self.nr_dirty -= nr

    def dirty_thresholds(self) -> tuple[int, int]:
        """(background, limit) in pages: the ratios of dirtyable memory (domain_dirty_limits)."""
        dirtyable = self.dirtyable()
        limits = self.limits
        return dirtyable * limits.background_ratio // 100, dirtyable * limits.ratio // 100

    def balance_dirty_pages(self, stats: IoStats, nr_dirtied: int) -> None:
        """Throttles a writer that just dirtied nr_dirtied pages.

        Above the freerun ceiling, halfway between the background threshold and the limit, the
        writer is paused for dirty_pause_seconds(); the pause is simulated, never slept: it is
        charged to stats.throttle_seconds. A writer that took dirty memory over the limit also
        writes back, oldest first, until it is under the background threshold; the device time
        is charged to its call. The kernel checks only every `ratelimit` pages a task dirties
        (balance_dirty_pages_ratelimited); here every write is checked.
        """
        background, limit = self.dirty_thresholds()
        pause = self.dirty_pause_seconds(nr_dirtied, background, limit)
        if pause > 0:
            self.nr_paused += 1
            self.pause_seconds += pause
            stats.throttle_seconds += pause
        if self.nr_dirty <= limit:
            return
        self.nr_throttled += 1
        written = self._writeback_oldest(lambda folio: self.nr_dirty > background)
        stats.device_seconds += self.store.device.write_seconds(written * PAGE_SIZE)

    def dirty_pause_seconds(self, nr_dirtied: int, background: int, limit: int) -> float:
        """How long to pause a writer that dirtied nr_dirtied pages (balance_dirty_pages with
        wb_position_ratio's pos_ratio_polynom): none at or below the freerun ceiling
        (background + limit) // 2; above it, nr_dirtied pages at the device's write bandwidth
        scaled by pos_ratio = 1 + x**3, x = (setpoint - dirty) / (limit - setpoint + 1),
        setpoint = (freerun + limit) / 2, clamped to 0..2; at most MAX_PAUSE_SECONDS, which is
        also the pause at or over the limit (a ratelimit of 0). A write that dirtied nothing
        is not paused: the kernel balances only after pages are dirtied."""
        dirty = self.nr_dirty
        freerun = (background + limit) // 2
        if nr_dirtied <= 0 or dirty <= freerun:
            return 0.0
        if dirty >= limit:
            return MAX_PAUSE_SECONDS
        setpoint = (freerun + limit) / 2
        x = (setpoint - dirty) / (limit - setpoint + 1)
        pos_ratio = min(max(1 + x**3, 0.0), 2.0)
        # Positive: dirty < limit keeps x above -1.
        task_ratelimit = self.store.device.write_bytes_per_s / PAGE_SIZE * pos_ratio
        return min(nr_dirtied / task_ratelimit, MAX_PAUSE_SECONDS)

    def flush(self) -> int:
        """One pass of the flusher (wb_workfn): writes back folios dirty for longer than
        dirty_expire, then more, oldest first, while dirty memory is over the background
        threshold. Returns pages written."""
        background, _ = self.dirty_thresholds()
        expired_before = self.clock() - self.limits.expire_seconds
        dirtied_at = self.folio_store.dirtied_at
        return self._writeback_oldest(
            lambda f: dirtied_at[f] <= expired_before or self.nr_dirty > background
        )

    def _writeback_oldest(self, more: Callable[[int], bool]) -> int:
        """Writes dirty folios back, oldest first, while more(folio) holds; returns pages
        written successfully."""
        written = 0
        dirtied_at = self.folio_store.dirtied_at
        for f in sorted(self.dirty_folios(), key=dirtied_at.__getitem__):
            if not more(f):
                break
            written += self.writeback_folio(f)
        return written

    def writeback_folio(self, f: int) -> int:
        """Writes a dirty folio's in-memory pages to the backing file and marks it clean; an
        error is recorded in the file's errseq and the folio is marked clean all the same.
        Returns the pages written successfully."""
        store = self.folio_store
        if not store.flags[f] & PG_DIRTY:
            return 0
        inode = self.inodes[store.mapping[f]]
        head, nr = store.index[f], 1 << store.order[f]
        contents = store.contents.get(f)
        written = 0
        try:
            for i, page in sorted((contents or {}).items()):
                self.store.write(inode.name, (head + i) << PAGE_SHIFT, bytes(page), inode.size)
            if not contents:
                self.store.write(inode.name, 0, b"", inode.size)
        except OSError as exc:
            inode.wb_err = errseq_set(inode.wb_err, exc.errno or 5)
        else:
            store.contents.pop(f, None)
            written = nr
            self.events[VmEvent.NR_WRITTEN] += written
            self.events[VmEvent.PGPGOUT] += written * _KIB_PER_PAGE
        self.folio_clear_dirty(inode, f)
        return written

    def dirty_folios(self, inode: Inode | None = None) -> list[int]:
        """Dirty folios, by file and index (of one file, or of all)."""
        store = self.folio_store
        mapping_of, index_of = store.mapping, store.index
        if inode is None:
            numbers = {inode.number: i for i, inode in enumerate(self.files.values())}
        else:
            numbers = {inode.number: 0}
        found = [f for f in store.dirtied_at if mapping_of[f] in numbers]
        found.sort(key=lambda f: (numbers[mapping_of[f]], index_of[f]))
        return found

    def writeback(self, name: str | None = None, start: int = 0, end: int | None = None) -> int:
        """Writes back dirty folios of one file's byte range, of one file, or of all files;
        returns pages written successfully."""
        inode = self.lookup(name) if name is not None else None
        store = self.folio_store
        written = 0
        for f in self.dirty_folios(inode):
            folio_start = store.index[f] << PAGE_SHIFT
            size = PAGE_SIZE << store.order[f]
            if folio_start + size <= start or (end is not None and folio_start >= end):
                continue
            written += self.writeback_folio(f)
        return written

    def sync(self) -> int:
        """Writes back every dirty file and makes it durable (sync(2)); returns pages written.
        Errors stay recorded for the files' handles to see."""
        written = 0
        mapping_of = self.folio_store.mapping
        numbers = dict.fromkeys(mapping_of[f] for f in self.dirty_folios())
        for number in numbers:
            inode = self.inodes[number]
            written += self.writeback(inode.name)
            try:
                self.store.fsync(inode.name)
            except OSError as exc:
                inode.wb_err = errseq_set(inode.wb_err, exc.errno or errno.EIO)
        return written

    def fsync(self, number: int) -> int:
        """Writes the file back and makes it durable; reports a writeback error that happened
        since this handle last looked, once. Returns pages written."""
        handle = self.handle(number)
        inode = handle.inode
        written = self.writeback(inode.name)
        try:
            self.store.fsync(inode.name)
        except OSError as exc:
            inode.wb_err = errseq_set(inode.wb_err, exc.errno or 5)
        err, handle.wb_err_since, inode.wb_err = errseq_check_and_advance(
            inode.wb_err, handle.wb_err_since
        )
        if err:
            raise WritebackFailed(
                f"writeback of {inode.name!r} failed since this handle last checked: "
                f"{errno.errorcode.get(err, str(err))}",
                field="handle",
                metadata={"errno": str(err), "name": inode.name},
            )
        return written
