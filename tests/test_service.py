"""The service around the API: health, reflection, graceful shutdown, logs and metrics."""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from concurrent import futures
from typing import Any

import grpc
import pytest
import structlog
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from foliod.logs import configure_logging, render_access, render_access_lines, write_lines
from foliod.rpc.interceptors import (
    AccessLog,
    CallEvent,
    CallInfo,
    CallReporter,
    ObservingInterceptor,
    StartCounts,
)
from foliod.rpc.pool import WorkerPool
from foliod.rpc.servicer import FoliodServicer
from foliod.server import FoliodServer
from foliod.v1 import foliod_pb2 as pb
from foliod.v1 import foliod_pb2_grpc
from tests.conftest import ServerProcess, connect

SERVICE = "foliod.v1.Foliod"


def _scrape(port: int) -> dict[str, list[tuple[dict[str, str], float]]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def _value(
    samples: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str
) -> float:
    matches = [
        v for got, v in samples.get(name, []) if all(got.get(k) == w for k, w in labels.items())
    ]
    assert len(matches) == 1, (name, labels, matches)
    return matches[0]


def test_health_reports_serving_for_server_and_service(channel: grpc.Channel) -> None:
    """The standard health service answers SERVING for the server and for foliod.v1.Foliod."""
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", SERVICE):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as err:
        health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_and_describes_the_api(channel: grpc.Channel) -> None:
    """Server reflection lists foliod, health and reflection, and serves foliod's descriptors."""
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    requests = [
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE),
    ]
    listing, files = list(stub.ServerReflectionInfo(iter(requests), timeout=10))
    names = {s.name for s in listing.list_services_response.service}
    assert {SERVICE, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= names
    assert files.file_descriptor_response.file_descriptor_proto


# Field numbers of grpc/reflection/v1/reflection.proto (grpc-proto), by message.
V1_REFLECTION_FIELDS = {
    "ServerReflectionRequest": {
        "host": 1,
        "file_by_filename": 3,
        "file_containing_symbol": 4,
        "file_containing_extension": 5,
        "all_extension_numbers_of_type": 6,
        "list_services": 7,
    },
    "ExtensionRequest": {"containing_type": 1, "extension_number": 2},
    "ServerReflectionResponse": {
        "valid_host": 1,
        "original_request": 2,
        "file_descriptor_response": 4,
        "all_extension_numbers_response": 5,
        "list_services_response": 6,
        "error_response": 7,
    },
    "FileDescriptorResponse": {"file_descriptor_proto": 1},
    "ExtensionNumberResponse": {"base_type_name": 1, "extension_number": 2},
    "ListServiceResponse": {"service": 1},
    "ServiceResponse": {"name": 1},
    "ErrorResponse": {"error_code": 1, "error_message": 2},
}


def test_reflection_v1_and_v1alpha_list_the_same_services(channel: grpc.Channel) -> None:
    """Reflection answers under v1 as under v1alpha: both list foliod, health and both
    reflection services, and v1's descriptor, as served, is grpc-proto's v1 reflection.proto."""
    v1 = "grpc.reflection.v1.ServerReflection"
    v1alpha = reflection_pb2_grpc.ServerReflectionStub(channel)
    requests = [
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol=v1),
    ]
    listing, described = list(v1alpha.ServerReflectionInfo(iter(requests), timeout=10))
    names = {s.name for s in listing.list_services_response.service}
    assert names == {
        SERVICE,
        "grpc.health.v1.Health",
        v1,
        reflection_pb2.DESCRIPTOR.package + ".ServerReflection",
    }

    # A v1 client whose messages come from the descriptor the server served, not from foliod.
    (served,) = described.file_descriptor_response.file_descriptor_proto
    file = descriptor_pb2.FileDescriptorProto.FromString(served)
    assert (file.name, file.package) == (
        "grpc/reflection/v1/reflection.proto",
        "grpc.reflection.v1",
    )
    assert {m.name: {f.name: f.number for f in m.field} for m in file.message_type} == (
        V1_REFLECTION_FIELDS
    )
    (service,) = file.service
    assert [(m.name, m.client_streaming, m.server_streaming) for m in service.method] == [
        ("ServerReflectionInfo", True, True)
    ]
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    # Message classes made at run time: mypy knows them only as Message.
    request_type: Any = message_factory.GetMessageClass(
        pool.FindMessageTypeByName("grpc.reflection.v1.ServerReflectionRequest")
    )
    response_type: Any = message_factory.GetMessageClass(
        pool.FindMessageTypeByName("grpc.reflection.v1.ServerReflectionResponse")
    )
    info = channel.stream_stream(
        f"/{v1}/ServerReflectionInfo",
        request_serializer=request_type.SerializeToString,
        response_deserializer=response_type.FromString,
    )
    (v1_listing,) = list(info(iter([request_type(list_services="")]), timeout=10))
    assert {s.name for s in v1_listing.list_services_response.service} == names


