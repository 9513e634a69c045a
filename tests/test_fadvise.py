"""POSIX_FADV_DONTNEED (PageCache.fadvise_dontneed): what mm/fadvise.c and
mapping_try_invalidate drop and what they keep."""

from __future__ import annotations

from pathlib import Path

import pytest

from foliod.mm import PAGE_SIZE, InvalidArgument, Machine, check_machine
from foliod.mm.backing_dev import DEVICE_PROFILES, BackingStore
from foliod.mm.filemap import PageCache

MIB = 1 << 20


def _machine(tmp_path: Path) -> Machine:
    machine = Machine("fadvise", 1 << 30, store=BackingStore(tmp_path, DEVICE_PROFILES["nvme"]))
    for name in ("a", "b"):
        machine.files.create(name)
    return machine


def _folios(files: PageCache, name: str) -> dict[int, int]:
    return {index: folio.order for index, folio in files.lookup(name).folios.items()}


def test_dontneed_drops_clean_folios_wholly_inside_the_full_pages(tmp_path: Path) -> None:
    """Only full pages of the range count; a folio reaching past either end stays, and so do
    the partial pages at the ends; the folios dropped leave no shadow entries."""
    machine = _machine(tmp_path)
    files = machine.files
    for offset in range(0, 8 * MIB, 2 * MIB):  # order-9 folios at 0, 512, 1024, 1536
        files.write("a", offset, bytes(2 * MIB))
    files.writeback("a")
    files.write("b", 0, bytes(64 * PAGE_SIZE))
    files.writeback("b")
    # b: 64 pages as one order-6 folio; drop pages 1..62 only: it reaches past both: stays.
    assert files.fadvise_dontneed("b", PAGE_SIZE, 62 * PAGE_SIZE) == 0
    assert _folios(files, "b") == {0: 6}
    # a: [512 pages + 1 byte, 1536 pages + 100 bytes): full pages 513..1535: only the folio at
    # 1024 lies wholly inside (512 starts before, 1536's page is partial).
    freed = files.fadvise_dontneed("a", 512 * PAGE_SIZE + 1, 1024 * PAGE_SIZE + 99)
    assert freed == 512
    assert _folios(files, "a") == {0: 9, 512: 9, 1536: 9}
    assert not files.lookup("a").shadows
    check_machine(machine)


@pytest.mark.slow
def test_dontneed_of_a_whole_file_and_the_last_page(tmp_path: Path) -> None:
    """Length 0 means to the end of the file; a range ending on the file's last byte takes the
    last page even when it is partial."""
    machine = _machine(tmp_path)
    files = machine.files
    files.write("a", 0, bytes(10 * PAGE_SIZE + 5))
    files.writeback("a")
    size = 10 * PAGE_SIZE + 5
    assert files.fadvise_dontneed("a", 10 * PAGE_SIZE, size - 10 * PAGE_SIZE) == 1
    assert 10 not in {i for i, o in _folios(files, "a").items() for i in range(i, i + (1 << o))}
    assert files.fadvise_dontneed("a", 0, 0) == 10
    assert _folios(files, "a") == {}
    check_machine(machine)


@pytest.mark.slow
def test_dirty_folios_are_written_back_and_stay(tmp_path: Path) -> None:
    """Dirty folios in the range are written back (under writeback when invalidation comes, so
    they stay, clean), and the file's bytes are intact."""
    machine = _machine(tmp_path)
    files = machine.files
    files.write("a", 0, b"y" * (8 * PAGE_SIZE))
    assert files.nr_dirty == 8
    assert files.fadvise_dontneed("a", 0, 0) == 0
    assert files.nr_dirty == 0
    assert _folios(files, "a") == {0: 3}
    assert files.fadvise_dontneed("a", 0, 0) == 8  # clean now: the second call drops it
    assert files.read("a", 0, 8 * PAGE_SIZE)[0] == b"y" * (8 * PAGE_SIZE)
    check_machine(machine)


@pytest.mark.slow
def test_dontneed_clears_shadow_entries_in_the_range(tmp_path: Path) -> None:
    """Shadow entries that reclaim left in the range go (clear_shadow_entry); those outside
    stay."""
    machine = _machine(tmp_path)
    files = machine.files
    files.write("a", 0, bytes(8 * PAGE_SIZE))
    files.writeback("a")
    inode = files.lookup("a")
    files.fadvise_dontneed("a", 0, 0)
    for index in range(8):
        inode.add_shadow(index, 0, 100 + index)
    files.fadvise_dontneed("a", 2 * PAGE_SIZE, 3 * PAGE_SIZE)
    assert sorted(inode.shadows) == [0, 1, 5, 6, 7]


@pytest.mark.parametrize(("offset", "length"), [(-1, 10), (0, -5)])
def test_bad_ranges_are_refused_and_change_nothing(
    tmp_path: Path, offset: int, length: int
) -> None:
    machine = _machine(tmp_path)
    files = machine.files
    files.write("a", 0, bytes(4 * PAGE_SIZE))
    files.writeback("a")
    with pytest.raises(InvalidArgument):
        files.fadvise_dontneed("a", offset, length)
    assert _folios(files, "a") == {0: 2}
