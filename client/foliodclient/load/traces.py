"""Trace files for replay: page-key text, CSV and MSR block traces, libCacheSim's oracleGeneral.

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
- msr: MSR Cambridge block traces (SNIA IOTTA), CSV without a header:
  ``Timestamp,Hostname,DiskNumber,Type,Offset,Size,ResponseTime``, Type Read or Write,
  Offset and Size in bytes (Timestamp and ResponseTime, in 100 ns units, are checked and not
  used: a replay runs as fast as the server goes). A .csv whose first row has this layout
  is read as msr. Each volume (Hostname, DiskNumber) has addresses of its own, so a file
  of several volumes never maps two of them onto one page.
- oracleGeneral: libCacheSim's binary format (traceReader/customizedReader/oracle/
  oracleGeneralBin.h), little-endian 24-byte records ``<uint32 clock_time, uint64 obj_id,
  uint32 obj_size, int64 next_access_vtime>`` (-1: not requested again). Every request is a
  read; records of obj_size 0 are skipped, as libCacheSim's readers skip them. By default an
  object is one 4 KiB page, the n-th object first requested page n: a cache of N pages holds
  N objects, as libCacheSim counts with --ignore-obj-size, and lru, fifo and clock miss as
  its LRU, FIFO and Clock do. With object_size "bytes" an object takes the whole pages its
  largest obj_size needs, placed after the previous new object (so objects never share a
  page), and a request reads obj_size bytes from its start.

A ``.gz`` file is read through gzip and a ``.zst`` one through the ``zstandard`` package (the
``zstd`` extra), both as streams; the format is told by the suffix before (``trace.csv.gz``),
and a name with an ``oracleGeneral`` part is oracleGeneral (``w.oracleGeneral.zst``).
"""

from __future__ import annotations

import csv
import functools
import gzip
import importlib
import io
import struct
import typing
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from foliod.api import PAGE_SIZE

SECTOR_SIZE = 512
ORACLE_RECORD = struct.Struct("<IQIq")
# Compressed bytes a .zst stream reads at a time (its output is what they decompress to).
ZSTD_READ_BYTES = 1 << 16
# oracleGeneral records unpacked at a time.
ORACLE_READ_RECORDS = 1 << 14
FORMATS = ("text", "csv", "msr", "oracleGeneral")
# MSR Cambridge block traces (SNIA IOTTA): CSV rows without a header; Timestamp in 100 ns
# units since 1601 (Windows FILETIME), Offset and Size in bytes, ResponseTime in 100 ns units.
MSR_COLUMNS = ("Timestamp", "Hostname", "DiskNumber", "Type", "Offset", "Size", "ResponseTime")
MSR_VOLUME_BYTES = 1 << 44
# Names --trace-format also takes: the one this reader had before libCacheSim's.
FORMAT_ALIASES = {"oracle": "oracleGeneral"}
# How an oracleGeneral object becomes pages: one page each, as libCacheSim compares with
# --ignore-obj-size (a cache of N pages holds N objects), or its obj_size in whole pages.
OBJECT_SIZES = ("page", "bytes")

