"""foliodctl against a live server: each subcommand's output, --json, and exit codes."""

from __future__ import annotations

import io
import json
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from grpc_health.v1 import health_pb2

from foliod.server import FoliodServer
from foliodclient import FaultRule, FoliodClient, _exit_codes, cli
from tests.conftest import ServerFactory
from tests.test_client import fake_server

MIB = 1 << 20
GIB = 1 << 30


class Ctl:
    """Runs foliodctl in process against one server, capturing stdout and stderr."""

    def __init__(self, server: FoliodServer, capsys: pytest.CaptureFixture[str]) -> None:
        self.server = f"127.0.0.1:{server.grpc_port}"
        self.capsys = capsys

    def __call__(self, *argv: str, code: int = 0) -> str:
        """stdout of a command that must exit with `code`."""
        self.capsys.readouterr()
        got = cli.main(["--server", self.server, *argv])
        out, err = self.capsys.readouterr()
        assert got == code, err
        self.err = err
        return out

    def json(self, *argv: str) -> Any:
        return json.loads(self(*argv, "--json"))


@pytest.fixture
def ctl(server: FoliodServer, capsys: pytest.CaptureFixture[str]) -> Ctl:
    return Ctl(server, capsys)


def test_meminfo_reads_like_proc_meminfo(ctl: Ctl) -> None:
    """meminfo prints `Name:  <kB> kB` lines in /proc/meminfo's layout; --json gives bytes."""
    ctl("alloc", "cache", "file", "--size", "8MiB")
    lines = ctl("meminfo").splitlines()
    assert all(re.fullmatch(r"[A-Za-z()]+: +\d+ kB", line) for line in lines)
    assert lines[0] == "MemTotal:         262144 kB"
    values = {line.split(":")[0]: int(line.split()[-2]) for line in lines}
    assert values["FileFolios"] == 8192 and values["Memmap"] == 4096
    assert values["MemFree"] == 262144 - 8192
    data = ctl.json("meminfo")
    assert data["mem_total_bytes"] == 256 * MIB and data["file_pages_bytes"] == 8 * MIB


def test_vmstat_reads_like_proc_vmstat(ctl: Ctl) -> None:
    """vmstat prints `name value` lines; --json gives the same counters as an object."""
    ctl("alloc", "a", "slab", "--count", "3")
    lines = ctl("vmstat").splitlines()
    assert all(re.fullmatch(r"[a-z_0-9]+ \d+", line) for line in lines)
    counters = dict((name, int(value)) for name, value in (line.split() for line in lines))
    assert lines[0].startswith("nr_free_pages ") and counters["pgalloc"] >= 3
    assert ctl.json("vmstat") == counters


def test_buddyinfo_reads_like_proc_buddyinfo(ctl: Ctl) -> None:
    """buddyinfo prints the kernel's one line per zone; free blocks add up to free memory."""
    ctl("alloc", "a", "file", "--count", "1")
    out = ctl("buddyinfo")
    assert out.startswith("Node 0, zone   Normal ") and out.endswith(" \n")
    blocks = [int(n) for n in out.split()[4:]]
    assert blocks[:9] == [1, 1, 1, 1, 1, 1, 1, 1, 1] and len(blocks) == 11
    assert sum(n << order for order, n in enumerate(blocks)) == 65535
    assert ctl.json("buddyinfo") == {"zone": "Normal", "free_blocks": blocks}


def test_memmap_shows_three_models_side_by_side(ctl: Ctl) -> None:
    """memmap has a column per model, totals, percent of RAM, descriptors and cost per kind."""
    ctl("alloc", "cache", "file", "--size", "16MiB")
    out = ctl("memmap")
    lines = out.splitlines()
    assert lines[0] == "memory map of host: 256 MiB of RAM, 65536 frames"
    assert lines[2].split() == ["struct_page", "interim", "memdesc"]
    rows = {cells[0]: cells[1:] for cells in (re.split(r"  +", ln.strip()) for ln in lines[3:])}
    # 4096 order-0 file folios: interim 2 MiB + 4096 x 80 B, memdesc 512 KiB + 4096 x 80 B.
    assert rows["total"] == ["4 MiB", "2.31 MiB", "832 KiB"]
    assert rows["percent of RAM"] == ["1.5625 %", "0.9033 %", "0.3174 %"]
    assert rows["page"] == ["4 MiB", "2 MiB", "-"]
    assert rows["memdesc"] == ["-", "-", "512 KiB"]
    assert rows["folio"] == ["-", "320 KiB", "320 KiB"]
    assert rows["file"] == ["256 KiB", "448 KiB", "352 KiB"]
    assert lines.index("descriptors") < lines.index("by kind")
    assert "hvo freed" not in out  # shown only when HVO freed memmap pages
    data = ctl.json("memmap")
    assert [m["model"] for m in data["models"]] == ["struct_page", "interim", "memdesc"]
    assert data["models"][0]["total_bytes"] == 4 * MIB
    assert data["folios"] == [{"kind": "file", "order": 0, "folios": 4096, "nr_pages": 4096}]


