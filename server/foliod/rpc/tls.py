"""Server TLS credentials whose certificate, key and client CA are reread when their files
change, without a restart: grpc asks for the configuration at each new connection's handshake,
and the files are reread only when one's modification time or size has changed."""

from __future__ import annotations

import threading
from pathlib import Path

import grpc
import structlog

_log = structlog.get_logger("foliod")

# (mtime_ns, size) of each file.
_Stamp = tuple[tuple[int, int], ...]


class CertificateFiles:
    """A PEM certificate chain, its key and an optional client CA bundle (mutual TLS)."""

    def __init__(self, cert: Path, key: Path, client_ca: Path | None = None) -> None:
        self.cert = cert
        self.key = key
        self.client_ca = client_ca
        self._lock = threading.Lock()
        self._stamp = self._stat()
        # Read now, so a missing or unreadable file stops the start with an OSError.
        self.initial = self._read()
        self.reloads = 0

    def _paths(self) -> tuple[Path, ...]:
        return (self.cert, self.key) if self.client_ca is None else (
            self.cert, self.key, self.client_ca
        )  # fmt: skip

    def _stat(self) -> _Stamp:
        stats = [path.stat() for path in self._paths()]
        return tuple((st.st_mtime_ns, st.st_size) for st in stats)

    def _read(self) -> grpc.ServerCertificateConfiguration:
        root = None if self.client_ca is None else self.client_ca.read_bytes()
        pair = (self.key.read_bytes(), self.cert.read_bytes())
        return grpc.ssl_server_certificate_configuration([pair], root_certificates=root)

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """The new configuration if a file changed since last read, else None (keep the
        current one). A file that cannot be read now keeps the current one, logged."""
        with self._lock:
            try:
                stamp = self._stat()
                if stamp == self._stamp:
                    return None
                config = self._read()
            except OSError as exc:
                _log.error("TLS files not reloaded", error=str(exc))
                return None
            self._stamp = stamp
            self.reloads += 1
        _log.info("TLS files reloaded", cert=str(self.cert))
        return config

    def credentials(self) -> grpc.ServerCredentials:
        """Server credentials that take up changed files at the next handshake; with a client
        CA, clients must present a certificate it signed."""
        return grpc.dynamic_ssl_server_credentials(
            self.initial,
            self.fetch,  # type: ignore[arg-type]  # grpc documents None as "no change"
            require_client_authentication=self.client_ca is not None,
        )