def test_request_id_is_echoed_or_generated(channel: grpc.Channel) -> None:
    """A request id sent in metadata comes back in the trailers, even on errors, or one is made."""
    stub = foliod_pb2_grpc.FoliodStub(channel)
    _, call = stub.GetMachine.with_call(
        pb.GetMachineRequest(), metadata=(("x-request-id", "req-42"),)
    )
    assert ("x-request-id", "req-42") in call.trailing_metadata()
    _, call = stub.GetMachine.with_call(pb.GetMachineRequest())
    generated = dict(call.trailing_metadata())["x-request-id"]
    assert len(generated) == 32
    with pytest.raises(grpc.RpcError) as err:
        stub.Free(pb.FreeRequest(handles=[77]), metadata=(("x-request-id", "req-43"),))
    trailers: Any = err.value.trailing_metadata()
    assert ("x-request-id", "req-43") in list(trailers)


def test_metrics_match_the_api(make_server: Callable[..., FoliodServer]) -> None:
    """A scrape reports the same memmap, folio, buddy and RAM figures as the gRPC API."""
    server = make_server(ram=64 << 20)
    _, stub = connect(server)
    stub.Allocate(pb.AllocateRequest(owner="a", kind=pb.FOLIO_KIND_FILE, order=2, count=100))
    stub.Allocate(pb.AllocateRequest(owner="a", kind=pb.FOLIO_KIND_ANON, bytes=2 << 20))
    with pytest.raises(grpc.RpcError):
        stub.Allocate(pb.AllocateRequest(owner="a", kind=pb.FOLIO_KIND_FILE, order=99, count=1))
    # A scrape reports every call answered before it: no waiting.
    handled = dict(grpc_method="Allocate", grpc_service=SERVICE, grpc_type="unary")
    samples = _scrape(server.metrics_port)
    report = stub.GetMemmap(pb.GetMemmapRequest())
    for model, name in zip(report.models, ("struct_page", "interim", "memdesc"), strict=True):
        assert (
            _value(samples, "foliod_memmap_bytes", machine="host", model=name) == model.total_bytes
        )
        for row in model.breakdown:
            assert row.total_bytes == _value(
                samples,
                "foliod_memmap_descriptor_bytes",
                machine="host",
                model=name,
                descriptor=row.descriptor,
            )
    assert _value(samples, "foliod_folios", machine="host", kind="file", order="2") == 100
    assert _value(samples, "foliod_folios", machine="host", kind="anon", order="9") == 1
    buddy = stub.GetBuddyInfo(pb.GetBuddyInfoRequest()).free_blocks
    for order, blocks in enumerate(buddy):
        assert (
            _value(samples, "foliod_buddy_free_blocks", machine="host", order=str(order)) == blocks
        )
    assert _value(samples, "foliod_ram_bytes", machine="host") == 64 << 20
    free = stub.GetMachine(pb.GetMachineRequest()).nr_free_pages * 4096
    assert _value(samples, "foliod_free_bytes", machine="host") == free
    assert (
        _value(samples, "foliod_vmstat_events_total", machine="host", event="thp_fault_alloc") == 1
    )
    assert _value(samples, "grpc_server_handled_total", grpc_code="OK", **handled) == 2
    assert (
        _value(samples, "grpc_server_handled_total", grpc_code="INVALID_ARGUMENT", **handled) == 1
    )
    assert _value(samples, "grpc_server_started_total", **handled) == 3
    assert _value(samples, "grpc_server_msg_received_total", **handled) == 3
    assert _value(samples, "grpc_server_msg_sent_total", **handled) == 2
    assert _value(samples, "grpc_server_handling_seconds_count", **handled) == 3
    assert _value(samples, "foliod_build_info", version="0.1.0") == 1
    assert "process_resident_memory_bytes" in samples
    assert not any(name.endswith("_created") for name in samples)


