"""The project's structure: layering, generated code in sync, and the pinned public API."""

from __future__ import annotations

import ast
import dataclasses
import filecmp
import os
import subprocess
import sys
from pathlib import Path

import foliod.mm
import foliodclient
from foliod.mm.filemap import IoStats
from foliod.rpc.servicer import _set_io_stats
from foliod.v1 import foliod_pb2 as pb

ROOT = Path(__file__).resolve().parent.parent
CORE = ROOT / "server" / "foliod" / "mm"
FORBIDDEN = ("grpc", "google", "prometheus_client", "foliod.v1", "foliod.rpc", "structlog")


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_core_imports_no_rpc_protobuf_or_metrics_code() -> None:
    """No module of the domain core imports grpc, protobuf, prometheus_client or the rpc layer."""
    offenders = {
        f"{path.relative_to(CORE)}: {name}"
        for path in CORE.rglob("*.py")
        for name in _imports(path)
        if any(name == bad or name.startswith(bad + ".") for bad in FORBIDDEN)
    }
    assert not offenders


def test_importing_the_core_loads_none_of_them() -> None:
    """Importing foliod.mm in a fresh interpreter pulls in no grpc, protobuf or prometheus code."""
    code = (
        "import sys, foliod.mm; "
        "bad = [m for m in sys.modules "
        "if m.split('.')[0] in ('grpc', 'google', 'prometheus_client')]; "
        "print(','.join(bad))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.strip() == ""


def test_generated_code_matches_the_proto(tmp_path: Path) -> None:
    """Regenerating the API code from proto/ gives exactly the committed files (`make proto`)."""
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{ROOT / 'proto'}",
            f"--python_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            f"--mypy_out={tmp_path}",
            f"--mypy_grpc_out={tmp_path}",
            str(ROOT / "proto" / "foliod" / "v1" / "foliod.proto"),
        ],
        check=True,
        capture_output=True,
        env=env,
        timeout=120,
    )
    generated = sorted(p.name for p in (tmp_path / "foliod" / "v1").iterdir())
    assert generated == [
        "foliod_pb2.py",
        "foliod_pb2.pyi",
        "foliod_pb2_grpc.py",
        "foliod_pb2_grpc.pyi",
    ]
    committed = ROOT / "api" / "foliod" / "v1"
    for name in generated:
        assert filecmp.cmp(tmp_path / "foliod" / "v1" / name, committed / name, shallow=False), (
            f"{name} is stale: run `make proto`"
        )


def test_public_api_is_pinned() -> None:
    """The core's and the client's public names are exactly these, sorted."""
    assert foliod.mm.__all__ == sorted(foliod.mm.__all__, key=lambda n: (not n.isupper(), n))
    assert set(foliod.mm.__all__) == {
        "HOST", "MAX_FOLIOS_PER_CALL", "MAX_IO_BYTES", "MAX_PAGE_ORDER", "PAGE_SIZE",
        "AddressSpaceExhausted", "AlreadyExists", "Allocation", "Descriptor", "DescriptorCost",
        "DescriptorSizes", "FailedPrecondition", "FileHandleClosed", "Folio",
        "FolioAlreadyFreed", "FolioKind", "FoliodError", "GuestNesting",
        "InconsistentState",
        "InvalidArgument", "Machine", "Machines", "Meminfo", "MemmapModel", "ModelCost",
        "MthpStat", "NotFound", "OutOfMemory", "OutOfRange", "Release", "TenantLimit",
        "TenantLimits", "ThpPolicy",
        "ThpSetting", "UnknownFile", "UnknownFileHandle", "UnknownFolio", "UnknownGuest",
        "UnknownMachine", "UnknownOwner", "UnsafeStorePath", "VmEvent", "VmStat", "Watermarks",
        "WritebackFailed",
        "check_machine",
    }  # fmt: skip
    assert all(hasattr(foliod.mm, name) for name in foliod.mm.__all__)
    assert foliodclient.__all__ == sorted(foliodclient.__all__)
    assert {"FoliodClient", "AsyncFoliodClient", "RemoteError", "error_from_rpc"} <= set(
        foliodclient.__all__
    )
    assert all(hasattr(foliodclient, name) for name in foliodclient.__all__)


def test_every_core_module_states_its_scope() -> None:
    """Each core module opens with a docstring naming its scope."""
    for path in CORE.rglob("*.py"):
        docstring = ast.get_docstring(ast.parse(path.read_text()))
        assert docstring, path.name


def test_every_io_stats_field_reaches_the_wire() -> None:
    """The servicer copies IoStats field by field: a new field must be added there too."""
    names = [f.name for f in dataclasses.fields(IoStats)]
    assert names == [f.name for f in pb.IoStats.DESCRIPTOR.fields]
    stats = IoStats(1, 2, 3, 0.5, 0.25)
    wire = pb.IoStats()
    _set_io_stats(wire, stats)
    assert [getattr(wire, n) for n in names] == [getattr(stats, n) for n in names]
