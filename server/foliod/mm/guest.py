"""Virtualized guests: machines whose RAM is host memory (KVM memslots, virtio_balloon,
mm/page_reporting.c).

A guest is a full Machine. Its RAM is host memory in granules of the chosen backing: base
pages, an mTHP size or THP (anonymous memory of the VMM, faulted in when the guest first uses a
frame), or HugeTLB 2 MiB / 1 GiB pages (reserved up front, optionally with HVO). The host holds
the granules as folios of an owner named ``guest:<name>``, so they show in its free memory,
folio counts and memory map. Both sides describe the same RAM; Duplication is what that costs
under each memory-map model.

Memory goes back to the host two ways, neither of which shrinks the guest's memmap: the
balloon (the guest takes pages, the host drops their backing) and free page reporting (free
guest blocks of order >= 9, reported in batches of up to 32, 2 s after memory was freed). The
host drops a granule only when all of it is ballooned or inside one reported block, as QEMU
does for huge pages; the guest faults a dropped granule back in when it uses a frame again.
"""

from __future__ import annotations

import re
import shutil
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from foliod.api import Backing as Backing  # noqa: PLC0414 -- re-exported
from foliod.mm.errors import (
    AlreadyExists,
    GuestNesting,
    HostCannotBack,
    InvalidArgument,
    OutOfMemory,
    UnknownGuest,
)
from foliod.mm.huge_memory import ANON_ORDERS, HPAGE_PMD_NR, HPAGE_PMD_ORDER, size_kb_to_order
from foliod.mm.machine import (
    GUEST_OWNER_PREFIX,
    MAX_FOLIOS_PER_CALL,
    Machine,
    Machines,
    validate_ram_bytes,
)
from foliod.mm.memmap import MemmapModel, hvo_freed_bytes
from foliod.mm.mm_types import FolioKind
from foliod.mm.page_alloc import MAX_PAGE_ORDER, PAGE_SHIFT, PAGE_SIZE, PUD_ORDER
from foliod.mm.snapshot import Snapshot, boot, check_fits, used_frames
from foliod.mm.vmstat import VmEvent

# A guest's name doubles as a directory name and, prefixed, as its host owner's name.
_GUEST_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,57}")


_MTHP_ORDERS = tuple(o for o in ANON_ORDERS if 0 < o < HPAGE_PMD_ORDER)


@dataclass(frozen=True, slots=True)
class BackingSpec:
    """A backing with its host folio order and HVO setting."""

    backing: Backing
    order: int
    hvo: bool = False

    @classmethod
    def of(cls, backing: str, *, mthp_size_kb: int = 0, hvo: bool = False) -> BackingSpec:
        try:
            kind = Backing(backing)
        except ValueError:
            names = ", ".join(Backing)
            raise InvalidArgument(
                f"unknown backing {backing!r} (one of {names})", field="backing"
            ) from None
        if mthp_size_kb and kind is not Backing.MTHP:
            raise InvalidArgument("mthp_size_kb applies to the mthp backing", field="mthp_size_kb")
        if kind is Backing.MTHP:
            try:
                order = size_kb_to_order(mthp_size_kb)
            except InvalidArgument:
                order = -1
            if order not in _MTHP_ORDERS:
                sizes = ", ".join(str(4 << o) for o in _MTHP_ORDERS)
                raise InvalidArgument(
                    f"mthp_size_kb must be one of {sizes}, not {mthp_size_kb}",
                    field="mthp_size_kb",
                )
        else:
            order = {
                Backing.BASE: 0,
                Backing.THP: HPAGE_PMD_ORDER,
                Backing.HUGETLB_2M: HPAGE_PMD_ORDER,
                Backing.HUGETLB_1G: PUD_ORDER,
            }[kind]
        spec = cls(kind, order, hvo)
        if hvo and not spec.hugetlb:
            raise InvalidArgument(
                f"hvo needs a hugetlb backing; {kind} has no HugeTLB pages", field="hvo"
            )
        return spec

    @property
    def hugetlb(self) -> bool:
        return self.backing in (Backing.HUGETLB_2M, Backing.HUGETLB_1G)

    @property
    def kind(self) -> FolioKind:
        return FolioKind.HUGETLB if self.hugetlb else FolioKind.ANON

    @property
    def lazy(self) -> bool:
        """Backed when the guest first uses a frame; HugeTLB pages are reserved up front."""
        return not self.hugetlb

    @property
    def mthp_size_kb(self) -> int:
        return 4 << self.order if self.backing is Backing.MTHP else 0


