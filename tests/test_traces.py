"""Trace readers: compressed input, libCacheSim's oracleGeneral and MSR Cambridge block traces,
good files and malformed ones, each written to disk by the test."""

from __future__ import annotations

import gzip
import random
import re
import sys
from pathlib import Path

import pytest
import zstandard

from foliod.server import FoliodServer
from foliodclient.load.cli import main
from foliodclient.load.mrc import main as mrc_main
from foliodclient.load.reference import REFERENCES
from foliodclient.load.traces import TraceError, load_trace, write_oracle
from tests.test_load import load


def zst(data: bytes, frames: int = 1) -> bytes:
    """`data` zstd-compressed in `frames` frames, as `zstd` and libCacheSim's tools write it."""
    compressor = zstandard.ZstdCompressor()
    cut = len(data) // frames
    pieces = [data[i * cut : (i + 1) * cut if i < frames - 1 else None] for i in range(frames)]
    return b"".join(compressor.compress(piece) for piece in pieces)


def test_zst_multi_frame_streams_whole(tmp_path: Path) -> None:
    """A .zst of several frames, larger than one read, is read whole and in order."""
    lines = "".join(f"{key}\n" for key in range(200_000))
    path = tmp_path / "keys.txt.zst"
    path.write_bytes(zst(lines.encode(), frames=3))
    trace = load_trace(path)
    assert trace.format == "text"
    assert list(trace.addresses) == [key * 4096 for key in range(200_000)]


def test_truncated_zst_is_an_error_not_a_short_trace(tmp_path: Path) -> None:
    """A .zst cut inside a frame fails, naming the file, instead of replaying what it had."""
    plain = tmp_path / "t.oracleGeneral"
    write_oracle(plain, [(i, i % 97, 4096, -1) for i in range(50_000)])
    path = tmp_path / "t.oracleGeneral.zst"
    path.write_bytes(zst(plain.read_bytes())[:-9])
    with pytest.raises(TraceError, match=r"t\.oracleGeneral\.zst: truncated: the zstd data ends"):
        load_trace(path)


def test_zst_without_zstandard_names_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the zstandard package a .zst fails with the extra to install."""
    monkeypatch.setitem(sys.modules, "zstandard", None)
    path = tmp_path / "t.oracleGeneral.zst"
    path.write_bytes(b"\x28\xb5\x2f\xfd")
    with pytest.raises(TraceError, match=r"pip install 'foliod-client\[zstd\]'"):
        load_trace(path)


@pytest.mark.parametrize(
    ("name", "cut", "message"),
    [
        ("t.oracleGeneral.gz", -6, "t.oracleGeneral.gz: Compressed file ended"),
        ("t.oracleGeneral.zst", -6, "t.oracleGeneral.zst: truncated"),
        ("t.oracleGeneral.zst", 40, "t.oracleGeneral.zst: truncated"),
    ],
)
def test_truncated_compressed_oracle_general(
    tmp_path: Path, name: str, cut: int, message: str
) -> None:
    """A compressed oracleGeneral cut short fails naming the file, whatever the cut."""
    plain = tmp_path / "plain"
    write_oracle(plain, [(i, i * 7919 % 1000, 512, -1) for i in range(20_000)])
    packed = gzip.compress(plain.read_bytes()) if name.endswith(".gz") else zst(plain.read_bytes())
    path = tmp_path / name
    path.write_bytes(packed[:cut])
    with pytest.raises(TraceError, match=re.escape(message)):
        load_trace(path)


def test_gz_and_zst_read_the_same(tmp_path: Path) -> None:
    """The same CSV plain, gzipped and zstd-compressed gives the same requests."""
    text = "op,lbn,size\nR,0,4096\nW,8,512\n"
    (tmp_path / "a.csv").write_text(text)
    (tmp_path / "a.csv.gz").write_bytes(gzip.compress(text.encode()))
    (tmp_path / "a.csv.zst").write_bytes(zst(text.encode()))
    traces = [load_trace(tmp_path / name) for name in ("a.csv", "a.csv.gz", "a.csv.zst")]
    assert len({(tuple(t.writes), tuple(t.addresses), tuple(t.sizes)) for t in traces}) == 1


# libCacheSim's oracleGeneral.


def test_oracle_general_record_layout(tmp_path: Path) -> None:
    """Records are <uint32 clock_time, uint64 obj_id, uint32 obj_size, int64 next_access_vtime>,
    24 bytes little-endian, as libCacheSim's oracleGeneralBin.h reads them."""
    path = tmp_path / "w.oracleGeneral"
    record = (
        (7).to_bytes(4, "little")
        + (2**64 - 1).to_bytes(8, "little")
        + (3).to_bytes(4, "little")
        + (-1).to_bytes(8, "little", signed=True)
    )
    path.write_bytes(record + record)
    trace = load_trace(path, object_size="bytes")
    assert list(trace.addresses) == [0, 0] and list(trace.sizes) == [3, 3]


