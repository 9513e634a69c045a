"""Exactly-once mutations: idempotency keys, replayed outcomes, the window and the bound, and
the client's keyed retries (a retried Allocate after a dropped connection allocates once)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import socket
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest

import foliodclient
from foliod.rpc.idempotency import (
    IDEMPOTENCY_KEY,
    MAX_KEY_LENGTH,
    MUTATIONS,
    READS,
    REPLAYED_KEY,
    OutcomeCache,
)
from foliod.rpc.interceptors import REQUEST_ID_KEY
from foliod.server import FoliodServer
from foliod.v1 import foliod_pb2 as pb
from foliod.v1 import foliod_pb2_grpc
from foliodclient import AsyncFoliodClient, FoliodClient, RetryPolicy, _calls
from tests.conftest import ServerFactory, connect
from tests.test_client import fake_server

Stub = foliod_pb2_grpc.FoliodStub
ALLOCATE_KEY = ("foliod.v1.Foliod", "Allocate", "unary")
FAST_RETRY = RetryPolicy(max_attempts=4, initial_backoff_seconds=0.01, max_backoff_seconds=0.05)
# Generous: after a cut the channel reconnects before the retry can be sent.
PATIENT_RETRY = RetryPolicy(max_attempts=20, initial_backoff_seconds=0.02, max_backoff_seconds=0.2)


def _key() -> str:
    return os.urandom(16).hex()


def _allocate(stub: Stub, key: str, count: int = 8, owner: str = "p") -> tuple[Any, Any]:
    """An Allocate of `count` order-0 file folios with an idempotency key: (reply, call)."""
    request = pb.AllocateRequest(owner=owner, kind=pb.FOLIO_KIND_FILE, count=count)
    reply, call = stub.Allocate.with_call(request, timeout=10, metadata=((IDEMPOTENCY_KEY, key),))
    return reply, call


def _free_pages(stub: Stub) -> int:
    return int(stub.GetMachine(pb.GetMachineRequest()).nr_free_pages)


def _trailing(call: Any) -> dict[str, Any]:
    return dict(call.trailing_metadata() or ())


def _wait_for_starts(server: FoliodServer, count: int) -> None:
    """Waits until `count` Allocates have reached foliod's interceptor."""
    deadline = time.monotonic() + 10
    while server.calls.starts.totals().get(ALLOCATE_KEY, 0) < count:
        assert time.monotonic() < deadline, "the calls never reached the server"
        time.sleep(0.01)


def test_every_unary_method_is_a_mutation_or_a_read() -> None:
    """Every unary RPC of the service descriptor is classified once, and the client keys and
    retries exactly the server's mutations."""
    service = pb.DESCRIPTOR.services_by_name["Foliod"]
    unary = {m.name for m in service.methods if not (m.client_streaming or m.server_streaming)}
    assert not MUTATIONS & READS
    assert unary == MUTATIONS | READS
    rpcs = [rpc for rpc in vars(_calls).values() if isinstance(rpc, _calls.Rpc)]
    assert {r.method for r in rpcs if r.service == _calls.FOLIOD and not r.idempotent} == MUTATIONS
    assert _calls.IDEMPOTENCY_KEY == IDEMPOTENCY_KEY


def test_the_same_key_twice_applies_once_and_replays_the_response(stub: Stub) -> None:
    """A second Allocate with the same key returns the first's reply byte for byte, marked as
    a replay with its own request id, and takes no more memory."""
    before = _free_pages(stub)
    key = _key()
    first, first_call = _allocate(stub, key)
    after_first = _free_pages(stub)
    second, second_call = _allocate(stub, key)
    assert second.SerializeToString(deterministic=True) == first.SerializeToString(
        deterministic=True
    )
    assert first.count == 8 and after_first == before - 8
    assert _free_pages(stub) == after_first
    assert REPLAYED_KEY not in _trailing(first_call)
    assert _trailing(second_call)[REPLAYED_KEY] == "true"
    assert _trailing(second_call)[REQUEST_ID_KEY] != _trailing(first_call)[REQUEST_ID_KEY]
    third, _ = _allocate(stub, _key())  # another key: another allocation
    assert third.first_handle != first.first_handle and _free_pages(stub) == after_first - 8


def test_calls_without_a_key_and_reads_are_not_deduplicated(stub: Stub) -> None:
    """Without a key every Allocate runs; a read with a key is served fresh each time."""
    request = pb.AllocateRequest(owner="p", kind=pb.FOLIO_KIND_FILE, count=1)
    handles = {stub.Allocate(request, timeout=10).first_handle for _ in range(3)}
    assert len(handles) == 3
    metadata = ((IDEMPOTENCY_KEY, "read-key"),)
    free = [
        stub.GetMachine(pb.GetMachineRequest(), metadata=metadata).nr_free_pages,
        stub.Allocate(request, timeout=10).count,
        stub.GetMachine(pb.GetMachineRequest(), metadata=metadata).nr_free_pages,
    ]
    assert free[2] == free[0] - 1


