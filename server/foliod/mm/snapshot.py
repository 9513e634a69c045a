"""Machine snapshots: a physical layout saved to a file and booted again (what tools/mm/page-types
and /proc/buddyinfo show of a kernel's memory, kept so a simulated machine can start from it).

A snapshot tiles frames [0, nr_frames) with runs: a run is `count` consecutive units of
2^`order` frames of one `kind`, each unit naturally aligned. A unit is a free buddy block (kind
free), a folio (anon, file, slab, pagetable, hugetlb, balloon) or, for the kinds the simulator
has no folios of (zero, other, reserved, hole), 2^order frames set aside ("withheld": neither
free nor in a folio). `free_pos` gives each free block, in pfn order, its place in its order's
free list counted from the head (the block allocated first); empty means lowest pfn first.

File format (FORMAT_VERSION 1): a zip of numpy arrays (np.savez_compressed):
- header: UTF-8 JSON as uint8: magic, format_version, source ("simulated" or "kpageflags"),
  machine, hostname, kernel, created_at, page_size_bytes, nr_frames, kinds (the code table),
  nr_runs, nr_free_blocks, nr_free_pages, folios ("kind:order" -> count), frames (kind ->
  frames), notes (free-form: the host's buddyinfo, inconsistencies seen by the scan).
- run_kind uint8, run_order uint8, run_count uint32, run_flags uint8 (FLAG_HVO), one per run;
- free_pos uint32, one per free block or none.
Reading checks every member's size before decompressing it (MAX_MEMBER_BYTES), the header, the
arrays' dtypes and lengths, the tiling, alignment, orders, unmerged buddies and the header's
counts against the arrays: a truncated, corrupt or foreign file is InvalidArgument naming what
is wrong. Booting one larger than the target machine is OutOfMemory. Nothing is created
before the whole file has been checked.

Two sources: snapshot_machine walks a simulated machine (free lists, owned folios, page tables,
page cache, balloon, withheld runs); snapshot_kpageflags reads /proc/kpageflags of this host in
chunks (the classification of foliod.mm.kpageflags; free runs are cut into the largest aligned
blocks, as the buddy allocator's merging leaves them: kpageflags does not tell a free block's
order). boot() lays a snapshot into a fresh machine: the same free lists (in list order), and
the same folios at the same frames, held by owners named imported:<kind>.
"""

from __future__ import annotations

import io
import json
import platform
import socket
import time
import zipfile
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import numpy.typing as npt

from foliod.mm.errors import InvalidArgument, OutOfMemory
from foliod.mm.folio_table import HVO, KINDS
from foliod.mm.kpageflags import (
    CHUNK_FRAMES,
    KPAGEFLAGS,
    KPF_BUDDY,
    KPF_COMPOUND_TAIL,
    KPF_NOPAGE,
    KPF_RESERVED,
    SECTION_FRAMES,
    check_readable,
    hugetlb_vmemmap_optimized,
    kinds_of,
    read_buddyinfo,
    read_chunks,
    read_ram_ranges,
)
from foliod.mm.kpageflags import (
    KINDS as KPF_KINDS,
)
from foliod.mm.machine import Machine, Owner
from foliod.mm.mm_types import FolioKind
from foliod.mm.page_alloc import MAX_PAGE_ORDER, PAGE_SIZE, PUD_ORDER, aligned_blocks

MAGIC = "foliod-snapshot"
FORMAT_VERSION = 1
# Run kinds by their code in the file. Never reorder: the codes are the format.
RUN_KINDS = (
    "free",
    "anon",
    "file",
    "slab",
    "pagetable",
    "hugetlb",
    "balloon",
    "zero",
    "other",
    "reserved",
    "hole",
)
CODE = {name: code for code, name in enumerate(RUN_KINDS)}
FREE = CODE["free"]
# Run kinds that are folios of the simulator, and the kinds it withholds frames for.
FOLIO_KINDS: dict[int, FolioKind] = {CODE[str(kind)]: kind for kind in FolioKind}
WITHHELD = tuple(CODE[name] for name in ("zero", "other", "reserved", "hole"))
HOLE = CODE["hole"]
FLAG_HVO = 1
OWNER_PREFIX = "imported:"
# Limits of what a file may hold: its compressed size, and each member decompressed.
MAX_SNAPSHOT_BYTES = 256 << 20
MAX_RUNS = 1 << 26
MAX_MEMBER_BYTES = MAX_RUNS * 4 + 4096
MAX_HEADER_BYTES = 1 << 20
MAX_RUN_COUNT = (1 << 32) - 1
_MEMBERS = {
    "header": np.uint8,
    "run_kind": np.uint8,
    "run_order": np.uint8,
    "run_count": np.uint32,
    "run_flags": np.uint8,
    "free_pos": np.uint32,
}

