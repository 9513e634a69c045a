"""The metrics adapter: Prometheus metrics read from the core at scrape time, plus gRPC metrics.

Machine metrics come from counters the core maintains (never from walking frames), so a scrape
costs the same on a 4 GiB machine and a 1 TiB one. gRPC metrics use the names of the Go
ecosystem's grpc-prometheus, which existing Grafana dashboards expect. docs/metrics.md documents
every metric (a test holds it to a live scrape); deploy/ has the rules and dashboard using them.
"""

from __future__ import annotations

import math
import platform
from bisect import bisect_left
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from itertools import accumulate

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from foliod.api import __version__
from foliod.mm import MAX_PAGE_ORDER, PAGE_SIZE, FolioKind, Machine, Machines
from foliod.mm.guest import Guest, Guests
from foliod.mm.huge_memory import order_to_size_kb
from foliod.mm.machine import VALID_ORDERS
from foliod.mm.memcontrol import UNLIMITED
from foliod.rpc.interceptors import CODE_NAMES, CallEvent, CallReporter, MethodKey

# Latency buckets from 100 us to 10 s: unary calls here take 0.2-5 ms, big allocations seconds.
_LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
)  # fmt: skip


_LABELS = ("grpc_service", "grpc_method", "grpc_type")


@dataclass(slots=True)
class _MethodCalls:
    """What one method's calls added up to since start."""

    handled: dict[str, int] = field(default_factory=dict)
    # Calls per latency bucket (the last is +Inf), not yet cumulative.
    buckets: list[int] = field(default_factory=lambda: [0] * (len(_LATENCY_BUCKETS) + 1))
    seconds: float = 0.0
    received: int = 0
    sent: int = 0


class GrpcServerMetrics(Collector):
    """CallObserver keeping grpc-prometheus's grpc_server_* metrics, and their collector.

    Ended calls are counted in plain integers: the CallReporter calls observers on one thread
    at a time under its lock, which collect() takes too, after flushing the reporter so that
    every call answered before the scrape is in it. Starts come from the reporter's per-thread
    StartCounts, so calls still in flight count as started.
    """

    def __init__(self, registry: CollectorRegistry, reporter: CallReporter) -> None:
        self._reporter = reporter
        self._methods: dict[MethodKey, _MethodCalls] = {}
        registry.register(self)

    def report(self, events: Sequence[CallEvent]) -> None:
        methods = self._methods
        for call, seconds in events:
            key = (call.service, call.method, call.grpc_type)
            calls = methods.get(key)
            if calls is None:
                calls = methods[key] = _MethodCalls()
            code = CODE_NAMES[call.code]
            calls.handled[code] = calls.handled.get(code, 0) + 1
            calls.buckets[bisect_left(_LATENCY_BUCKETS, seconds)] += 1
            calls.seconds += seconds
            calls.received += call.messages_received
            calls.sent += call.messages_sent

    def describe(self) -> Iterable[CounterMetricFamily]:
        return []

    def collect(self) -> Iterator[CounterMetricFamily | HistogramMetricFamily]:
        self._reporter.flush()
        started = CounterMetricFamily(
            "grpc_server_started", "RPCs started on the server.", labels=_LABELS
        )
        handled = CounterMetricFamily(
            "grpc_server_handled",
            "RPCs completed on the server, regardless of success or failure.",
            labels=(*_LABELS, "grpc_code"),
        )
        handling = HistogramMetricFamily(
            "grpc_server_handling_seconds",
            "Response latency of RPCs handled by the server.",
            labels=_LABELS,
        )
        received = CounterMetricFamily(
            "grpc_server_msg_received", "Messages received by the server.", labels=_LABELS
        )
        sent = CounterMetricFamily(
            "grpc_server_msg_sent", "Messages sent by the server.", labels=_LABELS
        )
        bounds = [*(floatToGoString(b) for b in _LATENCY_BUCKETS), "+Inf"]  # type: ignore[no-untyped-call]
        starts = self._reporter.starts.totals()
        with self._reporter.lock:
            for key in sorted(starts.keys() | self._methods.keys()):
                labels = list(key)
                started.add_metric(labels, starts.get(key, 0))
                calls = self._methods.get(key)
                if calls is None:
                    continue
                for code, count in sorted(calls.handled.items()):
                    handled.add_metric([*labels, code], count)
                handling.add_metric(
                    labels,
                    list(zip(bounds, accumulate(calls.buckets), strict=True)),
                    calls.seconds,
                )
                received.add_metric(labels, calls.received)
                sent.add_metric(labels, calls.sent)
        yield from (started, handled, handling, received, sent)


