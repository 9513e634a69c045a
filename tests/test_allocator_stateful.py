"""Stateful property tests of the buddy allocator, folios and owners, plus hand-computed pins."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, cast

import pytest
from hypothesis import settings
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

from foliod.mm import (
    MAX_FOLIOS_PER_CALL,
    MAX_IO_BYTES,
    FolioAlreadyFreed,
    FolioKind,
    InvalidArgument,
    Machine,
    MthpStat,
    OutOfMemory,
    OutOfRange,
    ThpPolicy,
    ThpSetting,
    UnknownFolio,
    UnknownOwner,
    VmEvent,
    check_machine,
)
from foliod.mm.huge_memory import ANON_MTHP_ORDERS, HPAGE_PMD_NR, HPAGE_PMD_ORDER
from foliod.mm.machine import VALID_ORDERS
from foliod.mm.page_alloc import MAX_PAGE_ORDER, PAGE_SIZE, Watermarks, calculate_watermarks

MIB = 1 << 20
# Small machines so that out-of-memory and fragmentation are common; two are not powers of two.
RAM_SIZES = (1 * MIB, 3 * MIB + PAGE_SIZE, 4 * MIB, 6 * MIB + 3 * PAGE_SIZE, 8 * MIB, 16 * MIB)
OWNERS = ("a", "b", "c", "db:1", "x.y-z_0")
BAD_OWNERS = (
    "",
    "has space",
    "x" * 65,
    "\u00fcn\u00ef",
    "a/b/c",
)  # "a/b" is owner b in tenant a's namespace
NON_ANON_KINDS = (FolioKind.FILE, FolioKind.SLAB, FolioKind.PAGETABLE, FolioKind.HUGETLB)
DEFAULT_THP_SIZES = {
    order: ThpSetting.INHERIT if order == HPAGE_PMD_ORDER else ThpSetting.NEVER
    for order in ANON_MTHP_ORDERS
}


class Live(NamedTuple):
    """The model of one live folio: who holds it, what it is and its order."""

    owner: str
    kind: FolioKind
    order: int


@dataclass(frozen=True)
class Snapshot:
    """Every piece of machine state that a rejected or failed operation must leave alone."""

    buddyinfo: list[int]
    free_blocks: tuple[frozenset[int], ...]
    nr_free: int
    nr_folios: dict[tuple[FolioKind, int], int]
    folios: dict[int, tuple[str, FolioKind, int, int]]
    owners: dict[str, tuple[frozenset[int], int, int]]
    next_handle: int
    thp_enabled: ThpSetting
    thp_sizes: dict[int, ThpSetting]
    thp_nr_anon: dict[int, int]


def snapshot(m: Machine) -> Snapshot:
    """Copies the allocator, folio, owner and THP state of a machine."""
    owners = {
        name: (
            frozenset(holder.folios),
            holder.mm.next_vpage if holder.mm is not None else -1,
            holder.mm.nr_pagetable_pages if holder.mm is not None else -1,
        )
        for name, holder in m.owners.items()
    }
    return Snapshot(
        buddyinfo=m.zone.buddyinfo(),
        free_blocks=tuple(frozenset(area) for area in m.zone.free_area),
        nr_free=m.zone.nr_free,
        nr_folios=dict(m.nr_folios),
        folios={h: (f.owner, f.kind, f.order, f.pfn) for h, f in m.folios.items()},
        owners=owners,
        next_handle=m.next_handle,
        thp_enabled=m.thp.enabled,
        thp_sizes=dict(m.thp.sizes),
        thp_nr_anon=dict(m.thp.nr_anon),
    )


def obtainable_blocks(m: Machine, order: int) -> int:
    """How many 2^order blocks the free lists can yield by splitting, watermarks aside."""
    info = m.zone.buddyinfo()
    return sum(n << (o - order) for o, n in enumerate(info) if o >= order)


def table_pages(m: Machine) -> int:
    """Page-table pages held by all owners' address spaces."""
    return sum(h.mm.nr_pagetable_pages for h in m.owners.values() if h.mm is not None)


def mthp_stats(m: Machine) -> dict[int, dict[MthpStat, int]]:
    """A copy of the per-size mTHP counters."""
    return {order: dict(stats) for order, stats in m.thp.stats.items()}


