"""Tenants as memory cgroups: what each one is charged, its memory.max, and its events
(mm/memcontrol.c).

A tenant's names carry its namespace: an owner "<tenant>/<name>" (owner names cannot hold a
"/" otherwise) and a file "tenants/<tenant>/<name>". Whatever holds such a name is charged to
the tenant's MemCgroup on its machine, whoever made the call: the folios an owner allocated and
the page cache of the tenant's files (memory.current), as the kernel charges a page to the
cgroup of the task that faulted it or of the file's first reader. Page tables are not charged.

Limits (memory.max, most files, most open handles) are the same on every machine; a machine
keeps one MemCgroup per tenant that has held anything on it. Over memory.max an allocation
first reclaims the tenant's own page cache and then fails with TenantLimit, changing nothing;
page cache a call brings in is trimmed back to memory.max when the call ends (the kernel
reclaims during the charge itself, so within one call the tenant may briefly exceed the limit
by that call's reads).
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from foliod.mm.errors import InvalidArgument

OWNER_SEPARATOR = "/"
FILE_PREFIX = "tenants/"
_TENANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
UNLIMITED = 1 << 62


def check_tenant_name(tenant: str) -> str:
    """Returns the name if it is a valid tenant name; InvalidArgument otherwise."""
    if not _TENANT_NAME.fullmatch(tenant):
        raise InvalidArgument(
            f"a tenant name is 1-63 of A-Z a-z 0-9 . _ - starting with a letter or digit, "
            f"not {tenant[:80]!r}",
            field="tenant",
        )
    return tenant


def owner_in(tenant: str, name: str) -> str:
    """The full name of a tenant's owner."""
    return f"{tenant}{OWNER_SEPARATOR}{name}"


def file_in(tenant: str, name: str) -> str:
    """The full name of a tenant's file."""
    return f"{FILE_PREFIX}{tenant}/{name}"


def tenant_of_owner(owner: str) -> str | None:
    """The tenant whose namespace an owner's full name is in, if any."""
    tenant, separator, _ = owner.partition(OWNER_SEPARATOR)
    return tenant if separator else None


def tenant_of_file(name: str) -> str | None:
    """The tenant whose namespace a file's full name is in, if any."""
    if not name.startswith(FILE_PREFIX):
        return None
    tenant, separator, rest = name[len(FILE_PREFIX) :].partition("/")
    return tenant if separator and rest else None


@dataclass(frozen=True, slots=True)
class TenantLimits:
    """What one tenant may hold on each machine."""

    max_pages: int = UNLIMITED
    max_files: int = UNLIMITED
    max_open_files: int = UNLIMITED


class MemcgEvent(enum.StrEnum):
    """memory.events: member value = the file's key."""

    # Usage went over memory.max and reclaim of the tenant's page cache ran.
    MAX = "max"
    # A charge failed even after reclaim (the kernel's OOM; here the call fails).
    OOM = "oom"


class MemCgroup:
    """One tenant on one machine: its charge and events (struct mem_cgroup)."""

    __slots__ = ("events", "limits", "name", "nr_cache", "nr_files", "nr_open_files", "nr_owned")

    def __init__(self, name: str, limits: TenantLimits) -> None:
        self.name = name
        self.limits = limits
        # Pages of folios the tenant's owners allocated, and of its files' page cache.
        self.nr_owned = 0
        self.nr_cache = 0
        self.nr_files = 0
        self.nr_open_files = 0
        self.events = dict.fromkeys(MemcgEvent, 0)

    @property
    def nr_pages(self) -> int:
        """memory.current, in pages."""
        return self.nr_owned + self.nr_cache

    @property
    def nr_over(self) -> int:
        """Pages above memory.max (0 when within it)."""
        return max(0, self.nr_pages - self.limits.max_pages)
