"""Locust users that drive foliod through FoliodClient, so Locust's master/worker mode spreads
the load over many machines.

    from locust import task
    from foliodclient.locust import FoliodUser

    class Allocator(FoliodUser):
        @task
        def churn(self) -> None:
            self.client.free(self.client.allocate("churn", "anon", count=8).handles)

    $ locust -f mylocustfile.py --host 127.0.0.1:50051

Every client call is one Locust request: request_type "grpc", named after the RPC ("ReadFile"),
timed from send to converted reply (retries included), its length the reply's encoded bytes. A
failed call is reported as a RequestFailure ("NOT_FOUND: UnknownFile: ...") and, by default, ends
the task quietly (FoliodUser.stop_task_on_error).

Import this module only in a Locust process: importing locust monkey-patches the standard library
for gevent, and this module then switches grpc to gevent mode (see below).
"""

from __future__ import annotations

import dataclasses
import os
import random
import time
import uuid
from typing import Any, ClassVar, TypeVar

import locust  # before grpc_gevent: locust's import runs gevent's monkey.patch_all()
from google.protobuf.message import Message
from grpc.experimental import gevent as grpc_gevent
from locust.env import Environment
from locust.exception import LocustError, RescheduleTask

from foliod.api import DEFAULT_ADDRESS, PAGE_SIZE
from foliodclient._calls import Call
from foliodclient._client import DEFAULT_TIMEOUT_SECONDS, FoliodClient, RetryPolicy
from foliodclient.errors import CallError

__all__ = ["FoliodPageCacheUser", "FoliodUser", "RequestFailure"]

T = TypeVar("T")

# Locust runs every user as a greenlet of one OS thread. A blocking grpc call otherwise waits in
# gRPC's C core, out of gevent's sight, and holds the whole thread: the users of a process then
# make one call at a time, and a worker stops sending heartbeats to its master while a call is
# slow. init_gevent() has the C core wait through gevent instead, so the other greenlets run
# meanwhile. grpc requires it after monkey-patching and before the first channel is created:
# hence here, at import, before any user (and so any channel) exists.
grpc_gevent.init_gevent()


class RequestFailure(Exception):
    """A failed call as Locust records it: the gRPC status code name, the error class and its
    message. `code` is the grpc.StatusCode, `error` (also __cause__) the client's CallError."""

    def __init__(self, error: CallError) -> None:
        self.code = error.code
        self.error = error
        super().__init__(f"{error.code.name}: {type(error).__name__}: {error.message}")

    def __repr__(self) -> str:
        # Locust keys its failure table by repr(): keep it the readable message.
        return str(self)


class _ReportingClient(FoliodClient):
    """A FoliodClient that fires a Locust request event for every call it makes."""

    def __init__(self, user: FoliodUser, target: str, **options: Any) -> None:
        self._user = user
        super().__init__(target, **options)

    def _run(self, call: Call[T]) -> T:
        reply_bytes = 0

        def measured(reply: Message) -> T:
            nonlocal reply_bytes
            reply_bytes = reply.ByteSize()
            return call.rpc.result(reply)

        measured_call = dataclasses.replace(
            call, rpc=dataclasses.replace(call.rpc, result=measured)
        )
        events = self._user.environment.events
        start_time = time.time()
        start = time.perf_counter()
        try:
            result = super()._run(measured_call)
        except CallError as exc:
            failure = RequestFailure(exc)
            events.request.fire(
                request_type="grpc",
                name=call.rpc.method,
                start_time=start_time,
                response_time=(time.perf_counter() - start) * 1000,
                response_length=0,
                response=None,
                context=self._user.context(),
                exception=failure,
            )
            if self._user.stop_task_on_error:
                raise RescheduleTask() from failure
            raise
        events.request.fire(
            request_type="grpc",
            name=call.rpc.method,
            start_time=start_time,
            response_time=(time.perf_counter() - start) * 1000,
            response_length=reply_bytes,
            response=result,
            context=self._user.context(),
            exception=None,
        )
        return result