def test_folios_is_a_histogram_by_order_and_kind(ctl: Ctl) -> None:
    """folios has a row per order in use and a column per kind, with totals and memory."""
    ctl("alloc", "cache", "file", "--count", "5")
    ctl("alloc", "app", "anon", "--size", "4MiB", "--madvise")
    lines = ctl("folios").splitlines()
    assert lines[0].split() == [
        "order", "size", "anon", "file", "slab", "pagetable", "hugetlb", "balloon", "total",
    ]  # fmt: skip
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert rows["0"] == [
        "0",
        "4",
        "KiB",
        "0",
        "5",
        "0",
        "5",
        "0",
        "0",
        "10",
    ]  # PGD, PUD, PMD, 2 PTE
    assert rows["9"] == ["9", "2", "MiB", "2", "0", "0", "0", "0", "0", "2"]
    assert rows["total"] == ["total", "2", "5", "0", "5", "0", "0", "12"]
    assert rows["memory"][1:3] == ["4", "MiB"]
    data = ctl.json("folios")
    assert {"kind": "anon", "order": 9, "folios": 2, "nr_pages": 1024} in data


def test_files_subcommands(ctl: Ctl, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """files write (stdin and a file), ls, stat, cat, truncate, fsync, drop and rm."""
    source = tmp_path / "blob"
    source.write_bytes(bytes(range(256)) * 40)
    out = ctl("files", "write", "data/blob", str(source))
    assert out.startswith("wrote 10240 bytes to data/blob at offset 0: 0 pages hit, 3 missed")
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"hello\n")))
    assert ctl.json("files", "write", "notes.txt")["written_bytes"] == 6
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"HE")))
    ctl("files", "write", "notes.txt", "-", "--offset", "0")

    lines = ctl("files", "ls").splitlines()
    assert lines[0].split() == ["name", "size", "cached", "dirty", "order:folios", "open"]
    assert lines[1].split() == [
        "data/blob",
        "10",
        "KiB",
        "12",
        "KiB",
        "12",
        "KiB",
        "0:1",
        "1:1",
        "0",
    ]
    assert lines[2].split() == ["notes.txt", "6", "B", "4", "KiB", "4", "KiB", "0:1", "0"]
    listed = ctl.json("files", "ls")
    assert [f["name"] for f in listed] == ["data/blob", "notes.txt"]
    assert listed[0]["folios_by_order"] == {"0": 1, "1": 1}

    stat = ctl("files", "stat", "data/blob")
    assert "size:         10240 bytes (10 KiB)\n" in stat and "dirty:        3 pages" in stat
    assert ctl("files", "cat", "notes.txt") == "HEllo\n"
    assert ctl("files", "cat", "notes.txt", "--offset", "2", "--length", "2") == "ll"
    cat = ctl.json("files", "cat", "notes.txt")
    assert cat["length"] == 6 and cat["stats"]["pages_hit"] == 1

    truncated = ctl.json("files", "truncate", "data/blob", "4KiB")
    # Its first folio covers pages 0-1 and is dirty: it cannot be split and stays whole.
    assert truncated["size_bytes"] == 4096 and truncated["nr_cached"] == 2
    assert ctl("files", "fsync", "notes.txt") == (
        "notes.txt: 1 pages (4 KiB) written back, synced\n"
    )
    # Clean now: POSIX_FADV_DONTNEED of the whole file drops its one page, then nothing.
    assert ctl.json("files", "drop", "notes.txt") == {"name": "notes.txt", "dropped_bytes": 4096}
    assert ctl("files", "drop", "notes.txt", "--offset", "0", "--length", "1MiB") == (
        "dropped 0 B\n"
    )
    assert ctl("files", "rm", "notes.txt", "data/blob") == ""
    assert ctl.json("files", "ls") == []
    ctl("files", "stat", "notes.txt", code=4)
    assert ctl.err == "foliodctl: NOT_FOUND (UNKNOWN_FILE): no file 'notes.txt'\n"


