"""foliod-load mrc: miss-ratio curves over local foliod processes and over given servers."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from foliodclient.load import mrc as mrc_module
from foliodclient.load.cli import main
from foliodclient.load.reference import REFERENCES as CLIENT_REFERENCES
from foliodclient.load.traces import load_trace, write_oracle
from tests.conftest import ServerFactory
from tests.test_replay_rpc import REFERENCES

SIZES = (16, 64)


def small_trace(path: Path, n: int = 1200, seed: int = 15) -> list[int]:
    """Writes a text trace of page keys, skewed with a loop through it, and returns the keys."""
    rng = random.Random(seed)
    keys = [
        rng.randrange(24) if rng.random() < 0.6 else (i % 150) + rng.randrange(2) * 300
        for i in range(n)
    ]
    path.write_text("".join(f"{key}\n" for key in keys))
    return keys


def mrc(capsys: pytest.CaptureFixture[str], *argv: str, code: int = 0) -> dict[str, Any]:
    rc = main(["mrc", *argv, "--json"])
    out, err = capsys.readouterr()
    assert rc == code, err
    data: dict[str, Any] = json.loads(out)
    return data


def check_textbook(data: dict[str, Any], keys: list[int]) -> None:
    for point in data["points"]:
        assert point["error"] == ""
        expected = REFERENCES[point["policy"]](keys, point["nr_pages"])
        assert point["pages_missed"] == point["reference_misses"] == expected, point
        assert point["accesses"] == len(keys)
        assert point["pages_hit"] + point["pages_missed"] == len(keys)
        assert point["device_seconds"] > 0
        assert set(point["memmap_bytes"]) == {"struct_page", "interim", "memdesc"}


def test_reference_caches_equal_the_test_suites() -> None:
    """The client's textbook caches count the misses of the test suite's own references."""
    rng = random.Random(3)
    keys = [int(rng.paretovariate(1.2)) % 300 for _ in range(5000)]
    for policy, twin in CLIENT_REFERENCES.items():
        for nr_pages in (1, 7, 64, 512):
            assert twin(keys, nr_pages) == REFERENCES[policy](keys, nr_pages)


@pytest.mark.slow
def test_mrc_on_local_servers_matches_the_textbook(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Without --server each point gets a local foliod; lru and clock miss as their textbook
    twins, lru's miss ratio does not rise with size, and the HTML page has the curves."""
    trace = tmp_path / "keys.txt"
    keys = small_trace(trace)
    page = tmp_path / "mrc.html"
    data = mrc(
        capsys,
        "--trace",
        str(trace),
        "--policies",
        "lru,clock",
        "--sizes",
        ",".join(map(str, SIZES)),
        "--jobs",
        "2",
        "--html",
        str(page),
    )
    points = data["points"]
    assert [(p["policy"], p["nr_pages"]) for p in points] == [
        ("lru", 16),
        ("lru", 64),
        ("clock", 16),
        ("clock", 64),
    ]
    check_textbook(data, keys)
    lru = [p["miss_ratio"] for p in points if p["policy"] == "lru"]
    assert lru == sorted(lru, reverse=True) and lru[0] > lru[1]
    assert "reference" in data["table"] and data["servers"] == ["local"]
    if page.exists():  # matplotlib installed
        assert page.read_text().count("<svg") == 1


