"""Transport security and access control: TLS, mutual TLS, bearer tokens with roles, the rule
table over every RPC, the refusal to listen exposed without them, and the audit trail."""

from __future__ import annotations

import datetime
import ipaddress
import json
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2

import foliodclient
from foliod.config import ConfigError, load_config
from foliod.rpc.auth import FOLIOD_SERVICE, RULES, Role, token_digest
from foliod.v1 import foliod_pb2
from foliodclient.cli import main as foliodctl_main
from foliodclient.load.cli import main as load_main
from tests.conftest import ServerFactory, ServerProcess

TOKENS = {Role.ADMIN: "admin-secret-1", Role.TENANT: "tenant-secret-2", Role.READER: "reader-3"}
WRONG_TOKEN = "not-a-token-4"


@dataclass(frozen=True)
class Pki:
    """PEM files of a test PKI: a CA, a server certificate, good and foreign client ones."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    foreign_cert: Path
    foreign_key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _issue(
    subject: str,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
    san: list[x509.GeneralName] | None = None,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A certificate for `subject` signed by `issuer` (self-signed CA when None)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    signer_cert, signer_key = issuer if issuer else (None, key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(signer_cert.subject if signer_cert else _name(subject))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return builder.sign(signer_key, hashes.SHA256()), key


def _write(directory: Path, stem: str, pair: tuple[x509.Certificate, Any]) -> tuple[Path, Path]:
    cert, key = pair
    cert_path, key_path = directory / f"{stem}.pem", directory / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """Generates the PKI once per module."""
    directory = tmp_path_factory.mktemp("pki")
    ca = _issue("foliod test CA", None)
    other_ca = _issue("another CA", None)
    server = _issue(
        "foliod",
        ca,
        [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
    )
    client = _issue("alice", ca, [x509.DNSName("alice.clients.test")])
    foreign = _issue("mallory", other_ca)
    ca_path, _ = _write(directory, "ca", ca)
    server_cert, server_key = _write(directory, "server", server)
    client_cert, client_key = _write(directory, "client", client)
    foreign_cert, foreign_key = _write(directory, "foreign", foreign)
    return Pki(ca_path, server_cert, server_key, client_cert, client_key, foreign_cert, foreign_key)


def _token_file(path: Path, tokens: dict[Role, str]) -> Path:
    lines = []
    for role, token in tokens.items():
        lines += [
            "[[tokens]]",
            f'sha256 = "{token_digest(token)}"',
            f'principal = "{role.value}-user"',
            f'role = "{role.value}"',
            f'tenant = "t-{role.value}"',
            "",
        ]
    path.write_text("\n".join(lines))
    return path


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    return _token_file(tmp_path / "tokens.toml", TOKENS)


def _client(port: int, **options: Any) -> foliodclient.FoliodClient:
    options.setdefault("timeout", 10)
    return foliodclient.FoliodClient(f"127.0.0.1:{port}", **options)


def test_tls_serves_a_client_that_trusts_the_ca(make_server: ServerFactory, pki: Pki) -> None:
    """A TLS server answers a client verifying its certificate against the test CA."""
    server = make_server(tls_cert=pki.server_cert, tls_key=pki.server_key)
    with _client(server.grpc_port, tls_ca=pki.ca) as client:
        assert client.get_machine().ram_bytes == 256 << 20


def test_plaintext_to_a_tls_port_fails(make_server: ServerFactory, pki: Pki) -> None:
    """A plaintext client gets no answer from a TLS port."""
    server = make_server(tls_cert=pki.server_cert, tls_key=pki.server_key)
    with _client(server.grpc_port, timeout=2) as client, pytest.raises(foliodclient.CallError):
        client.get_machine()


def test_mtls_admits_only_certificates_of_the_client_ca(
    make_server: ServerFactory, pki: Pki
) -> None:
    """Mutual TLS serves a client with a certificate of the client CA, and no client without
    one or with one from another CA."""
    server = make_server(tls_cert=pki.server_cert, tls_key=pki.server_key, tls_client_ca=pki.ca)
    good = {"tls_ca": pki.ca, "tls_cert": pki.client_cert, "tls_key": pki.client_key}
    with _client(server.grpc_port, **good) as client:
        assert client.get_machine().name == "host"
        # A certificate alone makes its holder an admin.
        client.allocate("o", "anon", order=0, count=1)
    foreign = {"tls_ca": pki.ca, "tls_cert": pki.foreign_cert, "tls_key": pki.foreign_key}
    for options in ({"tls_ca": pki.ca}, foreign):
        with (
            _client(server.grpc_port, timeout=3, **options) as client,
            pytest.raises(foliodclient.Unavailable),
        ):
            client.get_machine()


def test_mtls_principal_is_the_certificate_san(make_server: ServerFactory, pki: Pki) -> None:
    """The principal of a certificate-authenticated call is its SAN, as grpc reports it."""
    server = make_server(tls_cert=pki.server_cert, tls_key=pki.server_key, tls_client_ca=pki.ca)
    seen: list[str] = []
    assert server.auth is not None
    identify = server.auth.identify

    def spy(context: grpc.ServicerContext) -> Any:
        identity = identify(context)
        seen.append(identity.principal)
        return identity

    server.auth.identify = spy  # type: ignore[method-assign]
    good = {"tls_ca": pki.ca, "tls_cert": pki.client_cert, "tls_key": pki.client_key}
    with _client(server.grpc_port, **good) as client:
        client.get_machine()
    assert seen == ["alice.clients.test"]


def test_tokens_authenticate_and_roles_authorize(
    make_server: ServerFactory, token_file: Path
) -> None:
    """No or a wrong token is UNAUTHENTICATED; a reader may read but not allocate; a tenant may
    allocate but not drop caches; an admin may do both."""
    server = make_server(tokens=token_file)
    port = server.grpc_port
    for options in ({}, {"token": WRONG_TOKEN}):
        with _client(port, **options) as client, pytest.raises(foliodclient.Unauthenticated):
            client.get_machine()
    with _client(port, token=TOKENS[Role.READER]) as client:
        client.get_machine()
        with pytest.raises(foliodclient.PermissionDenied):
            client.allocate("r", "anon", order=0, count=1)
    with _client(port, token=TOKENS[Role.TENANT]) as client:
        client.allocate("t", "anon", order=0, count=1)
        with pytest.raises(foliodclient.PermissionDenied):
            client.drop_caches()
    with _client(port, token=TOKENS[Role.ADMIN]) as client:
        client.allocate("a", "anon", order=0, count=1)
        client.drop_caches()


def test_health_and_reflection_need_no_credentials(
    make_server: ServerFactory, token_file: Path
) -> None:
    """Health checks and reflection (v1 and v1alpha) stay open on a server that requires
    tokens."""
    server = make_server(tokens=token_file)
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        listings = [
            channel.stream_stream(
                f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
                # The two versions' messages are the same bytes.
                request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
            )(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
            for version in ("v1", "v1alpha")
        ]
        names = [
            {s.name for r in listing for s in r.list_services_response.service}
            for listing in listings
        ]
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    assert names[0] == names[1] and FOLIOD_SERVICE in names[0]


def _service_methods() -> list[Any]:
    return list(foliod_pb2.DESCRIPTOR.services_by_name["Foliod"].methods)


def test_every_rpc_has_exactly_one_rule() -> None:
    """The rule table names every method of foliod.v1.Foliod and nothing else."""
    names = {f"/{FOLIOD_SERVICE}/{m.name}" for m in _service_methods()}
    assert set(RULES) == names
    assert all(Role.ADMIN in roles for roles in RULES.values())


def _call_code(channel: grpc.Channel, method: Any, token: str) -> grpc.StatusCode:
    """The status code of `method` called with an empty request and `token`."""
    name = f"/{FOLIOD_SERVICE}/{method.name}"
    request_type = method.input_type._concrete_class
    response_type = method.output_type._concrete_class
    metadata = (("authorization", f"Bearer {token}"),)
    try:
        if method.client_streaming:
            call = channel.stream_stream(
                name,
                request_serializer=request_type.SerializeToString,
                response_deserializer=response_type.FromString,
            )
            for _ in call(iter(()), timeout=10, metadata=metadata):
                pass
        elif method.server_streaming:
            stream = channel.unary_stream(
                name,
                request_serializer=request_type.SerializeToString,
                response_deserializer=response_type.FromString,
            )
            for _ in stream(request_type(), timeout=10, metadata=metadata):
                pass
        else:
            unary = channel.unary_unary(
                name,
                request_serializer=request_type.SerializeToString,
                response_deserializer=response_type.FromString,
            )
            unary(request_type(), timeout=10, metadata=metadata)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def test_every_rpc_and_role_gets_what_the_table_says(
    make_server: ServerFactory, token_file: Path
) -> None:
    """Each role calling each RPC is refused with PERMISSION_DENIED exactly where the rule
    table leaves the role out, and otherwise reaches the handler."""
    server = make_server(tokens=token_file)
    refused = (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED)
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        for method in _service_methods():
            allowed = RULES[f"/{FOLIOD_SERVICE}/{method.name}"]
            for role, token in TOKENS.items():
                code = _call_code(channel, method, token)
                if role in allowed:
                    assert code not in refused, (method.name, role)
                else:
                    assert code == grpc.StatusCode.PERMISSION_DENIED, (method.name, role)
            assert _call_code(channel, method, WRONG_TOKEN) == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize("listen", ["0.0.0.0:50051", "[::]:50051", "10.1.2.3:50051"])
def test_exposed_listen_needs_tls_and_authentication(listen: str) -> None:
    """A non-loopback address is refused without TLS and authentication, unless --insecure."""
    with pytest.raises(ConfigError, match="--insecure"):
        load_config(["--listen", listen], {})
    with pytest.raises(ConfigError, match="--insecure"):
        load_config(["--listen", listen, "--tls-cert", "c", "--tls-key", "k"], {})
    assert load_config(["--listen", listen, "--insecure"], {}).insecure
    assert load_config(["--listen", listen], {"FOLIOD_INSECURE": "true"}).insecure
    secured = ["--listen", listen, "--tls-cert", "c", "--tls-key", "k", "--tokens", "t"]
    assert load_config(secured, {}).tokens == Path("t")
    assert load_config(["--listen", "localhost:1"], {}).listen == "localhost:1"


def test_tls_options_go_together() -> None:
    """A certificate without its key, or a client CA without a certificate, is refused."""
    with pytest.raises(ConfigError, match="tls_key"):
        load_config(["--tls-cert", "c"], {})
    with pytest.raises(ConfigError, match="tls_client_ca"):
        load_config(["--tls-client-ca", "ca"], {})


def test_foliod_refuses_to_start_exposed(tmp_path: Path) -> None:
    """foliod asked to listen on every address in plaintext exits 2 with one line on stderr."""
    proc = subprocess.run(
        [sys.executable, "-m", "foliod.main", "--listen", "0.0.0.0:0"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("foliod: refusing to listen on 0.0.0.0:0")


def _wait_for(condition: Callable[[], bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_audit_lines_and_no_token_in_the_logs(
    spawn: Callable[..., ServerProcess], token_file: Path
) -> None:
    """Denied calls and admin calls leave audit lines with principal, tenant, method and code;
    access lines show the refusals; no token appears anywhere in the log."""
    server = spawn("--tokens", str(token_file))
    with (
        _client(server.port, token=WRONG_TOKEN) as client,
        pytest.raises(foliodclient.Unauthenticated),
    ):
        client.allocate("x", "anon", order=0, count=1)
    with (
        _client(server.port, token=TOKENS[Role.READER]) as client,
        pytest.raises(foliodclient.PermissionDenied),
    ):
        client.allocate("x", "anon", order=0, count=1)
    with _client(server.port, token=TOKENS[Role.ADMIN]) as client:
        client.drop_caches()
    with _client(server.port, token=TOKENS[Role.TENANT]) as client:
        client.allocate("t", "anon", order=0, count=1)
    server.proc.send_signal(signal.SIGTERM)
    assert server.wait(30) == 0
    log = "".join(server.raw)
    for token in (*TOKENS.values(), WRONG_TOKEN):
        assert token not in log
    denied = [(e["principal"], e["method"], e["code"]) for e in server.events("denied")]
    assert denied == [
        (None, "/foliod.v1.Foliod/Allocate", "UNAUTHENTICATED"),
        ("reader-user", "/foliod.v1.Foliod/Allocate", "PERMISSION_DENIED"),
    ]
    admin = [
        (e["principal"], e["tenant"], e["method"], e["code"]) for e in server.events("admin call")
    ]
    assert admin == [("admin-user", "t-admin", "/foliod.v1.Foliod/DropCaches", "OK")]
    allocate = "/foliod.v1.Foliod/Allocate"
    access = [e for e in server.lines if "grpc_type" in e and e["method"] == allocate]
    assert [e.get("code") for e in access] == ["UNAUTHENTICATED", "PERMISSION_DENIED", "OK"]


def test_sighup_reloads_the_token_file(
    spawn: Callable[..., ServerProcess], token_file: Path
) -> None:
    """A token added to the file works after SIGHUP, and a removed one stops working."""
    server = spawn("--tokens", str(token_file))
    _token_file(token_file, {Role.ADMIN: "rotated-admin-5"})
    server.proc.send_signal(signal.SIGHUP)
    _wait_for(lambda: bool(server.events("token file reloaded")))
    with _client(server.port, token="rotated-admin-5") as client:
        client.get_machine()
    with (
        _client(server.port, token=TOKENS[Role.ADMIN]) as client,
        pytest.raises(foliodclient.Unauthenticated),
    ):
        client.get_machine()


def test_a_bad_token_file_stops_the_start(tmp_path: Path) -> None:
    """A token file with an invalid entry keeps foliod from starting, naming the entry."""
    bad = tmp_path / "tokens.json"
    bad.write_text(json.dumps({"tokens": [{"sha256": "xyz", "principal": "p", "role": "admin"}]}))
    proc = subprocess.run(
        [sys.executable, "-m", "foliod.main", "--listen", "127.0.0.1:0", "--metrics-listen", "",
         "--state-dir", str(tmp_path / "var"), "--tokens", str(bad)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )  # fmt: skip
    assert proc.returncode == 1
    assert "entry 1: sha256 must be 64 hex digits" in proc.stderr


def test_foliodctl_and_foliod_load_speak_mtls_and_tokens(
    make_server: ServerFactory, pki: Pki, token_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """foliodctl and foliod-load reach a server requiring a client certificate and a token,
    and foliodctl refuses a client certificate without its key."""
    server = make_server(
        tls_cert=pki.server_cert,
        tls_key=pki.server_key,
        tls_client_ca=pki.ca,
        tokens=token_file,
    )
    target = ["--server", f"127.0.0.1:{server.grpc_port}", "--tls-ca", str(pki.ca)]
    mtls = ["--tls-cert", str(pki.client_cert), "--tls-key", str(pki.client_key)]
    token = ["--token", TOKENS[Role.TENANT]]
    assert foliodctl_main([*target, *mtls, *token, "--json", "meminfo"]) == 0
    assert json.loads(capsys.readouterr().out)
    assert foliodctl_main([*target, *token, "meminfo"]) == 8  # no certificate: UNAVAILABLE
    assert foliodctl_main([*target, "--tls-cert", str(pki.client_cert), "meminfo"]) == 2
    assert foliodctl_main([*target, *mtls, "meminfo"]) == 10  # no token
    capsys.readouterr()
    load = ["rand-read", "--ops", "20", "--file-size", "256KiB", "--files", "2", "--json"]
    assert load_main([*load, "--no-progress", *target, *mtls, *token]) == 0
    assert json.loads(capsys.readouterr().out)


# -- the metrics endpoint ------------------------------------------------------------------------

METRICS_TOKEN = "scraper-secret-5"


def _scrape(port: int, context: ssl.SSLContext | None, token: str | None) -> tuple[int, str]:
    """(HTTP status, body) of GET /metrics over HTTPS."""
    request = urllib.request.Request(f"https://127.0.0.1:{port}/metrics")
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10, context=context) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def test_metrics_over_tls_require_the_bearer_token(make_server: ServerFactory, pki: Pki) -> None:
    """/metrics over HTTPS answers 401 without the token or with a wrong one, the metrics with
    it; plain HTTP gets no metrics from the TLS port."""
    server = make_server(
        metrics_tls_cert=pki.server_cert,
        metrics_tls_key=pki.server_key,
        metrics_token_sha256=token_digest(METRICS_TOKEN),
    )
    context = ssl.create_default_context(cafile=str(pki.ca))
    for token in (None, WRONG_TOKEN):
        status, body = _scrape(server.metrics_port, context, token)
        assert status == 401
        assert "foliod_ram_bytes" not in body
    status, body = _scrape(server.metrics_port, context, METRICS_TOKEN)
    assert status == 200
    assert 'foliod_ram_bytes{machine="host"}' in body
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5)


def test_metrics_client_certificates(make_server: ServerFactory, pki: Pki) -> None:
    """With --metrics-client-ca a scraper without a certificate of that CA is refused in the
    handshake, and one with it is served; a stalled handshake holds up no other scrape."""
    server = make_server(
        metrics_tls_cert=pki.server_cert,
        metrics_tls_key=pki.server_key,
        metrics_client_ca=pki.ca,
    )
    stalled = socket.create_connection(("127.0.0.1", server.metrics_port))  # never handshakes
    try:
        bare = ssl.create_default_context(cafile=str(pki.ca))
        with pytest.raises((urllib.error.URLError, ConnectionError, ssl.SSLError)):
            _scrape(server.metrics_port, bare, None)
        client = ssl.create_default_context(cafile=str(pki.ca))
        client.load_cert_chain(str(pki.client_cert), str(pki.client_key))
        status, body = _scrape(server.metrics_port, client, None)
        assert status == 200 and "foliod_free_bytes" in body
    finally:
        stalled.close()


def test_metrics_exposure_needs_tls_and_authentication() -> None:
    """A non-loopback --metrics-listen is refused without TLS and a token or client CA, unless
    --insecure; half a TLS pair and a malformed digest are refused too."""
    exposed = ["--metrics-listen", "0.0.0.0:9464"]
    with pytest.raises(ConfigError, match=r"refusing to serve /metrics on 0\.0\.0\.0:9464"):
        load_config(exposed, {})
    with pytest.raises(ConfigError, match="refusing to serve /metrics"):
        load_config([*exposed, "--metrics-tls-cert", "c", "--metrics-tls-key", "k"], {})
    secured = [*exposed, "--metrics-tls-cert", "c", "--metrics-tls-key", "k"]
    digest = token_digest(METRICS_TOKEN)
    assert load_config([*secured, "--metrics-token-sha256", digest], {}).metrics_token_sha256
    assert load_config([*secured, "--metrics-client-ca", "ca"], {}).metrics_client_ca
    assert load_config([*exposed, "--insecure"], {}).insecure
    with pytest.raises(ConfigError, match="metrics_tls_cert and metrics_tls_key"):
        load_config(["--metrics-tls-cert", "c"], {})
    with pytest.raises(ConfigError, match="64 hex digits"):
        load_config(["--metrics-token-sha256", "abc"], {})
