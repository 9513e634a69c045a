"""The monitoring kit in deploy/, checked, then proven against a live foliod and a real Prometheus.

promtool checks the scrape configuration and the rules and unit-tests the alerts; the Grafana
dashboard, its provisioning, the compose file and the Dockerfile are checked for consistency;
then a real Prometheus, started with the repository's scrape configuration retargeted at a
foliod running a workload (the host and two guests), evaluates every dashboard query and every
rule through its HTTP API. Two fleet observers (foliod --observe-host --observe-only, as the
DaemonSet runs it, named real:n1 and real:n2) are scraped too where this host's /proc/kpageflags
is readable, so the fleet's rules and panels are evaluated against real scans.
Without Prometheus installed the tests that need it skip, unless FOLIOD_REQUIRE_PROMETHEUS=1
(set by .ci/run) makes them fail.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from foliod.api import MemmapModel
from foliod.api.pb_enums import MEMMAP_MODEL
from foliod.config import ConfigError, load_config
from foliod.mm.kpageflags import readable as kpageflags_readable
from foliod.server import FoliodServer
from foliod.v1 import foliod_pb2 as pb
from foliod.v1 import foliod_pb2_grpc
from tests.conftest import ServerProcess

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
SCRAPE_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
RULES = DEPLOY / "prometheus" / "rules.yml"
RULES_TESTS = DEPLOY / "prometheus" / "rules_test.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "foliod.json"
DATASOURCES = DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDERS = DEPLOY / "grafana" / "provisioning" / "dashboards" / "foliod.yml"
COMPOSE = DEPLOY / "docker-compose.yml"
METRICS_DOC = ROOT / "docs" / "metrics.md"
DOCKERFILE = DEPLOY / "Dockerfile"

REQUIRE_PROMETHEUS = "FOLIOD_REQUIRE_PROMETHEUS"
JOB = "foliod"
# The fleet observers' job, as the ServiceMonitor in deploy/kubernetes/observer names it.
OBSERVER_JOB = "foliod-observer"
OBSERVED = ("n1", "n2")
FLEET_GROUP = "foliod-fleet"
MIB = 1 << 20
# What Grafana substitutes into the dashboard's queries, here for the host.
GRAFANA_VARIABLES = {"machine": "host", "__rate_interval": "1m", "__interval": "15s"}
# Series Prometheus itself records for every target it scrapes.
PROMETHEUS_SERIES = frozenset(
    {"up", "scrape_duration_seconds", "scrape_samples_scraped", "scrape_series_added"}
)
MODELS = ("struct_page", "interim", "memdesc")
# The workload's guests on its 128 MiB host: 2 MiB HugeTLB pages reserved up front with HVO, and
# THPs faulted in on first use. Reporting runs only when the workload asks (ReportFreePages): the
# server's delayed reporting is pushed past the test, so the values stay put for the checks.
GUESTS = (
    pb.CreateGuestRequest(
        name="vm-hugetlb", ram_bytes=16 * MIB, backing=pb.GUEST_BACKING_HUGETLB_2M, hvo=True
    ),
    pb.CreateGuestRequest(name="vm-thp", ram_bytes=16 * MIB, backing=pb.GUEST_BACKING_THP),
)

# Bounds on every wait. Prometheus is ready at once but its first sample takes about 6 s.
PROMETHEUS_READY_TIMEOUT_S = 30.0
PROMETHEUS_DATA_TIMEOUT_S = 60.0
HTTP_TIMEOUT_S = 10.0
POLL_S = 0.25


# -- PromQL, as far as these tests need it --------------------------------------------------

_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGES = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
# An identifier that is neither part of a number nor a function or aggregation being called.
_NAME = re.compile(r"(?<![\w.:])[A-Za-z_:][\w:]*(?![\w:]|\s*\()")
_KEYWORDS = frozenset(
    {"and", "or", "unless", "bool", "offset", "group_left", "group_right", "inf", "nan"}
)


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (label names, functions and keywords aside)."""
    text = _STRINGS.sub('""', expr)
    text = _MATCHERS.sub(" ", text)
    text = _RANGES.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    return {name for name in _NAME.findall(text) if name.lower() not in _KEYWORDS}


