"""Serving a real host (`foliod --observe-host`): a read-only machine named real:<hostname>.

A background thread scans /proc/kpageflags every observe_interval_seconds (foliod.mm.kpageflags)
and publishes an immutable ObservedMachine built from the scan. The simulator's code is left as
it is: ObservedMachines stands in for the server's Machines in the servicer and the metrics
collector only. It hands the observed machine to the read RPCs that ObservingServicer lets
through (GetMachine, GetBuddyInfo, GetMeminfo, GetMemmap, GetVmstat), which read the same
attributes of it as of a simulated machine; every other lookup of that name (mutations, Submit
batches, file and folio reads) is FAILED_PRECONDITION. The collector iterates it with the
simulated machines, so every foliod_* family carries it under its own machine label.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, cast

import grpc
import structlog
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector

from foliod.mm import FailedPrecondition, Machine, Machines, Meminfo, Watermarks
from foliod.mm.kpageflags import (
    HostObservation,
    ObserveUnavailable,
    buddy_totals,
    check_readable,
    observe_host,
    read_watermarks,
)
from foliod.mm.memmap import DescriptorSizes, ModelCost
from foliod.mm.mm_types import FolioKind
from foliod.mm.snapshot import snapshot_host
from foliod.rpc.servicer import FoliodServicer, snapshot_chunks
from foliod.v1 import foliod_pb2 as pb

PAGE_SIZE = 4096
MAX_ORDER = 10


class _Zone:
    def __init__(self, nr_free: int, blocks: list[int]) -> None:
        self.nr_free = nr_free
        self._blocks = blocks

    def buddyinfo(self) -> list[int]:
        return list(self._blocks)


class _NoLru:
    def lists(self) -> dict[str, int]:
        return {}

    def list_pages(self) -> dict[str, int]:
        return {}


class _NoThp:
    stats: dict[int, dict[str, int]] = {}  # noqa: RUF012 (read-only, empty)


class ObservedMachine:
    """The latest scan, shaped like the parts of a Machine that the read paths use."""

    def __init__(self, observation: HostObservation, sizes: DescriptorSizes) -> None:
        obs = observation
        self.observation = obs
        self.name = obs.name
        self.lock = threading.Lock()
        self.nr_pages = obs.scan.present_frames
        self.ram_bytes = self.nr_pages * PAGE_SIZE
        blocks = (buddy_totals(obs.buddyinfo) + [0] * (MAX_ORDER + 1))[: MAX_ORDER + 1]
        self.zone = _Zone(obs.free_frames, blocks)
        nr_min, nr_low, nr_high, kbytes = read_watermarks()
        self.watermarks = Watermarks(nr_min, nr_low, nr_high, kbytes)
        self.nr_folios: dict[tuple[FolioKind, int], int] = obs.scan.folio_counts()
        self._memmap = obs.memmap(sizes)
        self.memcgs: dict[str, Any] = {}
        self.lru = _NoLru()
        self.page_cache = None
        self.events: dict[str, int] = {}
        self.thp = _NoThp()

    def memmap(self) -> tuple[ModelCost, ...]:
        return self._memmap

    def meminfo(self) -> Meminfo:
        m = self.observation.meminfo
        return Meminfo(
            mem_total_bytes=m.get("MemTotal", 0),
            mem_free_bytes=m.get("MemFree", 0),
            anon_pages_bytes=m.get("AnonPages", 0),
            anon_huge_pages_bytes=m.get("AnonHugePages", 0),
            file_pages_bytes=self.observation.vmstat.get("nr_file_pages", 0) * PAGE_SIZE,
            slab_bytes=m.get("Slab", 0),
            page_tables_bytes=m.get("PageTables", 0),
            hugetlb_bytes=m.get("Hugetlb", m.get("HugePages_Total", 0) * m.get("Hugepagesize", 0)),
            memmap_bytes=self._memmap[0].total_bytes,
            cached_bytes=m.get("Cached", 0),
            dirty_bytes=m.get("Dirty", 0),
            active_file_bytes=m.get("Active(file)", 0),
            inactive_file_bytes=m.get("Inactive(file)", 0),
            writeback_bytes=m.get("Writeback", 0),
        )

    def vmstat(self) -> dict[str, int]:
        return dict(self.observation.vmstat)


class HostObserver:
    """Scans this host every interval on a daemon thread; latest is the newest result."""

    def __init__(
        self,
        interval_seconds: float,
        sizes: DescriptorSizes,
        scan: Callable[[], HostObservation] | None = None,
    ) -> None:
        if scan is None:
            check_readable()  # ObserveUnavailable names the file and the capability
        self.interval_seconds = interval_seconds
        self.sizes = sizes
        self._scan = scan or observe_host
        self.log = structlog.get_logger("foliod.observe")
        self.latest: ObservedMachine | None = None
        self.name = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="observe_host", daemon=True)

    def scan_once(self) -> ObservedMachine:
        observation = self._scan()
        machine = ObservedMachine(observation, self.sizes)
        self.latest, self.name = machine, machine.name
        scan = observation.scan
        self.log.info(
            "host scanned",
            machine=machine.name,
            seconds=round(scan.seconds, 3),
            frames=scan.frames,
            guest=observation.virtualization.guest,
        )
        return machine

    def start(self) -> None:
        """Scans once (so the machine exists when the server starts), then in the background."""
        self.scan_once()
        self._thread.start()

    def _loop(self) -> None:
        if self.interval_seconds <= 0:
            return
        while not self._stop.wait(self.interval_seconds):
            try:
                self.scan_once()
            except (OSError, ObserveUnavailable, ValueError) as exc:
                self.log.warning("host scan failed", error=str(exc))

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


_reading = threading.local()


@contextlib.contextmanager
def reading_observed() -> Iterator[None]:
    """Within it, this thread may look the observed machine up (read RPCs only)."""
    _reading.on = True
    try:
        yield
    finally:
        _reading.on = False


class ObservedMachines(Machines):
    """The server's machines plus the observed host, read-only; shares the server's dict."""

    def __init__(self, machines: Machines, observer: HostObserver) -> None:
        # No super().__init__: this is a view of machines, not a second set.
        self.host = machines.host
        self.by_name = machines.by_name
        self.observer = observer

    def get(self, name: str) -> Machine:
        observed = self.observer.latest
        if observed is not None and name == observed.name:
            if not getattr(_reading, "on", False):
                raise FailedPrecondition(
                    f"machine {name!r} is an observed real host (foliod --observe-host): "
                    "read-only; GetMachine, GetMemmap, GetMeminfo, GetBuddyInfo and GetVmstat "
                    "work on it, nothing else does",
                    field="machine",
                )
            # It quacks like a Machine for the read paths (see the module docstring).
            return cast(Machine, observed)
        return super().get(name)

    def __iter__(self) -> Iterator[Machine]:
        machines: list[Machine] = list(self.by_name.values())
        observed = self.observer.latest
        if observed is not None:
            machines.append(cast(Machine, observed))
        return iter(machines)


class ObservingServicer(FoliodServicer):
    """FoliodServicer whose read RPCs also serve the observed machine."""

    def GetMachine(  # noqa: N802
        self, request: pb.GetMachineRequest, context: grpc.ServicerContext
    ) -> pb.MachineInfo:
        with reading_observed():
            return super().GetMachine(request, context)

    def GetBuddyInfo(  # noqa: N802
        self, request: pb.GetBuddyInfoRequest, context: grpc.ServicerContext
    ) -> pb.BuddyInfo:
        with reading_observed():
            return super().GetBuddyInfo(request, context)

    def GetMeminfo(  # noqa: N802
        self, request: pb.GetMeminfoRequest, context: grpc.ServicerContext
    ) -> pb.Meminfo:
        with reading_observed():
            return super().GetMeminfo(request, context)

    def GetMemmap(  # noqa: N802
        self, request: pb.GetMemmapRequest, context: grpc.ServicerContext
    ) -> pb.MemmapReport:
        with reading_observed():
            return super().GetMemmap(request, context)

    def GetVmstat(  # noqa: N802
        self, request: pb.GetVmstatRequest, context: grpc.ServicerContext
    ) -> pb.Vmstat:
        with reading_observed():
            return super().GetVmstat(request, context)

    def SnapshotMachine(  # noqa: N802
        self, request: pb.SnapshotMachineRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.SnapshotChunk]:
        observer = cast(ObservedMachines, self.machines).observer
        if not request.machine or request.machine != observer.name:
            return super().SnapshotMachine(request, context)
        try:
            # A fresh scan of its own (the observer keeps counts, not the layout); no lock.
            snapshot = snapshot_host()
        except ObserveUnavailable as exc:
            raise FailedPrecondition(str(exc), field="machine") from None
        return snapshot_chunks(snapshot)


class ObservedHostCollector(Collector):
    """foliod_observed_host_info (kernel, virtualization) and the last scan's duration."""

    def __init__(self, observer: HostObserver) -> None:
        self._observer = observer

    def describe(self) -> Iterable[GaugeMetricFamily]:
        return []

    def collect(self) -> Iterator[GaugeMetricFamily | InfoMetricFamily]:
        observed = self._observer.latest
        if observed is None:
            return
        obs = observed.observation
        virt = obs.virtualization
        info = InfoMetricFamily(
            "foliod_observed_host",
            "The observed real host: kernel and whether it is a virtual machine.",
            labels=["machine"],
        )
        info.add_metric(
            [obs.name],
            {
                "kernel": obs.kernel,
                "guest": str(virt.guest).lower(),
                "hypervisor_flag": str(virt.hypervisor_flag).lower(),
                "sys_vendor": virt.sys_vendor,
                "hugetlb_vmemmap_optimized": str(obs.hvo).lower(),
            },
        )
        yield info
        seconds = GaugeMetricFamily(
            "foliod_observe_scan_seconds",
            "Duration of the last /proc/kpageflags scan.",
            labels=["machine"],
        )
        seconds.add_metric([obs.name], obs.scan.seconds)
        yield seconds
        age = GaugeMetricFamily(
            "foliod_observe_scan_age_seconds",
            "Seconds since the last scan finished.",
            labels=["machine"],
        )
        age.add_metric([obs.name], max(0.0, time.time() - obs.taken_at))
        yield age
