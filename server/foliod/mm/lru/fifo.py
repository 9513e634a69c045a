"""Textbook FIFO: pages leave in the order they came; hits change nothing."""

from __future__ import annotations

from typing import ClassVar

from foliod.mm.folio_store import FolioStore
from foliod.mm.lru.base import OneList
from foliod.mm.vmstat import VmEvent


class Fifo(OneList):
    name: ClassVar[str] = "fifo"
    textbook: ClassVar[bool] = True

    def __init__(self, events: dict[VmEvent, int], store: FolioStore | None = None) -> None:
        super().__init__(events, store)
        self.queue = self.head
        self.requeue = self.store.mover_to_tail(self.head)

    def mark_accessed(self, f: int, *, fresh: bool = False) -> None:
        pass

    def victim(self) -> int:
        return self.store.list_first(self.head)