def test_oracle_general_objects_as_pages(tmp_path: Path) -> None:
    """By default the n-th new object is page n and every request one page (libCacheSim's
    --ignore-obj-size); size-0 requests are skipped and counted; the limit counts requests."""
    path = tmp_path / "w.oracleGeneral"
    write_oracle(
        path, [(1, 10**12, 512, 2), (2, 3, 0, -1), (3, 5, 1 << 20, -1), (4, 10**12, 9, -1)]
    )
    trace = load_trace(path)
    assert trace.format == "oracleGeneral"
    assert list(trace.addresses) == [0, 4096, 0] and list(trace.sizes) == [4096] * 3
    assert list(trace.writes) == [0, 0, 0] and trace.skipped == 1
    assert len(load_trace(path, limit=2)) == 2


def test_oracle_general_objects_over_their_size(tmp_path: Path) -> None:
    """With object_size "bytes" an object takes the pages its largest request needs, so a
    later, larger request of it never reaches the next object."""
    path = tmp_path / "w.oracleGeneral"
    write_oracle(path, [(1, 7, 100, -1), (2, 8, 4096, -1), (3, 7, 5000, -1)])
    trace = load_trace(path, object_size="bytes")
    assert list(trace.addresses) == [0, 8192, 0]
    assert list(trace.sizes) == [100, 4096, 5000]


@pytest.mark.parametrize(
    "name", ["w.oracleGeneral", "w.oracleGeneral.zst", "w.oracleGeneral.bin", "x.bin.gz"]
)
def test_oracle_general_recognised_by_name(tmp_path: Path, name: str) -> None:
    """.oracleGeneral, .bin, an oracleGeneral part and a compressed copy are all oracleGeneral."""
    plain = tmp_path / "plain"
    write_oracle(plain, [(1, 1, 4096, -1)])
    data = plain.read_bytes()
    path = tmp_path / name
    if name.endswith(".zst"):
        data = zst(data)
    elif name.endswith(".gz"):
        data = gzip.compress(data)
    path.write_bytes(data)
    assert load_trace(path).format == "oracleGeneral"
    assert load_trace(plain, "oracle").format == "oracleGeneral"


@pytest.mark.parametrize(
    ("records", "tail", "message"),
    [
        (3, b"\x01" * 10, "record 4 (byte 72) is truncated: 10 of 24 bytes"),
        (0, b"\x01" * 23, "record 1 (byte 0) is truncated: 23 of 24 bytes"),
        (
            2,
            (1).to_bytes(4, "little") * 4 + (-5).to_bytes(8, "little", signed=True),
            "record 3 (byte 48): field 4 (next_access_vtime) must be -1 or >= 0, not -5",
        ),
    ],
    ids=["truncated", "short", "bad-vtime"],
)
def test_malformed_oracle_general_names_the_record(
    tmp_path: Path, records: int, tail: bytes, message: str
) -> None:
    """A cut-off record or a field no oracleGeneral writer makes names the record and its byte,
    plain and inside a .zst."""
    plain = tmp_path / "bad.oracleGeneral"
    write_oracle(plain, [(i, i, 4096, -1) for i in range(records)])
    plain.write_bytes(plain.read_bytes() + tail)
    packed = tmp_path / "bad.oracleGeneral.zst"
    packed.write_bytes(zst(plain.read_bytes()))
    for path in (plain, packed):
        with pytest.raises(TraceError, match=re.escape(f"{path}: {message}")):
            load_trace(path)


