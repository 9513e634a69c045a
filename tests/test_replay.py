"""PageCache.replay's and read()'s short paths against read()'s general path, state for state.

replay() serves plain hits, and misses read alone into a full capacity-limited cache, without
going through read()'s machinery; everything else goes down read()'s path. The two must leave
the same machine behind: the same folios at the same frames with the same flags, the same LRU
order and policy state, the same shadow entries, readahead state, free lists and counters.
Each example runs one scenario on two fresh machines, one per path, and compares them.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from foliod.mm import PAGE_SIZE, FoliodError, InvalidArgument, Machine, check_machine
from foliod.mm.backing_dev import DEVICE_PROFILES, BackingStore
from foliod.mm.filemap import IoStats
from foliod.mm.lru import POLICIES
from foliod.mm.vmstat import VmEvent

RAM_BYTES = 16 << 20
FILES = ("a", "b")
FILE_PAGES = 96

# One step of a scenario: replay a trace on a file, or dirty a page (a write).
Step = tuple[str, str, list[int]]


def new_machine(store: Path, policy: str, capacity: int, ra_pages: int, max_order: int) -> Machine:
    machine = Machine(
        "replay",
        RAM_BYTES,
        store=BackingStore(store, DEVICE_PROFILES["nvme"]),
        reclaim_policy=policy,
        cache_capacity_pages=capacity,
        ra_pages=ra_pages,
        max_file_order=max_order,
    )
    for name in FILES:
        machine.files.create(name)
        machine.files.truncate(name, FILE_PAGES * PAGE_SIZE)
    return machine


def run(machine: Machine, steps: list[Step], *, short_path: bool) -> list[IoStats]:
    stats: list[IoStats] = []
    for kind, name, indices in steps:
        if kind == "replay":
            stats.append(machine.files.replay(name, indices, short_path=short_path))
        else:
            machine.files.write(name, indices[0] * PAGE_SIZE, b"w" * 100)
        check_machine(machine)
    return stats


def snapshot(machine: Machine) -> dict[str, Any]:
    """Everything the two paths must agree on (frames by pfn, not Folio identity)."""
    cache = machine.files
    policy = machine.lru

    def folio_state(folio: Any) -> tuple[object, ...]:
        mapping = folio.mapping.name if folio.mapping is not None else None
        return (
            mapping,
            folio.index,
            folio.pfn,
            folio.order,
            folio.dirty,
            folio.referenced,
            folio.active,
            folio.readahead,
            folio.gen,
            folio.refs,
            sorted((folio.contents or {}).items()),
        )

    inodes = {
        name: (
            {i: folio_state(f) for i, f in inode.folios.items()},
            dict(inode.shadows),
            dict(inode.shadow_orders),
            inode.nr_pages,
            (inode.ra.start, inode.ra.size, inode.ra.async_size, inode.ra.order),
            inode.ra.prev_pos,
        )
        for name, inode in cache.files.items()
    }
    return {
        "inodes": inodes,
        "lru": [folio_state(cache.folio(f)) for f in policy.folios()],
        "lists": policy.lists(),
        "nonresident_age": policy.nonresident_age,
        "events": {str(k): v for k, v in machine.events.items() if v},
        "free_area": [sorted(area) for area in machine.zone.free_area],
        "nr_free": machine.zone.nr_free,
        "nr_folios": dict(machine.nr_folios),
        "nr_pages": cache.nr_pages,
    }


def assert_same_stats(short: list[IoStats], slow: list[IoStats]) -> None:
    assert len(short) == len(slow)
    for a, b in zip(short, slow, strict=True):
        assert (a.pages_hit, a.pages_missed, a.pages_readahead) == (
            b.pages_hit,
            b.pages_missed,
            b.pages_readahead,
        )
        # The short path adds device time up in another order.
        assert math.isclose(a.device_seconds, b.device_seconds, rel_tol=1e-9)


@st.composite
def traces(draw: st.DrawFn) -> list[int]:
    """Page indices mixing random accesses, sequential runs and repeats."""
    out: list[int] = []
    for _ in range(draw(st.integers(1, 6))):
        shape = draw(st.sampled_from(["random", "sequential", "repeat"]))
        if shape == "random":
            out += draw(st.lists(st.integers(0, FILE_PAGES - 1), min_size=1, max_size=40))
        elif shape == "sequential":
            start = draw(st.integers(0, FILE_PAGES - 1))
            length = draw(st.integers(1, 48))
            out += [i % FILE_PAGES for i in range(start, start + length)]
        else:
            out += [draw(st.integers(0, FILE_PAGES - 1))] * draw(st.integers(1, 4))
    return out


steps = st.lists(
    st.one_of(
        st.tuples(st.just("replay"), st.sampled_from(FILES), traces()),
        st.tuples(
            st.just("write"),
            st.sampled_from(FILES),
            st.lists(st.integers(0, FILE_PAGES - 1), min_size=1, max_size=1),
        ),
    ),
    min_size=1,
    max_size=8,
)


@pytest.mark.slow
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    policy=st.sampled_from(sorted(POLICIES)),
    capacity=st.sampled_from([1, 2, 5, 16, 40, 200]),
    ra_pages=st.sampled_from([0, 4, 32]),
    max_order=st.sampled_from([0, 2, 9]),
    scenario=steps,
)
def test_short_path_leaves_the_machine_read_would(
    policy: str, capacity: int, ra_pages: int, max_order: int, scenario: list[Step]
) -> None:
    """Replay's short path leaves the same machine and stats as read()'s path."""
    with tempfile.TemporaryDirectory() as tmp:
        fast = new_machine(Path(tmp) / "fast", policy, capacity, ra_pages, max_order)
        slow = new_machine(Path(tmp) / "slow", policy, capacity, ra_pages, max_order)
        fast_stats = run(fast, scenario, short_path=True)
        slow_stats = run(slow, scenario, short_path=False)
        assert_same_stats(fast_stats, slow_stats)
        assert snapshot(fast) == snapshot(slow)


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_a_long_trace_takes_the_short_path_and_agrees(tmp_path: Path, policy: str) -> None:
    """A full cache under a scattered trace: mostly short-path recycles, still identical."""
    trace = [(i * 37 + i // 7) % FILE_PAGES for i in range(3000)]
    fast = new_machine(tmp_path / "fast", policy, 24, 0, 0)
    slow = new_machine(tmp_path / "slow", policy, 24, 0, 0)
    a = fast.files.replay("a", trace)
    b = slow.files.replay("a", trace, short_path=False)
    assert_same_stats([a], [b])
    assert snapshot(fast) == snapshot(slow)
    # Every miss counts one allocation; past the first 24, each also evicts one folio.
    assert a.pages_missed > 1000
    assert fast.events[VmEvent.PGALLOC] == a.pages_missed
    assert fast.events[VmEvent.PGSTEAL_DIRECT] == a.pages_missed - 24
    assert fast.events[VmEvent.PGSCAN_DIRECT] == a.pages_missed - 24


def test_a_trace_outside_the_file_is_refused_whole(tmp_path: Path) -> None:
    machine = new_machine(tmp_path, "lru", 8, 0, 0)
    before = snapshot(machine)
    for bad in ([0, 1, FILE_PAGES], [-1], [3, 2, 1, FILE_PAGES + 5]):
        with pytest.raises(InvalidArgument) as caught:
            machine.files.replay("a", bad)
        assert caught.value.field == "indices"
        assert str(FILE_PAGES - 1) in str(caught.value)
    assert snapshot(machine) == before


def test_replay_counts_major_faults_once_per_miss(tmp_path: Path) -> None:
    """Both paths count one pgfault per access and one pgmajfault per miss."""
    for short_path in (True, False):
        machine = new_machine(tmp_path / str(short_path), "two_list", 8, 32, 9)
        stats = machine.files.replay("b", [5, 50, 5, 70, 71, 72, 3, 90] * 3, short_path=short_path)
        events = {str(k): v for k, v in machine.events.items()}
        assert events["pgfault"] == 24
        assert events["pgmajfault"] == stats.pages_missed


# One step of a read scenario: ("read", file, offset, length, through a handle) or
# ("write", file, offset, length, False).
ReadStep = tuple[str, str, int, int, bool]

read_steps = st.lists(
    st.tuples(
        st.sampled_from(["read", "read", "read", "write"]),
        st.sampled_from(FILES),
        st.one_of(
            st.integers(0, FILE_PAGES * PAGE_SIZE - 1),
            st.integers(0, FILE_PAGES - 1).map(lambda i: i * PAGE_SIZE),
        ),
        st.sampled_from([1, 100, PAGE_SIZE, PAGE_SIZE + 1, 3 * PAGE_SIZE, 20 * PAGE_SIZE]),
        st.booleans(),
    ),
    min_size=1,
    max_size=24,
)


def run_reads(
    machine: Machine, steps: list[ReadStep], *, short_path: bool
) -> list[tuple[bytes, IoStats] | str]:
    """Each step's bytes and stats, or the name of the error it raised (a small capacity
    refuses some writes)."""
    handles = {name: machine.files.open(name).number for name in FILES}
    out: list[tuple[bytes, IoStats] | str] = []
    for kind, name, offset, length, through_handle in steps:
        try:
            if kind == "read":
                handle = handles[name] if through_handle else None
                out.append(machine.files.read(name, offset, length, handle, short_path=short_path))
            else:
                data = bytes([offset % 251]) * length
                out.append((b"", machine.files.write(name, offset, data)))
        except FoliodError as exc:
            out.append(type(exc).__name__)
        check_machine(machine)
    return out


def read_snapshot(machine: Machine) -> dict[str, Any]:
    """snapshot() plus the open handles' readahead state and the cache's read counters."""
    cache = machine.files
    return {
        **snapshot(machine),
        "handles": {
            n: (h.ra.start, h.ra.size, h.ra.async_size, h.ra.order, h.ra.prev_pos)
            for n, h in cache.handles.items()
        },
        "reads": (cache.nr_read_hits, cache.nr_read_misses, cache.nr_read_ahead),
    }


@pytest.mark.slow
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    policy=st.sampled_from(sorted(POLICIES)),
    capacity=st.sampled_from([4, 16, 200]),
    ra_pages=st.sampled_from([0, 4, 32]),
    max_order=st.sampled_from([0, 2, 9]),
    scenario=read_steps,
)
def test_read_short_path_leaves_the_machine_the_general_path_would(
    policy: str, capacity: int, ra_pages: int, max_order: int, scenario: list[ReadStep]
) -> None:
    """read()'s short path (a hit inside one folio) returns the same bytes and stats, and
    leaves the same machine, as its general path, by name and through handles."""
    with tempfile.TemporaryDirectory() as tmp:
        fast = new_machine(Path(tmp) / "fast", policy, capacity, ra_pages, max_order)
        slow = new_machine(Path(tmp) / "slow", policy, capacity, ra_pages, max_order)
        fast_out = run_reads(fast, scenario, short_path=True)
        slow_out = run_reads(slow, scenario, short_path=False)
        assert [isinstance(o, str) and o for o in fast_out] == [
            isinstance(o, str) and o for o in slow_out
        ]
        done = [
            (a, b)
            for a, b in zip(fast_out, slow_out, strict=True)
            if not isinstance(a, str) and not isinstance(b, str)
        ]
        assert [a[0] for a, _ in done] == [b[0] for _, b in done]
        assert_same_stats([a[1] for a, _ in done], [b[1] for _, b in done])
        assert read_snapshot(fast) == read_snapshot(slow)


def test_read_short_path_is_taken_for_hits_inside_a_folio(tmp_path: Path) -> None:
    """Repeated small reads of a cached large folio go the short way and count as hits."""
    machine = new_machine(tmp_path, "two_list", 200, 32, 9)
    files = machine.files
    files.write("a", 0, b"x" * (16 * PAGE_SIZE))
    hits_before = files.nr_read_hits
    faults_before = machine.events[VmEvent.PGFAULT]
    for page in (3, 9, 3, 15):
        data, stats = files.read("a", page * PAGE_SIZE + 10, 50)
        assert data == b"x" * 50
        assert (stats.pages_hit, stats.pages_missed, stats.pages_readahead) == (1, 0, 0)
    assert files.nr_read_hits == hits_before + 4
    assert machine.events[VmEvent.PGFAULT] == faults_before + 4
    assert files.lookup("a").ra.prev_pos == 15 * PAGE_SIZE + 60
