"""How the agent connects: TLS or mutual TLS, and a bearer token.

Files are read again for every new connection, so certificates and tokens
can be rotated under a running job (a mounted Kubernetes Secret). A token is
only ever sent, never logged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import grpc

from gradwatch.agent.core.endpoints import Endpoint
from gradwatch.agent.core.settings import AgentSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChannelSettings:
    """Transport security of the agent's connections.

    ``tls``: use TLS (implied by any file below); the server is verified against
    ``ca_file``, or the system's roots without one. ``cert_file``/``key_file``:
    the client certificate for mutual TLS. ``token``/``token_file``: a bearer
    token scoped to the training job (the file wins and is re-read per connection).
    """

    tls: bool = False
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    token: str | None = None
    token_file: str | None = None

    @classmethod
    def of(cls, settings: AgentSettings) -> ChannelSettings:
        return cls(tls=settings.tls, ca_file=settings.tls_ca_file,
                   cert_file=settings.tls_cert_file, key_file=settings.tls_key_file,
                   token=settings.token, token_file=settings.token_file)

    @property
    def secure(self) -> bool:
        return self.tls or any((self.ca_file, self.cert_file, self.key_file))

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """Call metadata: the bearer token, if any (read now)."""
        token = self.token
        if self.token_file:
            token = Path(self.token_file).read_text().strip()
        return (("authorization", f"Bearer {token}"),) if token else ()

    def open(self, endpoint: Endpoint) -> grpc.aio.Channel:
        """A new channel to ``endpoint`` (call inside the sender's event loop)."""
        options = [("grpc.enable_retries", 0)]
        if not self.secure:
            return grpc.aio.insecure_channel(endpoint.address, options=options)

        def read(path: str | None) -> bytes | None:
            return Path(path).read_bytes() if path else None

        credentials = grpc.ssl_channel_credentials(
            root_certificates=read(self.ca_file), private_key=read(self.key_file),
            certificate_chain=read(self.cert_file))
        if endpoint.address != endpoint.authority:  # an address resolved from a name
            host = endpoint.authority.rpartition(":")[0].strip("[]")
            options += [("grpc.ssl_target_name_override", host),
                        ("grpc.default_authority", endpoint.authority)]
        return grpc.aio.secure_channel(endpoint.address, credentials, options=options)
