"""The interface every reclaim policy implements, and the shared reclaim loop (shrink_node).

A policy keeps page cache folios (ids in the machine's FolioStore) in its own order, on lists
linked through the store's columns, and names the next victim; the shared loop (`shrink`) does
the rest: it skips folios the current call holds, writes dirty ones back first (counted as
pgrotated: in the kernel they rotate to the tail and are freed once writeback ends; here
writeback ends within the call), evicts, and counts pgscan/pgsteal.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import ClassVar, Protocol

from foliod.mm.folio_store import NO_FOLIO, PG_DIRTY, FolioStore
from foliod.mm.vmstat import VmEvent


class Evictor(Protocol):
    """What reclaim asks of the page cache."""

    def writeback_folio(self, f: int) -> int: ...

    def evict_folio(self, f: int) -> None:
        """Takes the folio off its policy list and out of its file, and frees it."""
        ...

    # Folios in use by the call that is reclaiming (locked, in kernel terms).
    busy: set[int]


class ReclaimPolicy:
    """Base of the policies: page counts, nonresident age and the shared reclaim loop."""

    name: ClassVar[str] = ""
    # A textbook policy (lru, fifo, clock) counts every access, as cache simulators do; the
    # kernel's policies skip a read that starts in the folio where the previous one ended
    # (filemap_read's pos_same_folio check).
    textbook: ClassVar[bool] = False

    def __init__(self, events: dict[VmEvent, int], store: FolioStore | None = None) -> None:
        self.events = events
        self.store = store if store is not None else FolioStore()
        self.nr_pages = 0
        # Evictions and activations so far: what the base shadow() stamps entries with.
        self.nonresident_age = 0
        # A later access to a resident folio: mark_accessed(f), or a cheaper callable with
        # the same effect.
        self.touch: Callable[[int], None] = self.mark_accessed
        # remove(f), add(f) and mark_accessed(f, fresh=True) in one cheaper step, where a policy has
        # one (only policies whose refault() just counts, as the order differs).
        self.requeue: Callable[[int], None] | None = None
        # The head of the list whose first folio victim() returns, doing nothing else, where
        # there is one (NO_FOLIO: none); or the OrderedDict whose first key it returns.
        self.queue = NO_FOLIO
        self.ordered: OrderedDict[int, None] | None = None

    # -- what each policy provides ---------------------------------------------------------

    def add(self, f: int) -> None:
        """A new page cache folio enters (folio_add_lru)."""
        raise NotImplementedError

    def add_many(self, ids: list[int]) -> None:
        """add() of each folio in turn (a policy may do it in fewer steps)."""
        for f in ids:
            self.add(f)

    def recycle(self, f: int) -> int:
        """A clean base page limit reclaim evicts, whose frame is read in again at once (the
        replay short path): remove(f), its shadow token, its flags and policy state cleared,
        and add(f) as a new folio, in one step where a policy has a cheaper one. Returns the
        token."""
        self.remove(f)
        token = self.shadow(f)
        store = self.store
        store.flags[f] = store.gen[f] = store.refs[f] = 0
        self.add(f)
        return token

    def remove(self, f: int) -> None:
        """The folio leaves (eviction, truncation, deletion)."""
        raise NotImplementedError

    def remove_many(self, ids: list[int]) -> None:
        """remove() of each folio in turn (a policy may do it in fewer steps)."""
        for f in ids:
            self.remove(f)

    def mark_accessed(self, f: int, *, fresh: bool = False) -> None:
        """A read or write touched the folio; fresh when this very call brought it in."""
        raise NotImplementedError

    def victim(self) -> int:
        """The next folio to evict, after any aging or rotation the policy does; NO_FOLIO if
        empty. The folio stays first: asked again at once, victim() returns it and changes
        nothing."""
        raise NotImplementedError

    def pass_over(self, f: int) -> None:
        """A victim reclaim could not take now (busy): keep it, out of the way."""
        raise NotImplementedError

    def folios(self) -> Iterator[int]:
        raise NotImplementedError

    def lists(self) -> dict[str, int]:
        """Folios per list, by the list's name (for metrics)."""
        raise NotImplementedError

    def list_pages(self) -> dict[str, int]:
        """Pages per list, by the same names, from maintained counts (for metrics)."""
        raise NotImplementedError

    @property
    def nr_active(self) -> int:
        """Pages /proc/meminfo reports as Active(file)."""
        return 0

    @property
    def nr_inactive(self) -> int:
        return self.nr_pages - self.nr_active

    def shadow(self, f: int) -> int:
        """The token an evicted folio leaves in its shadow entries (workingset_eviction), never
        0; called once per eviction (truncation leaves none). Here the nonresident age, grown
        by the folio's pages first."""
        self.nonresident_age += 1 << self.store.order[f]
        return self.nonresident_age

    def refault(self, f: int, shadow: int) -> None:
        """A folio that left the token shadow is back, just added (workingset_refault)."""
        self.events[VmEvent.WORKINGSET_REFAULT_FILE] += 1 << self.store.order[f]

    def check(self) -> None:
        """Raises AssertionError if the policy's own bookkeeping is off (for the checker)."""
        order = self.store.order
        total = sum(1 << order[f] for f in self.folios())
        assert total == self.nr_pages, f"{self.name}: {self.nr_pages} pages counted, {total} held"
        pages = self.list_pages()
        assert pages.keys() == self.lists().keys(), f"{self.name}: list names disagree"
        assert sum(pages.values()) == self.nr_pages, f"{self.name}: list pages {pages} off"

    def list_lengths(self, heads: dict[str, int]) -> dict[str, int]:
        """Folios on each list, by name, counted along the links."""
        store = self.store
        return {name: sum(1 for _ in store.list_iter(head)) for name, head in heads.items()}

    # -- the shared loop -------------------------------------------------------------------

    def shrink(self, nr_to_reclaim: int, evictor: Evictor, *, direct: bool) -> int:
        """Reclaims up to nr_to_reclaim pages; returns pages freed. Looks at no more folios
        than it holds (plus one), so it ends even when nothing can be freed."""
        scan_event = VmEvent.PGSCAN_DIRECT if direct else VmEvent.PGSCAN_KSWAPD
        steal_event = VmEvent.PGSTEAL_DIRECT if direct else VmEvent.PGSTEAL_KSWAPD
        freed = 0
        budget = start = self.nr_pages + 1
        busy = evictor.busy
        order, flags = self.store.order, self.store.flags
        try:
            while freed < nr_to_reclaim and budget > 0:
                f = self.victim()
                if f == NO_FOLIO:
                    break
                nr = 1 << order[f]
                budget -= nr
                if f in busy:
                    self.pass_over(f)
                    continue
                if flags[f] & PG_DIRTY:
                    evictor.writeback_folio(f)
                    self.events[VmEvent.PGROTATED] += nr
                evictor.evict_folio(f)
                freed += nr
        finally:
            # Scanned and stolen pages, counted once (every page looked at left the budget).
            self.events[scan_event] += start - budget
            self.events[steal_event] += freed
        return freed


class OneList(ReclaimPolicy):
    """A policy with one list through the folio columns, oldest first (fifo, clock)."""

    def __init__(self, events: dict[VmEvent, int], store: FolioStore | None = None) -> None:
        super().__init__(events, store)
        self.head = self.store.new_list()
        self.nr_folios = 0

    def add(self, f: int) -> None:
        self.store.list_add_tail(f, self.head)
        self.nr_pages += 1 << self.store.order[f]
        self.nr_folios += 1

    def remove(self, f: int) -> None:
        self.store.list_del(f)
        self.nr_pages -= 1 << self.store.order[f]
        self.nr_folios -= 1

    def pass_over(self, f: int) -> None:
        self.store.list_move_tail(f, self.head)

    def folios(self) -> Iterator[int]:
        return self.store.list_iter(self.head)

    def lists(self) -> dict[str, int]:
        return {self.name: self.nr_folios}

    def list_pages(self) -> dict[str, int]:
        return {self.name: self.nr_pages}

    def check(self) -> None:
        super().check()
        assert self.list_lengths({self.name: self.head}) == self.lists(), f"{self.name}: count off"