class MachineCollector(Collector):
    """Reads every machine's state at scrape time."""

    def __init__(self, machines: Machines, guests: Guests | None = None) -> None:
        self._machines = machines
        self._guests = guests

    def describe(self) -> Iterable[GaugeMetricFamily]:
        return []

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily | InfoMetricFamily]:
        families = _families()
        for machine in self._machines:
            with machine.lock:
                _collect_machine(machine, families)
        for guest in self._guests or ():
            with guest.machine.lock, guest.host.lock:
                _collect_guest(guest, families)
        # Tenants' families only where there are tenants: most servers have none.
        yield from (f for k, f in families.items() if f.samples or not k.startswith("tenant_"))
        yield InfoMetricFamily(
            "foliod_build",
            "foliod build information.",
            value={"version": __version__, "python_version": platform.python_version()},
        )


def _families() -> dict[str, GaugeMetricFamily | CounterMetricFamily]:
    gauge, counter = GaugeMetricFamily, CounterMetricFamily
    return {
        "ram": gauge("foliod_ram_bytes", "Simulated RAM.", labels=["machine"]),
        "free": gauge(
            "foliod_free_bytes", "Free memory in the buddy allocator.", labels=["machine"]
        ),
        "watermark": gauge(
            "foliod_watermark_bytes",
            "Zone watermarks (min, low, high).",
            labels=["machine", "level"],
        ),
        "memmap": gauge(
            "foliod_memmap_bytes",
            "Memory map (page descriptors) under each model for the current state.",
            labels=["machine", "model"],
        ),
        "descriptor": gauge(
            "foliod_memmap_descriptor_bytes",
            "Memory map bytes by descriptor type under each model.",
            labels=["machine", "model", "descriptor"],
        ),
        "kind": gauge(
            "foliod_memmap_kind_bytes",
            "Memory map bytes attributable to each folio kind (per-frame entries of its pages plus "
            'its descriptors); kind="free" is free memory\'s per-frame entries.',
            labels=["machine", "model", "kind"],
        ),
        "folios": gauge(
            "foliod_folios",
            "Allocated folios by kind and order.",
            labels=["machine", "kind", "order"],
        ),
        "buddy": gauge(
            "foliod_buddy_free_blocks",
            "Free blocks per order, as /proc/buddyinfo.",
            labels=["machine", "order"],
        ),
        "meminfo": gauge(
            "foliod_meminfo_bytes",
            "/proc/meminfo-style memory use (field: mem_free, anon_pages, cached, dirty, ...).",
            labels=["machine", "field"],
        ),
        "lru": gauge(
            "foliod_lru_folios", "Folios on each file LRU list.", labels=["machine", "lru"]
        ),
        "reads": counter(
            "foliod_pagecache_read_pages",
            "Pages reads asked for, by whether they were cached (hit) or read from the device "
            "(miss), and pages read ahead beyond the request (readahead).",
            labels=["machine", "result"],
        ),
        "lru_pages": gauge(
            "foliod_lru_pages",
            "Pages on each file LRU list (a large folio counts all its pages).",
            labels=["machine", "lru"],
        ),
        "dirty_threshold": gauge(
            "foliod_dirty_threshold_bytes",
            "Dirty page cache thresholds: background (flusher starts), limit (writers throttle).",
            labels=["machine", "level"],
        ),
        "events": counter(
            "foliod_vmstat_events", "Kernel vmstat event counters.", labels=["machine", "event"]
        ),
        "throttled": counter(
            "foliod_dirty_throttled",
            "Writes that wrote back first because dirty memory was over the limit "
            "(balance_dirty_pages).",
            labels=["machine"],
        ),
        "paused": counter(
            "foliod_dirty_paused",
            "Writes paused by balance_dirty_pages (dirty memory above the freerun ceiling).",
            labels=["machine"],
        ),
        "pause_seconds": counter(
            "foliod_dirty_pause_seconds",
            "Simulated time balance_dirty_pages paused writers for (never slept).",
            labels=["machine"],
        ),
        "mthp": counter(
            "foliod_mthp_events",
            "Anonymous mTHP per-size counters (hugepages-<size>/stats).",
            labels=["machine", "size", "event"],
        ),
        "hvo": gauge(
            "foliod_memmap_hvo_freed_bytes",
            "Memory map pages HugeTLB vmemmap optimization freed (taken off foliod_memmap_bytes).",
            labels=["machine", "model"],
        ),
        "guest_ram": gauge("foliod_guest_ram_bytes", "A guest's RAM.", labels=["guest"]),
        "guest_backed": gauge(
            "foliod_guest_backed_bytes",
            "Guest RAM the host backs now (lazily faulted in; ballooning and free page reporting "
            "give it back).",
            labels=["guest"],
        ),
        "guest_duplicate": gauge(
            "foliod_guest_memmap_duplicate_bytes",
            "The memory map paid twice for a guest's RAM: the guest's own plus the host's over "
            "the same memory, per model.",
            labels=["guest", "model"],
        ),
        "guest_memmap": gauge(
            "foliod_guest_memmap_side_bytes",
            "The two halves of foliod_guest_memmap_duplicate_bytes: side=guest (the guest's "
            "memmap) and side=host (the host's over the guest's RAM).",
            labels=["guest", "model", "side"],
        ),
        "guest_balloon": gauge(
            "foliod_guest_balloon_bytes", "Memory in the guest's balloon.", labels=["guest"]
        ),
        "guest_returned": counter(
            "foliod_guest_returned_bytes",
            "Host memory a guest gave back, by how (balloon, reporting).",
            labels=["guest", "via"],
        ),
        "guest_batches": counter(
            "foliod_guest_reporting_batches",
            "Free page reporting batches (of up to reporting_capacity blocks).",
            labels=["guest"],
        ),
        "guest_blocks": counter(
            "foliod_guest_reported_blocks", "Free blocks reported to the host.", labels=["guest"]
        ),
        "tenant_current": gauge(
            "foliod_tenant_memory_current_bytes",
            "Memory charged to a tenant (memory.current): its folios and its files' page cache.",
            labels=["machine", "tenant", "type"],
        ),
        "tenant_max": gauge(
            "foliod_tenant_memory_max_bytes",
            "A tenant's memory.max (+Inf: no limit).",
            labels=["machine", "tenant"],
        ),
        "tenant_events": counter(
            "foliod_tenant_memory_events",
            "memory.events: max (usage reached memory.max and the tenant's page cache was "
            "reclaimed), oom (a charge failed even so).",
            labels=["machine", "tenant", "event"],
        ),
        "tenant_files": gauge(
            "foliod_tenant_files",
            "A tenant's files and open file handles.",
            labels=["machine", "tenant", "state"],
        ),
    }


