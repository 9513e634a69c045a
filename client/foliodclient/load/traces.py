"""Trace files for replay: page-key text, CSV block traces and libCacheSim's oracleGeneral.

Every format is read whole into one Trace (three flat arrays: write flag, byte address, size)
before the run starts, so a malformed line fails the run before it touches the server. The
trace's byte addresses are then laid over foliod files of ``file_size_bytes`` each: address A is
offset ``A % file_size_bytes`` of file ``<prefix>/f<A // file_size_bytes>``; a request that
crosses a file's end, or is larger than one read or write may be, is split.

- text: one page key (a non-negative integer) a line; key K is the 4 KiB page at byte
  ``K * 4096``. Blank lines and lines starting with ``#`` are skipped. Every request is a read.
- csv: ``op,sector,size``: op is R/W (or read/write, any case), sector the start in 512-byte
  sectors, size in bytes. A first row naming a start column is a header, which places the
  columns instead, in any order and with extra columns ignored: ``op`` (or ``type``,
  ``rw``), the start as ``offset`` (bytes) or ``sector``/``block``/``lba`` (512-byte
  sectors), and ``size`` (or ``bytes``, ``length``).
- oracle (oracleGeneral): little-endian 24-byte records ``<uint32 timestamp, uint64 obj_id,
  uint32 obj_size, int64 next_access_vtime>``. Each object is placed once, at its first
  request, after the previous new object (rounded up to 4 KiB pages; a size of 0 counts as one
  page), so distinct objects never share a page; every request reads the whole object.
"""

from __future__ import annotations

import csv
import struct
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

PAGE_SIZE = 4096
SECTOR_SIZE = 512
ORACLE_RECORD = struct.Struct("<IQIq")
FORMATS = ("text", "csv", "oracle")

_SUFFIXES = {
    ".txt": "text",
    ".keys": "text",
    ".csv": "csv",
    ".oraclegeneral": "oracle",
    ".bin": "oracle",
}
_OPS = {"r": False, "read": False, "w": True, "write": True}
_OP_COLUMNS = ("op", "type", "rw")
_SIZE_COLUMNS = ("size", "bytes", "length")
_START_COLUMNS = {"offset": 1, "sector": SECTOR_SIZE, "block": SECTOR_SIZE, "lba": SECTOR_SIZE}


class TraceError(ValueError):
    """A trace file cannot be read: where (path and line or byte) and why."""


@dataclass(slots=True)
class Trace:
    """Requests in order: write flag, byte address and size in bytes, in parallel arrays."""

    path: str
    format: str
    writes: array[int] = field(default_factory=lambda: array("B"))
    addresses: array[int] = field(default_factory=lambda: array("Q"))
    sizes: array[int] = field(default_factory=lambda: array("Q"))

    def append(self, write: bool, address: int, size: int) -> None:
        self.writes.append(write)
        self.addresses.append(address)
        self.sizes.append(size)

    def __len__(self) -> int:
        return len(self.addresses)

    @property
    def end_bytes(self) -> int:
        """One past the highest byte any request touches."""
        return max((a + s for a, s in zip(self.addresses, self.sizes, strict=True)), default=0)


def detect_format(path: Path) -> str:
    """The format a file's suffix names; TraceError when it names none."""
    fmt = _SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise TraceError(
            f"{path}: cannot tell the trace format from the suffix {path.suffix!r}; "
            f"give --trace-format ({', '.join(FORMATS)})"
        )
    return fmt


