"""Counter families of a simulated machine, named as the kernel names them (mm/vmstat.c).

Each family is one enum whose member values are the kernel's vmstat names; the API, the metrics
adapter and the documentation all derive their names from these enums and nowhere else.
"""

from __future__ import annotations

import enum


class VmEvent(enum.StrEnum):
    """Monotonic event counters (include/linux/vm_event_item.h); pgpgin/pgpgout in KiB."""

    PGPGIN = "pgpgin"
    PGPGOUT = "pgpgout"
    PGALLOC = "pgalloc"
    PGFREE = "pgfree"
    PGACTIVATE = "pgactivate"
    PGDEACTIVATE = "pgdeactivate"
    PGFAULT = "pgfault"
    PGMAJFAULT = "pgmajfault"
    PGREFILL = "pgrefill"
    PGSTEAL_KSWAPD = "pgsteal_kswapd"
    PGSTEAL_DIRECT = "pgsteal_direct"
    PGSCAN_KSWAPD = "pgscan_kswapd"
    PGSCAN_DIRECT = "pgscan_direct"
    PGROTATED = "pgrotated"
    ALLOCSTALL = "allocstall"
    WORKINGSET_REFAULT_FILE = "workingset_refault_file"
    WORKINGSET_ACTIVATE_FILE = "workingset_activate_file"
    NR_DIRTIED = "nr_dirtied"
    NR_WRITTEN = "nr_written"
    THP_FAULT_ALLOC = "thp_fault_alloc"
    THP_FAULT_FALLBACK = "thp_fault_fallback"
    THP_SPLIT_PAGE = "thp_split_page"
    BALLOON_INFLATE = "balloon_inflate"
    BALLOON_DEFLATE = "balloon_deflate"


class VmStat(enum.StrEnum):
    """Point-in-time state counters in pages (include/linux/mmzone.h, node_stat_item)."""

    NR_FREE_PAGES = "nr_free_pages"
    NR_ANON_PAGES = "nr_anon_pages"
    NR_ANON_TRANSPARENT_HUGEPAGES = "nr_anon_transparent_hugepages"
    NR_INACTIVE_FILE = "nr_inactive_file"
    NR_ACTIVE_FILE = "nr_active_file"
    NR_FILE_PAGES = "nr_file_pages"
    NR_DIRTY = "nr_dirty"
    # Pages under writeback. Writeback completes within the call that starts it (its device
    # time is charged to that call), so between calls this is always 0.
    NR_WRITEBACK = "nr_writeback"
    NR_SLAB_UNRECLAIMABLE = "nr_slab_unreclaimable"
    NR_PAGE_TABLE_PAGES = "nr_page_table_pages"


class MthpStat(enum.StrEnum):
    """Per-size anonymous large folio counters (/sys/kernel/mm/transparent_hugepage/*/stats)."""

    ANON_FAULT_ALLOC = "anon_fault_alloc"
    ANON_FAULT_FALLBACK = "anon_fault_fallback"
    SPLIT = "split"
    SPLIT_FAILED = "split_failed"


def new_event_counters() -> dict[VmEvent, int]:
    """Returns a zeroed counter table for every VmEvent."""
    return dict.fromkeys(VmEvent, 0)
