"""foliodctl: foliod from the command line, in the kernel's own formats where it has one.

meminfo, vmstat and buddyinfo print like their /proc files; everything else prints tables with
IEC sizes; ``--json`` prints the client's results as JSON for scripts. The exit code says what
failed, as foliodclient._exit_codes.EXIT_CODE_TABLE has it (--help prints the same, and
tests/test_cli.py holds docs/cli.md's table to it):

"""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO

from foliod.api import (
    MAX_IO_BYTES,
    PAGE_SIZE,
    Backing,
    FolioKind,
    MemmapModel,
    __version__,
    parse_size,
)
from foliodclient._client import DEFAULT_TARGET, DEFAULT_TIMEOUT_SECONDS, FoliodClient
from foliodclient._exit_codes import (
    EXIT_CODES,
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
)
from foliodclient._exit_codes import render_text as render_exit_codes
from foliodclient._format import iec, table
from foliodclient._types import Duplication, FileStat, Guest, IoStats, MemmapReport
from foliodclient.errors import AlreadyExists, CallError, RemoteError

__doc__ = f"{__doc__}{render_exit_codes(indent='    ')}"

# /proc/meminfo lines foliod has, in the kernel's order; foliod's own two come last.
MEMINFO_LINES = (
    ("MemTotal", "mem_total_bytes"),
    ("MemFree", "mem_free_bytes"),
    ("Cached", "cached_bytes"),
    ("Active(file)", "active_file_bytes"),
    ("Inactive(file)", "inactive_file_bytes"),
    ("Dirty", "dirty_bytes"),
    ("Writeback", "writeback_bytes"),
    ("AnonPages", "anon_pages_bytes"),
    ("Slab", "slab_bytes"),
    ("PageTables", "page_tables_bytes"),
    ("AnonHugePages", "anon_huge_pages_bytes"),
    ("Hugetlb", "hugetlb_bytes"),
    ("FileFolios", "file_pages_bytes"),
    ("Memmap", "memmap_bytes"),
)


@dataclass(frozen=True, slots=True)
class Output:
    """What a command produced: data for --json, and the text (or raw bytes) for people."""

    data: Any
    text: str | bytes = ""
    exit_code: int = 0


Command = Callable[[FoliodClient, argparse.Namespace], Output]


# Formatting.


def jsonable(data: Any) -> Any:
    if dataclasses.is_dataclass(data) and not isinstance(data, type):
        return dataclasses.asdict(data)
    if isinstance(data, tuple | list):
        return [jsonable(item) for item in data]
    return data


def _percent(fraction: float) -> str:
    return f"{fraction * 100:.4f} %"


def _orders(folios_by_order: Mapping[int, int]) -> str:
    return " ".join(f"{order}:{n}" for order, n in sorted(folios_by_order.items())) or "-"


def _io(stats: IoStats) -> str:
    text = (
        f"{stats.pages_hit} pages hit, {stats.pages_missed} missed, "
        f"{stats.pages_readahead} read ahead, device {stats.device_seconds * 1e3:.3f} ms"
    )
    if stats.throttle_seconds:
        text += f", throttled {stats.throttle_seconds * 1e3:.3f} ms"
    return text


def _total_io(stats: Sequence[IoStats]) -> IoStats:
    return IoStats(
        pages_hit=sum(s.pages_hit for s in stats),
        pages_missed=sum(s.pages_missed for s in stats),
        pages_readahead=sum(s.pages_readahead for s in stats),
        device_seconds=sum(s.device_seconds for s in stats),
        throttle_seconds=sum(s.throttle_seconds for s in stats),
    )


# Argument types.