def test_a_failed_first_outcome_is_replayed_as_the_same_error(stub: Stub) -> None:
    """A DeleteFile that failed NOT_FOUND fails the same way on a retry with its key, with the
    same details, even once the file exists, and the file is not deleted."""
    key = ((IDEMPOTENCY_KEY, _key()),)
    request = pb.DeleteFileRequest(name="late.dat")
    with pytest.raises(grpc.RpcError) as first:
        stub.DeleteFile(request, timeout=10, metadata=key)
    stub.CreateFile(pb.CreateFileRequest(name="late.dat"), timeout=10)
    with pytest.raises(grpc.RpcError) as second:
        stub.DeleteFile(request, timeout=10, metadata=key)
    assert first.value.code() == second.value.code() == grpc.StatusCode.NOT_FOUND
    assert first.value.details() == second.value.details()
    details: list[dict[str, Any]] = [
        dict(e.trailing_metadata() or ())  # type: ignore[arg-type]
        for e in (first.value, second.value)
    ]
    assert details[0]["grpc-status-details-bin"] == details[1]["grpc-status-details-bin"]
    assert REPLAYED_KEY not in details[0] and details[1][REPLAYED_KEY] == "true"
    assert REQUEST_ID_KEY in details[1]
    assert stub.StatFile(pb.StatFileRequest(name="late.dat")).name == "late.dat"
    client_error = foliodclient.error_from_rpc(second.value)
    assert isinstance(client_error, foliodclient.NotFound)


def test_the_same_key_with_another_request_is_invalid_argument(stub: Stub) -> None:
    """A key reused for a different request body is refused and applies nothing."""
    key = _key()
    _allocate(stub, key, count=8)
    before = _free_pages(stub)
    with pytest.raises(grpc.RpcError) as refused:
        _allocate(stub, key, count=9)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "different Allocate request" in (refused.value.details() or "")
    assert _free_pages(stub) == before


def test_a_key_is_per_method_and_bounded_in_length(stub: Stub) -> None:
    """One key on two methods is two calls; a key over the length limit is refused."""
    key = _key()
    stub.CreateFile(pb.CreateFileRequest(name="k.dat"), metadata=((IDEMPOTENCY_KEY, key),))
    stub.DeleteFile(pb.DeleteFileRequest(name="k.dat"), metadata=((IDEMPOTENCY_KEY, key),))
    assert not stub.ListFiles(pb.ListFilesRequest()).files
    with pytest.raises(grpc.RpcError) as refused:
        _allocate(stub, "k" * (MAX_KEY_LENGTH + 1))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_concurrent_duplicates_run_once(make_server: ServerFactory) -> None:
    """Eight Allocates with one key arriving while the first still runs all get its reply;
    memory goes down once."""
    server = make_server(workers=8)
    chan, stub = connect(server)
    key = _key()
    with chan, futures.ThreadPoolExecutor(8) as pool:
        before = _free_pages(stub)
        with server.machines.host.lock:  # the first execution waits here
            calls = [pool.submit(_allocate, stub, key) for _ in range(8)]
            _wait_for_starts(server, 8)
        replies = [call.result(timeout=10)[0] for call in calls]
        assert len({r.SerializeToString(deterministic=True) for r in replies}) == 1
        assert _free_pages(stub) == before - 8
        replayed = [REPLAYED_KEY in _trailing(call.result()[1]) for call in calls]
        assert replayed.count(False) == 1


def test_outcomes_expire_after_the_window(make_server: ServerFactory) -> None:
    """A retry just inside the window is replayed; one after it runs again (clock injected)."""
    server = make_server(idempotency_window_seconds=60)
    now = [1000.0]
    server.outcomes.clock = lambda: now[0]
    chan, stub = connect(server)
    with chan:
        key = _key()
        first, _ = _allocate(stub, key)
        now[0] += 59.9
        assert _allocate(stub, key)[0] == first
        now[0] += 0.2
        again, call = _allocate(stub, key)
        assert again.first_handle != first.first_handle
        assert REPLAYED_KEY not in _trailing(call)


def test_the_cache_holds_at_most_max_entries(make_server: ServerFactory) -> None:
    """With room for three outcomes, the oldest of four keys is forgotten (its retry runs
    again) and the newest is still replayed."""
    server = make_server(idempotency_max_entries=3)
    chan, stub = connect(server)
    with chan:
        keys = [_key() for _ in range(4)]
        firsts = [_allocate(stub, key)[0] for key in keys]
        assert len(server.outcomes) == 3
        assert _allocate(stub, keys[3])[0] == firsts[3]
        assert _allocate(stub, keys[0])[0].first_handle != firsts[0].first_handle


