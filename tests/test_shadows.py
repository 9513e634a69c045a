"""Shadow entries as the kernel's xarray keeps them: one multi-index entry per evicted large
folio, split when a smaller folio comes in under it, cleared whole by truncation. Checked
against a page-by-page model."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from foliod.mm.debug import _check_shadows
from foliod.mm.filemap import Inode

PAGES = 1536  # the file's pages in these tests: three blocks of the largest folio's size
MAX_ORDER = 9


def _inode() -> Inode:
    return Inode("f", PAGES * 4096, MAX_ORDER, 0)


def _pages(inode: Inode) -> dict[int, tuple[int, int]]:
    """Page -> (token, head of its entry)."""
    return {
        page: (token, head)
        for head, token in inode.shadows.items()
        for page in range(head, head + inode.shadow_span(head))
    }


def test_an_evicted_large_folio_leaves_one_entry_and_comes_back_whole() -> None:
    inode = _inode()
    inode.add_shadow(16, 4, 7)
    assert inode.shadows == {16: 7} and inode.shadow_orders == {16: 4}
    assert inode.take_shadows(16, 16) == 7
    assert inode.shadows == {} and inode.shadow_orders == {}


def test_a_smaller_folio_under_a_large_entry_splits_it() -> None:
    """An order-2 folio at 20 under an order-4 entry at 16: the entry's other three order-2
    pieces stay, with its token (xas_split)."""
    inode = _inode()
    inode.add_shadow(16, 4, 7)
    assert inode.take_shadows(20, 4) == 7
    assert inode.shadows == {16: 7, 24: 7, 28: 7}
    assert inode.shadow_orders == {16: 2, 24: 2, 28: 2}


def test_a_larger_folio_takes_every_entry_under_it_and_returns_the_last() -> None:
    """As __filemap_add_folio keeps the last entry xas_for_each_conflict visits."""
    inode = _inode()
    inode.add_shadow(34, 0, 5)
    inode.add_shadow(36, 2, 6)
    inode.add_shadow(44, 2, 8)
    assert inode.take_shadows(32, 16) == 8
    assert inode.shadows == {} and inode.shadow_orders == {}


def test_truncation_clears_an_entry_that_reaches_the_new_end_whole() -> None:
    inode = _inode()
    inode.add_shadow(0, 3, 1)
    inode.add_shadow(8, 3, 2)
    inode.add_shadow(16, 0, 3)
    inode.drop_shadows_from(12)  # the entry over 8..15 straddles page 12
    assert inode.shadows == {0: 1}


@st.composite
def _slot(draw: st.DrawFn) -> tuple[int, int]:
    """An aligned folio slot; mostly in the first 64 pages of a block, so that entries meet."""
    order = draw(st.integers(0, MAX_ORDER))
    block = draw(st.integers(0, PAGES // 512 - 1)) * 512
    if order > 6 or draw(st.booleans()):
        return block + (draw(st.integers(0, 512 // (1 << order) - 1)) << order), order
    return block + (draw(st.integers(0, 64 // (1 << order) - 1)) << order), order


class ShadowMachine(RuleBasedStateMachine):
    """Random evictions (where no entry is), folio insertions and truncations; the model keeps
    each page's token and the entry it belongs to, page by page."""

    @initialize()
    def start(self) -> None:
        self.inode = _inode()
        self.model: dict[int, tuple[int, int]] = {}  # page -> (token, entry id)
        self.ids = itertools.count(1)
        self.tokens = itertools.count(1)

    def _free(self, index: int, order: int) -> bool:
        return all(p not in self.model for p in range(index, index + (1 << order)))

    @rule(slot=_slot())
    def evict(self, slot: tuple[int, int]) -> None:
        index, order = slot
        if not self._free(index, order):
            return  # reclaim only evicts resident folios: no entry is there
        token, entry = next(self.tokens), next(self.ids)
        self.inode.add_shadow(index, order, token)
        for page in range(index, index + (1 << order)):
            self.model[page] = (token, entry)

    @rule(slot=_slot())
    def insert(self, slot: tuple[int, int]) -> None:
        index, order = slot
        nr_pages = 1 << order
        covered = [p for p in range(index, index + nr_pages) if p in self.model]
        expected = self.model[covered[-1]][0] if covered else None  # the last, as the kernel
        # An entry reaching beyond the range is split into pieces of the folio's size.
        outside = {self.model[p][1] for p in covered if self._entry_reaches_out(p, index, nr_pages)}
        for entry in outside:
            pages = sorted(p for p, (_, e) in self.model.items() if e == entry)
            token = self.model[pages[0]][0]
            for piece in range(pages[0], pages[-1] + 1, nr_pages):
                piece_id = next(self.ids)
                for page in range(piece, piece + nr_pages):
                    self.model[page] = (token, piece_id)
        for page in covered:
            del self.model[page]
        assert self.inode.take_shadows(index, nr_pages) == expected

    def _entry_reaches_out(self, page: int, index: int, nr_pages: int) -> bool:
        entry = self.model[page][1]
        return any(
            e == entry and not index <= p < index + nr_pages for p, (_, e) in self.model.items()
        )

    @rule(keep=st.integers(0, PAGES))
    def truncate(self, keep: int) -> None:
        gone = {e for p, (_, e) in self.model.items() if p >= keep}
        self.model = {p: v for p, v in self.model.items() if v[1] not in gone}
        self.inode.drop_shadows_from(keep)

    @precondition(lambda self: hasattr(self, "inode"))
    @invariant()
    def matches_the_model(self) -> None:
        _check_shadows(self.inode)
        pages = _pages(self.inode)
        assert {p: t for p, (t, _) in pages.items()} == {p: t for p, (t, _) in self.model.items()}
        # The same grouping of pages into entries.
        mine = {frozenset(p for p in pages if pages[p][1] == h) for h in self.inode.shadows}
        theirs: dict[int, set[int]] = {}
        for page, (_, entry) in self.model.items():
            theirs.setdefault(entry, set()).add(page)
        assert mine == {frozenset(s) for s in theirs.values()}


TestShadows = pytest.mark.slow(ShadowMachine.TestCase)
TestShadows.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)


@given(st.lists(_slot(), max_size=20))
def test_base_page_entries_only_behave_as_per_page_entries(slots: list[tuple[int, int]]) -> None:
    """With no large entries, take_shadows pops page by page and keeps the last token."""
    inode = _inode()
    for page in range(0, PAGES, 3):
        inode.add_shadow(page, 0, page + 1)
    model = {page: page + 1 for page in range(0, PAGES, 3)}
    for index, order in slots:
        pages = [p for p in range(index, index + (1 << order)) if p in model]
        assert inode.take_shadows(index, 1 << order) == (model[pages[-1]] if pages else None)
        for page in pages:
            del model[page]
        assert inode.shadows == model