@dataclass(frozen=True, slots=True)
class ReportingConfig:
    """Free page reporting (mm/page_reporting.c): report free blocks of at least ``order``,
    ``capacity`` per batch, ``delay_seconds`` after memory was freed."""

    delay_seconds: float = 2.0
    order: int = HPAGE_PMD_ORDER
    capacity: int = 32

    def __post_init__(self) -> None:
        if self.delay_seconds < 0:
            raise InvalidArgument("the reporting delay must not be negative", field="delay")
        if not 0 <= self.order <= MAX_PAGE_ORDER:
            raise InvalidArgument(
                f"the reporting order must be 0..{MAX_PAGE_ORDER}", field="reporting_order"
            )
        if self.capacity < 1:
            raise InvalidArgument("the reporting batch must hold a block", field="capacity")


@dataclass(frozen=True, slots=True)
class Duplication:
    """One model's cost of describing a guest's RAM twice: in the guest and in the host."""

    model: MemmapModel
    ram_bytes: int
    guest_memmap_bytes: int
    host_memmap_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.guest_memmap_bytes + self.host_memmap_bytes

    @property
    def fraction_of_guest_ram(self) -> float:
        return self.total_bytes / self.ram_bytes


@dataclass(frozen=True, slots=True)
class BalloonChange:
    """What one SetBalloon did: pages moved and host pages freed."""

    nr_inflated: int
    nr_deflated: int
    nr_balloon_pages: int
    nr_host_pages_freed: int


@dataclass(frozen=True, slots=True)
class ReportRun:
    """One pass of free page reporting."""

    nr_batches: int
    nr_blocks: int
    nr_host_pages_freed: int