def test_files_cat_writes_raw_bytes(
    server: FoliodServer, tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    """files cat copies the bytes unchanged, across several 2 MiB reads."""
    data = bytes(range(256)) * (9 * 4096 + 3)  # a little over 9 MiB
    source = tmp_path / "big"
    source.write_bytes(data)
    target = f"127.0.0.1:{server.grpc_port}"
    assert cli.main(["--server", target, "files", "write", "big", str(source)]) == 0
    capsysbinary.readouterr()
    assert cli.main(["--server", target, "files", "cat", "big"]) == 0
    assert capsysbinary.readouterr().out == data


@pytest.fixture
def guest_ctl(make_server: ServerFactory, capsys: pytest.CaptureFixture[str]) -> Ctl:
    """foliodctl against an 8 GiB host whose free page reporting runs only when asked."""
    return Ctl(make_server(ram=8 * GIB, reporting_delay_seconds=3600), capsys)


def _cells(line: str) -> list[str]:
    """A table row's cells: columns are two or more spaces apart."""
    return re.split(r"  +", line.strip())


def test_guests_create_show_and_ls(guest_ctl: Ctl) -> None:
    """guests create and show print a guest's settings and its memmap duplication per model;
    ls lists every guest with a total row; --json gives the client's dataclasses."""
    ctl = guest_ctl
    out = ctl("guests", "create", "vm0", "1GiB")
    lines = out.splitlines()
    assert lines[:7] == [
        "name:      vm0",
        "host:      host",
        "RAM:       1073741824 bytes (1 GiB)",
        "backing:   base, faulted in on first use",
        "backed:    0 B in 0 host folios of 4 KiB",
        "balloon:   0 B, 0 B returned to the host",
        "reporting: on, 0 B returned in 0 batches of 0 blocks",
    ]
    assert lines[8] == "memory map, described twice:"
    assert _cells(lines[9]) == ["model", "guest", "host", "total", "percent of guest RAM"]
    rows = {cells[0]: cells[1:] for cells in map(_cells, lines[10:])}
    assert rows == {
        "struct_page": ["16 MiB", "16 MiB", "32 MiB", "3.1250 %"],
        "interim": ["8 MiB", "8 MiB", "16 MiB", "1.5625 %"],
        "memdesc": ["2 MiB", "2 MiB", "4 MiB", "0.3906 %"],
    }
    huge = ctl.json(
        "guests", "create", "vm1", "1GiB", "--backing", "hugetlb_2m", "--hvo",
        "--no-free-page-reporting",
    )  # fmt: skip
    assert (huge["backing"], huge["hvo"], huge["free_page_reporting"]) == (
        "hugetlb_2m",
        True,
        False,
    )
    assert (huge["backed_bytes"], huge["host_folios"], huge["host_folio_order"]) == (GIB, 512, 9)
    assert huge["duplication"][0] == {
        "model": "struct_page",
        "guest_memmap_bytes": 16 * MIB,
        "host_memmap_bytes": 2 * MIB,
        "total_bytes": 18 * MIB,
        "fraction_of_guest_ram": 18 / 1024,
    }
    ctl("guests", "create", "vm2", "64MiB", "--backing", "mthp", "--mthp-size-kb", "64")

    show = ctl("guests", "show", "vm1").splitlines()
    assert show[3] == "backing:   hugetlb_2m hvo, reserved up front"
    assert show[4] == "backed:    1 GiB in 512 host folios of 2 MiB"
    assert show[6] == "reporting: off"
    assert _cells(show[10]) == ["struct_page", "16 MiB", "2 MiB", "18 MiB", "1.7578 %"]
    assert ctl.json("guests", "show", "vm1") == huge

    lines = ctl("guests", "ls").splitlines()
    assert lines[0].split() == [
        "name", "RAM", "backing", "backed", "balloon", "struct_page", "interim", "memdesc",
    ]  # fmt: skip
    rows = {cells[0]: cells[1:] for cells in map(_cells, lines[1:])}
    assert rows["vm0"] == ["1 GiB", "base", "0 B", "0 B", "3.1250 %", "1.5625 %", "0.3906 %"]
    assert rows["vm1"][:4] == ["1 GiB", "hugetlb_2m hvo", "1 GiB", "0 B"]
    assert rows["vm2"][:2] == ["64 MiB", "mthp 64 KiB"]
    assert rows["total"][:3] == ["2.06 GiB", "1 GiB", "0 B"]
    assert list(rows) == ["vm0", "vm1", "vm2", "total"]
    listing = ctl.json("guests", "ls")
    assert [g["name"] for g in listing["guests"]] == ["vm0", "vm1", "vm2"]
    assert [t["model"] for t in listing["totals"]] == ["struct_page", "interim", "memdesc"]

    # The host's memmap shows what HVO freed: 7 of 8 memmap pages per 2 MiB page (struct_page),
    # 3 of 4 (interim), none under memdesc (one page of 8-byte entries).
    memmap = ctl("memmap").splitlines()
    hvo = next(_cells(line) for line in memmap if line.strip().startswith("hvo freed"))
    assert hvo == ["hvo freed", "-14 MiB", "-6 MiB", "0 B"]
    assert [m["hvo_freed_bytes"] for m in ctl.json("memmap")["models"]] == [14 * MIB, 6 * MIB, 0]


def test_guests_balloon_report_and_destroy(guest_ctl: Ctl) -> None:
    """guests balloon and report say what moved; balloon pages show as a folio kind in the
    guest; destroy says what the host got back."""
    ctl = guest_ctl
    ctl("guests", "create", "vm0", "1GiB")
    ctl("--machine", "vm0", "alloc", "app", "anon", "--size", "64MiB")
    assert ctl("guests", "balloon", "vm0", "32MiB") == (
        "balloon of vm0: 32 MiB (inflated 32 MiB, deflated 0 B), host freed 0 B\n"
    )
    lines = ctl("folios", "--machine", "vm0").splitlines()
    assert lines[0].split()[-2:] == ["balloon", "total"]
    order0 = lines[1].split()
    assert order0[:3] == ["0", "4", "KiB"] and order0[-2] == "8192"
    assert ctl.json("guests", "show", "vm0")["balloon_bytes"] == 32 * MIB
    deflated = ctl.json("guests", "balloon", "vm0", "0")
    assert (deflated["deflated_bytes"], deflated["balloon_bytes"]) == (32 * MIB, 0)
    assert deflated["guest"]["balloon_bytes"] == 0

    ctl("release", "app", "--machine", "vm0")
    out = ctl("guests", "report", "vm0")
    assert re.fullmatch(
        r"reported \d+ free blocks of vm0 in 1 batches, host freed 64\.\d+ MiB\n", out
    )
    again = ctl.json("guests", "report", "vm0")
    assert (again["batches"], again["blocks"], again["host_freed_bytes"]) == (0, 0, 0)
    assert again["guest"]["reported_bytes"] >= 64 * MIB

    ctl("guests", "create", "vm1", "2MiB", "--backing", "hugetlb_2m")
    assert ctl("guests", "destroy", "vm1") == (
        "destroyed vm1: 2 MiB of host memory freed, files kept\n"
    )
    destroyed = ctl.json("guests", "destroy", "vm0", "--delete-files")
    assert (destroyed["name"], destroyed["files_deleted"]) == ("vm0", True)
    assert destroyed["freed_bytes"] < MIB  # all its RAM went back through reporting
    assert ctl("guests", "ls").splitlines() == [
        "name  RAM  backing  backed  balloon  struct_page  interim  memdesc"
    ]


@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        (["guests", "show", "nope"], 4, "NOT_FOUND (UNKNOWN_GUEST): no guest named 'nope'"),
        (["guests", "destroy", "nope"], 4, "NOT_FOUND (UNKNOWN_GUEST)"),
        (["guests", "balloon", "nope", "4KiB"], 4, "NOT_FOUND (UNKNOWN_GUEST)"),
        (["guests", "report", "nope"], 4, "NOT_FOUND (UNKNOWN_GUEST)"),
        (["guests", "create", "inner", "1MiB", "--machine", "vm0"], 5, "(GUEST_NESTING)"),
        (["guests", "create", "vm0", "1MiB"], 5, "ALREADY_EXISTS"),
        (["guests", "create", "x", "1MiB", "--hvo"], 3, "[field hvo]"),
        (["guests", "create", "x", "1MiB", "--backing", "mthp"], 3, "[field mthp_size_kb]"),
        (["guests", "balloon", "vm0", "2MiB"], 3, "[field size_bytes]"),
        (["guests", "create", "x", "16GiB"], 6, "RESOURCE_EXHAUSTED (OUT_OF_MEMORY)"),
    ],
)
def test_guest_errors_exit_with_their_class(
    guest_ctl: Ctl, argv: list[str], code: int, message: str
) -> None:
    """A failed guest command exits with its status class's code and says why on stderr."""
    guest_ctl("guests", "create", "vm0", "1MiB")
    assert guest_ctl(*argv, code=code) == ""
    assert guest_ctl.err.startswith("foliodctl: ") and message in guest_ctl.err