def test_only_size_zero_requests_is_no_trace(tmp_path: Path) -> None:
    """A trace whose requests all have obj_size 0 says it has none, and why."""
    path = tmp_path / "zero.oracleGeneral"
    write_oracle(path, [(1, 1, 0, -1), (2, 2, 0, -1)])
    with pytest.raises(TraceError, match=r"no requests \(2 of obj_size 0, skipped\)"):
        load_trace(path)


@pytest.mark.parametrize("policy", sorted(REFERENCES))
def test_oracle_general_misses_match_libcachesim(tmp_path: Path, policy: str) -> None:
    """A page per object, the textbook twins miss as libCacheSim's LRU, FIFO and Clock do
    with --ignore-obj-size on the same file (when the libcachesim package is installed)."""
    libcachesim = pytest.importorskip("libcachesim")
    rng = random.Random(15)
    path = tmp_path / "skew.oracleGeneral"
    write_oracle(
        path,
        [
            (i, int(rng.paretovariate(0.8)) % 5000, rng.choice([0, 512, 4096]), -1)
            for i in range(20_000)
        ],
    )
    keys = [address // 4096 for address in load_trace(path).addresses]
    caches = {"clock": libcachesim.Clock, "fifo": libcachesim.FIFO, "lru": libcachesim.LRU}
    for nr_pages in (64, 512):
        reader = libcachesim.TraceReader(
            str(path),
            libcachesim.TraceType.ORACLE_GENERAL_TRACE,
            libcachesim.ReaderInitParam(ignore_obj_size=True),
        )
        miss_ratio, _ = caches[policy](nr_pages).process_trace(reader)
        assert round(miss_ratio * len(keys)) == REFERENCES[policy](keys, nr_pages)


# MSR Cambridge block traces.

MSR_ROWS = (
    "128166372003061629,wdev,0,Read,3221225472,4096,1537\n"
    "128166372016382155,wdev,0,Write,2147483648,512,68\n"
    "128166372026382245,wdev,0,read,3221229568,8192,1000\n"
)


@pytest.mark.parametrize(("name", "fmt"), [("hm_0.csv", None), ("hm_0.trace", "msr")])
def test_msr_by_layout_or_by_name(tmp_path: Path, name: str, fmt: str | None) -> None:
    """An MSR Cambridge file reads as msr from its first row's layout, or as told."""
    path = tmp_path / name
    path.write_text(MSR_ROWS)
    trace = load_trace(path, fmt)
    assert trace.format == "msr"
    assert list(trace.writes) == [0, 1, 0]
    assert list(trace.addresses) == [3221225472, 2147483648, 3221229568]
    assert list(trace.sizes) == [4096, 512, 8192]
    assert len(load_trace(path, fmt, limit=2)) == 2


def test_csv_given_by_the_user_is_read_as_csv(tmp_path: Path) -> None:
    """--trace-format csv is taken at its word: an MSR-looking first row is then a csv error
    naming its line, not a switch to msr (which only a format told by the name allows)."""
    path = tmp_path / "hm_0.csv"
    path.write_text(MSR_ROWS)
    with pytest.raises(TraceError, match=r"hm_0.csv:1: column 1 \(op\) must be R or W"):
        load_trace(path, "csv")
    assert load_trace(path).format == "msr"


def test_msr_volumes_never_share_pages(tmp_path: Path) -> None:
    """Rows of another Hostname or DiskNumber go to addresses of their own, 2^44 apart."""
    path = tmp_path / "mixed.csv.gz"
    rows = (
        "1,hm,0,Read,0,4096,5\n2,hm,1,Read,0,4096,5\n3,src,0,Write,0,4096,5\n4,hm,0,Read,0,4096,5\n"
    )
    path.write_bytes(gzip.compress(rows.encode()))
    assert list(load_trace(path).addresses) == [0, 1 << 44, 2 << 44, 0]


def test_csv_with_seven_columns_is_not_msr_without_its_layout(tmp_path: Path) -> None:
    """A headerless op,sector,size file is still csv; an msr row later on is a csv error."""
    path = tmp_path / "t.csv"
    path.write_text("R,0,4096\n1,wdev,0,Read,0,4096,5\n")
    with pytest.raises(TraceError, match=r"t\.csv:2: column 1 \(op\)"):
        load_trace(path)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ("1,wdev,0,Read,0,4096", "expected the 7 columns of an MSR Cambridge trace"),
        ("x,wdev,0,Read,0,4096,5", "column 1 (Timestamp) must be an integer >= 0, not 'x'"),
        ("1,wdev,-1,Read,0,4096,5", "column 3 (DiskNumber) must be an integer >= 0"),
        ("1,wdev,0,Trim,0,4096,5", "column 4 (Type) must be Read or Write, not 'Trim'"),
        ("1,wdev,0,Read,0x10,4096,5", "column 5 (Offset) must be an integer from 0"),
        (f"1,wdev,0,Read,{1 << 44},4096,5", "column 5 (Offset) must be an integer from 0"),
        ("1,wdev,0,Write,0,0,5", "column 6 (Size) must be an integer > 0 (bytes), not '0'"),
        ("1,wdev,0,Read,0,4096,", "column 7 (ResponseTime) must be an integer >= 0"),
    ],
)
def test_malformed_msr_names_line_and_column(tmp_path: Path, row: str, message: str) -> None:
    """A bad MSR row names the file, its line and the column, sniffed or told."""
    path = tmp_path / "bad.csv"
    path.write_text(MSR_ROWS + "\n" + row + "\n")
    with pytest.raises(TraceError, match=re.escape(f"{path}:5: {message}")):
        load_trace(path)
    with pytest.raises(TraceError, match=re.escape(f"{path}:5: {message}")):
        load_trace(path, "msr")


