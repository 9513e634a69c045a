"""foliod-load: the histogram, the open-loop schedule, every workload and trace format against a
live in-process server, the reports, and the errors bad input gives."""

from __future__ import annotations

import gzip
import io
import json
import math
import random
import re
from pathlib import Path
from typing import Any

import grpc
import pytest

from foliod.mm.backing_dev import DEVICE_PROFILES
from foliod.server import FoliodServer
from foliodclient import FoliodClient
from foliodclient.errors import CallError, InvalidArgument
from foliodclient.load import replay as rpc_replay
from foliodclient.load.cli import main
from foliodclient.load.histogram import PRECISION_BITS, Histogram, bucket_bounds, bucket_index
from foliodclient.load.progress import Progress
from foliodclient.load.runner import Recorder, Schedule, run_worker
from foliodclient.load.traces import TraceError, load_trace, split, write_oracle
from foliodclient.load.workloads import (
    WORKLOADS,
    GeneratorStream,
    Op,
    OpKind,
    Outcome,
    teardown_options,
)
from tests.conftest import ServerFactory
from tests.test_replay_rpc import REFERENCES

SMALL = ["--file-size", "256KiB", "--files", "2", "--interval", "0.1", "--no-progress"]


@pytest.fixture
def server(make_server: ServerFactory) -> FoliodServer:
    return make_server()


def load(
    server: FoliodServer, capsys: pytest.CaptureFixture[str], *argv: str, code: int = 0
) -> dict[str, Any]:
    """Runs foliod-load in process against `server` with --json; returns the parsed report."""
    rc = main([*argv, "--server", f"127.0.0.1:{server.grpc_port}", "--json", *SMALL])
    out, err = capsys.readouterr()
    assert rc == code, err
    data: dict[str, Any] = json.loads(out)
    return data


def exact_percentile(values: list[int], percent: float) -> int:
    ordered = sorted(values)
    return ordered[max(1, math.ceil(percent / 100 * len(ordered))) - 1]


# The histogram.


def test_histogram_percentiles_within_bucket_error() -> None:
    """Percentiles are never below the exact nearest-rank value and at most one bucket above."""
    rng = random.Random(7)
    values = [int(rng.lognormvariate(13, 1.5)) for _ in range(20_000)] + [0, 1, 255, 256]
    hist = Histogram()
    for value in values:
        hist.record(value)
    assert hist.count == len(values)
    assert hist.max == max(values) and hist.min == min(values)
    for percent in (1, 50, 90, 99, 99.9, 100):
        exact = exact_percentile(values, percent)
        got = hist.percentile(percent)
        assert exact <= got <= exact + max(exact >> PRECISION_BITS, 0) + 1, (percent, exact, got)


def test_histogram_buckets_are_contiguous_and_fixed() -> None:
    """Every value lands in a bucket whose bounds contain it; memory does not grow with samples."""
    for value in [*range(600), 2**20 - 1, 2**20, 2**33 + 12345, 2**40 - 1]:
        low, high = bucket_bounds(bucket_index(value))
        assert low <= value <= high
        assert high - low <= max(low >> PRECISION_BITS, 0)
    hist = Histogram()
    size = len(hist.counts)
    for value in range(0, 10**9, 99_991):
        hist.record(value)
    assert len(hist.counts) == size
    other = Histogram()
    other.record(5, count=3)
    hist.merge(other)
    assert hist.min == 0 and hist.count == 10**9 // 99_991 + 1 + 3


# The schedule and the worker loop.


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_open_loop_schedule_hands_out_intended_times() -> None:
    """Open loop: slot i is due at start + i / rate however late the workers claim it."""
    clock = FakeClock()
    schedule = Schedule(rate=100.0, ops=5, warmup_seconds=0.02, clock=clock)
    schedule.start()
    clock.now = 1.0  # the workers are a second late: the slots stay where they were due
    slots = [schedule.claim() for _ in range(8)]
    intended = [round(s.intended, 6) for s in slots if s is not None]
    assert intended == [0.0, 0.01, 0.02, 0.03, 0.04, 0.05, 0.06]
    assert [s.measured for s in slots if s is not None] == [
        False,
        False,
        True,
        True,
        True,
        True,
        True,
    ]
    assert slots[-1] is None and schedule.claim() is None


