"""Textbook FIFO: pages leave in the order they came; hits change nothing."""

from __future__ import annotations

from collections.abc import Iterator
from typing import ClassVar

from foliod.mm.folio_store import FolioStore
from foliod.mm.lru.base import ReclaimPolicy
from foliod.mm.vmstat import VmEvent


class Fifo(ReclaimPolicy):
    name: ClassVar[str] = "fifo"

    def __init__(self, events: dict[VmEvent, int], store: FolioStore | None = None) -> None:
        super().__init__(events, store)
        # Oldest first.
        self.head = self.queue = self.store.new_list()
        self.nr_folios = 0
        self.requeue = self.store.mover_to_tail(self.head)

    def add(self, f: int) -> None:
        self.store.list_add_tail(f, self.head)
        self.nr_pages += 1 << self.store.order[f]
        self.nr_folios += 1

    def remove(self, f: int) -> None:
        self.store.list_del(f)
        self.nr_pages -= 1 << self.store.order[f]
        self.nr_folios -= 1

    def mark_accessed(self, f: int, fresh: bool = False) -> None:
        pass

    def victim(self) -> int:
        return self.store.list_first(self.head)

    def pass_over(self, f: int) -> None:
        self.store.list_move_tail(f, self.head)

    def folios(self) -> Iterator[int]:
        return self.store.list_iter(self.head)

    def lists(self) -> dict[str, int]:
        return {"fifo": self.nr_folios}

    def list_pages(self) -> dict[str, int]:
        return {"fifo": self.nr_pages}

    def check(self) -> None:
        super().check()
        assert self.list_lengths({"fifo": self.head}) == self.lists(), "fifo: folio count off"