class HostBacking:
    """A guest's RAM as its host holds it (the machine's FrameBacking): per granule, the handle
    of the host folio backing it, 0 where none does (an array: 8 bytes per granule, its pages
    committed by the OS as granules are first backed)."""

    def __init__(self, host: Machine, owner: str, spec: BackingSpec, nr_pages: int) -> None:
        self.host = host
        self.owner = owner
        self.spec = spec
        self.shift = spec.order
        self.nr_granules = nr_pages >> spec.order
        self.handles = np.zeros(self.nr_granules, np.int64)
        self.nr_backed = 0
        self.detached = False

    @property
    def nr_backed_pages(self) -> int:
        return self.nr_backed << self.shift

    def backed_granules(self) -> npt.NDArray[np.int64]:
        """The granules the host backs, ascending."""
        return np.flatnonzero(self.handles).astype(np.int64)

    def touch(self, pfn: int, nr_pages: int) -> None:
        shift, handles = self.shift, self.handles
        first, last = pfn >> shift, (pfn + nr_pages - 1) >> shift
        if first == last:
            if not handles[first]:
                self.back(np.array([first], np.int64))
            return
        span = np.arange(first, last + 1, dtype=np.int64)
        missing = span[handles[first : last + 1] == 0]
        if len(missing):
            self.back(missing)

    def touch_many(self, pfns: npt.NDArray[np.int64], nr_pages: int) -> None:
        """touch(pfn, nr_pages) for each pfn in turn, in fewer host calls: each touch that
        finds granules unbacked backs them as one host mapping; consecutive mappings under
        2 MiB are placed in a row (as they would be one by one), so they are backed in one
        call without PMD alignment, and each larger one in a call of its own."""
        shift = self.shift
        per = max(1, nr_pages >> shift)
        granules = (pfns >> shift)[:, None] + np.arange(per, dtype=np.int64)[None, :]
        granules = granules.ravel()
        missing = self.handles[granules] == 0
        if not missing.any():
            return
        if shift and per == 1:
            # Folios smaller than a granule: a granule is backed at its first touch only.
            seen = np.zeros(len(granules), bool)
            order = np.argsort(granules, kind="stable")
            ordered = granules[order]
            repeat = np.concatenate(([False], ordered[1:] == ordered[:-1]))
            seen[order[repeat]] = True
            missing &= ~seen
        wanted = granules[missing]
        if per == 1:
            # One granule a touch: all small or all not.
            counts = np.ones(len(wanted), np.int64)
        else:
            folio_of = np.flatnonzero(missing) // per  # ascending
            firsts = np.flatnonzero(np.concatenate(([True], folio_of[1:] != folio_of[:-1])))
            counts = np.diff(np.append(firsts, len(folio_of)))
        # Granules each touch backs, and whether that touch's mapping is small (< 2 MiB).
        small = (counts << shift) < HPAGE_PMD_NR
        bounds = np.concatenate(([0], np.cumsum(counts)))
        if small.all():
            self.back(wanted, pmd_align=False)
            return
        start = 0
        while start < len(counts):
            stop = start + 1
            if small[start]:
                while stop < len(counts) and small[stop]:
                    stop += 1
            self.back(wanted[bounds[start] : bounds[stop]], pmd_align=not small[start])
            start = stop

    def back(self, granules: npt.NDArray[np.int64], *, pmd_align: bool = True) -> None:
        """The host allocates a folio for each granule, in the order given, as one mapping
        (PMD-aligned at 2 MiB or more unless pmd_align is False); all or nothing."""
        if self.detached:
            raise UnknownGuest("the guest was destroyed", field="machine")
        host, spec = self.host, self.spec
        done: list[npt.NDArray[np.int64]] = []
        with host.lock:
            try:
                for start in range(0, len(granules), MAX_FOLIOS_PER_CALL):
                    chunk = granules[start : start + MAX_FOLIOS_PER_CALL]
                    made = host.allocate(
                        self.owner,
                        spec.kind,
                        order=spec.order,
                        count=len(chunk),
                        hvo=spec.hvo,
                        guest_ram=True,
                        pmd_align=pmd_align,
                    )
                    self.handles[chunk] = np.arange(
                        made.first_handle, made.first_handle + len(chunk), dtype=np.int64
                    )
                    self.nr_backed += len(chunk)
                    done.append(chunk)
            except OutOfMemory as exc:
                if done:
                    self.drop(np.concatenate(done))
                raise HostCannotBack(
                    f"host {host.name!r} cannot back {len(granules) << self.shift} more pages of "
                    f"guest memory: {exc.message}",
                    metadata={**exc.metadata, "host": host.name},
                ) from None

    def drop(self, granules: npt.NDArray[np.int64]) -> int:
        """The host frees the folios of backed granules; returns host pages freed."""
        handles = self.handles[granules]
        handles = handles[handles != 0]
        if not len(handles):
            return 0
        self.handles[granules] = 0
        self.nr_backed -= len(handles)
        freed = 0
        with self.host.lock:
            for start in range(0, len(handles), MAX_FOLIOS_PER_CALL):
                part = handles[start : start + MAX_FOLIOS_PER_CALL]
                freed += self.host.free(part, guest_ram=True).nr_pages
        return freed

    def granules_within(self, pfn: int, nr_pages: int) -> npt.NDArray[np.int64]:
        """Backed granules lying wholly inside frames [pfn, pfn + nr_pages), ascending."""
        shift = self.shift
        first = (pfn + (1 << shift) - 1) >> shift
        end = min((pfn + nr_pages) >> shift, self.nr_granules)
        if first >= end:
            return np.empty(0, np.int64)
        return (np.flatnonzero(self.handles[first:end]) + first).astype(np.int64)

    def detach(self) -> int:
        """Frees everything the host holds for the guest; returns host pages freed."""
        self.detached = True
        self.handles = np.zeros(0, np.int64)
        self.nr_backed = 0
        with self.host.lock:
            if self.owner not in self.host.owners:
                return 0
            return self.host.release_owner(self.owner, guest_ram=True).nr_pages


