"""The multi-generational LRU, reduced to its rules (Documentation/mm/multigen_lru.rst).

Folios live in 2 to 4 generations; a new page cache folio joins the oldest one (it is clean and
cold: lru_gen_add_folio). Reads raise a folio's access count, which places it in one of 4 tiers.
Eviction takes the oldest generation, first in first out, except that a folio in tier 2 or
above is protected: it moves up one generation with its count reset. When only two generations
are left, aging opens a new youngest one and promotes every accessed folio into it. Active(file)
is what the two youngest generations hold, as the kernel reports it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from typing import ClassVar

from foliod.mm.lru.base import ReclaimPolicy
from foliod.mm.mm_types import Folio
from foliod.mm.vmstat import VmEvent

MIN_NR_GENS = 2
MAX_NR_GENS = 4
MAX_TIER = 3
PROTECTED_TIER = 2


class Mglru(ReclaimPolicy):
    name: ClassVar[str] = "mglru"

    def __init__(self, events: dict[VmEvent, int]) -> None:
        super().__init__(events)
        self.min_seq = 0
        self.max_seq = MIN_NR_GENS - 1
        self.gens: dict[int, OrderedDict[Folio, None]] = {
            seq: OrderedDict() for seq in range(self.min_seq, self.max_seq + 1)
        }
        self.gen_pages: dict[int, int] = dict.fromkeys(self.gens, 0)

    def __put(self, folio: Folio, seq: int) -> None:
        folio.gen = seq
        self.gens[seq][folio] = None
        self.gen_pages[seq] += folio.nr_pages

    def __take(self, folio: Folio) -> None:
        del self.gens[folio.gen][folio]
        self.gen_pages[folio.gen] -= folio.nr_pages

    def add(self, folio: Folio) -> None:
        folio.refs = 0
        self.__put(folio, self.min_seq)
        self.nr_pages += folio.nr_pages

    def remove(self, folio: Folio) -> None:
        self.__take(folio)
        self.nr_pages -= folio.nr_pages

    def mark_accessed(self, folio: Folio, fresh: bool = False) -> None:
        folio.refs = min(folio.refs + 1, MAX_TIER)

    @property
    def nr_active(self) -> int:
        return sum(pages for seq, pages in self.gen_pages.items() if seq >= self.max_seq - 1)

    def age(self) -> None:
        """inc_max_seq: a new youngest generation; accessed folios are promoted into it."""
        self.max_seq += 1
        self.gens[self.max_seq] = OrderedDict()
        self.gen_pages[self.max_seq] = 0
        for seq in range(self.min_seq, self.max_seq):
            for folio in [f for f in self.gens[seq] if f.refs]:
                self.__take(folio)
                folio.refs = 0
                self.__put(folio, self.max_seq)
                self.events[VmEvent.PGACTIVATE] += folio.nr_pages

    def victim(self) -> Folio | None:
        while self.nr_pages:
            oldest = self.gens[self.min_seq]
            if not oldest:
                if self.max_seq - self.min_seq + 1 > MIN_NR_GENS:
                    del self.gens[self.min_seq], self.gen_pages[self.min_seq]
                    self.min_seq += 1
                else:
                    self.age()
                continue
            folio = next(iter(oldest))
            if folio.refs >= PROTECTED_TIER:
                self.__take(folio)
                folio.refs = 0
                self.__put(folio, self.min_seq + 1)
                continue
            return folio
        return None

    def pass_over(self, folio: Folio) -> None:
        self.__take(folio)
        self.__put(folio, self.min_seq + 1)

    def folios(self) -> Iterator[Folio]:
        for gen in self.gens.values():
            yield from gen

    def lists(self) -> dict[str, int]:
        return {f"gen{seq - self.min_seq}": len(gen) for seq, gen in self.gens.items()}

    def list_pages(self) -> dict[str, int]:
        return {f"gen{seq - self.min_seq}": self.gen_pages[seq] for seq in self.gens}

    def check(self) -> None:
        super().check()
        assert MIN_NR_GENS <= len(self.gens) <= MAX_NR_GENS + 1, f"{len(self.gens)} generations"
        for seq, gen in self.gens.items():
            assert all(f.gen == seq for f in gen), f"a folio in generation {seq} says otherwise"
            assert self.gen_pages[seq] == sum(f.nr_pages for f in gen), f"gen {seq} count off"
