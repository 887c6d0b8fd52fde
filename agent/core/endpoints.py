"""Where the collectors are, and which one a training job talks to.

A collector address is one of:

- ``host:port``: one collector (gRPC resolves the name and tries its addresses);
- ``host1:port,host2:port,...``: a static list of replicas;
- ``dns:///name:port``: every address the name resolves to is a replica, as a
  Kubernetes headless Service gives; resolved again before every connection.

Every task of a job ranks the replicas by rendezvous (highest random weight)
hashing of the job name, so they all pick the same one while it works (rules
that compare workers need the whole job in one collector), and all fall back
to the same next one. Adding or removing a replica moves only the jobs that
ranked it first.
"""

from __future__ import annotations

import hashlib
import logging
import socket
from dataclasses import dataclass

log = logging.getLogger(__name__)

DNS_SCHEME = "dns:///"


@dataclass(frozen=True)
class Endpoint:
    """One collector replica: ``address`` to connect to, ``authority`` to present
    (the name a TLS certificate is checked against)."""

    address: str
    authority: str

    def __str__(self) -> str:
        if self.address == self.authority:
            return self.address
        return f"{self.authority} ({self.address})"


def _split(target: str) -> tuple[str, str]:
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"collector address {target!r}: expected HOST:PORT")
    if not 0 < int(port) <= 65535:
        raise ValueError(f"collector address {target!r}: port out of range (1 to 65535)")
    if "/" in host or host.startswith("[") != host.endswith("]"):
        raise ValueError(f"collector address {target!r}: expected HOST:PORT (no scheme "
                         "but dns:///; an IPv6 host in brackets)")
    return host, port


def parse_targets(spec: str) -> list[str]:
    """Splits and checks a collector address (see the module docstring)."""
    targets = [t.strip() for t in spec.split(",") if t.strip()]
    if not targets:
        raise ValueError("collector address is empty")
    for target in targets:
        _split(target.removeprefix(DNS_SCHEME))
    return targets


def unresolved(targets: list[str]) -> list[Endpoint]:
    """``targets`` as they are, ``dns:///`` names included (gRPC resolves those itself
    when it connects, and reports why it cannot)."""
    names = [target.removeprefix(DNS_SCHEME) for target in targets]
    return list(dict.fromkeys(Endpoint(name, name) for name in names))


def resolve(targets: list[str]) -> list[Endpoint]:
    """The replicas behind ``targets``, in a stable order. A ``dns:///`` name that
    does not resolve (yet) is kept as is, so gRPC reports why it cannot connect.
    Blocks while the names are looked up."""
    endpoints: list[Endpoint] = []
    for target in targets:
        if not target.startswith(DNS_SCHEME):
            endpoints.append(Endpoint(target, target))
            continue
        name = target.removeprefix(DNS_SCHEME)
        host, port = _split(name)
        try:
            infos = socket.getaddrinfo(host.strip("[]"), int(port), type=socket.SOCK_STREAM)
        except OSError as error:
            log.debug("gradwatch: cannot resolve %s: %s", name, error)
            endpoints.append(Endpoint(name, name))
            continue
        addresses = sorted({info[4][0] for info in infos})
        endpoints += [Endpoint(f"[{a}]:{port}" if ":" in a else f"{a}:{port}", name)
                      for a in addresses]
    return list(dict.fromkeys(endpoints))


def _weight(key: str, endpoint: Endpoint) -> int:
    digest = hashlib.blake2b(f"{key}\n{endpoint.address}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def rank(endpoints: list[Endpoint], key: str) -> list[Endpoint]:
    """``endpoints`` in the order ``key`` (the training job) prefers them."""
    return sorted(endpoints, key=lambda e: _weight(key, e), reverse=True)