def test_mrc_over_given_servers(
    make_server: ServerFactory, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """--server POLICY:PAGES@ADDR sends each point to a server started with its policy and
    capacity; fifo's misses are FIFO's, and a point with no server is a usage error."""
    trace = tmp_path / "keys.txt"
    keys = small_trace(trace)
    servers = []
    for nr_pages in SIZES:
        server = make_server(
            reclaim_policy="fifo",
            cache_capacity=nr_pages * 4096,
            state_dir=tmp_path / f"var{nr_pages}",  # a state directory each: no shared files
        )
        servers += ["--server", f"fifo:{nr_pages}@127.0.0.1:{server.grpc_port}"]
    argv = ["--trace", str(trace), "--sizes", ",".join(map(str, SIZES)), *servers]
    data = mrc(capsys, *argv, "--policies", "fifo")
    assert [p["server"] for p in data["points"]] == [s.split("@")[1] for s in servers[1::2]]
    check_textbook(data, keys)
    assert main(["mrc", *argv, "--policies", "fifo,lru"]) == 2
    assert "no --server for lru:16, lru:64" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        (["--policies", "lru,arc", "--sizes", "16"], 2, "not a reclaim policy: arc"),
        (["--policies", "lru", "--sizes", "16,x"], 2, "--sizes: "),
        (["--policies", "lru", "--sizes", "0"], 2, "at least one page"),
        (["--policies", "lru", "--sizes", "6KiB"], 2, "not a whole number of 4 KiB pages"),
        (["--policies", "lru", "--sizes", ","], 2, "no sizes"),
        (["--sizes", "16", "--readahead", "maybe"], 2, "--readahead: on, off"),
        (["--sizes", "16", "--max-order", "12"], 2, "--max-order: orders 0..9"),
        (["--sizes", "16", "--server", "127.0.0.1:1"], 2, "POLICY:PAGES@ADDR"),
    ],
)
def test_mrc_bad_input(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    argv: list[str],
    code: int,
    message: str,
) -> None:
    """A bad grid is a usage error (exit 2) naming the option, before any server starts."""
    trace = tmp_path / "keys.txt"
    small_trace(trace, n=10)
    assert main(["mrc", "--trace", str(trace), *argv]) == code
    assert message in capsys.readouterr().err


def test_mrc_missing_or_malformed_trace(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """A trace that is missing or malformed exits 3 naming the file, before any server starts."""
    missing = tmp_path / "nope.txt"
    assert main(["mrc", "--trace", str(missing), "--sizes", "16"]) == 3
    assert "nope.txt" in capsys.readouterr().err
    bad = tmp_path / "bad.txt"
    bad.write_text("1\nx\n")
    assert main(["mrc", "--trace", str(bad), "--sizes", "16"]) == 3
    assert "bad.txt:2" in capsys.readouterr().err


def test_mrc_libcachesim_column_where_its_twins_run(
    make_server: ServerFactory,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With the libcachesim package the table and JSON carry libCacheSim's LRU/FIFO/Clock
    misses (equal to foliod's and the textbook's on a zstd oracleGeneral trace, a page an
    object); without it the column is left out and the field is null."""
    pytest.importorskip("libcachesim")
    zstandard = pytest.importorskip("zstandard")
    rng = random.Random(5)
    plain = tmp_path / "w.oracleGeneral"
    objects = [int(rng.paretovariate(1.0)) % 400 * 7919 for _ in range(1500)]
    write_oracle(plain, [(i, obj, 4096, -1) for i, obj in enumerate(objects)])
    trace = tmp_path / "w.oracleGeneral.zst"
    trace.write_bytes(zstandard.ZstdCompressor().compress(plain.read_bytes()))
    keys = [address // 4096 for address in load_trace(trace).addresses]
    server = make_server(reclaim_policy="lru", cache_capacity=64 * 4096)
    argv = [
        "--trace",
        str(trace),
        "--sizes",
        "64",
        "--server",
        f"lru:64@127.0.0.1:{server.grpc_port}",
    ]
    data = mrc(capsys, *argv)
    check_textbook(data, keys)
    (point,) = data["points"]
    assert point["libcachesim_misses"] == point["pages_missed"]
    assert "libCacheSim" in data["table"].splitlines()[1]
    monkeypatch.setattr(mrc_module, "libcachesim_available", lambda: False)
    data = mrc(capsys, *argv)
    assert data["points"][0]["libcachesim_misses"] is None
    assert "libCacheSim" not in data["table"]
