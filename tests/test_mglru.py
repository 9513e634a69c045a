"""The mglru policy against lru_gen's rules, with every expected number worked out by hand.

Machines are plain N-page caches of one file (readahead off, base pages), as in
tests/test_policies.py; every access is one replay() of one page. A fresh policy has four
generations (lru_gen_init_lruvec: min_seq 0, max_seq 3) and no refault history, so tier_idx is 3
and only saturated folios (refs 4, five accesses) are protected until a tier has 64 refaults.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pytest

from foliod.mm import Machine, check_machine
from foliod.mm.folio_store import CacheFolio
from foliod.mm.lru.mglru import MAX_REFS, Mglru, lru_tier_from_refs
from tests.test_policies import FILE
from tests.test_policies import make_machine as make_policy_machine


def make_machine(tmp_path: Path, capacity: int, nr_keys: int = 5000) -> Machine:
    """A capacity-page cache of one nr_keys-page file under mglru."""
    return make_policy_machine(tmp_path, "mglru", capacity, nr_keys)


def policy_of(machine: Machine) -> Mglru:
    policy = machine.lru
    assert isinstance(policy, Mglru)
    return policy


def read(machine: Machine, keys: Iterable[int]) -> list[bool]:
    """Reads each page in turn; True where it hit."""
    return [machine.files.replay(FILE, [key]).pages_hit == 1 for key in keys]


def folio(machine: Machine, key: int) -> CacheFolio:
    return machine.files.files[FILE].folios[key]


def views(machine: Machine) -> list[CacheFolio]:
    """The policy's folios in its order, as objects."""
    return [machine.files.folio(f) for f in machine.lru.folios()]


def resident(machine: Machine) -> set[int]:
    return set(machine.files.files[FILE].folios)


def events(machine: Machine, *names: str) -> tuple[int, ...]:
    vmstat = machine.vmstat()
    return tuple(vmstat[name] for name in names)


REFAULT_COUNTS = ("workingset_refault_file", "workingset_activate_file")


def test_new_folios_join_min_seq_plus_one_only_with_four_generations(tmp_path: Path) -> None:
    """A new folio joins min_seq + 1 while there are four generations, else min_seq."""
    machine = make_machine(tmp_path, 2)
    policy = policy_of(machine)
    assert (policy.min_seq, policy.max_seq) == (0, 3)
    read(machine, [0, 1])
    assert folio(machine, 0).gen == folio(machine, 1).gen == 1
    # The first eviction ends the empty generation 0: three left, min_seq + 2 >= max_seq.
    read(machine, [2])
    assert (policy.min_seq, policy.max_seq) == (1, 3)
    assert folio(machine, 2).gen == policy.min_seq == 1
    assert resident(machine) == {1, 2}
    # The two youngest generations are Active(file); the new folios sit in the oldest.
    assert policy.nr_active == 0
    assert policy.list_pages() == {"gen0": 2, "gen1": 0, "gen2": 0}
    check_machine(machine)


@pytest.mark.parametrize(
    ("accesses", "refs", "tier"),
    [(1, 0, 0), (2, 1, 1), (3, 2, 2), (4, 3, 2), (5, 4, 3), (9, 4, 3)],
)
def test_tier_follows_the_access_count(tmp_path: Path, accesses: int, refs: int, tier: int) -> None:
    """The first access sets PG_referenced, later ones count in refs (up to 4), and the tier
    is order_base_2(refs + 1)."""
    machine = make_machine(tmp_path, 4)
    read(machine, [7] * accesses)
    page = folio(machine, 7)
    assert page.referenced
    assert (page.refs, lru_tier_from_refs(page.refs)) == (refs, tier)
    assert [lru_tier_from_refs(r) for r in range(MAX_REFS + 1)] == [0, 1, 2, 2, 3]


def test_saturated_folio_is_protected_and_tier_0_evicted(tmp_path: Path) -> None:
    """With no refault history only a saturated folio is protected: it moves to the old end
    of min_seq + 1 with its refs cleared, and the folio behind it, read twice (tier 1), is
    evicted."""
    machine = make_machine(tmp_path, 4)
    policy = policy_of(machine)
    read(machine, [0] * 5 + [1, 1, 2, 3])
    assert (folio(machine, 0).refs, folio(machine, 1).refs) == (MAX_REFS, 1)
    read(machine, [4])
    assert policy.get_tier_idx() == 3
    hot = folio(machine, 0)
    assert (hot.gen, hot.refs, hot.referenced) == (policy.min_seq + 1, 0, False)
    assert resident(machine) == {0, 2, 3, 4}
    assert policy.protected == [0, 0, 0, 1]
    # Page 1 (tier 1) was the victim.
    assert policy.evicted == [0, 1, 0, 0]
    assert machine.vmstat()["pgrefill"] == 1
    assert machine.vmstat()["pgactivate"] == 0
    check_machine(machine)