def _collect_guest(
    guest: Guest, families: dict[str, GaugeMetricFamily | CounterMetricFamily]
) -> None:
    name = guest.name
    families["guest_ram"].add_metric([name], guest.ram_bytes)
    families["guest_backed"].add_metric([name], guest.backing.nr_backed_pages * PAGE_SIZE)
    families["guest_balloon"].add_metric([name], len(guest.machine.balloon) * PAGE_SIZE)
    for dup in guest.duplication():
        model = str(dup.model)
        families["guest_duplicate"].add_metric([name, model], dup.total_bytes)
        families["guest_memmap"].add_metric([name, model, "guest"], dup.guest_memmap_bytes)
        families["guest_memmap"].add_metric([name, model, "host"], dup.host_memmap_bytes)
    for via, pages in (
        ("balloon", guest.nr_ballooned_host_pages),
        ("reporting", guest.nr_reported_pages),
    ):
        families["guest_returned"].add_metric([name, via], pages * PAGE_SIZE)
    families["guest_batches"].add_metric([name], guest.nr_reporting_batches)
    families["guest_blocks"].add_metric([name], guest.nr_reported_blocks)


def _collect_machine(
    machine: Machine, families: dict[str, GaugeMetricFamily | CounterMetricFamily]
) -> None:
    name = machine.name
    families["ram"].add_metric([name], machine.ram_bytes)
    for tenant, memcg in machine.memcgs.items():
        families["tenant_current"].add_metric([name, tenant, "folios"], memcg.nr_owned * PAGE_SIZE)
        families["tenant_current"].add_metric([name, tenant, "file"], memcg.nr_cache * PAGE_SIZE)
        limit = memcg.limits.max_pages
        families["tenant_max"].add_metric(
            [name, tenant], math.inf if limit == UNLIMITED else limit * PAGE_SIZE
        )
        for memcg_event, count in memcg.events.items():
            families["tenant_events"].add_metric([name, tenant, str(memcg_event)], count)
        families["tenant_files"].add_metric([name, tenant, "files"], memcg.nr_files)
        families["tenant_files"].add_metric([name, tenant, "open"], memcg.nr_open_files)
    families["free"].add_metric([name], machine.zone.nr_free * PAGE_SIZE)
    marks = machine.watermarks
    for level, pages in (("min", marks.nr_min), ("low", marks.nr_low), ("high", marks.nr_high)):
        families["watermark"].add_metric([name, level], pages * PAGE_SIZE)
    for report in machine.memmap():
        model = str(report.model)
        families["memmap"].add_metric([name, model], report.total_bytes)
        for cost in report.breakdown:
            families["descriptor"].add_metric([name, model, str(cost.descriptor)], cost.total_bytes)
        for kind, nr_bytes in report.by_kind.items():
            families["kind"].add_metric([name, model, str(kind)], nr_bytes)
        families["kind"].add_metric([name, model, "free"], report.free_memory_bytes)
        families["hvo"].add_metric([name, model], report.hvo_freed_bytes)
    for kind in FolioKind:
        for order in VALID_ORDERS.get(kind, (0,)):
            count = machine.nr_folios.get((kind, order), 0)
            families["folios"].add_metric([name, str(kind), str(order)], count)
    for order, blocks in enumerate(machine.zone.buddyinfo()[: MAX_PAGE_ORDER + 1]):
        families["buddy"].add_metric([name, str(order)], blocks)
    for field_name, value in asdict(machine.meminfo()).items():
        if field_name not in ("mem_total_bytes", "memmap_bytes"):
            label = field_name.removesuffix("_bytes")
            families["meminfo"].add_metric([name, label], value)
    for lru_name, count in machine.lru.lists().items():
        families["lru"].add_metric([name, lru_name], count)
    for lru_name, pages in machine.lru.list_pages().items():
        families["lru_pages"].add_metric([name, lru_name], pages)
    if machine.page_cache is not None:
        background, limit = machine.page_cache.dirty_thresholds()
        cache = machine.page_cache
        families["throttled"].add_metric([name], cache.nr_throttled)
        families["paused"].add_metric([name], cache.nr_paused)
        families["pause_seconds"].add_metric([name], cache.pause_seconds)
        for result, pages in (
            ("hit", cache.nr_read_hits),
            ("miss", cache.nr_read_misses),
            ("readahead", cache.nr_read_ahead),
        ):
            families["reads"].add_metric([name, result], pages)
        for level, pages in (("background", background), ("limit", limit)):
            families["dirty_threshold"].add_metric([name, level], pages * PAGE_SIZE)
    for event, value in machine.events.items():
        families["events"].add_metric([name, str(event)], value)
    for order, stats in machine.thp.stats.items():
        size = f"{order_to_size_kb(order)}kB"
        for stat, value in stats.items():
            families["mthp"].add_metric([name, size, str(stat)], value)
