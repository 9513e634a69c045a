"""Tenants' namespaces at the API's edge: the names a caller sends, mapped to the full names the
core holds, and back.

An admin (or any caller when no authentication is configured) sees the whole server and sends
full names. A tenant's owner "x" is the core's "<tenant>/x" and its file "x" is
"tenants/<tenant>/x" (foliod.mm.memcontrol): it never names anything outside its namespace, and
a folio or file handle number of another tenant's is answered as one that does not exist
(NOT_FOUND), so nothing tells it what others hold. Readers bound to a tenant see that tenant's
names; readers without one see the whole server.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from foliod.mm import InvalidArgument, Machine, UnknownFolio
from foliod.mm.errors import UnknownFileHandle
from foliod.mm.filemap import FileStat
from foliod.mm.memcontrol import file_in, owner_in, tenant_of_file, tenant_of_owner
from foliod.rpc.auth import Identity, Role


@dataclass(frozen=True, slots=True)
class Namespace:
    """What a caller's names mean: a tenant's, or (tenant None) the whole server's."""

    tenant: str | None = None

    @property
    def whole(self) -> bool:
        return self.tenant is None

    def owner(self, name: str) -> str:
        if self.tenant is None:
            return name
        if "/" in name:
            raise InvalidArgument(
                f"owner must be 1-64 characters of [A-Za-z0-9._:-], not {name[:80]!r}",
                field="owner",
            )
        return owner_in(self.tenant, name)

    def owner_out(self, full: str) -> str:
        if self.tenant is None:
            return full
        return full.partition("/")[2]

    def file(self, name: str) -> str:
        """The full name of a file; the empty name (no file, or every file) stays empty."""
        if self.tenant is None or not name:
            return name
        return file_in(self.tenant, name)

    def file_out(self, full: str) -> str:
        if self.tenant is None:
            return full
        return full[len(file_in(self.tenant, "")) :]

    def sees_file(self, full: str) -> bool:
        return self.tenant is None or tenant_of_file(full) == self.tenant

    def stat_out(self, stat: FileStat) -> FileStat:
        return (
            stat
            if self.tenant is None
            else dataclasses.replace(stat, name=self.file_out(stat.name))
        )

    def check_folio(self, machine: Machine, handle: int, field: str = "handle") -> None:
        """UnknownFolio, as for a handle never given out, unless the folio is this caller's."""
        if self.tenant is None:
            return
        owner_id = machine.table.owner_id(handle) if 0 <= handle < 1 << 62 else 0
        holder = machine.owner_by_id.get(owner_id)
        if holder is None or tenant_of_owner(holder.name) != self.tenant:
            raise UnknownFolio(f"no folio {handle} on machine {machine.name!r}", field=field)

    def check_file_handle(self, machine: Machine, number: int) -> None:
        """UnknownFileHandle, as for a number never given out, unless the open file is this
        caller's (a closed handle of its own stays FileHandleClosed, from the core)."""
        if self.tenant is None or not number:
            return
        handle = machine.files.handles.get(number)
        if handle is None:
            if 0 < number < machine.files.next_handle:
                return  # closed: the core says so (no name to leak)
            raise UnknownFileHandle(f"no file handle {number}", field="handle")
        if not self.sees_file(handle.inode.name):
            raise UnknownFileHandle(f"no file handle {number}", field="handle")


WHOLE = Namespace()


def namespace_of(identity: Identity | None) -> Namespace:
    """The namespace of an authenticated caller (None: no authentication configured)."""
    if identity is None or not identity.tenant or identity.role is Role.ADMIN:
        return WHOLE
    return Namespace(identity.tenant)