def test_schedule_duration_and_closed_loop() -> None:
    """Closed loop: due now; a duration ends the run measure_from + duration seconds in."""
    clock = FakeClock()
    schedule = Schedule(duration_seconds=1.0, clock=clock)
    schedule.start()
    clock.now = 0.5
    slot = schedule.claim()
    assert slot is not None and slot.intended == 0.5 and slot.measured
    clock.now = 1.0
    assert schedule.claim() is None
    assert schedule.remaining_seconds(0.25, 0) == 0.75


def test_open_loop_latency_counts_the_queueing_a_stall_causes() -> None:
    """A 0.5 s stall at 10 ops/s: the ops due during it are charged their wait (no coordinated
    omission), where a closed loop would record one slow op and four fast ones."""
    clock = FakeClock()
    schedule = Schedule(rate=10.0, ops=5, clock=clock)
    recorder = Recorder(DEVICE_PROFILES["nvme"])
    calls = 0

    def execute(ops: Any) -> list[Outcome]:
        nonlocal calls
        calls += 1
        clock.now += 0.5 if calls == 1 else 0.01
        return [Outcome() for _ in ops]

    stream = GeneratorStream(iter([Op(OpKind.READ, "f", 0, 4096)] * 5))
    schedule.start()
    run_worker(stream, schedule, recorder, execute, sleep=clock.sleep)
    # Due at 0, .1, .2, .3, .4; sent at 0, .5, .51, .52, .53; done 10 ms later.
    assert recorder.ops == 5
    expected_ns = [0.5e9, 0.41e9, 0.32e9, 0.23e9, 0.14e9]
    assert recorder.histogram.max == pytest.approx(0.5e9, rel=1e-6)
    assert recorder.histogram.percentile(50) == pytest.approx(sorted(expected_ns)[2], rel=0.01)


def test_progress_quiet_off_a_terminal_and_drawn_on_one() -> None:
    """The progress line goes to a terminal only, and carries ops, rate, errors and times."""
    quiet = io.StringIO()
    progress = Progress(quiet)
    progress.update(ops=10, errors=0, elapsed_seconds=1.0, remaining_seconds=1.0)
    progress.close()
    assert quiet.getvalue() == ""
    shown = io.StringIO()
    progress = Progress(shown, enabled=True, every_seconds=0)
    progress.update(ops=1500, errors=2, elapsed_seconds=3.0, remaining_seconds=7.0)
    progress.close()
    line = shown.getvalue()
    assert line.startswith("\r[######--------------] 1,500 ops  500 ops/s  2 errors")
    assert "elapsed 0:03  remaining 0:07" in line and line.endswith("\n")


# Workloads against a live server.


WORKLOAD_ARGS = {
    "seq-read": ["--ops", "120"],
    "seq-write": ["--ops", "120", "--fsync-every", "16"],
    "rand-read": ["--ops", "120", "--zipf-alpha", "1.2"],
    "rand-write": ["--ops", "120"],
    "mixed": ["--ops", "120", "--read-ratio", "0.5", "--engine", "asyncio"],
    "small-files": ["--ops", "120", "--small-file-size", "8KiB"],
    "alloc-churn": ["--ops", "150", "--churn-size", "8MiB"],
    "multi-guest": ["--ops", "120", "--guests", "2", "--guest-ram", "32MiB"],
}


