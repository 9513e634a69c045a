"""What describing physical memory costs under three memory-map models (mm/mm_init.c, memdescs).

- struct_page: a 64-byte struct page for every frame; folios overlay their head pages.
- interim: a 32-byte struct page for every frame plus a separately allocated descriptor per
  folio, slab and page table (kernelnewbies MatthewWilcox/Memdescs/Path).
- memdesc: an 8-byte memdesc per frame plus a type-specific descriptor per allocation; free
  (buddy) memory needs nothing more (kernelnewbies MatthewWilcox/Memdescs).

Folio descriptors are 80 bytes for order-0 folios and 112 bytes for large ones (80 plus the
large-only fields: mapcounts, pincount, deferred list); slab and ptdesc sizes are estimates.
Every size is configurable. Costs are computed from maintained per-(kind, order) folio counts,
never by walking frames.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

from foliod.api import MemmapModel as MemmapModel  # noqa: PLC0414 -- re-exported
from foliod.mm.errors import InvalidArgument
from foliod.mm.mm_types import FolioKind


class Descriptor(enum.StrEnum):
    """Descriptor types that appear in a model's breakdown."""

    PAGE = "page"
    MEMDESC = "memdesc"
    FOLIO = "folio"
    LARGE_FOLIO = "large_folio"
    SLAB = "slab"
    PTDESC = "ptdesc"


@dataclass(frozen=True, slots=True)
class DescriptorSizes:
    """Bytes of each descriptor. Defaults: docs/FACTS.md section 1; slab, ptdesc estimated."""

    struct_page_bytes: int = 64
    interim_page_bytes: int = 32
    memdesc_bytes: int = 8
    folio_bytes: int = 80
    large_folio_bytes: int = 112
    slab_bytes: int = 64
    ptdesc_bytes: int = 64

    def __post_init__(self) -> None:
        for name in ("struct_page_bytes", "interim_page_bytes", "memdesc_bytes"):
            if getattr(self, name) <= 0:
                raise InvalidArgument(f"{name} must be positive", field=name)
        # Separately allocated descriptors come from 16-byte aligned slabs.
        for name in ("folio_bytes", "large_folio_bytes", "slab_bytes", "ptdesc_bytes"):
            value = getattr(self, name)
            if value <= 0 or value % 16:
                raise InvalidArgument(f"{name} must be a positive multiple of 16", field=name)
        if self.large_folio_bytes < self.folio_bytes:
            raise InvalidArgument(
                "large_folio_bytes must be at least folio_bytes", field="large_folio_bytes"
            )

    def per_frame(self, model: MemmapModel) -> tuple[Descriptor, int]:
        """The descriptor every frame carries under a model, and its size."""
        if model is MemmapModel.STRUCT_PAGE:
            return Descriptor.PAGE, self.struct_page_bytes
        if model is MemmapModel.INTERIM:
            return Descriptor.PAGE, self.interim_page_bytes
        return Descriptor.MEMDESC, self.memdesc_bytes

    def descriptor_for(self, kind: FolioKind, order: int) -> tuple[Descriptor, int]:
        """The separately allocated descriptor of one allocation (interim and memdesc)."""
        if kind is FolioKind.SLAB:
            return Descriptor.SLAB, self.slab_bytes
        if kind is FolioKind.PAGETABLE:
            return Descriptor.PTDESC, self.ptdesc_bytes
        if order:
            return Descriptor.LARGE_FOLIO, self.large_folio_bytes
        return Descriptor.FOLIO, self.folio_bytes


@dataclass(frozen=True, slots=True)
class DescriptorCost:
    descriptor: Descriptor
    size_bytes: int
    count: int

    @property
    def total_bytes(self) -> int:
        return self.size_bytes * self.count


@dataclass(frozen=True, slots=True)
class ModelCost:
    """One model's memory map: breakdown by descriptor and attribution by folio kind."""

    model: MemmapModel
    ram_bytes: int
    breakdown: tuple[DescriptorCost, ...]
    # Per-frame entries of a kind's pages plus that kind's descriptors.
    by_kind: dict[FolioKind, int] = field(default_factory=dict)
    # Per-frame entries of free frames.
    free_memory_bytes: int = 0
    # Memmap pages HugeTLB vmemmap optimization gave back (included in the breakdown's pages).
    hvo_freed_bytes: int = 0

    @property
    def total_bytes(self) -> int:
        return sum(cost.total_bytes for cost in self.breakdown) - self.hvo_freed_bytes

    @property
    def fraction_of_ram(self) -> float:
        return self.total_bytes / self.ram_bytes if self.ram_bytes else 0.0


def hvo_freed_bytes(frame_bytes: int, order: int, page_size_bytes: int) -> int:
    """Memmap bytes HVO frees for one HugeTLB folio of order: the per-frame entries of its
    pages fill whole pages, of which one is kept (Documentation/mm/vmemmap_dedup.rst)."""
    memmap_pages = (frame_bytes << order) // page_size_bytes
    return max(0, memmap_pages - 1) * page_size_bytes


def memmap_report(
    nr_pages: int,
    nr_free_pages: int,
    folio_counts: Mapping[tuple[FolioKind, int], int],
    sizes: DescriptorSizes,
    page_size_bytes: int,
    *,
    hvo_folios: Mapping[int, int] | None = None,
) -> tuple[ModelCost, ...]:
    """Costs of the current state under every model, in MemmapModel order; hvo_folios counts
    HugeTLB folios with an optimized vmemmap, by order."""
    pages_by_kind = dict.fromkeys(FolioKind, 0)
    for (kind, order), folios in folio_counts.items():
        pages_by_kind[kind] += folios << order
    reports = []
    for model in MemmapModel:
        frame_descriptor, frame_bytes = sizes.per_frame(model)
        counts: dict[Descriptor, tuple[int, int]] = {frame_descriptor: (frame_bytes, nr_pages)}
        by_kind = {kind: pages * frame_bytes for kind, pages in pages_by_kind.items()}
        if model is not MemmapModel.STRUCT_PAGE:
            counts[Descriptor.FOLIO] = (sizes.folio_bytes, 0)
            counts[Descriptor.LARGE_FOLIO] = (sizes.large_folio_bytes, 0)
            counts[Descriptor.SLAB] = (sizes.slab_bytes, 0)
            counts[Descriptor.PTDESC] = (sizes.ptdesc_bytes, 0)
            for (kind, order), folios in folio_counts.items():
                descriptor, size = sizes.descriptor_for(kind, order)
                counts[descriptor] = (size, counts[descriptor][1] + folios)
                by_kind[kind] += size * folios
        hvo_freed = sum(
            count * hvo_freed_bytes(frame_bytes, order, page_size_bytes)
            for order, count in (hvo_folios or {}).items()
        )
        by_kind[FolioKind.HUGETLB] -= hvo_freed
        breakdown = tuple(
            DescriptorCost(descriptor, size, count)
            for descriptor in Descriptor
            if descriptor in counts
            for size, count in (counts[descriptor],)
        )
        reports.append(
            ModelCost(
                model=model,
                ram_bytes=nr_pages * page_size_bytes,
                breakdown=breakdown,
                by_kind=by_kind,
                free_memory_bytes=nr_free_pages * frame_bytes,
                hvo_freed_bytes=hvo_freed,
            )
        )
    return tuple(reports)
