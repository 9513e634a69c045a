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

from collections.abc import Iterator
from typing import ClassVar

from foliod.mm.folio_store import EVICTION_MASK, NO_FOLIO, PG_REFERENCED, FolioStore
from foliod.mm.lru.base import ReclaimPolicy
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
# The gen column holds a sequence number's low bits (generations span at most MAX_NR_GENS).
GEN_MASK = 0xFF


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

    def __init__(self, events: dict[VmEvent, int], store: FolioStore | None = None) -> None:
        super().__init__(events, store)
        # lru_gen_init_lruvec: max_seq = MIN_NR_GENS + 1, min_seq = 0.
        self.min_seq = 0
        self.max_seq = MIN_NR_GENS + 1
        # Per generation, the head of its list of folios from the old end (scanned first) to
        # the young end.
        self.gens: dict[int, int] = {
            seq: self.store.new_list() for seq in range(self.min_seq, self.max_seq + 1)
        }
        self.gen_pages: dict[int, int] = dict.fromkeys(self.gens, 0)
        self.gen_folios: dict[int, int] = dict.fromkeys(self.gens, 0)
        # Pages per tier since min_seq last moved, and the averages of the windows before.
        self.refaulted = [0] * MAX_NR_TIERS
        self.evicted = [0] * MAX_NR_TIERS
        self.protected = [0] * MAX_NR_TIERS
        self.avg_refaulted = [0] * MAX_NR_TIERS
        self.avg_total = [0] * MAX_NR_TIERS
        # The protection threshold of the current batch; None until the next scan reads it.
        self.tier_idx: int | None = None

    # -- generations ------------------------------------------------------------------------

    def seq_of(self, f: int) -> int:
        """The generation a folio is in (from the low bits the gen column keeps)."""
        return self.min_seq + ((self.store.gen[f] - self.min_seq) & GEN_MASK)

    def _put(self, f: int, seq: int, old_end: bool = False) -> None:
        store = self.store
        store.gen[f] = seq & GEN_MASK
        if old_end:
            store.list_add(f, self.gens[seq])
        else:
            store.list_add_tail(f, self.gens[seq])
        self.gen_pages[seq] += 1 << store.order[f]
        self.gen_folios[seq] += 1

    def _take(self, f: int) -> None:
        store = self.store
        seq = self.seq_of(f)
        store.list_del(f)
        self.gen_pages[seq] -= 1 << store.order[f]
        self.gen_folios[seq] -= 1

    def _inc_gen(self, f: int, old_end: bool) -> None:
        """folio_inc_gen: into min_seq + 1, its refs and PG_referenced cleared."""
        self._take(f)
        store = self.store
        store.refs[f] = 0
        store.flags[f] &= ~PG_REFERENCED
        self._put(f, self.min_seq + 1, old_end)

    def inc_max_seq(self) -> None:
        """Aging: a new, empty youngest generation (nothing to promote without page tables)."""
        assert self.max_seq - self.min_seq + 1 < MAX_NR_GENS, "aging with MAX_NR_GENS"
        self.max_seq += 1
        self.gens[self.max_seq] = self.store.new_list()
        self.gen_pages[self.max_seq] = 0
        self.gen_folios[self.max_seq] = 0

    def inc_min_seq(self) -> None:
        """The empty oldest generation ends; the window's counts fold into the averages
        (reset_ctrl_pos with carryover)."""
        assert self.store.list_empty(self.gens[self.min_seq]), "the oldest generation is not empty"
        self.store.release(self.gens.pop(self.min_seq))
        del self.gen_pages[self.min_seq], self.gen_folios[self.min_seq]
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

    def add(self, f: int) -> None:
        store = self.store
        store.refs[f] = 0
        store.flags[f] &= ~PG_REFERENCED
        seq = self.min_seq
        if self.min_seq + MIN_NR_GENS < self.max_seq:
            seq += 1
        self._put(f, seq)
        self.nr_pages += 1 << store.order[f]

    def remove(self, f: int) -> None:
        self._take(f)
        self.nr_pages -= 1 << self.store.order[f]

    def mark_accessed(self, f: int, *, fresh: bool = False) -> None:
        store = self.store
        if not store.flags[f] & PG_REFERENCED:
            store.flags[f] |= PG_REFERENCED
        elif store.refs[f] < MAX_REFS:
            store.refs[f] += 1

    def shadow(self, f: int) -> int:
        store = self.store
        refs = store.refs[f] if store.flags[f] & PG_REFERENCED else 0
        self.evicted[lru_tier_from_refs(refs)] += 1 << store.order[f]
        self.tier_idx = None
        return (self.min_seq << _REFS_SHIFT | refs) + 1  # + 1: a token is never 0

    def refault(self, f: int, shadow: int) -> None:
        super().refault(f, shadow)
        token = (shadow - 1) & EVICTION_MASK
        if token >> _REFS_SHIFT != self.min_seq & (EVICTION_MASK >> _REFS_SHIFT):
            return
        refs = token & ((1 << _REFS_SHIFT) - 1)
        nr = 1 << self.store.order[f]
        self.refaulted[lru_tier_from_refs(refs)] += nr
        self.events[VmEvent.WORKINGSET_ACTIVATE_FILE] += nr
        self.tier_idx = None
        if refs >= MAX_REFS - 1:
            self.store.refs[f] = MAX_REFS

    @property
    def nr_active(self) -> int:
        return self.gen_pages[self.max_seq] + self.gen_pages[self.max_seq - 1]

    def victim(self) -> int:
        store = self.store
        refs_of = store.refs
        while self.nr_pages:
            if self.max_seq - self.min_seq < MIN_NR_GENS:
                self.inc_max_seq()
                continue
            f = store.list_first(self.gens[self.min_seq])
            if f == NO_FOLIO:
                self.inc_min_seq()
                continue
            if self.tier_idx is None:
                self.tier_idx = self.get_tier_idx()
            refs = refs_of[f]
            tier = lru_tier_from_refs(refs)
            if tier > self.tier_idx or refs == MAX_REFS:
                nr = 1 << store.order[f]
                self._inc_gen(f, old_end=True)
                self.protected[tier] += nr
                self.events[VmEvent.PGREFILL] += nr
                continue
            return f
        return NO_FOLIO

    def pass_over(self, f: int) -> None:
        self._inc_gen(f, old_end=False)

    def folios(self) -> Iterator[int]:
        for head in list(self.gens.values()):
            yield from self.store.list_iter(head)

    def lists(self) -> dict[str, int]:
        return {f"gen{seq - self.min_seq}": n for seq, n in self.gen_folios.items()}

    def list_pages(self) -> dict[str, int]:
        return {f"gen{seq - self.min_seq}": self.gen_pages[seq] for seq in self.gens}

    def check(self) -> None:
        super().check()
        store = self.store
        nr_gens = self.max_seq - self.min_seq + 1
        assert MIN_NR_GENS <= nr_gens <= MAX_NR_GENS, f"{nr_gens} generations"
        assert list(self.gens) == list(range(self.min_seq, self.max_seq + 1)), "gens off"
        assert self.gen_pages.keys() == self.gens.keys(), "generation page counts off"
        for seq, head in self.gens.items():
            gen = list(store.list_iter(head))
            assert all(self.seq_of(f) == seq for f in gen), (
                f"a folio in generation {seq} says otherwise"
            )
            pages = sum(1 << store.order[f] for f in gen)
            assert self.gen_pages[seq] == pages, f"gen {seq} count off"
            assert self.gen_folios[seq] == len(gen), f"gen {seq} folio count off"
            assert all(0 <= store.refs[f] <= MAX_REFS for f in gen), f"refs out of range in {seq}"
        counters = (self.refaulted, self.evicted, self.protected)
        assert all(n >= 0 for c in (*counters, self.avg_refaulted, self.avg_total) for n in c)
        assert self.protected[0] == 0, "tier 0 is never protected"
        assert self.tier_idx is None or 0 <= self.tier_idx < MAX_NR_TIERS, "tier_idx off"