_SUFFIXES = {
    ".txt": "text",
    ".keys": "text",
    ".csv": "csv",
    ".oraclegeneral": "oracleGeneral",
    ".bin": "oracleGeneral",
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
    """A trace file cannot be read: where (path, and line and column or record and field) and
    why. foliod-load and foliod-load mrc exit with EXIT_BAD_TRACE for it."""


EXIT_BAD_TRACE = 3


@dataclass(slots=True)
class Trace:
    """Requests in order: write flag, byte address and size in bytes, in parallel arrays."""

    path: str
    format: str
    writes: array[int] = field(default_factory=lambda: array("B"))
    addresses: array[int] = field(default_factory=lambda: array("Q"))
    sizes: array[int] = field(default_factory=lambda: array("Q"))
    # Records read but not replayed: oracleGeneral requests of obj_size 0, which libCacheSim's
    # readers skip too (ignore_size_zero_req).
    skipped: int = 0

    def append(self, address: int, size: int, *, write: bool = False) -> None:
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
    """The format a file's name tells: its suffix (the one before .gz or .zst), or an
    ``oracleGeneral`` part anywhere in it (``w.oracleGeneral.sample10.zst``); TraceError when
    it tells none."""
    suffix = path.suffix.lower()
    if suffix in _COMPRESSED:
        suffix = path.with_suffix("").suffix.lower()
    fmt = _SUFFIXES.get(suffix)
    if fmt is None and "oraclegeneral" in path.name.lower().split("."):
        fmt = "oracleGeneral"
    if fmt is None:
        raise TraceError(
            f"{path}: cannot tell the trace format from the suffix {suffix!r}; "
            f"give --trace-format ({', '.join(FORMATS)})"
        )
    return fmt


def _open_binary(path: Path) -> IO[bytes]:
    """The file's bytes, decompressed as a stream when it ends in .gz or .zst."""
    suffix = path.suffix.lower()
    if suffix == ".gz":
        return typing.cast(IO[bytes], gzip.open(path, "rb"))
    if suffix == ".zst":
        try:
            zstandard = importlib.import_module("zstandard")
        except ImportError as exc:
            raise TraceError(
                f"{path}: reading .zst needs the zstandard package: "
                "pip install 'foliod-client[zstd]' (or decompress it first: zstd -d)"
            ) from exc
        return io.BufferedReader(_ZstdStream(path, zstandard), ZSTD_READ_BYTES)
    return path.open("rb")


class _ZstdStream(io.RawIOBase):
    """A .zst file decompressed frame after frame, ZSTD_READ_BYTES of input at a time;
    TraceError when the data is not zstd or the file ends inside a frame (zstandard's own
    stream reader takes a cut-off frame for the end of the file)."""

    def __init__(self, path: Path, zstandard: typing.Any) -> None:
        super().__init__()
        self._path = path
        self._raw = path.open("rb")
        self._zstandard = zstandard
        self._decompressor = zstandard.ZstdDecompressor()
        self._frame = self._decompressor.decompressobj()
        self._in_frame = False
        self._consumed = 0
        self._out = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: typing.Any) -> int:
        while not self._out:
            data = self._raw.read(ZSTD_READ_BYTES)
            if not data:
                if self._in_frame:
                    raise TraceError(
                        f"{self._path}: truncated: the zstd data ends inside a frame, after "
                        f"{self._consumed:,} compressed bytes"
                    )
                return 0
            self._consumed += len(data)
            self._out = memoryview(self._feed(data))
        n = min(len(buffer), len(self._out))
        buffer[:n] = self._out[:n]
        self._out = self._out[n:]
        return n

    def _feed(self, data: bytes) -> bytes:
        """Decompresses `data`, starting a new frame wherever one ends."""
        out: list[bytes] = []
        while data:
            self._in_frame = True
            try:
                out.append(self._frame.decompress(data))
            except self._zstandard.ZstdError as exc:
                raise TraceError(f"{self._path}: not zstd data, or corrupt: {exc}") from exc
            if not self._frame.eof:
                break
            data = self._frame.unused_data
            self._frame = self._decompressor.decompressobj()
            self._in_frame = False
        return b"".join(out)

    def close(self) -> None:
        self._raw.close()
        super().close()


def _open_text(path: Path, newline: str | None = None) -> IO[str]:
    return io.TextIOWrapper(_open_binary(path), encoding="utf-8", newline=newline)


def load_trace(
    path: Path, fmt: str | None = None, *, limit: int | None = None, object_size: str = "page"
) -> Trace:
    """Reads a whole trace (at most `limit` requests); TraceError names the first bad line or
    record. `object_size` places oracleGeneral objects (OBJECT_SIZES)."""
    # An MSR trace named .csv is read as one unless the user said csv.
    sniff_msr = not fmt
    fmt = FORMAT_ALIASES.get(fmt, fmt) if fmt else detect_format(path)
    if object_size not in OBJECT_SIZES:
        raise TraceError(f"unknown object size {object_size!r} ({', '.join(OBJECT_SIZES)})")
    readers: dict[str, Callable[[Path, Trace, int | None], None]] = {
        "text": _read_text,
        "csv": functools.partial(_read_csv, sniff_msr=sniff_msr),
        "msr": _read_msr,
        "oracleGeneral": _read_oracle_pages if object_size == "page" else _read_oracle_bytes,
    }
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
        skipped = f" ({trace.skipped:,} of obj_size 0, skipped)" if trace.skipped else ""
        raise TraceError(f"{path}: the trace has no requests{skipped}")
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
            trace.append(key * PAGE_SIZE, PAGE_SIZE)


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


def _read_csv(path: Path, trace: Trace, limit: int | None, *, sniff_msr: bool = True) -> None:
    """A CSV block trace; with sniff_msr (the format told by the name, not given), a first
    data row in MSR Cambridge's layout makes it one."""
    with _open_text(path, newline="") as stream:
        rows = csv.reader(stream)
        columns = (0, 1, 2, SECTOR_SIZE)
        for row in rows:
            lineno = rows.line_num
            if not row or not "".join(row).strip() or row[0].lstrip().startswith("#"):
                continue
            if sniff_msr and not len(trace) and _looks_msr(row):
                trace.format = "msr"
                _read_msr_rows(path, trace, limit, rows, row)
                return
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
            trace.append(start * unit, size, write=write)


def _looks_msr(row: list[str]) -> bool:
    """Whether a row has MSR Cambridge's seven columns: integers where they go, Read/Write."""
    return (
        len(row) == len(MSR_COLUMNS)
        and row[3].strip().lower() in ("read", "write")
        and all(row[i].strip().isdigit() for i in (0, 2, 4, 5, 6))
    )


def _read_msr(path: Path, trace: Trace, limit: int | None) -> None:
    with _open_text(path, newline="") as stream:
        _read_msr_rows(path, trace, limit, csv.reader(stream))


