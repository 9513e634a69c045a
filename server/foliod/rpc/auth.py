"""Authentication and authorization of calls: bearer tokens and client certificates, roles per
method, and an audit line for every denied call and every admin call.

A caller is identified by a bearer token (``authorization: Bearer <token>`` metadata) looked up
in a TokenTable of SHA-256 digests, or, with mutual TLS and no token table, by its verified
client certificate (the principal is the certificate's SAN, else its subject CN, as grpc's
auth_context reports it; such callers are admins). No or an unknown credential ends the call
with UNAUTHENTICATED; a role that may not make the call, with PERMISSION_DENIED. Every method of
foliod.v1.Foliod has exactly one rule in RULES (a test checks it against the service
descriptor); a method of that service without one is refused. Health checks and reflection are
open to every caller: they reveal no state beyond the API itself.

AuthInterceptor is registered inside ObservingInterceptor, so a refused call is logged and
counted like any other (its access line carries UNAUTHENTICATED or PERMISSION_DENIED), and
outside IdempotencyInterceptor, which keys outcomes by `principal()`.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import json
import re
import threading
import tomllib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import structlog

from foliod.config import parse_size
from foliod.mm import PAGE_SIZE, FoliodError, TenantLimits
from foliod.mm.memcontrol import check_tenant_name
from foliod.rpc import reflection
from foliod.rpc.status import status_code_of

AUTHORIZATION_KEY = "authorization"
_BEARER = "bearer "
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
FOLIOD_SERVICE = "foliod.v1.Foliod"
# Services any caller may use: they show no simulated state.
OPEN_SERVICES = frozenset({"grpc.health.v1.Health", *reflection.SERVICE_NAMES})

_audit = structlog.get_logger("foliod.audit")
# The caller whose handler runs on this thread (grpc runs each call's handler, a streaming
# one's generator included, on one worker thread).
_caller = threading.local()


def current_identity() -> Identity | None:
    """The authenticated caller of the call running on this thread; None without
    authentication."""
    return getattr(_caller, "identity", None)


class Role(enum.Enum):
    """What a caller may do: admin everything; tenant its workload (no host-wide knobs);
    reader views only."""

    ADMIN = "admin"
    TENANT = "tenant"
    READER = "reader"


# Views: change no simulated state. ReadFile is not one (it fills the page cache, runs
# readahead and can reclaim others' pages); ReadFolio only copies bytes out of a folio.
VIEWS = (
    "GetFolio",
    "ReadFolio",
    "GetMachine",
    "GetBuddyInfo",
    "GetMeminfo",
    "GetMemmap",
    "GetVmstat",
    "GetThpPolicy",
    "StatFile",
    "ListFiles",
    "GetFaults",
    "GetGuest",
    "ListGuests",
)
# A workload's own operations: memory, files, batches.
_WORKLOAD = (
    "Allocate",
    "Free",
    "ReleaseOwner",
    "WriteFolio",
    "CreateFile",
    "OpenFile",
    "CloseFile",
    "ReadFile",
    "WriteFile",
    "TruncateFile",
    "DropFileRange",
    "DeleteFile",
    "Writeback",
    "Fsync",
    "Submit",
    "Replay",
)
# Host-wide knobs and guests: they change what every tenant sees. Reclaim is one: it evicts
# anyone's page cache (a tenant's own is reclaimed by its memory limit, memcontrol). A snapshot
# shows where every tenant's folios lie.
_ADMIN = (
    "SetThpPolicy",
    "Reclaim",
    "DropCaches",
    "SetFaults",
    "CreateGuest",
    "DestroyGuest",
    "SetBalloon",
    "ReportFreePages",
    "SnapshotMachine",
    "BootGuest",
)
_ALL_ROLES = frozenset(Role)
# Full method name -> the roles that may call it.
RULES: Mapping[str, frozenset[Role]] = {
    **{f"/{FOLIOD_SERVICE}/{m}": _ALL_ROLES for m in VIEWS},
    **{f"/{FOLIOD_SERVICE}/{m}": frozenset({Role.ADMIN, Role.TENANT}) for m in _WORKLOAD},
    **{f"/{FOLIOD_SERVICE}/{m}": frozenset({Role.ADMIN}) for m in _ADMIN},
}


@dataclass(frozen=True, slots=True)
class Identity:
    """An authenticated caller."""

    principal: str
    role: Role
    tenant: str = ""


def token_digest(token: str) -> str:
    """The SHA-256 hex digest a token file holds for `token`."""
    return hashlib.sha256(token.encode()).hexdigest()


class TokenTable:
    """Bearer tokens by SHA-256 digest. Tokens themselves are never stored."""

    def __init__(
        self, entries: Mapping[str, Identity], limits: Mapping[str, TenantLimits] | None = None
    ) -> None:
        self._entries = tuple(entries.items())
        # Every tenant a token names, with its limits (DEFAULT_TENANT_LIMITS unless the file's
        # [tenants.<name>] table sets them).
        self.limits: dict[str, TenantLimits] = dict(limits or {})

    def __len__(self) -> int:
        return len(self._entries)

    def identify(self, token: str) -> Identity | None:
        """The identity of `token`, or None. Every digest is compared, each in constant time,
        so the time taken tells nothing of which entry matched or how much of one did."""
        digest = token_digest(token)
        found = None
        for expected, identity in self._entries:
            if hmac.compare_digest(expected, digest):
                found = identity
        return found

    @classmethod
    def load(cls, path: Path) -> TokenTable:
        """Reads a token file: TOML (``[[tokens]]`` tables) or, for a .json name, JSON
        (``{"tokens": [...]}``); each entry has sha256, principal, role and optionally tenant.
        A ``tenants`` table sets each tenant's limits: ``memory_max`` (a size such as "1GiB"),
        ``max_files``, ``max_open_files``. Raises ValueError naming the file and the entry."""
        try:
            raw = path.read_bytes()
            document: Any = (
                json.loads(raw) if path.suffix.lower() == ".json" else tomllib.loads(raw.decode())
            )
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot read token file {path}: {exc}") from exc
        items = document.get("tokens") if isinstance(document, dict) else None
        if not isinstance(items, list):
            raise ValueError(f"token file {path}: expected a list named 'tokens'")
        entries: dict[str, Identity] = {}
        for number, item in enumerate(items, 1):
            entries.update([_entry(item, f"token file {path}, entry {number}")])
        tables = document.get("tenants", {})
        if not isinstance(tables, dict):
            raise ValueError(f"token file {path}: 'tenants' must be a table of tenants")
        limits = {i.tenant: DEFAULT_TENANT_LIMITS for i in entries.values() if i.tenant}
        for tenant, table in tables.items():
            limits[tenant] = _limits(tenant, table, f"token file {path}, tenant {tenant!r}")
        return cls(entries, limits)


# A tenant's limits unless its table says otherwise: no memory.max, bounded files and handles.
DEFAULT_TENANT_LIMITS = TenantLimits(max_files=10_000, max_open_files=1_024)
_LIMIT_KEYS = {"memory_max", "max_files", "max_open_files"}


def _limits(tenant: str, table: Any, where: str) -> TenantLimits:
    try:
        check_tenant_name(tenant)
    except FoliodError as exc:
        raise ValueError(f"{where}: {exc.message}") from None
    if not isinstance(table, dict):
        raise ValueError(f"{where}: not a table")
    unknown = sorted(set(table) - _LIMIT_KEYS)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}")
    values: dict[str, int] = {}
    for key in sorted(table):
        raw = table[key]
        try:
            value = parse_size(raw) if key == "memory_max" else raw
        except ValueError as exc:
            raise ValueError(f"{where}: {key}: {exc}") from None
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{where}: {key} must be a non-negative integer, not {raw!r}")
        values[key] = value
    memory_max = values.get("memory_max")
    return TenantLimits(
        max_pages=DEFAULT_TENANT_LIMITS.max_pages
        if memory_max is None
        else memory_max // PAGE_SIZE,
        max_files=values.get("max_files", DEFAULT_TENANT_LIMITS.max_files),
        max_open_files=values.get("max_open_files", DEFAULT_TENANT_LIMITS.max_open_files),
    )


def _entry(item: Any, where: str) -> tuple[str, Identity]:
    if not isinstance(item, dict):
        raise ValueError(f"{where}: not a table")
    unknown = sorted(set(item) - {"sha256", "principal", "role", "tenant"})
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}")
    digest = str(item.get("sha256", "")).lower()
    if not _SHA256_HEX.fullmatch(digest):
        raise ValueError(f"{where}: sha256 must be 64 hex digits (the token's SHA-256)")
    principal = item.get("principal")
    if not isinstance(principal, str) or not principal:
        raise ValueError(f"{where}: principal must be a non-empty string")
    try:
        role = Role(item.get("role"))
    except ValueError:
        raise ValueError(f"{where}: role must be admin, tenant or reader") from None
    tenant = item.get("tenant", "")
    if not isinstance(tenant, str):
        raise ValueError(f"{where}: tenant must be a string")
    if tenant:
        try:
            check_tenant_name(tenant)
        except FoliodError as exc:
            raise ValueError(f"{where}: {exc.message}") from None
    elif role is Role.TENANT:
        raise ValueError(f"{where}: a token of role tenant names its tenant")
    return digest, Identity(principal, role, tenant)


class TokenFile:
    """A token file and the table last read from it; reload() rereads it (on SIGHUP)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.table = TokenTable.load(path)

    def reload(self) -> bool:
        """Rereads the file; on an error keeps the table it has, logs why, returns False."""
        try:
            self.table = TokenTable.load(self.path)
        except ValueError as exc:
            _audit.error("token file not reloaded", error=str(exc))
            return False
        _audit.info("token file reloaded", path=str(self.path), nr_tokens=len(self.table))
        return True


