"""Textbook LRU: a hit moves the page to the most recent end; evict the least recent."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from typing import ClassVar

from foliod.mm.lru.base import ReclaimPolicy
from foliod.mm.mm_types import Folio
from foliod.mm.vmstat import VmEvent


class Lru(ReclaimPolicy):
    name: ClassVar[str] = "lru"

    def __init__(self, events: dict[VmEvent, int]) -> None:
        super().__init__(events)
        # Least recent first.
        self.order: OrderedDict[Folio, None] = OrderedDict()
        self.touch = self.requeue = self.order.move_to_end
        self.queue = self.order

    def add(self, folio: Folio) -> None:
        self.order[folio] = None
        self.nr_pages += folio.nr_pages

    def remove(self, folio: Folio) -> None:
        del self.order[folio]
        self.nr_pages -= folio.nr_pages

    def mark_accessed(self, folio: Folio, fresh: bool = False) -> None:
        self.order.move_to_end(folio)

    def victim(self) -> Folio | None:
        return next(iter(self.order), None)

    def pass_over(self, folio: Folio) -> None:
        self.mark_accessed(folio, False)

    def folios(self) -> Iterator[Folio]:
        return iter(self.order)

    def lists(self) -> dict[str, int]:
        return {"lru": len(self.order)}

    def list_pages(self) -> dict[str, int]:
        return {"lru": self.nr_pages}