class FoliodUser(locust.User):
    """A Locust user with its own FoliodClient (`self.client`) to the target given by `--host`
    ("host:port", no scheme) or the class's `host`, and a random.Random (`self.rng`). Subclass
    it and add @task methods.

    The class attributes below are FoliodClient's connection options. When a call fails and
    `stop_task_on_error` is set, the failure is reported and the task ends (RescheduleTask), so
    later calls never see a missing result; clear it to have the CallError raised in the task.
    """

    abstract = True

    timeout: ClassVar[float | None] = DEFAULT_TIMEOUT_SECONDS
    machine: ClassVar[str] = ""
    tls: ClassVar[bool] = False
    tls_ca: ClassVar[str | os.PathLike[str] | bytes | None] = None
    token: ClassVar[str | None] = None
    tls_cert: ClassVar[str | os.PathLike[str] | bytes | None] = None
    tls_key: ClassVar[str | os.PathLike[str] | bytes | None] = None
    retry: ClassVar[RetryPolicy | None] = None
    stop_task_on_error: ClassVar[bool] = True

    def __init__(self, environment: Environment) -> None:
        super().__init__(environment)
        if not self.host:
            raise LocustError(f"{type(self).__name__} needs a target: --host {DEFAULT_ADDRESS}")
        self.client: FoliodClient = _ReportingClient(
            self,
            self.host,
            timeout=self.timeout,
            machine=self.machine,
            tls=self.tls,
            tls_ca=self.tls_ca,
            token=self.token,
            tls_cert=self.tls_cert,
            tls_key=self.tls_key,
            retry=self.retry,
        )
        self.rng = random.Random()

    def on_stop(self) -> None:
        """Closes the client's channel; a subclass that overrides on_stop calls this last."""
        self.client.close()


class FoliodPageCacheUser(FoliodUser):
    """Page-cache traffic on a file of its own: 4 KiB reads at random page-aligned offsets
    (weight 8), 4 KiB writes (3), fsync (1) and a memmap report (1).

    The file (`file_bytes`, written once at start, `max_order` for its folios) gets a unique
    name, so users of many workers never share one; it is deleted when the user stops.
    """

    wait_time = locust.between(0.005, 0.05)
    file_bytes: ClassVar[int] = 1 << 20
    max_order: ClassVar[int | None] = None
    io_bytes: ClassVar[int] = PAGE_SIZE

    def on_start(self) -> None:
        self.file_name = f"locust-{uuid.uuid4().hex}"
        self.client.create_file(self.file_name, max_order=self.max_order)
        chunk = 256 << 10
        for offset in range(0, self.file_bytes, chunk):
            self.client.write_file(
                self.file_name, self._data(min(chunk, self.file_bytes - offset)), offset
            )
        self.handle = self.client.open_file(self.file_name)

    def on_stop(self) -> None:
        """Closes the handle and deletes the file (best effort: the server may be gone)."""
        if hasattr(self, "handle"):
            try:
                self.client.close_file(self.handle)
                self.client.delete_file(self.file_name)
            except (CallError, RescheduleTask):
                pass
        super().on_stop()

    def _offset(self) -> int:
        pages = max((self.file_bytes - self.io_bytes) // PAGE_SIZE, 0)
        return self.rng.randint(0, pages) * PAGE_SIZE

    def _data(self, size_bytes: int) -> bytes:
        return self.rng.randbytes(size_bytes)

    @locust.task(8)
    def read(self) -> None:
        self.client.read_file(self.file_name, self.io_bytes, self._offset())

    @locust.task(3)
    def write(self) -> None:
        self.client.write_file(self.file_name, self._data(self.io_bytes), self._offset())

    @locust.task(1)
    def fsync(self) -> None:
        self.client.fsync(self.handle)

    @locust.task(1)
    def memmap(self) -> None:
        self.client.get_memmap()
