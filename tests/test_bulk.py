"""Bulk paths against one block at a time: Zone.rmqueue_bulk and Zone.free_pages_bulk against
rmqueue and free_one_page, and a Machine that takes its bulk paths against one with bulk off.

Free lists are compared as ordered lists: the list order decides which block rmqueue takes next.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from foliod.mm import (
    FolioAlreadyFreed,
    FoliodError,
    FolioKind,
    InvalidArgument,
    Machine,
    ThpPolicy,
    ThpSetting,
    UnknownFolio,
    check_machine,
)
from foliod.mm.folio_table import CHUNK, KINDS
from foliod.mm.huge_memory import ANON_MTHP_ORDERS, HPAGE_PMD_NR
from foliod.mm.machine import MAX_FOLIOS_PER_CALL, VALID_ORDERS
from foliod.mm.page_alloc import MAX_PAGE_ORDER, PAGE_SHIFT, PAGE_SIZE, PUD_ORDER, Zone

MIB = 1 << 20
# The vectorized free_pages_bulk runs from this many blocks up.
VECTOR_MIN = 64

# -- helpers -------------------------------------------------------------------------------


def lists(zone: Zone) -> list[list[int]]:
    """The free lists in list order (rmqueue takes each list's last entry first)."""
    return [list(area) for area in zone.free_area]


def difference(x: object, y: object) -> str:
    """A short description of where two unequal values first differ."""
    if isinstance(x, list | tuple) and isinstance(y, list | tuple):
        prefix = f"lengths {len(x)} != {len(y)}; " if len(x) != len(y) else ""
        for i, (p, q) in enumerate(zip(x, y, strict=False)):
            if p != q:
                return f"{prefix}first difference at [{i}]: {difference(p, q)}"
        return f"{prefix}one is a prefix of the other"
    if isinstance(x, dict) and isinstance(y, dict):
        keys = [k for k in {**x, **y} if x.get(k, "<missing>") != y.get(k, "<missing>")]
        parts = [
            f"[{k!r}]: {difference(x.get(k, '<missing>'), y.get(k, '<missing>'))}" for k in keys[:3]
        ]
        return f"{len(keys)} keys differ; " + "; ".join(parts)
    return f"{x!r:.300} != {y!r:.300}"


def require_equal(what: str, x: object, y: object) -> None:
    """Fails with a short description (not a diff of huge reprs) when x != y."""
    if x != y:
        raise AssertionError(f"{what} differs: {difference(x, y)}")


# -- the zone: rmqueue_bulk and free_pages_bulk ----------------------------------------------

# Zone sizes in pages, not all powers of two: the boot lists hold blocks of several orders.
ZONE_PAGES = (1025, 4096, 5000, 70_000)
SMALL_ORDERS = st.one_of(st.integers(0, 3), st.integers(0, MAX_PAGE_ORDER))
# (True, order, n): n rmqueue(order) calls; (False, pick, n): n frees of held blocks by pick.
CHURN = st.lists(
    st.one_of(
        st.tuples(st.just(True), SMALL_ORDERS, st.integers(1, 200)),
        st.tuples(st.just(False), st.integers(0, 1 << 16), st.integers(1, 200)),
    ),
    max_size=40,
)
Churn = list[tuple[bool, int, int]]


def allocate_alike(a: Zone, b: Zone, order: int, n: int, held: list[tuple[int, int]]) -> None:
    """n rmqueue(order) calls on both zones (until one fails), recorded in held."""
    for _ in range(n):
        pfn = a.rmqueue(order)
        assert pfn == b.rmqueue(order)
        if pfn is None:
            return
        held.append((pfn, order))


def churned(nr_pages: int, ops: Churn) -> tuple[Zone, Zone, list[tuple[int, int]]]:
    """Two zones given the same rmqueue and free_one_page calls; returns them and what is held."""
    a, b = Zone(nr_pages), Zone(nr_pages)
    held: list[tuple[int, int]] = []
    for allocate, arg, n in ops:
        if allocate:
            allocate_alike(a, b, arg, n, held)
            continue
        for k in range(min(n, len(held))):
            pfn, order = held.pop((arg + 7919 * k) % len(held))
            a.free_one_page(pfn, order)
            b.free_one_page(pfn, order)
    assert (lists(a), a.nr_free) == (lists(b), b.nr_free)
    return a, b, held


@settings(max_examples=150, deadline=None)
@given(
    nr_pages=st.sampled_from(ZONE_PAGES),
    ops=CHURN,
    requests=st.lists(SMALL_ORDERS, min_size=1, max_size=3),
    data=st.data(),
)
def test_rmqueue_bulk_equals_rmqueue_calls(
    nr_pages: int, ops: Churn, requests: list[int], data: st.DataObject
) -> None:
    """rmqueue_bulk(order, n) after random churn returns the pfns of n rmqueue(order) calls, in
    their order, and leaves the same free lists in the same list order and the same nr_free."""
    a, b, _ = churned(nr_pages, ops)
    for order in requests:
        most = b.nr_obtainable(order)
        count = data.draw(
            st.one_of(
                st.integers(0, min(5, most)),
                st.integers(0, most),
                st.sampled_from([most, max(0, most - 1)]),
            ),
            label=f"count of order {order} (of {most})",
        )
        one_by_one = [a.rmqueue(order) for _ in range(count)]
        bulk = b.rmqueue_bulk(order, count)
        assert bulk.dtype == np.int64
        require_equal("pfns", bulk.tolist(), one_by_one)
        require_equal("free lists", lists(b), lists(a))
        assert b.nr_free == a.nr_free


@settings(max_examples=150, deadline=None)
@given(
    nr_pages=st.sampled_from(ZONE_PAGES),
    ops=CHURN,
    fill=st.lists(st.tuples(SMALL_ORDERS, st.integers(1, 400)), max_size=4),
    vectorized=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_free_pages_bulk_equals_free_one_page_calls(
    nr_pages: int, ops: Churn, fill: list[tuple[int, int]], vectorized: bool, seed: int
) -> None:
    """free_pages_bulk of a random subset of held blocks of mixed orders, in random order (fewer
    than 64 blocks, or 64 and more for the vectorized path), merges exactly as free_one_page
    calls in that order: the same free lists in the same list order and the same nr_free."""
    a, b, held = churned(nr_pages, ops)
    for order, n in fill:
        allocate_alike(a, b, order, n, held)
    rng = random.Random(seed)
    rng.shuffle(held)
    if vectorized:
        assume(len(held) >= VECTOR_MIN)
        freed = held[: rng.randint(VECTOR_MIN, len(held))]
    else:
        freed = held[: rng.randint(0, min(VECTOR_MIN - 1, len(held)))]
    for pfn, order in freed:
        a.free_one_page(pfn, order)
    b.free_pages_bulk(
        np.array([p for p, _ in freed], np.int64), np.array([o for _, o in freed], np.int8)
    )
    require_equal("free lists", lists(b), lists(a))
    assert b.nr_free == a.nr_free
    # What is left allocated can still be freed alike: the zones stay interchangeable.
    rest = held[len(freed) :]
    for pfn, order in rest:
        a.free_one_page(pfn, order)
    b.free_pages_bulk(
        np.array([p for p, _ in rest], np.int64), np.array([o for _, o in rest], np.int8)
    )
    require_equal("free lists after freeing the rest", lists(b), lists(a))
    assert b.nr_free == a.nr_free == nr_pages


def test_rmqueue_bulk_leaves_a_partly_used_block_split_as_rmqueue_does() -> None:
    """Five order-2 blocks from a fresh 4096-page zone come from the first order-10 block (pfn 0),
    and what is left of it lies on orders 2, 3, 5, 6, 7, 8 and 9, as five rmqueue(2) leave it."""
    a, b = Zone(4096), Zone(4096)
    assert [a.rmqueue(2) for _ in range(5)] == [0, 4, 8, 12, 16]
    assert b.rmqueue_bulk(2, 5).tolist() == [0, 4, 8, 12, 16]
    want = [[], [], [20], [24], [], [32], [64], [128], [256], [512], [3072, 2048, 1024]]
    assert lists(a) == want
    assert lists(b) == want
    assert a.nr_free == b.nr_free == 4096 - 20


@pytest.mark.parametrize("nr_pages", [1025, 5000, 70_000])
@pytest.mark.parametrize(
    ("order", "count"),
    [(0, 1), (0, 7), (0, 1023 + 700), (1, 3), (2, 511 + 5), (3, 130), (5, 33), (9, 3), (10, 1)],
)
def test_rmqueue_bulk_partial_blocks_after_churn(nr_pages: int, order: int, count: int) -> None:
    """Counts that are not a multiple of a block's pieces, on fresh and fragmented zones, some
    running over whole blocks first: the same pfns and lists as rmqueue one by one."""
    for ops in ([], [(True, 0, 3), (True, 3, 5), (False, 11, 4), (True, 1, 9), (False, 2, 2)]):
        a, b, _ = churned(nr_pages, ops)
        if a.nr_obtainable(order) < count:
            continue
        one_by_one = [a.rmqueue(order) for _ in range(count)]
        assert b.rmqueue_bulk(order, count).tolist() == one_by_one
        assert (lists(b), b.nr_free) == (lists(a), a.nr_free)
        # A second request starts on the part the first one left of its last block.
        extra = min(5, a.nr_obtainable(order))
        assert b.rmqueue_bulk(order, extra).tolist() == [a.rmqueue(order) for _ in range(extra)]
        assert (lists(b), b.nr_free) == (lists(a), a.nr_free)


def test_free_pages_bulk_with_a_gigantic_block() -> None:
    """A batch of 64+ blocks with one order-18 range from alloc_contig frees as free_one_page and
    free_contig calls in the same order would."""
    a, b = Zone(600_000), Zone(600_000)
    held: list[tuple[int, int]] = []
    allocate_alike(a, b, 0, 300, held)
    giant = a.alloc_contig(PUD_ORDER)
    assert giant is not None
    assert b.alloc_contig(PUD_ORDER) == giant
    allocate_alike(a, b, 3, 100, held)
    held.insert(150, (giant, PUD_ORDER))
    random.Random(7).shuffle(held)
    for pfn, order in held:
        if order <= MAX_PAGE_ORDER:
            a.free_one_page(pfn, order)
        else:
            a.free_contig(pfn, order)
    b.free_pages_bulk(
        np.array([p for p, _ in held], np.int64), np.array([o for _, o in held], np.int8)
    )
    assert (lists(b), b.nr_free) == (lists(a), a.nr_free)
    assert a.nr_free == 600_000


# -- two machines: bulk against one at a time ------------------------------------------------

# A few MiB to a few hundred: handle tables of several chunks and mappings of several PTE
# tables need the larger ones; most are not a power of two.
RAM_SIZES = (
    1 * MIB,
    3 * MIB + PAGE_SIZE,
    6 * MIB + 3 * PAGE_SIZE,
    16 * MIB,
    40 * MIB + 5 * PAGE_SIZE,
    130 * MIB + 7 * PAGE_SIZE,
    256 * MIB,
)
OWNERS = ("p", "q", "r")
THP_KNOBS = st.one_of(
    st.none(),
    st.tuples(
        st.sampled_from([ThpSetting.ALWAYS, ThpSetting.MADVISE, ThpSetting.NEVER]),
        st.dictionaries(st.sampled_from(ANON_MTHP_ORDERS), st.sampled_from(list(ThpSetting))),
    ),
)
# Rare misuse (hvo on a non-hugetlb kind, madvise on a non-anon one): rejected alike.
RARELY = st.integers(0, 15).map(lambda n: n == 0)


def folio_columns(m: Machine) -> dict[str, list[Any]]:
    """Every live owned folio's record, as lists by column (owners by name)."""
    live = m.table.live_handles()
    recs = m.table.records(live)
    names = {holder.id: holder.name for holder in m.owners.values()}
    return {
        "handle": live.tolist(),
        "pfn": recs.pfn.tolist(),
        "vaddr": recs.vaddr.tolist(),
        "order": recs.order.tolist(),
        "kind": [KINDS[k] for k in recs.kind.tolist()],
        "flags": recs.flags.tolist(),
        "owner": [names[i] for i in recs.owner.tolist()],
    }


def machine_state(m: Machine) -> dict[str, object]:
    """Everything the bulk paths could change, in a form that compares exactly."""
    owners: dict[str, object] = {}
    for name, holder in m.owners.items():
        mm = holder.mm
        tables = None
        if mm is not None:
            tables = (
                mm.nr_pagetable_pages,
                mm.next_vpage,
                [{i: (t.folio.pfn, t.entries) for i, t in level.items()} for level in mm.tables],
                {vpage: folio.pfn for vpage, folio in mm.deposited.items()},
            )
        owners[name] = (holder.id, holder.nr_folios, dict(holder.chunks), tables)
    state: dict[str, object] = {
        "free_area": lists(m.zone),
        "nr_free": m.zone.nr_free,
        "nr_folios": dict(m.nr_folios),
        "events": dict(m.events),
        "thp.stats": {order: dict(stats) for order, stats in m.thp.stats.items()},
        "thp.nr_anon": dict(m.thp.nr_anon),
        "thp.knobs": (m.thp.enabled, dict(m.thp.sizes)),
        "nr_hvo": {order: n for order, n in m.nr_hvo.items() if n},
        "next_handle": m.next_handle,
        "next_owner_id": m.next_owner_id,
        "owners": owners,
        "contents": {h: {i: bytes(p) for i, p in pages.items()} for h, pages in m.contents.items()},
        **folio_columns(m),
    }
    if len(m.folios) <= 2000:
        state["folios"] = {h: f for h, f in m.folios.items()}
    return state


def require_same(a: Machine, b: Machine, when: str) -> None:
    """The two machines hold exactly the same state."""
    sa, sb = machine_state(a), machine_state(b)
    assert sa.keys() == sb.keys()
    for key in sa:
        require_equal(f"{when}: {key}", sa[key], sb[key])


def require_unchanged(before: dict[str, object], m: Machine, what: str, *, events: bool) -> None:
    """m holds the state it held before (free lists as sets of blocks, events if asked)."""
    after = machine_state(m)
    for key, old in before.items():
        if not events and key in ("events", "thp.stats"):
            continue
        was, now = old, after[key]
        if key == "free_area":
            was, now = unordered(was), unordered(now)
        require_equal(f"{what} changed {key}", now, was)


def unordered(free_area: object) -> list[list[int]]:
    """Free lists as sorted lists: the blocks, not their list order."""
    assert isinstance(free_area, list)
    return [sorted(area) for area in free_area]


Outcome = tuple[str, object]


class BulkPair(RuleBasedStateMachine):
    """Drives machine "a" (bulk paths on) and machine "b" (bulk off: one block at a time) through
    the same calls and requires the same results and exactly the same state after every step."""

    def __init__(self) -> None:
        super().__init__()
        self.a = Machine("a", MIB)
        self.b = Machine("b", MIB)
        self.b.bulk = False
        self.freed: list[int] = []

    # -- helpers -----------------------------------------------------------------------------

    def both(self, call: Callable[[Machine], object]) -> Outcome:
        """Calls both machines alike; their results, or errors (type, field, metadata), agree."""
        outcomes: list[Outcome] = []
        for m in (self.a, self.b):
            try:
                outcomes.append(("ok", call(m)))
            except FoliodError as exc:
                outcomes.append(("error", (type(exc), exc.field, exc.metadata)))
        require_equal("outcome", outcomes[0], outcomes[1])
        return outcomes[0]

    def counts(self, order: int) -> st.SearchStrategy[int]:
        """Folio counts: a few, around the 16-folio bulk threshold, hundreds, right at the min
        watermark, or up to twice the machine."""
        m = self.a
        headroom = (m.zone.nr_free - m.watermarks.nr_min) >> order
        return st.one_of(
            st.integers(1, 4),
            st.integers(15, 40),
            st.integers(1, 1200),
            st.integers(max(1, headroom - 3), max(1, headroom + 3)),
            st.integers(1, max(1, (2 * m.nr_pages) >> order)),
        )

    def allocate(self, owner: str, kind: FolioKind, **kwargs: Any) -> Outcome:
        """Allocates on both; a failed call must leave each machine as it was (events aside)."""
        before = (machine_state(self.a), machine_state(self.b))
        outcome = self.both(lambda m: m.allocate(owner, kind, **kwargs))
        if outcome[0] == "error":
            require_unchanged(before[0], self.a, "a failed allocate", events=False)
            require_unchanged(before[1], self.b, "a failed allocate", events=False)
        return outcome

    # -- set-up ------------------------------------------------------------------------------

    @initialize(ram=st.sampled_from(RAM_SIZES), deposit=st.booleans(), thp=THP_KNOBS)
    def boot(
        self, ram: int, deposit: bool, thp: tuple[ThpSetting, dict[int, ThpSetting]] | None
    ) -> None:
        """Boots the two machines alike, with default or random mTHP knobs."""
        self.a = Machine("a", ram, deposit_pgtable=deposit, thp=ThpPolicy(*thp) if thp else None)
        self.b = Machine("b", ram, deposit_pgtable=deposit, thp=ThpPolicy(*thp) if thp else None)
        self.b.bulk = False
        assert self.a.bulk

    # -- rules -------------------------------------------------------------------------------

    @rule(
        data=st.data(),
        kind=st.sampled_from(list(VALID_ORDERS)),
        owner=st.sampled_from(OWNERS),
        by_bytes=st.booleans(),
        hvo=st.booleans(),
        madvise=st.booleans(),
        pmd_align=st.booleans(),
        misuse=RARELY,
    )
    def allocate_order(
        self,
        *,
        data: st.DataObject,
        kind: FolioKind,
        owner: str,
        by_bytes: bool,
        hvo: bool,
        madvise: bool,
        pmd_align: bool,
        misuse: bool,
    ) -> None:
        """Allocates folios of an explicit order of any kind, by count or by bytes."""
        order = data.draw(st.sampled_from(VALID_ORDERS[kind]), label="order")
        count = data.draw(self.counts(order), label="count")
        self.allocate(
            owner,
            kind,
            order=order,
            count=0 if by_bytes else count,
            nr_bytes=(count << order << PAGE_SHIFT) if by_bytes else 0,
            madvise_hugepage=madvise and (misuse or kind is FolioKind.ANON),
            hvo=hvo and (misuse or kind is FolioKind.HUGETLB),
            pmd_align=pmd_align,
        )

    @rule(
        data=st.data(),
        owner=st.sampled_from(OWNERS),
        madvise=st.booleans(),
        pmd_align=st.booleans(),
    )
    def allocate_anon_bytes(
        self, data: st.DataObject, owner: str, madvise: bool, pmd_align: bool
    ) -> None:
        """Allocates an anon mapping by bytes: its folio orders follow the mTHP knobs."""
        m = self.a
        headroom = m.zone.nr_free - m.watermarks.nr_min
        nr_pages = data.draw(
            st.one_of(
                st.integers(1, 600),
                st.tuples(st.integers(1, 6), st.integers(-3, 3)).map(
                    lambda t: max(1, t[0] * HPAGE_PMD_NR + t[1])
                ),
                st.integers(1, m.nr_pages + 8),
                # Just under or over the min watermark: page tables or large folios fail.
                st.integers(max(1, headroom - 40), max(1, headroom + 2)),
            ),
            label="pages",
        )
        self.allocate(
            owner,
            FolioKind.ANON,
            nr_bytes=nr_pages << PAGE_SHIFT,
            madvise_hugepage=madvise,
            pmd_align=pmd_align,
        )

    @rule(
        enabled=st.sampled_from([None, ThpSetting.ALWAYS, ThpSetting.MADVISE, ThpSetting.NEVER]),
        sizes=st.dictionaries(
            st.sampled_from(ANON_MTHP_ORDERS), st.sampled_from(list(ThpSetting)), max_size=4
        ),
    )
    def set_thp(self, enabled: ThpSetting | None, sizes: dict[int, ThpSetting]) -> None:
        """Changes the mTHP knobs of both machines alike."""
        self.both(lambda m: m.set_thp(enabled, sizes))

    @rule(owner=st.sampled_from(OWNERS), order=st.integers(0, 4), count=st.integers(17, 1500))
    def fragment(self, owner: str, order: int, count: int) -> None:
        """Allocates file folios and frees every other one, scattering free memory."""
        outcome = self.allocate(owner, FolioKind.FILE, order=order, count=count)
        if outcome[0] == "ok":
            made = outcome[1]
            assert made is not None
            first = made.first_handle  # type: ignore[attr-defined]
            handles = list(range(first, first + count, 2))
            self.both(lambda m: m.free(handles))
            self.freed += handles

    @precondition(lambda self: self.a.table.nr_live > 0)
    @rule(
        size=st.sampled_from(["few", "many", "all"]),
        arrange=st.sampled_from(["shuffled", "ascending", "descending"]),
        bad=st.sampled_from(["", "", "", "", "freed", "unknown", "duplicate", "huge"]),
        as_array=st.booleans(),
        seed=st.integers(0, 2**32 - 1),
    )
    def free(self, size: str, arrange: str, bad: str, as_array: bool, seed: int) -> None:
        """Frees a random subset of live handles in random, ascending or descending order; with a
        bad handle anywhere in it, both reject it and neither changes at all."""
        rng = random.Random(seed)
        live = self.a.table.live_handles().tolist()
        if size == "few":
            n = rng.randint(1, min(16, len(live)))
        elif size == "many":
            n = rng.randint(min(17, len(live)), len(live))
        else:
            n = len(live)
        chosen = rng.sample(live, n)
        if arrange != "shuffled":
            chosen.sort(reverse=arrange == "descending")
        if bad == "freed" and not self.freed:
            bad = "unknown"
        error: type[FoliodError] = UnknownFolio
        if bad == "freed":
            wrong, error = rng.choice(self.freed), FolioAlreadyFreed
        elif bad == "unknown":
            nxt = self.a.next_handle
            wrong = rng.choice([0, -1, nxt, nxt + CHUNK + 3])
        elif bad == "duplicate":
            wrong, error = rng.choice(chosen), InvalidArgument
        elif bad == "huge":
            wrong = rng.choice([1 << 62, 1 << 63, -(1 << 63)])
        if bad:
            chosen.insert(rng.randint(0, len(chosen)), wrong)
            before = (machine_state(self.a), machine_state(self.b))
        handles: list[int] | np.ndarray[Any, Any] = chosen
        if as_array and not bad:
            handles = np.array(chosen, np.int64)
        outcome = self.both(lambda m: m.free(handles))
        if not bad:
            assert outcome[0] == "ok", outcome
            self.freed += chosen
            return
        assert outcome[0] == "error", f"bad handle {wrong} in {len(chosen)} was accepted"
        assert outcome[1][0] is error, outcome  # type: ignore[index]
        require_unchanged(before[0], self.a, "a rejected free", events=True)
        require_unchanged(before[1], self.b, "a rejected free", events=True)

    @rule(owner=st.sampled_from((*OWNERS, "nobody")))
    def release_owner(self, owner: str) -> None:
        """Releases an owner with its folios and page tables (an unknown one is rejected)."""
        holder = self.a.owners.get(owner)
        handles = holder.handles().tolist() if holder is not None else []
        self.both(lambda m: m.release_owner(owner))
        self.freed += handles

    @precondition(lambda self: self.a.table.nr_live > 0)
    @rule(seed=st.integers(0, 2**32 - 1), payload=st.binary(min_size=1, max_size=32))
    def write(self, seed: int, payload: bytes) -> None:
        """Writes bytes into a live folio of both machines (freeing must drop them alike)."""
        live = self.a.table.live_handles()
        handle = int(live[seed % len(live)])
        size = self.a.lookup(handle).size_bytes
        offset = seed % (size - len(payload) + 1)
        self.both(lambda m: m.folio_write(handle, offset, payload))

    # -- invariants --------------------------------------------------------------------------

    @invariant()
    def same_state(self) -> None:
        """Both machines hold exactly the same free lists, folios, counters and page tables."""
        require_same(self.a, self.b, "after the step")

    @invariant()
    def bulk_machine_is_consistent(self) -> None:
        """check_machine proves the bulk machine's own invariants."""
        check_machine(self.a)


@pytest.mark.slow
def test_bulk_and_one_at_a_time_machines_agree() -> None:
    """Random Allocate, Free, ReleaseOwner, SetThp and write sequences leave a machine taking
    the bulk paths in exactly the state of one that goes one block at a time."""
    run_state_machine_as_test(
        BulkPair,
        settings=settings(
            max_examples=40,
            stateful_step_count=25,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )


# -- one large call --------------------------------------------------------------------------


@pytest.mark.slow
def test_300k_anon_pages_in_one_call() -> None:
    """300,000 order-0 anon pages in one Allocate (586 PTE tables, 74 handle chunks), then every
    third handle freed, then the owner released: bulk and one at a time agree throughout."""
    # 1 GiB holds only 262,144 pages: the request is refused alike there.
    small = (Machine("a", 1 << 30), Machine("b", 1 << 30))
    small[1].bulk = False
    for m in small:
        with pytest.raises(InvalidArgument):
            m.allocate("p", FolioKind.ANON, order=0, count=300_000)
    a, b = Machine("a", 2 << 30), Machine("b", 2 << 30)
    b.bulk = False
    made = a.allocate("p", FolioKind.ANON, order=0, count=300_000)
    assert made == b.allocate("p", FolioKind.ANON, order=0, count=300_000)
    assert made.count == 300_000 <= MAX_FOLIOS_PER_CALL
    cols = folio_columns(a)
    require_equal("pfns", cols["pfn"], folio_columns(b)["pfn"])
    require_equal("vaddrs", cols["vaddr"], folio_columns(b)["vaddr"])
    assert cols["vaddr"] == list(range(300_000))
    require_same(a, b, "after allocating")
    check_machine(a)
    handles = list(range(made.first_handle, made.first_handle + made.count, 3))
    assert a.free(handles) == b.free(handles)
    require_same(a, b, "after freeing every third handle")
    check_machine(a)
    assert a.release_owner("p") == b.release_owner("p")
    require_same(a, b, "after releasing the owner")
    check_machine(a)
    assert a.zone.nr_free == a.nr_pages
