"""Owned folios as columns: the per-call folio limit, handle chunks, lookups and bad handles."""

from __future__ import annotations

import numpy as np
import pytest

from foliod.mm import (
    MAX_FOLIOS_PER_CALL,
    FolioAlreadyFreed,
    FolioKind,
    InvalidArgument,
    Machine,
    Machines,
    ThpSetting,
    UnknownFolio,
    check_machine,
)
from foliod.mm.folio_table import CHUNK
from foliod.mm.guest import Guests, ReportingConfig

GIB = 1 << 30


def test_the_folio_limit_counts_the_folios_a_call_makes() -> None:
    """8 GiB of anon memory is 4,096 THPs, under the limit; as base pages it is over it."""
    m = Machine("m", 64 * GIB)
    made = m.allocate("a", FolioKind.ANON, nr_bytes=8 * GIB)
    assert (made.count, made.folios_by_order) == (4096, {9: 4096})
    m.release_owner("a")
    m.set_thp(ThpSetting.MADVISE, {})
    with pytest.raises(InvalidArgument, match=f"at most {MAX_FOLIOS_PER_CALL} folios per call"):
        m.allocate("a", FolioKind.ANON, nr_bytes=8 * GIB)
    assert m.allocate("a", FolioKind.ANON, nr_bytes=8 * GIB, madvise_hugepage=True).count == 4096
    with pytest.raises(InvalidArgument, match="not 2097152"):
        m.allocate("b", FolioKind.FILE, order=0, count=2 * MAX_FOLIOS_PER_CALL)
    check_machine(m)


def test_chunks_are_made_on_first_use_and_dropped_when_empty() -> None:
    """A chunk of handles exists while one of its folios lives or handles are handed out from
    it; freed and never issued handles answer with different errors."""
    m = Machine("m", 4 * GIB)
    first = m.allocate("a", FolioKind.FILE, order=0, count=3 * CHUNK).first_handle
    assert len(m.table.chunks) == 4  # handles 1 .. 3 * CHUNK span four chunks
    m.allocate("b", FolioKind.FILE, order=0, count=5)
    m.release_owner("a")
    assert list(m.table.chunks) == [3]  # the one b's folios are in, still being handed out
    assert len(m.folios) == 5 == m.table.nr_live
    with pytest.raises(FolioAlreadyFreed):
        m.lookup(first)
    with pytest.raises(UnknownFolio):
        m.lookup(m.next_handle)
    assert first not in m.folios
    check_machine(m)


@pytest.mark.parametrize("few", [True, False])
def test_free_rejects_a_bad_handle_whole(few: bool) -> None:
    """One freed, unknown, repeated or out-of-range handle rejects the whole request, few
    handles or many, and nothing is freed."""
    m = Machine("m", GIB)
    made = m.allocate("a", FolioKind.SLAB, order=1, count=100)
    handles = list(range(made.first_handle, made.first_handle + (4 if few else 100)))
    m.free([handles[0]])
    free_before, live_before = m.zone.nr_free, len(m.folios)
    cases: list[tuple[list[int] | np.ndarray, type[Exception]]] = [
        ([*handles[1:], handles[0]], FolioAlreadyFreed),
        ([*handles[1:], 10**6], UnknownFolio),
        ([*handles[1:], handles[1]], InvalidArgument),
        ([*handles[1:], -5], UnknownFolio),
        ([*handles[1:], 2**63 + 7], UnknownFolio),
        (np.array([*handles[1:], 2**64 - 1], np.uint64), UnknownFolio),
    ]
    for request, error in cases:
        with pytest.raises(error):
            m.free(request)
        assert (m.zone.nr_free, len(m.folios)) == (free_before, live_before)
    released = m.free(np.array(handles[1:], np.int64))
    assert released.nr_pages == 2 * (len(handles) - 1)
    check_machine(m)


def test_owned_folios_read_back_as_allocated() -> None:
    """GetFolio's view of a folio: its frame, order, kind, owner and mapping."""
    m = Machine("m", GIB)
    anon = m.allocate("p", FolioKind.ANON, order=0, count=600)
    views = [m.folios[h] for h in range(anon.first_handle, anon.first_handle + 600)]
    assert [v.vaddr for v in views] == list(range(views[0].vaddr, views[0].vaddr + 600))
    assert {(v.owner, v.kind, v.order, v.pmd_mapped, v.hvo) for v in views} == {
        ("p", FolioKind.ANON, 0, False, False)
    }
    assert len({v.pfn for v in views}) == 600
    huge = m.allocate("h", FolioKind.HUGETLB, order=9, count=2, hvo=True)
    view = m.lookup(huge.first_handle)
    assert (view.hvo, view.vaddr, view.size_bytes, view.pfn % 512) == (True, -1, 2 << 20, 0)
    check_machine(m)


def _t() -> float:
    """A clock that stands still."""
    return 0.0


def _state(m: Machine) -> tuple[object, ...]:
    """What must agree between a machine and its one-at-a-time twin."""
    return (
        [list(area) for area in m.zone.free_area],
        dict(m.nr_folios),
        dict(m.events),
        dict(m.folios.items()),
    )


@pytest.mark.slow
@pytest.mark.parametrize("backing", ["base", "thp", "mthp"])
def test_guest_frames_are_backed_in_bulk_as_one_at_a_time(backing: str) -> None:
    """A guest's bulk allocation backs its granules on the host in the order touching them
    one folio at a time would: same host frames, handles and free lists."""
    machines = []
    for bulk in (True, False):
        host = Machine("host", 2 * GIB)
        guests = Guests(Machines(host), Machine, ReportingConfig(), _t)
        guest = guests.create("vm", GIB, backing, mthp_size_kb=64 if backing == "mthp" else 0)
        host.bulk = guest.machine.bulk = bulk
        machines.append((host, guest))
    for _, guest in machines:
        vm = guest.machine
        vm.allocate("a", FolioKind.FILE, order=0, count=3000)
        vm.allocate("b", FolioKind.ANON, order=0, count=5000)
        vm.allocate("c", FolioKind.SLAB, order=2, count=700)
        vm.free(list(range(1, 3001, 3)))
        vm.allocate("d", FolioKind.FILE, order=0, count=2000)
        vm.release_owner("b")
        guest.report_free_pages()
        vm.allocate("e", FolioKind.FILE, order=0, count=40_000)
    (host_a, guest_a), (host_b, guest_b) = machines
    assert _state(host_a) == _state(host_b)
    assert _state(guest_a.machine) == _state(guest_b.machine)
    assert (guest_a.backing.handles == guest_b.backing.handles).all()
    check_machine(host_a)
    check_machine(guest_a.machine)
