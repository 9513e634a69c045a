"""Anonymous large folio (mTHP) knobs, order selection and per-size counters (mm/huge_memory.c)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from foliod.api import ThpSetting as ThpSetting  # noqa: PLC0414 -- re-exported
from foliod.mm.errors import InvalidArgument
from foliod.mm.page_alloc import PAGE_SIZE
from foliod.mm.vmstat import MthpStat

HPAGE_PMD_ORDER = 9
HPAGE_PMD_NR = 1 << HPAGE_PMD_ORDER
# THP_ORDERS_ALL_ANON on x86-64: orders 2..PMD_ORDER (order 1 is never used for anon memory).
ANON_MTHP_ORDERS = tuple(range(2, HPAGE_PMD_ORDER + 1))
ANON_ORDERS = (0, *ANON_MTHP_ORDERS)


def order_to_size_kb(order: int) -> int:
    return (PAGE_SIZE << order) >> 10


def size_kb_to_order(size_kb: int) -> int:
    """Maps a hugepages-<N>kB knob to its order; InvalidArgument for a size with no knob."""
    for order in ANON_MTHP_ORDERS:
        if order_to_size_kb(order) == size_kb:
            return order
    sizes = ", ".join(str(order_to_size_kb(o)) for o in ANON_MTHP_ORDERS)
    raise InvalidArgument(f"no mTHP size of {size_kb} kB (sizes: {sizes})", field="sizes")


class ThpPolicy:
    """The top-level THP knob, one knob per anon mTHP size, and their counters."""

    __slots__ = ("enabled", "nr_anon", "sizes", "stats")

    def __init__(
        self,
        enabled: ThpSetting = ThpSetting.ALWAYS,
        sizes: Mapping[int, ThpSetting] | None = None,
    ) -> None:
        # Kernel defaults: the PMD size inherits the top-level knob, smaller sizes are off.
        self.sizes: dict[int, ThpSetting] = {
            order: ThpSetting.INHERIT if order == HPAGE_PMD_ORDER else ThpSetting.NEVER
            for order in ANON_MTHP_ORDERS
        }
        self.enabled = ThpSetting.NEVER
        self.stats: dict[int, dict[MthpStat, int]] = {
            order: dict.fromkeys(MthpStat, 0) for order in ANON_MTHP_ORDERS
        }
        # Anonymous folios of each mTHP order currently allocated.
        self.nr_anon: dict[int, int] = dict.fromkeys(ANON_MTHP_ORDERS, 0)
        self.update(enabled, sizes or {})

    def update(self, enabled: ThpSetting | None, sizes: Mapping[int, ThpSetting]) -> None:
        """Validates then applies new settings (sizes by order); nothing changes on error."""
        if enabled is ThpSetting.INHERIT:
            raise InvalidArgument("the top-level THP knob cannot be 'inherit'", field="enabled")
        for order in sizes:
            if order not in self.sizes:
                raise InvalidArgument(f"order {order} has no mTHP knob", field="sizes")
        if enabled is not None:
            self.enabled = enabled
        self.sizes.update(sizes)

    def _order_enabled(self, order: int, madvised: bool) -> bool:
        setting = self.sizes[order]
        if setting is ThpSetting.INHERIT:
            setting = self.enabled
        return setting is ThpSetting.ALWAYS or (setting is ThpSetting.MADVISE and madvised)

    def allowable_orders(self, madvised: bool) -> list[int]:
        """Enabled anon orders, largest first (thp_vma_allowable_orders)."""
        return [o for o in reversed(ANON_MTHP_ORDERS) if self._order_enabled(o, madvised)]

    def count(self, order: int, stat: MthpStat) -> None:
        self.stats[order][stat] += 1

    def items(self) -> Iterator[tuple[int, ThpSetting]]:
        return iter(self.sizes.items())
