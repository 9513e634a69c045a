"""A log-bucketed latency histogram in fixed memory (HdrHistogram's layout, reduced).

Values are non-negative integers (foliod-load records nanoseconds). Below 2**PRECISION_BITS
every value has a bucket of its own; above, each power of two is cut into 2**PRECISION_BITS
equal buckets, so a bucket is at most 1/2**PRECISION_BITS (0.78 %) of the values in it wide.
A percentile is reported as the highest value of its bucket (HdrHistogram's "highest equivalent
value"), capped at the exact maximum: never below the exact percentile, and at most one bucket
width above it. Values beyond 2**MAX_VALUE_BITS (18 minutes in nanoseconds) are clamped.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator

PRECISION_BITS = 7
MAX_VALUE_BITS = 40

_SUB = 1 << PRECISION_BITS
_MAX_VALUE = (1 << MAX_VALUE_BITS) - 1
NR_BUCKETS = (MAX_VALUE_BITS - PRECISION_BITS + 1) * _SUB


def bucket_index(value: int) -> int:
    """The bucket a value falls in: exact below 2**PRECISION_BITS, log-linear above."""
    shift = value.bit_length() - PRECISION_BITS - 1
    if shift <= 0:
        return value
    return (shift + 1) * _SUB + (value >> shift) - _SUB


def bucket_bounds(index: int) -> tuple[int, int]:
    """The lowest and highest value of a bucket."""
    shift = index // _SUB - 1
    if shift <= 0:
        return index, index
    low = ((index % _SUB) + _SUB) << shift
    return low, low + (1 << shift) - 1


class Histogram:
    """Counts per bucket, with the exact count, sum, minimum and maximum on the side."""

    __slots__ = ("count", "counts", "max", "min", "total")

    def __init__(self) -> None:
        self.counts = [0] * NR_BUCKETS
        self.count = 0
        self.total = 0
        self.min = 0
        self.max = 0

    def record(self, value: int, count: int = 1) -> None:
        """Adds `count` occurrences of a value (negative values count as 0)."""
        value = min(max(value, 0), _MAX_VALUE)
        self.counts[bucket_index(value)] += count
        if not self.count or value < self.min:
            self.min = value
        self.max = max(self.max, value)
        self.count += count
        self.total += value * count

    def merge(self, other: Histogram) -> None:
        """Adds every count of another histogram to this one."""
        if not other.count:
            return
        for index, n in enumerate(other.counts):
            if n:
                self.counts[index] += n
        self.min = other.min if not self.count else min(self.min, other.min)
        self.max = max(self.max, other.max)
        self.count += other.count
        self.total += other.total

    def percentile(self, percent: float) -> int:
        """The nearest-rank percentile (0 < percent <= 100), as its bucket's highest value."""
        if not self.count:
            return 0
        rank = max(1, math.ceil(percent / 100 * self.count))
        seen = 0
        for index, n in enumerate(self.counts):
            seen += n
            if seen >= rank:
                return min(bucket_bounds(index)[1], self.max)
        return self.max

    def percentiles(self, percents: Iterable[float]) -> dict[float, int]:
        return {p: self.percentile(p) for p in percents}

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else 0.0

    def buckets(self) -> Iterator[tuple[int, int, int]]:
        """(lowest value, highest value, count) of every non-empty bucket, lowest first."""
        for index, n in enumerate(self.counts):
            if n:
                low, high = bucket_bounds(index)
                yield low, high, n
