"""Reclaim policies against independent textbook references, access for access.

With readahead off, order-0 folios and a page cache capacity of N pages, replaying a trace one
page at a time makes foliod a plain N-slot cache, so the textbook policies (lru, fifo, clock)
must agree with the reference simulators below hit for hit and on the final resident set. The
kernel policies (two_list, mglru) get sanity checks whose outcome is worked out by hand.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import random
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import pytest

from foliod.mm import PAGE_SIZE, InvalidArgument, Machine, check_machine
from foliod.mm.backing_dev import DEVICE_PROFILES, BackingStore
from foliod.mm.lru import POLICIES

RAM_BYTES = 64 << 20  # 16384 pages: far more than any capacity used here
FILE = "trace"
TRACE_LEN = 4000
CAPACITIES = (1, 2, 7, 64, 500)
TRACES = ("uniform", "zipf0.8", "zipf1.2", "loop", "mixed")


# -- reference simulators (textbook definitions, independent of foliod) -------------------


class RefResult(NamedTuple):
    hits: list[bool]
    resident: set[int]


def ref_lru(trace: Sequence[int], capacity: int) -> RefResult:
    """LRU: a hit moves the key to the most recent end; a miss evicts the least recent."""
    order: OrderedDict[int, None] = OrderedDict()
    hits: list[bool] = []
    for key in trace:
        if key in order:
            order.move_to_end(key)
            hits.append(True)
            continue
        if len(order) == capacity:
            order.popitem(last=False)
        order[key] = None
        hits.append(False)
    return RefResult(hits, set(order))


def ref_fifo(trace: Sequence[int], capacity: int) -> RefResult:
    """FIFO: a hit changes nothing; a miss evicts the key inserted longest ago."""
    queue: deque[int] = deque()
    resident: set[int] = set()
    hits: list[bool] = []
    for key in trace:
        if key in resident:
            hits.append(True)
            continue
        if len(queue) == capacity:
            resident.remove(queue.popleft())
        queue.append(key)
        resident.add(key)
        hits.append(False)
    return RefResult(hits, resident)


def ref_clock(trace: Sequence[int], capacity: int) -> RefResult:
    """CLOCK: slots in a circle with one reference bit each, clear for a new key and set by a
    hit; a miss on a full clock sweeps the hand, clearing set bits, to the first clear one,
    replaces that key (bit clear) and leaves the hand one past it."""
    slots: list[int] = []
    bits: list[bool] = []
    where: dict[int, int] = {}
    hand = 0
    hits: list[bool] = []
    for key in trace:
        slot = where.get(key)
        if slot is not None:
            bits[slot] = True
            hits.append(True)
            continue
        hits.append(False)
        if len(slots) < capacity:
            where[key] = len(slots)
            slots.append(key)
            bits.append(False)
            continue
        while bits[hand]:
            bits[hand] = False
            hand = (hand + 1) % capacity
        del where[slots[hand]]
        slots[hand] = key
        bits[hand] = False
        where[key] = hand
        hand = (hand + 1) % capacity
    return RefResult(hits, set(slots))


REFERENCES: dict[str, Callable[[Sequence[int], int], RefResult]] = {
    "lru": ref_lru,
    "fifo": ref_fifo,
    "clock": ref_clock,
}


def test_references_on_hand_worked_traces() -> None:
    """The reference simulators give the textbook answers on small traces worked by hand."""
    trace = [1, 2, 3, 1, 4, 1, 2, 5]
    assert ref_lru(trace, 3) == RefResult(
        [False, False, False, True, False, True, False, False], {1, 2, 5}
    )
    assert ref_fifo(trace, 3) == RefResult(
        [False, False, False, True, False, False, False, False], {1, 2, 5}
    )
    # CLOCK: 1 2 3 fill the slots; 1 hits (sets its bit); 4 clears 1's bit and replaces 2;
    # 1 hits again; 2 replaces 3 (clear); 5 clears 1's bit and replaces 4.
    assert ref_clock(trace, 3) == RefResult(
        [False, False, False, True, False, True, False, False], {1, 2, 5}
    )
    assert ref_clock([0, 0, 1, 2, 0], 2).hits == [False, True, False, False, True]


# -- traces ------------------------------------------------------------------------------


def zipf_keys(rng: random.Random, nr_keys: int, alpha: float, length: int) -> list[int]:
    """Keys drawn with P(rank r) proportional to 1 / r**alpha by inverse-CDF sampling; ranks
    map to keys through a seeded permutation so hot keys are scattered over the file."""
    cumulative = list(itertools.accumulate(1.0 / rank**alpha for rank in range(1, nr_keys + 1)))
    total = cumulative[-1]
    keys = list(range(nr_keys))
    rng.shuffle(keys)
    return [
        keys[min(bisect.bisect_right(cumulative, rng.random() * total), nr_keys - 1)]
        for _ in range(length)
    ]


def loop_length(capacity: int) -> int:
    """A loop slightly larger than the capacity (the classic LRU/FIFO worst case)."""
    return capacity + max(1, capacity // 8)


def mixed_keys(rng: random.Random, capacity: int, length: int) -> list[int]:
    """Phases of Zipf traffic, a one-pass scan of never-seen pages, uniform traffic and a loop."""
    keys: list[int] = []
    next_scan = 10_000
    while len(keys) < length:
        keys += zipf_keys(rng, 2000, 1.0, 400)
        scan = min(2 * capacity + 3, 400)
        keys += range(next_scan, next_scan + scan)
        next_scan += scan
        keys += (rng.randrange(1000) for _ in range(300))
        keys += (3000 + i % loop_length(capacity) for i in range(300))
    return keys[:length]


@functools.cache
def trace_for(name: str, capacity: int) -> tuple[int, ...]:
    """The named trace (deterministic: each has its own seed), TRACE_LEN accesses long."""
    seed = TRACES.index(name) * 1000 + capacity
    rng = random.Random(seed)
    if name == "uniform":
        keys = [rng.randrange(1000) for _ in range(TRACE_LEN)]
    elif name.startswith("zipf"):
        keys = zipf_keys(rng, 5000, float(name.removeprefix("zipf")), TRACE_LEN)
    elif name == "loop":
        keys = [i % loop_length(capacity) for i in range(TRACE_LEN)]
    else:
        keys = mixed_keys(rng, capacity, TRACE_LEN)
    return tuple(keys)


# -- foliod side -------------------------------------------------------------------------


def make_machine(tmp_path: Path, policy: str, capacity: int, nr_keys: int) -> Machine:
    """A machine whose page cache is a plain capacity-page cache of one nr_keys-page file."""
    machine = Machine(
        "t",
        RAM_BYTES,
        store=BackingStore(tmp_path / f"store-{policy}", DEVICE_PROFILES["nvme"]),
        reclaim_policy=policy,
        cache_capacity_pages=capacity,
        ra_pages=0,
        max_file_order=0,
    )
    machine.files.create(FILE)
    machine.files.truncate(FILE, nr_keys * PAGE_SIZE)
    return machine


def replay_each(machine: Machine, trace: Sequence[int]) -> list[bool]:
    """Replays the trace one access per call; True where the access hit."""
    fs = machine.files
    hits: list[bool] = []
    for i, key in enumerate(trace):
        stats = fs.replay(FILE, [key])
        outcome = (stats.pages_hit, stats.pages_missed, stats.pages_readahead)
        assert outcome in {(1, 0, 0), (0, 1, 0)}, f"access {i} (page {key}): {outcome}"
        hits.append(stats.pages_hit == 1)
    return hits


def resident(machine: Machine) -> set[int]:
    return set(machine.files.files[FILE].folios)


def first_mismatch(got: Sequence[bool], want: Sequence[bool]) -> int | None:
    return next((i for i, (g, w) in enumerate(zip(got, want, strict=True)) if g != w), None)


def check_against_reference(
    tmp_path: Path, policy: str, capacity: int, trace: Sequence[int]
) -> None:
    """foliod's hit/miss sequence and final resident set equal the reference's exactly."""
    machine = make_machine(tmp_path, policy, capacity, max(trace) + 1)
    got = replay_each(machine, trace)
    want = REFERENCES[policy](trace, capacity)
    at = first_mismatch(got, want.hits)
    assert at is None, (
        f"{policy} cap {capacity}: access {at} (page {trace[at]}) foliod "
        f"{'hit' if got[at] else 'miss'}, reference {'hit' if want.hits[at] else 'miss'}; "
        f"preceding accesses {list(trace[max(0, at - 8) : at])}"
    )
    assert resident(machine) == want.resident
    assert machine.files.nr_pages == len(want.resident) <= capacity
    check_machine(machine)


# -- 1. textbook policies, access for access --------------------------------------------


@pytest.mark.parametrize("trace_name", TRACES)
@pytest.mark.parametrize("capacity", CAPACITIES)
@pytest.mark.parametrize("policy", ["lru", "fifo", "clock"])
def test_textbook_policy_matches_reference(
    tmp_path: Path, policy: str, capacity: int, trace_name: str
) -> None:
    """Each textbook policy hits and misses exactly where its reference does, and keeps the
    same pages."""
    trace: Sequence[int] = trace_for(trace_name, capacity)
    check_against_reference(tmp_path, policy, capacity, trace)


@pytest.mark.parametrize("policy", ["lru", "fifo", "clock"])
def test_batched_replay_counts_match_reference(tmp_path: Path, policy: str) -> None:
    """Replaying a whole trace in one call hits as often as the reference says."""
    trace = trace_for("mixed", 64)
    machine = make_machine(tmp_path, policy, 64, max(trace) + 1)
    stats = machine.files.replay(FILE, trace)
    want = REFERENCES[policy](trace, 64)
    assert (stats.pages_hit, stats.pages_missed) == (
        sum(want.hits),
        len(trace) - sum(want.hits),
    )
    assert resident(machine) == want.resident
    check_machine(machine)


def test_clock_immediate_repeat_sets_reference_bit(tmp_path: Path) -> None:
    """A hit right after the page's own miss sets the bit, so the page survives one sweep."""
    check_against_reference(tmp_path, "clock", 2, [0, 0, 1, 2, 0])