def size_arg(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def count_arg(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"not a non-negative integer: {text!r}")
    return int(text)


def handles_arg(text: str) -> list[int]:
    """Handles as "7", "1-256" or "1,5,9-12"."""
    handles: list[int] = []
    for part in text.split(","):
        first, _, last = part.partition("-")
        if not first.isdigit() or (last and not last.isdigit()):
            raise argparse.ArgumentTypeError(f"not a handle or range: {part!r}")
        handles.extend(range(int(first), int(last or first) + 1))
    return handles


# Commands.


def cmd_meminfo(client: FoliodClient, args: argparse.Namespace) -> Output:
    info = client.get_meminfo()
    lines = [
        f"{label + ':':<16}{getattr(info, field) >> 10:>8} kB\n" for label, field in MEMINFO_LINES
    ]
    return Output(info, "".join(lines))


def cmd_vmstat(client: FoliodClient, args: argparse.Namespace) -> Output:
    counters = client.get_vmstat()
    return Output(counters, "".join(f"{name} {value}\n" for name, value in counters.items()))


def cmd_buddyinfo(client: FoliodClient, args: argparse.Namespace) -> Output:
    info = client.get_buddy_info()
    blocks = "".join(f"{n:6d} " for n in info.free_blocks)
    return Output(info, f"Node 0, zone {info.zone:>8} {blocks}\n")


def cmd_memmap(client: FoliodClient, args: argparse.Namespace) -> Output:
    report = client.get_memmap()
    return Output(report, render_memmap(report))


def render_memmap(report: MemmapReport) -> str:
    """The three models side by side: totals, percent of RAM, breakdown and cost per kind."""
    models = report.models
    header = ["", *(str(m.model) for m in models)]
    rows: list[list[object]] = [
        ["total", *(iec(m.total_bytes) for m in models)],
        ["percent of RAM", *(_percent(m.fraction_of_ram) for m in models)],
        ["descriptors"],
    ]
    # Per-frame entries (page, memdesc) first: each model lists its own first.
    place: dict[str, int] = {}
    for m in models:
        for index, d in enumerate(m.breakdown):
            place[d.descriptor] = min(index, place.get(d.descriptor, index))
    names = sorted(place, key=place.__getitem__)
    for name in names:
        cells = []
        for m in models:
            found = [d for d in m.breakdown if d.descriptor == name]
            cells.append(iec(found[0].total_bytes) if found else "-")
        rows.append([f"  {name}", *cells])
    if any(m.hvo_freed_bytes for m in models):
        # HVO's freed memmap pages come off the per-frame entries above.
        hvo = [f"-{iec(m.hvo_freed_bytes)}" if m.hvo_freed_bytes else "0 B" for m in models]
        rows.append(["  hvo freed", *hvo])
    rows.append(["by kind"])
    for kind in FolioKind:
        cells = [iec(sum(k.total_bytes for k in m.by_kind if k.kind == kind)) for m in models]
        rows.append([f"  {kind}", *cells])
    rows.append(["  free memory", *(iec(m.free_memory_bytes) for m in models)])
    pages = report.ram_bytes // PAGE_SIZE
    source = f" ({report.source})" if report.source else ""
    title = (
        f"memory map of {report.machine}{source}: {iec(report.ram_bytes)} of RAM, "
        f"{pages} frames\n\n"
    )
    return title + table(header, [row + [""] * (len(header) - len(row)) for row in rows])


def cmd_folios(client: FoliodClient, args: argparse.Namespace) -> Output:
    report = client.get_memmap()
    kinds = list(FolioKind)
    counts = {(c.kind, c.order): c for c in report.folios}
    orders = sorted({c.order for c in report.folios})
    rows: list[list[object]] = []
    for order in orders:
        row = [counts[k, order].folios if (k, order) in counts else 0 for k in kinds]
        rows.append([order, iec(PAGE_SIZE << order), *row, sum(row)])
    totals = [sum(c.folios for c in report.folios if c.kind == k) for k in kinds]
    rows.append(["total", "", *totals, sum(totals)])
    memory = [sum(c.nr_pages for c in report.folios if c.kind == k) * PAGE_SIZE for k in kinds]
    rows.append(["memory", "", *map(iec, memory), iec(sum(memory))])
    header = ["order", "size", *(str(k) for k in kinds), "total"]
    return Output(report.folios, table(header, rows))


def cmd_files_ls(client: FoliodClient, args: argparse.Namespace) -> Output:
    files = client.list_files()
    header = ["name", "size", "cached", "dirty", "order:folios", "open"]
    rows = [
        [
            f.name,
            iec(f.size_bytes),
            iec(f.nr_cached * PAGE_SIZE),
            iec(f.nr_dirty * PAGE_SIZE),
            _orders(f.folios_by_order),
            f.open_handles,
        ]
        for f in files
    ]
    return Output(files, table(header, rows))


def render_stat(stat: FileStat) -> str:
    lines = [
        ("name", stat.name),
        ("size", f"{stat.size_bytes} bytes ({iec(stat.size_bytes)})"),
        ("cached", f"{stat.nr_cached} pages ({iec(stat.nr_cached * PAGE_SIZE)})"),
        ("dirty", f"{stat.nr_dirty} pages ({iec(stat.nr_dirty * PAGE_SIZE)})"),
        ("folios", _orders(stat.folios_by_order) + " (order:folios)"),
        ("max order", stat.max_order),
        ("readahead", f"{stat.ra_pages} pages"),
        ("open handles", stat.open_handles),
    ]
    return "".join(f"{label + ':':<14}{value}\n" for label, value in lines)


def cmd_files_stat(client: FoliodClient, args: argparse.Namespace) -> Output:
    stat = client.stat_file(args.name)
    return Output(stat, render_stat(stat))


def cmd_files_cat(client: FoliodClient, args: argparse.Namespace) -> Output:
    end = args.offset + args.length if args.length is not None else None
    if end is None:
        end = client.stat_file(args.name).size_bytes
    chunks: list[bytes] = []
    stats: list[IoStats] = []
    offset = args.offset
    while offset < end:
        read = client.read_file(args.name, min(MAX_IO_BYTES, end - offset), offset)
        chunks.append(read.data)
        stats.append(read.stats)
        if not read.data:
            break
        offset += len(read.data)
    data = b"".join(chunks)
    summary = {
        "name": args.name,
        "offset": args.offset,
        "length": len(data),
        "data_base64": base64.b64encode(data).decode(),
        "stats": dataclasses.asdict(_total_io(stats)),
    }
    return Output(summary, data)


def _read_source(source: str) -> bytes:
    stream: BinaryIO
    if source == "-":
        return sys.stdin.buffer.read()
    with open(source, "rb") as stream:
        return stream.read()


def cmd_files_write(client: FoliodClient, args: argparse.Namespace) -> Output:
    data = _read_source(args.source)
    with contextlib.suppress(AlreadyExists):
        client.create_file(args.name)
    stats: list[IoStats] = []
    for start in range(0, len(data), MAX_IO_BYTES):
        chunk = data[start : start + MAX_IO_BYTES]
        stats.append(client.write_file(args.name, chunk, args.offset + start).stats)
    total = _total_io(stats)
    summary = {
        "name": args.name,
        "offset": args.offset,
        "written_bytes": len(data),
        "stats": dataclasses.asdict(total),
    }
    text = f"wrote {len(data)} bytes to {args.name} at offset {args.offset}: {_io(total)}\n"
    return Output(summary, text)


def cmd_files_truncate(client: FoliodClient, args: argparse.Namespace) -> Output:
    stat = client.truncate_file(args.name, args.size)
    return Output(stat, render_stat(stat))


def cmd_files_drop(client: FoliodClient, args: argparse.Namespace) -> Output:
    dropped = client.drop_file_range(args.name, args.offset, args.length or 0)
    return Output({"name": args.name, "dropped_bytes": dropped}, f"dropped {iec(dropped)}\n")


def cmd_files_rm(client: FoliodClient, args: argparse.Namespace) -> Output:
    for name in args.names:
        client.delete_file(name)
    return Output({"deleted": args.names})


def cmd_files_fsync(client: FoliodClient, args: argparse.Namespace) -> Output:
    handle = client.open_file(args.name)
    try:
        nr_pages = client.fsync(handle)
    finally:
        client.close_file(handle)
    text = f"{args.name}: {nr_pages} pages ({iec(nr_pages * PAGE_SIZE)}) written back, synced\n"
    return Output({"name": args.name, "nr_pages": nr_pages}, text)


def cmd_alloc(client: FoliodClient, args: argparse.Namespace) -> Output:
    result = client.allocate(
        args.owner,
        args.kind,
        order=args.order,
        count=args.count or 0,
        size_bytes=args.size or 0,
        madvise_hugepage=args.madvise,
    )
    last = result.first_handle + result.count - 1
    text = (
        f"allocated {result.count} folios, handles {result.first_handle}-{last}: "
        f"{result.nr_pages} pages ({iec(result.nr_pages * PAGE_SIZE)}), "
        f"order:folios {_orders(result.folios_by_order)}, "
        f"{result.nr_pagetable_pages} page-table pages\n"
    )
    return Output(result, text)


def cmd_free(client: FoliodClient, args: argparse.Namespace) -> Output:
    handles = [h for group in args.handles for h in group]
    result = client.free(handles)
    text = (
        f"freed {len(handles)} folios: {result.nr_pages} pages "
        f"({iec(result.nr_pages * PAGE_SIZE)}), {result.nr_pagetable_pages} of them page tables\n"
    )
    return Output(result, text)


def cmd_release(client: FoliodClient, args: argparse.Namespace) -> Output:
    result = client.release_owner(args.owner)
    text = (
        f"released {args.owner}: {result.folios} folios, "
        f"{result.nr_pages} pages ({iec(result.nr_pages * PAGE_SIZE)})\n"
    )
    return Output(result, text)


def cmd_reclaim(client: FoliodClient, args: argparse.Namespace) -> Output:
    reclaimed = client.reclaim(args.size)
    text = f"reclaimed {iec(reclaimed)} of {iec(args.size)} asked\n"
    return Output({"asked_bytes": args.size, "reclaimed_bytes": reclaimed}, text)


def cmd_drop_caches(client: FoliodClient, args: argparse.Namespace) -> Output:
    dropped = client.drop_caches()
    return Output({"dropped_bytes": dropped}, f"dropped {iec(dropped)} of clean page cache\n")


def _backing(guest: Guest) -> str:
    """The backing with its size and HVO: "base", "mthp 64 KiB", "hugetlb_2m hvo"."""
    name = str(guest.backing)
    if guest.backing is Backing.MTHP:
        name += f" {iec(guest.mthp_size_kb << 10)}"
    return name + " hvo" if guest.hvo else name


def _fractions(duplication: Sequence[Duplication]) -> list[str]:
    """Duplication in percent of guest RAM, one cell per model in MemmapModel order."""
    by_model = {d.model: d for d in duplication}
    return [
        _percent(by_model[m].fraction_of_guest_ram) if m in by_model else "-" for m in MemmapModel
    ]


def render_guest(guest: Guest) -> str:
    """A guest's settings and host memory, then its memmap duplication per model."""
    how = "faulted in on first use" if guest.lazy else "reserved up front"
    reporting = "off"
    if guest.free_page_reporting:
        reporting = (
            f"on, {iec(guest.reported_bytes)} returned in {guest.reporting_batches} batches "
            f"of {guest.reported_blocks} blocks"
        )
    lines = [
        ("name", guest.name),
        ("host", guest.host),
        ("RAM", f"{guest.ram_bytes} bytes ({iec(guest.ram_bytes)})"),
        ("backing", f"{_backing(guest)}, {how}"),
        (
            "backed",
            f"{iec(guest.backed_bytes)} in {guest.host_folios} host folios of "
            f"{iec(PAGE_SIZE << guest.host_folio_order)}",
        ),
        (
            "balloon",
            f"{iec(guest.balloon_bytes)}, {iec(guest.balloon_returned_bytes)} returned to the host",
        ),
        ("reporting", reporting),
    ]
    header = ["model", "guest", "host", "total", "percent of guest RAM"]
    rows = [
        [
            str(d.model),
            iec(d.guest_memmap_bytes),
            iec(d.host_memmap_bytes),
            iec(d.total_bytes),
            _percent(d.fraction_of_guest_ram),
        ]
        for d in guest.duplication
    ]
    details = "".join(f"{label + ':':<11}{value}\n" for label, value in lines)
    return details + "\nmemory map, described twice:\n" + table(header, rows)


def cmd_guests_create(client: FoliodClient, args: argparse.Namespace) -> Output:
    guest = client.create_guest(
        args.name,
        args.size,
        args.backing,
        mthp_size_kb=args.mthp_size_kb,
        hvo=args.hvo,
        free_page_reporting=args.free_page_reporting,
    )
    return Output(guest, render_guest(guest))


def cmd_guests_boot(client: FoliodClient, args: argparse.Namespace) -> Output:
    guest = client.boot_guest(
        args.name,
        args.file,
        args.size,
        args.backing,
        mthp_size_kb=args.mthp_size_kb,
        hvo=args.hvo,
        free_page_reporting=args.free_page_reporting,
    )
    return Output(guest, render_guest(guest))


def cmd_snapshot(client: FoliodClient, args: argparse.Namespace) -> Output:
    snapshot = client.snapshot_machine(args.target)
    snapshot.write_to(args.output)
    info = snapshot.info
    folios = sum(info.folios.values())
    text = (
        f"{args.output}: {info.size_bytes} bytes ({iec(info.size_bytes)}), snapshot of "
        f"{info.machine} ({info.source}{', ' + info.kernel if info.kernel else ''}): "
        f"{info.nr_frames} frames ({iec(info.nr_frames * PAGE_SIZE)}), "
        f"{info.nr_free_pages} free, {folios} folios, {info.nr_runs} runs\n"
    )
    return Output(info, text)


def cmd_guests_ls(client: FoliodClient, args: argparse.Namespace) -> Output:
    listing = client.list_guests()
    header = ["name", "RAM", "backing", "backed", "balloon", *(str(m) for m in MemmapModel)]
    rows: list[list[object]] = [
        [
            g.name,
            iec(g.ram_bytes),
            _backing(g),
            iec(g.backed_bytes),
            iec(g.balloon_bytes),
            *_fractions(g.duplication),
        ]
        for g in listing.guests
    ]
    if listing.guests:
        rows.append(
            [
                "total",
                iec(sum(g.ram_bytes for g in listing.guests)),
                "",
                iec(sum(g.backed_bytes for g in listing.guests)),
                iec(sum(g.balloon_bytes for g in listing.guests)),
                *_fractions(listing.totals),
            ]
        )
    return Output(listing, table(header, rows))


def cmd_guests_show(client: FoliodClient, args: argparse.Namespace) -> Output:
    guest = client.get_guest(args.name)
    return Output(guest, render_guest(guest))


def cmd_guests_destroy(client: FoliodClient, args: argparse.Namespace) -> Output:
    freed = client.destroy_guest(args.name, delete_files=args.delete_files)
    files = "deleted" if args.delete_files else "kept"
    text = f"destroyed {args.name}: {iec(freed)} of host memory freed, files {files}\n"
    data = {"name": args.name, "freed_bytes": freed, "files_deleted": args.delete_files}
    return Output(data, text)


def cmd_guests_balloon(client: FoliodClient, args: argparse.Namespace) -> Output:
    result = client.set_balloon(args.name, args.size)
    text = (
        f"balloon of {args.name}: {iec(result.balloon_bytes)} (inflated "
        f"{iec(result.inflated_bytes)}, deflated {iec(result.deflated_bytes)}), "
        f"host freed {iec(result.host_freed_bytes)}\n"
    )
    return Output(result, text)


def cmd_guests_report(client: FoliodClient, args: argparse.Namespace) -> Output:
    result = client.report_free_pages(args.name)
    text = (
        f"reported {result.blocks} free blocks of {args.name} in {result.batches} batches, "
        f"host freed {iec(result.host_freed_bytes)}\n"
    )
    return Output(result, text)


def cmd_health(client: FoliodClient, args: argparse.Namespace) -> Output:
    status = client.check_health(args.service)
    code = EXIT_OK if status == "SERVING" else EXIT_UNAVAILABLE
    return Output({"service": args.service, "status": status}, status + "\n", code)


# The command line.


def _global_options(parser: argparse.ArgumentParser, *, defaults: bool) -> None:
    """Options every subcommand shares; given before or after the subcommand."""

    def default(value: Any) -> Any:
        return value if defaults else argparse.SUPPRESS

    env = os.environ
    parser.add_argument(
        "--server",
        default=default(env.get("FOLIODCTL_SERVER", DEFAULT_TARGET)),
        help=f"host:port of foliod (env FOLIODCTL_SERVER; default {DEFAULT_TARGET})",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=default(DEFAULT_TIMEOUT_SECONDS),
        help=f"deadline of each call in seconds, 0 for none (default {DEFAULT_TIMEOUT_SECONDS:g})",
    )
    parser.add_argument("--tls", action="store_true", default=default(False), help="use TLS")
    parser.add_argument(
        "--tls-ca", default=default(None), metavar="PEM", help="root certificate (implies --tls)"
    )
    parser.add_argument(
        "--tls-cert",
        default=default(None),
        metavar="PEM",
        help="client certificate for mutual TLS (implies --tls; needs --tls-key)",
    )
    parser.add_argument(
        "--tls-key", default=default(None), metavar="PEM", help="client certificate's key"
    )
    parser.add_argument(
        "--token",
        default=default(env.get("FOLIODCTL_TOKEN")),
        help="auth token, sent as 'authorization: Bearer' (env FOLIODCTL_TOKEN)",
    )
    parser.add_argument(
        "--machine", default=default(""), help="machine to address (default: the host)"
    )
    parser.add_argument(
        "--json", action="store_true", default=default(False), help="print JSON for scripts"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="foliodctl",
        description="foliod from the command line.",
        epilog="exit codes:\n" + render_exit_codes(indent="  "),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"foliodctl {__version__}")
    _global_options(parser, defaults=True)
    common = argparse.ArgumentParser(add_help=False)
    _global_options(common, defaults=False)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(group: Any, name: str, run: Command, help: str) -> argparse.ArgumentParser:
        sub: argparse.ArgumentParser = group.add_parser(name, help=help, parents=[common])
        sub.set_defaults(run=run)
        return sub

    add(commands, "meminfo", cmd_meminfo, "memory summary, like /proc/meminfo")
    add(commands, "vmstat", cmd_vmstat, "event and state counters, like /proc/vmstat")
    add(commands, "buddyinfo", cmd_buddyinfo, "free blocks per order, like /proc/buddyinfo")
    add(commands, "memmap", cmd_memmap, "the memory map under the three models")
    add(commands, "folios", cmd_folios, "allocated folios by order and kind")

    files = commands.add_parser("files", help="files and the page cache").add_subparsers(
        dest="files_command", required=True, metavar="COMMAND"
    )
    add(files, "ls", cmd_files_ls, "list files")
    add(files, "stat", cmd_files_stat, "size, cache and folios of a file").add_argument("name")
    cat = add(files, "cat", cmd_files_cat, "print a file's bytes (read through the cache)")
    cat.add_argument("name")
    cat.add_argument("--offset", type=size_arg, default=0, help="first byte (default 0)")
    cat.add_argument("--length", type=size_arg, default=None, help="bytes (default: to EOF)")
    write = add(files, "write", cmd_files_write, "write stdin or a file into a file (creates)")
    write.add_argument("name")
    write.add_argument("source", nargs="?", default="-", help="local file (default: stdin)")
    write.add_argument("--offset", type=size_arg, default=0, help="first byte (default 0)")
    truncate = add(files, "truncate", cmd_files_truncate, "set a file's size")
    truncate.add_argument("name")
    truncate.add_argument("size", type=size_arg, help="new size, e.g. 4096 or 1MiB")
    drop = add(files, "drop", cmd_files_drop, "drop a range's clean pages (POSIX_FADV_DONTNEED)")
    drop.add_argument("name")
    drop.add_argument("--offset", type=size_arg, default=0, help="first byte (default 0)")
    drop.add_argument("--length", type=size_arg, default=None, help="bytes (default: to EOF)")
    add(files, "rm", cmd_files_rm, "delete files").add_argument("names", nargs="+")
    add(files, "fsync", cmd_files_fsync, "write a file back and make it durable").add_argument(
        "name"
    )

    guests = commands.add_parser("guests", help="guest machines backed by host memory")
    guest_commands = guests.add_subparsers(dest="guests_command", required=True, metavar="COMMAND")
    create = add(
        guest_commands, "create", cmd_guests_create, "create a guest (--machine: its host)"
    )
    create.add_argument("name")
    create.add_argument("size", type=size_arg, help="guest RAM, e.g. 1GiB")
    create.add_argument(
        "--backing", choices=[str(b) for b in Backing], default="base", help="default base"
    )
    create.add_argument(
        "--mthp-size-kb", type=count_arg, default=0, help="mthp backing: folio size in kB"
    )
    create.add_argument("--hvo", action="store_true", help="hugetlb: vmemmap optimization")
    create.add_argument(
        "--free-page-reporting",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="return free guest memory to the host (default: on for base, mthp and thp "
        "guests, off for hugetlb ones)",
    )
    boot = add(
        guest_commands,
        "boot",
        cmd_guests_boot,
        "create a guest booted from a snapshot file (foliodctl snapshot)",
    )
    boot.add_argument("name")
    boot.add_argument("file", help="snapshot file")
    boot.add_argument(
        "--size", type=size_arg, default=0, help="guest RAM (default: the snapshot's)"
    )
    boot.add_argument(
        "--backing", choices=[str(b) for b in Backing], default="base", help="default base"
    )
    boot.add_argument(
        "--mthp-size-kb", type=count_arg, default=0, help="mthp backing: folio size in kB"
    )
    boot.add_argument("--hvo", action="store_true", help="hugetlb: vmemmap optimization")
    boot.add_argument(
        "--free-page-reporting",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="return free guest memory to the host (default as for create)",
    )
    add(guest_commands, "ls", cmd_guests_ls, "list guests and their memmap duplication")
    add(guest_commands, "show", cmd_guests_show, "a guest's details").add_argument("name")
    destroy = add(guest_commands, "destroy", cmd_guests_destroy, "destroy a guest")
    destroy.add_argument("name")
    destroy.add_argument("--delete-files", action="store_true", help="also delete its files")
    balloon = add(guest_commands, "balloon", cmd_guests_balloon, "set a guest's balloon size")
    balloon.add_argument("name")
    balloon.add_argument("size", type=size_arg, help="target balloon size, e.g. 256MiB")
    add(guest_commands, "report", cmd_guests_report, "run free page reporting now").add_argument(
        "name"
    )

    snapshot = add(
        commands,
        "snapshot",
        cmd_snapshot,
        "save a machine's layout (free blocks, folios at their frames) to a file",
    )
    snapshot.add_argument(
        "target",
        nargs="?",
        default=None,
        metavar="MACHINE",
        help="machine to snapshot (default: --machine, the host); real:<hostname> for the "
        "observed real host",
    )
    snapshot.add_argument("-o", "--output", required=True, help="file to write")
    alloc = add(commands, "alloc", cmd_alloc, "allocate folios for an owner")
    alloc.add_argument("owner")
    alloc.add_argument("kind", choices=[str(k) for k in FolioKind])
    alloc.add_argument("--order", type=count_arg, default=None, help="folio order (default 0)")
    amount = alloc.add_mutually_exclusive_group(required=True)
    amount.add_argument("--count", type=count_arg, help="number of folios")
    amount.add_argument("--size", type=size_arg, help="total size, e.g. 64MiB")
    alloc.add_argument("--madvise", action="store_true", help="anon: MADV_HUGEPAGE mapping")
    free = add(commands, "free", cmd_free, "free folios by handle")
    free.add_argument("handles", nargs="+", type=handles_arg, help="7, 1-256 or 1,5,9-12")
    add(commands, "release", cmd_release, "free everything an owner holds").add_argument("owner")
    reclaim = add(commands, "reclaim", cmd_reclaim, "reclaim page cache, like memory.reclaim")
    reclaim.add_argument("size", type=size_arg, help="how much, e.g. 64MiB")
    add(commands, "drop-caches", cmd_drop_caches, "free clean page cache")
    health = add(commands, "health", cmd_health, "grpc.health.v1 status (exit 8 unless SERVING)")
    health.add_argument("--service", default="", help='service name (default "": the server)')
    return parser


def _report_error(exc: CallError, *, as_json: bool) -> None:
    if as_json:
        error = {
            "code": exc.code.name,
            "reason": exc.reason,
            "message": exc.message,
            "field": exc.field,
            "metadata": exc.metadata,
        }
        print(json.dumps({"error": error}), file=sys.stderr)
        return
    reason = f" ({exc.reason})" if exc.reason not in (exc.code.name, RemoteError.reason) else ""
    field = f" [field {exc.field}]" if exc.field else ""
    print(f"foliodctl: {exc.code.name}{reason}: {exc.message}{field}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs one foliodctl command; returns the exit code (see the module docstring)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    if (args.tls_cert is None) != (args.tls_key is None):
        print("foliodctl: --tls-cert and --tls-key go together", file=sys.stderr)
        return EXIT_USAGE
    try:
        with FoliodClient(
            args.server,
            timeout=args.timeout if args.timeout > 0 else None,
            machine=args.machine,
            tls=args.tls,
            tls_ca=args.tls_ca,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            token=args.token,
        ) as client:
            run: Command = args.run
            output = run(client, args)
    except CallError as exc:
        _report_error(exc, as_json=args.json)
        return EXIT_CODES.get(exc.code, EXIT_FAILURE)
    except OSError as exc:
        print(f"foliodctl: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    if args.json:
        print(json.dumps(jsonable(output.data), indent=2))
    elif isinstance(output.text, bytes):
        sys.stdout.flush()
        sys.stdout.buffer.write(output.text)
        sys.stdout.buffer.flush()
    else:
        sys.stdout.write(output.text)
    return output.exit_code


if __name__ == "__main__":
    sys.exit(main())
