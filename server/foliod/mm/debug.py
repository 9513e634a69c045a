"""Consistency checker of a machine's allocator state (mm/debug.c, CONFIG_DEBUG_VM).

check_machine proves: every frame is free or in exactly one folio, the free lists hold aligned,
unmerged blocks whose totals match nr_free and buddyinfo, the per-(kind, order) folio counts
match the folios that exist, and each owner's page tables count exactly what it maps.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from foliod.mm.filemap import XA_BIG_ORDER, XA_MEDIUM_ORDER, Inode
from foliod.mm.folio_store import MAX_PAGECACHE_ORDER, PG_DIRTY, XA_SHIFT, CacheFolio
from foliod.mm.folio_table import CHUNK_SHIFT, HVO, KIND_CODE, KINDS, PMD_MAPPED, Records
from foliod.mm.huge_memory import HPAGE_PMD_NR
from foliod.mm.machine import Machine
from foliod.mm.memcontrol import tenant_of_file, tenant_of_owner
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

    # Folio objects (page tables, page cache, balloon); owned folios are checked as columns.
    folios: list[Folio | CacheFolio] = []
    table = machine.table
    live = table.live_handles()
    recs = table.records(live)
    _require(len(live) == table.nr_live, f"{table.nr_live} live handles counted, {len(live)} held")
    current = table.next_handle >> CHUNK_SHIFT
    _require(
        all(table.chunks[c].nr_live or c == current for c in table.chunks),
        "an empty handle chunk is kept",
    )
    for chunk_index, chunk in table.chunks.items():
        in_chunk = int(((live >> CHUNK_SHIFT) == chunk_index).sum())
        _require(chunk.nr_live == in_chunk, f"chunk {chunk_index}: {chunk.nr_live} != {in_chunk}")
    _require(
        machine.owner_by_id.keys() == {o.id for o in machine.owners.values()},
        "owner ids disagree",
    )
    owned = 0
    for owner in machine.owners.values():
        _require(machine.owner_by_id[owner.id] is owner, f"owner {owner.name} id mismatch")
        mine = recs.owner == owner.id
        nr_mine = int(mine.sum())
        owned += nr_mine
        _require(nr_mine == owner.nr_folios, f"owner {owner.name}: {owner.nr_folios} != {nr_mine}")
        chunks = dict(
            zip(
                *(a.tolist() for a in np.unique(live[mine] >> CHUNK_SHIFT, return_counts=True)),
                strict=True,
            )
        )
        _require(chunks == owner.chunks, f"owner {owner.name}: chunk counts off")
        _require(nr_mine > 0 or owner.mm is not None, f"owner {owner.name} holds nothing")
        if owner.mm is not None:
            folios.extend(t.folio for level in owner.mm.tables for t in level.values())
            folios.extend(owner.mm.deposited.values())
            _check_page_tables(owner.mm, recs, mine)
    _require(owned == len(live), f"{len(live)} folios, {owned} owned")
    _require(not (recs.vaddr[recs.kind != KIND_CODE[FolioKind.ANON]] >= 0).any(), "mapped non-anon")
    if machine.page_cache is not None:
        folios.extend(_check_page_cache(machine))
    _check_memcgs(machine, recs)
    balloon = machine.balloon
    _require(len(np.unique(balloon)) == len(balloon), "a frame is in the balloon twice")
    spans.extend((pfn, 1, "balloon page") for pfn in balloon.tolist())
    # Frames a snapshot withheld (foliod.mm.snapshot): first pfn, kind, order, count.
    spans.extend((int(r[0]), int(r[3]) << int(r[2]), "withheld run") for r in machine.withheld)
    hvo: dict[int, int] = {}
    has_hvo = (recs.flags & HVO) != 0
    _require(
        (recs.kind[has_hvo] == KIND_CODE[FolioKind.HUGETLB]).all(), "HVO on a non-hugetlb folio"
    )
    for order, n in zip(*np.unique(recs.order[has_hvo], return_counts=True), strict=True):
        hvo[int(order)] = int(n)
    _require(
        hvo == {o: n for o, n in machine.nr_hvo.items() if n},
        f"HVO counts {machine.nr_hvo} != actual {hvo}",
    )

    counts: dict[tuple[FolioKind, int], int] = {}
    keys = recs.kind.astype(np.int16) * 64 + recs.order
    for key, n in zip(*np.unique(keys, return_counts=True), strict=True):
        counts[KINDS[int(key) // 64], int(key) % 64] = int(n)
    sizes = np.int64(1) << recs.order.astype(np.int64)
    misaligned = np.flatnonzero(recs.pfn % sizes)
    _require(not len(misaligned), f"owned folios misaligned at {recs.pfn[misaligned[:3]]}")
    for folio in folios:
        _require(folio.pfn % folio.nr_pages == 0, f"folio at {folio.pfn} misaligned")
        spans.append((folio.pfn, folio.nr_pages, f"{folio.kind} folio"))
        key = (folio.kind, folio.order)
        counts[key] = counts.get(key, 0) + 1
    if len(balloon):
        counts[FolioKind.BALLOON, 0] = counts.get((FolioKind.BALLOON, 0), 0) + len(balloon)
    _require(counts == machine.nr_folios, f"folio counts {machine.nr_folios} != actual {counts}")

    starts = np.concatenate((np.array([s for s, _, _ in spans], np.int64), recs.pfn))
    lengths = np.concatenate((np.array([n for _, n, _ in spans], np.int64), sizes))
    by_start = np.argsort(starts, kind="stable")
    starts, lengths = starts[by_start], lengths[by_start]
    ends = starts + lengths
    overlap = np.flatnonzero(starts[1:] < ends[:-1])
    if len(overlap):
        i = int(overlap[0]) + 1
        raise InconsistentState(
            f"the span at pfn {starts[i]} overlaps the span ending at {ends[i - 1]}"
        )
    end = int(ends[-1]) if len(ends) else 0
    covered = int(lengths.sum())
    _require(end <= machine.nr_pages, f"a span ends at {end}, past {machine.nr_pages} frames")
    _require(covered == machine.nr_pages, f"{covered} of {machine.nr_pages} frames accounted")


def _check_page_tables(mm: MmStruct, recs: Records, mine: npt.NDArray[np.bool_]) -> None:
    name, tables = mm.name, mm.tables
    expected: list[dict[int, int]] = [{} for _ in tables]
    mapped = mine & (recs.vaddr >= 0)
    pmd = mapped & ((recs.flags & PMD_MAPPED) != 0)
    pte = mapped & ~pmd
    nr_pmd_mapped = int(pmd.sum())
    _require(
        len(mm.deposited) == (nr_pmd_mapped if mm.deposit_pgtable else 0),
        f"{name}: {len(mm.deposited)} deposited PTE tables for {nr_pmd_mapped} PMD mappings",
    )
    _require(not (recs.vaddr[pmd] % HPAGE_PMD_NR).any(), f"{name}: PMD mapping misaligned")
    pages = np.int64(1) << recs.order[pte].astype(np.int64)
    pte_tables, inverse = np.unique(recs.vaddr[pte] >> 9, return_inverse=True)
    expected[PTE_LEVEL] = dict(
        zip(
            pte_tables.tolist(),
            np.bincount(inverse, weights=pages).astype(np.int64).tolist(),
            strict=True,
        )
    )
    pmd_tables, counts = np.unique(recs.vaddr[pmd] >> 18, return_counts=True)
    expected[PMD_LEVEL] = dict(zip(pmd_tables.tolist(), counts.tolist(), strict=True))
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
        _require(all(inode.get(i) < 0 for i in range(head, head + span)), f"{name}: cached")
        end = head + span - 1
    blocks: dict[int, int] = {}
    for head in orders:
        blocks[head >> MAX_PAGECACHE_ORDER] = blocks.get(head >> MAX_PAGECACHE_ORDER, 0) + 1
    _require(blocks == inode.large_shadow_blocks, f"{inode.name}: large entries miscounted")


def _check_memcgs(machine: Machine, recs: Records) -> None:
    """Each tenant's charges equal what its owners and files hold (memcontrol)."""
    pages = np.left_shift(1, recs.order.astype(np.int64))
    files = machine.page_cache.files if machine.page_cache is not None else {}
    handles = machine.page_cache.handles if machine.page_cache is not None else {}
    for name, memcg in machine.memcgs.items():
        owners = [o for o in machine.owners.values() if o.memcg is memcg]
        _require(
            all(tenant_of_owner(o.name) == name for o in owners), f"memcg {name}: foreign owner"
        )
        owned = int(pages[np.isin(recs.owner, [o.id for o in owners])].sum())
        _require(owned == memcg.nr_owned, f"memcg {name}: {memcg.nr_owned} owned, {owned} held")
        mine = [i for i in files.values() if i.memcg is memcg]
        cached = sum(i.nr_pages for i in mine)
        _require(cached == memcg.nr_cache, f"memcg {name}: {memcg.nr_cache} cached, {cached} held")
        _require(len(mine) == memcg.nr_files, f"memcg {name}: {memcg.nr_files} files counted")
        nr_open = sum(1 for h in handles.values() if h.inode.memcg is memcg)
        _require(nr_open == memcg.nr_open_files, f"memcg {name}: {memcg.nr_open_files} open")
    for owner in machine.owners.values():
        tenant = tenant_of_owner(owner.name)
        _require(
            owner.memcg is (None if tenant is None else machine.memcgs.get(tenant)),
            f"owner {owner.name}: charged to the wrong memcg",
        )
    for inode in files.values():
        tenant = tenant_of_file(inode.name)
        _require(
            inode.memcg is (None if tenant is None else machine.memcgs.get(tenant)),
            f"file {inode.name}: charged to the wrong memcg",
        )


