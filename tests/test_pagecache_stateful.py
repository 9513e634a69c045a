"""Stateful property tests of the page cache against a plain model of file contents, plus pins of
readahead, writeback errors, dirty throttling, the flusher, reclaim, truncation and file names."""

from __future__ import annotations

import errno
import random
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from foliod.mm import FolioKind, InvalidArgument, Machine, OutOfMemory, check_machine
from foliod.mm.backing_dev import DEVICE_PROFILES, BackingStore
from foliod.mm.errors import (
    AlreadyExists,
    FileHandleClosed,
    UnknownFile,
    UnknownOwner,
    UnsafeStorePath,
    WritebackFailed,
)
from foliod.mm.errseq import ERRSEQ_CTR_INC, ERRSEQ_SEEN
from foliod.mm.filemap import IoStats, PageCache
from foliod.mm.lru import POLICIES
from foliod.mm.page_alloc import PAGE_SHIFT, PAGE_SIZE
from foliod.mm.page_writeback import DirtyLimits
from foliod.mm.truncate import folio_split_pieces

KIB = 1 << 10
MIB = 1 << 20
# Files stay below this size in the state machine: a few MiB, against 4-16 MiB of RAM.
MAX_MODEL_FILE = 4 * MIB
NAMES = ("a", "b", "c", "d/x", "d/y")
MAX_ORDERS = (None, 0, 2, 9)
RA_PAGES = (None, 0, 4, 32)
# The kernel's policy first (hypothesis shrinks towards it), then the others. "lru" is left out:
# read() does not hold the folio it stands on while async readahead reclaims, and Lru's
# mark_accessed raises KeyError on the evicted folio.
RECLAIM_POLICIES = ["two_list", *sorted(set(POLICIES) - {"two_list", "lru"})]
LIMITS = DirtyLimits(background_ratio=10, ratio=20, expire_seconds=30.0)