class Guest:
    """One guest: its machine, its host backing, its balloon and free page reporting."""

    def __init__(
        self,
        machine: Machine,
        backing: HostBacking,
        reporting: ReportingConfig | None,
        created_at: float,
    ) -> None:
        host, spec = backing.host, backing.spec
        self.name = machine.name
        self.machine = machine
        self.host = host
        self.spec = spec
        self.backing = backing
        machine.backing = backing
        self.reporting = reporting
        # Free page reporting: when the next pass is due, and the frees counted at the last look.
        self.report_due: float | None = None
        self.frees_seen = machine.events[VmEvent.PGFREE]
        self.nr_reporting_batches = 0
        self.nr_reported_blocks = 0
        self.nr_reported_pages = 0
        self.nr_ballooned_host_pages = 0
        if reporting is not None and spec.hugetlb:
            self.report_due = created_at + reporting.delay_seconds

    @property
    def ram_bytes(self) -> int:
        return self.machine.ram_bytes

    def duplication(self) -> tuple[Duplication, ...]:
        """Per model: the guest's memmap, and the host's over the same RAM (its per-frame
        entries, less what HVO freed, plus the descriptors of the backing folios)."""
        sizes, spec = self.host.sizes, self.spec
        nr_backed = self.backing.nr_backed
        out = []
        for cost in self.machine.memmap():
            _, frame_bytes = sizes.per_frame(cost.model)
            host_bytes = self.machine.nr_pages * frame_bytes
            if spec.hvo:
                host_bytes -= nr_backed * hvo_freed_bytes(frame_bytes, spec.order, PAGE_SIZE)
            if cost.model is not MemmapModel.STRUCT_PAGE:
                host_bytes += nr_backed * sizes.descriptor_for(spec.kind, spec.order)[1]
            out.append(Duplication(cost.model, self.ram_bytes, cost.total_bytes, host_bytes))
        return tuple(out)

    def set_balloon(self, size_bytes: int) -> BalloonChange:
        """Inflates or deflates the balloon to size_bytes (virtio_balloon's target)."""
        if size_bytes < 0 or size_bytes % PAGE_SIZE or size_bytes > self.ram_bytes:
            raise InvalidArgument(
                f"the balloon size must be a multiple of {PAGE_SIZE} bytes from 0 to the "
                f"guest's {self.ram_bytes}, not {size_bytes}",
                field="size_bytes",
            )
        machine = self.machine
        target, current = size_bytes >> PAGE_SHIFT, len(machine.balloon)
        if target < current:
            machine.balloon_deflate(current - target)
            return BalloonChange(0, current - target, target, 0)
        if target == current:
            return BalloonChange(0, 0, current, 0)
        taken = machine.balloon_inflate(target - current)
        shift = self.backing.shift
        # Granules the pages just taken fall in that the balloon now holds whole and the
        # host backs (the balloon's frames are distinct, so whole means 2^shift of them).
        touched = np.unique(taken >> shift)
        granules, pages = np.unique(machine.balloon >> shift, return_counts=True)
        whole = granules[pages == 1 << shift]
        whole = whole[np.isin(whole, touched)]
        whole = whole[self.backing.handles[whole] != 0]
        freed = self.backing.drop(whole)
        self.nr_ballooned_host_pages += freed
        return BalloonChange(target - current, 0, target, freed)

    def tick(self, now: float) -> ReportRun | None:
        """Free page reporting's delayed work: schedules a pass when the guest freed memory
        and runs it once the delay has passed."""
        if self.reporting is None:
            return None
        frees = self.machine.events[VmEvent.PGFREE]
        if frees != self.frees_seen:
            self.frees_seen = frees
            if self.report_due is None:
                self.report_due = now + self.reporting.delay_seconds
        if self.report_due is None or now < self.report_due:
            return None
        self.report_due = None
        return self.report_free_pages()

    def report_free_pages(self) -> ReportRun:
        """One reporting pass (page_reporting_process): free blocks of the reporting order and
        above whose frames the host still backs, in batches; the host drops their granules."""
        config = self.reporting or ReportingConfig()
        zone, backing = self.machine.zone, self.backing
        blocks = [
            (pfn, order)
            for order in range(config.order, MAX_PAGE_ORDER + 1)
            for pfn in sorted(zone.free_area[order])
        ]
        nr_batches = nr_blocks = freed = 0
        batch: list[int] = []
        batch_blocks = 0
        for pfn, order in blocks:
            granules = backing.granules_within(pfn, 1 << order).tolist()
            if not granules:
                continue
            batch.extend(granules)
            batch_blocks += 1
            if batch_blocks == config.capacity:
                freed += backing.drop(np.array(batch, np.int64))
                nr_batches, nr_blocks = nr_batches + 1, nr_blocks + batch_blocks
                batch, batch_blocks = [], 0
        if batch_blocks:
            freed += backing.drop(np.array(batch, np.int64))
            nr_batches, nr_blocks = nr_batches + 1, nr_blocks + batch_blocks
        self.nr_reporting_batches += nr_batches
        self.nr_reported_blocks += nr_blocks
        self.nr_reported_pages += freed
        return ReportRun(nr_batches, nr_blocks, freed)