def _check_page_cache(machine: Machine) -> list[CacheFolio]:
    """Mappings, LRU lists, folio columns and dirty counts agree; returns the cached folios."""
    cache = machine.page_cache
    assert cache is not None
    store = cache.folio_store
    cached: list[CacheFolio] = []
    nr_dirty_total = 0
    for inode in cache.files.values():
        _require(cache.inodes.get(inode.number) is inode, f"{inode.name}: inode number off")
        end = -1
        nr_pages = nr_dirty = 0
        by_order = [0] * len(inode.nr_by_order)
        for index, f in inode.heads():
            folio = cache.folio(f)
            name = f"{inode.name}[{index}]"
            _require(
                store.mapping[f] == inode.number and folio.index == index, f"{name}: wrong mapping"
            )
            _require(index % folio.nr_pages == 0, f"{name}: misaligned order-{folio.order}")
            _require(index > end, f"{name}: overlaps the folio ending at {end}")
            _require(folio.order <= inode.top_order, f"{name}: above top_order {inode.top_order}")
            _require(inode.get(index + folio.nr_pages - 1) == f, f"{name}: not found at its end")
            _require(folio.dirty == (f in store.dirtied_at), f"{name}: dirty time off")
            end = index + folio.nr_pages - 1
            nr_pages += folio.nr_pages
            nr_dirty += folio.nr_pages if folio.dirty else 0
            by_order[folio.order] += 1
            cached.append(folio)
        _require(by_order == inode.nr_by_order, f"{inode.name}: folios by order miscounted")
        for leaves, kept in (
            (inode.leaves, inode.leaf_counts),
            (inode.medium, inode.medium_counts),
        ):
            counts = {n: sum(1 for v in leaf if v) for n, leaf in leaves.items()}
            _require(counts == kept, f"{inode.name}: leaf counts off")
            _require(all(counts.values()), f"{inode.name}: an empty leaf is kept")
        for index, f in inode.heads():
            order = store.order[f]
            where = 0 if order < XA_MEDIUM_ORDER else 1 if order < XA_BIG_ORDER else 2
            _require(
                inode.head_at(index) == f
                and (index in inode.big) == (where == 2)
                and ((index >> (XA_SHIFT + XA_MEDIUM_ORDER)) in inode.medium or where != 1),
                f"{inode.name}[{index}]: kept at the wrong level for order {order}",
            )
        large: dict[int, int] = {}
        for index, f in inode.heads():
            if store.order[f]:
                large[index >> MAX_PAGECACHE_ORDER] = large.get(index >> MAX_PAGECACHE_ORDER, 0) + 1
        _require(large == inode.large_blocks, f"{inode.name}: large folios miscounted")
        _check_shadows(inode)
        _require(nr_pages == inode.nr_pages, f"{inode.name}: {inode.nr_pages} != {nr_pages}")
        _require(nr_dirty == inode.nr_dirty, f"{inode.name}: dirty {inode.nr_dirty} != {nr_dirty}")
        nr_dirty_total += nr_dirty
    _require(sum(f.nr_pages for f in cached) == cache.nr_pages, "page cache page count wrong")
    _require(nr_dirty_total == cache.nr_dirty, "page cache dirty count wrong")
    ids = {folio.id for folio in cached}
    _require(
        set(store.dirtied_at) <= ids and set(store.contents) <= ids,
        "a folio no longer cached keeps data or a dirty time",
    )
    _require(
        all(store.flags[f] & PG_DIRTY for f in store.dirtied_at), "dirty time of a clean folio"
    )
    policy = machine.lru
    held = list(policy.folios())
    _require(len(set(held)) == len(held), f"{policy.name}: a folio is listed twice")
    _require(set(held) == ids, f"{policy.name} and the page cache hold different folios")
    _require(not set(store.free_ids.tolist()) & ids, "a cached folio's id is free")
    try:
        policy.check()
    except AssertionError as exc:
        raise InconsistentState(str(exc)) from exc
    return cached