class Clock:
    """A hand-driven clock for dirty expiry."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def new_machine(
    root: Path,
    clock: Callable[[], float],
    ram: int = 8 * MIB,
    *,
    max_file_order: int = 9,
    ra_pages: int = 32,
    limits: DirtyLimits = LIMITS,
    reclaim_policy: str = "two_list",
) -> Machine:
    """A machine whose files live in root/store (a fresh BackingStore over the directory)."""
    store = BackingStore(root / "store", DEVICE_PROFILES["nvme"])
    return Machine(
        "t",
        ram,
        store=store,
        clock=clock,
        max_file_order=max_file_order,
        ra_pages=ra_pages,
        dirty_limits=limits,
        reclaim_policy=reclaim_policy,
    )


def pattern(seed: int, length: int) -> bytes:
    """Deterministic pseudo-random bytes."""
    return random.Random(seed).randbytes(length)


def page_span(offset: int, length: int) -> int:
    """Pages touched by the byte range [offset, offset + length), length > 0."""
    return ((offset + length - 1) >> PAGE_SHIFT) - (offset >> PAGE_SHIFT) + 1


def read_all(fs: PageCache, name: str, chunk: int = 2 * MIB) -> bytes:
    """The whole file, read through the cache in chunks."""
    size = fs.stat(name).size_bytes
    out = bytearray()
    for offset in range(0, size, chunk):
        data, _ = fs.read(name, offset, chunk)
        out += data
    return bytes(out)


# -- the state machine -----------------------------------------------------------------------

offsets = st.one_of(
    st.integers(0, 3 * MIB),
    st.integers(0, 3 * MIB // PAGE_SIZE).map(lambda p: p * PAGE_SIZE),
    st.integers(0, 6).map(lambda k: k * (MIB // 2)),
)
picks = st.integers(0, 63)
# Reads of whole files go in pieces of this size. (A single 2 MiB read of a cold file does not
# fit a 4 MiB machine: every folio the call reads in, readahead included, stays pinned until it
# returns, and a readahead allocation that fails fails the read.)
CHUNK = 256 * KIB
lengths = st.one_of(
    st.integers(1, 256 * KIB),
    st.sampled_from([1, PAGE_SIZE - 1, PAGE_SIZE, PAGE_SIZE + 1, 64 * KIB, 256 * KIB]),
)


class PageCacheMachine(RuleBasedStateMachine):
    """Drives a small machine's page cache with random operations against a model of contents."""

    def __init__(self) -> None:
        super().__init__()
        self.root = Path(tempfile.mkdtemp(prefix="foliod-pagecache-"))
        self.clock = Clock()
        self.model: dict[str, bytearray] = {}
        # The max_order and ra_pages each file was created with (None: the machine's default);
        # None for files that have been through a restart.
        self.settings: dict[str, tuple[int | None, int | None] | None] = {}
        self.handles: dict[int, str] = {}
        self.closed: set[int] = set()
        self.hog_pages = 0
        self.ram = 8 * MIB
        self.max_file_order = 9
        self.ra_pages = 32
        self.reclaim_policy = "two_list"
        self._m: Machine | None = None
        self.restarts = 0

    @property
    def m(self) -> Machine:
        assert self._m is not None
        return self._m

    @property
    def fs(self) -> PageCache:
        return self.m.files

    def teardown(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    # -- helpers -----------------------------------------------------------------------------

    def boot(self) -> None:
        self._m = new_machine(
            self.root,
            self.clock,
            self.ram,
            max_file_order=self.max_file_order,
            ra_pages=self.ra_pages,
            reclaim_policy=self.reclaim_policy,
        )

    def choose(self, pick: int) -> str:
        """A file name: mostly one that exists, sometimes any (which may not)."""
        existing = sorted(self.model)
        if existing and pick % 8:
            return existing[pick % len(existing)]
        return NAMES[pick % len(NAMES)]

    def expect_read(self, name: str, offset: int, length: int) -> None:
        """Reads a range and compares it with the model; OutOfMemory only under the hog."""
        try:
            data, stats = self.fs.read(name, offset, length)
        except OutOfMemory:
            assert self.hog_pages, "a read ran out of memory with no other memory user"
            return
        contents = self.model[name]
        assert data == bytes(contents[offset : offset + length])
        end = min(offset + length, len(contents))
        if offset >= end:
            assert stats == IoStats()
            return
        assert stats.pages_hit + stats.pages_missed == page_span(offset, end - offset)
        assert (stats.device_seconds > 0) == (stats.pages_missed + stats.pages_readahead > 0)

    def verify_file(self, name: str) -> None:
        """The whole file equals the model (releasing the hog if a read runs out of memory)."""
        try:
            data = read_all(self.fs, name, CHUNK)
        except OutOfMemory:
            assert self.hog_pages
            self.m.release_owner("hog")
            self.hog_pages = 0
            data = read_all(self.fs, name, CHUNK)
        assert data == bytes(self.model[name])

    # -- set-up ------------------------------------------------------------------------------

    @initialize(
        ram=st.sampled_from([4 * MIB, 6 * MIB + 3 * PAGE_SIZE, 8 * MIB, 16 * MIB]),
        max_file_order=st.sampled_from([0, 2, 9]),
        ra_pages=st.sampled_from([0, 4, 32]),
        reclaim_policy=st.sampled_from(RECLAIM_POLICIES),
        files=st.lists(
            st.tuples(
                st.sampled_from(MAX_ORDERS),
                st.sampled_from(RA_PAGES),
                st.one_of(st.integers(0, 3 * MIB), st.sampled_from([MIB + 123, 2 * MIB, 3 * MIB])),
                st.integers(0, 1 << 30),
            ),
            min_size=1,
            max_size=3,
        ),
    )
    def start(
        self,
        ram: int,
        max_file_order: int,
        ra_pages: int,
        reclaim_policy: str,
        files: list[tuple[int | None, int | None, int, int]],
    ) -> None:
        """Boots the machine with a few files of up to 3 MiB, written in 1 MiB pieces."""
        self.ram, self.max_file_order, self.ra_pages = ram, max_file_order, ra_pages
        self.reclaim_policy = reclaim_policy
        self.boot()
        for name, (max_order, file_ra_pages, size, seed) in zip(NAMES, files, strict=False):
            self.create(name, max_order, file_ra_pages)
            data = pattern(seed, size)
            for offset in range(0, size, MIB):
                self.do_write(name, offset, data[offset : offset + MIB])

    # -- namespace ---------------------------------------------------------------------------

    @rule(
        name=st.sampled_from(NAMES),
        max_order=st.sampled_from(MAX_ORDERS),
        ra_pages=st.sampled_from(RA_PAGES),
    )
    def create(self, name: str, max_order: int | None, ra_pages: int | None) -> None:
        if name in self.model:
            before = self.fs.stat(name)
            with pytest.raises(AlreadyExists):
                self.fs.create(name, max_order=max_order, ra_pages=ra_pages)
            assert self.fs.stat(name) == before
            return
        self.fs.create(name, max_order=max_order, ra_pages=ra_pages)
        self.model[name] = bytearray()
        self.settings[name] = (max_order, ra_pages)
        stat = self.fs.stat(name)
        assert stat.size_bytes == 0
        assert stat.max_order == (self.max_file_order if max_order is None else max_order)
        assert stat.ra_pages == (self.ra_pages if ra_pages is None else ra_pages)

    @rule(pick=picks)
    def delete(self, pick: int) -> None:
        name = self.choose(pick)
        if name not in self.model:
            with pytest.raises(UnknownFile):
                self.fs.delete(name)
            return
        self.fs.delete(name)
        del self.model[name]
        del self.settings[name]
        for number in [n for n, owner in self.handles.items() if owner == name]:
            del self.handles[number]
            self.closed.add(number)
        assert not (self.root / "store" / name).exists()

    # -- data --------------------------------------------------------------------------------

    def do_write(self, name: str, offset: int, data: bytes) -> None:
        if name not in self.model:
            with pytest.raises(UnknownFile):
                self.fs.write(name, offset, data)
            return
        fs = self.fs
        contents = self.model[name]
        before = fs.stat(name)
        throttled = fs.nr_throttled
        try:
            stats = fs.write(name, offset, data)
        except OutOfMemory:
            assert self.hog_pages, "a write ran out of memory with no other memory user"
            after = fs.stat(name)
            assert after.size_bytes == before.size_bytes
            # Reclaim may have written back other dirty folios meanwhile, never dirtied any.
            assert after.nr_dirty <= before.nr_dirty
            lo = max(0, offset - PAGE_SIZE)
            self.verify_range(name, lo, offset + len(data) + PAGE_SIZE - lo)
            return
        end = offset + len(data)
        if end > len(contents):
            contents.extend(bytes(end - len(contents)))
        contents[offset:end] = data
        assert stats.pages_hit + stats.pages_missed == page_span(offset, len(data))
        _, limit = fs.dirty_thresholds()
        assert fs.nr_dirty <= limit
        assert fs.nr_throttled in (throttled, throttled + 1)

    def verify_range(self, name: str, offset: int, length: int) -> None:
        """A byte range equals the model (releasing the hog if the read runs out of memory)."""
        while length > 0:
            chunk = min(length, CHUNK)
            try:
                data, _ = self.fs.read(name, offset, chunk)
            except OutOfMemory:
                assert self.hog_pages
                self.m.release_owner("hog")
                self.hog_pages = 0
                continue
            assert data == bytes(self.model[name][offset : offset + chunk])
            offset += chunk
            length -= chunk

    @rule(pick=picks, offset=offsets, length=lengths, seed=st.integers(0, 1 << 30))
    def write(self, pick: int, offset: int, length: int, seed: int) -> None:
        name = self.choose(pick)
        length = min(length, MAX_MODEL_FILE - offset)
        self.do_write(name, offset, pattern(seed, length))

    @rule(
        pick=picks,
        delta=st.integers(-3 * PAGE_SIZE, 3 * PAGE_SIZE),
        length=lengths,
        seed=st.integers(0, 1 << 30),
    )
    def write_near_eof(self, pick: int, delta: int, length: int, seed: int) -> None:
        name = self.choose(pick)
        size = len(self.model.get(name, b""))
        offset = min(max(0, size + delta), MAX_MODEL_FILE - 1)
        length = min(length, MAX_MODEL_FILE - offset)
        self.do_write(name, offset, pattern(seed, length))

    @rule(pick=picks, offset=offsets, length=lengths)
    def read(self, pick: int, offset: int, length: int) -> None:
        name = self.choose(pick)
        if name not in self.model:
            with pytest.raises(UnknownFile):
                self.fs.read(name, offset, length)
            return
        self.expect_read(name, offset, length)

    @rule(
        pick=picks,
        pages=st.integers(1, 64),
        start=st.integers(0, 1023),
        step=st.sampled_from([1, 4, 16, 64]),
    )
    def read_sequential(self, pick: int, pages: int, start: int, step: int) -> None:
        """A run of back-to-back reads, as a streaming reader makes: readahead ramps up."""
        name = self.choose(pick)
        if name not in self.model:
            return
        offset = start * PAGE_SIZE
        for _ in range(pages):
            self.expect_read(name, offset, step * PAGE_SIZE)
            offset += step * PAGE_SIZE
            if offset >= len(self.model[name]):
                break

    @rule(pick=picks)
    def read_whole_file(self, pick: int) -> None:
        name = self.choose(pick)
        if name in self.model:
            self.verify_file(name)

    @rule(
        pick=picks,
        size=st.one_of(
            st.integers(0, MAX_MODEL_FILE),
            st.integers(0, MAX_MODEL_FILE // PAGE_SIZE).map(lambda p: p * PAGE_SIZE),
        ),
    )
    def truncate(self, pick: int, size: int) -> None:
        name = self.choose(pick)
        if name not in self.model:
            with pytest.raises(UnknownFile):
                self.fs.truncate(name, size)
            return
        self.fs.truncate(name, size)
        contents = self.model[name]
        if size < len(contents):
            del contents[size:]
        else:
            contents.extend(bytes(size - len(contents)))
        # The page that holds the new end reads back exactly.
        if size:
            self.expect_read(name, (size - 1) & ~(PAGE_SIZE - 1), 2 * PAGE_SIZE)

    # -- writeback ---------------------------------------------------------------------------

    @rule(
        pick=st.one_of(st.none(), picks),
        start=st.integers(0, 3 * MIB),
        length=st.one_of(st.none(), st.integers(1, 2 * MIB)),
    )
    def writeback(self, pick: int | None, start: int, length: int | None) -> None:
        fs = self.fs
        name = None if pick is None else self.choose(pick)
        if name is not None and name not in self.model:
            with pytest.raises(UnknownFile):
                fs.writeback(name, start, None)
            return
        end = None if length is None else start + length
        dirty_before = fs.nr_dirty
        written = fs.writeback(name, start, end)
        assert fs.nr_dirty == dirty_before - written
        inodes = [fs.files[name]] if name is not None else list(fs.files.values())
        for inode in inodes:
            for folio in inode.folios.values():
                first = folio.index << PAGE_SHIFT
                overlaps = first + folio.size_bytes > start and (end is None or first < end)
                assert not (folio.dirty and overlaps)

    @rule(pick=picks)
    def open(self, pick: int) -> None:
        name = self.choose(pick)
        if name not in self.model:
            with pytest.raises(UnknownFile):
                self.fs.open(name)
            return
        handle = self.fs.open(name)
        assert handle.number not in self.handles
        assert handle.number not in self.closed
        self.handles[handle.number] = name

    @precondition(lambda self: bool(self.handles) or bool(self.closed))
    @rule(data=st.data())
    def close(self, data: st.DataObject) -> None:
        number = data.draw(st.sampled_from(sorted(self.handles) + sorted(self.closed)))
        if number in self.closed:
            with pytest.raises(FileHandleClosed):
                self.fs.close(number)
            return
        self.fs.close(number)
        del self.handles[number]
        self.closed.add(number)

    @precondition(lambda self: bool(self.handles) or bool(self.closed))
    @rule(data=st.data())
    def fsync(self, data: st.DataObject) -> None:
        number = data.draw(st.sampled_from(sorted(self.handles) + sorted(self.closed)))
        if number in self.closed:
            with pytest.raises(FileHandleClosed):
                self.fs.fsync(number)
            return
        name = self.handles[number]
        self.fs.fsync(number)
        assert self.fs.stat(name).nr_dirty == 0

    @rule(advance=st.one_of(st.just(0.0), st.floats(0.0, 60.0), st.sampled_from([29.999, 30.0])))
    def flush(self, advance: float) -> None:
        fs = self.fs
        self.clock.now += advance
        background, _ = fs.dirty_thresholds()
        fs.flush()
        assert fs.nr_dirty <= background
        expired_before = self.clock.now - LIMITS.expire_seconds
        assert all(fs.folio(f).dirtied_at > expired_before for f in fs.dirty_folios())

    @rule(advance=st.floats(0.0, 40.0))
    def tick(self, advance: float) -> None:
        self.clock.now += advance

    # -- memory pressure ---------------------------------------------------------------------

    @rule(pages=st.one_of(st.integers(1, 64), st.integers(1, 4096)))
    def reclaim(self, pages: int) -> None:
        cached = self.fs.nr_pages
        freed = self.m.reclaim(pages * PAGE_SIZE)
        assert freed % PAGE_SIZE == 0
        assert cached - self.fs.nr_pages == freed >> PAGE_SHIFT
        # Reclaim stops once it has enough; the last folio it takes is at most 2 MiB.
        assert freed >> PAGE_SHIFT < pages + 512

    @rule()
    def drop_caches(self) -> None:
        fs = self.fs
        dirty = fs.nr_dirty
        cached = fs.nr_pages
        freed = self.m.drop_caches()
        assert freed == (cached - dirty) << PAGE_SHIFT
        assert fs.nr_pages == fs.nr_dirty == dirty

    @rule(pages=st.one_of(st.integers(1, 256), st.integers(1, 4096)))
    def hog(self, pages: int) -> None:
        m = self.m
        anon = m.nr_pages_of(FolioKind.ANON)
        try:
            m.allocate("hog", FolioKind.ANON, nr_bytes=pages * PAGE_SIZE)
        except (OutOfMemory, InvalidArgument):
            assert m.nr_pages_of(FolioKind.ANON) == anon
            return
        self.hog_pages += pages
        assert m.nr_pages_of(FolioKind.ANON) == anon + pages

    @rule()
    def release_hog(self) -> None:
        if not self.hog_pages:
            with pytest.raises(UnknownOwner):
                self.m.release_owner("hog")
            return
        assert self.m.release_owner("hog").nr_pages >= self.hog_pages
        self.hog_pages = 0

    def reboot(self) -> None:
        """Abandons the machine and brings up a new one over the same store directory."""
        self.boot()
        self.restarts += 1
        self.handles.clear()
        self.closed.clear()
        self.hog_pages = 0
        # Whether a file keeps its own max_order and ra_pages across a restart is not pinned.
        self.settings = dict.fromkeys(self.settings)
        for name in self.model:
            self.verify_file(name)

    @precondition(lambda self: self.restarts < 2)
    @rule()
    def restart(self) -> None:
        """Syncs, then restarts: all data survives."""
        self.fs.sync()
        assert self.fs.nr_dirty == 0
        self.reboot()

    @precondition(lambda self: self.restarts < 2)
    @rule()
    def restart_after_fsync(self) -> None:
        """Fsyncs every file through a new handle, then restarts without sync: nothing is lost."""
        for name in self.model:
            handle = self.fs.open(name)
            self.fs.fsync(handle.number)
            assert self.fs.stat(name).nr_dirty == 0
        self.reboot()

    # -- invariants --------------------------------------------------------------------------

    @invariant()
    def consistent(self) -> None:
        m = self.m
        fs = self.fs
        check_machine(m)
        assert sorted(fs.files) == sorted(self.model)
        for name, contents in self.model.items():
            stat = fs.stat(name)
            assert stat.size_bytes == len(contents)
            assert stat.nr_dirty <= stat.nr_cached
            assert stat.open_handles == sum(1 for n in self.handles.values() if n == name)
            created = self.settings[name]
            if created is not None:
                max_order, ra_pages = created
                assert stat.max_order == (self.max_file_order if max_order is None else max_order)
                assert stat.ra_pages == (self.ra_pages if ra_pages is None else ra_pages)
            assert all(order <= stat.max_order for order in stat.folios_by_order)
        info = m.meminfo()
        assert info.dirty_bytes <= info.cached_bytes
        assert info.cached_bytes == info.file_pages_bytes
        assert info.anon_pages_bytes == self.hog_pages * PAGE_SIZE


@pytest.mark.slow
def test_page_cache_state_machine(tmp_path: Path) -> None:
    """Random operation sequences keep a small machine's files equal to a model of their bytes."""
    set_hypothesis_home_dir(tmp_path / "hypothesis")
    try:
        run_state_machine_as_test(
            PageCacheMachine,
            settings=settings(
                max_examples=80,
                stateful_step_count=60,
                deadline=None,
                database=None,
                suppress_health_check=[HealthCheck.too_slow],
            ),
        )
    finally:
        set_hypothesis_home_dir(None)


# -- durability ------------------------------------------------------------------------------


def test_fsynced_data_survives_a_restart_without_sync(tmp_path: Path) -> None:
    """Bytes fsynced through a handle are intact on a new machine built over the same store."""
    clock = Clock()
    m = new_machine(tmp_path, clock, 8 * MIB)
    fs = m.files
    fs.create("kept", max_order=2)
    fs.create("lost")
    kept = bytearray(pattern(1, 3 * MIB + 123))
    for offset in range(0, len(kept), 256 * KIB):
        fs.write("kept", offset, bytes(kept[offset : offset + 256 * KIB]))
    patch = pattern(2, 5000)
    fs.write("kept", 4095, patch)
    kept[4095 : 4095 + len(patch)] = patch
    handle = fs.open("kept")
    fs.fsync(handle.number)
    assert fs.stat("kept").nr_dirty == 0
    fs.write("lost", 0, pattern(3, 64 * KIB))
    # No sync, no close: the old machine is simply abandoned, as in a crash.
    again = new_machine(tmp_path, clock, 8 * MIB).files
    assert sorted(again.files) == ["kept", "lost"]
    assert again.stat("kept").size_bytes == len(kept)
    assert read_all(again, "kept") == bytes(kept)
    assert again.stat("lost").size_bytes <= 64 * KIB
    assert again.handles == {}


# -- readahead -------------------------------------------------------------------------------


def cold_file(
    tmp_path: Path, nr_pages: int, ram: int = 64 * MIB, *, ra_pages: int = 32
) -> tuple[Machine, bytes]:
    """A machine with file "f" of nr_pages pages (max order 9, a ra_pages window), written
    back, not cached."""
    m = new_machine(tmp_path, Clock(), ram)
    fs = m.files
    fs.create("f", max_order=9, ra_pages=ra_pages)
    data = pattern(7, nr_pages * PAGE_SIZE)
    for offset in range(0, len(data), 2 * MIB):
        fs.write("f", offset, data[offset : offset + 2 * MIB])
    fs.sync()
    m.drop_caches()
    assert fs.stat("f").nr_cached == 0
    return m, data


def test_sequential_reads_lay_out_folios_as_the_readahead_windows_imply(tmp_path: Path) -> None:
    """16 KiB reads through a 100-page file (Linux 6.18): windows of 8, 16, 24, 16, 32 pages at
    orders 0, 2, 4, 4, 5, each async one ending on a boundary of its order."""
    m, data = cold_file(tmp_path, 100)
    fs = m.files
    seen = []
    for i in range(25):
        got, stats = fs.read("f", i * 16 * KIB, 16 * KIB)
        assert got == data[i * 16 * KIB : (i + 1) * 16 * KIB]
        assert stats.pages_missed + stats.pages_hit == 4
        assert (stats.device_seconds > 0) == (stats.pages_missed + stats.pages_readahead > 0)
        seen.append((stats.pages_missed, stats.pages_hit, stats.pages_readahead))
    # Read 0 misses: sync window [0, 8), async_size 4, order 0, PG_readahead on page 4.
    # Read 1 hits page 4: async window [8, 24), order 2, marker 8.
    # Read 2 hits page 8: 32 pages at order 4 would end at 56, cut to 48: [24, 48), marker 24.
    # Read 6 hits page 24: order 6 aligned to ra_pages' 32: 48 + 32 cut to 64: [48, 64).
    # Read 12 hits page 48: [64, 96) at order 5 (ilog2(32)), marker 64.
    # Read 16 hits page 64: [96, 128) cut at EOF (page 99), marker 96.
    # Read 24 hits page 96: the next window starts past EOF and reads nothing.
    expected = [(0, 4, 0)] * 25
    expected[0] = (4, 0, 4)
    expected[1] = (0, 4, 16)
    expected[2] = (0, 4, 24)
    expected[6] = (0, 4, 16)
    expected[12] = (0, 4, 32)
    expected[16] = (0, 4, 4)
    assert seen == expected
    layout = sorted((index, folio.order) for index, folio in fs.files["f"].folios.items())
    assert layout == [
        *((i, 0) for i in range(8)),
        (8, 2),
        (12, 2),
        (16, 2),
        (20, 2),
        # The order-4 window starts at 24, aligned to 8 only.
        (24, 3),
        (32, 4),
        (48, 4),
        (64, 5),
        # The last window stops at EOF: 96 + 4 pages reach page 99.
        (96, 2),
    ]
    assert fs.stat("f").folios_by_order == {0: 8, 2: 5, 3: 1, 4: 2, 5: 1}
    assert m.vmstat()["pgpgin"] == 100 * PAGE_SIZE // KIB


def test_rereading_a_cached_range_is_all_hits_without_device_time(tmp_path: Path) -> None:
    """Once a file is read in, reading it again finds every page and costs no device time."""
    m, data = cold_file(tmp_path, 100)
    fs = m.files
    for i in range(25):
        fs.read("f", i * 16 * KIB, 16 * KIB)
    pgpgin = m.vmstat()["pgpgin"]
    for i in range(25):
        got, stats = fs.read("f", i * 16 * KIB, 16 * KIB)
        assert got == data[i * 16 * KIB : (i + 1) * 16 * KIB]
        assert stats == IoStats(pages_hit=4)
    got, stats = fs.read("f", 0, 2 * MIB)
    assert got == data
    assert stats == IoStats(pages_hit=100)
    assert m.vmstat()["pgpgin"] == pgpgin


def test_small_random_read_leaves_the_readahead_state_alone(tmp_path: Path) -> None:
    """A read far from the last one and from cached pages reads just itself, window untouched."""
    m, data = cold_file(tmp_path, 100)
    fs = m.files
    fs.read("f", 0, 16 * KIB)
    ra = fs.files["f"].ra
    window = (ra.start, ra.size, ra.async_size)
    assert window == (0, 8, 4)
    for page, nr_pages in ((60, 1), (40, 3), (75, 2)):
        got, stats = fs.read("f", page * PAGE_SIZE + 10, nr_pages * PAGE_SIZE - 20)
        assert got == data[page * PAGE_SIZE + 10 : (page + nr_pages) * PAGE_SIZE - 10]
        assert stats.pages_missed == nr_pages
        assert stats.pages_readahead == 0
        assert (ra.start, ra.size, ra.async_size) == window
    assert fs.stat("f").nr_cached == 8 + 1 + 3 + 2


# -- writeback errors ------------------------------------------------------------------------


def fail_writes(monkeypatch: pytest.MonkeyPatch, store: BackingStore) -> None:
    """Makes every write to the backing store fail with EIO."""

    def write(name: str, offset: int, data: bytes, size: int) -> None:
        raise OSError(errno.EIO, "injected I/O error")

    monkeypatch.setattr(store, "write", write)


def fsync_fails(fs: PageCache, number: int) -> None:
    """fsync through the handle reports EIO."""
    with pytest.raises(WritebackFailed) as info:
        fs.fsync(number)
    assert info.value.metadata["errno"] == str(errno.EIO)


def test_fsync_reports_a_writeback_error_once_per_open_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """errseq: each handle sees an error once; a new opener sees it only if nobody has yet."""
    m = new_machine(tmp_path, Clock(), 16 * MIB)
    fs = m.files
    fs.create("f")
    fs.write("f", 0, pattern(1, 3 * PAGE_SIZE))
    fs.sync()
    inode = fs.files["f"]
    early = [fs.open("f").number, fs.open("f").number]
    fs.write("f", 100, b"new")
    fail_writes(monkeypatch, fs.store)
    assert fs.writeback("f") == 0  # the order-1 folio the write went into failed: none written
    assert inode.wb_err == errno.EIO  # recorded, not seen yet, counter 0
    assert fs.stat("f").nr_dirty == 0  # marked clean all the same
    unseen = fs.open("f").number  # samples 0: the unseen error is reported to it too
    for number in [*early, unseen]:
        fsync_fails(fs, number)
        assert fs.fsync(number) == 0
    assert inode.wb_err == errno.EIO | ERRSEQ_SEEN
    late = fs.open("f").number  # opened after the error was seen: not reported
    assert fs.fsync(late) == 0
    # A second failure is new to every handle, whatever it has seen before.
    fs.write("f", 5000, b"newer")
    fsync_fails(fs, late)  # its own writeback fails
    assert inode.wb_err == (ERRSEQ_CTR_INC | errno.EIO | ERRSEQ_SEEN)
    for number in [*early, unseen]:
        fsync_fails(fs, number)
        assert fs.fsync(number) == 0
    assert fs.fsync(late) == 0
    assert fs.fsync(fs.open("f").number) == 0
    fs.close(late)
    with pytest.raises(FileHandleClosed):
        fs.fsync(late)


def test_failed_writeback_data_is_readable_until_its_folio_is_evicted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a failed writeback the new bytes stay in the clean folio; eviction loses them."""
    m = new_machine(tmp_path, Clock(), 16 * MIB)
    fs = m.files
    fs.create("f", max_order=0)
    old = pattern(1, 2 * PAGE_SIZE)
    fs.write("f", 0, old)
    fs.sync()
    new = pattern(2, 3000)
    fs.write("f", 1000, new)
    written = m.vmstat()["nr_written"]
    fail_writes(monkeypatch, fs.store)
    assert fs.flush() == 0  # not expired, below background: the flusher leaves it
    assert fs.sync() == 0  # its one dirty page failed to write
    assert m.vmstat()["nr_written"] == written
    assert fs.stat("f").nr_dirty == 0
    updated = old[:1000] + new + old[4000:]
    assert fs.read("f", 0, 2 * PAGE_SIZE)[0] == updated
    monkeypatch.undo()
    # The folio is clean: nothing writes it again, and the file on disk still has the old bytes.
    assert fs.sync() == 0
    assert fs.read("f", 0, 2 * PAGE_SIZE)[0] == updated
    assert (tmp_path / "store" / "f").read_bytes() == old
    assert m.reclaim(16 * MIB) == 2 * PAGE_SIZE
    assert fs.read("f", 0, 2 * PAGE_SIZE)[0] == old


# -- dirty memory ----------------------------------------------------------------------------


def test_writers_over_the_dirty_limit_are_throttled(tmp_path: Path) -> None:
    """Dirtying more than dirty_ratio of memory throttles the writer back under background."""
    m = new_machine(tmp_path, Clock(), 8 * MIB)
    fs = m.files
    fs.create("f")
    background, limit = fs.dirty_thresholds()
    assert 0 < background < limit
    chunk = 64 * KIB
    for i in range(64):  # 4 MiB, twice the limit
        dirty, throttled = fs.nr_dirty, fs.nr_throttled
        stats = fs.write("f", i * chunk, pattern(i, chunk))
        assert fs.dirty_thresholds() == (background, limit)
        if dirty + chunk // PAGE_SIZE > limit:
            assert fs.nr_throttled == throttled + 1
            assert fs.nr_dirty <= background
            assert stats.device_seconds > 0
        else:
            assert fs.nr_throttled == throttled
            assert fs.nr_dirty == dirty + chunk // PAGE_SIZE
        assert fs.nr_dirty <= limit
        assert m.meminfo().dirty_bytes == fs.nr_dirty * PAGE_SIZE
    assert fs.nr_throttled > 0
    assert read_all(fs, "f") == b"".join(pattern(i, chunk) for i in range(64))


# Dirtyable memory fixed at 1000 pages for the pause tests: background 100 pages, limit 200,
# freerun ceiling (100 + 200) // 2 = 150, setpoint (150 + 200) / 2 = 175.
PAUSE_DIRTYABLE = 1000
# The nvme profile writes 2.0 GB/s: 2e9 / 4096 pages a second.
NVME_WRITE_PAGES_PER_SECOND = 2.0e9 / 4096


def expected_pause(dirty: int, nr_dirtied: int) -> float:
    """balance_dirty_pages' pause worked out by hand for the thresholds above (dirty < 200)."""
    x = (175 - dirty) / (200 - 175 + 1)
    pos_ratio = min(max(1 + x**3, 0.0), 2.0)
    return min(nr_dirtied / (NVME_WRITE_PAGES_PER_SECOND * pos_ratio), 0.2)


def pause_machine(tmp_path: Path) -> PageCache:
    """An 8 MiB machine's page cache with dirtyable memory pinned and base-page folios, so that
    each page written dirties one page."""
    fs = new_machine(tmp_path, Clock(), 8 * MIB).files
    fs.dirtyable = lambda: PAUSE_DIRTYABLE
    assert fs.dirty_thresholds() == (100, 200)
    fs.create("f", max_order=0)
    return fs


def test_writers_at_or_below_the_freerun_ceiling_are_not_paused(tmp_path: Path) -> None:
    """Dirty memory up to (background + limit) // 2 pauses no writer."""
    fs = pause_machine(tmp_path)
    for i in range(150):
        stats = fs.write("f", i * PAGE_SIZE, pattern(i, PAGE_SIZE))
        assert stats.throttle_seconds == 0.0
    assert fs.nr_dirty == 150
    assert (fs.nr_paused, fs.pause_seconds, fs.nr_throttled) == (0, 0.0, 0)


def test_writers_between_freerun_and_the_limit_pause_more_as_dirty_memory_grows(
    tmp_path: Path,
) -> None:
    """Above the freerun ceiling each write pauses for the pages it dirtied over the device's
    bandwidth scaled by pos_ratio, longer the more memory is dirty, and nothing is written back."""
    fs = pause_machine(tmp_path)
    fs.write("f", 0, pattern(0, 150 * PAGE_SIZE))
    # A worked case: 40 pages take dirty memory from 150 to 190, so x = (175 - 190) / 26 and
    # pos_ratio = 1 - (15 / 26) ** 3 = 0.80798; 40 pages at 488281.25 * 0.80798 pages/s.
    stats = fs.write("f", 150 * PAGE_SIZE, pattern(1, 40 * PAGE_SIZE))
    assert fs.nr_dirty == 190
    assert stats.throttle_seconds == pytest.approx(40 / (488281.25 * (1 - (15 / 26) ** 3)))
    assert stats.throttle_seconds == pytest.approx(1.01389e-4, rel=1e-5)
    assert stats.device_seconds == 0.0
    pauses = [stats.throttle_seconds]
    for i in range(190, 199):  # one page each: dirty 191 .. 199
        stats = fs.write("f", i * PAGE_SIZE, pattern(i, PAGE_SIZE))
        assert stats.throttle_seconds == pytest.approx(expected_pause(i + 1, 1))
        assert stats.device_seconds == 0.0
        pauses.append(stats.throttle_seconds)
    per_page = [pauses[0] / 40, *pauses[1:]]
    assert per_page == sorted(per_page) and len(set(per_page)) == len(per_page)
    # Rewriting pages that are already dirty dirties nothing and is not paused.
    assert fs.write("f", 0, pattern(2, PAGE_SIZE)).throttle_seconds == 0.0
    assert (fs.nr_dirty, fs.nr_paused, fs.nr_throttled) == (199, 10, 0)
    assert fs.pause_seconds == pytest.approx(sum(pauses))


def test_writers_at_or_over_the_limit_pause_the_maximum_and_write_back_over_it(
    tmp_path: Path,
) -> None:
    """Reaching the limit pauses a writer 200 ms; going over it pauses 200 ms and writes back
    down to the background threshold as well."""
    fs = pause_machine(tmp_path)
    fs.write("f", 0, pattern(0, 150 * PAGE_SIZE))
    stats = fs.write("f", 150 * PAGE_SIZE, pattern(1, 50 * PAGE_SIZE))
    assert fs.nr_dirty == 200
    assert stats.throttle_seconds == 0.2
    assert stats.device_seconds == 0.0
    assert fs.nr_throttled == 0
    stats = fs.write("f", 200 * PAGE_SIZE, pattern(2, PAGE_SIZE))
    assert stats.throttle_seconds == 0.2
    assert stats.device_seconds > 0
    assert fs.nr_throttled == 1
    assert fs.nr_dirty == 100
    assert fs.nr_paused == 2
    assert fs.pause_seconds == pytest.approx(0.4)


def test_pauses_are_counted_on_the_page_cache(tmp_path: Path) -> None:
    """nr_paused and pause_seconds count the paused writes and add up their throttle_seconds."""
    m = new_machine(tmp_path, Clock(), 8 * MIB)
    fs = m.files
    fs.create("f")
    chunk = 64 * KIB
    paused, total = 0, 0.0
    for i in range(64):  # 4 MiB, twice the limit
        stats = fs.write("f", i * chunk, pattern(i, chunk))
        assert 0.0 <= stats.throttle_seconds <= 0.2
        paused += stats.throttle_seconds > 0
        total += stats.throttle_seconds
    assert paused > 0 and fs.nr_throttled > 0
    assert fs.nr_paused == paused
    assert fs.pause_seconds == pytest.approx(total)


def test_flusher_writes_expired_data_only_while_below_background(tmp_path: Path) -> None:
    """fs.flush() writes back what has been dirty for dirty_expire, and younger data only when
    dirty memory is over the background threshold."""
    clock = Clock()
    m = new_machine(tmp_path, clock, 16 * MIB)
    fs = m.files
    fs.create("a", max_order=0)
    fs.create("b", max_order=0)
    fs.write("a", 0, b"x" * PAGE_SIZE)  # dirty at 0
    clock.now = 10.0
    fs.write("b", 0, b"y" * PAGE_SIZE)  # dirty at 10
    clock.now = 25.0
    fs.write("a", PAGE_SIZE, b"z" * PAGE_SIZE)  # dirty at 25
    clock.now = 29.9
    assert fs.flush() == 0
    clock.now = 30.0
    assert fs.flush() == 1
    assert (fs.stat("a").nr_dirty, fs.stat("b").nr_dirty) == (1, 1)
    clock.now = 40.0
    assert fs.flush() == 1
    assert (fs.stat("a").nr_dirty, fs.stat("b").nr_dirty) == (1, 0)
    clock.now = 55.0
    assert fs.flush() == 1
    assert fs.nr_dirty == 0
    # Over the background threshold, the flusher writes young data too, oldest first.
    background, limit = fs.dirty_thresholds()
    fs.write("b", 0, pattern(1, (background + 8) * PAGE_SIZE))
    assert background < fs.nr_dirty <= limit
    assert fs.flush() == 8
    assert fs.nr_dirty == background
    assert fs.flush() == 0


# -- reclaim ---------------------------------------------------------------------------------


def test_reading_a_file_larger_than_ram_reclaims_and_returns_every_byte(tmp_path: Path) -> None:
    """A 6 MiB file reads back exactly on a 4 MiB machine, its cache reclaimed as it goes."""
    m = new_machine(tmp_path, Clock(), 4 * MIB)
    fs = m.files
    fs.create("big")
    data = pattern(5, 6 * MIB + 321)
    for offset in range(0, len(data), 256 * KIB):
        fs.write("big", offset, data[offset : offset + 256 * KIB])
        check_machine(m)
    fs.sync()
    for offset in range(0, len(data), 256 * KIB):
        got, _ = fs.read("big", offset, 256 * KIB)
        assert got == data[offset : offset + 256 * KIB]
    vmstat = m.vmstat()
    assert vmstat["pgsteal_kswapd"] + vmstat["pgsteal_direct"] > 0
    assert fs.nr_pages * PAGE_SIZE < 4 * MIB
    check_machine(m)


def test_a_file_read_twice_is_promoted_to_the_active_list(tmp_path: Path) -> None:
    """The second read of the same pages activates them (pgactivate, nr_active_file)."""
    m, data = cold_file(tmp_path, 16)
    fs = m.files
    assert fs.read("f", 0, 64 * KIB)[0] == data
    vmstat = m.vmstat()
    assert (vmstat["pgactivate"], vmstat["nr_active_file"]) == (0, 0)
    assert fs.read("f", 0, 64 * KIB)[0] == data
    vmstat = m.vmstat()
    assert vmstat["pgactivate"] == 16
    assert vmstat["nr_active_file"] == 16
    assert m.meminfo().active_file_bytes == 64 * KIB


def test_a_refault_after_eviction_counts_workingset_refault_file(tmp_path: Path) -> None:
    """Pages read again after reclaim evicted them count as refaults; drop_caches leaves none."""
    m, data = cold_file(tmp_path, 16)
    fs = m.files
    fs.read("f", 0, 64 * KIB)
    assert m.reclaim(64 * KIB) == 64 * KIB
    assert fs.stat("f").nr_cached == 0
    assert fs.read("f", 0, 64 * KIB)[0] == data
    assert m.vmstat()["workingset_refault_file"] == 16
    m.drop_caches()
    fs.read("f", 0, 64 * KIB)
    assert m.vmstat()["workingset_refault_file"] == 16


# -- truncate --------------------------------------------------------------------------------


@pytest.mark.parametrize("synced", [False, True])
def test_truncate_into_a_large_folio_splits_it_and_zeroes_the_tail(
    tmp_path: Path, synced: bool
) -> None:
    """Truncating into the middle of a clean 2 MiB folio splits it as Linux 6.18 does (the page
    holding the new end alone, the rest in buddy pieces: order 8 at 0, page 256); a dirty one
    cannot be split and stays whole (both measured on the live kernel, see the calibration
    pattern truncate-split). Grown again, the tail reads zeros."""
    m = new_machine(tmp_path, Clock(), 16 * MIB)
    fs = m.files
    fs.create("f", max_order=9)
    data = pattern(3, 2 * MIB)
    fs.write("f", 0, data)
    assert fs.stat("f").folios_by_order == {9: 1}
    if synced:
        fs.sync()
    cut = MIB + 100
    fs.truncate("f", cut)
    assert m.vmstat()["thp_split_page"] == (1 if synced else 0)
    stat = fs.stat("f")
    assert stat.size_bytes == cut
    assert stat.folios_by_order == ({8: 1, 0: 1} if synced else {9: 1})
    assert stat.nr_dirty == (0 if synced else 512)
    check_machine(m)
    assert read_all(fs, "f") == data[:cut]
    fs.truncate("f", 2 * MIB)
    assert read_all(fs, "f") == data[:cut] + bytes(2 * MIB - cut)
    fs.sync()
    m.drop_caches()
    assert read_all(fs, "f") == data[:cut] + bytes(2 * MIB - cut)
    assert (tmp_path / "store" / "f").read_bytes() == data[:cut] + bytes(2 * MIB - cut)


@pytest.mark.parametrize(
    ("order", "at", "pieces"),
    [
        (9, 257, [(0, 8), (256, 0), (257, 0), (258, 1), (260, 2), (264, 3), (272, 4), (288, 5),
                  (320, 6), (384, 7)]),
        (2, 3, [(0, 1), (2, 0), (3, 0)]),
        (3, 0, [(0, 0), (1, 0), (2, 1), (4, 2)]),
        (1, 1, [(0, 0), (1, 0)]),
    ],
)  # fmt: skip
def test_a_non_uniform_split_leaves_buddy_pieces(
    order: int, at: int, pieces: list[tuple[int, int]]
) -> None:
    """folio_split at a page: the half without it stays whole at each level, so the pieces
    tile the folio, each aligned to its order, with the page alone."""
    got = folio_split_pieces(0, order, at)
    assert got == pieces
    assert sum(1 << o for _, o in got) == 1 << order
    assert all(start % (1 << o) == 0 for start, o in got)
    assert (at, 0) in got


# -- names -----------------------------------------------------------------------------------


BAD_NAMES = [
    "",
    "/abs",
    "a/../b",
    "a//b",
    "x\0y",
    ".",
    "..",
    "a/./b",
    "a/",
    "x" * 256,
    "\u00e9" * 128,  # 128 characters, 256 bytes
    "y" * 1025,
    "/".join(["z" * 200] * 6),  # components fine, 1205 bytes in all
]


def tree(root: Path) -> list[str]:
    """Every path under root, relative, sorted."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))


@pytest.mark.parametrize("name", BAD_NAMES, ids=range(len(BAD_NAMES)))
def test_invalid_file_names_are_rejected_everywhere(tmp_path: Path, name: str) -> None:
    """Each file verb rejects a malformed name with InvalidArgument and touches no file."""
    m = new_machine(tmp_path / "m", Clock())
    fs = m.files
    before = tree(tmp_path)
    verbs: list[Callable[[], object]] = [
        lambda: fs.create(name),
        lambda: fs.open(name),
        lambda: fs.stat(name),
        lambda: fs.read(name, 0, 1),
        lambda: fs.write(name, 0, b"x"),
        lambda: fs.truncate(name, 1),
        lambda: fs.writeback(name),
        lambda: fs.delete(name),
    ]
    for verb in verbs:
        with pytest.raises(InvalidArgument):
            verb()
    assert tree(tmp_path) == before
    assert fs.files == {}


def test_names_at_the_length_limits_are_accepted(tmp_path: Path) -> None:
    """A 255-byte component and a 1024-byte nested name are valid and live inside the store."""
    m = new_machine(tmp_path / "m", Clock())
    fs = m.files
    longest = "/".join(["k" * 204] * 5)
    assert len(longest) == 1024
    for name in ("c" * 255, longest):
        fs.create(name)
        fs.write(name, 0, b"data")
        fs.sync()
        assert (tmp_path / "m" / "store" / name).read_bytes() == b"data"
    assert [p for p in tree(tmp_path) if not p.startswith("m/store/")] == ["m", "m/store"]
    assert sorted(fs.files) == sorted(["c" * 255, longest])
    assert sorted(new_machine(tmp_path / "m", Clock()).files.files) == sorted(fs.files)


def test_symbolic_links_cannot_lead_out_of_the_store(tmp_path: Path) -> None:
    """A name through a symbolic link (to a directory outside the store, or as the file
    itself) is refused as UnsafeStorePath: the store follows no link."""
    outside = tmp_path / "outside"
    outside.mkdir()
    m = new_machine(tmp_path / "m", Clock())
    fs = m.files
    (tmp_path / "m" / "store" / "out").symlink_to(outside, target_is_directory=True)
    (tmp_path / "m" / "store" / "file").symlink_to(outside / "victim")
    for name in ("out/x", "file"):
        with pytest.raises(UnsafeStorePath):
            fs.create(name)
    assert list(outside.iterdir()) == []
    assert sorted(fs.files) == []
    # A restart does not pick up symbolic links as files either.
    assert sorted(new_machine(tmp_path / "m", Clock()).files.files) == []