def test_guest_error_as_json(guest_ctl: Ctl) -> None:
    """With --json an unknown guest is a JSON error on stderr with its reason."""
    guest_ctl("guests", "show", "nope", "--json", code=4)
    error = json.loads(guest_ctl.err)["error"]
    assert (error["code"], error["reason"]) == ("NOT_FOUND", "UNKNOWN_GUEST")


def test_alloc_free_release(ctl: Ctl) -> None:
    """alloc prints the handles, free takes ranges, release frees an owner."""
    out = ctl("alloc", "cache", "file", "--order", "2", "--count", "4")
    assert out == (
        "allocated 4 folios, handles 1-4: 16 pages (64 KiB), order:folios 2:4, 0 page-table pages\n"
    )
    data = ctl.json("alloc", "app", "anon", "--size", "2MiB")
    assert data["first_handle"] == 5 and data["folios_by_order"] == {"9": 1}
    assert ctl("free", "1-2,4") == "freed 3 folios: 12 pages (48 KiB), 0 of them page tables\n"
    assert ctl.json("free", "3") == {"nr_pages": 4, "nr_pagetable_pages": 0}
    out = ctl("release", "app")
    assert out.startswith("released app: 5 folios, 516 pages (2.02 MiB)")


def test_reclaim_drop_caches_and_health(ctl: Ctl, server: FoliodServer) -> None:
    """reclaim and drop-caches report bytes; health exits 0 only when SERVING."""
    ctl("files", "write", "f", "/dev/null")
    assert ctl("reclaim", "1MiB") == "reclaimed 0 B of 1 MiB asked\n"
    assert ctl.json("reclaim", "4096") == {"asked_bytes": 4096, "reclaimed_bytes": 0}
    assert ctl("drop-caches") == "dropped 0 B of clean page cache\n"
    assert ctl.json("drop-caches") == {"dropped_bytes": 0}
    assert ctl("health") == "SERVING\n"
    assert ctl.json("health", "--service", "foliod.v1.Foliod")["status"] == "SERVING"
    server.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    assert ctl("health", code=8) == "NOT_SERVING\n"
    ctl("health", "--service", "nope", code=4)


