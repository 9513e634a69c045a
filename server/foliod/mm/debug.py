"""Consistency checker of a machine's allocator state (mm/debug.c, CONFIG_DEBUG_VM).

check_machine proves: every frame is free or in exactly one folio, the free lists hold aligned,
unmerged blocks whose totals match nr_free and buddyinfo, the per-(kind, order) folio counts
match the folios that exist, and each owner's page tables count exactly what it maps.
"""

from __future__ import annotations

from foliod.mm.filemap import MAX_PAGECACHE_ORDER, Inode
from foliod.mm.huge_memory import HPAGE_PMD_NR
from foliod.mm.machine import Machine
from foliod.mm.memory import PGD_LEVEL, PMD_LEVEL, PTE_LEVEL, PUD_LEVEL, MmStruct
from foliod.mm.mm_types import Folio, FolioKind
from foliod.mm.page_alloc import MAX_PAGE_ORDER


class InconsistentState(AssertionError):
    """The machine's state breaks an invariant: a bug in foliod, never a user error."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise InconsistentState(message)


def check_machine(machine: Machine) -> None:
    """Raises InconsistentState naming the first broken invariant."""
    zone = machine.zone
    spans: list[tuple[int, int, str]] = []
    nr_free = 0
    for order, area in enumerate(zone.free_area):
        for pfn in area:
            _require(pfn % (1 << order) == 0, f"free block {pfn} misaligned for order {order}")
            if order < MAX_PAGE_ORDER:
                _require(
                    (pfn ^ (1 << order)) not in area,
                    f"free block {pfn} and its buddy both free at order {order}",
                )
            spans.append((pfn, 1 << order, f"free order-{order} block"))
            nr_free += 1 << order
    _require(nr_free == zone.nr_free, f"free lists hold {nr_free} pages, nr_free {zone.nr_free}")
    _require(zone.buddyinfo() == [len(a) for a in zone.free_area], "buddyinfo disagrees")

    folios: list[Folio] = list(machine.folios.values())
    for owner in machine.owners.values():
        for handle, folio in owner.folios.items():
            _require(
                machine.folios.get(handle) is folio, f"owner {owner.name} holds stray {handle}"
            )
            _require(folio.owner == owner.name, f"folio {handle} owner mismatch")
        if owner.mm is not None:
            folios.extend(t.folio for level in owner.mm.tables for t in level.values())
            folios.extend(owner.mm.deposited.values())
            _check_page_tables(owner.mm, list(owner.folios.values()))
    if machine.page_cache is not None:
        folios.extend(_check_page_cache(machine))
    folios.extend(machine.balloon)
    _require(all(f.kind is FolioKind.BALLOON for f in machine.balloon), "balloon holds non-balloon")
    hvo: dict[int, int] = {}
    for folio in folios:
        if folio.hvo:
            _require(folio.kind is FolioKind.HUGETLB, f"HVO on a {folio.kind} folio")
            hvo[folio.order] = hvo.get(folio.order, 0) + 1
    _require(
        hvo == {o: n for o, n in machine.nr_hvo.items() if n},
        f"HVO counts {machine.nr_hvo} != actual {hvo}",
    )
    owned = sum(len(o.folios) for o in machine.owners.values())
    _require(owned == len(machine.folios), f"{len(machine.folios)} folios, {owned} owned")

    counts: dict[tuple[FolioKind, int], int] = {}
    for folio in folios:
        _require(folio.pfn % folio.nr_pages == 0, f"folio at {folio.pfn} misaligned")
        spans.append((folio.pfn, folio.nr_pages, f"{folio.kind} folio {folio.handle}"))
        key = (folio.kind, folio.order)
        counts[key] = counts.get(key, 0) + 1
    _require(counts == machine.nr_folios, f"folio counts {machine.nr_folios} != actual {counts}")

    spans.sort()
    end = 0
    for start, length, what in spans:
        _require(start >= end, f"{what} at pfn {start} overlaps the span ending at {end}")
        end = start + length
    covered = sum(length for _, length, _ in spans)
    _require(end <= machine.nr_pages, f"a span ends at {end}, past {machine.nr_pages} frames")
    _require(covered == machine.nr_pages, f"{covered} of {machine.nr_pages} frames accounted")


def _check_page_tables(mm: MmStruct, mapped: list[Folio]) -> None:
    name, tables = mm.name, mm.tables
    expected: list[dict[int, int]] = [{} for _ in tables]
    pmd_mapped = sum(1 for folio in mapped if folio.pmd_mapped)
    _require(
        len(mm.deposited) == (pmd_mapped if mm.deposit_pgtable else 0),
        f"{name}: {len(mm.deposited)} deposited PTE tables for {pmd_mapped} PMD mappings",
    )
    for folio in mapped:
        if folio.vaddr < 0:
            continue
        if folio.pmd_mapped:
            _require(folio.vaddr % HPAGE_PMD_NR == 0, f"{name}: PMD mapping misaligned")
            level, entries = PMD_LEVEL, 1
        else:
            level, entries = PTE_LEVEL, folio.nr_pages
        index = folio.vaddr >> (9 * (level + 1))
        expected[level][index] = expected[level].get(index, 0) + entries
    for level in (PTE_LEVEL, PMD_LEVEL, PUD_LEVEL):
        for index in list(expected[level]) + [i for i in tables[level] if i not in expected[level]]:
            want = expected[level].get(index, 0)
            table = tables[level].get(index)
            _require(
                (table.entries if table else 0) == want,
                f"{name}: level {level} table {index} counts "
                f"{table.entries if table else 0} entries, maps {want}",
            )
            if want and level + 1 <= PGD_LEVEL:
                parent = index >> 9
                expected[level + 1][parent] = expected[level + 1].get(parent, 0) + 1
    pgd = tables[PGD_LEVEL].get(0)
    _require(
        (pgd.entries if pgd else 0) == expected[PGD_LEVEL].get(0, 0),
        f"{name}: PGD entry count wrong",
    )


def _check_shadows(inode: Inode) -> None:
    """Shadow entries are aligned to their order, never overlap and cover no cached page."""
    orders = inode.shadow_orders
    _require(orders.keys() <= inode.shadows.keys(), f"{inode.name}: orders without entries")
    end = -1
    for head in sorted(inode.shadows):
        span = inode.shadow_span(head)
        name = f"{inode.name} shadow [{head}, {head + span})"
        _require(head % span == 0, f"{name}: misaligned")
        if head in orders:
            _require(0 < orders[head] <= MAX_PAGECACHE_ORDER, f"{name}: order out of bounds")
        _require(head > end, f"{name}: overlaps the entry ending at {end}")
        _require(all(inode.find(i) is None for i in range(head, head + span)), f"{name}: cached")
        end = head + span - 1
    blocks: dict[int, int] = {}
    for head in orders:
        blocks[head >> MAX_PAGECACHE_ORDER] = blocks.get(head >> MAX_PAGECACHE_ORDER, 0) + 1
    _require(blocks == inode.large_shadow_blocks, f"{inode.name}: large entries miscounted")


def _check_page_cache(machine: Machine) -> list[Folio]:
    """Mappings, LRU lists and dirty counts agree; returns the cached folios."""
    cache = machine.page_cache
    assert cache is not None
    cached: list[Folio] = []
    nr_dirty_total = 0
    for inode in cache.files.values():
        end = -1
        nr_pages = nr_dirty = 0
        for index in sorted(inode.folios):
            folio = inode.folios[index]
            name = f"{inode.name}[{index}]"
            _require(folio.mapping is inode and folio.index == index, f"{name}: wrong mapping")
            _require(index % folio.nr_pages == 0, f"{name}: misaligned order-{folio.order}")
            _require(index > end, f"{name}: overlaps the folio ending at {end}")
            _require(folio.order <= inode.top_order, f"{name}: above top_order {inode.top_order}")
            _require(folio.nr_pages == 1 << folio.order, f"{name}: nr_pages off")
            end = index + folio.nr_pages - 1
            nr_pages += folio.nr_pages
            nr_dirty += folio.nr_pages if folio.dirty else 0
            cached.append(folio)
        large: dict[int, int] = {}
        for index, folio in inode.folios.items():
            if folio.order:
                large[index >> MAX_PAGECACHE_ORDER] = large.get(index >> MAX_PAGECACHE_ORDER, 0) + 1
        _require(large == inode.large_blocks, f"{inode.name}: large folios miscounted")
        _check_shadows(inode)
        _require(nr_pages == inode.nr_pages, f"{inode.name}: {inode.nr_pages} != {nr_pages}")
        _require(nr_dirty == inode.nr_dirty, f"{inode.name}: dirty {inode.nr_dirty} != {nr_dirty}")
        nr_dirty_total += nr_dirty
    _require(sum(f.nr_pages for f in cached) == cache.nr_pages, "page cache page count wrong")
    _require(nr_dirty_total == cache.nr_dirty, "page cache dirty count wrong")
    policy = machine.lru
    held = list(policy.folios())
    _require(len(set(held)) == len(held), f"{policy.name}: a folio is listed twice")
    _require(set(held) == set(cached), f"{policy.name} and the page cache hold different folios")
    try:
        policy.check()
    except AssertionError as exc:
        raise InconsistentState(str(exc)) from exc
    return cached
