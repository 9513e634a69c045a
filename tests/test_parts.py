"""The three installable parts: the API (api/), the server (.) and the client (client/)."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

import foliod.api
from foliod.api.pb_enums import ENUM_MAPS, OP_NAMES, from_pb, to_pb
from foliod.mm import errors as core
from foliod.mm.lru import POLICIES
from foliod.rpc.status import STATUS_CODES, status_code_of
from foliod.v1 import foliod_pb2 as pb

ROOT = Path(__file__).resolve().parent.parent
CLIENT = ROOT / "client" / "foliodclient"
# What the client may import of the foliod namespace: the API, nothing of the server.
API_PACKAGES = ("foliod", "foliod.api", "foliod.v1")
CLIENT_MODULES = (
    "foliodclient",
    "foliodclient.cli",
    "foliodclient.load.cli",
    "foliodclient.load.mrc",
    "foliodclient.load.runner",
    "foliodclient.load.report",
)


def _loaded_after(statement: str) -> list[str]:
    """The modules a fresh interpreter holds after running statement."""
    code = f"import sys; {statement}; print('\\n'.join(sorted(sys.modules)))"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    return done.stdout.split()


def test_importing_the_client_loads_no_server_module() -> None:
    """The client and its CLIs load the API package only: no foliod server module, structlog,
    prometheus_client or numpy."""
    loaded = _loaded_after("; ".join(f"import {name}" for name in CLIENT_MODULES))
    server = [
        m
        for m in loaded
        if m.split(".")[0] == "foliod" and not m.startswith(("foliod.api.", "foliod.v1."))
        if m not in API_PACKAGES
    ]
    assert server == []
    assert not [m for m in loaded if m.split(".")[0] in ("structlog", "prometheus_client", "numpy")]


def test_client_source_imports_only_the_api_of_foliod() -> None:
    """No client module names a foliod module outside foliod.api and foliod.v1."""
    offenders = []
    for path in CLIENT.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [
                f"{path.relative_to(CLIENT)}: {name}"
                for name in names
                if name.split(".")[0] == "foliod" and name not in API_PACKAGES[1:]
                if not name.startswith(("foliod.api.", "foliod.v1."))
            ]
    assert offenders == []


def test_the_api_package_loads_no_grpc_or_protobuf() -> None:
    """foliod.api is plain Python, so the domain core may import it."""
    loaded = _loaded_after("import foliod.api")
    assert not [m for m in loaded if m.split(".")[0] in ("grpc", "google")]


def test_api_public_names_are_pinned() -> None:
    """foliod.api exports exactly these names, sorted as the core's are."""
    assert foliod.api.__all__ == sorted(foliod.api.__all__, key=lambda n: (not n.isupper(), n))
    assert set(foliod.api.__all__) == {
        "DEFAULT_ADDRESS", "DEVICE_PROFILES", "ERROR_DOMAIN", "MAX_BATCH_OPS",
        "MAX_BATCH_PAYLOAD_BYTES", "MAX_IO_BYTES", "MAX_REPLAY_ACCESSES", "PAGE_SHIFT",
        "PAGE_SIZE", "RECLAIM_POLICIES", "STATUS_CODE_NAMES", "Backing", "DeviceModel",
        "FolioKind", "MemmapModel", "Reason", "ThpSetting", "__version__", "parse_size",
    }  # fmt: skip


def test_every_reason_has_a_core_error_and_a_code() -> None:
    """Each API reason is introduced by exactly one core error class (a subclass may keep its
    parent's reason, as HostCannotBack keeps OutOfMemory's: the core tells them apart, the
    wire does not), and is sent with the code the API gives it."""
    classes: dict[str, type[core.FoliodError]] = {}
    pending: list[type[core.FoliodError]] = [core.FoliodError]
    while pending:
        cls = pending.pop()
        inherited = any(getattr(base, "reason", None) == cls.reason for base in cls.__bases__)
        if cls.__module__ == core.__name__ and not inherited:
            assert cls.reason not in classes, cls
            classes[cls.reason] = cls
        pending.extend(cls.__subclasses__())
    assert set(classes) == set(foliod.api.Reason) == set(foliod.api.STATUS_CODE_NAMES)
    for reason, cls in classes.items():
        assert status_code_of(cls("x")) is STATUS_CODES[foliod.api.Reason(reason)]


def test_every_proto_enum_value_maps_both_ways() -> None:
    """Each value of a proto enum the API has an enum for (all but UNSPECIFIED) has its member,
    each member its value, and the two tables invert each other; the proto's other enums are
    the op codes, which have their names."""
    enums = {e.name for e in pb.DESCRIPTOR.enum_types_by_name.values()}
    assert enums == {t.proto.DESCRIPTOR.name for t in ENUM_MAPS.values()} | {"OpCode", "ReplayOp"}
    for cls, table in ENUM_MAPS.items():
        values = [value for _, value in table.proto.items() if value]
        assert sorted(table.from_pb) == values, f"{table.proto.DESCRIPTOR.name} has no member"
        assert list(table.to_pb) == list(cls), f"{cls.__name__} has no proto value"
        for member in cls:
            assert from_pb(cls, to_pb(member)) is member
            assert table.proto.Name(to_pb(member)).endswith("_" + member.name)
    assert list(OP_NAMES) == [value for _, value in pb.OpCode.items() if value]
    assert OP_NAMES[pb.OP_CODE_ALLOCATE] == "allocate"


def test_reclaim_policy_names_are_the_cores() -> None:
    """The API's reclaim policy names are exactly the core's registry."""
    assert tuple(sorted(POLICIES)) == foliod.api.RECLAIM_POLICIES


@pytest.mark.slow
def test_client_installs_alone_into_a_clean_virtualenv(tmp_path: Path) -> None:
    """`pip install ./client` alone into a fresh virtualenv gives a working foliodctl that
    loads no server module: the API comes from the sibling api/ the client names, and pip
    fetches grpcio, grpcio-health-checking, grpcio-status and protobuf. Built from copies, so
    no build/ appears in the checkout."""
    skip = shutil.ignore_patterns("build", "*.egg-info", "__pycache__")
    for part in ("api", "client"):
        shutil.copytree(ROOT / part, tmp_path / part, ignore=skip)
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    subprocess.run(
        [
            str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
            "./client",
        ],
        check=True, capture_output=True, timeout=600, cwd=tmp_path,
    )  # fmt: skip
    code = (
        "import sys, foliodclient, foliodclient.cli; "
        "print(' '.join(m for m in sys.modules if m.split('.')[0] in "
        "('foliod', 'structlog', 'prometheus_client', 'numpy')))"
    )
    done = subprocess.run(
        [str(python), "-c", code],
        capture_output=True, text=True, check=True, timeout=60, cwd=tmp_path,
    )  # fmt: skip
    loaded = set(done.stdout.split())
    assert loaded and all(m in API_PACKAGES or m.startswith(API_PACKAGES[1:]) for m in loaded)
    helped = subprocess.run(
        [str(env_dir / "bin" / "foliodctl"), "--help"],
        capture_output=True, text=True, check=True, timeout=60, cwd=tmp_path,
    )  # fmt: skip
    assert "foliodctl" in helped.stdout
    installed = subprocess.run(
        [str(python), "-m", "pip", "list", "--format=freeze"],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout  # fmt: skip
    names = {line.split("==")[0].split(" @ ")[0].lower() for line in installed.split()}
    assert {"foliod-api", "foliod-client"} <= names
    assert "foliod" not in names and not {"structlog", "prometheus-client"} & names
