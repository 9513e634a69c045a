"""Regressions found by the page cache state machine, pinned one by one."""

from __future__ import annotations

from pathlib import Path

import pytest

from foliod.mm import AlreadyExists, FolioKind, InvalidArgument, Machine, check_machine
from foliod.mm.backing_dev import DEVICE_PROFILES, BackingStore
from foliod.mm.filemap import PageCache


def _machine(tmp_path: Path, ram: int, policy: str = "two_list") -> tuple[Machine, PageCache]:
    store = BackingStore(tmp_path / "store", DEVICE_PROFILES["nvme"])
    machine = Machine("t", ram, store=store, reclaim_policy=policy)
    return machine, machine.files


def test_truncate_split_allocates_nothing_even_below_low(tmp_path: Path) -> None:
    """Truncating into a large folio below the low watermark completes, and leaves nothing busy."""
    m, fs = _machine(tmp_path, 4 << 20)
    fs.create("f", max_order=2)
    m.allocate("hog", FolioKind.SLAB, count=m.zone.nr_free - 90)
    fs.write("f", 0, b"y" * 65536)
    fs.truncate("f", 4097)
    assert fs.stat("f").size_bytes == 4097
    assert fs.read("f", 0, 8192)[0] == b"y" * 4097
    assert not fs.busy
    check_machine(m)


def test_split_pages_are_reclaimable_after_truncate(tmp_path: Path) -> None:
    """Pages kept by a split are ordinary cached pages that reclaim can take."""
    m, fs = _machine(tmp_path, 8 << 20)
    fs.create("f", max_order=2)
    fs.write("f", 0, b"z" * 16384)
    fs.sync()
    fs.truncate("f", 5000)
    assert m.reclaim(1 << 20) == 2 * 4096
    check_machine(m)


def test_a_name_is_a_file_or_a_directory(tmp_path: Path) -> None:
    """A file cannot take a directory's name, nor sit below another file."""
    _, fs = _machine(tmp_path, 8 << 20)
    fs.create("a/b")
    with pytest.raises(AlreadyExists):
        fs.create("a")
    fs.create("c")
    with pytest.raises(InvalidArgument):
        fs.create("c/d")
    with pytest.raises(InvalidArgument):
        fs.create("\ud800")
    assert sorted(fs.files) == ["a/b", "c"]


def test_large_read_on_a_small_machine_is_best_effort_readahead(tmp_path: Path) -> None:
    """A 2 MiB read on a 4 MiB machine succeeds: readahead shrinks, the read does not fail."""
    m, fs = _machine(tmp_path, 4 << 20)
    fs.create("f")
    fs.truncate("f", 4 << 20)
    data, stats = fs.read("f", 0, 2 << 20)
    assert data == bytes(2 << 20)
    assert stats.pages_hit + stats.pages_missed == 512
    check_machine(m)


def test_read_keeps_its_folio_while_async_readahead_reclaims(tmp_path: Path) -> None:
    """Reclaim during an async window does not take the folio the read is on."""
    for policy in ("lru", "two_list"):
        m, fs = _machine(tmp_path / policy, 4 << 20, policy)
        fs.create("g", ra_pages=0)
        fs.create("f")
        fs.write("g", 0, b"g" * 8 * 4096)
        fs.write("f", 0, b"f" * 64 * 4096)
        fs.sync()
        fs.drop_caches()
        fs.read("g", 0, 8 * 4096)
        fs.read("f", 0, 16384)
        m.allocate("hog", FolioKind.SLAB, count=m.zone.nr_free - m.watermarks.nr_low)
        data, stats = fs.read("f", 16384, 4096)
        assert data == b"f" * 4096
        assert fs.files["f"].find(4) is not None or stats.pages_missed == 1
        check_machine(m)


def test_large_folio_allocation_does_not_empty_the_cache(tmp_path: Path) -> None:
    """A write that cannot get a 2 MiB block falls back to small folios instead of evicting all."""
    m, fs = _machine(tmp_path, 8 << 20)
    # Pin one slab page in every 2 MiB so no order-9 block can form again.
    every = m.allocate("frag", FolioKind.SLAB, count=m.zone.nr_free - m.watermarks.nr_min - 1)
    handles = range(every.first_handle, every.first_handle + every.count)
    m.free([h for h in handles if m.folios[h].pfn % 512])
    assert not any(m.zone.free_area[9:])
    fs.create("a", max_order=0)
    for chunk in range(0, 1600, 400):
        fs.write("a", chunk * 4096, b"a" * 400 * 4096)
    fs.sync()
    check_machine(m)
    fs.create("b")
    cached_before = fs.stat("a").nr_cached
    fs.write("b", 0, b"b" * (2 << 20))
    assert fs.stat("a").nr_cached > cached_before // 2
    check_machine(m)


def test_per_file_settings_survive_a_restart(tmp_path: Path) -> None:
    """max_order and ra_pages given at create come back after a restart; deleting forgets them."""

    def boot() -> Machine:
        return Machine("m", 64 << 20, store=BackingStore(tmp_path, DEVICE_PROFILES["nvme"]))

    first = boot().files
    first.create("small", max_order=0, ra_pages=0)
    first.create("wide", ra_pages=64)
    first.create("plain")
    first.create("gone", max_order=2)
    first.delete("gone")
    files = boot().files
    assert (files.files["small"].max_order, files.files["small"].ra.ra_pages) == (0, 0)
    assert (files.files["wide"].max_order, files.files["wide"].ra.ra_pages) == (9, 64)
    assert (files.files["plain"].max_order, files.files["plain"].ra.ra_pages) == (9, 32)
    assert sorted(files.files) == ["plain", "small", "wide"]
    again = files.create("gone")
    assert again.max_order == 9


def test_the_settings_directory_is_not_a_file_name(tmp_path: Path) -> None:
    """Names under .foliod are refused, and a damaged settings record falls back to defaults."""
    files = Machine("m", 64 << 20, store=BackingStore(tmp_path, DEVICE_PROFILES["nvme"])).files
    for name in (".foliod", ".foliod/files.json", ".foliod/x/y"):
        with pytest.raises(InvalidArgument) as caught:
            files.create(name)
        assert caught.value.field == "name"
    files.create("a", max_order=1)
    files.create("dir/.foliod")  # only the top-level name is reserved
    (tmp_path / ".foliod" / "files.json").write_text("{not json", encoding="utf-8")
    reborn = Machine("m", 64 << 20, store=BackingStore(tmp_path, DEVICE_PROFILES["nvme"])).files
    assert sorted(reborn.files) == ["a", "dir/.foliod"]
    assert reborn.files["a"].max_order == 9