def grafana_substitute(expr: str) -> str:
    """The query Grafana sends for the host: $machine, ${machine} and $__rate_interval filled."""

    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        assert name in GRAFANA_VARIABLES, f"unknown dashboard variable ${name} in {expr}"
        return GRAFANA_VARIABLES[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", value, expr)


# -- the files in deploy/ ------------------------------------------------------------------


def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def _dashboard() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return dashboard


def _panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, those inside collapsed rows included."""
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def _dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL expression) for every query of the dashboard, as written."""
    return [
        (panel["title"], target["expr"])
        for panel in _panels(_dashboard())
        for target in panel.get("targets", [])
    ]


def _rules() -> list[dict[str, Any]]:
    return [rule for group in _yaml(RULES)["groups"] for rule in group["rules"]]


def _provisioned_datasource() -> dict[str, str]:
    (source,) = _yaml(DATASOURCES)["datasources"]
    return {"type": source["type"], "uid": source["uid"]}


def _tool(name: str) -> str:
    """The path of a Prometheus binary; skips, or fails when FOLIOD_REQUIRE_PROMETHEUS=1."""
    path = shutil.which(name)
    if path is None:
        reason = f"{name} is not installed (Debian: apt-get install prometheus)"
        if os.environ.get(REQUIRE_PROMETHEUS) == "1":
            pytest.fail(f"{reason}, and {REQUIRE_PROMETHEUS}=1 requires it")
        pytest.skip(reason)
    return path


def _run(*command: str) -> str:
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, f"{' '.join(command)}:\n{done.stdout}{done.stderr}"
    return done.stdout


def test_metric_names_reads_promql() -> None:
    """metric_names finds the selected metrics and skips functions, labels, keywords and numbers."""
    expr = (
        'histogram_quantile(0.99, sum by (le, grpc_method) (rate(a_bucket{job="x", le!="1"}[5m])))'
        " / ignoring(model) group_left b_total{name=~'c|d'} > bool 1e3 or on(machine) c:d:ratio"
        " - sum(e) without (f) offset 5m"
    )
    assert metric_names(expr) == {"a_bucket", "b_total", "c:d:ratio", "e"}
    assert grafana_substitute('rate(x{machine="$machine"}[$__rate_interval])') == (
        'rate(x{machine="host"}[1m])'
    )


def test_promtool_accepts_the_scrape_config_and_the_rules() -> None:
    """promtool check config (which loads rules.yml too) and check rules pass."""
    promtool = _tool("promtool")
    _run(promtool, "check", "config", str(SCRAPE_CONFIG))
    output = _run(promtool, "check", "rules", str(RULES))
    assert f"SUCCESS: {len(_rules())} rules found" in output


def test_promtool_unit_tests_of_the_rules_pass() -> None:
    """The alert and recording rule unit tests in rules_test.yml pass under promtool."""
    _run(_tool("promtool"), "test", "rules", str(RULES_TESTS))


def test_rules_are_named_and_annotated_for_operators() -> None:
    """Recorded names are level:metric:operations; every alert has a severity, summary and
    description; the issue's recordings and alerts are all there."""
    rules = _rules()
    records = {rule["record"] for rule in rules if "record" in rule}
    alerts = {rule["alert"]: rule for rule in rules if "alert" in rule}
    assert all(re.fullmatch(r"[a-z_]+:[a-z_]+:[a-z0-9_]+", name) for name in records), records
    assert len(records) + len(alerts) == len(rules)
    for name, alert in alerts.items():
        assert alert["labels"]["severity"] in ("critical", "warning", "info"), name
        assert alert["annotations"]["summary"] and alert["annotations"]["description"], name
    assert {
        "machine_model:foliod_memmap_bytes:ratio_ram",
        "machine:foliod_memmap_memdesc_saving:bytes",
        "guest_model:foliod_guest_memmap_duplicate_bytes:ratio_ram",
        "guest_via:foliod_guest_returned_bytes:rate5m",
        "machine:foliod_pagecache_hit:ratio_rate5m",
        "machine:foliod_reclaim_stolen_pages:rate5m",
        "machine:foliod_written_bytes:rate5m",
        "fleet_model:foliod_observed_memmap_bytes:sum",
        "fleet:foliod_observed_memmap_memdesc_saving:bytes",
        "machine:foliod_observed_memmap_memdesc_saving:topk10",
    } <= records
    assert {
        "FoliodDown",
        "FoliodOutOfMemory",
        "FoliodDirectReclaimStalls",
        "FoliodWritebackErrors",
        "FoliodDirtyAboveLimit",
        "FoliodObserverDown",
        "FoliodObservedHostStale",
    } <= set(alerts)


def test_scrape_config_has_one_foliod_job_to_retarget() -> None:
    """The scrape configuration has the one foliod job (port 9464) the tests retarget."""
    config = _yaml(SCRAPE_CONFIG)
    (job,) = config["scrape_configs"]
    assert job["job_name"] == JOB
    (static,) = job["static_configs"]
    (target,) = static["targets"]
    assert target.endswith(":9464")
    assert [SCRAPE_CONFIG.parent / name for name in config["rule_files"]] == [RULES]


def test_dashboard_is_well_formed() -> None:
    """Unique panel ids, every panel and query on the provisioned datasource, every panel with
    queries (rows aside), and a `machine` variable listing the machines foliod reports."""
    dashboard = _dashboard()
    datasource = _provisioned_datasource()
    panels = list(_panels(dashboard))
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), sorted(ids)
    for panel in panels:
        assert panel["datasource"] == datasource, panel["title"]
        assert panel["gridPos"]["w"] <= 24, panel["title"]
        targets = panel.get("targets", [])
        if panel["type"] == "row":
            assert not targets, panel["title"]
            continue
        assert targets, panel["title"]
        assert all(target["datasource"] == datasource for target in targets), panel["title"]
        assert all(target["expr"].strip() for target in targets), panel["title"]
        ref_ids = [target["refId"] for target in targets]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
    (machine,) = [v for v in dashboard["templating"]["list"] if v["name"] == "machine"]
    assert machine["type"] == "query"
    assert machine["datasource"] == datasource
    assert machine["query"]["query"] == "label_values(foliod_ram_bytes, machine)"
    assert machine["current"]["value"] == "host"
    used = {name for _, expr in _dashboard_queries() for name in re.findall(r"\$\{?(\w+)", expr)}
    assert used <= set(GRAFANA_VARIABLES), used
    assert "$machine" in json.dumps(dashboard)


