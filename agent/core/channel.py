"""How the agent connects: TLS or mutual TLS, and a bearer token.

Files are read again for every new connection, so certificates and tokens
can be rotated under a running job (a mounted Kubernetes Secret). A token is
only ever sent, never logged. A file that is missing or holds no usable
certificate, key or token fails that connection with a `CredentialsError`
naming the file, before gRPC sees it, and so does a collector certificate that
does not verify (gRPC would log its own lines at every attempt). The first
channel of the process also takes a hold on gRPC's asyncio runtime for good
(`hold_grpc_runtime`).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc

from gradwatch.agent.core import forking
from gradwatch.agent.core.endpoints import Endpoint
from gradwatch.agent.core.settings import AgentSettings, parse_token

log = logging.getLogger(__name__)


class CredentialsError(OSError):
    """A TLS or token file cannot be used; the message names it and says why."""


def _read(what: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise CredentialsError(f"{what} {path}: {error.strerror or error}") from None


def _check_pem(ca: bytes | None, cert_file: str | None, key_file: str | None,
               ca_file: str | None) -> None:
    """Loads the CA certificates and the client certificate and key the way a TLS
    library does; raises `CredentialsError` for what would fail the handshake."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if ca is not None:
        try:
            context.load_verify_locations(cadata=ca.decode("ascii"))
        except (ssl.SSLError, UnicodeDecodeError, ValueError) as error:
            raise CredentialsError(f"TLS CA file {ca_file}: no usable PEM certificate "
                                   f"({_why(error)})") from None
    if cert_file and key_file:
        try:
            context.load_cert_chain(cert_file, key_file)
        except (ssl.SSLError, OSError) as error:
            raise CredentialsError(f"TLS client certificate {cert_file} and key {key_file}: "
                                   f"not a matching PEM pair ({_why(error)})") from None


def _why(error: Exception) -> str:
    return str(getattr(error, "reason", None) or getattr(error, "strerror", None) or error)


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
        """Call metadata: the bearer token, if any (read now; `CredentialsError` if the
        file cannot be read or holds no token)."""
        token = self.token
        if self.token_file:
            raw = _read("token file", self.token_file)
            try:
                token = parse_token(raw.decode("ascii"))
            except (UnicodeDecodeError, ValueError):
                raise CredentialsError(f"token file {self.token_file}: no bearer token in it "
                                       "(printable ASCII without spaces)") from None
        return (("authorization", f"Bearer {token}"),) if token else ()

    async def verify(self, endpoint: Endpoint, timeout_s: float = 5.0) -> None:
        """Checks the collector's certificate with a TLS handshake of our own before gRPC
        makes one: a certificate that does not verify raises `CredentialsError` (logged
        once by the sender), where gRPC would print its own error lines to stderr at
        every attempt. Other failures are left for gRPC to meet and report."""
        if not self.secure:
            return
        host, _, port = endpoint.address.rpartition(":")
        name = endpoint.authority.rpartition(":")[0].strip("[]") or host.strip("[]")
        try:  # unusable files: `open` names them
            context = ssl.create_default_context(cafile=self.ca_file)
            context.set_alpn_protocols(["h2"])
            if self.cert_file and self.key_file:
                context.load_cert_chain(self.cert_file, self.key_file)
        except (OSError, ValueError):
            return
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(
                host.strip("[]"), int(port), ssl=context, server_hostname=name), timeout_s)
        except ssl.SSLCertVerificationError as error:
            raise CredentialsError(
                f"collector {endpoint.authority}: its certificate does not verify against "
                f"{f'TLS CA file {self.ca_file}' if self.ca_file else 'the system roots'}: "
                f"{error.verify_message or _why(error)}") from None
        except (OSError, ValueError, asyncio.TimeoutError):
            return
        writer.transport.abort()  # no TLS shutdown to wait for: it was only a check

    def open(self, endpoint: Endpoint) -> grpc.aio.Channel:
        """A new channel to ``endpoint`` (call inside the sender's event loop)."""
        hold_grpc_runtime()
        options = [("grpc.enable_retries", 0)]
        if not self.secure:
            return grpc.aio.insecure_channel(endpoint.address, options=options)

        def read(what: str, path: str | None) -> bytes | None:
            return _read(what, path) if path else None

        ca = read("TLS CA file", self.ca_file)
        key = read("TLS key file", self.key_file)
        cert = read("TLS certificate file", self.cert_file)
        _check_pem(ca, self.cert_file, self.key_file, self.ca_file)
        credentials = grpc.ssl_channel_credentials(
            root_certificates=ca, private_key=key, certificate_chain=cert)
        if endpoint.address != endpoint.authority:  # an address resolved from a name
            host = endpoint.authority.rpartition(":")[0].strip("[]")
            options += [("grpc.ssl_target_name_override", host),
                        ("grpc.default_authority", endpoint.authority)]
        return grpc.aio.secure_channel(endpoint.address, credentials, options=options)


def hold_grpc_runtime() -> None:
    """Keeps gRPC's asyncio runtime up for the rest of the process (sender thread, in its
    event loop; once per process).

    grpc.aio tears its runtime down whenever its last channel or call is freed, and waits
    there, holding a process-wide lock, until every operation pending in gRPC's core is
    done. One that never was (after a collector that stopped answering) left that sender
    thread waiting for good and every later channel of the process blocked in its
    constructor: each monitor made afterwards delivered nothing (gRPC 1.85). One
    reference held from the first connection on means it is never torn down; a child
    forked afterwards cannot use it (`forking.grpc_runtime_held`)."""
    if not forking.holds_grpc_runtime():
        grpc.aio.init_grpc_aio()
        forking.grpc_runtime_held()