def test_dirty_pause_metrics_add_up_the_writes_throttle_seconds(
    make_server: Callable[..., FoliodServer],
) -> None:
    """foliod_dirty_paused_total and foliod_dirty_pause_seconds_total count the writes
    balance_dirty_pages paused and the throttle_seconds their replies carried."""
    server = make_server(ram=16 << 20, dirty_writeback_seconds=0.0)
    _, stub = connect(server)
    stub.CreateFile(pb.CreateFileRequest(name="f"))
    chunk = 256 << 10
    pauses = [
        stub.WriteFile(
            pb.WriteFileRequest(name="f", offset=i * chunk, data=bytes([i]) * chunk)
        ).stats.throttle_seconds
        for i in range(32)  # 8 MiB: half of RAM, well over the dirty limit
    ]
    paused = [p for p in pauses if p > 0]
    assert paused and all(p <= 0.2 for p in paused)
    samples = _scrape(server.metrics_port)
    assert _value(samples, "foliod_dirty_paused_total", machine="host") == len(paused)
    assert _value(samples, "foliod_dirty_pause_seconds_total", machine="host") == pytest.approx(
        sum(paused)
    )
    assert _value(samples, "foliod_dirty_throttled_total", machine="host") > 0


def test_sigterm_drains_in_flight_calls_and_exits_zero(
    spawn: Callable[..., ServerProcess],
) -> None:
    """On SIGTERM health goes NOT_SERVING, an in-flight call completes, new calls fail, exit 0."""
    server = spawn("--ram", "4GiB", "--grace-seconds", "20")
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    stub = foliod_pb2_grpc.FoliodStub(channel)
    health = health_pb2_grpc.HealthStub(channel)
    watch = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=60)
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
    result: dict[str, object] = {}

    def slow_call() -> None:
        # A million folios takes the server seconds: long enough to be in flight at SIGTERM.
        request = pb.AllocateRequest(owner="big", kind=pb.FOLIO_KIND_FILE, count=1 << 19)
        try:
            result["reply"] = stub.Allocate(request, timeout=60)
        except grpc.RpcError as exc:
            result["error"] = exc

    caller = threading.Thread(target=slow_call)
    caller.start()
    time.sleep(0.5)
    server.proc.send_signal(signal.SIGTERM)
    assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
    caller.join(60)
    assert "error" not in result, result.get("error")
    reply = result["reply"]
    assert isinstance(reply, pb.AllocateResponse) and reply.count == (1 << 19)
    watch.cancel()
    assert server.wait(60) == 0
    with pytest.raises(grpc.RpcError) as err:
        stub.GetMachine(pb.GetMachineRequest(), timeout=2)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    channel.close()
    lifecycle = [e["event"] for e in server.lines if e["event"] != "rpc"]
    assert lifecycle == ["config", "started", "signal", "stopping", "synced", "stopped"]
    allocate = next(e for e in server.events("rpc") if e["method"].endswith("/Allocate"))
    assert allocate["code"] == "OK"


def test_logs_are_json_lines_without_payloads(spawn: Callable[..., ServerProcess]) -> None:
    """The log has the config once at start, one line per RPC with its fields, and no payload."""
    server = spawn("--ram", "64MiB")
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = foliod_pb2_grpc.FoliodStub(channel)
        h = stub.Allocate(
            pb.AllocateRequest(owner="a", kind=pb.FOLIO_KIND_FILE, count=1)
        ).first_handle
        stub.WriteFolio(
            pb.WriteFolioRequest(handle=h, offset=0, data=b"SECRET-PAYLOAD"),
            metadata=(("x-request-id", "trace-7"),),
        )
        with pytest.raises(grpc.RpcError):
            stub.Free(pb.FreeRequest(handles=[12345]))
    server.proc.send_signal(signal.SIGTERM)
    assert server.wait(30) == 0
    assert all(json.loads(line) for line in server.raw)
    configs = server.events("config")
    assert len(configs) == 1 and configs[0]["ram"] == 64 << 20
    rpcs = server.events("rpc")
    assert sorted((r["method"].rpartition("/")[2], r["code"]) for r in rpcs) == [
        ("Allocate", "OK"),
        ("Free", "NOT_FOUND"),
        ("WriteFolio", "OK"),
    ]
    write = next(r for r in rpcs if r["method"].endswith("/WriteFolio"))
    assert write["request_id"] == "trace-7"
    assert write["peer"].startswith("ipv4:127.0.0.1:")
    assert write["duration_ms"] >= 0
    assert "SECRET" not in "".join(server.raw)