def test_grafana_provisioning_matches_compose() -> None:
    """The datasource points at compose's Prometheus; the dashboard provider reads the
    directory compose mounts the dashboard JSON at."""
    compose = _yaml(COMPOSE)
    (source,) = _yaml(DATASOURCES)["datasources"]
    assert source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"
    assert "prometheus" in compose["services"]
    (provider,) = _yaml(DASHBOARD_PROVIDERS)["providers"]
    mounts = _bind_mounts(compose["services"]["grafana"])
    assert mounts[provider["options"]["path"]] == DASHBOARD.parent
    assert mounts["/etc/grafana/provisioning/datasources"] == DATASOURCES.parent
    assert mounts["/etc/grafana/provisioning/dashboards"] == DASHBOARD_PROVIDERS.parent
    home = compose["services"]["grafana"]["environment"][
        "GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"
    ]
    assert home == f"{provider['options']['path']}/{DASHBOARD.name}"


def _bind_mounts(service: dict[str, Any]) -> dict[str, Path]:
    """Container path -> host path of a compose service's bind mounts (relative to deploy/)."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target, *_ = volume.split(":")
        if source.startswith("."):
            mounts[target] = (COMPOSE.parent / source).resolve()
    return mounts


def test_compose_file_parses_and_references_files_that_exist() -> None:
    """docker-compose.yml parses, has foliod, Prometheus and Grafana, and every file it
    mounts or builds from exists; Prometheus reads the repository's scrape config and rules."""
    compose = _yaml(COMPOSE)
    assert set(compose["services"]) == {"foliod", "prometheus", "grafana"}
    for name, service in compose["services"].items():
        for target, source in _bind_mounts(service).items():
            assert source.exists(), f"{name}: {source} (mounted at {target}) does not exist"
        assert all(v.split(":")[0] in compose["volumes"] for v in service.get("volumes", [])
                   if not v.startswith("."))  # fmt: skip
    build = compose["services"]["foliod"]["build"]
    context = (COMPOSE.parent / build["context"]).resolve()
    assert context == ROOT
    assert (context / build["dockerfile"]).resolve() == DOCKERFILE
    prometheus = compose["services"]["prometheus"]
    mounts = _bind_mounts(prometheus)
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    assert mounts["/etc/prometheus/prometheus.yml"] == SCRAPE_CONFIG
    for rule_file in _yaml(SCRAPE_CONFIG)["rule_files"]:
        assert mounts[f"/etc/prometheus/{rule_file}"] == SCRAPE_CONFIG.parent / rule_file
    (target,) = _yaml(SCRAPE_CONFIG)["scrape_configs"][0]["static_configs"][0]["targets"]
    host, _, port = target.rpartition(":")
    assert host == "foliod"
    assert f"127.0.0.1:{port}:{port}" in compose["services"]["foliod"]["ports"]


def test_dockerfile_is_slim_non_root_and_copies_what_exists() -> None:
    """The image is python:3.11-slim, runs as a non-root user, has a health check, exposes the
    ports compose publishes, and every COPY source exists in the build context."""
    lines = _dockerfile_instructions()
    assert lines[0] == "FROM python:3.11-slim"
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    # BuildKit filters the context with <Dockerfile>.dockerignore: it must let each source in.
    ignore = DOCKERFILE.with_name(f"{DOCKERFILE.name}.dockerignore").read_text().splitlines()
    for line in lines:
        if line.startswith("COPY "):
            *sources, _ = line.split()[1:]
            for source in sources:
                assert (ROOT / source).exists(), source
                assert f"!{source}" in ignore, source
    assert "EXPOSE 50051 9464" in lines
    assert any(line.startswith("HEALTHCHECK ") for line in lines)


def _dockerfile_environment() -> dict[str, str]:
    """The FOLIOD_* variables the Dockerfile's ENV instructions set."""
    environment: dict[str, str] = {}
    for line in _dockerfile_instructions():
        if line.startswith("ENV "):
            for pair in line.split()[1:]:
                name, _, value = pair.partition("=")
                if name.startswith("FOLIOD_"):
                    environment[name] = value
    return environment


def test_image_needs_security_or_an_explicit_opt_out_and_compose_gives_one() -> None:
    """The image listens on 0.0.0.0, so alone it refuses to start without TLS and
    authentication; compose, whose ports are published on the host's loopback only, opts out."""
    image = _dockerfile_environment()
    assert image["FOLIOD_LISTEN"].startswith("0.0.0.0:")
    with pytest.raises(ConfigError, match="without TLS and authentication"):
        load_config([], environ=image)
    service = _yaml(COMPOSE)["services"]["foliod"]
    config = load_config(service["command"], environ={**image, **service["environment"]})
    assert config.insecure
    assert all(port.startswith("127.0.0.1:") for port in service["ports"])


def _dockerfile_instructions() -> list[str]:
    """The Dockerfile's instructions, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    return [line.strip() for line in text.splitlines() if line.strip() and line[0] != "#"]


def _healthcheck_code(address: str) -> str:
    """The Python program of the Dockerfile's HEALTHCHECK, aimed at address."""
    (line,) = [line for line in _dockerfile_instructions() if line.startswith("HEALTHCHECK ")]
    command = json.loads(line[line.index("CMD ") + 4 :])
    assert command[:2] == ["python", "-c"]
    code: str = command[2]
    assert "'127.0.0.1:50051'" in code
    return code.replace("127.0.0.1:50051", address)


