"""Textbook FIFO: pages leave in the order they came; hits change nothing."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from typing import ClassVar

from foliod.mm.lru.base import ReclaimPolicy
from foliod.mm.mm_types import Folio
from foliod.mm.vmstat import VmEvent


class Fifo(ReclaimPolicy):
    name: ClassVar[str] = "fifo"

    def __init__(self, events: dict[VmEvent, int]) -> None:
        super().__init__(events)
        # Oldest first.
        self.fifo: OrderedDict[Folio, None] = OrderedDict()
        self.requeue = self.fifo.move_to_end
        self.queue = self.fifo

    def add(self, folio: Folio) -> None:
        self.fifo[folio] = None
        self.nr_pages += folio.nr_pages

    def remove(self, folio: Folio) -> None:
        del self.fifo[folio]
        self.nr_pages -= folio.nr_pages

    def mark_accessed(self, folio: Folio, fresh: bool = False) -> None:
        pass

    def victim(self) -> Folio | None:
        return next(iter(self.fifo), None)

    def pass_over(self, folio: Folio) -> None:
        self.fifo.move_to_end(folio)

    def folios(self) -> Iterator[Folio]:
        return iter(self.fifo)

    def lists(self) -> dict[str, int]:
        return {"fifo": len(self.fifo)}

    def list_pages(self) -> dict[str, int]:
        return {"fifo": self.nr_pages}