def test_msr_told_of_a_file_with_a_header(tmp_path: Path) -> None:
    """--trace-format msr on a CSV with a header names the first line."""
    path = tmp_path / "h.csv"
    path.write_text("op,lbn,size\nR,0,4096\n")
    with pytest.raises(TraceError, match=re.escape(f"{path}:1: expected the 7 columns")):
        load_trace(path, "msr")


# Through foliod-load.


def test_replay_msr_and_oracle_general_zst_end_to_end(
    server: FoliodServer, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """foliod-load replays an MSR file and an oracleGeneral.zst, in order, with their ops."""
    msr = tmp_path / "wdev_0.csv"
    msr.write_text(MSR_ROWS)
    data = load(server, capsys, "replay", "--trace", str(msr))
    assert data["config"]["trace_format"] == "msr" and data["ops_by_kind"] == {
        "read": 2,
        "write": 1,
    }
    assert data["bytes_written"] == 512
    plain = tmp_path / "w.oracleGeneral"
    write_oracle(plain, [(i, i % 10, 4096, -1) for i in range(100)])
    packed = tmp_path / "w.oracleGeneral.zst"
    packed.write_bytes(zst(plain.read_bytes()))
    data = load(server, capsys, "replay", "--trace", str(packed))
    assert data["config"]["trace_format"] == "oracleGeneral" and data["ops"] == 100
    assert data["cache"]["pages_missed"] <= 10


@pytest.mark.parametrize(
    "case",
    [
        ("t.oracleGeneral", b"\x00" * 25, [], "t.oracleGeneral: record 2 (byte 24) is truncated"),
        ("t.csv", b"1,wdev,0,Read,0,4096,5\n1,wdev,0,Trim,0,1,1\n", [], "t.csv:2: column 4"),
        ("t.log", b"R,0,4096\n", ["--trace-format", "msr"], "t.log:1: expected the 7"),
    ],
)
def test_foliod_load_exits_3_naming_the_place(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, case: tuple[str, bytes, list[str], str]
) -> None:
    """replay and mrc exit 3 on a malformed trace, naming the file and where, before any RPC."""
    name, content, argv, message = case
    path = tmp_path / name
    path.write_bytes(content)
    rc = main(["replay", "--trace", str(path), *argv, "--server", "127.0.0.1:1", "--no-progress"])
    assert rc == 3 and message in capsys.readouterr().err
    rc = mrc_main(["--trace", str(path), *argv, "--sizes", "8"])
    assert rc == 3 and message in capsys.readouterr().err
