"""The page cache's folio columns: LRU lists linked through them, and a mapping's leaves."""

from __future__ import annotations

import platform

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from foliod.main import fix_mmap_threshold
from foliod.mm.filemap import XA_BIG_ORDER, XA_SLOTS, Inode
from foliod.mm.folio_store import NO_FOLIO, PG_DIRTY, CacheFolio, FolioStore

list_ops = st.lists(
    st.tuples(st.sampled_from(["add", "add_head", "del", "move", "new"]), st.integers(0, 30)),
    max_size=80,
)


@settings(max_examples=200, deadline=None)
@given(ops=list_ops)
def test_lists_match_a_python_list(ops: list[tuple[str, int]]) -> None:
    """Adding, deleting and moving ids on a list through the columns keeps the order a Python
    list kept the same way, forwards and backwards."""
    store = FolioStore()
    head = store.new_list()
    model: list[int] = []
    loose = [store.new(pfn, 0) for pfn in range(4)]
    for op, pick in ops:
        if op == "new":
            loose.append(store.new(100 + pick, 0))
        elif op in ("add", "add_head") and loose:
            f = loose.pop(pick % len(loose))
            if op == "add":
                store.list_add_tail(f, head)
                model.append(f)
            else:
                store.list_add(f, head)
                model.insert(0, f)
        elif op == "del" and model:
            f = model.pop(pick % len(model))
            store.list_del(f)
            loose.append(f)
        elif op == "move" and model:
            f = model.pop(pick % len(model))
            store.list_move_tail(f, head)
            model.append(f)
        assert list(store.list_iter(head)) == model
        backwards = []
        f = store.prev[head]
        while f != head:
            backwards.append(f)
            f = store.prev[f]
        assert backwards == model[::-1]
        assert store.list_first(head) == (model[0] if model else NO_FOLIO)


def test_the_mover_is_list_move_tail() -> None:
    """mover_to_tail(head)(f) moves f to the tail exactly as list_move_tail does."""
    store = FolioStore()
    head = store.new_list()
    ids = [store.new(pfn, 0) for pfn in range(5)]
    for f in ids:
        store.list_add_tail(f, head)
    move = store.mover_to_tail(head)
    move(ids[1])
    move(ids[4])
    move(ids[0])
    move(ids[0])  # already the youngest: stays
    assert list(store.list_iter(head)) == [ids[2], ids[3], ids[1], ids[4], ids[0]]


def test_ids_are_reused_and_columns_reset() -> None:
    """A released id comes back for the next folio with its flags, data and dirty time gone."""
    store = FolioStore()
    f = store.new(7, 2)
    store.flags[f] |= PG_DIRTY
    store.dirtied_at[f] = 1.0
    store.contents[f] = {0: bytearray(b"x")}
    store.release(f)
    assert store.nr_live == 0
    g = store.new(9, 0)
    assert g == f
    view = CacheFolio(store, g)
    assert (view.pfn, view.order, view.dirty, view.contents, view.dirtied_at) == (
        9,
        0,
        False,
        None,
        0.0,
    )
    many = store.new_many(list(range(0, 4096, 2)), 1)
    assert len(set(many)) == 2048 and g not in many
    assert [store.pfn[i] for i in many[:3]] == [0, 2, 4] and store.order[many[-1]] == 1


@st.composite
def layouts(draw: st.DrawFn) -> list[tuple[int, int]]:
    """Non-overlapping aligned (index, order) folios over a span of a few leaves."""
    out = []
    index = draw(st.integers(0, 3)) * XA_SLOTS
    for _ in range(draw(st.integers(0, 25))):
        order = draw(st.sampled_from([0, 0, 1, 2, 3, 5, 7, XA_BIG_ORDER, 9]))
        index = (index + (1 << order) - 1) & ~((1 << order) - 1)
        index += draw(st.integers(0, 3)) << order
        out.append((index, order))
        index += 1 << order
    return out


@settings(max_examples=200, deadline=None)
@given(layout=layouts(), erase=st.sets(st.integers(0, 24)))
def test_the_mapping_finds_what_a_dict_would(
    layout: list[tuple[int, int]], erase: set[int]
) -> None:
    """get() answers the folio covering each index, head_at() the one starting there, and
    any_head_in() whether one starts in a range, with folios stored and some erased again."""
    store = FolioStore()
    inode = Inode("f", 0, 9, 0, store=store)
    held: dict[int, tuple[int, int]] = {}
    for i, (index, order) in enumerate(layout):
        f = store.new(i, order)
        store.index[f] = index
        store.mapping[f] = inode.number
        inode.xa_store(index, f, order)
        held[index] = (f, order)
    for i, (index, order) in enumerate(layout):
        if i in erase:
            inode.xa_erase(index, order)
            store.release(held.pop(index)[0])
    covering = {i: f for head, (f, order) in held.items() for i in range(head, head + (1 << order))}
    end = max((h + (1 << o) for h, (_, o) in held.items()), default=0) + XA_SLOTS
    for index in range(end):
        assert inode.get(index) == covering.get(index, NO_FOLIO), index
        assert inode.head_at(index) == (held[index][0] if index in held else NO_FOLIO)
    assert inode.heads() == sorted((h, f) for h, (f, _) in held.items())
    for lo in range(0, end, 37):
        for hi in (lo + 1, lo + 100, lo + 600):
            assert inode.any_head_in(lo, hi) == any(lo <= h < hi for h in held), (lo, hi)
    for counts, leaves in ((inode.leaf_counts, inode.leaves), (inode.medium_counts, inode.medium)):
        assert all(counts.values()) and counts.keys() == leaves.keys()
    assert sum(inode.nr_by_order) == len(held)


def test_the_mmap_threshold_is_fixed_on_glibc() -> None:
    """foliod pins glibc's mmap threshold (mallopt succeeds) where the C library is glibc."""
    if platform.libc_ver()[0] != "glibc":
        pytest.skip(f"the C library is {platform.libc_ver()[0] or 'unknown'}, not glibc")
    assert fix_mmap_threshold()
