"""The /metrics endpoint: prometheus-client's WSGI app on a threaded HTTP server, with optional
TLS (and client certificates) and an optional bearer token.

Prometheus scrapes it with ``scheme: https``, ``tls_config`` (``ca_file``; ``cert_file`` and
``key_file`` for mutual TLS) and ``authorization: {credentials_file: ...}``. The token is
configured as its SHA-256 (``metrics_token_sha256``) and compared in constant time; a request
without it gets 401 and a ``WWW-Authenticate: Bearer`` header. SIGHUP rereads the certificate
and key (``reload``): connections made afterwards use the new ones.
"""

from __future__ import annotations

import hashlib
import hmac
import socket
import ssl
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app

_BEARER = "bearer "

StartResponse = Callable[..., Any]
WsgiApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


# A client gets this long to finish the TLS handshake and send its request.
HANDSHAKE_TIMEOUT_SECONDS = 10.0
# How often the serving thread looks for stop(): stop() waits up to this long (socketserver's
# default, 0.5 s, was most of a test server's stop).
SHUTDOWN_POLL_SECONDS = 0.05


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True

    def finish_request(self, request: Any, client_address: Any) -> None:
        """The TLS handshake runs here, in the request's own thread, not in accept(): a
        client that never completes one holds up no one else."""
        if isinstance(request, ssl.SSLSocket):
            request.settimeout(HANDSHAKE_TIMEOUT_SECONDS)
            try:
                request.do_handshake()
            except (OSError, ssl.SSLError):
                return
        super().finish_request(request, client_address)


class _IPv6Server(_ThreadingServer):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes are not logged (they would flood the log every few seconds)."""


def require_token(app: WsgiApp, token_sha256: str) -> WsgiApp:
    """The app, answering 401 to a request without ``Authorization: Bearer <token>``."""

    def guarded(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        header = str(environ.get("HTTP_AUTHORIZATION", ""))
        given = header[len(_BEARER) :].strip() if header[: len(_BEARER)].lower() == _BEARER else ""
        digest = hashlib.sha256(given.encode()).hexdigest()
        if given and hmac.compare_digest(digest, token_sha256):
            return app(environ, start_response)
        start_response(
            "401 Unauthorized",
            [("Content-Type", "text/plain"), ("WWW-Authenticate", 'Bearer realm="foliod"')],
        )
        return [b"a bearer token is required\n"]

    return guarded


class TlsFiles:
    """The endpoint's certificate, key and optional client CA, in one SSLContext."""

    def __init__(self, cert: Path, key: Path, client_ca: Path | None) -> None:
        self.cert, self.key, self.client_ca = cert, key, client_ca
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2
        self.reload()
        if client_ca is not None:
            self.context.load_verify_locations(cafile=str(client_ca))
            self.context.verify_mode = ssl.CERT_REQUIRED

    def reload(self) -> None:
        """Rereads the certificate and key (OSError or ssl.SSLError if they do not load)."""
        self.context.load_cert_chain(str(self.cert), str(self.key))


class MetricsEndpoint:
    """A running /metrics server; `stop` ends it."""

    def __init__(
        self,
        host: str,
        port: int,
        registry: CollectorRegistry,
        *,
        tls: TlsFiles | None = None,
        token_sha256: str | None = None,
    ) -> None:
        app: WsgiApp = make_wsgi_app(registry)
        if token_sha256 is not None:
            app = require_token(app, token_sha256)
        server_class = _IPv6Server if ":" in host.strip("[]") else _ThreadingServer
        self.tls = tls
        self.httpd = make_server(
            host.strip("[]"), port, app, server_class=server_class, handler_class=_QuietHandler
        )
        if tls is not None:
            self.httpd.socket = tls.context.wrap_socket(
                self.httpd.socket, server_side=True, do_handshake_on_connect=False
            )
        self.port: int = self.httpd.server_port
        self._thread = threading.Thread(
            target=self.httpd.serve_forever,
            kwargs={"poll_interval": SHUTDOWN_POLL_SECONDS},
            name="foliod-metrics",
            daemon=True,
        )
        self._thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
