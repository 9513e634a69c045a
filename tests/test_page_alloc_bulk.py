"""The buddy allocator's bulk paths against one block at a time: same frames, same free lists."""

from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from foliod.mm import MAX_PAGE_ORDER, FolioKind, Machine, check_machine
from foliod.mm.page_alloc import Zone


def lists(zone: Zone) -> list[list[int]]:
    """The free lists, in list order (the order rmqueue takes them in)."""
    return [list(area) for area in zone.free_area]


def reference_boot_lists(nr_pages: int) -> list[list[int]]:
    """Free lists after boot as the kernel's memblock_free_all leaves them, block by block:
    the largest aligned blocks, each list's lowest block at its head (its end here)."""
    blocks = []
    pfn = 0
    while pfn < nr_pages:
        order = MAX_PAGE_ORDER if pfn == 0 else min(MAX_PAGE_ORDER, (pfn & -pfn).bit_length() - 1)
        while pfn + (1 << order) > nr_pages:
            order -= 1
        blocks.append((pfn, order))
        pfn += 1 << order
    out: list[list[int]] = [[] for _ in range(MAX_PAGE_ORDER + 1)]
    for pfn, order in reversed(blocks):
        out[order].append(pfn)
    return out


@pytest.mark.parametrize("nr_pages", [1, 3, 1023, 1024, 1025, 5000, 70_001, (1 << 20) + 3])
def test_boot_lists_match_block_by_block(nr_pages: int) -> None:
    """A zone's boot-time free lists equal those freeing its blocks one by one gives."""
    assert lists(Zone(nr_pages)) == reference_boot_lists(nr_pages)


def churned_pair(seed: int, nr_pages: int) -> tuple[Zone, Zone, list[tuple[int, int]]]:
    """Two zones given the same random allocations and frees; returns them and what is held."""
    rng = random.Random(seed)
    a, b = Zone(nr_pages), Zone(nr_pages)
    held: list[tuple[int, int]] = []
    for _ in range(rng.randrange(400)):
        order = rng.randrange(4)
        pfn = a.rmqueue(order)
        assert pfn == b.rmqueue(order)
        if pfn is not None:
            held.append((pfn, order))
        if held and rng.random() < 0.4:
            pfn, order = held.pop(rng.randrange(len(held)))
            a.free_one_page(pfn, order)
            b.free_one_page(pfn, order)
    return a, b, held


@settings(max_examples=100, deadline=None)
@given(
    seed=st.integers(0, 2**32),
    nr_pages=st.sampled_from([4096, 5000, 70_000]),
    order=st.integers(0, MAX_PAGE_ORDER),
    share=st.floats(0, 1),
)
def test_rmqueue_bulk_takes_what_rmqueue_takes(
    seed: int, nr_pages: int, order: int, share: float
) -> None:
    """rmqueue_bulk(order, n) returns the frames n rmqueue(order) calls return and leaves the
    lists alike, partly used blocks included."""
    a, b, _ = churned_pair(seed, nr_pages)
    count = int(a.nr_obtainable(order) * share)
    one_by_one = [a.rmqueue(order) for _ in range(count)]
    assert b.rmqueue_bulk(order, count).tolist() == one_by_one
    assert (lists(b), b.nr_free) == (lists(a), a.nr_free)


@pytest.mark.slow
@settings(max_examples=100, deadline=None)
@given(seed=st.integers(0, 2**32), nr_pages=st.sampled_from([4096, 5000, 70_000]))
def test_free_pages_bulk_frees_as_free_one_page(seed: int, nr_pages: int) -> None:
    """free_pages_bulk of blocks in a given order merges them as free_one_page in that order
    would: the same blocks on the same lists in the same list order."""
    a, b, held = churned_pair(seed, nr_pages)
    rng = random.Random(seed)
    for order in (0, 2, 5):
        count = a.nr_obtainable(order) // rng.choice((1, 3, 50))
        held += [(pfn, order) for pfn in b.rmqueue_bulk(order, count).tolist()]
        for _ in range(count):
            a.rmqueue(order)
    rng.shuffle(held)
    freed = held[: rng.randrange(len(held) + 1)]
    for pfn, order in freed:
        a.free_one_page(pfn, order)
    b.free_pages_bulk(
        np.array([p for p, _ in freed], np.int64), np.array([o for _, o in freed], np.int8)
    )
    assert (lists(b), b.nr_free) == (lists(a), a.nr_free)


@pytest.mark.slow
@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**32))
def test_machines_in_bulk_and_one_at_a_time_agree(seed: int) -> None:
    """Random Allocate, Free and ReleaseOwner calls leave a machine that takes the bulk paths
    exactly like one that goes one block at a time."""
    rng = random.Random(seed)
    machines = [Machine("bulk", 256 << 20), Machine("one", 256 << 20)]
    machines[1].bulk = False
    for _ in range(12):
        owner = rng.choice("abc")
        kind = rng.choice([FolioKind.ANON, FolioKind.FILE, FolioKind.SLAB])
        order = rng.choice([0, 0, 2, 4] if kind is FolioKind.ANON else [0, 1, 3])
        count = rng.choice([1, 20, 700, 5000, 40_000])
        live = list(machines[0].folios)
        victims = rng.sample(live, min(len(live), rng.choice([0, 5, 300, 3000])))
        release = rng.random() < 0.2
        outcomes = []
        for m in machines:
            try:
                made = m.allocate(owner, kind, order=order, count=count)
                outcome: object = (made.first_handle, made.count, made.nr_pagetable_pages)
            except Exception as exc:
                outcome = type(exc)
            if victims:
                m.free(victims)
            if release and owner in m.owners:
                m.release_owner(owner)
            outcomes.append(outcome)
        assert outcomes[0] == outcomes[1]
        a, b = machines
        assert lists(a.zone) == lists(b.zone)
        assert (a.nr_folios, a.events) == (b.nr_folios, b.events)
        assert dict(a.folios.items()) == dict(b.folios.items())
    check_machine(machines[0])
