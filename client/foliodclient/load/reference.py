"""Textbook caches (LRU, FIFO, CLOCK) in process, independent of foliod: the reference miss
counts foliod-load mrc prints beside the server's, registered by the reclaim policy they twin;
and the same three from libCacheSim (its PyPI package, optional) where it is installed.
"""

from __future__ import annotations

import importlib
import importlib.util
import struct
import tempfile
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable, Iterable
from pathlib import Path


def lru_misses(keys: Iterable[Hashable], nr_pages: int) -> int:
    """LRU: a hit moves the key to the most recent end; a miss evicts the least recent."""
    order: OrderedDict[Hashable, None] = OrderedDict()
    misses = 0
    for key in keys:
        if key in order:
            order.move_to_end(key)
            continue
        misses += 1
        if len(order) == nr_pages:
            order.popitem(last=False)
        order[key] = None
    return misses


def fifo_misses(keys: Iterable[Hashable], nr_pages: int) -> int:
    """FIFO: a hit changes nothing; a miss evicts the key inserted longest ago."""
    queue: deque[Hashable] = deque()
    resident: set[Hashable] = set()
    misses = 0
    for key in keys:
        if key in resident:
            continue
        misses += 1
        if len(queue) == nr_pages:
            resident.remove(queue.popleft())
        queue.append(key)
        resident.add(key)
    return misses


def clock_misses(keys: Iterable[Hashable], nr_pages: int) -> int:
    """CLOCK: one reference bit a slot, clear for a new key and set by a hit; a miss on a full
    clock sweeps the hand, clearing set bits, to the first clear slot and replaces its key."""
    slots: list[Hashable] = []
    bits: list[bool] = []
    where: dict[Hashable, int] = {}
    hand = misses = 0
    for key in keys:
        slot = where.get(key)
        if slot is not None:
            bits[slot] = True
            continue
        misses += 1
        if len(slots) < nr_pages:
            where[key] = len(slots)
            slots.append(key)
            bits.append(False)
            continue
        while bits[hand]:
            bits[hand] = False
            hand = (hand + 1) % nr_pages
        del where[slots[hand]]
        slots[hand] = key
        bits[hand] = False
        where[key] = hand
        hand = (hand + 1) % nr_pages
    return misses


# The reclaim policies with a textbook twin, and the twin's miss count.
REFERENCES: dict[str, Callable[[Iterable[Hashable], int], int]] = {
    "clock": clock_misses,
    "fifo": fifo_misses,
    "lru": lru_misses,
}


# The reclaim policies with a libCacheSim twin, and the twin's class in its Python package.
LIBCACHESIM = {"clock": "Clock", "fifo": "FIFO", "lru": "LRU"}
_ORACLE_GENERAL = struct.Struct("<IQIq")


def libcachesim_available() -> bool:
    return importlib.util.find_spec("libcachesim") is not None


def libcachesim_misses(policy: str, keys: Iterable[int], nr_pages: int) -> int:
    """Misses of libCacheSim's twin of `policy` holding `nr_pages` keys, on `keys` written to a
    temporary oracleGeneral file (size 1 each) and read by its own reader with
    --ignore-obj-size, as its cachesim would run them. Needs the libcachesim package."""
    libcachesim = importlib.import_module("libcachesim")
    with tempfile.TemporaryDirectory(prefix="foliod-lcs-") as tmp:
        path = Path(tmp) / "keys.oracleGeneral"
        count = 0
        with path.open("wb") as stream:
            for count, key in enumerate(keys, 1):
                stream.write(_ORACLE_GENERAL.pack(count, key, 1, -1))
        if not count:
            return 0
        reader = libcachesim.TraceReader(
            str(path),
            libcachesim.TraceType.ORACLE_GENERAL_TRACE,
            libcachesim.ReaderInitParam(ignore_obj_size=True),
        )
        cache = getattr(libcachesim, LIBCACHESIM[policy])(nr_pages)
        miss_ratio, _ = cache.process_trace(reader)
    return round(float(miss_ratio) * count)
