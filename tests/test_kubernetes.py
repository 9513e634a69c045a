"""deploy/kubernetes: the kustomize base, its overlays and the load drivers, checked offline.

Each kustomization is rendered by a small renderer here that knows only the kustomize features
the tree uses (resources, namespace, images, JSON 6902 patches) and fails on any other; where
`kubectl kustomize` works it must render the same objects. Every object of a Kubernetes kind
is validated against the Kubernetes 1.30 JSON schemas (kubernetes-validate, strict: unknown
fields fail); the Prometheus Operator's ServiceMonitor and PrometheusRule are not in those
schemas and are checked structurally. Then the references between objects: Service target
ports, mounted Secrets and ConfigMaps, FOLIOD_* variables (foliod's own config loader must
accept each overlay's environment), probes, resources and the generated rules and dashboard.
The fleet observer (observer/, a DaemonSet in both overlays) is checked for what it needs: every
node, the least privilege that reads /proc/kpageflags, its scrape, and a live run of its
configuration where this host's kpageflags is readable.
"""

from __future__ import annotations

import copy
import importlib.util
import re
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml
from cryptography import x509

from foliod.config import OPTIONS, ConfigError, load_config, parse_size
from foliod.mm.kpageflags import readable
from foliod.rpc.auth import FOLIOD_SERVICE, OPEN_SERVICES, token_digest
from foliod.v1 import foliod_pb2 as pb
from foliod.v1 import foliod_pb2_grpc

from .conftest import ServerFactory, ServerProcess
from .test_security import _issue, _write

ROOT = Path(__file__).resolve().parent.parent
KUBE = ROOT / "deploy" / "kubernetes"
KUBERNETES_VERSION = "1.30"
KUSTOMIZATIONS = ("base", "load", "observer", "overlays/dev", "overlays/production")
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}
POD_OWNERS = {"StatefulSet", "Deployment", "Job", "DaemonSet"}
# Kustomization keys the renderer implements; any other fails the test instead of being ignored.
KNOWN_KEYS = {"apiVersion", "kind", "resources", "namespace", "images", "patches"}
# Environment variables of the pods that are not foliod options.
OTHER_ENV = {"POD_NAME", "HOME", "NODE_NAME"}


# -- a minimal kustomize ----------------------------------------------------------------------


def _pointer(path: str) -> list[str]:
    return [part.replace("~1", "/").replace("~0", "~") for part in path.split("/")[1:]]


def _apply_op(document: Any, op: dict[str, Any]) -> None:
    """One RFC 6902 operation (add, replace, remove) on `document`, in place."""
    *parents, last = _pointer(op["path"])
    target = document
    for part in parents:
        target = target[int(part)] if isinstance(target, list) else target[part]
    kind = op["op"]
    if isinstance(target, list):
        if kind == "add":
            target.insert(len(target) if last == "-" else int(last), op["value"])
        elif kind == "replace":
            target[int(last)] = op["value"]
        elif kind == "remove":
            del target[int(last)]
        else:
            raise AssertionError(f"unsupported patch op {kind}")
        return
    if kind in {"replace", "remove"}:
        assert last in target, f"{op['path']}: no such member"
    if kind in ("add", "replace"):
        target[last] = op["value"]
    elif kind == "remove":
        del target[last]
    else:
        raise AssertionError(f"unsupported patch op {kind}")


def _pod_specs(document: dict[str, Any]) -> Iterator[dict[str, Any]]:
    if document["kind"] in POD_OWNERS:
        yield document["spec"]["template"]["spec"]