@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        (["alloc", "x", "file", "--order", "12", "--count", "1"], 3, "INVALID_ARGUMENT: order 12"),
        (["files", "cat", "missing"], 4, "NOT_FOUND (UNKNOWN_FILE)"),
        (["--machine", "guest0", "meminfo"], 4, "NOT_FOUND (UNKNOWN_MACHINE)"),
        (["free", "99"], 4, "NOT_FOUND (UNKNOWN_FOLIO)"),
        (["alloc", "big", "anon", "--order", "9", "--count", "127"], 6, "RESOURCE_EXHAUSTED"),
        (["files", "write", "x", "/nonexistent/file"], 1, "No such file"),
        (["--tls-ca", "/nonexistent.pem", "meminfo"], 1, "No such file"),
    ],
)
def test_errors_exit_with_their_class(ctl: Ctl, argv: list[str], code: int, message: str) -> None:
    """A failed call exits with the code of its status class and says why on stderr."""
    assert ctl(*argv, code=code) == ""
    assert ctl.err.startswith("foliodctl: ") and message in ctl.err


def test_state_conflicts_exit_5(ctl: Ctl) -> None:
    """A double free (FAILED_PRECONDITION) exits 5; --json puts the error on stderr as JSON."""
    ctl("alloc", "a", "slab", "--count", "1")
    ctl("free", "1")
    ctl("free", "1", "--json", code=5)
    error = json.loads(ctl.err)["error"]
    assert error["code"] == "FAILED_PRECONDITION" and error["reason"] == "FOLIO_ALREADY_FREED"
    assert error["metadata"]["grpc_code"] == "FAILED_PRECONDITION"


