"""Serving a real host (`foliod --observe-host`): a read-only machine named real:<hostname>.

A background thread scans /proc/kpageflags every observe_interval_seconds (foliod.mm.kpageflags)
and publishes an immutable ObservedMachine built from the scan. The simulator's code is left as
it is: ObservedMachines stands in for the server's Machines in the servicer and the metrics
collector only. It hands the observed machine to the read RPCs that ObservingServicer lets
through (GetMachine, GetBuddyInfo, GetMeminfo, GetMemmap, GetVmstat), which read the same
attributes of it as of a simulated machine; every other lookup of that name (mutations, Submit
batches, file and folio reads) is FAILED_PRECONDITION. The collector iterates it with the
simulated machines, so every foliod_* family carries it under its own machine label.

With --observe-backing (base, thp, hugetlb_2m, hugetlb_1g; --observe-hvo) the observed host is
also a guest of a host foliod cannot see: ObservedGuest stands in for a Guest, and the host side
of the duplicated memory map is Guest.duplication itself, the simulated guests' arithmetic, run
on it. ObservedGuests adds it to the server's guests for GetGuest, ListGuests and the
foliod_guest_* metrics; SetBalloon, ReportFreePages and DestroyGuest on it are
FAILED_PRECONDITION.

With --observe-only (the lean exporter a DaemonSet runs on every node) the observed machine is
the only one: it is the default machine (an empty name), the collector exports nothing else,
and naming the simulated host, or creating a guest on it, is FAILED_PRECONDITION.

When kpageflags cannot be read foliod does not start (ObserveUnavailable names the file and the
capability), unless --observe-fallback meminfo: then every scan is an estimate from
/proc/meminfo alone (foliod.mm.meminfo), served the same way and labelled as one: GetMemmap's
source and foliod_observed_host_info's source label say "meminfo-estimate", not "kpageflags".
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, cast

import grpc
import structlog
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector

from foliod.api import PAGE_SIZE
from foliod.config import Config
from foliod.mm import FailedPrecondition, Machine, Machines, Meminfo, Watermarks
from foliod.mm.guest import BackingSpec, Duplication, Guest, Guests
from foliod.mm.kpageflags import (
    KPAGEFLAGS,
    HostObservation,
    ObserveUnavailable,
    buddy_totals,
    check_readable,
    observe_host,
    read_watermarks,
)
from foliod.mm.meminfo import MEMINFO, estimate_host
from foliod.mm.memmap import DescriptorSizes, ModelCost
from foliod.mm.mm_types import FolioKind
from foliod.mm.page_alloc import MAX_PAGE_ORDER
from foliod.mm.snapshot import snapshot_host
from foliod.rpc.servicer import FoliodServicer, _guest_pb, snapshot_chunks
from foliod.v1 import foliod_pb2 as pb


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
        self.source = obs.source
        self.lock = threading.Lock()
        self.nr_pages = obs.scan.present_frames
        self.ram_bytes = self.nr_pages * PAGE_SIZE
        blocks = (buddy_totals(obs.buddyinfo) + [0] * (MAX_PAGE_ORDER + 1))[: MAX_PAGE_ORDER + 1]
        self.zone = _Zone(obs.free_frames, blocks)
        nr_min, nr_low, nr_high, kbytes = read_watermarks()
        self.watermarks = Watermarks(nr_min, nr_low, nr_high, kbytes)
        self.nr_folios: dict[tuple[FolioKind, int], int] = obs.scan.folio_counts()
        # Only its size is read (a guest's balloon): the frames balloon drivers took.
        self.balloon = range(obs.scan.kind_frames.get("balloon", 0))
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


class _UnobservedHost:
    """The host of an observed guest: foliod sees neither its memory nor its lock."""

    def __init__(self, sizes: DescriptorSizes, name: str) -> None:
        self.sizes = sizes
        self.name = name
        self.lock = contextlib.nullcontext()


class _StatedBacking:
    """The observed guest's RAM as its host backs it: every granule, but those the guest's
    balloon holds whole (free page reporting, which the guest side cannot see, is ignored:
    an upper bound for lazy backings)."""

    def __init__(self, machine: ObservedMachine, spec: BackingSpec) -> None:
        self.nr_backed = (machine.nr_pages - len(machine.balloon)) >> spec.order
        self.nr_backed_pages = self.nr_backed << spec.order


class ObservedGuest:
    """The observed host as the guest it is, with the host backing the user stated: the
    attributes of a Guest that GetGuest, ListGuests and the metrics read."""

    reporting = None
    nr_ballooned_host_pages = 0
    nr_reported_pages = 0
    nr_reporting_batches = 0
    nr_reported_blocks = 0

    def __init__(self, machine: ObservedMachine, spec: BackingSpec, sizes: DescriptorSizes) -> None:
        vendor = machine.observation.virtualization.sys_vendor or "unknown"
        self.name = machine.name
        self.machine = machine
        self.spec = spec
        self.host = _UnobservedHost(sizes, f"hypervisor:{vendor}")
        self.backing = _StatedBacking(machine, spec)

    @property
    def ram_bytes(self) -> int:
        return self.machine.ram_bytes

    def duplication(self) -> tuple[Duplication, ...]:
        """Guest.duplication, the simulated guests' arithmetic, on this stand-in."""
        return Guest.duplication(cast(Guest, self))