class Guests:
    """The guests of the host machine, by name; guests nest one level."""

    def __init__(
        self,
        machines: Machines,
        new_machine: Callable[[str, int], Machine],
        reporting: ReportingConfig,
        clock: Callable[[], float],
    ) -> None:
        self.machines = machines
        self.new_machine = new_machine
        self.reporting = reporting
        self.clock = clock
        self.lock = threading.RLock()
        self.by_name: dict[str, Guest] = {}

    def get(self, name: str) -> Guest:
        guest = self.by_name.get(name)
        if guest is None:
            raise UnknownGuest(f"no guest named {name[:80]!r}", field="name")
        return guest

    def __iter__(self) -> Iterator[Guest]:
        return iter(list(self.by_name.values()))

    def create(
        self,
        name: str,
        ram_bytes: int,
        backing: str,
        *,
        mthp_size_kb: int = 0,
        hvo: bool = False,
        on: str = "",
        free_page_reporting: bool | None = None,
        snapshot: Snapshot | None = None,
    ) -> Guest:
        """Creates a guest on the host (``on``: the machine to host it, empty for the host).
        Free page reporting is on by default for lazily backed guests and off for HugeTLB ones
        (their pages are reserved for the guest). Too big for what the host can back:
        OutOfMemory, and nothing changes. With a snapshot the guest boots from it (ram_bytes
        0: the snapshot's size, rounded up to the backing's granule) and the host backs every
        frame the snapshot does not leave free (holes aside) at once."""
        with self.lock:
            parent = self.machines.get(on)
            if parent is not self.machines.host:
                raise GuestNesting(
                    f"{parent.name!r} is a guest and guests nest one level: create guests on "
                    f"{self.machines.host.name!r}",
                    field="machine",
                )
            self._check_name(name)
            spec = BackingSpec.of(backing, mthp_size_kb=mthp_size_kb, hvo=hvo)
            granule_bytes = PAGE_SIZE << spec.order
            if snapshot is not None and not ram_bytes:
                ram_bytes = -(-snapshot.nr_frames * PAGE_SIZE // granule_bytes) * granule_bytes
            nr_pages = validate_ram_bytes(ram_bytes)
            if snapshot is not None:
                check_fits(snapshot, nr_pages, name)
            if ram_bytes % granule_bytes:
                raise InvalidArgument(
                    f"a {spec.backing} guest's RAM must be a multiple of {granule_bytes} bytes, "
                    f"not {ram_bytes}",
                    field="ram_bytes",
                )
            host = self.machines.host
            with host.lock:
                self._check_room(host, nr_pages)
                ram = HostBacking(host, GUEST_OWNER_PREFIX + name, spec, nr_pages)
                try:
                    if not spec.lazy:
                        ram.back(np.arange(ram.nr_granules, dtype=np.int64))
                    machine = self.new_machine(name, ram_bytes)
                    machine.tenant_limits = host.tenant_limits  # one set of limits per server
                    if snapshot is not None:
                        boot(snapshot, machine)
                        if spec.lazy:
                            ram.back(_granules(snapshot, spec.order))
                except Exception:
                    ram.detach()  # nothing of the guest stays on the host
                    raise
                reporting = spec.lazy if free_page_reporting is None else free_page_reporting
                guest = Guest(machine, ram, self.reporting if reporting else None, self.clock())
            self.machines.by_name[name] = machine
            self.by_name[name] = guest
            return guest

    def _check_name(self, name: str) -> None:
        if not _GUEST_NAME.fullmatch(name) or name == self.machines.host.name:
            raise InvalidArgument(
                f"a guest name is 1-58 of A-Z a-z 0-9 . _ - starting with a letter or digit, "
                f"and not {self.machines.host.name!r}; not {name[:80]!r}",
                field="name",
            )
        if name in self.machines.by_name:
            raise AlreadyExists(f"a machine named {name!r} exists already", field="name")

    def _check_room(self, host: Machine, nr_pages: int) -> None:
        """The host must be able to back the whole guest, after what lazily backed guests
        may still fault in."""
        promised = sum(
            g.machine.nr_pages - g.backing.nr_backed_pages
            for g in self.by_name.values()
            if g.spec.lazy
        )
        room = host.zone.nr_free + host.nr_reclaimable - host.zone.watermarks.nr_min - promised
        if nr_pages > room:
            raise OutOfMemory(
                f"host {host.name!r} cannot back {nr_pages} more pages of guest RAM: "
                f"{max(room, 0)} pages are free or reclaimable above its min watermark and not "
                "promised to lazily backed guests",
                field="ram_bytes",
                metadata={"order": "0", "nr_room_pages": str(max(room, 0))},
            )

    def destroy(self, name: str, *, delete_files: bool = False) -> int:
        """Writes the guest's dirty page cache back (a clean power-off), frees all its host
        memory and forgets it; its files stay on disk unless delete_files. Returns host bytes
        freed."""
        with self.lock:
            guest = self.get(name)
            machine = guest.machine
            with machine.lock:
                if machine.page_cache is not None:
                    machine.page_cache.sync()
                freed = guest.backing.detach()
                del self.machines.by_name[name]
                del self.by_name[name]
                self._discard_store(machine, delete=delete_files)
            return freed << PAGE_SHIFT

    @staticmethod
    def _discard_store(machine: Machine, *, delete: bool) -> None:
        if machine.page_cache is None:
            return
        store = machine.page_cache.store
        store.close()
        if delete:
            shutil.rmtree(store.root, ignore_errors=True)

    def tick(self) -> list[tuple[Guest, ReportRun]]:
        """Runs the reporting work that is due on every guest."""
        now = self.clock()
        runs = []
        for guest in self:
            with guest.machine.lock:
                run = guest.tick(now)
            if run is not None:
                runs.append((guest, run))
        return runs


def _granules(snapshot: Snapshot, shift: int) -> npt.NDArray[np.int64]:
    """The backing granules (of 2^shift frames) holding any frame a snapshot uses, ascending."""
    starts, frames = used_frames(snapshot)
    if not len(starts):
        return np.empty(0, np.int64)
    first, last = starts >> shift, (starts + frames - 1) >> shift
    spans = last - first + 1
    offset = np.arange(int(spans.sum()), dtype=np.int64) - np.repeat(
        np.cumsum(spans) - spans, spans
    )
    return np.unique(np.repeat(first, spans) + offset)