def test_victim_asked_twice_changes_nothing(tmp_path: Path) -> None:
    """victim() protects what it must once; asked again it returns the same folio and moves
    nothing."""
    machine = make_machine(tmp_path, 4)
    policy = policy_of(machine)
    read(machine, [0] * 5 + [1, 2, 3])
    first = policy.victim()
    state = [(f.index, f.gen, f.refs) for f in views(machine)]
    assert machine.files.folio(first) == folio(machine, 1)
    assert policy.victim() == first
    assert [(f.index, f.gen, f.refs) for f in views(machine)] == state
    assert policy.protected == [0, 0, 0, 1]


@pytest.mark.parametrize(("accesses", "tier", "tier_idx"), [(2, 1, 0), (3, 2, 1)])
def test_tier_refaulting_more_than_tier_0_gets_protected(
    tmp_path: Path, accesses: int, tier: int, tier_idx: int
) -> None:
    """Once a tier's recent refaults outweigh tier 0's, tier_idx drops below it and its
    folios are protected rather than evicted."""
    machine = make_machine(tmp_path, 300)
    policy = policy_of(machine)
    # Pages 0..99 in the tested tier, 100..299 in tier 0, all in generation 1.
    read(machine, [key for key in range(100) for _ in range(accesses)])
    read(machine, range(100, 300))
    # 100 new pages evict 0..99 (tier_idx 3 protects nothing below tier 3): evicted[tier].
    read(machine, range(1000, 1100))
    assert policy.min_seq == 1
    assert policy.evicted[tier] == 100
    assert not resident(machine) & set(range(100))
    # Re-reading them evicts 100..199 (tier 0) and refaults all 100 within min_seq 1.
    assert not any(read(machine, range(100)))
    assert policy.min_seq == 1
    expected = [0, 0, 0, 0]
    expected[tier] = 100
    assert policy.refaulted == expected
    assert policy.evicted[0] == 100
    assert policy.protected == [0, 0, 0, 0]
    # By hand: sp = (refaulted 0, total 100, gain 1). Tiers below the tested one have no
    # refaults (< 64: positive error, go on); the tested one has pv = (100, 100, gain 2) and
    # 100 * (100 + 64) * 1 = 16400 > (0 + 1) * 100 * 2 = 200: negative error, stop there.
    assert policy.get_tier_idx() == tier_idx
    assert events(machine, *REFAULT_COUNTS) == (100, 100)
    # Page 200 is now first in the oldest generation; read into the tested tier, it is
    # protected and 201 (tier 0) goes instead.
    read(machine, [200] * (accesses - 1))
    read(machine, [2000])
    assert policy.get_tier_idx() == tier_idx
    assert 200 in resident(machine) and 201 not in resident(machine)
    assert folio(machine, 200).gen == policy.min_seq + 1
    assert policy.protected[tier] == 1
    check_machine(machine)


def test_recent_refault_counts_more_than_an_old_one(tmp_path: Path) -> None:
    """A refault whose token still names min_seq counts refaulted[tier] and
    workingset_activate_file; an older one only workingset_refault_file."""
    machine = make_machine(tmp_path, 2)
    policy = policy_of(machine)
    read(machine, [0, 1, 2])  # evicts 0 with min_seq 1
    read(machine, [1] * 4 + [2] * 4)  # 1 and 2 saturated
    # 3: both are protected, generation 1 empties (min_seq 2), aging opens 4, and 2 (the last
    # protected, first at the old end) is evicted with min_seq 2.
    read(machine, [3])
    assert (policy.min_seq, policy.max_seq) == (2, 4)
    assert resident(machine) == {1, 3}
    assert events(machine, *REFAULT_COUNTS) == (0, 0)
    read(machine, [0])  # evicted under min_seq 1: old
    assert events(machine, *REFAULT_COUNTS) == (1, 0)
    assert policy.refaulted == [0, 0, 0, 0]
    read(machine, [2])  # evicted under min_seq 2: recent
    assert events(machine, *REFAULT_COUNTS) == (2, 1)
    assert policy.refaulted == [1, 0, 0, 0]
    check_machine(machine)


def test_recent_refault_of_a_hot_folio_comes_back_saturated(tmp_path: Path) -> None:
    """A folio evicted with refs 3 that refaults recently comes back with refs 4, so the
    next scan protects it."""
    machine = make_machine(tmp_path, 2)
    policy = policy_of(machine)
    read(machine, [5] * 4 + [6])
    read(machine, [7])  # 5 (tier 2, not saturated) is evicted
    assert policy.evicted == [0, 0, 1, 0]
    read(machine, [5])  # evicts 6; 5 refaults within min_seq 1
    assert policy.refaulted == [0, 0, 1, 0]
    assert (folio(machine, 5).refs, folio(machine, 5).referenced) == (MAX_REFS, True)
    read(machine, [8, 9])  # 7 goes, then 5 is protected and 8 goes
    assert resident(machine) == {5, 9}
    assert policy.protected == [0, 0, 0, 1]
    check_machine(machine)


