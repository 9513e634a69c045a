"""Owned folios as fixed-width columns by handle: what the memdescs of allocated folios hold.

A handle names one folio an Allocate call made; handles are handed out consecutively and never
reused. Their records live in chunks of CHUNK handles (one packed row each, with a numpy view
per column: pfn, virtual page, owner id, order, kind, flags), made when the first handle of a
chunk is handed out and dropped when the last live one in it is freed (unless handles are still
being handed out from it), as SPARSEMEM makes and drops memory-map sections. A record costs 23
bytes per folio whatever its order, instead of a Python object and dict entries; chunks of
4,096 keep the scan for one owner's folios short.

Owner id 0 marks a freed (or never issued) handle.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import cast

import numpy as np
import numpy.typing as npt

from foliod.mm.mm_types import FolioKind
from foliod.mm.page_alloc import PAGE_SIZE

CHUNK_SHIFT = 12
CHUNK = 1 << CHUNK_SHIFT
_MASK = CHUNK - 1
FREED = 0
# flags column bits
PMD_MAPPED = 1
HVO = 2
KINDS: tuple[FolioKind, ...] = tuple(FolioKind)
KIND_CODE: Mapping[FolioKind, int] = {kind: code for code, kind in enumerate(KINDS)}

Int64Array = npt.NDArray[np.int64]


@dataclass(frozen=True, slots=True)
class OwnedFolio:
    """One owned folio's record, read out of the table (GetFolio, checks, tests)."""

    handle: int
    pfn: int
    order: int
    kind: FolioKind
    owner: str
    # Virtual page in the owner's address space (anon only; -1 when not mapped).
    vaddr: int
    pmd_mapped: bool
    hvo: bool

    @property
    def nr_pages(self) -> int:
        return 1 << self.order

    @property
    def size_bytes(self) -> int:
        return PAGE_SIZE << self.order


RECORD = np.dtype(
    [
        ("pfn", np.int64),
        ("vaddr", np.int64),
        ("owner", np.int32),
        ("order", np.int8),
        ("kind", np.int8),
        ("flags", np.uint8),
    ]
)


class Chunk:
    """The records of handles [index * CHUNK, (index + 1) * CHUNK): one packed 23-byte row
    each, and a view of each column."""

    __slots__ = ("flags", "kind", "nr_live", "order", "owner", "pfn", "rows", "vaddr")

    def __init__(self) -> None:
        self.rows = np.zeros(CHUNK, RECORD)
        self.pfn = self.rows["pfn"]
        self.vaddr = self.rows["vaddr"]
        self.vaddr[:] = -1
        self.owner = self.rows["owner"]
        self.order = self.rows["order"]
        self.kind = self.rows["kind"]
        self.flags = self.rows["flags"]
        self.nr_live = 0


@dataclass(frozen=True, slots=True)
class Records:
    """Columns of a set of live records, in the order asked for."""

    handles: Int64Array
    pfn: Int64Array
    vaddr: Int64Array
    owner: npt.NDArray[np.int32]
    order: npt.NDArray[np.int8]
    kind: npt.NDArray[np.int8]
    flags: npt.NDArray[np.uint8]

    def __len__(self) -> int:
        return len(self.handles)

    @property
    def nr_pages(self) -> int:
        return int((np.int64(1) << self.order.astype(np.int64)).sum())


def by_chunk(handles: Int64Array) -> Iterator[tuple[int, slice | Int64Array]]:
    """(chunk index, where in handles) for each chunk the handles fall in: slices when the
    handles ascend (the common case: whole calls and owners), index arrays otherwise."""
    if not len(handles):
        return
    chunk_of = handles >> CHUNK_SHIFT
    if len(handles) == 1 or bool((chunk_of[1:] >= chunk_of[:-1]).all()):
        first, last = int(chunk_of[0]), int(chunk_of[-1])
        if first == last:
            yield first, slice(None)
            return
        # Where each run of one chunk starts: as many as there are chunks touched, however far
        # apart they lie (a bogus handle may sit near 2^63).
        starts = np.flatnonzero(np.concatenate(([True], chunk_of[1:] != chunk_of[:-1])))
        ends = [*starts[1:].tolist(), len(handles)]
        for start, end in zip(starts.tolist(), ends, strict=True):
            yield int(chunk_of[start]), slice(start, end)
        return
    order = np.argsort(chunk_of, kind="stable")
    sorted_chunks = chunk_of[order]
    starts = np.flatnonzero(np.concatenate(([True], sorted_chunks[1:] != sorted_chunks[:-1])))
    ends = [*starts[1:].tolist(), len(handles)]
    for start, end in zip(starts.tolist(), ends, strict=True):
        yield int(sorted_chunks[start]), order[start:end]


