"""TLS and mutual TLS for the collector's gRPC port, with certificates reloaded on change.

gRPC asks for the certificate configuration at every new handshake; files are
re-read when their modification time changes, so a rotated certificate (a
renewed Kubernetes Secret) is served to new connections without a restart.
With a client CA, every agent must present a certificate it signed (mTLS).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import grpc

log = logging.getLogger(__name__)


class ServerCertificates:
    """The PEM files behind the gRPC port's credentials (called from gRPC threads)."""

    def __init__(self, cert_file: str, key_file: str, client_ca_file: str | None = None
                 ) -> None:
        self.files = [Path(cert_file), Path(key_file)]
        if client_ca_file:
            self.files.append(Path(client_ca_file))
        self.mutual = bool(client_ca_file)
        self._stamp = self._stamps()
        self._initial = self._configuration()  # unreadable files: the collector refuses

    def _stamps(self) -> tuple[float, ...]:
        return tuple(os.stat(f).st_mtime for f in self.files)

    def _configuration(self) -> grpc.ServerCertificateConfiguration:
        cert, key, *ca = (f.read_bytes() for f in self.files)
        return grpc.ssl_server_certificate_configuration(
            [(key, cert)], root_certificates=ca[0] if ca else None)

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        try:
            stamp = self._stamps()
            if stamp == self._stamp:
                return None
            configuration = self._configuration()
        except OSError as error:
            log.error("TLS files not reloaded, keeping the previous ones: %s", error)
            return None
        self._stamp = stamp
        log.info("TLS certificate reloaded from %s", self.files[0])
        return configuration

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self._initial, self._fetch, require_client_authentication=self.mutual)
