"""Trace files for replay: page-key text, CSV block traces and libCacheSim's oracleGeneral.

Every format is read whole into one Trace (three flat arrays: write flag, byte address, size)
before the run starts, so a malformed line fails the run before it touches the server. The
trace's byte addresses are then laid over foliod files of ``file_size_bytes`` each: address A is
offset ``A % file_size_bytes`` of file ``<prefix>/f<A // file_size_bytes>``; a request that
crosses a file's end, or is larger than one read or write may be, is split.

- text: one page key (a non-negative integer) a line; key K is the 4 KiB page at byte
  ``K * 4096``. Blank lines and lines starting with ``#`` are skipped. Every request is a read.
- csv: ``op,sector,size``: op is R/W (or read/write, any case, or a SCSI opcode in hex:
  08/28/88/a8 READ(6/10/16/12), 0a/2a/8a/aa WRITE(6/10/16/12), with or without ``0x``),
  sector the start in 512-byte sectors, size in bytes. A first row naming a start column is
  a header, which places the columns instead, in any order and with extra columns (such as
  ``version``, ``time``, ``timestamp``) ignored: ``op`` (or ``type``, ``rw``), the start as
  ``offset`` (bytes) or ``sector``/``block``/``lba``/``lbn`` (512-byte sectors), and ``size``
  (or ``bytes``, ``length``). libCacheSim's cloudPhysicsIO.csv (``version,time,op,size,lbn``,
  SCSI opcodes) reads as it ships.
- oracle (oracleGeneral): little-endian 24-byte records ``<uint32 timestamp, uint64 obj_id,
  uint32 obj_size, int64 next_access_vtime>``. Each object is placed once, at its first
  request, after the previous new object (rounded up to 4 KiB pages; a size of 0 counts as one
  page), so distinct objects never share a page; every request reads the whole object.

A ``.gz`` file is read through gzip, its format told by the suffix before ``.gz``
(``trace.csv.gz``). ``.zst`` needs the ``zstandard`` package (libCacheSim's
``.oracleGeneral.zst``); without it the error says so.
"""

from __future__ import annotations

import csv
import gzip
import importlib
import io
import struct
import typing
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from foliod.api import PAGE_SIZE

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
# SCSI opcodes: READ(6), READ(10), READ(12), READ(16) and the WRITEs of the same sizes.
_SCSI_READS = (0x08, 0x28, 0xA8, 0x88)
_SCSI_WRITES = (0x0A, 0x2A, 0xAA, 0x8A)
for _code, _write in [(c, False) for c in _SCSI_READS] + [(c, True) for c in _SCSI_WRITES]:
    _OPS[f"{_code:x}"] = _OPS[f"{_code:02x}"] = _OPS[f"0x{_code:02x}"] = _write
_COMPRESSED = (".gz", ".zst")
_OP_COLUMNS = ("op", "type", "rw")
_SIZE_COLUMNS = ("size", "bytes", "length")
_START_COLUMNS = {
    "offset": 1,
    "sector": SECTOR_SIZE,
    "block": SECTOR_SIZE,
    "lba": SECTOR_SIZE,
    "lbn": SECTOR_SIZE,
}


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
    """The format a file's suffix names (the one before .gz or .zst); TraceError when it
    names none."""
    suffix = path.suffix.lower()
    if suffix in _COMPRESSED:
        suffix = path.with_suffix("").suffix.lower()
    fmt = _SUFFIXES.get(suffix)
    if fmt is None:
        raise TraceError(
            f"{path}: cannot tell the trace format from the suffix {suffix!r}; "
            f"give --trace-format ({', '.join(FORMATS)})"
        )
    return fmt


def _open_binary(path: Path) -> IO[bytes]:
    """The file's bytes, decompressed when it ends in .gz or .zst."""
    suffix = path.suffix.lower()
    if suffix == ".gz":
        return typing.cast(IO[bytes], gzip.open(path, "rb"))
    if suffix == ".zst":
        try:
            zstandard = importlib.import_module("zstandard")
        except ImportError as exc:
            raise TraceError(
                f"{path}: reading .zst needs the zstandard package (pip install zstandard), "
                "or decompress it first (zstd -d)"
            ) from exc
        stream: IO[bytes] = zstandard.ZstdDecompressor().stream_reader(path.open("rb"))
        return stream
    return path.open("rb")


def _open_text(path: Path, newline: str | None = None) -> IO[str]:
    return io.TextIOWrapper(_open_binary(path), encoding="utf-8", newline=newline)


def load_trace(path: Path, fmt: str | None = None, *, limit: int | None = None) -> Trace:
    """Reads a whole trace (at most `limit` requests); TraceError names the first bad line."""
    fmt = fmt or detect_format(path)
    readers = {"text": _read_text, "csv": _read_csv, "oracle": _read_oracle}
    if fmt not in readers:
        raise TraceError(f"unknown trace format {fmt!r} ({', '.join(FORMATS)})")
    trace = Trace(str(path), fmt)
    try:
        readers[fmt](path, trace, limit)
    except (OSError, EOFError) as exc:
        what = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise TraceError(f"{path}: {what}") from exc
    except UnicodeDecodeError as exc:
        raise TraceError(f"{path}: not a text file ({exc.reason}); is it a binary trace?") from exc
    if not len(trace):
        raise TraceError(f"{path}: the trace has no requests")
    return trace


def _full(trace: Trace, limit: int | None) -> bool:
    return limit is not None and len(trace) >= limit


def _read_text(path: Path, trace: Trace, limit: int | None) -> None:
    with _open_text(path) as lines:
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
    with _open_text(path, newline="") as stream:
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
                raise TraceError(
                    f"{path}:{lineno}: column {op_at + 1} (op) must be R or W (or a SCSI "
                    f"READ/WRITE opcode such as 28 or 2a), not {row[op_at]!r}"
                )
            start = _integer(row[start_at])
            if start < 0:
                raise TraceError(
                    f"{path}:{lineno}: column {start_at + 1} (start) must be an integer >= 0, "
                    f"not {row[start_at]!r}"
                )
            size = _integer(row[size_at])
            if size <= 0:
                raise TraceError(
                    f"{path}:{lineno}: column {size_at + 1} (size) must be an integer > 0, "
                    f"not {row[size_at]!r}"
                )
            trace.append(write, start * unit, size)


def _integer(text: str) -> int:
    """The integer a CSV cell holds, -1 when it holds none."""
    try:
        return int(text)
    except ValueError:
        return -1


def _read_oracle(path: Path, trace: Trace, limit: int | None) -> None:
    placed: dict[int, int] = {}
    next_address = 0
    with _open_binary(path) as stream:
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