def render(directory: Path) -> list[dict[str, Any]]:
    """The objects `kubectl kustomize directory` makes, for the features listed in KNOWN_KEYS."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(kustomization) - KNOWN_KEYS
    assert not unknown, f"{directory}: the test's renderer does not implement {unknown}"
    documents: list[dict[str, Any]] = []
    for entry in kustomization.get("resources", []):
        path = (directory / entry).resolve()
        if path.is_dir():
            documents.extend(render(path))
        else:
            documents.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    for patch in kustomization.get("patches", []):
        target = patch["target"]
        assert set(target) <= {"kind", "name"}, target
        # kustomize matches a target's kind and name as anchored regular expressions.
        matched = [
            d
            for d in documents
            if re.fullmatch(target["kind"], d["kind"])
            and re.fullmatch(target["name"], d["metadata"]["name"])
        ]
        assert matched, f"{directory}: patch target {target} matches nothing"
        for document in matched:
            for op in yaml.safe_load(patch["patch"]):
                _apply_op(document, op)
    for image in kustomization.get("images", []):
        for document in documents:
            for spec in _pod_specs(document):
                for container in spec.get("containers", []) + spec.get("initContainers", []):
                    name, _, tag = container["image"].partition(":")
                    if name == image["name"]:
                        new_name = image.get("newName", name)
                        container["image"] = f"{new_name}:{image.get('newTag', tag)}".rstrip(":")
    if "namespace" in kustomization:
        for document in documents:
            document["metadata"]["namespace"] = kustomization["namespace"]
    return documents


RENDERED = {name: render(KUBE / name) for name in KUSTOMIZATIONS}
DEPLOYABLE = ("overlays/dev", "overlays/production")


def _all() -> Iterator[tuple[str, dict[str, Any]]]:
    for name, documents in RENDERED.items():
        for document in documents:
            yield name, document


def _key(document: dict[str, Any]) -> tuple[str, str]:
    return document["kind"], document["metadata"]["name"]


def _find(name: str, kind: str, object_name: str) -> dict[str, Any]:
    found = [d for d in RENDERED[name] if _key(d) == (kind, object_name)]
    assert len(found) == 1, (name, kind, object_name)
    return found[0]


def _foliod(name: str) -> dict[str, Any]:
    container: dict[str, Any] = _find(name, "StatefulSet", "foliod")["spec"]["template"]["spec"][
        "containers"
    ][0]
    return container


def _observer(name: str) -> dict[str, Any]:
    container: dict[str, Any] = _find(name, "DaemonSet", "foliod-observer")["spec"]["template"][
        "spec"
    ]["containers"][0]
    return container


def _kubectl_works() -> bool:
    if shutil.which("kubectl") is None:
        return False
    try:
        probe = subprocess.run(
            ["kubectl", "kustomize", str(KUBE / "base")],
            check=False,
            capture_output=True,
            timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0


# -- rendering and schemas --------------------------------------------------------------------


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_the_renderer_agrees_with_kubectl_kustomize(name: str) -> None:
    if not _kubectl_works():
        pytest.skip("kubectl kustomize is not available: only the test's renderer ran")
    result = subprocess.run(
        ["kubectl", "kustomize", str(KUBE / name)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    theirs = sorted((d for d in yaml.safe_load_all(result.stdout) if d), key=_key)
    ours = sorted(RENDERED[name], key=_key)
    assert [_key(d) for d in theirs] == [_key(d) for d in ours]
    for their, our in zip(theirs, ours, strict=True):
        assert their == our, _key(our)


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_every_object_validates_against_the_kubernetes_schemas(name: str) -> None:
    checked = 0
    for document in RENDERED[name]:
        if document["kind"] in CRD_KINDS:
            continue
        try:
            kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{name}: {_key(document)}: {exc}")
        checked += 1
    assert checked


def test_the_base_holds_what_the_issue_asks_for() -> None:
    kinds = {_key(d) for d in RENDERED["base"]}
    assert kinds >= {
        ("StatefulSet", "foliod"),
        ("Service", "foliod"),
        ("Service", "foliod-headless"),
        ("Service", "foliod-metrics"),
        ("PodDisruptionBudget", "foliod"),
        ("NetworkPolicy", "foliod"),
        ("ServiceMonitor", "foliod"),
        ("PrometheusRule", "foliod"),
        ("ConfigMap", "foliod-grafana-dashboard"),
    }
    load = {_key(d) for d in RENDERED["load"]}
    assert load >= {
        ("Job", "foliod-load"),
        ("Deployment", "foliod-locust-master"),
        ("Deployment", "foliod-locust-worker"),
        ("Service", "foliod-locust-master"),
    }
    assert _find("base", "Service", "foliod-headless")["spec"]["clusterIP"] == "None"
    assert _find("base", "StatefulSet", "foliod")["spec"]["serviceName"] == "foliod-headless"
    for name in DEPLOYABLE:
        assert {_key(d) for d in RENDERED[name]} >= kinds
        assert all(d["metadata"]["namespace"] for d in RENDERED[name])
    assert {_key(d) for d in RENDERED["overlays/dev"]} >= load
    observer = {_key(d) for d in RENDERED["observer"]}
    assert observer == {
        ("DaemonSet", "foliod-observer"),
        ("Service", "foliod-observer"),
        ("ServiceMonitor", "foliod-observer"),
        ("NetworkPolicy", "foliod-observer"),
    }
    for name in DEPLOYABLE:
        assert {_key(d) for d in RENDERED[name]} >= observer


def test_the_prometheus_operator_objects_are_well_formed() -> None:
    rules = yaml.safe_load((ROOT / "deploy" / "prometheus" / "rules.yml").read_text())
    for name, document in _all():
        if document["kind"] not in CRD_KINDS:
            continue
        assert document["apiVersion"] == "monitoring.coreos.com/v1"
        assert document["metadata"]["name"]
        spec = document["spec"]
        if document["kind"] == "PrometheusRule":
            assert spec["groups"] == rules["groups"], name
            for group in spec["groups"]:
                assert group["name"] and group["rules"]
                for rule in group["rules"]:
                    assert rule["expr"]
                    assert ("record" in rule) != ("alert" in rule)
            continue
        (service,) = [
            d
            for d in RENDERED[name]
            if d["kind"] == "Service"
            and spec["selector"]["matchLabels"].items() <= d["metadata"]["labels"].items()
        ]
        # The simulator's rules and dashboard select job="foliod"; the fleet rules select
        # observed hosts by foliod_observed_host_info, and the observers are their own job.
        job = {"foliod": "foliod", "foliod-observer": "foliod-observer"}
        assert service["metadata"]["labels"][spec["jobLabel"]] == job[document["metadata"]["name"]]
        ports = {p["name"] for p in service["spec"]["ports"]}
        for endpoint in spec["endpoints"]:
            assert endpoint["port"] in ports
            assert endpoint["scheme"] in ("http", "https")
            assert set(endpoint) <= {
                "port",
                "path",
                "interval",
                "scheme",
                "tlsConfig",
                "authorization",
            }


# -- one source for rules and dashboard -------------------------------------------------------


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("foliod_kube_generate", KUBE / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_manifests_are_fresh() -> None:
    """generate.py's output is checked in; rerun it when rules.yml or the dashboard change."""
    for path, text in _generator().outputs().items():
        assert path.read_text() == text, f"{path} is stale: python deploy/kubernetes/generate.py"