def test_outcome_cache_bound_and_expiry_by_hand() -> None:
    """The cache drops the oldest finished outcome past max_entries and expired ones on any
    access; a running entry is kept whatever its age."""
    now = [0.0]
    cache = OutcomeCache(window_seconds=10, max_entries=2, clock=lambda: now[0])
    _running, first = cache.claim(("", "Allocate", "r"), b"d")
    assert first
    for name in "abc":
        entry, first = cache.claim(("", "Allocate", name), b"d")
        assert first
        cache.finish(("", "Allocate", name), entry, name.encode())
        now[0] += 1
    assert len(cache) == 3  # b, c and the running r
    assert cache.claim(("", "Allocate", "a"), b"d")[1]  # evicted: runs again
    assert not cache.claim(("", "Allocate", "c"), b"d")[1]
    now[0] += 100
    assert not cache.claim(("", "Allocate", "r"), b"d")[1]  # still running
    assert len(cache) == 2  # r, and a (claimed above, running)


class CuttingProxy:
    """A TCP proxy to a server whose open connections the test can cut all at once."""

    def __init__(self, upstream_port: int) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.upstream_port = upstream_port
        self.connections = 0
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                downstream, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            with self._lock:
                self.connections += 1
                self._sockets += [downstream, upstream]
            for source, target in ((downstream, upstream), (upstream, downstream)):
                threading.Thread(target=self._pump, args=(source, target), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, target: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                target.sendall(data)
        except OSError:
            pass
        for sock in (source, target):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        """Drops every open connection, as a broken network does."""
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def close(self) -> None:
        self.listener.close()
        self.cut()


@pytest.fixture
def proxy(server: FoliodServer) -> Iterator[CuttingProxy]:
    cutting = CuttingProxy(server.grpc_port)
    yield cutting
    cutting.close()


def test_a_retried_allocate_after_a_dropped_connection_allocates_once(
    server: FoliodServer, stub: Stub, proxy: CuttingProxy
) -> None:
    """The client's Allocate reaches the server, the connection drops before the reply, the
    client retries on UNAVAILABLE with the same key and gets the first execution's reply:
    memory goes down once."""
    before = _free_pages(stub)
    with FoliodClient(f"127.0.0.1:{proxy.port}", timeout=20, retry=PATIENT_RETRY) as client:
        client.get_machine()  # connected through the proxy
        with futures.ThreadPoolExecutor(1) as pool:
            with server.machines.host.lock:  # the first execution waits here
                call = pool.submit(client.allocate, "p", "file", count=16)
                _wait_for_starts(server, 1)
                proxy.cut()
            allocation = call.result(timeout=20)
    assert allocation.count == 16
    assert _free_pages(stub) == before - 16
    assert server.calls.starts.totals()[ALLOCATE_KEY] >= 2  # the retry reached the server
    assert proxy.connections >= 2


class _LostReply(grpc.ServerInterceptor):
    """Lets the first Allocate run, then ends it with UNAVAILABLE: its reply is lost."""

    def __init__(self) -> None:
        self.lost = 0

    def intercept_service(self, continuation: Any, details: Any) -> Any:
        handler = continuation(details)
        if handler is None or not details.method.endswith("/Allocate"):
            return handler
        inner = handler.unary_unary

        def lose_first(request: Any, context: grpc.ServicerContext) -> Any:
            response = inner(request, context)
            if self.lost == 0:
                self.lost += 1
                context.abort(grpc.StatusCode.UNAVAILABLE, "the reply was lost")
            return response

        return grpc.unary_unary_rpc_method_handler(
            lose_first,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


def test_a_lost_reply_is_replayed_to_the_clients_retry(
    make_server: ServerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An Allocate that ran but whose reply was lost (UNAVAILABLE) is retried by the client
    with its key and replayed, so it allocates once."""
    lost = _LostReply()
    real = grpc.server

    def with_lost_reply(*args: Any, **kwargs: Any) -> grpc.Server:
        observing, idempotency = kwargs["interceptors"]
        kwargs["interceptors"] = [observing, lost, idempotency]
        return real(*args, **kwargs)

    monkeypatch.setattr(grpc, "server", with_lost_reply)
    server = make_server()
    chan, stub = connect(server)
    with chan, FoliodClient(f"127.0.0.1:{server.grpc_port}", retry=FAST_RETRY) as client:
        before = _free_pages(stub)
        allocation = client.allocate("p", "file", count=4)
        assert lost.lost == 1 and allocation.count == 4
        assert _free_pages(stub) == before - 4


def test_the_client_sends_a_key_per_call_and_reuses_it_on_retries() -> None:
    """Each mutation carries a fresh 128-bit key, the same on its UNAVAILABLE retries; reads
    carry none; with RetryPolicy(mutations=False) a mutation is sent once."""
    with fake_server(failures=2) as (target, fake), FoliodClient(target, retry=FAST_RETRY) as c:
        c.allocate("o", "file", count=1)
        c.allocate("o", "file", count=1)
        c.get_meminfo()
    keys = [m.get(IDEMPOTENCY_KEY) for m in fake.metadata]
    allocate_keys, read_keys = keys[:4], keys[4:]
    assert fake.calls["Allocate"] == 4  # two failures, then one each
    assert allocate_keys[0] == allocate_keys[1] == allocate_keys[2] != allocate_keys[3]
    assert all(isinstance(k, str) and len(k) == 32 for k in allocate_keys)
    assert read_keys == [None] * 3
    once = dataclasses.replace(FAST_RETRY, mutations=False)
    with (
        fake_server(failures=2) as (target, fake),
        FoliodClient(target, retry=once) as c,
        pytest.raises(foliodclient.Unavailable),
    ):
        c.allocate("o", "file", count=1)
    assert fake.calls["Allocate"] == 1


def test_an_explicit_key_replays_an_earlier_call(server: FoliodServer, stub: Stub) -> None:
    """idempotency_key= on a call makes a later call with that key a replay, in both clients."""
    target = f"127.0.0.1:{server.grpc_port}"
    before = _free_pages(stub)
    with FoliodClient(target) as client:
        first = client.allocate("p", "file", count=2, idempotency_key="order-17")
        assert client.allocate("p", "file", count=2, idempotency_key="order-17") == first

    async def again() -> foliodclient.Allocation:
        async with AsyncFoliodClient(target) as aclient:
            return await aclient.allocate("p", "file", count=2, idempotency_key="order-17")

    assert asyncio.run(again()) == first
    assert _free_pages(stub) == before - 2


def _submit(stub: Stub, key: str | None, *batches: pb.SubmitRequest) -> list[pb.SubmitResponse]:
    metadata = () if key is None else ((IDEMPOTENCY_KEY, key),)
    return list(stub.Submit(iter(batches), timeout=10, metadata=metadata))


def _allocate_batch(batch_id: int, count: int) -> pb.SubmitRequest:
    return pb.SubmitRequest(
        id=batch_id,
        ops=[pb.OP_CODE_ALLOCATE],
        names=["batcher"],
        name_indexes=[0],
        kinds=[pb.FOLIO_KIND_FILE],
        orders=[0],
        counts=[count],
    )


def test_a_retried_submit_stream_runs_each_batch_once(stub: Stub) -> None:
    """A Submit stream opened again with the same idempotency key gets the recorded completions
    of the batches that already ran (the same handles) and runs only the new ones; without a
    key every batch runs again."""
    key = _key()
    free = _free_pages(stub)
    first = _submit(stub, key, _allocate_batch(1, 4), _allocate_batch(2, 8))
    assert _free_pages(stub) == free - 12
    again = _submit(stub, key, _allocate_batch(1, 4), _allocate_batch(2, 8), _allocate_batch(3, 2))
    assert [r.SerializeToString() for r in again[:2]] == [r.SerializeToString() for r in first]
    assert _free_pages(stub) == free - 14
    _submit(stub, None, _allocate_batch(1, 4))
    assert _free_pages(stub) == free - 18


def test_a_batch_id_reused_for_another_batch_is_invalid_argument(stub: Stub) -> None:
    """Under one key, a batch id names one batch: another batch with that id is refused."""
    key = _key()
    _submit(stub, key, _allocate_batch(7, 1))
    with pytest.raises(grpc.RpcError) as raised:
        _submit(stub, key, _allocate_batch(7, 2))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_the_client_resubmits_under_a_key_without_running_twice(server: FoliodServer) -> None:
    """open_submission(idempotency_key=...) resent with the same batches runs them once."""
    key = _key()
    batch = foliodclient.Batch()
    batch.allocate("keyed", "file", order=0, count=3)
    with FoliodClient(f"127.0.0.1:{server.grpc_port}", timeout=10) as client:
        free = client.get_machine().nr_free_pages
        with client.open_submission(idempotency_key=key, timeout=10) as submission:
            first = submission.submit(batch)
        with client.open_submission(idempotency_key=key, timeout=10) as submission:
            again = submission.submit(batch)
        assert again.results[0].handles == first.results[0].handles
        assert client.get_machine().nr_free_pages == free - 3