def _read_msr_rows(
    path: Path,
    trace: Trace,
    limit: int | None,
    rows: typing.Any,
    first: list[str] | None = None,
) -> None:
    """MSR Cambridge rows (MSR_COLUMNS, no header; `first` already read from `rows`). Each
    volume (Hostname, DiskNumber) gets MSR_VOLUME_BYTES of addresses of its own, the n-th
    seen from n x MSR_VOLUME_BYTES, so two volumes' requests never share a page."""
    volumes: dict[tuple[str, str], int] = {}
    pending = [first] if first is not None else []
    while True:
        row = pending.pop() if pending else next(rows, None)
        if row is None:
            return
        lineno = rows.line_num
        if not row or not "".join(row).strip():
            continue
        if _full(trace, limit):
            return
        if len(row) != len(MSR_COLUMNS):
            raise TraceError(
                f"{path}:{lineno}: expected the {len(MSR_COLUMNS)} columns of an MSR Cambridge "
                f"trace ({','.join(MSR_COLUMNS)}), got {len(row)}: {','.join(row)!r}"
            )
        for column in (0, 2, 6):
            if _integer(row[column]) < 0:
                raise TraceError(
                    f"{path}:{lineno}: column {column + 1} ({MSR_COLUMNS[column]}) must be an "
                    f"integer >= 0, not {row[column]!r}"
                )
        kind = row[3].strip().lower()
        if kind not in ("read", "write"):
            raise TraceError(
                f"{path}:{lineno}: column 4 (Type) must be Read or Write, not {row[3]!r}"
            )
        offset = _integer(row[4])
        if not 0 <= offset < MSR_VOLUME_BYTES:
            raise TraceError(
                f"{path}:{lineno}: column 5 (Offset) must be an integer from 0 to "
                f"{MSR_VOLUME_BYTES - 1} (bytes), not {row[4]!r}"
            )
        size = _integer(row[5])
        if size <= 0:
            raise TraceError(
                f"{path}:{lineno}: column 6 (Size) must be an integer > 0 (bytes), not {row[5]!r}"
            )
        volume = volumes.setdefault((row[1].strip(), row[2].strip()), len(volumes))
        trace.append(volume * MSR_VOLUME_BYTES + offset, size, write=kind == "write")


def _integer(text: str) -> int:
    """The integer a CSV cell holds, -1 when it holds none."""
    try:
        return int(text)
    except ValueError:
        return -1


def _oracle_records(path: Path, limit: int | None) -> Iterator[tuple[int, int, int]]:
    """(record number, obj_id, obj_size) of each oracleGeneral record, at most `limit` of
    obj_size > 0, read ORACLE_READ_RECORDS at a time; TraceError names a bad record."""
    kept = 0
    number = 0
    with _open_binary(path) as stream:
        while True:
            chunk = stream.read(ORACLE_RECORD.size * ORACLE_READ_RECORDS)
            if not chunk:
                return
            whole = len(chunk) - len(chunk) % ORACLE_RECORD.size
            for _, obj_id, obj_size, next_access in ORACLE_RECORD.iter_unpack(chunk[:whole]):
                number += 1
                if next_access < -1:
                    raise TraceError(
                        f"{path}: record {number} (byte {(number - 1) * ORACLE_RECORD.size}): "
                        f"field 4 (next_access_vtime) must be -1 or >= 0, not {next_access} "
                        "(is it oracleGeneral, uncompressed?)"
                    )
                if limit is not None and kept >= limit:
                    return
                if obj_size:
                    kept += 1
                yield number, obj_id, obj_size
            if whole < len(chunk):
                raise TraceError(
                    f"{path}: record {number + 1} (byte {number * ORACLE_RECORD.size}) is "
                    f"truncated: {len(chunk) - whole} of {ORACLE_RECORD.size} bytes "
                    "(is it oracleGeneral, uncompressed?)"
                )


def _read_oracle_pages(path: Path, trace: Trace, limit: int | None) -> None:
    """One 4 KiB page an object, in the order objects are first requested."""
    pages: dict[int, int] = {}
    append = trace.addresses.append
    for _, obj_id, obj_size in _oracle_records(path, limit):
        if not obj_size:
            trace.skipped += 1
            continue
        page = pages.get(obj_id)
        if page is None:
            page = pages[obj_id] = len(pages)
        append(page * PAGE_SIZE)
    trace.writes = array("B", bytes(len(trace.addresses)))
    trace.sizes = array("Q", [PAGE_SIZE]) * len(trace.addresses)


def _read_oracle_bytes(path: Path, trace: Trace, limit: int | None) -> None:
    """Each object over whole pages, as many as its largest obj_size needs, placed after the
    previous new object, in the order objects are first requested; a request reads
    obj_size bytes from the object's start."""
    ids = array("Q")
    largest: dict[int, int] = {}
    for _, obj_id, obj_size in _oracle_records(path, limit):
        if not obj_size:
            trace.skipped += 1
            continue
        ids.append(obj_id)
        trace.sizes.append(obj_size)
        if obj_size > largest.get(obj_id, 0):
            largest[obj_id] = obj_size
    placed: dict[int, int] = {}
    address = 0
    for obj_id, obj_size in largest.items():
        placed[obj_id] = address
        address += -(-obj_size // PAGE_SIZE) * PAGE_SIZE
    trace.addresses.extend(placed[obj_id] for obj_id in ids)
    trace.writes = array("B", bytes(len(ids)))


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
