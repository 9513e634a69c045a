"""Shared fixtures: real foliod servers on ephemeral loopback ports, and stubs to reach them."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from foliod.config import Config
from foliod.logs import configure_logging
from foliod.server import FoliodServer
from foliod.v1 import foliod_pb2_grpc

ServerFactory = Callable[..., FoliodServer]


@pytest.fixture(scope="session", autouse=True)
def quiet_logs() -> None:
    """In-process servers log warnings only: access lines would land after capture ends."""
    configure_logging("warning", "json")


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


class ServerProcess:
    """`foliod` in a child process, its stderr JSON log lines collected by a reader thread."""

    def __init__(self, state_dir: Path, *args: str) -> None:
        command = [sys.executable, "-m", "foliod.main", "--listen", "127.0.0.1:0"]
        command += ["--metrics-listen", "127.0.0.1:0", "--state-dir", str(state_dir), *args]
        self.proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
        self.lines: list[dict[str, Any]] = []
        self.raw: list[str] = []
        self._started = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if not self._started.wait(15):
            self.kill()
            raise RuntimeError(f"foliod did not start: {''.join(self.raw)}")
        started = next(line for line in self.lines if line.get("event") == "started")
        self.port = int(started["grpc_address"].rpartition(":")[2])
        self.metrics_port = int(started["metrics_port"])

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.raw.append(line)
            try:
                record = json.loads(line)
            except ValueError:
                continue
            self.lines.append(record)
            if record.get("event") == "started":
                self._started.set()

    def events(self, name: str) -> list[dict[str, Any]]:
        return [line for line in self.lines if line.get("event") == name]

    def wait(self, timeout: float) -> int:
        code = self.proc.wait(timeout)
        self._reader.join(5)
        return code

    def kill(self) -> None:
        """Kills the process if it still runs and releases its pipe."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._reader.join(5)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """Starts foliod processes on ephemeral loopback ports; kills any left running."""
    procs: list[ServerProcess] = []

    def start(*args: str) -> ServerProcess:
        proc = ServerProcess(tmp_path / "var", *args)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        proc.kill()
