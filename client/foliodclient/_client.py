"""The synchronous and the asyncio client: channels, deadlines, retries and error mapping.

Both run the same Calls (_calls) through the same _Attempts bookkeeping; only the waiting
differs (time.sleep and a blocking stub, or asyncio.sleep and an aio stub).
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Concatenate, Generic, ParamSpec, Self, TypeVar

import grpc
from grpc import aio
from grpc_health.v1 import health_pb2_grpc

from foliod.api import DEFAULT_ADDRESS, Backing, __version__
from foliod.v1 import foliod_pb2 as pb
from foliod.v1 import foliod_pb2_grpc
from foliodclient import _calls
from foliodclient._batch import AsyncSubmission, Submission
from foliodclient._calls import FOLIOD, HEALTH, IDEMPOTENCY_KEY, Call
from foliodclient._convert import from_message
from foliodclient._types import Guest, ReplayResult, Snapshot
from foliodclient.errors import error_from_rpc

P = ParamSpec("P")
T = TypeVar("T")
C = TypeVar("C", grpc.Channel, aio.Channel)

DEFAULT_TARGET = DEFAULT_ADDRESS
DEFAULT_TIMEOUT_SECONDS = 10.0


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff with full jitter: before retry n (from 0) sleep a uniform draw from
    [0, min(max_backoff_seconds, initial_backoff_seconds * multiplier**n)].

    Only UNAVAILABLE is retried, and never past the call's deadline: reads always, mutations
    (sent with an idempotency key, reused by their retries) unless `mutations` is False.
    """

    max_attempts: int = 4
    initial_backoff_seconds: float = 0.05
    max_backoff_seconds: float = 2.0
    multiplier: float = 2.0
    mutations: bool = True

    def __post_init__(self) -> None:
        if self.max_attempts < 1 or self.initial_backoff_seconds < 0 or self.multiplier < 1:
            raise ValueError(f"invalid retry policy: {self}")

    def backoff_seconds(self, retry: int, rng: random.Random) -> float:
        ceiling = self.initial_backoff_seconds * self.multiplier**retry
        return rng.uniform(0.0, min(self.max_backoff_seconds, ceiling))


class _Attempts:
    """The deadline and retry state of one call; raises the mapped error when it gives up."""

    __slots__ = ("_attempt", "_deadline", "_policy", "_retryable", "_rng")

    def __init__(
        self, timeout: float | None, policy: RetryPolicy, rng: random.Random, *, retryable: bool
    ) -> None:
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._retryable = retryable
        self._policy = policy
        self._rng = rng
        self._attempt = 0

    def timeout(self) -> float | None:
        """What is left of the deadline for the next attempt."""
        if self._deadline is None:
            return None
        return max(self._deadline - time.monotonic(), 0.0)

    def retry_after(self, exc: grpc.RpcError) -> float:
        """Seconds to wait before trying again; raises the mapped error instead when done."""
        self._attempt += 1
        if (
            self._retryable
            and exc.code() == grpc.StatusCode.UNAVAILABLE
            and self._attempt < self._policy.max_attempts
        ):
            delay = self._policy.backoff_seconds(self._attempt - 1, self._rng)
            left = self.timeout()
            if left is None or delay < left:
                return delay
        raise error_from_rpc(exc) from exc


@dataclass(frozen=True, slots=True)
class _Connection:
    """Everything both clients need to open a channel and send calls on it."""

    target: str
    credentials: grpc.ChannelCredentials | None
    metadata: tuple[tuple[str, str], ...]
    options: tuple[tuple[str, Any], ...]


def _with_key(
    metadata: tuple[tuple[str, str], ...], key: str | None
) -> tuple[tuple[str, str], ...]:
    return metadata if key is None else (*metadata, (IDEMPOTENCY_KEY, key))


def _connection(
    target: str,
    *,
    tls: bool,
    tls_ca: str | os.PathLike[str] | bytes | None,
    token: str | None,
    options: tuple[tuple[str, Any], ...],
    tls_cert: str | os.PathLike[str] | bytes | None = None,
    tls_key: str | os.PathLike[str] | bytes | None = None,
) -> _Connection:
    credentials = None
    if (tls_cert is None) != (tls_key is None):
        raise ValueError("tls_cert and tls_key go together: give both or neither")
    if tls or tls_ca is not None or tls_cert is not None:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=_pem(tls_ca),
            private_key=_pem(tls_key),
            certificate_chain=_pem(tls_cert),
        )
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    user_agent = ("grpc.primary_user_agent", f"foliodclient/{__version__}")
    return _Connection(target, credentials, metadata, (user_agent, *options))


