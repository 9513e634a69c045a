"""foliod-load: drives a foliod server with a workload or a trace and reports what it saw.

Exit codes (LOAD_EXIT_CODES; --help and docs/load.md print the same table):

"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from foliod.api import DEVICE_PROFILES, parse_size
from foliodclient._client import DEFAULT_TARGET, DEFAULT_TIMEOUT_SECONDS
from foliodclient._exit_codes import EXIT_CODES, EXIT_FAILURE, EXIT_OK
from foliodclient.errors import CallError
from foliodclient.load import report
from foliodclient.load.progress import Progress
from foliodclient.load.replay import run_replay
from foliodclient.load.runner import RunConfig, RunFailed, RunResult, run
from foliodclient.load.traces import (
    EXIT_BAD_TRACE,
    FORMAT_ALIASES,
    FORMATS,
    OBJECT_SIZES,
    TraceError,
    load_trace,
)
from foliodclient.load.workloads import WORKLOADS, Params, Replay

EXIT_OPS_FAILED = 1

# foliod-load's exit codes, and foliod-load mrc's: the module docstring, --help and
# docs/load.md render this table (tests/test_load.py holds the docs to it).
LOAD_EXIT_CODES: tuple[tuple[str, str], ...] = (
    ("0", "the run completed and every operation succeeded"),
    (
        str(EXIT_OPS_FAILED),
        "the run completed but some operations failed (the report counts them by status code; "
        "when every one failed there is no report, only the error), or it could not run (no "
        "matplotlib for --report)",
    ),
    ("2", "usage: the command line is wrong (unknown workload, bad value)"),
    (str(EXIT_BAD_TRACE), "the trace file is malformed or unreadable"),
    (
        "4..",
        "setup, a Replay call or teardown failed on the server: foliodctl's codes (8 "
        "unavailable, 6 out of memory, 9 deadline exceeded, ...); the report of what was "
        "measured is printed first (not when setup failed)",
    ),
)


def render_exit_codes_text(indent: str = "", width: int = 95) -> str:
    """LOAD_EXIT_CODES as plain text: the code, then its meaning wrapped beside it."""
    lines = []
    for code, meaning in LOAD_EXIT_CODES:
        head = f"{indent}{code:<4}"
        wrapped = textwrap.wrap(meaning, width - len(head))
        lines.append(head + wrapped[0])
        lines += [" " * len(head) + line for line in wrapped[1:]]
    return "\n".join(lines) + "\n"


def render_exit_codes_markdown() -> str:
    """LOAD_EXIT_CODES as the docs print it."""
    rows = [f"| {code} | {meaning} |" for code, meaning in LOAD_EXIT_CODES]
    return "\n".join(["| exit | meaning |", "|---|---|", *rows]) + "\n"


__doc__ = f"{__doc__}{render_exit_codes_text(indent='    ')}"
DEFAULT_DURATION_SECONDS = 10.0
DEFAULT_CONCURRENCY = 4
MODES = ("unary", "batched", "rpc")


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _positive(kind: type[int] | type[float]) -> Any:
    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from exc
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
        return value

    return parse


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from exc
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be within 0..1: {text!r}")
    return value


def parser() -> argparse.ArgumentParser:
    workloads = "\n".join(f"  {name:12} {cls.description}" for name, cls in WORKLOADS.items())
    p = argparse.ArgumentParser(
        prog="foliod-load",
        description="Drives a foliod server with a workload or a trace and reports throughput, "
        "latency percentiles, hit ratio, device time and the memory map before and after.",
        epilog=f"workloads:\n{workloads}\n\nmiss-ratio curves: foliod-load mrc --help\n\n"
        f"exit codes:\n{render_exit_codes_text(indent='  ')}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("workload", choices=sorted(WORKLOADS), metavar="WORKLOAD", help="see below")
    conn = p.add_argument_group("server")
    conn.add_argument("--server", default=os.environ.get("FOLIODCTL_SERVER", DEFAULT_TARGET))
    conn.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_SECONDS, help="seconds")
    conn.add_argument("--machine", default="", help="machine to load (default: the host)")
    conn.add_argument("--tls", action="store_true", help="use TLS")
    conn.add_argument("--tls-ca", metavar="PEM", help="root certificate (implies --tls)")
    conn.add_argument("--tls-cert", metavar="PEM", help="client certificate (mutual TLS)")
    conn.add_argument("--tls-key", metavar="PEM", help="client certificate's key")
    conn.add_argument(
        "--token",
        default=os.environ.get("FOLIODCTL_TOKEN"),
        help="auth token, sent as 'authorization: Bearer' (env FOLIODCTL_TOKEN)",
    )
    drive = p.add_argument_group("driving")
    drive.add_argument(
        "--concurrency",
        "-c",
        type=_positive(int),
        help=f"workers (default {DEFAULT_CONCURRENCY}; replay keeps the trace's order on one)",
    )
    drive.add_argument("--engine", choices=("threads", "asyncio"), default="threads")
    drive.add_argument(
        "--mode",
        choices=MODES,
        help="unary RPCs, batches on Submit streams, or (replay only, its default) the trace "
        "in order through Replay RPCs",
    )
    drive.add_argument(
        "--batch-size",
        type=_positive(int),
        default=32,
        help="ops a batch (sent as batches within the server's limits)",
    )
    drive.add_argument("--duration", type=_positive(float), help="seconds (default 10)")
    drive.add_argument("--ops", type=_positive(int), help="operations to measure")
    drive.add_argument("--rate", type=_positive(float), help="open-loop target, ops/s")
    drive.add_argument("--warmup", type=float, default=0.0, help="seconds not measured")
    drive.add_argument("--seed", type=int, default=0)
    shape = p.add_argument_group("workload shape")
    shape.add_argument("--file-size", type=_size, default=16 << 20)
    shape.add_argument("--io-size", type=_size, default=4096)
    shape.add_argument("--files", type=_positive(int), default=4)
    shape.add_argument("--distribution", choices=("uniform", "zipf"), default="uniform")
    shape.add_argument("--zipf-alpha", type=_positive(float), help="implies zipf (default 1.0)")
    shape.add_argument("--read-ratio", type=_ratio, default=0.7)
    shape.add_argument("--fsync-every", type=int, default=0, help="writes between fsyncs")
    shape.add_argument("--small-file-size", type=_size, default=16 << 10)
    shape.add_argument("--alloc-kind", default="slab", help="folio kind for alloc-churn")
    shape.add_argument("--churn-size", type=_size, default=16 << 20, help="live bytes cap")
    shape.add_argument("--guests", type=_positive(int), default=2)
    shape.add_argument("--guest-ram", type=_size, default=64 << 20)
    shape.add_argument("--guest-backing", default="base")
    shape.add_argument("--prefix", default="load", help="names of files, owners and guests")
    trace = p.add_argument_group("trace replay (workload replay)")
    trace.add_argument("--trace", type=Path, help="trace file")
    trace.add_argument(
        "--trace-format",
        choices=[*FORMATS, *FORMAT_ALIASES],
        help="default: from the suffix",
    )
    trace.add_argument("--trace-limit", type=_positive(int), help="requests to read at most")
    trace.add_argument(
        "--trace-object-size",
        choices=OBJECT_SIZES,
        default="page",
        help="oracleGeneral objects: one page each, as libCacheSim's --ignore-obj-size "
        "(default), or their obj_size in whole pages",
    )
    out = p.add_argument_group("output")
    out.add_argument("--json", action="store_true", help="print the report as one JSON object")
    out.add_argument("--report", type=Path, metavar="DIR", help="write DIR/index.html and JSON")
    out.add_argument("--interval", type=_positive(float), default=1.0, help="sample seconds")
    out.add_argument(
        "--device",
        choices=sorted(DEVICE_PROFILES),
        default="nvme",
        help="the server's --device, to price all-miss reads",
    )
    out.add_argument("--no-progress", action="store_true", help="no progress line on a TTY")
    return p


def _fail(message: str, code: int) -> int:
    print(f"foliod-load: {message}", file=sys.stderr)
    return code


def _check_usage(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Settles --mode and --concurrency; p.error (exit 2) on a combination that cannot run."""
    replay = args.workload == "replay"
    if replay != (args.trace is not None):
        p.error("--trace FILE goes with the replay workload, and only with it")
    if args.mode is None:
        args.mode = "rpc" if replay else "unary"
    if replay:
        if args.concurrency not in (None, 1):
            if args.mode != "rpc":
                p.error(
                    f"replay keeps the trace's order: --mode {args.mode} sends it on one "
                    "worker, -c 1 (--mode rpc, the default, takes any -c and ignores it)"
                )
            print(
                f"foliod-load: replay keeps the trace's order: it goes through Replay RPCs "
                f"one after another on one stream; -c {args.concurrency} does not apply",
                file=sys.stderr,
            )
        args.concurrency = 1
    elif args.mode == "rpc":
        p.error("--mode rpc (the Replay RPC) is for the replay workload")
    if args.concurrency is None:
        args.concurrency = DEFAULT_CONCURRENCY
    if args.engine == "asyncio" and args.mode != "unary":
        p.error(f"--mode {args.mode} runs on threads, not --engine asyncio")
    if args.mode == "rpc":
        given = [
            option
            for option, value in (
                ("--rate", args.rate),
                ("--duration", args.duration),
                ("--ops", args.ops),
                ("--warmup", args.warmup or None),
            )
            if value is not None
        ]
        if given:
            p.error(
                f"{', '.join(given)}: --mode rpc replays the whole trace as fast as the server "
                "runs it (--trace-limit shortens it; --mode unary paces operations)"
            )