def test_clock_matches_reference_on_raw_zipf(tmp_path: Path) -> None:
    """CLOCK matches the reference on a Zipf trace that keeps its immediate repeats."""
    check_against_reference(tmp_path, "clock", 64, trace_for("zipf1.2", 64))


@pytest.mark.parametrize("policy", ["lru", "fifo", "clock"])
def test_reads_through_read_match_reference(tmp_path: Path, policy: str) -> None:
    """4 KiB reads through read() (the ReadFile path) hit where the reference does, immediate
    repeats included: a textbook policy counts a read that starts in the folio where the
    previous one ended, which the kernel's policies skip (pos_same_folio)."""
    trace = trace_for("zipf1.2", 64)
    assert any(a == b for a, b in itertools.pairwise(trace)), "the trace has immediate repeats"
    machine = make_machine(tmp_path, policy, 64, max(trace) + 1)
    got = []
    for key in trace:
        _, stats = machine.files.read(FILE, key * PAGE_SIZE, PAGE_SIZE)
        got.append(stats.pages_hit == 1)
    want = REFERENCES[policy](trace, 64)
    assert first_mismatch(got, want.hits) is None
    assert resident(machine) == want.resident
    check_machine(machine)


# -- 2. kernel policies: sanity ----------------------------------------------------------


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_working_set_that_fits_is_fully_hit(tmp_path: Path, policy: str) -> None:
    """After a cold fill and one warm-up pass, a working set of capacity pages always hits."""
    capacity = 100
    machine = make_machine(tmp_path, policy, capacity, 2000)
    cold = range(1000, 1000 + capacity)
    working_set = range(capacity)
    assert not any(replay_each(machine, cold))
    assert not any(replay_each(machine, working_set))
    assert resident(machine) == set(working_set)
    rng = random.Random(7)
    stats = machine.files.replay(FILE, [rng.choice(working_set) for _ in range(3000)])
    assert (stats.pages_hit, stats.pages_missed) == (3000, 0)
    assert resident(machine) == set(working_set)
    check_machine(machine)


