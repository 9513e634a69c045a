"""Owners' address spaces (mm_struct): placement of anon folios and their page tables (mm/memory.c).

x86-64 four-level paging (P4D folded): a PTE table maps 512 pages (2 MiB), a PMD table 512 PTE
tables (1 GiB), a PUD table 512 PMD tables (512 GiB), and one PGD per address space. A table is
allocated when the first entry below it is installed and freed when its last entry goes (the
PGD lives until the owner is released). A PMD-mapped 2 MiB anon folio needs no PTE table to be
mapped, but, as __do_huge_pmd_anonymous_page does, it deposits one preallocated PTE table so the
mapping can be split later without allocating; `deposit_pgtable=False` models an architecture
without that deposit.
"""

from __future__ import annotations

from typing import Protocol

from foliod.mm.errors import AddressSpaceExhausted
from foliod.mm.huge_memory import HPAGE_PMD_NR, HPAGE_PMD_ORDER
from foliod.mm.mm_types import Folio

# x86-64 user space with 4-level paging: 47 bits, 128 TiB.
TASK_SIZE_PAGES = 1 << (47 - 12)
PT_LEVELS = 4
PTE_LEVEL, PMD_LEVEL, PUD_LEVEL, PGD_LEVEL = range(PT_LEVELS)
# Virtual page number >> shift = index of the table that holds the entry at that level.
_LEVEL_SHIFT = (9, 18, 27, 36)


class TableAllocator(Protocol):
    """Where page-table pages come from; raises OutOfMemory when none can be had."""

    def alloc_pagetable(self) -> Folio: ...

    def free_pagetable(self, table: Folio) -> None: ...


class PageTable:
    """One page-table page and the number of its entries in use."""

    __slots__ = ("entries", "folio")

    def __init__(self, folio: Folio) -> None:
        self.folio = folio
        self.entries = 0