def test_history_folds_into_the_averages_when_min_seq_moves(tmp_path: Path) -> None:
    """When the oldest generation ends, each tier's average becomes (average + this window's
    count) // 2 and the window starts from zero."""
    machine = make_machine(tmp_path, 5)
    policy = policy_of(machine)
    pages, fresh = list(range(5)), list(range(100, 105))
    read(machine, pages)
    read(machine, fresh)  # evicts 0..4: evicted[0] = 5
    read(machine, pages)  # evicts 100..104 (evicted[0] = 10), refaults 0..4 (refaulted[0] = 5)
    assert (policy.min_seq, policy.refaulted, policy.evicted) == (1, [5, 0, 0, 0], [10, 0, 0, 0])
    read(machine, [key for key in pages for _ in range(4)])  # all five saturated
    # 200: all five protected (protected[3] = 5), generation 1 ends. Fold: refaulted
    # (0 + 5) // 2 = 2; total tier 0 (0 + 10) // 2 = 5, tier 3 (0 + 5) // 2 = 2. Then 4,
    # protected last, is evicted under min_seq 2.
    read(machine, [200])
    assert policy.min_seq == 2
    assert policy.avg_refaulted == [2, 0, 0, 0]
    assert policy.avg_total == [5, 0, 0, 2]
    assert (policy.refaulted, policy.evicted, policy.protected) == (
        [0, 0, 0, 0],
        [1, 0, 0, 0],
        [0, 0, 0, 0],
    )
    # Generation 2 now holds 3, 2, 1, 0, 200. Page 4 refaults (evicting 3): evicted[0] = 2,
    # refaulted[0] = 1. Saturating the five left protects them all at the next miss: fold
    # again, refaulted (2 + 1) // 2 = 1, total tier 0 (5 + 2) // 2 = 3, tier 3 (2 + 5) // 2 = 3.
    read(machine, [4])
    assert (policy.refaulted, policy.evicted) == ([1, 0, 0, 0], [2, 0, 0, 0])
    left = [2, 1, 0, 200, 4]
    read(machine, [key for key in left for _ in range(5 if key in (2, 1, 0) else 4)])
    assert all(folio(machine, key).refs == MAX_REFS for key in left)
    read(machine, [201])
    assert policy.min_seq == 3
    assert policy.avg_refaulted == [1, 0, 0, 0]
    assert policy.avg_total == [3, 0, 0, 3]
    check_machine(machine)


def test_hand_worked_trace(tmp_path: Path) -> None:
    """A 12-access trace on 3 pages hits 6 times under mglru, where lru and fifo hit 5."""
    # Pages a..f are 0..5. With tier_idx 3 throughout, only saturated folios are protected.
    #  1 a     miss  gen1 [a] (four generations: min_seq + 1)
    #  2-5 a   hit x4, refs 1, 2, 3, 4: saturated
    #  6 b     miss  gen1 [a b]
    #  7 c     miss  gen1 [a b c]
    #  8 d     miss  generation 0 ends (min_seq 1, three left); a is protected to gen2 (refs
    #                cleared); b (tier 0) evicted; d joins min_seq: gen1 [c d], gen2 [a]
    #  9 a     hit   (lru and fifo evicted a at 8)
    # 10 e     miss  c evicted: gen1 [d e]
    # 11 b     miss  d evicted; b refaults within min_seq 1 (recent): gen1 [e b]
    # 12 a     hit
    machine = make_machine(tmp_path, 3)
    policy_of(machine)  # the machine runs mglru
    a, b, c, d, e = range(5)
    got = read(machine, [a, a, a, a, a, b, c, d, a, e, b, a])
    assert got == [False, True, True, True, True, False, False, False, True, False, False, True]
    assert resident(machine) == {a, b, e}
    assert [(f.index, f.gen) for f in views(machine)] == [(e, 1), (b, 1), (a, 2)]
    assert events(machine, *REFAULT_COUNTS, "pgrefill") == (1, 1, 1)
    check_machine(machine)


def test_check_catches_a_folio_in_the_wrong_generation(tmp_path: Path) -> None:
    """check() notices a folio whose gen disagrees with the generation holding it."""
    machine = make_machine(tmp_path, 4)
    policy = policy_of(machine)
    read(machine, [0, 1])
    policy.check()
    folio(machine, 1).gen += 1
    with pytest.raises(AssertionError, match="generation"):
        policy.check()