def host_scanner(hostname: str = "", fallback: str = "") -> Callable[[], HostObservation]:
    """How this host is scanned: from KPAGEFLAGS when it can be read; if not, with fallback
    "meminfo" estimated from MEMINFO alone, else ObserveUnavailable naming the file and the
    capability."""
    kpageflags, meminfo = KPAGEFLAGS, MEMINFO
    try:
        check_readable(kpageflags)
    except ObserveUnavailable as exc:
        if fallback != "meminfo":
            raise ObserveUnavailable(
                f"{exc}; or start with --observe-fallback meminfo to serve an estimate from "
                f"{meminfo} alone"
            ) from exc
        structlog.get_logger("foliod.observe").warning(
            "kpageflags unreadable: estimating from meminfo", error=str(exc), meminfo=str(meminfo)
        )
        return functools.partial(estimate_host, meminfo, hostname=hostname)
    return functools.partial(observe_host, kpageflags, hostname=hostname)


class HostObserver:
    """Scans this host every interval on a daemon thread; latest is the newest result."""

    def __init__(
        self,
        interval_seconds: float,
        sizes: DescriptorSizes,
        scan: Callable[[], HostObservation],
        *,
        only: bool = False,
        backing: BackingSpec | None = None,
    ) -> None:
        self.interval_seconds = interval_seconds
        self.only = only
        self.backing = backing
        self.sizes = sizes
        self._scan = scan
        self.log = structlog.get_logger("foliod.observe")
        self.latest: ObservedMachine | None = None
        self.name = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="observe_host", daemon=True)

    @classmethod
    def from_config(cls, config: Config) -> HostObserver:
        """The observer --observe-host and its companion options ask for."""
        return cls(
            config.observe_interval_seconds,
            config.descriptor_sizes(),
            host_scanner(config.observe_hostname, config.observe_fallback),
            only=config.observe_only,
            backing=config.observe_backing_spec(),
        )

    @property
    def guest(self) -> ObservedGuest | None:
        """The latest scan as a guest, when the user stated its host's backing."""
        latest = self.latest
        if latest is None or self.backing is None:
            return None
        return ObservedGuest(latest, self.backing, self.sizes)

    def scan_once(self) -> ObservedMachine:
        observation = self._scan()
        machine = ObservedMachine(observation, self.sizes)
        self.latest, self.name = machine, machine.name
        scan = observation.scan
        self.log.info(
            "host scanned",
            machine=machine.name,
            source=machine.source,
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
        if self.observer.only and observed is not None and not name:
            name = observed.name
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
        if self.observer.only:
            raise _observe_only(name)
        return super().get(name)

    def __iter__(self) -> Iterator[Machine]:
        machines: list[Machine] = [] if self.observer.only else list(self.by_name.values())
        observed = self.observer.latest
        if observed is not None:
            machines.append(cast(Machine, observed))
        return iter(machines)


class ObservedGuests(Guests):
    """The server's guests plus the observed host as a guest (--observe-backing), read-only;
    shares the server's guests."""

    def __init__(self, guests: Guests, observer: HostObserver) -> None:
        # No super().__init__: this is a view of guests, not a second set.
        self.machines = guests.machines
        self.new_machine = guests.new_machine
        self.reporting = guests.reporting
        self.clock = guests.clock
        self.lock = guests.lock
        self.by_name = guests.by_name
        self.observer = observer

    def get(self, name: str) -> Guest:
        observed = self.observer.guest
        if observed is not None and name == observed.name:
            if not getattr(_reading, "on", False):
                raise FailedPrecondition(
                    f"guest {name!r} is an observed real host (foliod --observe-host): "
                    "read-only; GetGuest and ListGuests show it, nothing else changes it",
                    field="name",
                )
            return cast(Guest, observed)
        return super().get(name)

    def __iter__(self) -> Iterator[Guest]:
        guests: list[Guest] = list(self.by_name.values())
        observed = self.observer.guest
        if observed is not None:
            guests.append(cast(Guest, observed))
        return iter(guests)

    def destroy(self, name: str, *, delete_files: bool = False) -> int:
        self.get(name)  # FailedPrecondition for the observed guest
        return super().destroy(name, delete_files=delete_files)


def _observe_only(name: str) -> FailedPrecondition:
    return FailedPrecondition(
        f"machine {name[:80]!r}: this server only observes its real host (foliod "
        "--observe-only): it simulates no machine",
        field="machine",
    )


class ObservingServicer(FoliodServicer):
    """FoliodServicer whose read RPCs also serve the observed machine."""

    def _guest(self, guest: Guest) -> pb.Guest:
        if isinstance(guest, ObservedGuest):
            # Nothing to check: a scan, not a simulated machine.
            with guest.machine.lock:
                return _guest_pb(guest)
        return super()._guest(guest)

    def CreateGuest(  # noqa: N802
        self, request: pb.CreateGuestRequest, context: grpc.ServicerContext
    ) -> pb.Guest:
        observer = cast(ObservedMachines, self.machines).observer
        if observer.only:
            raise _observe_only(request.machine or "host")
        return super().CreateGuest(request, context)

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
            report = super().GetMemmap(request, context)
        observed = cast(ObservedMachines, self.machines).observer.latest
        if observed is not None and report.machine == observed.name:
            report.source = observed.source
        return report

    def GetVmstat(  # noqa: N802
        self, request: pb.GetVmstatRequest, context: grpc.ServicerContext
    ) -> pb.Vmstat:
        with reading_observed():
            return super().GetVmstat(request, context)

    def GetGuest(  # noqa: N802
        self, request: pb.GetGuestRequest, context: grpc.ServicerContext
    ) -> pb.Guest:
        with reading_observed():
            return super().GetGuest(request, context)

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
    """foliod_observed_host_info (kernel, virtualization, the scan's source) and the last
    scan's duration."""

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
            "The observed real host: kernel, whether it is a virtual machine, and what its "
            "figures come from (source: kpageflags, or meminfo-estimate).",
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
                "source": obs.source,
            },
        )
        yield info
        seconds = GaugeMetricFamily(
            "foliod_observe_scan_seconds",
            "Duration of the last scan (of /proc/kpageflags; of /proc/meminfo for an estimate).",
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