Int64Array = npt.NDArray[np.int64]


@dataclass
class Snapshot:
    """A machine's layout: runs that tile its frames, the free lists' order, and what it is of."""

    nr_frames: int
    kind: npt.NDArray[np.uint8]
    order: npt.NDArray[np.uint8]
    count: Int64Array
    flags: npt.NDArray[np.uint8]
    # Per free block in pfn order: its place in its free list from the head; empty: pfn order.
    free_pos: npt.NDArray[np.uint32]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def frames(self) -> Int64Array:
        """Frames per run."""
        return self.count << self.order.astype(np.int64)

    @property
    def starts(self) -> Int64Array:
        """First pfn of each run."""
        frames = self.frames
        return np.cumsum(frames) - frames

    def folio_histogram(self) -> dict[str, int]:
        """Folios (and free blocks, withheld units) per "kind:order"."""
        out: dict[str, int] = {}
        for k, o, c in zip(
            self.kind.tolist(), self.order.tolist(), self.count.tolist(), strict=True
        ):
            if k != FREE and k not in WITHHELD:
                key = f"{RUN_KINDS[k]}:{o}"
                out[key] = out.get(key, 0) + c
        return dict(sorted(out.items()))

    def frames_by_kind(self) -> dict[str, int]:
        totals = np.bincount(self.kind, weights=self.frames, minlength=len(RUN_KINDS))
        return {name: int(totals[i]) for i, name in enumerate(RUN_KINDS)}

    @property
    def nr_free_pages(self) -> int:
        return int(self.frames[self.kind == FREE].sum())

    @property
    def nr_free_blocks(self) -> int:
        return int(self.count[self.kind == FREE].sum())

    def units(self, codes: Iterable[int]) -> tuple[Int64Array, Int64Array, Int64Array]:
        """(pfn, run index, order) of every unit of the runs of the given kinds, pfn order."""
        sel = np.flatnonzero(np.isin(self.kind, list(codes)))
        counts = self.count[sel]
        total = int(counts.sum())
        run = np.repeat(sel, counts)
        first = np.cumsum(counts) - counts
        within = np.arange(total, dtype=np.int64) - np.repeat(first, counts)
        order = self.order[run].astype(np.int64)
        return self.starts[run] + (within << order), run, order

    # -- the file ----------------------------------------------------------------------------

    def header(self) -> dict[str, Any]:
        return {
            "magic": MAGIC,
            "format_version": FORMAT_VERSION,
            **self.meta,
            "page_size_bytes": PAGE_SIZE,
            "nr_frames": self.nr_frames,
            "kinds": list(RUN_KINDS),
            "nr_runs": len(self.kind),
            "nr_free_blocks": self.nr_free_blocks,
            "nr_free_pages": self.nr_free_pages,
            "folios": self.folio_histogram(),
            "frames": self.frames_by_kind(),
        }

    def encode(self) -> bytes:
        """The snapshot file's bytes."""
        header = json.dumps(self.header(), sort_keys=True).encode()
        buffer = io.BytesIO()
        np.savez_compressed(
            buffer,
            header=np.frombuffer(header, np.uint8),
            run_kind=self.kind.astype(np.uint8),
            run_order=self.order.astype(np.uint8),
            run_count=self.count.astype(np.uint32),
            run_flags=self.flags.astype(np.uint8),
            free_pos=self.free_pos.astype(np.uint32),
        )
        return buffer.getvalue()


def _bad(what: str) -> InvalidArgument:
    return InvalidArgument(f"not a valid foliod snapshot: {what}", field="snapshot")