def test_the_dashboard_configmap_is_the_dashboard_byte_for_byte() -> None:
    source = ROOT / "deploy" / "grafana" / "dashboards" / "foliod.json"
    for name in ("base", *DEPLOYABLE):
        configmap = _find(name, "ConfigMap", "foliod-grafana-dashboard")
        assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert configmap["data"]["foliod.json"].encode() == source.read_bytes()


# -- references between objects ---------------------------------------------------------------


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return selector.items() <= labels.items()


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_services_select_pods_whose_ports_they_target(name: str) -> None:
    pods = [
        (d["spec"]["template"]["metadata"]["labels"], d["spec"]["template"]["spec"])
        for d in RENDERED[name]
        if d["kind"] in POD_OWNERS
    ]
    for service in (d for d in RENDERED[name] if d["kind"] == "Service"):
        selected = [spec for labels, spec in pods if _matches(service["spec"]["selector"], labels)]
        assert selected, f"{name}: Service {service['metadata']['name']} selects no pod"
        for spec in selected:
            ports = [p for c in spec["containers"] for p in c.get("ports", [])]
            for port in service["spec"]["ports"]:
                target = port["targetPort"]
                field = "name" if isinstance(target, str) else "containerPort"
                assert any(p[field] == target for p in ports), (name, service["metadata"], port)
                matched = next(p for p in ports if p[field] == target)
                assert matched["containerPort"] == port["port"]
    for kustomization, policy_name, container in (
        ("base", "foliod", _foliod("base")),
        ("observer", "foliod-observer", _observer("observer")),
    ):
        policy = _find(kustomization, "NetworkPolicy", policy_name)
        names = {p["name"] for p in container["ports"]}
        assert {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]} == names


def test_the_network_policy_admits_the_load_drivers() -> None:
    policy = _find("base", "NetworkPolicy", "foliod")
    client_selector = policy["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"]
    assert client_selector == {"foliod.io/client": "true"}
    for document in RENDERED["load"]:
        if document["kind"] in POD_OWNERS and document["metadata"]["name"] != (
            "foliod-locust-master"
        ):
            assert _matches(client_selector, document["spec"]["template"]["metadata"]["labels"])


def _kubernetes_section() -> str:
    page = (ROOT / "docs" / "operations.md").read_text()
    start = page.index("## Kubernetes")
    end = page.find("\n## ", start)
    return page[start : end if end >= 0 else None]