class AllocatorMachine(RuleBasedStateMachine):
    """Drives one small Machine with random operations and checks it against a plain model."""

    def __init__(self) -> None:
        super().__init__()
        self.m = Machine("stateful", 8 * MIB)
        self.live: dict[int, Live] = {}
        self.freed: set[int] = set()
        self.next_handle = 1
        # Owners with an address space: it (and its PGD) lives until release_owner.
        self.anon_owners: set[str] = set()
        self.writes: dict[int, list[tuple[int, bytes]]] = {}
        self.thp_enabled = ThpSetting.ALWAYS
        self.thp_sizes = dict(DEFAULT_THP_SIZES)
        self.nr_tables = 0

    # -- helpers -----------------------------------------------------------------------------

    def expected_owners(self) -> set[str]:
        """Owners the machine must know: holders of live folios and of address spaces."""
        return {live.owner for live in self.live.values()} | self.anon_owners

    def allowed_orders(self, madvised: bool) -> list[int]:
        """The model's enabled mTHP orders, largest first."""
        out = []
        for order in reversed(ANON_MTHP_ORDERS):
            setting = self.thp_sizes[order]
            if setting is ThpSetting.INHERIT:
                setting = self.thp_enabled
            if setting is ThpSetting.ALWAYS or (setting is ThpSetting.MADVISE and madvised):
                out.append(order)
        return out

    def expected_read(self, handle: int, offset: int, length: int) -> bytes:
        """Replays the recorded writes over zeros for one byte range of a folio."""
        out = bytearray(length)
        for start, data in self.writes.get(handle, []):
            lo, hi = max(start, offset), min(start + len(data), offset + length)
            if lo < hi:
                out[lo - offset : hi - offset] = data[lo - start : hi - start]
        return bytes(out)

    def forget(self, handles: list[int]) -> None:
        """Moves freed handles from live to freed and drops their contents."""
        for handle in handles:
            del self.live[handle]
            self.writes.pop(handle, None)
            self.freed.add(handle)

    def counts(self, order: int) -> st.SearchStrategy[int]:
        """Folio counts: small, right at the min watermark, or up to twice the machine."""
        headroom = (self.m.zone.nr_free - self.m.watermarks.nr_min) >> order
        return st.one_of(
            st.integers(1, 4),
            st.integers(max(1, headroom - 2), max(1, headroom + 2)),
            st.integers(1, max(1, (2 * self.m.nr_pages) >> order)),
        )

    def record(self, owner: str, kind: FolioKind, first: int, count: int) -> None:
        """Adds the folios of a successful allocate call to the model."""
        assert first == self.next_handle, "handles are handed out consecutively, never reused"
        for handle in range(first, first + count):
            folio = self.m.folios[handle]
            self.live[handle] = Live(owner, kind, folio.order)
        self.next_handle = first + count

    # -- set-up ------------------------------------------------------------------------------

    @initialize(
        ram=st.sampled_from(RAM_SIZES),
        deposit=st.booleans(),
        thp=st.one_of(
            st.none(),
            st.tuples(
                st.sampled_from([ThpSetting.ALWAYS, ThpSetting.MADVISE, ThpSetting.NEVER]),
                st.dictionaries(
                    st.sampled_from(ANON_MTHP_ORDERS), st.sampled_from(list(ThpSetting))
                ),
            ),
        ),
    )
    def boot(
        self, ram: int, deposit: bool, thp: tuple[ThpSetting, dict[int, ThpSetting]] | None
    ) -> None:
        """Boots a machine of one of a few small sizes, with default or random mTHP knobs."""
        policy = None
        if thp is not None:
            policy = ThpPolicy(*thp)
            self.thp_enabled = thp[0]
            self.thp_sizes.update(thp[1])
        self.m = Machine("stateful", ram, deposit_pgtable=deposit, thp=policy)
        assert self.m.zone.nr_free == self.m.nr_pages == ram // PAGE_SIZE
        assert self.m.thp.enabled is self.thp_enabled
        assert self.m.thp.sizes == self.thp_sizes

    # -- allocation --------------------------------------------------------------------------

    @rule(
        data=st.data(),
        kind=st.sampled_from(NON_ANON_KINDS),
        owner=st.sampled_from(OWNERS),
        by_bytes=st.booleans(),
    )
    def allocate_folios(
        self, data: st.DataObject, kind: FolioKind, owner: str, by_bytes: bool
    ) -> None:
        """Allocates non-anon folios; success or OutOfMemory is predicted exactly."""
        m = self.m
        order = data.draw(st.sampled_from(VALID_ORDERS[kind]), label="order")
        count = data.draw(self.counts(order), label="count")
        default_order = order == VALID_ORDERS[kind][0] and data.draw(st.booleans(), label="unset")
        nr_pages = count << order
        before = snapshot(m)
        pgalloc = m.events[VmEvent.PGALLOC]

        def call() -> None:
            result = m.allocate(
                owner,
                kind,
                order=None if default_order else order,
                count=0 if by_bytes else count,
                nr_bytes=nr_pages * PAGE_SIZE if by_bytes else 0,
            )
            assert result.first_handle == self.next_handle
            assert result.count == count
            assert result.nr_pages == nr_pages
            assert result.folios_by_order == {order: count}
            assert result.nr_pagetable_pages == 0

        if nr_pages > m.nr_pages:
            with pytest.raises(InvalidArgument):
                call()
            assert snapshot(m) == before
            return
        fits = (
            nr_pages <= m.zone.nr_free - m.watermarks.nr_min
            and obtainable_blocks(m, order) >= count
        )
        if not fits:
            with pytest.raises(OutOfMemory):
                call()
            assert snapshot(m) == before
            return
        call()
        assert m.zone.nr_free == before.nr_free - nr_pages
        assert m.zone.nr_free >= m.watermarks.nr_min
        assert m.events[VmEvent.PGALLOC] == pgalloc + nr_pages
        self.record(owner, kind, self.next_handle, count)

    @rule(
        data=st.data(),
        owner=st.sampled_from(OWNERS),
        by_bytes=st.booleans(),
        madvise=st.booleans(),
    )
    def allocate_anon(self, data: st.DataObject, owner: str, by_bytes: bool, madvise: bool) -> None:
        """Allocates anon memory by fixed order or by the mTHP knobs; failures change nothing."""
        m = self.m
        order = data.draw(
            st.one_of(st.none(), st.sampled_from(VALID_ORDERS[FolioKind.ANON])), label="order"
        )
        unit_order = order or 0
        if order is None and by_bytes:
            headroom = m.zone.nr_free - m.watermarks.nr_min
            nr_pages = data.draw(
                st.one_of(
                    st.integers(1, 600),
                    st.integers(1, m.nr_pages + 8),
                    self.counts(0),
                    # Just under the min watermark, so that page tables or large orders fail.
                    st.integers(max(1, headroom - 40), max(1, headroom)),
                    st.integers(max(1, headroom - 8), max(1, headroom)),
                ),
                label="pages",
            )
            count = 0
        else:
            count = data.draw(self.counts(unit_order), label="count")
            nr_pages = count << unit_order
        before = snapshot(m)
        stats = mthp_stats(m)
        events = dict(m.events)
        holder = m.owners.get(owner)
        tables_before = holder.mm.nr_pagetable_pages if holder and holder.mm else 0

        def call() -> tuple[int, int, int, dict[int, int], int]:
            r = m.allocate(
                owner,
                FolioKind.ANON,
                order=order,
                count=0 if by_bytes else count,
                nr_bytes=nr_pages * PAGE_SIZE if by_bytes else 0,
                madvise_hugepage=madvise,
            )
            return r.first_handle, r.count, r.nr_pages, r.folios_by_order, r.nr_pagetable_pages

        if nr_pages > m.nr_pages:
            with pytest.raises(InvalidArgument):
                call()
            assert snapshot(m) == before
            return
        try:
            first, nr_folios, got_pages, by_order, nr_tables = call()
        except OutOfMemory:
            assert snapshot(m) == before
            return
        # The cheap up-front check must have passed.
        assert nr_pages <= before.nr_free - m.watermarks.nr_min
        assert got_pages == nr_pages
        assert first == self.next_handle
        folios = [m.folios[h] for h in range(first, first + nr_folios)]
        assert Counter(f.order for f in folios) == by_order
        assert sum(f.nr_pages for f in folios) == nr_pages
        # One mapping, faulted from its start: virtually contiguous, each folio aligned.
        start = folios[0].vaddr
        if nr_pages >= HPAGE_PMD_NR:
            assert start % HPAGE_PMD_NR == 0
        vpage = start
        for folio in folios:
            assert folio.vaddr == vpage
            assert vpage % folio.nr_pages == 0
            assert folio.pmd_mapped == (folio.order == HPAGE_PMD_ORDER)
            vpage += folio.nr_pages
        # Counters: one fault per folio; the mTHP path tries every enabled order that fits
        # aligned, largest first, and counts a fallback for each one that failed.
        want_alloc: Counter[int] = Counter()
        want_fallback: Counter[int] = Counter()
        if order is None and by_bytes:
            allowed = self.allowed_orders(madvise)
            end = start + nr_pages
            for folio in folios:
                assert folio.order == 0 or folio.order in allowed
                if folio.order:
                    want_alloc[folio.order] += 1
                for tried in allowed:
                    if tried <= folio.order:
                        break
                    if folio.vaddr % (1 << tried) == 0 and folio.vaddr + (1 << tried) <= end:
                        want_fallback[tried] += 1
        else:
            # An explicit large order bypasses the knobs but still counts as a large fault.
            assert by_order == {unit_order: count}
            if unit_order:
                want_alloc[unit_order] += count
        for o in ANON_MTHP_ORDERS:
            assert m.thp.stats[o][MthpStat.ANON_FAULT_ALLOC] == (
                stats[o][MthpStat.ANON_FAULT_ALLOC] + want_alloc[o]
            )
            assert m.thp.stats[o][MthpStat.ANON_FAULT_FALLBACK] == (
                stats[o][MthpStat.ANON_FAULT_FALLBACK] + want_fallback[o]
            )
        assert m.events[VmEvent.THP_FAULT_ALLOC] == (
            events[VmEvent.THP_FAULT_ALLOC] + want_alloc[HPAGE_PMD_ORDER]
        )
        assert m.events[VmEvent.THP_FAULT_FALLBACK] == (
            events[VmEvent.THP_FAULT_FALLBACK] + want_fallback[HPAGE_PMD_ORDER]
        )
        assert m.events[VmEvent.PGFAULT] == events[VmEvent.PGFAULT] + nr_folios
        assert m.events[VmEvent.PGALLOC] == events[VmEvent.PGALLOC] + nr_pages + nr_tables
        assert m.events[VmEvent.PGFREE] == events[VmEvent.PGFREE]
        mm = m.owners[owner].mm
        assert mm is not None
        assert mm.nr_pagetable_pages == tables_before + nr_tables
        assert m.zone.nr_free == before.nr_free - nr_pages - nr_tables
        self.record(owner, FolioKind.ANON, first, nr_folios)
        self.anon_owners.add(owner)
        self.nr_tables += nr_tables

    @rule(
        data=st.data(),
        fault=st.sampled_from(
            [
                "order",
                "owner",
                "both",
                "neither",
                "negative",
                "unaligned",
                "too_big",
                "kind",
                "madvise",
            ]
        ),
    )
    def allocate_invalid(self, data: st.DataObject, fault: str) -> None:
        """Rejects malformed allocate requests with InvalidArgument and changes nothing."""
        m = self.m
        kind = data.draw(st.sampled_from(list(VALID_ORDERS)), label="kind")
        valid = VALID_ORDERS[kind]
        order: int | None = data.draw(st.sampled_from(valid), label="order")
        owner = "a"
        count, nr_bytes, field = 1, 0, "count"
        madvise = False
        if fault == "order":
            order = data.draw(st.integers(-2, 20).filter(lambda o: o not in valid), label="bad")
            field = "order"
        elif fault == "owner":
            owner = data.draw(st.sampled_from(BAD_OWNERS), label="owner")
            field = "owner"
        elif fault == "both":
            nr_bytes = PAGE_SIZE << (order or 0)
        elif fault == "neither":
            count = 0
        elif fault == "negative":
            count, nr_bytes = data.draw(st.sampled_from([(-1, 0), (0, -PAGE_SIZE), (-1, -1)]))
        elif fault == "unaligned":
            unit = PAGE_SIZE << (order or 0)
            count = 0
            nr_bytes = data.draw(st.integers(0, 4), label="units") * unit + data.draw(
                st.integers(1, unit - 1), label="rest"
            )
            field = "bytes"
        elif fault == "too_big":
            assert order is not None
            count = data.draw(
                st.sampled_from([(m.nr_pages >> order) + 1, MAX_FOLIOS_PER_CALL + 1]),
                label="count",
            )
        elif fault == "madvise":
            # madvise(MADV_HUGEPAGE) describes a mapping: only anon memory has one.
            kind = data.draw(
                st.sampled_from((FolioKind.FILE, FolioKind.SLAB, FolioKind.PAGETABLE)), label="kind"
            )
            fitting = [o for o in VALID_ORDERS[kind] if 1 << o <= m.nr_pages]
            order = data.draw(st.sampled_from([None, *fitting]), label="order")
            madvise, field = True, "madvise_hugepage"
        else:
            kind = cast(FolioKind, "anon")
            field = "kind"
        before = snapshot(m)
        with pytest.raises(InvalidArgument) as excinfo:
            m.allocate(
                owner, kind, order=order, count=count, nr_bytes=nr_bytes, madvise_hugepage=madvise
            )
        assert excinfo.value.field == field
        assert snapshot(m) == before

    @rule(data=st.data(), owner=st.sampled_from(OWNERS), order=st.integers(0, 3))
    def fragment(self, data: st.DataObject, owner: str, order: int) -> None:
        """Allocates small file folios and frees every other one, scattering free memory."""
        m = self.m
        headroom = (m.zone.nr_free - m.watermarks.nr_min) >> order
        count = data.draw(
            st.one_of(st.integers(2, 64), st.integers(2, max(2, min(headroom, 1024)))),
            label="count",
        )
        if count > min(headroom, obtainable_blocks(m, order)):
            return
        result = m.allocate(owner, FolioKind.FILE, order=order, count=count)
        self.record(owner, FolioKind.FILE, result.first_handle, count)
        handles = list(range(result.first_handle, result.first_handle + count, 2))
        m.free(handles)
        self.forget(handles)

    # -- THP knobs ---------------------------------------------------------------------------

    @rule(
        enabled=st.sampled_from([None, *ThpSetting]),
        sizes=st.dictionaries(
            st.one_of(st.sampled_from(ANON_MTHP_ORDERS), st.integers(0, 11)),
            st.sampled_from(list(ThpSetting)),
            max_size=5,
        ),
    )
    def set_thp(self, enabled: ThpSetting | None, sizes: dict[int, ThpSetting]) -> None:
        """Changes the mTHP knobs; an invalid request changes none of them."""
        before = snapshot(self.m)
        if enabled is ThpSetting.INHERIT or any(o not in ANON_MTHP_ORDERS for o in sizes):
            with pytest.raises(InvalidArgument):
                self.m.set_thp(enabled, sizes)
            assert snapshot(self.m) == before
            return
        self.m.set_thp(enabled, sizes)
        if enabled is not None:
            self.thp_enabled = enabled
        self.thp_sizes.update(sizes)

    # -- freeing -----------------------------------------------------------------------------

    @precondition(lambda self: bool(self.live))
    @rule(data=st.data())
    def free_live(self, data: st.DataObject) -> None:
        """Frees a random subset of live folios and checks what comes back."""
        m = self.m
        handles = data.draw(
            st.lists(st.sampled_from(sorted(self.live)), min_size=1, max_size=12, unique=True),
            label="handles",
        )
        nr_free, tables = m.zone.nr_free, table_pages(m)
        release = m.free(handles)
        assert release.folios == len(handles)
        pages = sum(1 << self.live[h].order for h in handles)
        assert release.nr_pages == pages + release.nr_pagetable_pages
        assert m.zone.nr_free == nr_free + release.nr_pages
        assert table_pages(m) == tables - release.nr_pagetable_pages
        self.forget(handles)
        self.nr_tables -= release.nr_pagetable_pages

    @rule(data=st.data(), fault=st.sampled_from(["freed", "unknown", "duplicate", "empty"]))
    def free_invalid(self, data: st.DataObject, fault: str) -> None:
        """Rejects a free naming a freed, unknown or repeated handle, or none; nothing changes."""
        live = sorted(self.live)
        if fault == "freed" and not self.freed:
            fault = "unknown"
        if fault == "duplicate" and not live:
            fault = "empty"
        handles: list[int] = []
        if live and fault != "empty":
            handles = data.draw(
                st.lists(
                    st.sampled_from(live),
                    min_size=1 if fault == "duplicate" else 0,
                    max_size=6,
                    unique=True,
                ),
                label="handles",
            )
        error: type[Exception] = InvalidArgument
        if fault == "freed":
            bad = data.draw(st.sampled_from(sorted(self.freed)), label="freed")
            error = FolioAlreadyFreed
        elif fault == "unknown":
            bad = data.draw(
                st.sampled_from([0, -1, self.next_handle, self.next_handle + 7, 1 << 63]),
                label="unknown",
            )
            error = UnknownFolio
        elif fault == "duplicate":
            bad = data.draw(st.sampled_from(handles), label="duplicate")
        if fault != "empty":
            handles.insert(data.draw(st.integers(0, len(handles)), label="at"), bad)
        before = snapshot(self.m)
        with pytest.raises(error):
            self.m.free(handles)
        assert snapshot(self.m) == before

    @rule(owner=st.sampled_from(OWNERS + BAD_OWNERS))
    def release_owner(self, owner: str) -> None:
        """Releases an owner with all its folios and page tables, or rejects an unknown one."""
        m = self.m
        before = snapshot(m)
        if owner in BAD_OWNERS:
            with pytest.raises(InvalidArgument):
                m.release_owner(owner)
            assert snapshot(m) == before
            return
        if owner not in self.expected_owners():
            with pytest.raises(UnknownOwner):
                m.release_owner(owner)
            assert snapshot(m) == before
            return
        handles = [h for h, live in self.live.items() if live.owner == owner]
        pages = sum(1 << self.live[h].order for h in handles)
        mm = m.owners[owner].mm
        tables = mm.nr_pagetable_pages if mm is not None else 0
        release = m.release_owner(owner)
        assert release.nr_pagetable_pages == tables
        assert release.nr_pages == pages + tables
        assert release.folios == len(handles) + tables
        assert m.zone.nr_free == before.nr_free + pages + tables
        assert owner not in m.owners
        self.forget(handles)
        self.anon_owners.discard(owner)
        self.nr_tables -= tables

    # -- contents ----------------------------------------------------------------------------

    def draw_offset(self, data: st.DataObject, handle: int, size: int) -> int:
        """An offset anywhere, near a page boundary, near the end or near an earlier write."""
        options = [
            st.integers(0, size - 1),
            st.integers(max(0, size - 96), size + 8),
            st.integers(1, size // PAGE_SIZE).map(lambda p: p * PAGE_SIZE - 16),
        ]
        written = [start for start, _ in self.writes.get(handle, [])]
        if written:
            options.append(
                st.tuples(st.sampled_from(written), st.integers(-32, 32)).map(
                    lambda t: max(0, t[0] + t[1])
                )
            )
        return data.draw(st.one_of(options), label="offset")

    @precondition(lambda self: bool(self.live))
    @rule(data=st.data())
    def write(self, data: st.DataObject) -> None:
        """Writes bytes into a live folio; a write past its end is OutOfRange and writes nothing."""
        handle = data.draw(st.sampled_from(sorted(self.live)), label="handle")
        size = PAGE_SIZE << self.live[handle].order
        offset = self.draw_offset(data, handle, size)
        payload = data.draw(st.binary(min_size=1, max_size=64), label="payload")
        if offset + len(payload) > size:
            with pytest.raises(OutOfRange):
                self.m.folio_write(handle, offset, payload)
            return
        assert self.m.folio_write(handle, offset, payload) == len(payload)
        self.writes.setdefault(handle, []).append((offset, payload))

    @precondition(lambda self: bool(self.live))
    @rule(data=st.data())
    def read(self, data: st.DataObject) -> None:
        """Reads a live folio back and compares with every write the model recorded."""
        handle = data.draw(st.sampled_from(sorted(self.live)), label="handle")
        size = PAGE_SIZE << self.live[handle].order
        offset = self.draw_offset(data, handle, size)
        length = data.draw(st.integers(1, 256), label="length")
        if offset + length > size:
            with pytest.raises(OutOfRange):
                self.m.folio_read(handle, offset, length)
            return
        assert self.m.folio_read(handle, offset, length) == self.expected_read(
            handle, offset, length
        )

    @rule(
        data=st.data(),
        fault=st.sampled_from(["freed", "unknown", "offset", "length", "too_long"]),
        reading=st.booleans(),
    )
    def io_invalid(self, data: st.DataObject, fault: str, reading: bool) -> None:
        """Rejects reads and writes of freed or unknown folios and bad offsets or lengths."""
        if fault == "freed" and not self.freed:
            fault = "unknown"
        if fault in ("offset", "length", "too_long") and not self.live:
            fault = "unknown"
        error: type[Exception] = InvalidArgument
        offset, length = 0, 8
        if fault == "freed":
            handle = data.draw(st.sampled_from(sorted(self.freed)), label="handle")
            error = FolioAlreadyFreed
        elif fault == "unknown":
            handle = data.draw(st.sampled_from([0, -3, self.next_handle]), label="handle")
            error = UnknownFolio
        else:
            handle = data.draw(st.sampled_from(sorted(self.live)), label="handle")
            if fault == "offset":
                offset = data.draw(st.integers(-(1 << 40), -1), label="offset")
            elif fault == "length":
                length = 0
            else:
                length = MAX_IO_BYTES + 1
        before = snapshot(self.m)
        with pytest.raises(error):
            if reading:
                self.m.folio_read(handle, offset, length)
            else:
                self.m.folio_write(handle, offset, b"\xa5" * length)
        assert snapshot(self.m) == before

    # -- invariants --------------------------------------------------------------------------

    @invariant()
    def machine_is_consistent(self) -> None:
        """check_machine proves the allocator's own invariants."""
        check_machine(self.m)

    @invariant()
    def model_matches(self) -> None:
        """The machine's folios, owners, counts and knobs match the model."""
        m = self.m
        assert {h: Live(f.owner, f.kind, f.order) for h, f in m.folios.items()} == self.live
        assert all(folio.handle == handle for handle, folio in m.folios.items())
        assert set(m.owners) == self.expected_owners()
        held: dict[str, set[int]] = {}
        mapping: set[str] = set()
        for handle, live in self.live.items():
            held.setdefault(live.owner, set()).add(handle)
            if live.kind is FolioKind.ANON:
                mapping.add(live.owner)
        for name, holder in m.owners.items():
            assert holder.folios.keys() == held.get(name, set())
            assert (holder.mm is not None) == (name in self.anon_owners)
            if holder.mm is not None:
                # The PGD lives until the owner is released; every other table goes with the
                # last entry it holds.
                assert holder.mm.nr_pagetable_pages >= 1
                if name not in mapping:
                    assert holder.mm.nr_pagetable_pages == 1
        assert table_pages(m) == self.nr_tables
        counts = Counter((live.kind, live.order) for live in self.live.values())
        counts[FolioKind.PAGETABLE, 0] += self.nr_tables
        assert m.nr_folios == {key: n for key, n in counts.items() if n}
        for order in ANON_MTHP_ORDERS:
            assert m.thp.nr_anon[order] == counts[FolioKind.ANON, order]
        used = sum(1 << live.order for live in self.live.values()) + self.nr_tables
        assert m.zone.nr_free == m.nr_pages - used
        # Nothing but freeing raises nr_free, and no allocation goes below the min watermark.
        assert m.zone.nr_free >= m.watermarks.nr_min
        assert m.thp.enabled is self.thp_enabled
        assert m.thp.sizes == self.thp_sizes

    @invariant()
    def reports_add_up(self) -> None:
        """Each memmap model's per-kind plus free attribution is its total; meminfo agrees."""
        m = self.m
        for cost in m.memmap():
            assert sum(cost.by_kind.values()) + cost.free_memory_bytes == cost.total_bytes
        info = m.meminfo()
        assert info.mem_total_bytes == m.nr_pages * PAGE_SIZE
        assert info.mem_free_bytes == m.zone.nr_free * PAGE_SIZE
        assert m.vmstat()["nr_free_pages"] == m.zone.nr_free


@pytest.mark.slow
def test_allocator_state_machine(tmp_path: Path) -> None:
    """Random operation sequences on small machines keep the machine and the model in step."""
    # Hypothesis caches source constants under its home directory (./.hypothesis, even with
    # database=None); point it at a temporary directory to keep the working tree clean.
    set_hypothesis_home_dir(tmp_path / "hypothesis")
    try:
        run_state_machine_as_test(
            AllocatorMachine,
            settings=settings(
                max_examples=75, stateful_step_count=50, deadline=None, database=None
            ),
        )
    finally:
        set_hypothesis_home_dir(None)


# -- hand-computed pins --------------------------------------------------------------------


def test_rmqueue_splits_off_upper_halves_and_free_merges_back() -> None:
    """An order-0 allocation from one order-10 block leaves one block per order 0..9."""
    m = Machine("pin", 4 * MIB)
    zone = m.zone
    assert zone.buddyinfo() == [0] * MAX_PAGE_ORDER + [1]
    assert zone.rmqueue(0) == 0
    assert zone.buddyinfo() == [1] * MAX_PAGE_ORDER + [0]
    # The upper halves pfn 1, 2, 4, ..., 512 went to orders 0, 1, 2, ..., 9.
    assert [list(area) for area in zone.free_area] == [[1 << o] for o in range(10)] + [[]]
    assert zone.nr_free == 1023
    zone.free_one_page(0, 0)
    assert zone.buddyinfo() == [0] * MAX_PAGE_ORDER + [1]
    assert list(zone.free_area[MAX_PAGE_ORDER]) == [0]
    assert zone.nr_free == 1024
    check_machine(m)


def test_free_does_not_merge_with_allocated_buddy() -> None:
    """Freeing a block whose buddy (pfn XOR 1 << order) is allocated leaves it unmerged."""
    m = Machine("pin", 4 * MIB)
    zone = m.zone
    assert zone.rmqueue(2) == 0  # splits off 4 (order 2), 8 (order 3), ..., 512 (order 9)
    assert zone.rmqueue(2) == 4  # the order-2 list's only block: 0's buddy, 0 ^ (1 << 2)
    assert zone.buddyinfo() == [0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 0]
    zone.free_one_page(0, 2)  # buddy 4 is allocated: no merge
    assert zone.buddyinfo() == [0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 0]
    assert 0 in zone.free_area[2]
    zone.free_one_page(4, 2)  # buddy 4 ^ 4 = 0 is free: merges 0+4, then 8, 16, ..., 512
    assert zone.buddyinfo() == [0] * MAX_PAGE_ORDER + [1]
    # Same with the upper half freed first: pfn 5 at order 0 has buddy 5 ^ 1 = 4, allocated.
    assert zone.rmqueue(0) == 0
    assert [zone.rmqueue(0) for _ in range(5)] == [1, 2, 3, 4, 5]
    zone.free_one_page(5, 0)
    assert 5 in zone.free_area[0]
    assert 4 not in zone.free_area[0]


# min_free_kbytes = int_sqrt(16 * lowmem_kB) clamped to [128, 262144]; min = min_free_kbytes / 4
# (4 KiB pages); delta = max(min / 4, managed_pages * 10 / 10000); low = min + delta;
# high = low + delta.
#  1 MiB:    256 pages, 1024 kB;  sqrt(16384) = 128           -> min 32; delta max(8, 0) = 8
#            -> low 40, high 48 (exactly the 128 kB floor).
#  1 GiB:    262144 pages, 1048576 kB; sqrt(16777216) = 4096  -> min 1024;
#            delta = max(1024 / 4 = 256, 262144 * 10 / 10000 = 262) = 262 -> low 1286, high 1548.
#  4 GiB:    1048576 pages, 4194304 kB; sqrt(67108864) = 8192 -> min 2048;
#            delta = max(512, 1048576 * 10 / 10000 = 1048) = 1048 -> low 3096, high 4144.
#  1 TiB:    268435456 pages, 2^30 kB; sqrt(2^34) = 2^17 = 131072 -> min 32768;
#            delta = max(8192, 268435456 * 10 / 10000 = 268435) = 268435
#            -> low 32768 + 268435 = 301203, high 301203 + 268435 = 569638.
#  16 TiB:   2^32 pages, 2^34 kB; sqrt(2^38) = 524288, clamped to 262144 -> min 65536;
#            delta = max(16384, 4294967) = 4294967 -> low 4360503, high 8655470.
@pytest.mark.parametrize(
    ("ram_bytes", "expected"),
    [
        (1 << 20, Watermarks(32, 40, 48, 128)),
        (1 << 30, Watermarks(1024, 1286, 1548, 4096)),
        (4 << 30, Watermarks(2048, 3096, 4144, 8192)),
        (1 << 40, Watermarks(32768, 301203, 569638, 131072)),
        (16 << 40, Watermarks(65536, 4360503, 8655470, 262144)),
    ],
)
def test_watermarks(ram_bytes: int, expected: Watermarks) -> None:
    """Watermarks follow calculate_min_free_kbytes and __setup_per_zone_wmarks."""
    assert calculate_watermarks(ram_bytes // PAGE_SIZE) == expected


def test_watermarks_of_a_4gib_machine() -> None:
    """A 4 GiB machine has min 2048, low 3096, high 4144 pages and min_free_kbytes 8192."""
    m = Machine("pin", 4 << 30)
    assert m.watermarks == Watermarks(nr_min=2048, nr_low=3096, nr_high=4144, min_free_kbytes=8192)


def test_allocation_below_min_watermark_is_out_of_memory() -> None:
    """Allocations may leave exactly min pages free, as __zone_watermark_ok allows, never fewer."""
    m = Machine("pin", 4 * MIB)
    nr_min = m.watermarks.nr_min
    assert nr_min == 64
    with pytest.raises(OutOfMemory):
        m.allocate("a", FolioKind.ANON, order=MAX_PAGE_ORDER - 1, count=2)
    with pytest.raises(OutOfMemory):
        m.allocate("a", FolioKind.SLAB, count=1024 - nr_min + 1)
    assert m.zone.nr_free == 1024
    assert not m.folios
    assert not m.owners
    m.allocate("a", FolioKind.SLAB, order=3, count=(1024 - nr_min) // 8)
    assert m.zone.nr_free == nr_min
    before = snapshot(m)
    for kind in (FolioKind.SLAB, FolioKind.FILE, FolioKind.ANON):
        with pytest.raises(OutOfMemory):
            m.allocate("b", kind, count=1)
    assert snapshot(m) == before
    assert not m.zone.watermark_ok(0)
    m.free([1])
    assert m.zone.nr_free == nr_min + 8
    assert m.zone.watermark_ok(3)
    assert not m.zone.watermark_ok(4)
    check_machine(m)


def test_page_tables_count_against_the_min_watermark() -> None:
    """Anon memory plus its page tables may take free pages down to min, and not one further."""
    m = Machine("pin", 4 * MIB)
    # 956 pages at vpage 0..955 need a PGD, PUD, PMD and two PTE tables: 961 > 1024 - 64.
    before = snapshot(m)
    with pytest.raises(OutOfMemory):
        m.allocate("p", FolioKind.ANON, count=956)
    assert snapshot(m) == before
    result = m.allocate("p", FolioKind.ANON, count=955)
    assert result.nr_pagetable_pages == 5
    assert m.zone.nr_free == m.watermarks.nr_min == 64
    check_machine(m)


def test_mthp_fault_takes_largest_enabled_order_that_fits_aligned() -> None:
    """With 64 kB and 16 kB mTHP enabled, 100 pages fault as six order-4 and one order-2 folio."""
    m = Machine("pin", 16 * MIB)
    m.set_thp(ThpSetting.NEVER, {4: ThpSetting.ALWAYS, 2: ThpSetting.MADVISE})
    first = m.allocate("p", FolioKind.ANON, nr_bytes=100 * PAGE_SIZE, madvise_hugepage=True)
    assert first.folios_by_order == {4: 6, 2: 1}
    assert first.nr_pagetable_pages == 4  # PGD, PUD, PMD and one PTE table
    # The next mapping starts at page 100: not 16-page aligned, so order 2, then order 0 at 108.
    second = m.allocate("p", FolioKind.ANON, nr_bytes=10 * PAGE_SIZE, madvise_hugepage=True)
    assert second.folios_by_order == {2: 2, 0: 2}
    assert second.nr_pagetable_pages == 0
    assert [m.folios[h].vaddr for h in range(second.first_handle, second.first_handle + 4)] == [
        100,
        104,
        108,
        109,
    ]
    # Without madvise the 16 kB size is off: 10 pages become order-0 folios (start 110).
    third = m.allocate("p", FolioKind.ANON, nr_bytes=10 * PAGE_SIZE)
    assert third.folios_by_order == {0: 10}
    assert m.thp.stats[4][MthpStat.ANON_FAULT_ALLOC] == 6
    assert m.thp.stats[2][MthpStat.ANON_FAULT_ALLOC] == 3
    check_machine(m)


def test_mthp_fault_falls_back_when_no_block_is_large_enough() -> None:
    """With only order-2 holes left, an order-4 fault falls back to the enabled order 2."""
    m = Machine("pin", 4 * MIB)
    m.set_thp(ThpSetting.NEVER, {4: ThpSetting.ALWAYS, 2: ThpSetting.ALWAYS})
    # 240 order-2 folios take pfn 0..959 in order; freeing every other one leaves 120 order-2
    # holes whose buddies are allocated, and one order-6 block at pfn 960 (64 pages, the min).
    filled = m.allocate("f", FolioKind.FILE, order=2, count=(1024 - 64) // 4)
    m.free(list(range(filled.first_handle, filled.first_handle + filled.count, 2)))
    assert m.zone.buddyinfo() == [0, 0, 120, 0, 0, 0, 1, 0, 0, 0, 0]
    # 80 pages: four order-4 folios split the order-6 block; the fifth has nothing to come
    # from, so it falls back to order 2, as do the three folios after it.
    result = m.allocate("p", FolioKind.ANON, nr_bytes=80 * PAGE_SIZE)
    assert result.folios_by_order == {4: 4, 2: 4}
    assert m.thp.stats[4][MthpStat.ANON_FAULT_ALLOC] == 4
    assert m.thp.stats[4][MthpStat.ANON_FAULT_FALLBACK] == 1
    assert m.thp.stats[2][MthpStat.ANON_FAULT_ALLOC] == 4
    assert m.thp.stats[2][MthpStat.ANON_FAULT_FALLBACK] == 0
    assert sorted(m.folios[h].pfn for h in range(result.first_handle, result.first_handle + 4)) == [
        960,
        976,
        992,
        1008,
    ]
    check_machine(m)


@pytest.mark.parametrize(("deposit", "tables"), [(True, 4), (False, 3)])
def test_pmd_mapped_thp_deposits_a_pte_table(deposit: bool, tables: int) -> None:
    """A 2 MiB THP needs PGD, PUD and PMD tables, plus one deposited PTE table if enabled."""
    m = Machine("pin", 16 * MIB, deposit_pgtable=deposit)
    result = m.allocate("p", FolioKind.ANON, nr_bytes=2 * MIB)
    assert result.folios_by_order == {HPAGE_PMD_ORDER: 1}
    assert result.nr_pagetable_pages == tables
    assert m.events[VmEvent.THP_FAULT_ALLOC] == 1
    release = m.free([result.first_handle])
    assert release.nr_pagetable_pages == tables - 1  # the PGD stays with the owner
    final = m.release_owner("p")
    assert final.nr_pagetable_pages == 1
    assert m.zone.nr_free == m.nr_pages
    check_machine(m)


def test_mapping_across_a_1gib_boundary_needs_two_pmd_tables() -> None:
    """A mapping straddling virtual 1 GiB needs two PTE tables and a second PMD table."""
    m = Machine("pin", 16 * MIB)
    # A base page at virtual page 0 stays mapped, so addresses are not reused. Mappings of 384
    # pages of order-7 folios are under 2 MiB, so only 128-page aligned: mapping k starts at
    # page 128 + 384 * k, and mapping 682 covers pages 262016..262399 across 262144 (1 GiB).
    m.allocate("p", FolioKind.ANON, count=1)
    for k in range(682):
        result = m.allocate("p", FolioKind.ANON, order=7, count=3)
        assert m.folios[result.first_handle].vaddr == 128 + 384 * k
        m.free(list(range(result.first_handle, result.first_handle + 3)))
    result = m.allocate("p", FolioKind.ANON, order=7, count=3)
    assert [m.folios[result.first_handle + i].vaddr for i in range(3)] == [
        262016,
        262144,
        262272,
    ]
    assert result.nr_pagetable_pages == 3  # two PTE tables and the second PMD table
    check_machine(m)
    release = m.free(list(range(result.first_handle, result.first_handle + 3)))
    assert release.nr_pagetable_pages == 3
    # The base page's PTE table, the first PMD table, the PUD table and the PGD.
    assert m.release_owner("p").nr_pagetable_pages == 4
    assert m.zone.nr_free == m.nr_pages
    check_machine(m)