def test_fsync_writeback_error_exits_7(ctl: Ctl, tmp_path: Path) -> None:
    """files fsync of a file whose writeback fails (an injected EIO) exits 7, data loss."""
    with FoliodClient(ctl.server) as client:
        client.set_faults([FaultRule(errno="EIO", name="f")])
    (tmp_path / "data").write_bytes(b"doomed")
    ctl("files", "write", "f", str(tmp_path / "data"))
    ctl("files", "fsync", "f", code=7)
    assert ctl.err.startswith("foliodctl: DATA_LOSS (WRITEBACK_FAILED): ")


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["bogus"],
        ["alloc", "x", "file"],
        ["alloc", "x", "nope", "--count", "1"],
        ["reclaim", "12XB"],
        ["free", "1-x"],
        ["files"],
        ["guests"],
        ["guests", "create", "x"],
        ["guests", "create", "x", "1GiB", "--backing", "bogus"],
        ["guests", "balloon", "x", "lots"],
    ],
)
def test_usage_errors_exit_2(ctl: Ctl, argv: list[str]) -> None:
    """A wrong command line exits 2 with argparse's message, before any call."""
    ctl(*argv, code=2)
    assert "usage: foliodctl" in ctl.err


def test_unreachable_server_exits_8(capsys: pytest.CaptureFixture[str]) -> None:
    """No server at the address: exit 8 (unavailable)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    assert cli.main(["--server", f"127.0.0.1:{port}", "--timeout", "2", "meminfo"]) == 8
    assert "UNAVAILABLE" in capsys.readouterr().err


def test_deadline_exits_9_and_token_is_sent(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stalled server: exit 9 at --timeout; --token and FOLIODCTL_TOKEN reach the server."""
    with fake_server() as (target, fake):
        assert cli.main(["--server", target, "--timeout", "0.2", "folios"]) == 9
        assert "DEADLINE_EXCEEDED" in capsys.readouterr().err
        assert cli.main(["meminfo", "--server", target, "--token", "abc"]) == 0
        monkeypatch.setenv("FOLIODCTL_TOKEN", "from-env")
        monkeypatch.setenv("FOLIODCTL_SERVER", target)
        assert cli.main(["meminfo"]) == 0
    assert [m.get("authorization") for m in fake.metadata] == ["Bearer abc", "Bearer from-env"]
    assert capsys.readouterr().out.startswith("MemTotal:          65536 kB\n")


def test_global_options_work_after_the_subcommand(ctl: Ctl) -> None:
    """--json and --machine are accepted before or after the subcommand."""
    assert json.loads(ctl("meminfo", "--json"))["mem_total_bytes"] == 256 * MIB
    ctl("meminfo", "--machine", "nope", code=4)


def test_installed_entry_point(server: FoliodServer) -> None:
    """The `foliodctl` console script runs and exits with the documented codes."""
    exe = Path(sys.executable).parent / "foliodctl"
    target = f"127.0.0.1:{server.grpc_port}"
    done = subprocess.run(
        [str(exe), "--server", target, "buddyinfo"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("Node 0, zone   Normal ")
    done = subprocess.run(
        [str(exe), "--server", target, "files", "stat", "x"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 4 and "UNKNOWN_FILE" in done.stderr


def test_the_docs_exit_code_table_is_the_codes() -> None:
    """The exit code table in the docs (docs/cli.md, and any other in README.md or docs/) is
    the one foliodctl exits by, as render_markdown() prints it; --help and the module docstring
    print it too."""
    root = Path(__file__).resolve().parent.parent
    header = "| code | meaning | from |\n"
    found = []
    for path in [root / "README.md", *sorted((root / "docs").rglob("*.md"))]:
        text = path.read_text()
        for match in re.finditer(re.escape(header) + r"(?:\|.*\n)+", text):
            found.append((path.relative_to(root), match.group()))
    expected = _exit_codes.render_markdown()
    assert found and all(table == expected for _, table in found), found
    assert _exit_codes.render_text(indent="  ") in cli.build_parser().format_help()
    assert cli.__doc__ and cli.__doc__.endswith(_exit_codes.render_text(indent="    "))
