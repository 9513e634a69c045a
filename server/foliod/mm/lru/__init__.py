"""Reclaim policies for the file LRU, one per module, looked up by name (mm/vmscan.c, mm/swap.c).

`two_list` is the kernel's active/inactive lists (the default), `mglru` the multi-generational
LRU; `lru`, `fifo` and `clock` are the textbook policies used to check the simulator against
standard cache simulators page for page.
"""

from foliod.mm.lru.base import Evictor, ReclaimPolicy
from foliod.mm.lru.clock import Clock
from foliod.mm.lru.fifo import Fifo
from foliod.mm.lru.lru import Lru
from foliod.mm.lru.mglru import Mglru
from foliod.mm.lru.two_list import TwoList

POLICIES: dict[str, type[ReclaimPolicy]] = {
    policy.name: policy for policy in (TwoList, Mglru, Lru, Fifo, Clock)
}

__all__ = ["POLICIES", "Clock", "Evictor", "Fifo", "Lru", "Mglru", "ReclaimPolicy", "TwoList"]