def hot_then_scan(hot: int, scan_start: int, scan: int) -> list[int]:
    """The hot pages twice, a one-pass scan of scan cold pages, then the hot pages again."""
    return [*range(hot), *range(hot), *range(scan_start, scan_start + scan), *range(hot)]


def test_two_list_hot_set_survives_scan(tmp_path: Path) -> None:
    """Under two_list, pages read twice are activated and outlive a scan 10x the capacity."""
    capacity, hot, scan = 100, 20, 1000
    trace = hot_then_scan(hot, 1000, scan)
    machine = make_machine(tmp_path, "two_list", capacity, 1000 + scan)
    got = replay_each(machine, trace)
    # First pass misses (PG_referenced set), second hits and activates, the scan only ever
    # sees inactive cold pages (inactive 80 >= active 20: no deactivation), so all hot pages
    # stay, together with the scan's last 80 pages.
    expected = [False] * hot + [True] * hot + [False] * scan + [True] * hot
    assert got == expected
    assert resident(machine) == set(range(hot)) | set(range(1000 + scan - (capacity - hot), 2000))
    vmstat = machine.vmstat()
    assert vmstat["pgactivate"] == hot > 0
    assert vmstat["nr_active_file"] == hot
    assert vmstat["nr_inactive_file"] == capacity - hot
    # Plain LRU loses the whole hot set to the same scan.
    assert ref_lru(trace, capacity).hits[-hot:] == [False] * hot
    check_machine(machine)


def test_mglru_protects_hot_pages_better_than_fifo(tmp_path: Path) -> None:
    """Under mglru, pages read twice survive repeated one-pass scans that flush fifo."""
    capacity, hot, scan, rounds = 100, 20, 2 * 100, 10
    trace: list[int] = []
    for r in range(rounds):
        trace += [*range(hot), *range(hot), *range(1000 + r * scan, 1000 + (r + 1) * scan)]
    trace += range(hot)
    hits: dict[str, int] = {}
    for policy in ("mglru", "fifo"):
        machine = make_machine(tmp_path, policy, capacity, 1000 + rounds * scan)
        got = replay_each(machine, trace)
        hits[policy] = sum(got)
        if policy == "mglru":
            # Read twice, the hot pages are in tier 1; once their refaults outweigh tier 0's
            # (round 5), tier_idx drops to 0 and eviction moves them up a generation instead.
            assert got[-hot:] == [True] * hot
            assert set(range(hot)) <= resident(machine)
        else:
            assert got == ref_fifo(trace, capacity).hits
            assert got[-hot:] == [False] * hot
        check_machine(machine)
    assert hits["mglru"] > hits["fifo"]


# -- 3. the registry ---------------------------------------------------------------------


def test_policy_registry_and_unknown_policy() -> None:
    """POLICIES names exactly the five policies, and an unknown name is InvalidArgument."""
    assert set(POLICIES) == {"two_list", "mglru", "lru", "fifo", "clock"}
    assert all(cls.name == name for name, cls in POLICIES.items())
    with pytest.raises(InvalidArgument):
        Machine("t", RAM_BYTES, reclaim_policy="nope")
