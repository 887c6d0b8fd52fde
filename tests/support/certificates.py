"""Throw-away certificates for TLS and mutual-TLS tests."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Certificates:
    """PEM files of a throw-away CA, a server certificate for 127.0.0.1/localhost and
    a client certificate, all signed by the CA (see `make_certificates`)."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def make_certificates(folder: str | os.PathLike, client_name: str = "gradwatch-agent"
                      ) -> Certificates:
    """Generates certificates for TLS and mutual-TLS tests into ``folder`` (needs the
    ``cryptography`` package, a dev dependency). Valid for one day."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    folder = Path(folder)
    now = datetime.datetime.now(datetime.timezone.utc)

    def name(common_name: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])

    def issue(subject: str, key, issuer: str, issuer_key, *, ca: bool = False,
              usage=None, san=None) -> x509.Certificate:
        builder = (x509.CertificateBuilder()
                   .subject_name(name(subject)).issuer_name(name(issuer))
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if usage:
            builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    def write(path: Path, *items) -> Path:
        pem = b""
        for item in items:
            if isinstance(item, x509.Certificate):
                pem += item.public_bytes(serialization.Encoding.PEM)
            else:
                pem += item.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption())
        path.write_bytes(pem)
        return path

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = issue("gradwatch test CA", ca_key, "gradwatch test CA", ca_key, ca=True)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = issue("localhost", server_key, "gradwatch test CA", ca_key,
                        usage=ExtendedKeyUsageOID.SERVER_AUTH,
                        san=[x509.DNSName("localhost"),
                             x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    client_key = ec.generate_private_key(ec.SECP256R1())
    client_cert = issue(client_name, client_key, "gradwatch test CA", ca_key,
                        usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    return Certificates(
        ca=write(folder / "ca.pem", ca_cert),
        server_cert=write(folder / "server.pem", server_cert),
        server_key=write(folder / "server-key.pem", server_key),
        client_cert=write(folder / "client.pem", client_cert),
        client_key=write(folder / "client-key.pem", client_key),
    )