def test_bad_configuration_exits_with_a_clear_message() -> None:
    """An invalid option value stops foliod at start with exit code 2 and names the option."""
    done = subprocess.run(
        [sys.executable, "-m", "foliod.main", "--ram", "3000"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2
    assert "ram" in done.stderr


def test_one_tib_host_idles_under_100_mb(spawn: Callable[..., ServerProcess]) -> None:
    """A 1 TiB host serves with under 100 MB resident: memory follows use, not simulated RAM."""
    server = spawn("--ram", "1TiB")
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = foliod_pb2_grpc.FoliodStub(channel)
        assert stub.GetMachine(pb.GetMachineRequest()).ram_bytes == 1 << 40
        memdesc = stub.GetMemmap(pb.GetMemmapRequest()).models[2]
        assert memdesc.total_bytes == 2 << 30  # 8 B for each of 256 Mi frames
    rss = _value(_scrape(server.metrics_port), "process_resident_memory_bytes")
    assert rss < 100e6


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_access_lines_render_as_structlog_renders_the_same_event(fmt: str) -> None:
    """The access log's own JSON rendering matches structlog's, escapes included."""
    fields: dict[str, Any] = {
        "grpc_type": "unary",
        "peer": 'ipv4:"odd"\\peer',
        "code": "OK",
        "duration_ms": 0.125,
        "request_id": 'id"with\nquotes',
    }
    buffer = io.StringIO()
    try:
        configure_logging("info", fmt, stream=buffer)
        write_lines(render_access("/foliod.v1.Foliod/ReadFile", **fields))
        structlog.get_logger("t").info("rpc", method="/foliod.v1.Foliod/ReadFile", **fields)
        configure_logging("warning", fmt, stream=buffer)
        write_lines(render_access("/foliod.v1.Foliod/ReadFile", **fields))  # below: dropped
    finally:
        configure_logging("warning", "json")
    lines = buffer.getvalue().splitlines()
    if fmt == "console":
        assert len(lines) == 2
        assert all("rpc" in line and "ReadFile" in line for line in lines)
        return
    ours, theirs = (json.loads(line) for line in lines)
    assert ours.pop("timestamp")[:19] == theirs.pop("timestamp")[:19]
    assert ours == theirs


class _Recorder:
    """A CallObserver that records the request ids it hears of, and can be told to fail."""

    def __init__(self, fail_on: str = "") -> None:
        self.ended: list[str] = []
        self.batches = 0
        self.fail_on = fail_on

    def report(self, events: Sequence[CallEvent]) -> None:
        for call, _ in events:
            if call.request_id == self.fail_on:
                raise RuntimeError("observer bug")
            self.ended.append(call.request_id)
        self.batches += 1


def test_call_reporter_reports_in_order_in_batches_and_survives_a_failing_observer() -> None:
    """Observers hear ended calls in order, a batch at a time; one failing skips only the
    rest of its own batch, and close() reports whatever is still queued."""
    good, bad = _Recorder(), _Recorder(fail_on="b")
    reporter = CallReporter((bad, good))
    for rid in "abc":
        reporter.finished(CallInfo("s", "m", "unary", rid), 0.001)
    reporter.flush()
    assert good.ended == ["a", "b", "c"]
    assert good.batches == 1 and bad.batches == 0
    assert bad.ended == ["a"]
    reporter.start()
    reporter.finished(CallInfo("s", "m", "unary", "d"), 0.001)
    reporter.close()
    assert good.ended[-1] == "d" and bad.ended[-1] == "d"
    reporter.close()  # twice is harmless
    assert good.ended.count("d") == 1


def test_start_counts_are_exact_across_threads() -> None:
    """Starts counted from many threads at once, each on its own table, add up exactly."""
    starts = StartCounts()
    keys = [("s", "A", "unary"), ("s", "B", "unary")]

    def work(thread: int) -> None:
        for i in range(5000):
            starts.add(keys[(thread + i) % 2])

    threads = [threading.Thread(target=work, args=(t,)) for t in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert starts.totals() == {keys[0]: 15000, keys[1]: 15000}


def test_a_call_in_flight_counts_as_started_not_handled(
    make_server: Callable[..., FoliodServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A scrape during a call counts it in grpc_server_started_total, not yet as handled."""
    entered, release = threading.Event(), threading.Event()
    real = FoliodServicer.GetMachine

    def slow(self: FoliodServicer, request: Any, context: grpc.ServicerContext) -> Any:
        entered.set()
        release.wait(10)
        return real(self, request, context)

    monkeypatch.setattr(FoliodServicer, "GetMachine", slow)
    server = make_server(ram=64 << 20)
    _, stub = connect(server)
    caller = threading.Thread(target=lambda: stub.GetMachine(pb.GetMachineRequest(), timeout=20))
    caller.start()
    try:
        assert entered.wait(10)
        labels = dict(grpc_service=SERVICE, grpc_method="GetMachine", grpc_type="unary")
        samples = _scrape(server.metrics_port)
        assert _value(samples, "grpc_server_started_total", **labels) == 1
        assert not [v for got, v in samples.get("grpc_server_handled_total", [])
                    if got.get("grpc_method") == "GetMachine"]  # fmt: skip
    finally:
        release.set()
        caller.join(20)
    samples = _scrape(server.metrics_port)
    assert _value(samples, "grpc_server_handled_total", grpc_code="OK", **labels) == 1


def test_access_lines_of_concurrent_calls_are_whole_and_timestamped_at_the_call() -> None:
    """Calls observed from many threads come out as whole JSON lines, one per call, stamped
    with when each call ended rather than when the batch was written."""
    buffer = io.StringIO()
    log = AccessLog()
    reporter = CallReporter((log,))
    ended = time.time() - 3600  # an hour ago: far from the time of writing
    try:
        configure_logging("info", "json", stream=buffer)

        def work(thread: int) -> None:
            for i in range(200):
                call = CallInfo("s", "m", "unary", f"{thread}-{i}", "ipv4:127.0.0.1:1")
                call.ended_at = ended
                reporter.finished(call, 0.0005)

        threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
        reporter.start()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        reporter.close()
    finally:
        configure_logging("warning", "json")
    lines = [json.loads(line) for line in buffer.getvalue().splitlines()]
    assert sorted(line["request_id"] for line in lines) == sorted(
        f"{t}-{i}" for t in range(4) for i in range(200)
    )
    stamp = time.strftime("%Y-%m-%dT%H:%M", time.gmtime(ended))
    assert all(line["timestamp"].startswith(stamp) for line in lines)
    assert all(line["duration_ms"] == 0.5 for line in lines)


def test_an_unexpected_exception_becomes_internal_with_the_request_id(
    make_server: Callable[..., FoliodServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug in a handler answers INTERNAL without its text, keeps the request id in the
    trailers, is counted as INTERNAL, and the server goes on serving."""

    def broken(self: FoliodServicer, request: Any, context: grpc.ServicerContext) -> Any:
        raise RuntimeError("secret internals")

    monkeypatch.setattr(FoliodServicer, "GetMachine", broken)
    server = make_server(ram=64 << 20)
    _, stub = connect(server)
    with pytest.raises(grpc.RpcError) as err:
        stub.GetMachine(pb.GetMachineRequest(), metadata=(("x-request-id", "bug-1"),))
    assert err.value.code() == grpc.StatusCode.INTERNAL
    assert "secret" not in (err.value.details() or "")
    trailers: Any = err.value.trailing_metadata()
    assert ("x-request-id", "bug-1") in list(trailers)
    assert stub.GetMeminfo(pb.GetMeminfoRequest()).mem_total_bytes == 64 << 20
    samples = _scrape(server.metrics_port)
    labels = dict(grpc_service=SERVICE, grpc_method="GetMachine", grpc_type="unary")
    assert _value(samples, "grpc_server_handled_total", grpc_code="INTERNAL", **labels) == 1


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=40), st.text(max_size=40))
def test_access_lines_are_json_whatever_the_peer_and_request_id(peer: str, request_id: str) -> None:
    """Any peer or client-chosen request id renders to a line json.loads reads back exactly."""
    buffer = io.StringIO()
    try:
        configure_logging("info", "json", stream=buffer)
        line = render_access(
            "/foliod.v1.Foliod/ReadFile",
            grpc_type="unary",
            peer=peer,
            code="OK",
            duration_ms=0.25,
            request_id=request_id,
        )
    finally:
        configure_logging("warning", "json")
    event = json.loads(line)
    assert (event["peer"], event["request_id"]) == (peer, request_id)
    assert line == json.dumps(event) + "\n"


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["/a.S/M", '/a.S/"odd"']),
            st.sampled_from(["ipv4:127.0.0.1:1", "ipv6:[::1]:2", 'pe"er\\\n']),
            st.text(max_size=10),
            st.floats(0, 10_000, allow_nan=False).map(lambda ms: round(ms, 3)),
        ),
        max_size=12,
    )
)
def test_a_batch_of_access_lines_renders_each_call_as_alone(
    rows: list[tuple[str, str, str, float]],
) -> None:
    """A batch's lines (methods and peers quoted once a batch) equal the lines of each call
    rendered alone, in order, whatever repeats."""
    at = 1_790_000_000.123456
    try:
        configure_logging("info", "json", stream=io.StringIO())
        batch = render_access_lines(
            [(m, "unary", p, "OK", ms, rid, at + i) for i, (m, p, rid, ms) in enumerate(rows)]
        )
        alone = [
            render_access(
                m, grpc_type="unary", peer=p, code="OK", duration_ms=ms, request_id=rid, at=at + i
            )
            for i, (m, p, rid, ms) in enumerate(rows)
        ]
    finally:
        configure_logging("warning", "json")
    assert batch == "".join(alone)
    events = [json.loads(line) for line in batch.splitlines()]
    assert [(e["method"], e["peer"], e["request_id"]) for e in events] == [
        (m, p, rid) for m, p, rid, _ in rows
    ]