def decode(data: bytes | bytearray | IO[bytes]) -> Snapshot:
    """Reads and checks a snapshot file; InvalidArgument (field "snapshot") naming what is
    wrong with a truncated, corrupt or foreign one."""
    source: IO[bytes] = io.BytesIO(data) if isinstance(data, bytes | bytearray) else data
    try:
        with zipfile.ZipFile(source) as archive:
            arrays = _read_members(archive)
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError) as exc:
        raise _bad(f"{exc} (truncated or corrupt?)") from None
    try:
        header = json.loads(arrays.pop("header").tobytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _bad(f"its header is not JSON ({exc})") from None
    if not isinstance(header, dict) or header.get("magic") != MAGIC:
        raise _bad(f"its header has no magic {MAGIC!r}")
    return _check(header, arrays)


def _read_members(archive: zipfile.ZipFile) -> dict[str, npt.NDArray[Any]]:
    infos = {info.filename: info for info in archive.infolist()}
    arrays: dict[str, npt.NDArray[Any]] = {}
    for name, dtype in _MEMBERS.items():
        info = infos.get(f"{name}.npy")
        if info is None:
            raise ValueError(f"member {name}.npy is missing: not a foliod snapshot")
        limit = MAX_HEADER_BYTES if name == "header" else MAX_MEMBER_BYTES
        if info.file_size > limit:
            raise ValueError(f"member {name}.npy holds {info.file_size} bytes, over {limit}")
        with archive.open(info) as member:
            array = np.lib.format.read_array(member, allow_pickle=False)
        if array.dtype != np.dtype(dtype) or array.ndim != 1:
            raise ValueError(f"member {name}.npy is {array.dtype} of {array.ndim} dimensions")
        arrays[name] = array
    return arrays


def _check(header: dict[str, Any], arrays: dict[str, npt.NDArray[Any]]) -> Snapshot:
    version = header.get("format_version")
    if version != FORMAT_VERSION:
        raise _bad(f"format version {version!r}; this foliod reads version {FORMAT_VERSION}")
    if header.get("page_size_bytes") != PAGE_SIZE:
        raise _bad(f"page size {header.get('page_size_bytes')!r}, foliod simulates {PAGE_SIZE}")
    if header.get("kinds") != list(RUN_KINDS):
        raise _bad(f"kind table {header.get('kinds')!r} differs from {list(RUN_KINDS)}")
    nr_frames = header.get("nr_frames")
    if not isinstance(nr_frames, int) or not 0 < nr_frames <= 1 << 32:
        raise _bad(f"nr_frames {nr_frames!r} is not 1..2^32")
    kind, order = arrays["run_kind"], arrays["run_order"]
    count, flags = arrays["run_count"].astype(np.int64), arrays["run_flags"]
    n = len(kind)
    if header.get("nr_runs") != n or not len(order) == len(count) == len(flags) == n:
        raise _bad(
            f"run columns of {n}, {len(order)}, {len(count)}, {len(flags)} entries; "
            f"the header says {header.get('nr_runs')!r}"
        )
    if n > MAX_RUNS:
        raise _bad(f"{n} runs, over {MAX_RUNS}")
    if n and int(kind.max()) >= len(RUN_KINDS):
        raise _bad(f"run {int(np.argmax(kind >= len(RUN_KINDS)))} has an unknown kind")
    max_order = np.where(kind == FREE, MAX_PAGE_ORDER, PUD_ORDER)
    if (order > max_order).any():
        i = int(np.argmax(order > max_order))
        raise _bad(f"run {i}: order {int(order[i])} is too large for {RUN_KINDS[kind[i]]}")
    if (count < 1).any():
        raise _bad(f"run {int(np.argmax(count < 1))} is empty")
    bad_flags = (flags & ~np.uint8(FLAG_HVO)) | np.where(
        kind == CODE["hugetlb"], 0, flags & FLAG_HVO
    ).astype(np.uint8)
    if bad_flags.any():
        raise _bad(f"run {int(np.argmax(bad_flags != 0))} has flags it cannot have")
    snapshot = Snapshot(nr_frames, kind, order, count, flags, arrays["free_pos"], _meta_of(header))
    frames, starts = snapshot.frames, snapshot.starts
    covered = int(frames.sum())
    if covered != nr_frames:
        raise _bad(f"its runs cover {covered} frames, the header says {nr_frames}")
    misaligned = np.flatnonzero(starts & ((np.int64(1) << order.astype(np.int64)) - 1))
    if len(misaligned):
        i = int(misaligned[0])
        raise _bad(f"run {i} (order {int(order[i])}) starts at pfn {int(starts[i])}, unaligned")
    _check_free(snapshot)
    for name, value in (
        ("nr_free_blocks", snapshot.nr_free_blocks),
        ("nr_free_pages", snapshot.nr_free_pages),
        ("folios", snapshot.folio_histogram()),
    ):
        if header.get(name) != value:
            raise _bad(f"the header's {name} disagrees with its runs")
    return snapshot


def _check_free(snapshot: Snapshot) -> None:
    """Free blocks unmerged with their buddies; free_pos a permutation within each order."""
    pfn, _, order = snapshot.units([FREE])
    for o in range(MAX_PAGE_ORDER):
        mine = pfn[order == o]
        if len(mine) and np.isin(mine ^ (1 << o), mine).any():
            raise _bad(f"free order-{o} blocks lie next to their free buddies (unmerged)")
    pos: npt.NDArray[Any] = snapshot.free_pos
    if not len(pos):
        return
    if len(pos) != len(pfn):
        raise _bad(f"free_pos has {len(pos)} entries for {len(pfn)} free blocks")
    for o in range(MAX_PAGE_ORDER + 1):
        mine = np.sort(pos[order == o])
        if not np.array_equal(mine, np.arange(len(mine))):
            raise _bad(f"free_pos of the order-{o} blocks is not a permutation")


def _meta_of(header: dict[str, Any]) -> dict[str, Any]:
    keys = ("source", "machine", "hostname", "kernel", "created_at", "notes")
    return {k: header[k] for k in keys if k in header}


def read_file(path: Path) -> Snapshot:
    """decode() of a file, refused unread above MAX_SNAPSHOT_BYTES."""
    size = path.stat().st_size
    if size > MAX_SNAPSHOT_BYTES:
        raise _bad(f"{path} holds {size} bytes, over {MAX_SNAPSHOT_BYTES}")
    with open(path, "rb") as handle:
        return decode(handle)


# -- from a simulated machine --------------------------------------------------------------


def _rle(
    kind: npt.NDArray[Any], order: npt.NDArray[Any], count: Int64Array, flags: npt.NDArray[Any]
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8], Int64Array, npt.NDArray[np.uint8]]:
    """Merges neighbouring runs of the same kind, order and flags (at most MAX_RUN_COUNT each)."""
    kind, order, flags = kind.astype(np.uint8), order.astype(np.uint8), flags.astype(np.uint8)
    if not len(kind):
        return kind, order, count.astype(np.int64), flags
    key = (kind.astype(np.int64) << 16) | (order.astype(np.int64) << 8) | flags
    first = np.flatnonzero(np.concatenate(([True], key[1:] != key[:-1])))
    counts = np.add.reduceat(count.astype(np.int64), first)
    kind, order, flags = kind[first], order[first], flags[first]
    big = np.flatnonzero(counts > MAX_RUN_COUNT)
    if len(big):
        pieces = -(-counts // MAX_RUN_COUNT)
        kind, order, flags = (np.repeat(a, pieces) for a in (kind, order, flags))
        out = np.repeat(counts, pieces)
        first_piece = np.cumsum(pieces) - pieces
        k = np.arange(len(out)) - np.repeat(first_piece, pieces)
        counts = np.minimum(out - k * MAX_RUN_COUNT, MAX_RUN_COUNT)
    return kind, order, counts, flags


def snapshot_machine(machine: Machine) -> Snapshot:
    """The layout of a simulated machine (the caller holds its lock). Every frame must be free
    or in exactly one folio or withheld run (check_machine's invariant); AssertionError if not."""
    pfns: list[Int64Array] = []
    kinds: list[npt.NDArray[Any]] = []
    orders: list[npt.NDArray[Any]] = []
    counts: list[Int64Array] = []
    flag_cols: list[npt.NDArray[Any]] = []

    def add(pfn: Int64Array, kind: int | npt.NDArray[Any], order: int | npt.NDArray[Any],
            count: int | Int64Array = 1, flags: int | npt.NDArray[Any] = 0) -> None:  # fmt: skip
        n = len(pfn)
        pfns.append(pfn.astype(np.int64))
        kinds.append(np.broadcast_to(np.uint8(kind) if isinstance(kind, int) else kind, n))
        orders.append(np.broadcast_to(np.uint8(order) if isinstance(order, int) else order, n))
        counts.append(np.broadcast_to(np.int64(count) if isinstance(count, int) else count, n))
        flag_cols.append(np.broadcast_to(np.uint8(flags) if isinstance(flags, int) else flags, n))

    # Free blocks, and each one's place in its list counted from the head (popped first).
    free_pfn, free_order, free_pos = [], [], []
    for o, area in enumerate(machine.zone.free_area):
        listed = np.fromiter(area, np.int64, len(area))
        free_pfn.append(listed)
        free_order.append(np.full(len(listed), o, np.uint8))
        free_pos.append(np.arange(len(listed) - 1, -1, -1, dtype=np.int64))
    fp = np.concatenate(free_pfn)
    add(fp, FREE, np.concatenate(free_order))
    # Owned folios (Allocate's, guests' host backing).
    recs = machine.table.records(machine.table.live_handles())
    run_kind = np.array([CODE[str(k)] for k in KINDS], np.uint8)[recs.kind]
    add(recs.pfn, run_kind, recs.order, 1, np.where((recs.flags & HVO) != 0, FLAG_HVO, 0))
    # Page tables, the page cache, the balloon.
    tables = [
        t.folio.pfn
        for owner in machine.owners.values()
        if owner.mm is not None
        for level in owner.mm.tables
        for t in level.values()
    ]
    tables += [
        f.pfn for o in machine.owners.values() if o.mm is not None for f in o.mm.deposited.values()
    ]
    add(np.array(tables, np.int64), CODE["pagetable"], 0)
    if machine.page_cache is not None:
        store = machine.page_cache.folio_store
        ids = np.fromiter(machine.lru.folios(), np.int64)
        add(
            np.frombuffer(store.pfn, np.uint32)[ids].astype(np.int64),
            CODE["file"],
            np.frombuffer(store.order, np.int8)[ids],
        )
    add(machine.balloon, CODE["balloon"], 0)
    w = machine.withheld
    add(w[:, 0], w[:, 1], w[:, 2], w[:, 3])
    pfn = np.concatenate(pfns)
    by_pfn = np.argsort(pfn, kind="stable")
    pfn = pfn[by_pfn]
    kind, order, count, flags = (
        np.concatenate(c)[by_pfn] for c in (kinds, orders, counts, flag_cols)
    )
    frames = count.astype(np.int64) << order.astype(np.int64)
    expected = np.cumsum(frames) - frames
    if not np.array_equal(pfn, expected) or int(frames.sum()) != machine.nr_pages:
        at = int(np.argmax(pfn != expected)) if len(pfn) else 0
        raise AssertionError(
            f"machine {machine.name!r}: frames are not tiled by free blocks and folios "
            f"(first gap or overlap near pfn {int(expected[at]) if len(pfn) else 0})"
        )
    positions = np.concatenate(free_pos)[np.argsort(fp, kind="stable")]
    snapshot = Snapshot(
        machine.nr_pages,
        *_rle(kind, order, count, flags),
        free_pos=positions.astype(np.uint32),
        meta={
            "source": "simulated",
            "machine": machine.name,
            "hostname": socket.gethostname(),
            "kernel": "",
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
    )
    return snapshot


# -- from this host's /proc/kpageflags ---------------------------------------------------------

_KPF_TO_CODE = np.array([CODE[name] for name in KPF_KINDS], np.uint8)
_OTHER = CODE["other"]


class _LayoutBuilder:
    """Turns consecutive chunks of kpageflags into runs, carrying a folio across chunk ends.
    Chunks start at multiples of 2^MAX_PAGE_ORDER, so free runs may be cut at their ends."""

    def __init__(self, ram_ranges: Iterable[tuple[int, int]] | None, hvo: bool) -> None:
        self.ram = (
            None
            if ram_ranges is None
            else [
                (
                    f // SECTION_FRAMES * SECTION_FRAMES,
                    (last // SECTION_FRAMES + 1) * SECTION_FRAMES,
                )
                for f, last in sorted(ram_ranges)
            ]
        )
        self.hvo = hvo
        self.nr_frames = 0
        self.runs: list[tuple[npt.NDArray[Any], ...]] = []
        self.carry: tuple[int, int, int] | None = None  # head pfn, frames so far, kind code
        self.inconsistent = 0
        self.orphan_tails = 0

    def _pieces(self, pfn: int, frames: int, kind: int) -> list[tuple[int, int, int, int]]:
        """Units (pfn, kind, order, 1) of a folio of frames at pfn: itself when it is a power
        of two and aligned; else it changed while it was read, and its aligned pieces are
        kept, the first as its kind, the rest as other."""
        order = frames.bit_length() - 1
        if frames == 1 << order and not pfn & (frames - 1):
            return [(pfn, kind, order, 1)]
        self.inconsistent += 1
        return [
            (piece_pfn, kind if i == 0 else _OTHER, piece, 1)
            for i, (piece_pfn, piece) in enumerate(aligned_blocks(pfn, pfn + frames, PUD_ORDER))
        ]

    def feed(self, flags: npt.NDArray[np.uint64]) -> None:
        n = len(flags)
        base = self.nr_frames
        self.nr_frames += n
        if not n:
            return

        def bit(b: int) -> npt.NDArray[np.bool_]:
            mask: npt.NDArray[np.bool_] = (flags & np.uint64(1 << b)) != 0
            return mask

        hole = bit(KPF_NOPAGE)
        if self.ram is not None:
            ram = np.zeros(n, np.bool_)
            for first, end in self.ram:
                lo, hi = max(first - base, 0), min(end - base, n)
                if lo < hi:
                    ram[lo:hi] = True
            hole |= ~ram
        tail = bit(KPF_COMPOUND_TAIL) & ~hole
        reserved = bit(KPF_RESERVED) & ~hole & ~tail
        free = bit(KPF_BUDDY) & ~hole & ~tail & ~reserved
        head = ~(hole | tail | reserved | free)
        # Tails after anything but a head (or, leading the chunk, with no folio carried over)
        # are orphans: each becomes an order-0 "other" unit.
        index = np.arange(n, dtype=np.int64)
        last = np.maximum.accumulate(np.where(~tail, index, -1))
        orphan = tail & (last >= 0) & ~head[np.maximum(last, 0)]
        if self.carry is None:
            orphan |= tail & (last < 0)
        self.orphan_tails += int(np.count_nonzero(orphan))
        code = np.full(n, _OTHER, np.uint8)
        code[hole] = HOLE
        code[reserved] = CODE["reserved"]
        code[free] = FREE
        code[head] = _KPF_TO_CODE[kinds_of(flags[head])]
        tail &= ~orphan
        head |= orphan
        # A unit starts at every head; runs of hole, reserved and free frames start where the
        # class changes or a folio ends.
        in_folio = head | tail
        changed = np.concatenate(([True], (code[1:] != code[:-1]) | in_folio[:-1]))
        starts = np.flatnonzero(~tail & (head | changed))
        lead = int(starts[0]) if len(starts) else n
        extra: list[tuple[int, int, int, int]] = []
        if self.carry is not None:
            pfn, frames, kind = self.carry
            self.carry = None
            if lead == n:
                self.carry = (pfn, frames + n, kind)
                return
            extra += self._pieces(pfn, frames + lead, kind)
        ends = np.append(starts[1:], n)
        if len(starts) and head[starts[-1]]:
            # The last folio may go on in the next chunk.
            self.carry = (base + int(starts[-1]), n - int(starts[-1]), int(code[starts[-1]]))
            starts, ends = starts[:-1], ends[:-1]
        lengths = ends - starts
        codes = code[starts]
        pfns = base + starts
        heads = head[starts]
        # Folios: a power of two long and aligned, as they should be.
        h_pfn, h_len, h_code = pfns[heads], lengths[heads], codes[heads]
        h_order = np.floor(np.log2(np.maximum(h_len, 1))).astype(np.int64)
        ok = (h_len == (np.int64(1) << h_order)) & ((h_pfn & (h_len - 1)) == 0)
        for p, length, c in zip(
            h_pfn[~ok].tolist(), h_len[~ok].tolist(), h_code[~ok].tolist(), strict=True
        ):
            extra += self._pieces(p, length, c)
        # Free runs as the largest aligned blocks; other runs as frames.
        is_free = ~heads & (codes == FREE)
        for p, length in zip(pfns[is_free].tolist(), lengths[is_free].tolist(), strict=True):
            extra += [(b, FREE, o, 1) for b, o in aligned_blocks(p, p + length, MAX_PAGE_ORDER)]
        frames_run = ~heads & ~is_free
        more = np.array(extra, np.int64).reshape(-1, 4)
        unit_pfn = np.concatenate((h_pfn[ok], pfns[frames_run], more[:, 0]))
        unit_kind = np.concatenate((h_code[ok], codes[frames_run], more[:, 1]))
        unit_order = np.concatenate(
            (h_order[ok], np.zeros(int(frames_run.sum()), np.int64), more[:, 2])
        )
        unit_count = np.concatenate(
            (np.ones(int(ok.sum()), np.int64), lengths[frames_run], more[:, 3])
        )
        by_pfn = np.argsort(unit_pfn, kind="stable")
        self._add(unit_kind[by_pfn], unit_order[by_pfn], unit_count[by_pfn])

    def _add(self, kind: npt.NDArray[Any], order: npt.NDArray[Any], count: Int64Array) -> None:
        if len(kind):
            kind = kind.astype(np.uint8)
            flags = np.where((kind == CODE["hugetlb"]) & self.hvo, FLAG_HVO, 0)
            self.runs.append(_rle(kind, order, count, flags))

    def finish(self) -> tuple[npt.NDArray[Any], ...]:
        if self.carry is not None:
            pieces = np.array(self._pieces(*self.carry), np.int64)
            self.carry = None
            self._add(pieces[:, 1], pieces[:, 2], pieces[:, 3])
        if not self.runs:
            return _rle(*(np.empty(0, np.int64),) * 4)
        return _rle(*(np.concatenate([r[i] for r in self.runs]) for i in range(4)))


def snapshot_kpageflags(
    path: Path = KPAGEFLAGS,
    chunk_frames: int = CHUNK_FRAMES,
    *,
    ram_ranges: Iterable[tuple[int, int]] | None = None,
    hvo: bool = False,
    between_chunks: Callable[[], None] | None = None,
    meta: dict[str, Any] | None = None,
) -> Snapshot:
    """The layout of the host whose kpageflags path is, read chunk by chunk (8 bytes x
    chunk_frames of flags in memory at a time)."""
    if chunk_frames % (1 << MAX_PAGE_ORDER):
        raise ValueError("chunk_frames must be a multiple of 2^MAX_PAGE_ORDER")
    builder = _LayoutBuilder(ram_ranges, hvo)
    for chunk in read_chunks(path, chunk_frames, between_chunks):
        builder.feed(chunk)
    kind, order, count, flags = builder.finish()
    notes = {"inconsistent_folios": builder.inconsistent, "orphan_tails": builder.orphan_tails}
    return Snapshot(
        builder.nr_frames,
        kind,
        order,
        count,
        flags,
        np.empty(0, np.uint32),
        {
            "source": "kpageflags",
            **(meta or {}),
            "notes": {**notes, **(meta or {}).get("notes", {})},
        },
    )


def snapshot_host() -> Snapshot:
    """This host's layout from /proc/kpageflags; ObserveUnavailable if it cannot be read."""
    check_readable()
    hostname = socket.gethostname()
    meta = {
        "machine": f"real:{hostname}",
        "hostname": hostname,
        "kernel": platform.release(),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "notes": {"buddyinfo": read_buddyinfo()},
    }
    return snapshot_kpageflags(
        ram_ranges=read_ram_ranges(), hvo=hugetlb_vmemmap_optimized(), meta=meta
    )


# -- booting -----------------------------------------------------------------------------------


def check_fits(snapshot: Snapshot, nr_pages: int, name: str) -> None:
    """OutOfMemory unless the snapshot's frames fit in a machine of nr_pages."""
    if snapshot.nr_frames > nr_pages:
        raise OutOfMemory(
            f"the snapshot covers {snapshot.nr_frames} frames "
            f"({snapshot.nr_frames * PAGE_SIZE} bytes), machine {name!r} has {nr_pages}",
            field="ram_bytes",
            metadata={
                "order": "0",
                "snapshot_frames": str(snapshot.nr_frames),
                "nr_pages": str(nr_pages),
            },
        )


def boot(snapshot: Snapshot, machine: Machine) -> None:
    """Lays a checked snapshot into a machine that has allocated nothing yet: its free lists
    become the snapshot's (frames past the snapshot are freed after it, merging as the buddy
    allocator merges), each folio is recorded at its frames under owner imported:<kind>, and
    the frames of zero, other, reserved and hole runs are withheld."""
    check_fits(snapshot, machine.nr_pages, machine.name)
    zone = machine.zone
    assert zone.nr_free == machine.nr_pages and not machine.table.nr_live, "machine not fresh"
    pfn, run, order = snapshot.units([FREE])
    pos: npt.NDArray[Any] = snapshot.free_pos
    if not len(pos):
        pos = np.arange(len(pfn), dtype=np.int64)  # lowest pfn first within each order
    lists: list[list[int]] = []
    for o in range(MAX_PAGE_ORDER + 1):
        mine = order == o
        lists.append(pfn[mine][np.argsort(-pos[mine].astype(np.int64), kind="stable")].tolist())
    zone.load_free_lists(lists)
    for block, block_order in aligned_blocks(snapshot.nr_frames, machine.nr_pages, MAX_PAGE_ORDER):
        zone.free_one_page(block, block_order)
    for code, kind in FOLIO_KINDS.items():
        pfn, run, order = snapshot.units([code])
        if not len(pfn):
            continue
        flags = np.where((snapshot.flags[run] & FLAG_HVO) != 0, HVO, 0).astype(np.uint8)
        holder = Owner(OWNER_PREFIX + str(kind), machine.next_owner_id, machine.table)
        first = machine.table.append(pfn, order.astype(np.int8), kind, holder.id, flags=flags)
        holder.count_range(first, len(pfn))
        machine.next_owner_id += 1
        machine.owners[holder.name] = holder
        machine.owner_by_id[holder.id] = holder
        for o, n in zip(*np.unique(order, return_counts=True), strict=True):
            machine.account(kind, int(o), int(n))
        hvo = (flags & HVO) != 0
        for o, n in zip(*np.unique(order[hvo], return_counts=True), strict=True):
            machine.nr_hvo[int(o)] = machine.nr_hvo.get(int(o), 0) + int(n)
    held = np.flatnonzero(np.isin(snapshot.kind, WITHHELD))
    machine.withheld = np.stack(
        (
            snapshot.starts[held],
            snapshot.kind[held].astype(np.int64),
            snapshot.order[held].astype(np.int64),
            snapshot.count[held],
        ),
        axis=1,
    ).reshape(-1, 4)
    holes = snapshot.kind[held] == HOLE
    machine.nr_hole_pages = int(snapshot.frames[held][holes].sum())


def used_frames(snapshot: Snapshot) -> tuple[Int64Array, Int64Array]:
    """(first pfn, frames) of every run a guest's host must back: all but free and holes."""
    used = np.flatnonzero((snapshot.kind != FREE) & (snapshot.kind != HOLE))
    return snapshot.starts[used], snapshot.frames[used]


def main(argv: list[str] | None = None) -> int:
    """`python -m foliod.mm.snapshot FILE`: snapshots this host from /proc/kpageflags."""
    import argparse  # noqa: PLC0415
    import sys  # noqa: PLC0415

    from foliod.mm.kpageflags import ObserveUnavailable  # noqa: PLC0415

    parser = argparse.ArgumentParser(
        prog="python -m foliod.mm.snapshot",
        description="Saves this host's physical layout (from /proc/kpageflags) to FILE.",
    )
    parser.add_argument("file", type=Path)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    try:
        snapshot = snapshot_host()
    except ObserveUnavailable as exc:
        print(f"foliod snapshot: {exc}", file=sys.stderr)
        return 1
    data = snapshot.encode()
    args.file.write_bytes(data)
    header = snapshot.header()
    print(
        f"{args.file}: {len(data)} bytes, {snapshot.nr_frames} frames, {header['nr_runs']} runs, "
        f"{snapshot.nr_free_pages} free pages, {time.perf_counter() - started:.2f} s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