def load_trace(path: Path, fmt: str | None = None, *, limit: int | None = None) -> Trace:
    """Reads a whole trace (at most `limit` requests); TraceError names the first bad line."""
    fmt = fmt or detect_format(path)
    readers = {"text": _read_text, "csv": _read_csv, "oracle": _read_oracle}
    if fmt not in readers:
        raise TraceError(f"unknown trace format {fmt!r} ({', '.join(FORMATS)})")
    trace = Trace(str(path), fmt)
    try:
        readers[fmt](path, trace, limit)
    except OSError as exc:
        raise TraceError(f"{path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise TraceError(f"{path}: not a text file ({exc.reason}); is it a binary trace?") from exc
    if not len(trace):
        raise TraceError(f"{path}: the trace has no requests")
    return trace


def _full(trace: Trace, limit: int | None) -> bool:
    return limit is not None and len(trace) >= limit


def _read_text(path: Path, trace: Trace, limit: int | None) -> None:
    with path.open(encoding="utf-8") as lines:
        for lineno, line in enumerate(lines, 1):
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            if _full(trace, limit):
                return
            try:
                key = int(text)
            except ValueError:
                key = -1
            if key < 0:
                raise TraceError(
                    f"{path}:{lineno}: not a page key (a non-negative integer): {text!r}"
                )
            trace.append(False, key * PAGE_SIZE, PAGE_SIZE)


def _csv_columns(header: list[str], path: Path) -> tuple[int, int, int, int]:
    """Positions of op, start and size in a header row, and the start's unit in bytes."""
    names = [name.strip().lower() for name in header]

    def find(choices: tuple[str, ...], what: str) -> int:
        for i, name in enumerate(names):
            if name in choices:
                return i
        raise TraceError(f"{path}:1: the header has no {what} column ({'/'.join(choices)})")

    start = find(tuple(_START_COLUMNS), "start")
    return find(_OP_COLUMNS, "op"), start, find(_SIZE_COLUMNS, "size"), _START_COLUMNS[names[start]]


def _read_csv(path: Path, trace: Trace, limit: int | None) -> None:
    with path.open(encoding="utf-8", newline="") as stream:
        rows = csv.reader(stream)
        columns = (0, 1, 2, SECTOR_SIZE)
        for row in rows:
            lineno = rows.line_num
            if not row or not "".join(row).strip() or row[0].lstrip().startswith("#"):
                continue
            if lineno == 1 and any(cell.strip().lower() in _START_COLUMNS for cell in row):
                columns = _csv_columns(row, path)
                continue
            if _full(trace, limit):
                return
            op_at, start_at, size_at, unit = columns
            if len(row) <= max(op_at, start_at, size_at):
                raise TraceError(f"{path}:{lineno}: expected op,sector,size, got {','.join(row)!r}")
            write = _OPS.get(row[op_at].strip().lower())
            if write is None:
                raise TraceError(f"{path}:{lineno}: op must be R or W, not {row[op_at]!r}")
            try:
                start, size = int(row[start_at]), int(row[size_at])
            except ValueError:
                start = size = -1
            if start < 0 or size <= 0:
                raise TraceError(
                    f"{path}:{lineno}: start and size must be integers (start >= 0, size > 0): "
                    f"{','.join(row)!r}"
                )
            trace.append(write, start * unit, size)


def _read_oracle(path: Path, trace: Trace, limit: int | None) -> None:
    placed: dict[int, int] = {}
    next_address = 0
    with path.open("rb") as stream:
        offset = 0
        while not _full(trace, limit):
            record = stream.read(ORACLE_RECORD.size)
            if not record:
                return
            if len(record) < ORACLE_RECORD.size:
                raise TraceError(
                    f"{path}: truncated record at byte {offset}: {len(record)} of "
                    f"{ORACLE_RECORD.size} bytes (is it oracleGeneral, uncompressed?)"
                )
            _, obj_id, obj_size, _ = ORACLE_RECORD.unpack(record)
            size = max(obj_size, 1)
            address = placed.get(obj_id)
            if address is None:
                address = placed[obj_id] = next_address
                next_address += -(-size // PAGE_SIZE) * PAGE_SIZE
            trace.append(False, address, size)
            offset += ORACLE_RECORD.size


def split(address: int, size: int, file_size: int, max_io: int) -> Iterator[tuple[int, int, int]]:
    """(file index, offset, length) pieces of a request: none crosses a file's end or is
    longer than max_io."""
    end = address + size
    while address < end:
        index, offset = divmod(address, file_size)
        length = min(end - address, file_size - offset, max_io)
        yield index, offset, length
        address += length


def write_oracle(path: Path, requests: list[tuple[int, int, int, int]]) -> None:
    """Writes (timestamp, obj_id, obj_size, next_access_vtime) records as oracleGeneral."""
    with path.open("wb") as stream:
        for request in requests:
            stream.write(ORACLE_RECORD.pack(*request))