class FolioTable:
    """Every live owned folio of a machine, by handle."""

    def __init__(self) -> None:
        self.chunks: dict[int, Chunk] = {}
        self.next_handle = 1
        self.nr_live = 0

    def append(
        self,
        pfn: Int64Array,
        order: int | npt.NDArray[np.int8],
        kind: FolioKind,
        owner_id: int,
        *,
        vaddr: Int64Array | None = None,
        flags: int | npt.NDArray[np.uint8] = 0,
    ) -> int:
        """Records len(pfn) new folios under consecutive handles; returns the first."""
        first = self.next_handle
        count = len(pfn)
        done = 0
        while done < count:
            handle = first + done
            chunk = self.chunks.get(handle >> CHUNK_SHIFT)
            if chunk is None:
                chunk = self.chunks[handle >> CHUNK_SHIFT] = Chunk()
            lo = handle & _MASK
            n = min(CHUNK - lo, count - done)
            part = slice(done, done + n)
            chunk.pfn[lo : lo + n] = pfn[part]
            chunk.order[lo : lo + n] = order if isinstance(order, int) else order[part]
            chunk.kind[lo : lo + n] = KIND_CODE[kind]
            chunk.owner[lo : lo + n] = owner_id
            chunk.flags[lo : lo + n] = flags if isinstance(flags, int) else flags[part]
            if vaddr is not None:
                chunk.vaddr[lo : lo + n] = vaddr[part]
            chunk.nr_live += n
            done += n
        self.next_handle = first + count
        self.nr_live += count
        return first

    def append_one(
        self, pfn: int, order: int, kind: FolioKind, owner_id: int, *, vaddr: int, flags: int
    ) -> int:
        """Records one new folio; returns its handle (append() without arrays)."""
        handle = self.next_handle
        chunk = self.chunks.get(handle >> CHUNK_SHIFT)
        if chunk is None:
            chunk = self.chunks[handle >> CHUNK_SHIFT] = Chunk()
        lo = handle & _MASK
        chunk.rows[lo] = (pfn, vaddr, owner_id, order, KIND_CODE[kind], flags)
        chunk.nr_live += 1
        self.next_handle = handle + 1
        self.nr_live += 1
        return handle

    def record(self, handle: int) -> tuple[int, int, int, int, int, int]:
        """(pfn, vaddr, owner id, order, kind code, flags) of one live handle, as ints."""
        row = self.chunks[handle >> CHUNK_SHIFT].rows.item(handle & _MASK)
        return cast(tuple[int, int, int, int, int, int], row)

    def remove_one(self, handle: int) -> None:
        """Marks one live handle freed (remove() without arrays)."""
        index = handle >> CHUNK_SHIFT
        chunk = self.chunks[index]
        chunk.owner[handle & _MASK] = FREED
        chunk.nr_live -= 1
        if not chunk.nr_live and index != self.next_handle >> CHUNK_SHIFT:
            del self.chunks[index]
        self.nr_live -= 1

    def owner_id(self, handle: int) -> int:
        """The owner id of a handle; FREED when it is not live."""
        chunk = self.chunks.get(handle >> CHUNK_SHIFT) if handle > 0 else None
        return FREED if chunk is None else chunk.owner.item(handle & _MASK)

    def records(self, handles: Int64Array) -> Records:
        """The records of handles, which the caller checked are live: whole rows gathered
        per chunk (a slice where the handles of a chunk are consecutive)."""
        parts = []
        order: Int64Array | None = None
        for index, where in by_chunk(handles):
            rows = self.chunks[index].rows
            part = handles[where]
            lo = int(part[0]) & _MASK
            if (
                isinstance(where, slice)
                and int(part[-1]) - int(part[0]) == len(part) - 1
                and (len(part) == 1 or bool((np.diff(part) == 1).all()))
            ):
                parts.append(rows[lo : lo + len(part)])
            else:
                parts.append(rows[part & _MASK])
            if not isinstance(where, slice):
                order = where if order is None else np.concatenate((order, where))
        if not parts:
            table = np.zeros(0, RECORD)
        else:
            table = parts[0].copy() if len(parts) == 1 else np.concatenate(parts)
        if order is not None:
            # Chunks came out grouped: put the rows back in the order asked for.
            unsorted = np.empty(len(handles), RECORD)
            unsorted[order] = table
            table = unsorted
        return Records(
            handles,
            table["pfn"],
            table["vaddr"],
            table["owner"],
            table["order"],
            table["kind"],
            table["flags"],
        )

    def owner_ids(self, handles: Int64Array) -> npt.NDArray[np.int32]:
        """Owner id per handle, FREED for handles not live (or out of range)."""
        out = np.zeros(len(handles), np.int32)
        for index, where in by_chunk(handles):
            chunk = self.chunks.get(index) if index >= 0 else None
            if chunk is not None:
                out[where] = chunk.owner[handles[where] & _MASK]
        return out

    def remove(self, handles: Int64Array) -> None:
        """Marks live handles freed; drops chunks left with none."""
        for index, where in by_chunk(handles):
            chunk = self.chunks[index]
            part = handles[where]
            chunk.owner[part & _MASK] = FREED
            chunk.nr_live -= len(part)
            if not chunk.nr_live and index != self.next_handle >> CHUNK_SHIFT:
                del self.chunks[index]
        self.nr_live -= len(handles)

    def handles_of(self, owner_id: int, chunks: Iterator[int] | None = None) -> Int64Array:
        """Live handles of an owner, ascending (looking only in the chunks given, if any)."""
        found = []
        indices = sorted(self.chunks) if chunks is None else sorted(chunks)
        for index in indices:
            chunk = self.chunks.get(index)
            if chunk is None:
                continue
            base = index << CHUNK_SHIFT
            # A full chunk often belongs to one owner: check it in one comparison.
            if (
                chunk.nr_live == CHUNK
                and chunk.owner[0] == owner_id == chunk.owner[-1]
                and (chunk.owner == owner_id).all()
            ):
                found.append(np.arange(base, base + CHUNK, dtype=np.int64))
                continue
            found.append(np.flatnonzero(chunk.owner == owner_id) + base)
        return np.concatenate(found).astype(np.int64) if found else np.empty(0, np.int64)

    def live_handles(self) -> Int64Array:
        found = [
            np.flatnonzero(self.chunks[index].owner != FREED) + (index << CHUNK_SHIFT)
            for index in sorted(self.chunks)
        ]
        return np.concatenate(found).astype(np.int64) if found else np.empty(0, np.int64)
