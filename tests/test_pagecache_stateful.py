"""Stateful property tests of the page cache against a plain model of file contents, plus pins of
readahead, writeback errors, dirty throttling, the flusher, reclaim, truncation and file names."""

from __future__ import annotations

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
)
from foliod.mm.filemap import DirtyLimits, IoStats, PageCache
from foliod.mm.page_alloc import PAGE_SHIFT, PAGE_SIZE

KIB = 1 << 10
MIB = 1 << 20
# Files stay below this size in the state machine: a few MiB, against 4-16 MiB of RAM.
MAX_MODEL_FILE = 4 * MIB
NAMES = ("a", "b", "c", "d/x", "d/y")
MAX_ORDERS = (None, 0, 2, 9)
RA_PAGES = (None, 0, 4, 32)
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
        # The max_order and ra_pages each file was created with (None: the machine's default).
        self.settings: dict[str, tuple[int | None, int | None]] = {}
        self.handles: dict[int, str] = {}
        self.closed: set[int] = set()
        self.hog_pages = 0
        self.ram = 8 * MIB
        self.max_file_order = 9
        self.ra_pages = 32
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
            data = read_all(self.fs, name)
        except OutOfMemory:
            assert self.hog_pages
            self.m.release_owner("hog")
            self.hog_pages = 0
            data = read_all(self.fs, name)
        assert data == bytes(self.model[name])

    # -- set-up ------------------------------------------------------------------------------

    @initialize(
        ram=st.sampled_from([4 * MIB, 6 * MIB + 3 * PAGE_SIZE, 8 * MIB, 16 * MIB]),
        max_file_order=st.sampled_from([0, 2, 9]),
        ra_pages=st.sampled_from([0, 4, 32]),
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
        files: list[tuple[int | None, int | None, int, int]],
    ) -> None:
        """Boots the machine with a few files of up to 3 MiB, written in 1 MiB pieces."""
        self.ram, self.max_file_order, self.ra_pages = ram, max_file_order, ra_pages
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
            assert after.nr_dirty == before.nr_dirty
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
            chunk = min(length, 2 * MIB)
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
        assert all(f.dirtied_at > expired_before for f in fs.dirty_folios())

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

    @precondition(lambda self: self.restarts < 2)
    @rule()
    def restart(self) -> None:
        """Syncs, then brings up a new machine on the same store: all data survives."""
        self.fs.sync()
        assert self.fs.nr_dirty == 0
        self.boot()
        self.restarts += 1
        self.handles.clear()
        self.closed.clear()
        self.hog_pages = 0
        # Per-file settings are not persistent: files come back with the machine's defaults.
        self.settings = dict.fromkeys(self.settings, (None, None))
        for name in self.model:
            self.verify_file(name)

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
            max_order, ra_pages = self.settings[name]
            assert stat.max_order == (self.max_file_order if max_order is None else max_order)
            assert stat.ra_pages == (self.ra_pages if ra_pages is None else ra_pages)
            assert all(order <= stat.max_order for order in stat.folios_by_order)
        info = m.meminfo()
        assert info.dirty_bytes <= info.cached_bytes
        assert info.cached_bytes == info.file_pages_bytes
        assert info.anon_pages_bytes == self.hog_pages * PAGE_SIZE


def test_page_cache_state_machine(tmp_path: Path) -> None:
    """Random operation sequences keep a small machine's files equal to a model of their bytes."""
    set_hypothesis_home_dir(tmp_path / "hypothesis")
    try:
        run_state_machine_as_test(
            PageCacheMachine,
            settings=settings(
                max_examples=30,
                stateful_step_count=40,
                deadline=None,
                database=None,
                suppress_health_check=[HealthCheck.too_slow],
            ),
        )
    finally:
        set_hypothesis_home_dir(None)
