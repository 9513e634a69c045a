"""The multi-generational LRU for page cache folios (mm/vmscan.c lru_gen, mm/workingset.c).

Follows Linux 6.6 to 6.13 (with "mm/mglru: fix underprotected page cache", before 6.14 reworked
workingset protection) for unmapped file folios read and written through file descriptors.

Generations: min_seq..max_seq, 2 to 4 of them; the two youngest are Active(file). A new folio
joins min_seq + 1, or min_seq while that would be one of the two youngest (min_seq +
MIN_NR_GENS >= max_seq: lru_gen_add_folio), at the young end. Eviction scans the oldest
generation from its old end (sort_folio); only with more than MIN_NR_GENS generations: with
two left, aging (inc_max_seq) opens a new youngest one. Page cache has no accessed bits for
aging to walk, so it moves nothing. An emptied oldest generation ends (try_to_inc_min_seq).

Tiers: folio_mark_accessed sets PG_referenced (`referenced`) on the first access and counts
each later one in `refs` (folio_inc_refs; PG_workingset and LRU_REFS_MASK), up to 4, so that
tier = order_base_2(refs + 1): a folio accessed N times is in tier order_base_2(N). The scan
protects a folio whose tier is above tier_idx, or whose refs are saturated: it moves to the old
end of min_seq + 1 with its refs and PG_referenced cleared (folio_inc_gen), counted as
protected[tier] and pgrefill. Any other folio is the victim.

Feedback (get_tier_idx): per tier, refaulted, evicted and protected pages since min_seq last
moved, and averages folded in when it moves, avg = (avg + current) / 2 (NR_HIST_GENS = 1). Tier
0 is the setpoint (gain 1), tiers 1..3 in turn the process variable (gain 2): tier_idx is one
below the first tier whose refaulted / (evicted + protected) exceeds twice tier 0's
(positive_ctrl_err false), so tiers above it are protected. A tier with under 64 refaulted
pages never ends the search, so with little history only saturated folios are protected. As
the kernel reads it once per batch of isolation, tier_idx is read for the first victim sought
after an eviction, a refault or min_seq moving, and holds until then (so victim() asked twice
answers alike).

Shadow tokens (lru_gen_eviction): the min_seq at eviction and the folio's refs (0 unless it is
PG_referenced: isolate_folio), counted in evicted[tier]. A refault whose token's min_seq is
still min_seq is recent (lru_gen_test_recent): it counts refaulted[tier] and
workingset_activate_file, and one with refs >= 3 comes back saturated, protected at its first
scan. Every refault counts workingset_refault_file.

Left out or different: anon folios, page table walks, swappiness and the type choice; the aging
heuristics of should_run_aging at three generations (they need reclaim priorities; here aging
runs only when eviction would stall); batches of MIN_LRU_BATCH; workingset_restore_file. Dirty
and busy folios are the shared loop's (base.py): a dirty victim is written back and freed at
once, a busy one moves to the young end of min_seq + 1 with its refs cleared (folio_inc_gen).
pgactivate is not counted: lru_gen counts it only for mapped folios (folio_activate).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from typing import ClassVar

from foliod.mm.lru.base import ReclaimPolicy
from foliod.mm.mm_types import Folio
from foliod.mm.vmstat import VmEvent

MIN_NR_GENS = 2
MAX_NR_GENS = 4
MAX_NR_TIERS = 4
# folio_lru_refs() of a folio accessed 5 or more times: BIT(LRU_REFS_WIDTH).
MAX_REFS = 4
# Refaulted pages a tier needs before the feedback trusts it (BITS_PER_LONG).
MIN_LRU_BATCH = 64
# Bits of a shadow token below the sequence number: the refs (0..MAX_REFS).
_REFS_SHIFT = 3


def lru_tier_from_refs(refs: int) -> int:
    """order_base_2(refs + 1): refs 0 -> tier 0, 1 -> 1, 2..3 -> 2, 4 -> 3."""
    return refs.bit_length()


def positive_ctrl_err(sp: tuple[int, int, int], pv: tuple[int, int, int]) -> bool:
    """The process variable (refaulted, total, gain) refaults no more than the setpoint, or
    too little to tell."""
    sp_refaulted, sp_total, sp_gain = sp
    pv_refaulted, pv_total, pv_gain = pv
    return (
        pv_refaulted < MIN_LRU_BATCH
        or pv_refaulted * (sp_total + MIN_LRU_BATCH) * sp_gain
        <= (sp_refaulted + 1) * pv_total * pv_gain
    )


class Mglru(ReclaimPolicy):
    name: ClassVar[str] = "mglru"

    def __init__(self, events: dict[VmEvent, int]) -> None:
        super().__init__(events)
        # lru_gen_init_lruvec: max_seq = MIN_NR_GENS + 1, min_seq = 0.
        self.min_seq = 0
        self.max_seq = MIN_NR_GENS + 1
        # Per generation, its folios from the old end (scanned first) to the young end.
        self.gens: dict[int, OrderedDict[Folio, None]] = {
            seq: OrderedDict() for seq in range(self.min_seq, self.max_seq + 1)
        }
        self.gen_pages: dict[int, int] = dict.fromkeys(self.gens, 0)
        # Pages per tier since min_seq last moved, and the averages of the windows before.
        self.refaulted = [0] * MAX_NR_TIERS
        self.evicted = [0] * MAX_NR_TIERS
        self.protected = [0] * MAX_NR_TIERS
        self.avg_refaulted = [0] * MAX_NR_TIERS
        self.avg_total = [0] * MAX_NR_TIERS
        # The protection threshold of the current batch; None until the next scan reads it.
        self.tier_idx: int | None = None

    # -- generations ------------------------------------------------------------------------

    def __put(self, folio: Folio, seq: int) -> None:
        folio.gen = seq
        self.gens[seq][folio] = None
        self.gen_pages[seq] += folio.nr_pages

    def __take(self, folio: Folio) -> None:
        del self.gens[folio.gen][folio]
        self.gen_pages[folio.gen] -= folio.nr_pages

    def __inc_gen(self, folio: Folio, old_end: bool) -> None:
        """folio_inc_gen: into min_seq + 1, its refs and PG_referenced cleared."""
        self.__take(folio)
        folio.refs = 0
        folio.referenced = False
        self.__put(folio, self.min_seq + 1)
        if old_end:
            self.gens[self.min_seq + 1].move_to_end(folio, last=False)

    def inc_max_seq(self) -> None:
        """Aging: a new, empty youngest generation (nothing to promote without page tables)."""
        assert self.max_seq - self.min_seq + 1 < MAX_NR_GENS, "aging with MAX_NR_GENS"
        self.max_seq += 1
        self.gens[self.max_seq] = OrderedDict()
        self.gen_pages[self.max_seq] = 0

    def inc_min_seq(self) -> None:
        """The empty oldest generation ends; the window's counts fold into the averages
        (reset_ctrl_pos with carryover)."""
        assert not self.gens[self.min_seq], "the oldest generation is not empty"
        del self.gens[self.min_seq], self.gen_pages[self.min_seq]
        self.min_seq += 1
        for tier in range(MAX_NR_TIERS):
            self.avg_refaulted[tier] = (self.avg_refaulted[tier] + self.refaulted[tier]) // 2
            self.avg_total[tier] = (
                self.avg_total[tier] + self.evicted[tier] + self.protected[tier]
            ) // 2
            self.refaulted[tier] = self.evicted[tier] = self.protected[tier] = 0
        self.tier_idx = None

    # -- feedback ---------------------------------------------------------------------------

    def read_ctrl_pos(self, tier: int, gain: int) -> tuple[int, int, int]:
        """A tier's (refaulted, total, gain): this window's counts plus the averages."""
        refaulted = self.avg_refaulted[tier] + self.refaulted[tier]
        total = self.avg_total[tier] + self.evicted[tier] + self.protected[tier]
        return refaulted, total, gain

    def get_tier_idx(self) -> int:
        """The highest tier left unprotected, from the counts as they stand."""
        sp = self.read_ctrl_pos(0, 1)
        for tier in range(1, MAX_NR_TIERS):
            if not positive_ctrl_err(sp, self.read_ctrl_pos(tier, 2)):
                return tier - 1
        return MAX_NR_TIERS - 1

    # -- the policy -------------------------------------------------------------------------

    def add(self, folio: Folio) -> None:
        folio.refs = 0
        folio.referenced = False
        seq = self.min_seq
        if self.min_seq + MIN_NR_GENS < self.max_seq:
            seq += 1
        self.__put(folio, seq)
        self.nr_pages += folio.nr_pages

    def remove(self, folio: Folio) -> None:
        self.__take(folio)
        self.nr_pages -= folio.nr_pages

    def mark_accessed(self, folio: Folio, fresh: bool = False) -> None:
        if not folio.referenced:
            folio.referenced = True
        elif folio.refs < MAX_REFS:
            folio.refs += 1

    def shadow(self, folio: Folio) -> int:
        refs = folio.refs if folio.referenced else 0
        self.evicted[lru_tier_from_refs(refs)] += folio.nr_pages
        self.tier_idx = None
        return (self.min_seq << _REFS_SHIFT | refs) + 1  # + 1: a token is never 0

    def refault(self, folio: Folio, shadow: int) -> None:
        super().refault(folio, shadow)
        token = shadow - 1
        if token >> _REFS_SHIFT != self.min_seq:
            return
        refs = token & ((1 << _REFS_SHIFT) - 1)
        self.refaulted[lru_tier_from_refs(refs)] += folio.nr_pages
        self.events[VmEvent.WORKINGSET_ACTIVATE_FILE] += folio.nr_pages
        self.tier_idx = None
        if refs >= MAX_REFS - 1:
            folio.refs = MAX_REFS

    @property
    def nr_active(self) -> int:
        return self.gen_pages[self.max_seq] + self.gen_pages[self.max_seq - 1]

    def victim(self) -> Folio | None:
        gens = self.gens
        while self.nr_pages:
            if self.max_seq - self.min_seq < MIN_NR_GENS:
                self.inc_max_seq()
                continue
            oldest = gens[self.min_seq]
            if not oldest:
                self.inc_min_seq()
                continue
            if self.tier_idx is None:
                self.tier_idx = self.get_tier_idx()
            folio = next(iter(oldest))
            tier = lru_tier_from_refs(folio.refs)
            if tier > self.tier_idx or folio.refs == MAX_REFS:
                self.__inc_gen(folio, old_end=True)
                self.protected[tier] += folio.nr_pages
                self.events[VmEvent.PGREFILL] += folio.nr_pages
                continue
            return folio
        return None

    def pass_over(self, folio: Folio) -> None:
        self.__inc_gen(folio, old_end=False)

    def folios(self) -> Iterator[Folio]:
        for gen in self.gens.values():
            yield from gen

    def lists(self) -> dict[str, int]:
        return {f"gen{seq - self.min_seq}": len(gen) for seq, gen in self.gens.items()}

    def list_pages(self) -> dict[str, int]:
        return {f"gen{seq - self.min_seq}": self.gen_pages[seq] for seq in self.gens}

    def check(self) -> None:
        super().check()
        nr_gens = self.max_seq - self.min_seq + 1
        assert MIN_NR_GENS <= nr_gens <= MAX_NR_GENS, f"{nr_gens} generations"
        assert list(self.gens) == list(range(self.min_seq, self.max_seq + 1)), "gens off"
        assert self.gen_pages.keys() == self.gens.keys(), "generation page counts off"
        for seq, gen in self.gens.items():
            assert all(f.gen == seq for f in gen), f"a folio in generation {seq} says otherwise"
            assert self.gen_pages[seq] == sum(f.nr_pages for f in gen), f"gen {seq} count off"
            assert all(0 <= f.refs <= MAX_REFS for f in gen), f"refs out of range in gen {seq}"
        counters = (self.refaulted, self.evicted, self.protected)
        assert all(n >= 0 for c in (*counters, self.avg_refaulted, self.avg_total) for n in c)
        assert self.protected[0] == 0, "tier 0 is never protected"
        assert self.tier_idx is None or 0 <= self.tier_idx < MAX_NR_TIERS, "tier_idx off"