class _Events:
    """A CallObserver that keeps every event."""

    def __init__(self) -> None:
        self.events: list[CallEvent] = []

    def report(self, events: Sequence[CallEvent]) -> None:
        self.events.extend(events)


def test_a_client_stream_is_observed_and_holds_no_worker() -> None:
    """foliod serves no client-streaming method, but the interceptor wraps any: a stream-unary
    call is counted with its messages and code, and while its client keeps the stream open
    the one worker still serves unary calls (the handler runs inside the pool's blocking())."""
    started = threading.Event()

    def total(requests: Any, context: grpc.ServicerContext) -> bytes:
        started.set()
        return str(sum(int(r) for r in requests)).encode()

    def echo(request: bytes, context: grpc.ServicerContext) -> bytes:
        return request

    def same(data: bytes) -> bytes:
        return data

    handlers = grpc.method_handlers_generic_handler(
        "t.S",
        {
            "Total": grpc.stream_unary_rpc_method_handler(total, same, same),
            "Echo": grpc.unary_unary_rpc_method_handler(echo, same, same),
        },
    )
    events = _Events()
    reporter = CallReporter((events,))
    pool = WorkerPool(1, 4)
    server = grpc.server(
        pool,  # type: ignore[arg-type]
        interceptors=[ObservingInterceptor(reporter, blocking=pool.blocking)],
    )
    server.add_generic_rpc_handlers((handlers,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            held = threading.Event()

            def numbers() -> Any:
                yield b"2"
                held.wait(10)  # the stream stays open until the unary call is answered
                yield b"3"

            with futures.ThreadPoolExecutor(1) as client:
                summed = client.submit(
                    channel.stream_unary("/t.S/Total", same, same), numbers(), timeout=10
                )
                assert started.wait(10)  # the stream's handler holds the one worker's thread
                assert channel.unary_unary("/t.S/Echo", same, same)(b"x", timeout=5) == b"x"
                held.set()
                assert summed.result(10) == b"5"
    finally:
        server.stop(0).wait()
        pool.shutdown()
    reporter.flush()
    by_method = {call.method: call for call, _ in events.events}
    total_call = by_method["Total"]
    assert (total_call.grpc_type, total_call.code) == ("client_stream", grpc.StatusCode.OK)
    assert (total_call.messages_received, total_call.messages_sent) == (2, 1)
    assert by_method["Echo"].code == grpc.StatusCode.OK