def test_dockerfile_health_check_probes_the_grpc_health_service(
    make_server: Callable[..., FoliodServer],
) -> None:
    """The image's health check passes against a serving foliod and fails once it stops."""
    server = make_server(ram=16 * MIB)
    code = _healthcheck_code(f"127.0.0.1:{server.grpc_port}")
    probe = [sys.executable, "-c", code]
    assert subprocess.run(probe, capture_output=True, timeout=30, check=False).returncode == 0
    server.stop(0)
    assert subprocess.run(probe, capture_output=True, timeout=30, check=False).returncode != 0


# -- a live foliod with a workload -----------------------------------------------------------


@dataclass
class Workload:
    """Drives a foliod through reads, writes, fsync, reclaim, errors and allocations, and its
    guests through page cache, the balloon and free page reporting."""

    stub: foliod_pb2_grpc.FoliodStub
    rounds: int = 0
    read_calls: int = 0
    errors: dict[str, str] = field(default_factory=dict)

    def run(self) -> None:
        """One round; each round uses its own files and owners."""
        self.rounds += 1
        stub, n = self.stub, self.rounds
        # Fill the page cache past what 128 MiB holds: dirty throttling, kswapd, pgrotated.
        stub.CreateFile(pb.CreateFileRequest(name=f"big{n}"))
        chunk = bytes([n]) * (2 * MIB)
        for i in range(60):
            stub.WriteFile(pb.WriteFileRequest(name=f"big{n}", offset=i * 2 * MIB, data=chunk))
        handle = stub.OpenFile(pb.OpenFileRequest(name=f"big{n}")).handle
        stub.Fsync(pb.FsyncRequest(handle=handle))
        # 2 MiB folios when free memory sits near the high watermark: direct reclaim.
        stub.Allocate(pb.AllocateRequest(owner=f"huge{n}", kind=pb.FOLIO_KIND_HUGETLB, count=4))
        stub.Reclaim(pb.ReclaimRequest(bytes=8 * MIB))
        stub.Allocate(pb.AllocateRequest(owner=f"anon{n}", kind=pb.FOLIO_KIND_ANON, bytes=6 * MIB))
        stub.Allocate(pb.AllocateRequest(owner=f"slab{n}", kind=pb.FOLIO_KIND_SLAB, count=64))
        # Memory and a file in tenant team-a's namespace (charged to it, as a tenant's own).
        stub.Allocate(pb.AllocateRequest(owner=f"team-a/app{n}", kind=pb.FOLIO_KIND_SLAB, count=8))
        stub.CreateFile(pb.CreateFileRequest(name=f"tenants/team-a/log{n}"))
        stub.WriteFile(
            pb.WriteFileRequest(name=f"tenants/team-a/log{n}", offset=0, data=b"t" * 8192)
        )
        # Reads through the cache: misses with readahead, then hits.
        stub.CreateFile(pb.CreateFileRequest(name=f"small{n}", max_order=0))
        stub.WriteFile(pb.WriteFileRequest(name=f"small{n}", offset=0, data=b"s" * MIB))
        stub.Writeback(pb.WritebackRequest(name=f"small{n}"))
        stub.DropCaches(pb.DropCachesRequest())
        for _ in range(2):
            for offset in range(0, MIB, 128 * 1024):
                stub.ReadFile(pb.ReadFileRequest(name=f"small{n}", offset=offset, length=65536))
                self.read_calls += 1
        # A writeback error that fsync reports (DATA_LOSS), then a request for too much memory.
        stub.SetFaults(pb.SetFaultsRequest(rules=[pb.FaultRule(errno="EIO", name=f"bad{n}")]))
        stub.CreateFile(pb.CreateFileRequest(name=f"bad{n}"))
        bad = stub.OpenFile(pb.OpenFileRequest(name=f"bad{n}")).handle
        stub.WriteFile(pb.WriteFileRequest(name=f"bad{n}", offset=0, data=b"lost"))
        self._expect_error("Fsync", lambda: stub.Fsync(pb.FsyncRequest(handle=bad)))
        stub.SetFaults(pb.SetFaultsRequest(rules=[]))
        too_much = pb.AllocateRequest(owner="greedy", kind=pb.FOLIO_KIND_FILE, order=9, count=63)
        self._expect_error("Allocate", lambda: stub.Allocate(too_much))
        stub.ReleaseOwner(pb.ReleaseOwnerRequest(owner=f"huge{n}"))
        for guest in GUESTS:
            self._run_guest(guest)

    def _run_guest(self, guest: pb.CreateGuestRequest) -> None:
        """One round in a guest (created in the first): page cache written back, dropped and
        read again, which faults lazily backed RAM in; the balloon grows to 8 MiB and shrinks to
        4 MiB; free page reporting returns the free blocks the host still backs."""
        stub, n, name = self.stub, self.rounds, guest.name
        if n == 1:
            stub.CreateGuest(guest)
        stub.CreateFile(pb.CreateFileRequest(machine=name, name=f"disk{n}"))
        for i in range(3):
            data = bytes([n]) * (2 * MIB)
            stub.WriteFile(
                pb.WriteFileRequest(machine=name, name=f"disk{n}", offset=i * 2 * MIB, data=data)
            )
        stub.Writeback(pb.WritebackRequest(machine=name, name=f"disk{n}"))
        stub.DropCaches(pb.DropCachesRequest(machine=name))
        for offset in range(0, 6 * MIB, MIB):
            read = pb.ReadFileRequest(machine=name, name=f"disk{n}", offset=offset, length=65536)
            stub.ReadFile(read)
            self.read_calls += 1
        stub.SetBalloon(pb.SetBalloonRequest(name=name, size_bytes=8 * MIB))
        stub.SetBalloon(pb.SetBalloonRequest(name=name, size_bytes=4 * MIB))
        stub.ReportFreePages(pb.ReportFreePagesRequest(name=name))

    def _expect_error(self, method: str, call: Callable[[], object]) -> None:
        with pytest.raises(grpc.RpcError) as err:
            call()
        self.errors[method] = err.value.code().name