def _references(document: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(kind, name) of every Secret and ConfigMap an object uses."""
    for spec in _pod_specs(document):
        for volume in spec.get("volumes", []):
            if "secret" in volume:
                yield "Secret", volume["secret"]["secretName"]
            if "configMap" in volume:
                yield "ConfigMap", volume["configMap"]["name"]
        for container in spec["containers"]:
            for env in container.get("env", []):
                source = env.get("valueFrom", {})
                if "secretKeyRef" in source:
                    yield "Secret", source["secretKeyRef"]["name"]
                if "configMapKeyRef" in source:
                    yield "ConfigMap", source["configMapKeyRef"]["name"]
    if document["kind"] == "ServiceMonitor":
        for endpoint in document["spec"]["endpoints"]:
            if "authorization" in endpoint:
                yield "Secret", endpoint["authorization"]["credentials"]["name"]
            if "tlsConfig" in endpoint:
                yield "Secret", endpoint["tlsConfig"]["ca"]["secret"]["name"]


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_every_secret_and_configmap_used_exists_or_is_documented(name: str) -> None:
    """Secrets the user creates (TLS, tokens) are named in the docs' Kubernetes section."""
    present = {_key(d) for d in RENDERED[name]}
    documented = _kubernetes_section()
    for document in RENDERED[name]:
        for reference in _references(document):
            assert reference in present or f"`{reference[1]}`" in documented, (name, reference)


def _environment(name: str) -> dict[str, str]:
    environ = {}
    for env in _foliod(name)["env"]:
        # A Secret's value is not in the manifests: stand in a well-formed one.
        environ[env["name"]] = env.get("value", "0" * 64)
    return environ


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_env_names_foliod_options(name: str) -> None:
    options = {"FOLIOD_" + option.name.upper() for option in OPTIONS}
    for document in RENDERED[name]:
        for spec in _pod_specs(document):
            for container in spec["containers"]:
                for env in container.get("env", []):
                    assert env["name"] in options | OTHER_ENV, (name, env)


@pytest.mark.parametrize("name", DEPLOYABLE)
def test_foliod_accepts_each_overlays_configuration(name: str) -> None:
    config = load_config([], _environment(name))
    assert config.listen == "0.0.0.0:50051"
    assert str(config.state_dir) == "/var/lib/foliod"
    if name == "overlays/production":
        assert not config.insecure
        assert config.tls_cert is not None and config.tokens is not None
        assert config.metrics_tls_cert is not None and config.metrics_token_sha256
        mounts = {m["mountPath"] for m in _foliod(name)["volumeMounts"]}
        for path in (config.tls_cert, config.tls_key, config.tokens, config.metrics_tls_cert):
            assert str(Path(str(path)).parent) in mounts
    else:
        assert config.insecure


def test_the_base_alone_is_refused_as_insecure() -> None:
    """The base leaves security to the overlays: foliod refuses its bare configuration."""
    with pytest.raises(ConfigError, match="refusing to listen"):
        load_config([], _environment("base"))


# -- the pod ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ("base", *DEPLOYABLE))
def test_probes_ask_the_health_service_about_foliod(name: str) -> None:
    assert "grpc.health.v1.Health" in OPEN_SERVICES  # so a probe needs no token
    containers = [_foliod(name)]
    if name != "base":
        containers.append(_observer(name))
    for container in containers:
        for probe_name in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = container[probe_name]
            if "grpc" in probe:
                assert probe["grpc"] == {"port": 50051, "service": FOLIOD_SERVICE}
            else:
                script = probe["exec"]["command"][-1]
                assert f"service='{FOLIOD_SERVICE}'" in script
                assert "127.0.0.1:50051" in script
        # The kubelet's gRPC probe speaks plaintext only.
        tls = any(env["name"] == "FOLIOD_TLS_CERT" for env in container["env"])
        assert tls == ("exec" in container["readinessProbe"])


def test_the_tls_exec_probe_works_against_a_tls_server(
    make_server: ServerFactory, tmp_path: Path
) -> None:
    """The production overlay's probe, run against foliod with TLS and tokens (files as the
    Secrets hold them), passes; against a stopping server it fails."""
    ca = _issue("foliod test CA", None)
    server_pair = _issue("foliod", ca, [x509.DNSName("foliod"), x509.DNSName("foliod.foliod.svc")])
    ca_path, _ = _write(tmp_path, "ca", ca)
    cert, key = _write(tmp_path, "server", server_pair)
    tokens = tmp_path / "tokens.toml"
    tokens.write_text(
        f'[[tokens]]\nsha256 = "{token_digest("t0ken")}"\nprincipal = "ops"\nrole = "admin"\n'
    )
    server = make_server(tls_cert=cert, tls_key=key, tokens=tokens)
    command = copy.deepcopy(_foliod("overlays/production")["readinessProbe"]["exec"]["command"])
    assert command[0] == "python"
    script = command[-1].replace("/etc/foliod/tls/ca.crt", str(ca_path))
    script = script.replace("127.0.0.1:50051", f"127.0.0.1:{server.grpc_port}")
    result = subprocess.run(
        [sys.executable, *command[1:-1], script],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    server.health.enter_graceful_shutdown()
    result = subprocess.run(
        [sys.executable, *command[1:-1], script],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0


# Server RSS from docs/benchmarks.md: an idle server (81 MB, "Boot") plus, per 4 KiB page of
# simulated RAM, the order-0 page cache (344 bytes, section 9) and order-0 anon folios with
# their page tables (27.5 bytes): the worst of a RAM full of either, taken together.
IDLE_BYTES = 81 * 10**6
PAGE_CACHE_BYTES_PER_PAGE = 344
ANON_BYTES_PER_PAGE = 27.5


def _quantity(text: str) -> int:
    """Bytes of a Kubernetes memory quantity (512Mi, 1Gi)."""
    return parse_size(text + "B" if text[-1:] == "i" else text)


@pytest.mark.parametrize("name", ("base", *DEPLOYABLE))
def test_resources_are_sized_from_the_benchmarks(name: str) -> None:
    container = _foliod(name)
    ram = parse_size(_environment(name)["FOLIOD_RAM"])
    pages = ram // 4096
    need = IDLE_BYTES + pages * (PAGE_CACHE_BYTES_PER_PAGE + ANON_BYTES_PER_PAGE)
    requests, limits = container["resources"]["requests"], container["resources"]["limits"]
    assert _quantity(requests["memory"]) >= need
    assert _quantity(limits["memory"]) >= 2 * _quantity(requests["memory"])
    # Python runs one thread at a time: one core asked for.
    assert requests["cpu"] == "1"


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_pods_run_unprivileged_on_a_read_only_root(name: str) -> None:
    """Every pod but the observer (next test) runs as uid 10001 without capabilities."""
    for document in RENDERED[name]:
        if _key(document) == ("DaemonSet", "foliod-observer"):
            continue
        for spec in _pod_specs(document):
            assert spec["securityContext"]["runAsNonRoot"] is True
            assert spec["securityContext"]["runAsUser"] == 10001
            assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
            for container in spec["containers"]:
                context = container["securityContext"]
                assert context["readOnlyRootFilesystem"] is True
                assert context["allowPrivilegeEscalation"] is False
                assert context["capabilities"] == {"drop": ["ALL"]}
                assert "/tmp" in {m["mountPath"] for m in container["volumeMounts"]}
    statefulset = _find("base", "StatefulSet", "foliod")
    claims = {c["metadata"]["name"] for c in statefulset["spec"]["volumeClaimTemplates"]}
    mounts = {m["name"]: m["mountPath"] for m in _foliod("base")["volumeMounts"]}
    assert mounts["state"] == "/var/lib/foliod" and "state" in claims


# -- the fleet observer -------------------------------------------------------------------------


def _observer_environment(name: str) -> dict[str, str]:
    """The observer's FOLIOD_* variables as the kubelet sets them: $(NODE_NAME) expanded (to
    node-1), a Secret's value stood in by a well-formed one."""
    environ = {"NODE_NAME": "node-1"}
    for env in _observer(name)["env"]:
        if env["name"] == "NODE_NAME":
            assert env["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
            continue
        value = env.get("value", "0" * 64)
        environ[env["name"]] = re.sub(r"\$\((\w+)\)", lambda m: environ[m.group(1)], value)
    return environ


@pytest.mark.parametrize("name", ("observer", *DEPLOYABLE))
def test_the_observer_runs_on_every_node_with_the_least_privilege(name: str) -> None:
    """uid 0 (kpageflags is root's, mode 0400) with every capability dropped, no privilege
    escalation, a read-only root, RuntimeDefault seccomp; no host namespaces or host paths;
    tolerates every taint and selects no nodes."""
    daemonset = _find(name, "DaemonSet", "foliod-observer")
    spec = daemonset["spec"]["template"]["spec"]
    assert spec["tolerations"] == [{"operator": "Exists"}]
    assert "nodeSelector" not in spec and "affinity" not in spec
    for field in ("hostPID", "hostIPC", "hostNetwork"):
        assert not spec.get(field), field
    assert all("hostPath" not in volume for volume in spec["volumes"])
    assert spec["automountServiceAccountToken"] is False
    assert spec["securityContext"]["runAsUser"] == 0
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (container,) = spec["containers"]
    context = container["securityContext"]
    assert context["capabilities"] == {"drop": ["ALL"]}
    assert context["allowPrivilegeEscalation"] is False
    assert context["readOnlyRootFilesystem"] is True
    assert not context.get("privileged")
    assert context["runAsUser"] == 0
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert {"/tmp", "/var/lib/foliod"} <= mounts


@pytest.mark.parametrize("name", DEPLOYABLE)
def test_foliod_accepts_the_observers_configuration(name: str) -> None:
    """Each overlay's observer observes only, names its machine after the node, and is secured
    like the server (production) or opted out (dev)."""
    config = load_config([], _observer_environment(name))
    assert config.observe_host and config.observe_only
    assert config.observe_hostname == "node-1"
    assert config.listen == "0.0.0.0:50051" and config.metrics_listen == "0.0.0.0:9464"
    assert config.insecure == (name == "overlays/dev")
    if name == "overlays/production":
        assert config.tls_cert is not None and config.tokens is not None
        assert config.metrics_tls_cert is not None and config.metrics_token_sha256
        assert "exec" in _observer(name)["readinessProbe"]
    with pytest.raises(ConfigError, match="refusing to listen"):
        load_config([], _observer_environment("observer"))


def test_the_observer_is_scraped_by_annotations_and_its_service_monitor() -> None:
    """The pod's scrape annotations name its metrics port; the ServiceMonitor selects the
    observer Service's metrics port; production drops the annotations (its /metrics needs the
    bearer token, which annotations cannot give) and scrapes over HTTPS."""
    template = _find("observer", "DaemonSet", "foliod-observer")["spec"]["template"]
    annotations = template["metadata"]["annotations"]
    ports = {p["name"]: p["containerPort"] for p in _observer("observer")["ports"]}
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == ports["metrics"]
    assert annotations["prometheus.io/path"] == "/metrics"
    service = _find("observer", "Service", "foliod-observer")
    assert service["spec"]["clusterIP"] == "None"
    monitor = _find("observer", "ServiceMonitor", "foliod-observer")
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]
    production = _find("overlays/production", "DaemonSet", "foliod-observer")
    assert "annotations" not in production["spec"]["template"]["metadata"]
    (endpoint,) = _find("overlays/production", "ServiceMonitor", "foliod-observer")["spec"][
        "endpoints"
    ]
    assert endpoint["scheme"] == "https" and endpoint["authorization"]["type"] == "Bearer"


# Measured (docs/operations.md, Kubernetes): an observer holds 72 MB, 81 MB at a scan's peak
# (2 MiB chunks: the same whatever the node's RAM).
OBSERVER_PEAK_BYTES = 81_536 * 1024


@pytest.mark.parametrize("name", ("observer", *DEPLOYABLE))
def test_the_observers_resources_cover_the_measured_peak(name: str) -> None:
    resources = _observer(name)["resources"]
    request = _quantity(resources["requests"]["memory"])
    assert request >= OBSERVER_PEAK_BYTES * 3 // 2
    assert _quantity(resources["limits"]["memory"]) >= 2 * request
    assert parse_size(_observer_environment(name)["FOLIOD_RAM"]) == 1 << 20


@pytest.mark.slow
@pytest.mark.skipif(not readable(), reason="/proc/kpageflags is not readable (needs uid 0)")
def test_the_observers_configuration_observes_this_host(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """foliod started with the dev overlay's observer environment (addresses on loopback)
    serves this host as real:node-1 and nothing else, on /metrics too."""
    for key, value in _observer_environment("overlays/dev").items():
        monkeypatch.setenv(key, value)
    process = ServerProcess(tmp_path, "--observe-interval-seconds", "0")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{process.port}") as channel:
            stub = foliod_pb2_grpc.FoliodStub(channel)
            assert stub.GetMachine(pb.GetMachineRequest(), timeout=30).name == "real:node-1"
        url = f"http://127.0.0.1:{process.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=30) as response:
            text = response.read().decode()
        assert set(re.findall(r'foliod_ram_bytes\{machine="([^"]+)"\}', text)) == {"real:node-1"}
        assert "foliod_observed_host_info{" in text
    finally:
        process.kill()
