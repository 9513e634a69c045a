"""Backing-store fault injection through the admin RPC and the configuration; errseq on fsync."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from foliod.config import ConfigError, load_config
from foliod.v1 import foliod_pb2 as pb
from foliod.v1 import foliod_pb2_grpc
from tests.conftest import ServerFactory, connect

Stub = foliod_pb2_grpc.FoliodStub


def _fsync_code(stub: Stub, handle: int) -> grpc.StatusCode:
    try:
        stub.Fsync(pb.FsyncRequest(handle=handle))
    except grpc.RpcError as exc:
        code: grpc.StatusCode = exc.code()
        return code
    return grpc.StatusCode.OK


def test_injected_eio_is_reported_once_per_handle(stub: Stub) -> None:
    """A failed writeback reaches each handle's next Fsync once; later openers never see it."""
    stub.CreateFile(pb.CreateFileRequest(name="f"))
    first = stub.OpenFile(pb.OpenFileRequest(name="f")).handle
    second = stub.OpenFile(pb.OpenFileRequest(name="f")).handle
    stub.SetFaults(pb.SetFaultsRequest(rules=[pb.FaultRule(errno="EIO", name="f", count=1)]))
    stub.WriteFile(pb.WriteFileRequest(name="f", offset=0, data=b"new data"))
    assert _fsync_code(stub, first) == grpc.StatusCode.DATA_LOSS
    assert _fsync_code(stub, first) == grpc.StatusCode.OK
    late = stub.OpenFile(pb.OpenFileRequest(name="f")).handle
    assert _fsync_code(stub, late) == grpc.StatusCode.OK  # the error was already seen
    assert _fsync_code(stub, second) == grpc.StatusCode.DATA_LOSS
    assert _fsync_code(stub, second) == grpc.StatusCode.OK
    faults = stub.GetFaults(pb.GetFaultsRequest())
    assert [(r.errno, r.injected, r.count) for r in faults.rules] == [("EIO", 1, 0)]


def test_failed_writeback_keeps_data_in_cache_until_evicted(stub: Stub) -> None:
    """After a failed writeback the cached folio serves the new bytes; dropping it loses them."""
    stub.CreateFile(pb.CreateFileRequest(name="g"))
    stub.WriteFile(pb.WriteFileRequest(name="g", offset=0, data=b"old!"))
    stub.Writeback(pb.WritebackRequest(name="g"))
    stub.SetFaults(pb.SetFaultsRequest(rules=[pb.FaultRule(errno="ENOSPC", name="g")]))
    stub.WriteFile(pb.WriteFileRequest(name="g", offset=0, data=b"new!"))
    stub.Writeback(pb.WritebackRequest(name="g"))
    stat = stub.StatFile(pb.StatFileRequest(name="g"))
    assert stat.nr_dirty == 0  # marked clean, as Linux does
    assert stub.ReadFile(pb.ReadFileRequest(name="g", offset=0, length=4)).data == b"new!"
    stub.SetFaults(pb.SetFaultsRequest())
    stub.DropCaches(pb.DropCachesRequest())
    assert stub.ReadFile(pb.ReadFileRequest(name="g", offset=0, length=4)).data == b"old!"


def test_probability_draws_from_the_seed(make_server: ServerFactory, tmp_path: Path) -> None:
    """The same seed fails the same writes; a range limits which writes a rule sees."""
    outcomes = []
    for run in range(2):
        server = make_server(state_dir=tmp_path / f"run{run}")
        _, stub = connect(server)
        stub.CreateFile(pb.CreateFileRequest(name="p", max_order=0))
        rule = pb.FaultRule(errno="EIO", probability=0.5, offset=0, length=16 * 4096)
        stub.SetFaults(pb.SetFaultsRequest(rules=[rule], seed=7))
        for page in range(32):
            stub.WriteFile(pb.WriteFileRequest(name="p", offset=page * 4096, data=b"x"))
            stub.Writeback(pb.WritebackRequest(name="p"))
        outcomes.append(stub.GetFaults(pb.GetFaultsRequest()).rules[0].injected)
    assert outcomes[0] == outcomes[1]
    assert 0 < outcomes[0] < 16


@pytest.mark.parametrize(
    "rule",
    [
        pb.FaultRule(errno="EBUSY"),
        pb.FaultRule(errno="EIO", probability=1.5),
        pb.FaultRule(errno="EIO", delay_ms=5000),
        pb.FaultRule(errno="EIO", name="../x"),
    ],
)
def test_bad_rules_are_invalid_and_change_nothing(stub: Stub, rule: pb.FaultRule) -> None:
    """An invalid rule is INVALID_ARGUMENT and the current rules stay."""
    stub.SetFaults(pb.SetFaultsRequest(rules=[pb.FaultRule(errno="EIO", name="keep")]))
    with pytest.raises(grpc.RpcError) as err:
        stub.SetFaults(pb.SetFaultsRequest(rules=[rule]))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [r.name for r in stub.GetFaults(pb.GetFaultsRequest()).rules] == ["keep"]


def test_faults_from_the_configuration(make_server: ServerFactory) -> None:
    """Rules given at start apply from the first write."""
    config = load_config(["--faults", "ENOSPC:name=c,count=2;:delay_ms=1"], environ={})
    server = make_server(faults=config.faults, fault_seed=3)
    _, stub = connect(server)
    rules = stub.GetFaults(pb.GetFaultsRequest())
    assert [(r.errno, r.name, r.count, r.delay_ms) for r in rules.rules] == [
        ("ENOSPC", "c", 2, 0),
        ("", "", 0, 1),
    ]
    stub.CreateFile(pb.CreateFileRequest(name="c"))
    handle = stub.OpenFile(pb.OpenFileRequest(name="c")).handle
    stub.WriteFile(pb.WriteFileRequest(name="c", offset=0, data=b"x"))
    assert _fsync_code(stub, handle) == grpc.StatusCode.DATA_LOSS


@pytest.mark.parametrize(
    "spec", ["EBUSY:", "EIO:count", "EIO:bogus=1", "EIO:probability=2", "EIO:name=/x"]
)
def test_bad_fault_specs_name_the_option(spec: str) -> None:
    """A malformed --faults value is a ConfigError naming --faults."""
    with pytest.raises(ConfigError, match="--faults"):
        load_config(["--faults", spec], environ={})