@dataclass
class LiveFoliod:
    process: ServerProcess
    channel: grpc.Channel
    workload: Workload

    def scrape(self) -> list[Metric]:
        """The metric families of one scrape of /metrics."""
        return _scrape(self.process)


def _scrape(process: ServerProcess) -> list[Metric]:
    url = f"http://127.0.0.1:{process.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S) as response:
        return list(text_string_to_metric_families(response.read().decode()))


@pytest.fixture(scope="module")
def foliod(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveFoliod]:
    """A foliod process (128 MiB, no flusher and no delayed free page reporting: counters move
    only with the workload) that has run one round of the workload."""
    process = ServerProcess(
        tmp_path_factory.mktemp("foliod"),
        *("--ram", "128MiB", "--dirty-writeback-seconds", "0"),
        *("--reporting-delay-seconds", "3600"),
    )
    channel = grpc.insecure_channel(f"127.0.0.1:{process.port}")
    try:
        live = LiveFoliod(process, channel, Workload(foliod_pb2_grpc.FoliodStub(channel)))
        live.workload.run()
        assert live.workload.errors == {"Fsync": "DATA_LOSS", "Allocate": "RESOURCE_EXHAUSTED"}
        yield live
    finally:
        channel.close()
        process.kill()


def test_dashboard_and_rules_use_only_metrics_foliod_exports(
    foliod: LiveFoliod, observers: list[ServerProcess]
) -> None:
    """Every metric name in a dashboard query, the machine variable and the rules is in a live
    scrape of foliod or an observer (or is Prometheus's own `up`)."""
    exported = {s.name for family in foliod.scrape() for s in family.samples} | PROMETHEUS_SERIES
    for process in observers:
        exported |= {s.name for family in _scrape(process) for s in family.samples}
    recorded = {rule["record"] for rule in _rules() if "record" in rule}
    (variable,) = [v for v in _dashboard()["templating"]["list"] if v["name"] == "machine"]
    selector = re.fullmatch(r"label_values\((.+), machine\)", variable["query"]["query"])
    assert selector
    unknown = {}
    if not observers:
        # Without an observer its families are not in a scrape: only docs/metrics.md says them.
        exported |= set(re.findall(r"`(foliod_observe\w+)`", METRICS_DOC.read_text()))
    for where, expr in [
        *_dashboard_queries(),
        ("machine variable", selector.group(1)),
        *((rule.get("record") or rule["alert"], rule["expr"]) for rule in _rules()),
    ]:
        names = metric_names(grafana_substitute(expr))
        assert names, (where, expr)
        missing = names - exported - recorded
        if missing:
            unknown[where] = missing
    assert not unknown


def test_metrics_reference_documents_every_metric_with_its_type_and_labels(
    foliod: LiveFoliod,
) -> None:
    """docs/metrics.md has a row for every metric family in a live scrape, with its type and
    labels; it documents nothing else."""
    rows = {
        name: (kind, set() if labels.strip() == "-" else {x.strip() for x in labels.split(",")})
        for name, kind, labels in re.findall(
            r"^\| `([a-z_:]+)` \| (gauge|counter|histogram) \| ([^|]*) \|",
            METRICS_DOC.read_text(),
            re.MULTILINE,
        )
    }
    scraped = {}
    for family in foliod.scrape():
        name = f"{family.name}_total" if family.type == "counter" else family.name
        labels = {label for sample in family.samples for label in sample.labels} - {"le"}
        scraped[name] = (family.type, labels)
    assert {name: rows.get(name) for name in scraped} == scraped
    assert set(rows) - set(scraped) == set()


