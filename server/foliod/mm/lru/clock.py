"""Textbook CLOCK: one reference bit per page, clear when the page comes in and set by a hit.
The hand sweeps from the oldest page: a set bit is cleared and the page passed by (second
chance), the first clear one is evicted. The queue below is the clock face read from the hand.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from typing import ClassVar

from foliod.mm.lru.base import ReclaimPolicy
from foliod.mm.mm_types import Folio
from foliod.mm.vmstat import VmEvent


class Clock(ReclaimPolicy):
    name: ClassVar[str] = "clock"

    def __init__(self, events: dict[VmEvent, int]) -> None:
        super().__init__(events)
        # From the hand onwards; a new page goes just behind the hand (the end).
        self.face: OrderedDict[Folio, None] = OrderedDict()

    def add(self, folio: Folio) -> None:
        folio.referenced = False
        self.face[folio] = None
        self.nr_pages += folio.nr_pages

    def remove(self, folio: Folio) -> None:
        del self.face[folio]
        self.nr_pages -= folio.nr_pages

    def mark_accessed(self, folio: Folio, fresh: bool = False) -> None:
        if not fresh:
            folio.referenced = True

    def victim(self) -> Folio | None:
        face = self.face
        while face:
            folio = next(iter(face))
            if not folio.referenced:
                return folio
            folio.referenced = False
            face.move_to_end(folio)
        return None

    def pass_over(self, folio: Folio) -> None:
        self.face.move_to_end(folio)

    def folios(self) -> Iterator[Folio]:
        return iter(self.face)

    def lists(self) -> dict[str, int]:
        return {"clock": len(self.face)}

    def list_pages(self) -> dict[str, int]:
        return {"clock": self.nr_pages}