def _pem(source: str | os.PathLike[str] | bytes | None) -> bytes | None:
    """PEM bytes given as such or as a file's path."""
    return source if source is None or isinstance(source, bytes) else Path(source).read_bytes()


class _ClientBase(Generic[C]):
    """Connection settings, stubs and per-call bookkeeping shared by both clients."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float | None = DEFAULT_TIMEOUT_SECONDS,
        machine: str = "",
        tls: bool = False,
        tls_ca: str | os.PathLike[str] | bytes | None = None,
        token: str | None = None,
        tls_cert: str | os.PathLike[str] | bytes | None = None,
        tls_key: str | os.PathLike[str] | bytes | None = None,
        retry: RetryPolicy | None = None,
        channel_options: tuple[tuple[str, Any], ...] = (),
        rng: random.Random | None = None,
    ) -> None:
        """Connects to `target` ("host:port"). `timeout` is the default deadline of every call in
        seconds (None: no deadline); `machine` the default machine ("" is the host). TLS is used
        when `tls` is set or `tls_ca` (a PEM file or its bytes) is given; `tls_cert` and
        `tls_key` (PEM files or bytes) are the client certificate for mutual TLS; `token` is
        sent as ``authorization: Bearer <token>``. `retry` defaults to RetryPolicy()."""
        self.target = target
        self.timeout = timeout
        self.machine = machine
        self.retry = retry or RetryPolicy()
        self._connection = _connection(
            target,
            tls=tls,
            tls_ca=tls_ca,
            token=token,
            options=channel_options,
            tls_cert=tls_cert,
            tls_key=tls_key,
        )
        self._rng = rng or random.Random()
        self._channel: C = self._open_channel(self._connection)
        self._stubs: dict[str, Any] = {
            FOLIOD: foliod_pb2_grpc.FoliodStub(self._channel),
            HEALTH: health_pb2_grpc.HealthStub(self._channel),
        }

    def _open_channel(self, conn: _Connection) -> C:
        raise NotImplementedError

    def _start(self, call: Call[Any]) -> tuple[Any, _Attempts, tuple[tuple[str, str], ...]]:
        """The call's request with its machine filled in, its attempts, and the metadata every
        attempt sends: a mutation's carries its idempotency key."""
        request = call.request
        if "machine" in request.DESCRIPTOR.fields_by_name:
            request.machine = self.machine if call.machine is None else call.machine  # type: ignore[attr-defined]
        timeout = self.timeout if call.timeout is None else call.timeout
        metadata: tuple[tuple[str, str], ...] = self._connection.metadata
        retryable = call.rpc.idempotent
        if not retryable:
            # From the OS, not self._rng: a seeded generator would repeat keys across clients.
            key = call.idempotency_key or os.urandom(16).hex()
            metadata = (*metadata, (IDEMPOTENCY_KEY, key))
            retryable = self.retry.mutations
        attempts = _Attempts(timeout, self.retry, self._rng, retryable=retryable)
        return request, attempts, metadata


