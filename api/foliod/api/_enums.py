"""The enums the API speaks in, as the strings the CLIs and configuration take."""

from __future__ import annotations

import enum


class FolioKind(enum.StrEnum):
    """What an allocation is used for; mirrors the memdesc types."""

    ANON = "anon"
    FILE = "file"
    SLAB = "slab"
    PAGETABLE = "pagetable"
    HUGETLB = "hugetlb"
    # Pages a guest's balloon driver took to hand back to its host (virtio_balloon).
    BALLOON = "balloon"


class MemmapModel(enum.StrEnum):
    """The three ways of describing physical memory whose cost foliod reports."""

    STRUCT_PAGE = "struct_page"
    INTERIM = "interim"
    MEMDESC = "memdesc"


class ThpSetting(enum.StrEnum):
    """The values of a THP "enabled" knob."""

    ALWAYS = "always"
    INHERIT = "inherit"
    MADVISE = "madvise"
    NEVER = "never"


class Backing(enum.StrEnum):
    """What host memory a guest's RAM is made of."""

    BASE = "base"
    MTHP = "mthp"
    THP = "thp"
    HUGETLB_2M = "hugetlb_2m"
    HUGETLB_1G = "hugetlb_1g"


# The page cache's reclaim policies by name (the core's registry, foliod.mm.lru.POLICIES, has
# exactly these; tests/test_structure.py checks).
RECLAIM_POLICIES = ("clock", "fifo", "lru", "mglru", "two_list")
