"""Shared fixtures: real foliod servers on ephemeral loopback ports, and stubs to reach them."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from foliod.config import Config
from foliod.server import FoliodServer
from foliod.v1 import foliod_pb2_grpc

ServerFactory = Callable[..., FoliodServer]


@pytest.fixture
def make_server(tmp_path: Path) -> Iterator[ServerFactory]:
    """Starts servers with Config overrides (default 256 MiB, debug checks on); stops them all."""
    started: list[FoliodServer] = []

    def start(**overrides: Any) -> FoliodServer:
        values: dict[str, Any] = {
            "listen": "127.0.0.1:0",
            "metrics_listen": "127.0.0.1:0",
            "ram": 256 << 20,
            "state_dir": tmp_path / "var",
            "grace_seconds": 1.0,
            "debug_checks": True,
        }
        values.update(overrides)
        server = FoliodServer(dataclasses.replace(Config(), **values))
        server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop(0)


@pytest.fixture
def server(make_server: ServerFactory) -> FoliodServer:
    return make_server()


@pytest.fixture
def channel(server: FoliodServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as chan:
        yield chan


@pytest.fixture
def stub(channel: grpc.Channel) -> foliod_pb2_grpc.FoliodStub:
    return foliod_pb2_grpc.FoliodStub(channel)


def connect(server: FoliodServer) -> tuple[grpc.Channel, foliod_pb2_grpc.FoliodStub]:
    """A channel and stub to a server started by make_server; close the channel when done."""
    chan = grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}")
    return chan, foliod_pb2_grpc.FoliodStub(chan)