def _sync(build: Callable[P, Call[T]]) -> Callable[Concatenate[FoliodClient, P], T]:
    def method(self: FoliodClient, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return self._run(build(*args, **kwargs))

    method.__name__ = method.__qualname__ = build.__name__
    method.__doc__ = build.__doc__
    return method


def _async(
    build: Callable[P, Call[T]],
) -> Callable[Concatenate[AsyncFoliodClient, P], Coroutine[Any, Any, T]]:
    async def method(self: AsyncFoliodClient, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return await self._run(build(*args, **kwargs))

    method.__name__ = method.__qualname__ = build.__name__
    method.__doc__ = build.__doc__
    return method


class FoliodClient(_ClientBase[grpc.Channel]):
    """A blocking client of foliod: one method per RPC, typed results, errors from
    foliodclient.errors. Use as a context manager, or call close()."""

    def _open_channel(self, conn: _Connection) -> grpc.Channel:
        if conn.credentials is None:
            return grpc.insecure_channel(conn.target, options=conn.options)
        return grpc.secure_channel(conn.target, conn.credentials, options=conn.options)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _run(self, call: Call[T]) -> T:
        """Sends a call (retrying it on UNAVAILABLE, a mutation with the same idempotency key)
        and converts the reply."""
        request, attempts, metadata = self._start(call)
        method = getattr(self._stubs[call.rpc.service], call.rpc.method)
        while True:
            try:
                reply = method(request, timeout=attempts.timeout(), metadata=metadata)
            except grpc.RpcError as exc:
                time.sleep(attempts.retry_after(exc))
            else:
                return call.rpc.result(reply)

    def open_submission(
        self,
        machine: str = "",
        *,
        timeout: float | None = None,
        idempotency_key: str | None = None,
    ) -> Submission:
        """Opens a Submit stream for batches on `machine` ("": the client's machine); use it as
        a context manager. `timeout` bounds the whole stream (None: no deadline). With an
        `idempotency_key`, the server runs each batch id once under it: after a broken stream,
        open another with the same key and resend the batches (the same ids) to get the
        completions of those that already ran without running them again."""
        stub = self._stubs[FOLIOD]
        metadata = _with_key(self._connection.metadata, idempotency_key)
        return Submission(stub, machine or self.machine, metadata, timeout)

    def replay(
        self,
        names: str | Sequence[str],
        offsets: Sequence[int],
        lengths: Sequence[int] | None = None,
        writes: Sequence[int] | None = None,
        files: Sequence[int] | None = None,
        *,
        interval_accesses: int = 0,
        machine: str | None = None,
        timeout: float | None = None,
    ) -> ReplayResult:
        """Replays a trace in order in one Replay call, on the file `names` (or files: then
        `files` gives each operation's index into them): byte `offsets`, `lengths` (None: each
        operation is the page holding its offset) and which operations are `writes` (true
        values; None: all reads). Every file must exist and hold its operations. Each page an
        operation touches is one access, as trace simulators count. `interval_accesses` > 0
        asks for totals every that many page accesses too. `timeout` bounds the call (None:
        the client's timeout plus REPLAY_SECONDS_PER_OP a operation). Never retried: a replay
        changes the cache."""
        chunks = _calls.replay_chunks(
            names,
            offsets,
            lengths,
            writes,
            files,
            machine=self.machine if machine is None else machine,
            interval_accesses=interval_accesses,
        )
        try:
            reply = self._stubs[FOLIOD].Replay(
                chunks,
                timeout=_calls.replay_timeout(self.timeout, timeout, len(offsets)),
                metadata=self._connection.metadata,
            )
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from exc
        return from_message(ReplayResult, reply)

    def snapshot_machine(
        self, machine: str | None = None, *, timeout: float | None = None
    ) -> Snapshot:
        """A machine's snapshot ("": the client's machine; the observed real host is read
        afresh from its /proc/kpageflags): its summary and the file's bytes. `timeout` bounds
        the call (None: the client's timeout plus SNAPSHOT_EXTRA_SECONDS)."""
        request = pb.SnapshotMachineRequest(machine=self.machine if machine is None else machine)
        try:
            chunks = self._stubs[FOLIOD].SnapshotMachine(
                request,
                timeout=_calls.snapshot_timeout(self.timeout, timeout),
                metadata=self._connection.metadata,
            )
            return _calls.snapshot_from_chunks(chunks)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from exc

    def boot_guest(
        self,
        name: str,
        snapshot: bytes | str | os.PathLike[str],
        ram_bytes: int = 0,
        backing: Backing | str = Backing.BASE,
        *,
        mthp_size_kb: int = 0,
        hvo: bool = False,
        free_page_reporting: bool | None = None,
        machine: str | None = None,
        timeout: float | None = None,
    ) -> Guest:
        """Creates a guest booted from a snapshot (its bytes, or the path of its file): the
        snapshot's free blocks and folios at the same frames, held by owners imported:<kind>.
        `ram_bytes` 0 is the snapshot's size; the rest as create_guest. InvalidArgument for a
        file that is not a valid snapshot, OutOfMemory for one larger than `ram_bytes` or a
        guest the host cannot back; nothing is created then. Never retried."""
        chunks = _calls.boot_guest_chunks(
            name,
            _calls.snapshot_bytes(snapshot),
            ram_bytes,
            backing,
            machine=self.machine if machine is None else machine,
            mthp_size_kb=mthp_size_kb,
            hvo=hvo,
            free_page_reporting=free_page_reporting,
        )
        try:
            reply = self._stubs[FOLIOD].BootGuest(
                chunks,
                timeout=_calls.snapshot_timeout(self.timeout, timeout),
                metadata=self._connection.metadata,
            )
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from exc
        return from_message(Guest, reply)

    allocate = _sync(_calls.allocate)
    free = _sync(_calls.free)
    release_owner = _sync(_calls.release_owner)
    get_folio = _sync(_calls.get_folio)
    write_folio = _sync(_calls.write_folio)
    read_folio = _sync(_calls.read_folio)
    get_machine = _sync(_calls.get_machine)
    get_buddy_info = _sync(_calls.get_buddy_info)
    get_meminfo = _sync(_calls.get_meminfo)
    get_memmap = _sync(_calls.get_memmap)
    get_vmstat = _sync(_calls.get_vmstat)
    get_thp_policy = _sync(_calls.get_thp_policy)
    set_thp_policy = _sync(_calls.set_thp_policy)
    create_file = _sync(_calls.create_file)
    open_file = _sync(_calls.open_file)
    close_file = _sync(_calls.close_file)
    stat_file = _sync(_calls.stat_file)
    list_files = _sync(_calls.list_files)
    read_file = _sync(_calls.read_file)
    write_file = _sync(_calls.write_file)
    truncate_file = _sync(_calls.truncate_file)
    drop_file_range = _sync(_calls.drop_file_range)
    delete_file = _sync(_calls.delete_file)
    writeback = _sync(_calls.writeback)
    fsync = _sync(_calls.fsync)
    reclaim = _sync(_calls.reclaim)
    drop_caches = _sync(_calls.drop_caches)
    set_faults = _sync(_calls.set_faults)
    get_faults = _sync(_calls.get_faults)
    create_guest = _sync(_calls.create_guest)
    destroy_guest = _sync(_calls.destroy_guest)
    get_guest = _sync(_calls.get_guest)
    list_guests = _sync(_calls.list_guests)
    set_balloon = _sync(_calls.set_balloon)
    report_free_pages = _sync(_calls.report_free_pages)
    check_health = _sync(_calls.check_health)


class AsyncFoliodClient(_ClientBase[aio.Channel]):
    """The asyncio client (grpc.aio): the same methods as FoliodClient, as coroutines. Use as an
    async context manager, or await close(); create it inside the event loop it runs on."""

    def _open_channel(self, conn: _Connection) -> aio.Channel:
        if conn.credentials is None:
            return aio.insecure_channel(conn.target, options=conn.options)
        return aio.secure_channel(conn.target, conn.credentials, options=conn.options)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def _run(self, call: Call[T]) -> T:
        """Sends a call (retrying it on UNAVAILABLE, a mutation with the same idempotency key)
        and converts the reply."""
        request, attempts, metadata = self._start(call)
        method = getattr(self._stubs[call.rpc.service], call.rpc.method)
        while True:
            try:
                reply = await method(request, timeout=attempts.timeout(), metadata=metadata)
            except grpc.RpcError as exc:
                await asyncio.sleep(attempts.retry_after(exc))
            else:
                return call.rpc.result(reply)

    def open_submission(
        self,
        machine: str = "",
        *,
        timeout: float | None = None,
        idempotency_key: str | None = None,
    ) -> AsyncSubmission:
        """Opens a Submit stream for batches on `machine` ("": the client's machine); use it as
        an async context manager. `timeout` bounds the whole stream (None: no deadline);
        `idempotency_key` as for FoliodClient.open_submission."""
        stub = self._stubs[FOLIOD]
        metadata = _with_key(self._connection.metadata, idempotency_key)
        return AsyncSubmission(stub, machine or self.machine, metadata, timeout)

    async def replay(
        self,
        names: str | Sequence[str],
        offsets: Sequence[int],
        lengths: Sequence[int] | None = None,
        writes: Sequence[int] | None = None,
        files: Sequence[int] | None = None,
        *,
        interval_accesses: int = 0,
        machine: str | None = None,
        timeout: float | None = None,
    ) -> ReplayResult:
        """As FoliodClient.replay: replays a trace in order in one Replay call."""
        chunks = _calls.replay_chunks(
            names,
            offsets,
            lengths,
            writes,
            files,
            machine=self.machine if machine is None else machine,
            interval_accesses=interval_accesses,
        )
        try:
            reply = await self._stubs[FOLIOD].Replay(
                chunks,
                timeout=_calls.replay_timeout(self.timeout, timeout, len(offsets)),
                metadata=self._connection.metadata,
            )
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from exc
        return from_message(ReplayResult, reply)

    async def snapshot_machine(
        self, machine: str | None = None, *, timeout: float | None = None
    ) -> Snapshot:
        """As FoliodClient.snapshot_machine: a machine's snapshot."""
        request = pb.SnapshotMachineRequest(machine=self.machine if machine is None else machine)
        try:
            call = self._stubs[FOLIOD].SnapshotMachine(
                request,
                timeout=_calls.snapshot_timeout(self.timeout, timeout),
                metadata=self._connection.metadata,
            )
            return _calls.snapshot_from_chunks([chunk async for chunk in call])
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from exc

    async def boot_guest(
        self,
        name: str,
        snapshot: bytes | str | os.PathLike[str],
        ram_bytes: int = 0,
        backing: Backing | str = Backing.BASE,
        *,
        mthp_size_kb: int = 0,
        hvo: bool = False,
        free_page_reporting: bool | None = None,
        machine: str | None = None,
        timeout: float | None = None,
    ) -> Guest:
        """As FoliodClient.boot_guest: a guest booted from a snapshot."""
        chunks = _calls.boot_guest_chunks(
            name,
            _calls.snapshot_bytes(snapshot),
            ram_bytes,
            backing,
            machine=self.machine if machine is None else machine,
            mthp_size_kb=mthp_size_kb,
            hvo=hvo,
            free_page_reporting=free_page_reporting,
        )
        try:
            reply = await self._stubs[FOLIOD].BootGuest(
                chunks,
                timeout=_calls.snapshot_timeout(self.timeout, timeout),
                metadata=self._connection.metadata,
            )
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from exc
        return from_message(Guest, reply)

    allocate = _async(_calls.allocate)
    free = _async(_calls.free)
    release_owner = _async(_calls.release_owner)
    get_folio = _async(_calls.get_folio)
    write_folio = _async(_calls.write_folio)
    read_folio = _async(_calls.read_folio)
    get_machine = _async(_calls.get_machine)
    get_buddy_info = _async(_calls.get_buddy_info)
    get_meminfo = _async(_calls.get_meminfo)
    get_memmap = _async(_calls.get_memmap)
    get_vmstat = _async(_calls.get_vmstat)
    get_thp_policy = _async(_calls.get_thp_policy)
    set_thp_policy = _async(_calls.set_thp_policy)
    create_file = _async(_calls.create_file)
    open_file = _async(_calls.open_file)
    close_file = _async(_calls.close_file)
    stat_file = _async(_calls.stat_file)
    list_files = _async(_calls.list_files)
    read_file = _async(_calls.read_file)
    write_file = _async(_calls.write_file)
    truncate_file = _async(_calls.truncate_file)
    drop_file_range = _async(_calls.drop_file_range)
    delete_file = _async(_calls.delete_file)
    writeback = _async(_calls.writeback)
    fsync = _async(_calls.fsync)
    reclaim = _async(_calls.reclaim)
    drop_caches = _async(_calls.drop_caches)
    set_faults = _async(_calls.set_faults)
    get_faults = _async(_calls.get_faults)
    create_guest = _async(_calls.create_guest)
    destroy_guest = _async(_calls.destroy_guest)
    get_guest = _async(_calls.get_guest)
    list_guests = _async(_calls.list_guests)
    set_balloon = _async(_calls.set_balloon)
    report_free_pages = _async(_calls.report_free_pages)
    check_health = _async(_calls.check_health)