class MmStruct:
    """The virtual memory and page tables of one owner (an mm_struct)."""

    __slots__ = ("deposit_pgtable", "deposited", "name", "next_vpage", "tables")

    def __init__(self, name: str, *, deposit_pgtable: bool = True) -> None:
        self.name = name
        self.deposit_pgtable = deposit_pgtable
        # Per level: index of the table (virtual page >> level shift) -> table.
        self.tables: list[dict[int, PageTable]] = [{} for _ in range(PT_LEVELS)]
        # PTE tables deposited with PMD-mapped folios, by the folio's virtual page.
        self.deposited: dict[int, Folio] = {}
        self.next_vpage = 0

    @property
    def nr_pagetable_pages(self) -> int:
        """Page-table pages this address space holds (every table is one order-0 page)."""
        return sum(len(level) for level in self.tables) + len(self.deposited)

    def get_unmapped_area(self, nr_pages: int, align_pages: int, *, pmd_align: bool = True) -> int:
        """Places a new mapping after the previous one; mappings of 2 MiB or more are
        PMD-aligned, as thp_get_unmapped_area does for anonymous memory (unless pmd_align is
        False: several small mappings placed at once, each of which would not be).

        Addresses are not reused while anything is mapped; once nothing is, placement starts
        again from the bottom. Raises AddressSpaceExhausted past TASK_SIZE (128 TiB).
        """
        pgd = self.tables[PGD_LEVEL].get(0)
        if pgd is None or not pgd.entries:
            self.next_vpage = 0
        if pmd_align and nr_pages >= HPAGE_PMD_NR:
            align_pages = max(align_pages, HPAGE_PMD_NR)
        start = -(-self.next_vpage // align_pages) * align_pages
        if start + nr_pages > TASK_SIZE_PAGES:
            raise AddressSpaceExhausted(
                f"owner {self.name!r} has no room for {nr_pages} more pages below the "
                f"128 TiB user address limit; release it or free its mappings",
                field="owner",
                metadata={"next_vpage": str(self.next_vpage), "nr_pages": str(nr_pages)},
            )
        self.next_vpage = start + nr_pages
        return start

    def missing_levels(self, vpage: int, level: int) -> list[int]:
        """Levels, from level up, whose table for vpage does not exist yet (bottom first)."""
        missing = []
        tables = self.tables
        while level < PT_LEVELS and (vpage >> _LEVEL_SHIFT[level]) not in tables[level]:
            missing.append(level)
            level += 1
        return missing

    def map_folio(self, order: int, vpage: int, allocator: TableAllocator) -> tuple[int, bool]:
        """Maps an anon folio of order at a virtual page; returns page-table pages allocated
        and whether it is PMD-mapped.

        All or nothing: when a table cannot be allocated, nothing is installed.
        """
        pmd_mapped = order == HPAGE_PMD_ORDER and vpage % HPAGE_PMD_NR == 0
        level = PMD_LEVEL if pmd_mapped else PTE_LEVEL
        missing = self.missing_levels(vpage, level)
        want_deposit = pmd_mapped and self.deposit_pgtable
        new: list[Folio] = []
        try:
            # Top-down, as __handle_mm_fault allocates them.
            for _ in range(len(missing) + want_deposit):
                new.append(allocator.alloc_pagetable())
        except BaseException:
            for table in new:
                allocator.free_pagetable(table)
            raise
        self.install(vpage, level, 1 if pmd_mapped else 1 << order, missing, new)
        return len(missing) + want_deposit, pmd_mapped

    def install(
        self, vpage: int, level: int, entries: int, missing: list[int], new: list[Folio]
    ) -> None:
        """Installs the tables of missing (allocated top-down into new; one more, last, is
        deposited with a PMD mapping) and counts entries more at level for vpage."""
        for table, lvl in zip(new, reversed(missing), strict=False):
            self.tables[lvl][vpage >> _LEVEL_SHIFT[lvl]] = PageTable(table)
            if lvl + 1 < PT_LEVELS:
                self.tables[lvl + 1][vpage >> _LEVEL_SHIFT[lvl + 1]].entries += 1
        self.tables[level][vpage >> _LEVEL_SHIFT[level]].entries += entries
        if len(new) > len(missing):
            self.deposited[vpage] = new[-1]

    def map_entries(self, vpage: int, nr_entries: int) -> None:
        """Counts nr_entries more PTEs in the PTE table of vpage, which exists."""
        self.tables[PTE_LEVEL][vpage >> _LEVEL_SHIFT[PTE_LEVEL]].entries += nr_entries

    def unmap_folio(
        self, vpage: int, order: int, pmd_mapped: bool, allocator: TableAllocator
    ) -> int:
        """Unmaps an anon folio; returns page-table pages freed because they became empty."""
        return self.unmap_pages(vpage, 1 if pmd_mapped else 1 << order, pmd_mapped, allocator)

    def unmap_pages(
        self, vpage: int, entries: int, pmd_mapped: bool, allocator: TableAllocator
    ) -> int:
        """Removes entries (PTEs, or one PMD mapping) for vpage, all in one table; returns
        page-table pages freed because they became empty."""
        freed = 0
        if pmd_mapped:
            level = PMD_LEVEL
            deposit = self.deposited.pop(vpage, None)
            if deposit is not None:
                allocator.free_pagetable(deposit)
                freed += 1
        else:
            level = PTE_LEVEL
        while level < PGD_LEVEL:
            index = vpage >> _LEVEL_SHIFT[level]
            table = self.tables[level][index]
            table.entries -= entries
            if table.entries:
                break
            del self.tables[level][index]
            allocator.free_pagetable(table.folio)
            freed += 1
            level, entries = level + 1, 1
        else:
            self.tables[PGD_LEVEL][0].entries -= entries
        return freed

    def release_pgd(self, allocator: TableAllocator) -> int:
        """Frees the PGD of an address space that maps nothing; returns pages freed."""
        pgd = self.tables[PGD_LEVEL].pop(0, None)
        if pgd is None:
            return 0
        allocator.free_pagetable(pgd.folio)
        return 1
