"""Core behaviour that the API cannot reach in a test's time: address-space limits and resets."""

from __future__ import annotations

import pytest

from foliod.mm import AddressSpaceExhausted, FolioKind, Machine, check_machine
from foliod.mm.memory import TASK_SIZE_PAGES


def _state(m: Machine) -> tuple[object, ...]:
    mm = m.owners["p"].mm
    assert mm is not None
    return (m.zone.buddyinfo(), dict(m.nr_folios), sorted(m.folios), mm.next_vpage)


def test_mapping_past_128_tib_is_refused_and_changes_nothing() -> None:
    """An owner whose next mapping would pass the 47-bit user limit gets AddressSpaceExhausted."""
    m = Machine("t", 16 << 20)
    m.allocate("p", FolioKind.ANON, count=1)
    mm = m.owners["p"].mm
    assert mm is not None
    mm.next_vpage = TASK_SIZE_PAGES - 152  # as if ~128 TiB had been mapped and partly freed
    before = _state(m)
    with pytest.raises(AddressSpaceExhausted) as err:
        m.allocate("p", FolioKind.ANON, order=2, count=75)
    assert err.value.field == "owner"
    assert _state(m) == before
    check_machine(m)
    fits = m.allocate("p", FolioKind.ANON, order=2, count=38)
    assert fits.count == 38
    check_machine(m)
    m.release_owner("p")
    assert m.zone.nr_free == m.nr_pages
    check_machine(m)


def test_placement_restarts_at_the_bottom_once_nothing_is_mapped() -> None:
    """Freeing every mapping lets the next one start again at virtual page 0."""
    m = Machine("t", 16 << 20)
    first = m.allocate("p", FolioKind.ANON, count=4)
    second = m.allocate("p", FolioKind.ANON, count=4)
    assert m.folios[second.first_handle].vaddr == 4
    m.free(list(range(first.first_handle, second.first_handle + 4)))
    third = m.allocate("p", FolioKind.ANON, count=1)
    assert m.folios[third.first_handle].vaddr == 0
    check_machine(m)


def test_out_of_memory_reports_the_state_after_rollback() -> None:
    """A call that fails midway names the free memory the caller will find, not the mid-call low."""
    m = Machine("t", 8 << 20)
    m.set_thp(None, {})
    free_before = m.zone.nr_free
    usable = free_before - m.watermarks.nr_min
    with pytest.raises(Exception) as err:
        m.allocate("p", FolioKind.ANON, nr_bytes=usable * 4096)
    assert f"{free_before} pages free" in str(err.value)
    assert m.zone.nr_free == free_before
    check_machine(m)


def test_explicit_order_anon_folios_count_as_thp_faults() -> None:
    """Anon folios of an explicit large order count in thp_fault_alloc and anon_fault_alloc."""
    m = Machine("t", 64 << 20)
    m.allocate("p", FolioKind.ANON, order=9, count=2)
    m.allocate("p", FolioKind.ANON, order=4, count=3)
    assert m.vmstat()["thp_fault_alloc"] == 2
    assert m.thp.stats[4]["anon_fault_alloc"] == 3  # type: ignore[index]
    assert m.thp.nr_anon[9] == 2