# -- a real Prometheus -------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Prometheus:
    """A Prometheus process on a loopback port with its own storage, and its query API."""

    def __init__(
        self, binary: str, workdir: Path, metrics_port: int, observer_ports: tuple[int, ...] = ()
    ) -> None:
        config = _yaml(SCRAPE_CONFIG)
        config["global"].update(scrape_interval="1s", evaluation_interval="1s")
        config["rule_files"] = [str(SCRAPE_CONFIG.parent / name) for name in config["rule_files"]]
        (job,) = [job for job in config["scrape_configs"] if job["job_name"] == JOB]
        job["static_configs"] = [{"targets": [f"127.0.0.1:{metrics_port}"]}]
        if observer_ports:
            targets = [f"127.0.0.1:{port}" for port in observer_ports]
            config["scrape_configs"].append(
                {"job_name": OBSERVER_JOB, "static_configs": [{"targets": targets}]}
            )
        config_file = workdir / "prometheus.yml"
        config_file.write_text(yaml.safe_dump(config))
        self.port = _free_port()
        self.log = workdir / "prometheus.log"
        with self.log.open("w") as log:
            self.proc = subprocess.Popen(
                [
                    binary,
                    f"--config.file={config_file}",
                    f"--storage.tsdb.path={workdir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def _get(self, path: str) -> Any:
        url = f"http://127.0.0.1:{self.port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S) as response:
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            with exc:
                detail = exc.read().decode(errors="replace")
            raise AssertionError(f"GET {path}: HTTP {exc.code}: {detail}") from exc

    def query(self, expr: str) -> list[dict[str, Any]]:
        """The instant vector (or scalar, as one sample) an expression evaluates to now."""
        body = self._get("/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
        assert body["status"] == "success", body
        data = body["data"]
        result: list[dict[str, Any]] = (
            [{"metric": {}, "value": data["result"]}]
            if data["resultType"] == "scalar"
            else data["result"]
        )
        return result

    def metric_names(self) -> set[str]:
        """Every metric name Prometheus has stored."""
        return set(self._get("/api/v1/label/__name__/values")["data"])

    def value(self, expr: str) -> float:
        """The value of an expression that selects exactly one series."""
        result = self.query(expr)
        assert len(result) == 1, (expr, result)
        return float(result[0]["value"][1])

    def wait_until(self, what: str, ready: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if self.proc.poll() is not None:
                raise AssertionError(f"Prometheus exited: {self.log.read_text()[-4000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: not within {timeout} s; {self.log.read_text()}")
            time.sleep(POLL_S)

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.port}/-/ready", timeout=HTTP_TIMEOUT_S
            ) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(15)


def _vmstat(stub: foliod_pb2_grpc.FoliodStub) -> dict[str, int]:
    return {e.name: e.value for e in stub.GetVmstat(pb.GetVmstatRequest()).entries}


@pytest.fixture(scope="module")
def observers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[ServerProcess]]:
    """Two fleet observers of this host (real:n1, real:n2; one scan each, so their values hold
    still), or none where /proc/kpageflags is not readable (FOLIOD_REQUIRE_PROMETHEUS=1 makes
    that a failure: CI runs as root)."""
    if not kpageflags_readable():
        if os.environ.get(REQUIRE_PROMETHEUS) == "1":
            pytest.fail(f"/proc/kpageflags is not readable, and {REQUIRE_PROMETHEUS}=1 needs it")
        yield []
        return
    started: list[ServerProcess] = []
    try:
        for name in OBSERVED:
            started.append(
                ServerProcess(
                    tmp_path_factory.mktemp(f"observer-{name}"),
                    *("--observe-host", "--observe-only", "--observe-hostname", name),
                    *("--observe-interval-seconds", "0", "--ram", "1MiB"),
                )
            )
        yield started
    finally:
        for process in started:
            process.kill()


def _fleet(rule_or_title: str, observers: list[ServerProcess]) -> bool:
    """Whether a rule or panel is about the fleet and there is no fleet to show."""
    fleet = {r.get("record") or r["alert"] for g in _yaml(RULES)["groups"] for r in g["rules"]
             if g["name"] == FLEET_GROUP}  # fmt: skip
    fleet |= {p["title"] for p in _panels(_dashboard()) if _uses_fleet(p)}
    return not observers and rule_or_title in fleet


def _uses_fleet(panel: dict[str, Any]) -> bool:
    return any(
        "foliod_observed" in target["expr"] or "fleet" in target["expr"]
        for target in panel.get("targets", [])
    )


@pytest.fixture(scope="module")
def prometheus(
    foliod: LiveFoliod,
    observers: list[ServerProcess],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Prometheus]:
    """Prometheus scraping foliod and the observers every second: it has seen the first round
    of the workload, then a second one, so every rate has samples from before and after."""
    binary = _tool("prometheus")
    server = Prometheus(
        binary,
        tmp_path_factory.mktemp("prometheus"),
        foliod.process.metrics_port,
        tuple(process.metrics_port for process in observers),
    )
    try:
        server.wait_until("Prometheus ready", server.is_ready, PROMETHEUS_READY_TIMEOUT_S)
        server.wait_until(
            "a first scrape of foliod",
            lambda: bool(server.query('foliod_ram_bytes{machine="host"}')),
            PROMETHEUS_DATA_TIMEOUT_S,
        )
        server.wait_until(
            "a first scrape of every observer",
            lambda: len(server.query("foliod_observed_host_info")) == len(observers),
            PROMETHEUS_DATA_TIMEOUT_S,
        )
        foliod.workload.run()
        stub = foliod.workload.stub
        pgfault = _vmstat(stub)["pgfault"]
        handled = 'sum(grpc_server_handled_total{grpc_method="ReadFile", grpc_code="OK"})'

        def second_round_scraped() -> bool:
            faults = server.query('foliod_vmstat_events_total{machine="host", event="pgfault"}')
            reads = server.query(handled)
            return (
                bool(faults and reads)
                and float(faults[0]["value"][1]) == pgfault
                and float(reads[0]["value"][1]) == foliod.workload.read_calls
            )

        server.wait_until(
            "the second round scraped", second_round_scraped, PROMETHEUS_DATA_TIMEOUT_S
        )
        yield server
    finally:
        server.stop()


@pytest.mark.slow
def test_every_dashboard_query_returns_data(
    prometheus: Prometheus, observers: list[ServerProcess]
) -> None:
    """Each dashboard query, filled in for the host, returns data from a real Prometheus (the
    fleet's with observers only)."""
    empty = []
    for title, expr in _dashboard_queries():
        query = grafana_substitute(expr)
        if not prometheus.query(query) and not _fleet(title, observers):
            empty.append((title, query))
    assert not empty


@pytest.mark.slow
def test_machine_variable_lists_the_guests_and_their_panels_have_data(
    prometheus: Prometheus, observers: list[ServerProcess]
) -> None:
    """The machine variable's query offers the host, every guest and every observed host, and
    each dashboard query, filled in for a guest, returns data too."""
    (variable,) = [v for v in _dashboard()["templating"]["list"] if v["name"] == "machine"]
    selector = re.fullmatch(r"label_values\((.+), machine\)", variable["query"]["query"])
    assert selector
    machines = {sample["metric"]["machine"] for sample in prometheus.query(selector.group(1))}
    observed = {f"real:{name}" for name in OBSERVED} if observers else set()
    assert machines == {"host", *(guest.name for guest in GUESTS), *observed}
    empty = []
    for guest in GUESTS:
        for title, expr in _dashboard_queries():
            query = grafana_substitute(expr.replace("$machine", guest.name))
            if not prometheus.query(query) and not _fleet(title, observers):
                empty.append((guest.name, title, query))
    assert not empty


@pytest.mark.slow
def test_every_rule_evaluates_and_records(
    prometheus: Prometheus, observers: list[ServerProcess]
) -> None:
    """Every rule expression is valid PromQL; recording rules return data (the fleet's with
    observers only) and Prometheus records them; the alerts this workload provokes (out of
    memory, writeback error) fire, and no observer is down or stale."""
    rules = _rules()
    empty = []
    for rule in rules:
        result = prometheus.query(rule["expr"])  # raises on invalid PromQL
        if "record" in rule and not result and not _fleet(rule["record"], observers):
            empty.append(rule["record"])
    assert not empty
    recorded = [
        rule["record"]
        for rule in rules
        if "record" in rule and not _fleet(rule["record"], observers)
    ]
    prometheus.wait_until(
        "every recording rule recorded",
        lambda: all(prometheus.query(name) for name in recorded),
        PROMETHEUS_DATA_TIMEOUT_S,
    )
    alerts = {rule["alert"]: rule["expr"] for rule in rules if "alert" in rule}
    assert prometheus.query(alerts["FoliodOutOfMemory"])
    assert prometheus.query(alerts["FoliodWritebackErrors"])
    assert not prometheus.query(alerts["FoliodDown"])
    assert not prometheus.query(alerts["FoliodObserverDown"])
    assert not prometheus.query(alerts["FoliodObservedHostStale"])


@pytest.mark.slow
def test_prometheus_values_match_the_api(foliod: LiveFoliod, prometheus: Prometheus) -> None:
    """Memmap bytes per model, RAM, vmstat counters and call counts in Prometheus are what the
    gRPC API reports."""
    stub = foliod.workload.stub
    report = stub.GetMemmap(pb.GetMemmapRequest())
    ratios = {}
    for model, name in zip(report.models, MODELS, strict=True):
        selector = f'{{machine="host", model="{name}"}}'
        assert prometheus.value(f"foliod_memmap_bytes{selector}") == model.total_bytes
        ratios[f"machine_model:foliod_memmap_bytes:ratio_ram{selector}"] = model.fraction_of_ram

    def recorded_ratios_match() -> bool:
        return all(
            prometheus.value(query) == pytest.approx(value, rel=1e-12)
            for query, value in ratios.items()
        )

    # Rules are evaluated every second: the recorded ratios catch up within a few.
    prometheus.wait_until(
        "recorded memmap ratios equal GetMemmap's", recorded_ratios_match, PROMETHEUS_DATA_TIMEOUT_S
    )
    assert prometheus.value('foliod_ram_bytes{machine="host"}') == 128 * MIB
    assert stub.GetMachine(pb.GetMachineRequest()).ram_bytes == 128 * MIB
    vmstat = _vmstat(stub)
    for event in ("pgfault", "pgmajfault", "nr_dirtied", "nr_written", "allocstall"):
        value = prometheus.value(f'foliod_vmstat_events_total{{machine="host", event="{event}"}}')
        assert value == vmstat[event], event
    assert vmstat["allocstall"] > 0 and vmstat["pgmajfault"] > 0
    meminfo = stub.GetMeminfo(pb.GetMeminfoRequest())
    cached = prometheus.value('foliod_meminfo_bytes{machine="host", field="cached"}')
    assert cached == meminfo.cached_bytes
    handled = 'grpc_server_handled_total{grpc_method="%s", grpc_code="%s"}'
    assert prometheus.value(handled % ("ReadFile", "OK")) == foliod.workload.read_calls
    assert prometheus.value(handled % ("Fsync", "DATA_LOSS")) == foliod.workload.rounds
    assert prometheus.value(handled % ("Allocate", "RESOURCE_EXHAUSTED")) == foliod.workload.rounds
    hit_ratio = prometheus.value('machine:foliod_pagecache_hit:ratio_rate5m{machine="host"}')
    assert 0 < hit_ratio < 1


@pytest.mark.slow
def test_prometheus_guest_values_match_the_api(foliod: LiveFoliod, prometheus: Prometheus) -> None:
    """Each guest's RAM, backing, duplicated memory map (both sides, per model), balloon and
    memory returned in Prometheus are what GetGuest reports; the host's HVO savings are what
    GetMemmap reports; both guests gave memory back both ways, and the rate is recorded."""
    stub = foliod.workload.stub
    expected: dict[str, float] = {}
    ratios: dict[str, float] = {}
    for request in GUESTS:
        guest = stub.GetGuest(pb.GetGuestRequest(name=request.name))
        assert guest.ram_bytes == request.ram_bytes
        assert guest.balloon_returned_bytes > 0 and guest.reported_bytes > 0, guest.name
        on = f'guest="{guest.name}"'
        expected |= {
            f"foliod_guest_ram_bytes{{{on}}}": guest.ram_bytes,
            f"foliod_guest_backed_bytes{{{on}}}": guest.backed_bytes,
            f"foliod_guest_balloon_bytes{{{on}}}": guest.balloon_bytes,
            f'foliod_guest_returned_bytes_total{{{on}, via="balloon"}}': (
                guest.balloon_returned_bytes
            ),
            f'foliod_guest_returned_bytes_total{{{on}, via="reporting"}}': guest.reported_bytes,
            f"foliod_guest_reporting_batches_total{{{on}}}": guest.reporting_batches,
            f"foliod_guest_reported_blocks_total{{{on}}}": guest.reported_blocks,
        }
        for dup, model in zip(guest.duplication, MODELS, strict=True):
            assert dup.model == MEMMAP_MODEL.to_pb[MemmapModel(model)]
            selector = f'{on}, model="{model}"'
            expected |= {
                f"foliod_guest_memmap_duplicate_bytes{{{selector}}}": dup.total_bytes,
                f'foliod_guest_memmap_side_bytes{{{selector}, side="guest"}}': (
                    dup.guest_memmap_bytes
                ),
                f'foliod_guest_memmap_side_bytes{{{selector}, side="host"}}': dup.host_memmap_bytes,
            }
            ratio = f"guest_model:foliod_guest_memmap_duplicate_bytes:ratio_ram{{{selector}}}"
            ratios[ratio] = dup.fraction_of_guest_ram
    report = stub.GetMemmap(pb.GetMemmapRequest(machine="host"))
    for cost, model in zip(report.models, MODELS, strict=True):
        expected[f'foliod_memmap_hvo_freed_bytes{{machine="host", model="{model}"}}'] = (
            cost.hvo_freed_bytes
        )
    assert report.models[0].hvo_freed_bytes > 0

    def guests_match() -> bool:
        return all(prometheus.value(query) == value for query, value in expected.items()) and all(
            prometheus.value(query) == pytest.approx(value, rel=1e-12)
            for query, value in ratios.items()
        )

    # The last scrape may predate the round's last guest calls by a second, the rules by two.
    prometheus.wait_until("guest metrics equal GetGuest's", guests_match, PROMETHEUS_DATA_TIMEOUT_S)
    returned = "sum by (via) (guest_via:foliod_guest_returned_bytes:rate5m) > 0"
    prometheus.wait_until(
        "memory returned both ways recorded as a rate",
        lambda: (
            {s["metric"]["via"] for s in prometheus.query(returned)} == {"balloon", "reporting"}
        ),
        PROMETHEUS_DATA_TIMEOUT_S,
    )


@pytest.mark.slow
def test_prometheus_fleet_values_match_the_observers(
    prometheus: Prometheus, observers: list[ServerProcess]
) -> None:
    """The fleet's recorded sums are the observers' GetMemmap and GetMachine summed; the saving
    per host and the top hosts are struct page minus memdesc per observer."""
    if not observers:
        pytest.skip("no observers: /proc/kpageflags is not readable here")
    totals: dict[str, float] = {model: 0 for model in MODELS}
    ram = 0
    savings = {}
    for process, name in zip(observers, OBSERVED, strict=True):
        with grpc.insecure_channel(f"127.0.0.1:{process.port}") as channel:
            stub = foliod_pb2_grpc.FoliodStub(channel)
            report = stub.GetMemmap(pb.GetMemmapRequest(), timeout=30)
        assert report.machine == f"real:{name}"
        ram += report.ram_bytes
        by_model = dict(zip(MODELS, (m.total_bytes for m in report.models), strict=True))
        for model in MODELS:
            totals[model] += by_model[model]
        savings[report.machine] = by_model["struct_page"] - by_model["memdesc"]
    expected = {
        "fleet:foliod_observed_hosts:count": len(OBSERVED),
        "fleet:foliod_observed_ram_bytes:sum": ram,
        "fleet:foliod_observed_memmap_memdesc_saving:bytes": sum(savings.values()),
        **{
            f'fleet_model:foliod_observed_memmap_bytes:sum{{model="{model}"}}': total
            for model, total in totals.items()
        },
        **{
            f'machine:foliod_observed_memmap_memdesc_saving:topk10{{machine="{machine}"}}': value
            for machine, value in savings.items()
        },
    }

    def fleet_matches() -> bool:
        return all(prometheus.query(query) for query in expected) and all(
            prometheus.value(query) == value for query, value in expected.items()
        )

    prometheus.wait_until("fleet records equal the observers'", fleet_matches, 60)
    ratio = prometheus.value('fleet_model:foliod_observed_memmap_bytes:ratio_ram{model="memdesc"}')
    assert ratio == pytest.approx(totals["memdesc"] / ram, rel=1e-12)