def _failures(failures: Sequence[tuple[str, CallError]]) -> int:
    """Says what failed; the exit code of the first failure."""
    for stage, exc in failures:
        print(f"foliod-load: {stage} failed: {exc}", file=sys.stderr)
    return EXIT_CODES.get(failures[0][1].code, EXIT_FAILURE)


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["mrc"]:
        from foliodclient.load import mrc  # noqa: PLC0415 -- its own command line

        return mrc.main(argv[1:])
    p = parser()
    args = p.parse_args(argv)
    _check_usage(p, args)
    if args.report is not None and importlib.util.find_spec("matplotlib") is None:
        return _fail("--report needs matplotlib: pip install 'foliod-client[load]'", EXIT_FAILURE)
    loaded = None
    if args.trace is not None:
        try:
            loaded = load_trace(
                args.trace,
                args.trace_format,
                limit=args.trace_limit,
                object_size=args.trace_object_size,
            )
        except TraceError as exc:
            return _fail(str(exc), EXIT_BAD_TRACE)
    duration = args.duration
    if duration is None and args.ops is None and loaded is None:
        duration = DEFAULT_DURATION_SECONDS
    params = Params(
        file_size_bytes=args.file_size,
        io_size_bytes=args.io_size,
        files=args.files,
        distribution="zipf" if args.zipf_alpha is not None else args.distribution,
        zipf_alpha=args.zipf_alpha or 1.0,
        read_ratio=args.read_ratio,
        fsync_every=max(args.fsync_every, 0),
        small_file_bytes=args.small_file_size,
        alloc_kind=args.alloc_kind,
        churn_bytes=args.churn_size,
        guests=args.guests,
        guest_ram_bytes=args.guest_ram,
        guest_backing=args.guest_backing,
        prefix=args.prefix,
        seed=args.seed,
        workers=args.concurrency,
        trace=loaded,
    )
    config = RunConfig(
        target=args.server,
        timeout_seconds=args.timeout or None,
        machine=args.machine,
        concurrency=args.concurrency,
        engine=args.engine,
        mode=args.mode,
        batch_size=args.batch_size,
        rate=args.rate,
        ops=args.ops,
        duration_seconds=duration,
        warmup_seconds=max(args.warmup, 0.0),
        interval_seconds=args.interval,
        device=args.device,
        tls=args.tls,
        tls_ca=args.tls_ca,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        token=args.token,
    )
    workload = WORKLOADS[args.workload](params)
    progress = Progress(enabled=False if args.no_progress else None)
    try:
        result: RunResult = (
            run_replay(config, workload, progress)
            if isinstance(workload, Replay) and args.mode == "rpc"
            else run(config, workload, progress)
        )
    except RunFailed as exc:
        return _failures(exc.failures)
    except CallError as exc:
        return _fail(f"the run failed: {exc}", EXIT_CODES.get(exc.code, EXIT_FAILURE))
    extra: dict[str, Any] = {
        "seed": args.seed,
        "file_size_bytes": args.file_size,
        "io_size_bytes": args.io_size,
        "files": args.files,
        "distribution": params.distribution,
    }
    if params.distribution == "zipf":
        extra["zipf_alpha"] = params.zipf_alpha
    if loaded is not None:
        extra.update(
            trace=loaded.path,
            trace_format=loaded.format,
            trace_requests=len(loaded),
            trace_skipped=loaded.skipped,
        )
    data = report.build(result, extra)
    rec = result.recorder
    if rec.ops and rec.errors == rec.ops:
        _fail(
            f"every one of the {rec.ops:,} operations failed "
            f"({', '.join(f'{k} {v:,}' for k, v in sorted(rec.errors_by_code.items()))}); "
            f"the first: {rec.first_error}",
            EXIT_OPS_FAILED,
        )
        return _failures(result.failures) if result.failures else EXIT_OPS_FAILED
    if args.report is not None:
        page = report.write_report(data, args.report)
        print(f"foliod-load: report written to {page}", file=sys.stderr)
    if args.json:
        print(json.dumps(data))
    else:
        sys.stdout.write(report.text(data))
    if result.failures:
        return _failures(result.failures)
    if data["errors"]:
        print(
            f"foliod-load: {data['errors']:,} operations failed; the first: {rec.first_error}",
            file=sys.stderr,
        )
    return EXIT_OPS_FAILED if data["errors"] else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