@pytest.mark.parametrize("workload", sorted(WORKLOAD_ARGS))
def test_workload_runs_and_reports(
    server: FoliodServer, capsys: pytest.CaptureFixture[str], workload: str
) -> None:
    """Each workload runs its operations without errors, reports them, and cleans up."""
    data = load(server, capsys, workload, "-c", "2", *WORKLOAD_ARGS[workload])
    ops = int(WORKLOAD_ARGS[workload][1])
    assert data["workload"] == workload
    assert data["ops"] == ops == sum(data["ops_by_kind"].values())
    assert data["errors"] == 0 and data["errors_by_code"] == {}
    assert data["throughput_ops_per_second"] > 0
    lat = data["latency_seconds"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["p99.9"] <= lat["max"]
    assert set(data["memmap"]["before"]) == {"struct_page", "interim", "memdesc"}
    assert data["timeline"] and data["timeline"][-1]["memmap_bytes"]
    with FoliodClient(f"127.0.0.1:{server.grpc_port}") as client:
        assert client.list_files() == ()
        assert client.list_guests().guests == ()
    if workload in {"seq-read", "rand-read", "mixed", "multi-guest"}:
        assert data["bytes_read"] > 0
        assert data["cache"]["pages_missed"] > 0
        saved = data["cache"]["device_seconds_saved"]
        assert saved == pytest.approx(
            data["cache"]["read_device_seconds_all_miss"] - data["cache"]["read_device_seconds"]
        )
    if workload == "alloc-churn":
        assert data["buddyinfo"]["before"] != data["buddyinfo"]["after"]
        assert set(data["ops_by_kind"]) == {"allocate", "free"}
    if workload == "seq-write":
        assert data["ops_by_kind"]["fsync"] > 0


def test_zipf_reads_hit_more_than_uniform(
    server: FoliodServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """A skewed key distribution hits the cache more than a uniform one, same seed and size."""
    args = ("rand-read", "-c", "1", "--ops", "300", "--seed", "3")
    uniform = load(server, capsys, *args)
    zipf = load(server, capsys, *args, "--zipf-alpha", "1.3")
    assert zipf["cache"]["read_hit_ratio"] > uniform["cache"]["read_hit_ratio"]


def test_open_loop_rate_paces_the_run(
    server: FoliodServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """--rate 200 --ops 60 takes about 0.3 s and runs at about 200 ops/s."""
    data = load(server, capsys, "rand-read", "--rate", "200", "--ops", "60", "-c", "2")
    assert data["ops"] == 60 and data["config"]["rate"] == 200
    assert 0.25 <= data["elapsed_seconds"] < 2.0
    assert data["throughput_ops_per_second"] < 240


def test_warmup_and_duration(server: FoliodServer, capsys: pytest.CaptureFixture[str]) -> None:
    """Warm-up ops are run but not measured; --duration bounds the measured part."""
    data = load(server, capsys, "rand-read", "--warmup", "0.2", "--duration", "0.4", "-c", "1")
    assert data["warmup_ops"] > 0 and data["ops"] > 0
    assert data["elapsed_seconds"] < 1.0
    assert any(s["warmup"] for s in data["timeline"])


def test_failed_operations_counted_by_code(
    server: FoliodServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """Failed operations are counted by status code and the exit code says some failed."""
    data = load(server, capsys, "alloc-churn", "--ops", "40", "--alloc-kind", "hugetlb", code=1)
    assert data["errors"] > 0
    assert set(data["errors_by_code"]) == {"INVALID_ARGUMENT"}


# Batched submission.


@pytest.mark.parametrize("workload", ["seq-read", "rand-write", "small-files", "alloc-churn"])
def test_batched_mode(
    server: FoliodServer, capsys: pytest.CaptureFixture[str], workload: str
) -> None:
    """--mode batched sends the same ops in batches (create/delete unary in between)."""
    data = load(
        server,
        capsys,
        workload,
        "--mode",
        "batched",
        "--batch-size",
        "8",
        "--ops",
        "160",
        "-c",
        "2",
    )
    assert data["ops"] == 160 and data["errors"] == 0
    assert data["config"]["mode"] == "batched" and data["config"]["batch_size"] == 8


def test_batched_multi_guest_splits_by_machine(
    server: FoliodServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """Batched ops for different guests go on one submission stream per guest."""
    data = load(
        server, capsys, "multi-guest", "--mode", "batched", "--ops", "96", "--guest-ram", "32MiB"
    )
    assert data["ops"] == 96 and data["errors"] == 0 and data["bytes_read"] > 0


# Traces.


def test_replay_text_trace(
    server: FoliodServer, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Page keys map to 4 KiB reads over files of --file-size; a repeated key hits."""
    trace = tmp_path / "keys.txt"
    trace.write_text("# page keys\n0\n100\n\n0\n64\n100\n")
    data = load(server, capsys, "replay", "--trace", str(trace), "-c", "1")
    assert data["ops"] == 5 and data["ops_by_kind"] == {"read": 5}
    assert data["bytes_read"] == 5 * 4096
    assert data["cache"]["pages_hit"] >= 2
    assert data["config"]["trace_format"] == "text" and data["config"]["trace_requests"] == 5


@pytest.mark.parametrize(
    "case",
    [
        ("R,0,4096\nW,8,8192\nr,16,4096\n", 2, 1, 8192),
        ("op,sector,size\nR,0,4096\nwrite,100,512\n", 1, 1, 512),
        ("time,size,offset,type\n1,4096,0,R\n2,4096,262140,W\n", 1, 2, 4096),
    ],
    ids=["headerless", "header", "reordered-bytes"],
)
def test_replay_csv_trace(
    server: FoliodServer,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    case: tuple[str, int, int, int],
) -> None:
    """CSV block traces, with and without a header; a request across a file's end is split."""
    text, reads, writes, written = case
    trace = tmp_path / "blocks.csv"
    trace.write_text(text)
    data = load(server, capsys, "replay", "--trace", str(trace), "-c", "1")
    assert data["ops_by_kind"] == {"read": reads, "write": writes}
    assert data["bytes_written"] == written and data["errors"] == 0


def test_replay_oracle_general_trace(
    server: FoliodServer, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """oracleGeneral objects are a page each, or with --trace-object-size bytes placed once,
    page aligned over their size; size-0 requests are skipped; a re-read object hits."""
    trace = tmp_path / "w.oracleGeneral"
    write_oracle(trace, [(1, 7, 10000, 3), (2, 9, 100, -1), (3, 7, 10000, -1), (4, 5, 0, -1)])
    loaded = load_trace(trace)
    assert list(loaded.addresses) == [0, 4096, 0] and set(loaded.sizes) == {4096}
    assert loaded.skipped == 1
    assert list(load_trace(trace, object_size="bytes").addresses) == [0, 12288, 0]
    data = load(server, capsys, "replay", "--trace", str(trace), "-c", "1")
    assert data["ops"] == 3 and data["bytes_read"] == 3 * 4096
    assert data["cache"]["pages_hit"] >= 1
    data = load(
        server, capsys, "replay", "--trace", str(trace), "--trace-object-size", "bytes", "-c", "1"
    )
    assert data["ops"] == 3 and data["bytes_read"] == 10000 + 100 + 10000
    assert data["cache"]["pages_hit"] >= 3


def test_split_at_file_ends_and_io_limit() -> None:
    """A request is cut where a file ends and where it exceeds the largest I/O."""
    assert list(split(1000, 5000, 4096, 1 << 20)) == [(0, 1000, 3096), (1, 0, 1904)]
    assert list(split(0, 10, 100, 4)) == [(0, 0, 4), (0, 4, 4), (0, 8, 2)]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("bad.txt", "1\n2\nthree\n", "bad.txt:3: not a page key"),
        ("neg.txt", "-5\n", "neg.txt:1: not a page key"),
        ("bad.csv", "R,0,4096\nX,8,4096\n", "bad.csv:2: column 1 (op) must be R or W"),
        ("short.csv", "R,0\n", "short.csv:1: expected op,sector,size"),
        ("nosize.csv", "op,lba,when\nR,0,1\n", "the header has no size column"),
        ("bad.bin", b"\x00" * 30, "bad.bin: record 2 (byte 24) is truncated: 6 of 24 bytes"),
        ("empty.txt", "# nothing\n", "the trace has no requests"),
        ("trace.xyz", "1\n", "cannot tell the trace format"),
    ],
)
def test_malformed_traces_fail_clearly(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    name: str,
    content: str | bytes,
    message: str,
) -> None:
    """A malformed trace exits 3, naming the file, the line and what is wrong, before any RPC."""
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    with pytest.raises(TraceError, match=re.escape(message.split(": ", 1)[-1])):
        load_trace(path)
    rc = main(["replay", "--trace", str(path), "--server", "127.0.0.1:1", "--no-progress"])
    assert rc == 3
    assert message in capsys.readouterr().err


# Replay through the Replay RPC, and the formats as traces ship.


def cloudphysics_like(path: Path, seed: int = 15, n: int = 1500) -> list[int]:
    """Writes a gzipped CSV in libCacheSim's cloudPhysicsIO layout (version,time,op,size,lbn;
    SCSI READ(10) opcodes, starts in 512-byte sectors, requests of 1 to 8 pages, some
    unaligned) and returns the pages its reads touch, in order."""
    rng = random.Random(seed)
    rows = ["version,time,op,size,lbn"]
    pages: list[int] = []
    for i in range(n):
        sector = rng.choice([rng.randrange(48) * 8, rng.randrange(4096) + rng.randrange(2) * 4])
        size = rng.choice([4096, 4096, 8192, 16384, 32768, 1024])
        rows.append(f"1,{1000 + i},28,{size},{sector}")
        start = sector * 512
        pages.extend(range(start // 4096, (start + size - 1) // 4096 + 1))
    with gzip.open(path, "wt") as stream:
        stream.write("\n".join(rows) + "\n")
    return pages


@pytest.mark.parametrize("policy", sorted(REFERENCES))
def test_replay_with_c4_gets_the_exact_textbook_misses(
    make_server: ServerFactory, capsys: pytest.CaptureFixture[str], tmp_path: Path, policy: str
) -> None:
    """A block trace as shipped (.csv.gz, lbn, SCSI opcodes) replayed with -c 4 keeps its
    order: the misses are the reference LRU/FIFO/CLOCK's, page for page, over many files."""
    trace = tmp_path / "cloudPhysicsIO.csv.gz"
    pages = cloudphysics_like(trace)
    capacity = 64
    server = make_server(
        reclaim_policy=policy,
        cache_capacity=capacity * 4096,
        ra_kb=0,
        max_file_order=0,
        debug_checks=False,
    )
    data = load(server, capsys, "replay", "--trace", str(trace), "-c", "4")
    cache = data["cache"]
    assert cache["pages_missed"] == REFERENCES[policy](pages, capacity)
    assert cache["pages_hit"] + cache["pages_missed"] == len(pages) == data["accesses"]
    assert data["accesses_per_second"] > 0
    assert cache["pages_readahead"] == 0 and data["errors"] == 0
    assert data["config"]["mode"] == "rpc" and data["config"]["concurrency"] == 1
    assert data["timeline"] and sum(s["ops"] for s in data["timeline"]) == data["ops"]
    assert set(data["timeline"][-1]["memmap_bytes"]) == {"struct_page", "interim", "memdesc"}


def test_replay_in_several_calls_and_a_failed_call(
    server: FoliodServer,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A trace goes in calls of at most CALL_ACCESSES; a call that fails ends the run with the
    report of the calls before it, the failed call named and its status's exit code."""
    trace = tmp_path / "keys.txt"
    trace.write_text("".join(f"{k % 50}\n" for k in range(100)))
    monkeypatch.setattr(rpc_replay, "CALL_ACCESSES", 30)
    data = load(server, capsys, "replay", "--trace", str(trace))
    cache = data["cache"]
    assert data["ops"] == 100 and cache["pages_hit"] + cache["pages_missed"] == 100
    assert cache["pages_hit"] >= 50  # the second lap at least (readahead is on)

    real = FoliodClient.replay
    sent: list[int] = []

    def replay(self: FoliodClient, *args: Any, **kwargs: Any) -> Any:
        sent.append(1)
        if len(sent) == 2:
            raise CallError("the deadline passed", code=grpc.StatusCode.DEADLINE_EXCEEDED)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(FoliodClient, "replay", replay)
    data = load(server, capsys, "replay", "--trace", str(trace), code=9)
    assert data["ops"] == 30
    assert data["failures"] == [
        {
            "stage": "Replay call 2 of 4 (operations 30..)",
            "code": "DEADLINE_EXCEEDED",
            "message": "the deadline passed",
        }
    ]


@pytest.mark.parametrize(
    "argv",
    [
        ["--mode", "unary", "-c", "4"],
        ["--rate", "10"],
        ["--duration", "1"],
        ["--engine", "asyncio"],
    ],
)
def test_replay_usage_errors(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, argv: list[str]
) -> None:
    """What would reorder or pace a Replay-RPC trace is refused before any RPC."""
    trace = tmp_path / "keys.txt"
    trace.write_text("1\n")
    with pytest.raises(SystemExit) as exited:
        main(["replay", "--trace", str(trace), "--server", "127.0.0.1:1", *argv])
    assert exited.value.code == 2
    assert "foliod-load: error:" in capsys.readouterr().err


def test_big_batches_are_split_to_the_server_limits(
    server: FoliodServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """--batch-size beyond the 2 MiB batch payload (1024 x 4 KiB reads) or the 4 MiB message
    (256 x 16 KiB writes) is sent as several batches: no operation fails."""
    data = load(
        server, capsys, "rand-read", "--mode", "batched", "--batch-size", "1024", "--ops", "2048"
    )
    assert data["ops"] == 2048 and data["errors"] == 0 and data["cache"]["pages_hit"] > 0
    data = load(
        server,
        capsys,
        "rand-write",
        "--mode",
        "batched",
        "--batch-size",
        "256",
        "--io-size",
        "16KiB",
        "--ops",
        "512",
    )
    assert data["ops"] == 512 and data["errors"] == 0


def test_every_op_failing_is_an_error_not_a_report(
    server: FoliodServer, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run whose every operation failed prints the status and first message, no report."""

    def read_file(self: FoliodClient, *args: Any, **kwargs: Any) -> Any:
        raise InvalidArgument("too long", code=grpc.StatusCode.INVALID_ARGUMENT)

    monkeypatch.setattr(FoliodClient, "read_file", read_file)
    rc = main(["rand-read", "--ops", "20", "--server", f"127.0.0.1:{server.grpc_port}", *SMALL])
    out, err = capsys.readouterr()
    assert rc == 1 and out == ""
    assert "every one of the 20 operations failed (INVALID_ARGUMENT 20)" in err
    assert "the first: INVALID_ARGUMENT: too long" in err


def test_failed_teardown_still_prints_the_report(
    server: FoliodServer, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A teardown that fails leaves the measured report whole and names what failed."""
    workload = WORKLOADS["rand-read"]
    real = workload.teardown

    def teardown(self: Any, client: FoliodClient) -> None:
        real(self, client)
        raise CallError("DeleteFile took too long", code=grpc.StatusCode.DEADLINE_EXCEEDED)

    monkeypatch.setattr(workload, "teardown", teardown)
    rc = main(["rand-read", "--ops", "50", "--server", f"127.0.0.1:{server.grpc_port}", *SMALL])
    out, err = capsys.readouterr()
    assert rc == 9
    assert "operations   50 in" in out
    assert "FAILED       teardown: DEADLINE_EXCEEDED: DeleteFile took too long" in out
    assert "teardown failed: DEADLINE_EXCEEDED" in err


def test_failed_setup_tears_down_and_says_so(
    server: FoliodServer, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A setup that fails is undone and named, with its status's exit code."""
    workload = WORKLOADS["rand-read"]
    real = workload.setup
    torn: list[bool] = []

    def setup(self: Any, client: FoliodClient) -> None:
        real(self, client)
        raise CallError("no room", code=grpc.StatusCode.RESOURCE_EXHAUSTED)

    monkeypatch.setattr(workload, "setup", setup)
    monkeypatch.setattr(workload, "teardown", lambda self, client: torn.append(True))
    rc = main(["rand-read", "--ops", "5", "--server", f"127.0.0.1:{server.grpc_port}", *SMALL])
    assert rc == 6 and torn == [True]
    assert "setup failed: RESOURCE_EXHAUSTED: no room" in capsys.readouterr().err


def test_teardown_deadlines_grow_with_what_they_free() -> None:
    """A call freeing 64 MiB gets the client's deadline plus 64 s; none without a deadline."""
    with FoliodClient("127.0.0.1:1", timeout=10) as client:
        assert teardown_options(client, 64 << 20) == {"timeout": 74.0}
    with FoliodClient("127.0.0.1:1", timeout=None) as client:
        assert teardown_options(client, 64 << 20) == {}


def test_trace_formats_as_they_ship(tmp_path: Path) -> None:
    """gzip for every format, lbn starts in sectors, SCSI opcodes 28/2a/88/8a and 0x-prefixed."""
    csv_gz = tmp_path / "t.csv.gz"
    with gzip.open(csv_gz, "wt") as stream:
        stream.write("version,time,op,size,lbn\n1,5,28,4096,8\n1,6,2a,512,0\n1,7,0x88,8,16\n")
        stream.write("1,8,8A,4096,24\n")
    trace = load_trace(csv_gz)
    assert trace.format == "csv"
    assert list(trace.writes) == [0, 1, 0, 1]
    assert list(trace.addresses) == [4096, 0, 8192, 12288]
    keys = tmp_path / "k.txt.gz"
    with gzip.open(keys, "wt") as stream:
        stream.write("3\n4\n")
    assert list(load_trace(keys).addresses) == [3 * 4096, 4 * 4096]
    oracle = tmp_path / "w.oracleGeneral"
    write_oracle(oracle, [(1, 7, 10000, 3), (2, 7, 10000, -1)])
    packed = tmp_path / "w.oracleGeneral.gz"
    packed.write_bytes(gzip.compress(oracle.read_bytes()))
    assert list(load_trace(packed).addresses) == [0, 0]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("scsi.csv", "op,lbn,size\n28,0,4096\n35,8,4096\n", "scsi.csv:3: column 1 (op)"),
        ("start.csv", "op,lbn,size\nR,x,4096\n", "start.csv:2: column 2 (start)"),
        ("size.csv", "time,op,lbn,size\n1,R,0,0\n", "size.csv:2: column 4 (size)"),
        ("bad.csv.gz", b"not gzip at all", "bad.csv.gz: Not a gzipped file"),
        ("t.oracleGeneral.zst", b"\x28\xb5\x2f\xfd", "t.oracleGeneral.zst: truncated"),
        ("t.csv.zst", b"R,0,4096\n", "t.csv.zst: not zstd data"),
    ],
)
def test_malformed_shipped_traces_name_line_and_column(
    tmp_path: Path, name: str, content: str | bytes, message: str
) -> None:
    """Each bad row names its line and column; a bad or unsupported compression says so."""
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    with pytest.raises(TraceError) as caught:
        load_trace(path)
    assert message in str(caught.value)


# Reports and usage.


def test_report_directory(
    server: FoliodServer, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """--report writes a self-contained index.html with three SVG plots, and report.json."""
    out = tmp_path / "report"
    data = load(
        server,
        capsys,
        "mixed",
        "--duration",
        "0.5",
        "-c",
        "2",
        "--warmup",
        "0.1",
        "--report",
        str(out),
    )
    page = (out / "index.html").read_text()
    assert page.count("<svg") == 3
    assert "<script" not in page
    assert not re.search(r"""(src|href)=["']?https?:""", page)
    for title in ("Throughput", "Latency", "Memory map"):
        assert title in page
    saved = json.loads((out / "report.json").read_text())
    assert saved["ops"] == data["ops"] > 0 and len(saved["timeline"]) >= 3


def test_text_report(server: FoliodServer, capsys: pytest.CaptureFixture[str]) -> None:
    """Without --json the report is a readable summary with percentiles and the memmap table."""
    rc = main(["rand-read", "--ops", "50", "--server", f"127.0.0.1:{server.grpc_port}", *SMALL])
    out = capsys.readouterr().out
    assert rc == 0
    for text in (
        "throughput",
        "p99.9",
        "hit ratio",
        "saved by the cache",
        "struct_page",
        "buddyinfo",
    ):
        assert text in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["nope"], "invalid choice: 'nope'"),
        (["rand-read", "--read-ratio", "1.5"], "must be within 0..1"),
        (["rand-read", "--trace", "x.txt"], "--trace FILE goes with the replay workload"),
        (["replay"], "--trace FILE goes with the replay workload"),
        (["mixed", "--engine", "asyncio", "--mode", "batched"], "runs on threads"),
        (["rand-read", "--file-size", "lots"], "--file-size"),
    ],
)
def test_usage_errors(capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
    """A wrong command line exits 2 with argparse's message."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_unavailable_server(capsys: pytest.CaptureFixture[str]) -> None:
    """No server: exit 8, as foliodctl."""
    rc = main(["rand-read", "--ops", "1", "--server", "127.0.0.1:1", "--timeout", "1"])
    assert rc == 8
    assert "UNAVAILABLE" in capsys.readouterr().err


def test_every_workload_is_tested() -> None:
    """The registry and the tests agree on the workloads."""
    assert set(WORKLOADS) == {*WORKLOAD_ARGS, "replay"}


def test_the_docs_exit_codes_are_foliod_loads() -> None:
    """docs/load.md's exit code table is LOAD_EXIT_CODES as render_exit_codes_markdown() prints
    it, and --help and the module docstring print the same table as text."""
    from foliodclient.load import cli as load_cli  # noqa: PLC0415

    docs = (Path(__file__).resolve().parent.parent / "docs" / "load.md").read_text()
    assert load_cli.render_exit_codes_markdown() in docs
    assert load_cli.__doc__ and load_cli.__doc__.endswith(
        load_cli.render_exit_codes_text(indent="    ")
    )
    assert load_cli.render_exit_codes_text(indent="  ") in load_cli.parser().format_help()