def _bearer(context: grpc.ServicerContext) -> str | None:
    for key, value in context.invocation_metadata():
        if key == AUTHORIZATION_KEY and isinstance(value, str):
            if value[: len(_BEARER)].lower() == _BEARER:
                return value[len(_BEARER) :].strip()
            return ""
    return None


def certificate_principal(context: grpc.ServicerContext) -> str | None:
    """The verified client certificate's identity (SAN, else subject CN), if any."""
    for identity in context.peer_identities() or ():
        return bytes(identity).decode(errors="replace")
    return None


class _Denied(Exception):
    def __init__(self, code: grpc.StatusCode, message: str, identity: Identity | None) -> None:
        super().__init__(message)
        self.code = code
        self.identity = identity


class AuthInterceptor(grpc.ServerInterceptor):
    """Refuses calls without a valid credential or whose role may not make them; audits
    refusals and admin calls. `tokens` returns the current table (None: no tokens, and then
    a verified client certificate makes its holder an admin)."""

    def __init__(self, tokens: Callable[[], TokenTable | None]) -> None:
        self._tokens = tokens
        self._local = _caller

    def principal(self, context: grpc.ServicerContext) -> str:
        """The principal of the unary call running on this thread (for idempotency keys)."""
        identity: Identity | None = getattr(self._local, "identity", None)
        return "" if identity is None else identity.principal

    def identify(self, context: grpc.ServicerContext) -> Identity:
        table = self._tokens()
        if table is not None:
            token = _bearer(context)
            if not token:
                raise _Denied(grpc.StatusCode.UNAUTHENTICATED, "a bearer token is required", None)
            identity = table.identify(token)
            if identity is None:
                raise _Denied(grpc.StatusCode.UNAUTHENTICATED, "the token is not valid", None)
            return identity
        principal = certificate_principal(context)
        if principal is None:
            raise _Denied(grpc.StatusCode.UNAUTHENTICATED, "a client certificate is required", None)
        return Identity(principal, Role.ADMIN)

    def authorize(self, method: str, context: grpc.ServicerContext) -> Identity:
        """The caller's identity if it may call `method`; else audits and aborts the call."""
        try:
            identity = self.identify(context)
            roles = RULES.get(method, frozenset())
            if identity.role not in roles:
                raise _Denied(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"role {identity.role.value} may not call {method.rpartition('/')[2]}",
                    identity,
                )
        except _Denied as denied:
            _audit.warning(
                "denied",
                principal=denied.identity.principal if denied.identity else None,
                tenant=denied.identity.tenant if denied.identity else None,
                role=denied.identity.role.value if denied.identity else None,
                method=method,
                code=denied.code.name,
                peer=context.peer(),
            )
            context.abort(denied.code, str(denied))
        return identity

    def intercept_service(self, continuation: Callable[[Any], Any], details: Any) -> Any:
        handler = continuation(details)
        method: str = details.method
        if handler is None or method.partition("/")[2].partition("/")[0] in OPEN_SERVICES:
            return handler
        if handler.request_streaming or handler.response_streaming:
            return self._wrap_stream(method, handler)
        return self._wrap_unary(method, handler)

    def _wrap_unary(self, method: str, handler: Any) -> Any:
        inner = handler.unary_unary
        local = self._local

        def behavior(request: Any, context: grpc.ServicerContext) -> Any:
            identity = self.authorize(method, context)
            if identity.role is not Role.ADMIN:
                local.identity = identity
                try:
                    return inner(request, context)
                finally:
                    local.identity = None
            code = grpc.StatusCode.OK
            local.identity = identity
            try:
                return inner(request, context)
            except FoliodError as exc:
                code = status_code_of(exc)
                raise
            except BaseException:
                code = _code(context) or grpc.StatusCode.UNKNOWN
                raise
            finally:
                local.identity = None
                _audit_admin(identity, method, _code(context) or code)

        return grpc.unary_unary_rpc_method_handler(
            behavior,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _wrap_stream(self, method: str, handler: Any) -> Any:
        inner = (
            handler.stream_stream
            or handler.unary_stream
            or handler.stream_unary
        )  # fmt: skip

        if handler.response_streaming:

            def streaming(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                identity = self.authorize(method, context)
                code = grpc.StatusCode.OK
                _caller.identity = identity
                try:
                    yield from inner(request, context)
                except BaseException:
                    code = _code(context) or grpc.StatusCode.UNKNOWN
                    raise
                finally:
                    _caller.identity = None
                    if identity.role is Role.ADMIN:
                        _audit_admin(identity, method, _code(context) or code)

            behavior: Callable[..., Any] = streaming
        else:

            def stream_unary(request: Any, context: grpc.ServicerContext) -> Any:
                identity = self.authorize(method, context)
                _caller.identity = identity
                try:
                    response = inner(request, context)
                finally:
                    _caller.identity = None
                if identity.role is Role.ADMIN:
                    _audit_admin(identity, method, _code(context) or grpc.StatusCode.OK)
                return response

            behavior = stream_unary
        factory = {
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler,
        }[(handler.request_streaming, handler.response_streaming)]
        return factory(
            behavior,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


def _code(context: grpc.ServicerContext) -> grpc.StatusCode | None:
    code = context.code()  # type: ignore[attr-defined]
    return code if isinstance(code, grpc.StatusCode) else None


def _audit_admin(identity: Identity, method: str, code: grpc.StatusCode) -> None:
    _audit.info(
        "admin call",
        principal=identity.principal,
        tenant=identity.tenant,
        method=method,
        code=code.name,
    )
