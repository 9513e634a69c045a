"""Trace readers: compressed input, libCacheSim's oracleGeneral and MSR Cambridge block traces,
good files and malformed ones, each written to disk by the test."""

from __future__ import annotations

import gzip
import sys
from pathlib import Path

import pytest
import zstandard

from foliodclient.load.traces import TraceError, load_trace, write_oracle


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
    with pytest.raises(TraceError, match=r"pip install 'foliod\[zstd\]'"):
        load_trace(path)


def test_gz_and_zst_read_the_same(tmp_path: Path) -> None:
    """The same CSV plain, gzipped and zstd-compressed gives the same requests."""
    text = "op,lbn,size\nR,0,4096\nW,8,512\n"
    (tmp_path / "a.csv").write_text(text)
    (tmp_path / "a.csv.gz").write_bytes(gzip.compress(text.encode()))
    (tmp_path / "a.csv.zst").write_bytes(zst(text.encode()))
    traces = [load_trace(tmp_path / name) for name in ("a.csv", "a.csv.gz", "a.csv.zst")]
    assert len({(tuple(t.writes), tuple(t.addresses), tuple(t.sizes)) for t in traces}) == 1
