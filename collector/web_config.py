"""TLS, mutual TLS and basic auth for the HTTP endpoint (``/metrics``, ``/healthz``), set by a
Prometheus web-config file (exporter-toolkit's ``--web.config.file`` format, a subset).

`load` parses and checks a file; `WebSecurity` applies one to a server: a server-side
`ssl.SSLContext`, an aiohttp middleware that checks bcrypt-hashed passwords, and
`WebSecurity.reload_if_changed`, which re-reads the file and the certificate files when they
change. Like exporter-toolkit, the settings cover every path of the endpoint. Error and log
messages name fields and users, never a password or a hash.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import os
import ssl
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import bcrypt
import yaml
from aiohttp import web

log = logging.getLogger(__name__)

#: How often the server calls `WebSecurity.reload_if_changed`.
RELOAD_INTERVAL_S = 1.0
REALM = "gradwatch"
CLIENT_AUTH_TYPES = {
    "NoClientCert": ssl.CERT_NONE,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}
TLS_VERSIONS = {"TLS12": ssl.TLSVersion.TLSv1_2, "TLS13": ssl.TLSVersion.TLSv1_3}
_TLS_KEYS = ("cert_file", "key_file", "client_ca_file", "client_auth_type", "min_version")
_BCRYPT_PREFIXES = ("$2a$", "$2b$", "$2y$")
_BCRYPT_LENGTH = 60


class WebConfigError(ValueError):
    """The web-config file is invalid; the message names the field and holds no secret."""


@dataclass(frozen=True)
class TLSSettings:
    """``tls_server_config``, with paths resolved against the file's folder."""

    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None
    #: sha256 of the client CA file as loaded, so that a changed file is noticed.
    client_ca_digest: str = ""
    client_auth_type: str = "NoClientCert"
    min_version: str = "TLS12"

    @property
    def files(self) -> tuple[Path, ...]:
        return (self.cert_file, self.key_file,
                *([self.client_ca_file] if self.client_ca_file else []))


@dataclass(frozen=True)
class WebConfig:
    """A loaded web-config file: TLS settings (None: plain HTTP) and basic-auth users."""

    tls: TLSSettings | None = None
    #: user name -> bcrypt hash; empty: no authentication.
    users: Mapping[str, bytes] = field(default_factory=dict, repr=False)


# -- loading -------------------------------------------------------------------------------

def load(path: str | os.PathLike) -> WebConfig:
    """Reads and checks the file, including that the certificate, key and client CA load.

    Raises `WebConfigError` naming the field (e.g. ``tls_server_config.cert_file: ...``).
    """
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as error:
        raise WebConfigError(f"cannot read the file: {error.strerror}") from error
    except yaml.YAMLError as error:
        # The error's own text may quote the offending line, which may hold a hash.
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or "cannot parse"
        raise WebConfigError(f"invalid YAML{where}: {problem}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise WebConfigError("expected a mapping at the top level")
    for key in data:
        if key not in ("tls_server_config", "basic_auth_users"):
            raise WebConfigError(f"{key}: unknown or unsupported setting; gradwatch supports "
                                 "tls_server_config and basic_auth_users")
    tls = _tls_settings(data.get("tls_server_config"), path.parent)
    if tls is not None:
        server_context(tls)  # raises WebConfigError naming the file that does not load
    return WebConfig(tls=tls, users=_users(data.get("basic_auth_users")))


def _tls_settings(data: object, folder: Path) -> TLSSettings | None:
    if not data:  # absent or empty, as in exporter-toolkit: plain HTTP
        return None
    if not isinstance(data, dict):
        raise WebConfigError("tls_server_config: expected a mapping")
    values: dict[str, str] = {}
    for key, value in data.items():
        name = f"tls_server_config.{key}"
        if key not in _TLS_KEYS:
            raise WebConfigError(f"{name}: unknown or unsupported setting; gradwatch supports "
                                 f"{', '.join(_TLS_KEYS)}")
        if not isinstance(value, str) or not value:
            raise WebConfigError(f"{name}: expected a non-empty string")
        values[key] = value
    for key in ("cert_file", "key_file"):
        if key not in values:
            raise WebConfigError(f"tls_server_config.{key}: missing (required with TLS)")
    auth = values.get("client_auth_type", "NoClientCert")
    if auth not in CLIENT_AUTH_TYPES:
        raise WebConfigError(f"tls_server_config.client_auth_type: {auth!r} is not supported; "
                             f"use one of {', '.join(CLIENT_AUTH_TYPES)}")
    version = values.get("min_version", "TLS12")
    if version not in TLS_VERSIONS:
        raise WebConfigError(f"tls_server_config.min_version: {version!r} is not supported; "
                             f"use one of {', '.join(TLS_VERSIONS)}")
    ca_file = folder / values["client_ca_file"] if "client_ca_file" in values else None
    if ca_file and auth == "NoClientCert":
        raise WebConfigError("tls_server_config.client_ca_file: set without a client_auth_type "
                             "that verifies client certificates")
    if not ca_file and auth != "NoClientCert":
        raise WebConfigError(f"tls_server_config.client_ca_file: required with "
                             f"client_auth_type {auth}")
    return TLSSettings(
        cert_file=folder / values["cert_file"], key_file=folder / values["key_file"],
        client_ca_file=ca_file,
        client_ca_digest=_digest("tls_server_config.client_ca_file", ca_file) if ca_file else "",
        client_auth_type=auth, min_version=version)


def _digest(name: str, path: Path) -> str:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as error:
        raise WebConfigError(f"{name}: cannot read {path}: {error.strerror}") from error


def _users(data: object) -> dict[str, bytes]:
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise WebConfigError("basic_auth_users: expected a mapping of user name to bcrypt hash")
    users = {}
    for user, hashed in data.items():
        if not isinstance(user, str) or not user or ":" in user:
            raise WebConfigError(f"basic_auth_users: user name {user!r} must be a non-empty "
                                 "string without ':'")
        if not (isinstance(hashed, str) and hashed.startswith(_BCRYPT_PREFIXES)
                and len(hashed) == _BCRYPT_LENGTH):
            raise WebConfigError(f"basic_auth_users.{user}: expected a bcrypt hash "
                                 "($2a$, $2b$ or $2y$, 60 characters)")
        users[user] = hashed.encode()
    return users


def server_context(tls: TLSSettings) -> ssl.SSLContext:
    """A server-side context with the certificate chain, client CA and verify mode of ``tls``.

    Raises `WebConfigError` naming the field whose file is missing or does not load.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = TLS_VERSIONS[tls.min_version]
    load_certificate(context, tls)
    if tls.client_ca_file:
        try:
            context.load_verify_locations(cafile=tls.client_ca_file)
        except (OSError, ssl.SSLError) as error:
            raise WebConfigError(f"tls_server_config.client_ca_file: cannot load "
                                 f"{tls.client_ca_file}: {_reason(error)}") from error
    context.verify_mode = CLIENT_AUTH_TYPES[tls.client_auth_type]
    return context


def load_certificate(context: ssl.SSLContext, tls: TLSSettings) -> None:
    """(Re)loads the certificate chain and key into ``context``; new handshakes use them."""
    for name in ("cert_file", "key_file"):
        file = getattr(tls, name)
        try:
            with open(file, "rb"):
                pass
        except OSError as error:
            raise WebConfigError(f"tls_server_config.{name}: cannot read {file}: "
                                 f"{error.strerror}") from error
    try:
        context.load_cert_chain(tls.cert_file, tls.key_file)
    except (OSError, ssl.SSLError) as error:
        raise WebConfigError(f"tls_server_config.cert_file, key_file: cannot load "
                             f"{tls.cert_file} with {tls.key_file}: {_reason(error)}") from error


def _auth_summary(config: WebConfig) -> str:
    count = len(config.users)
    return f"on ({count} user{'' if count == 1 else 's'})" if count else "off"


def _reason(error: OSError) -> str:
    return getattr(error, "reason", None) or error.strerror or str(error)


# -- serving -------------------------------------------------------------------------------

class Passwords:
    """Checks basic-auth credentials against bcrypt hashes.

    User names are compared in constant time; an unknown user costs one bcrypt check like a
    known one. Correct (user, password, hash) triples are remembered by their sha256, so a
    scraper pays bcrypt once, not per scrape: at most one entry per user. bcrypt runs in a
    thread, one check at a time, so wrong passwords cost a core at most, never the event loop.
    """

    def __init__(self, users: Mapping[str, bytes]) -> None:
        self._users = [(hashlib.sha256(u.encode()).digest(), h) for u, h in users.items()]
        self._verified: set[bytes] = set()
        self._lock = asyncio.Lock()

    def __bool__(self) -> bool:
        return bool(self._users)

    async def check(self, user: bytes, password: bytes) -> bool:
        """Whether ``password`` is ``user``'s; False for everyone when there are no users."""
        if not self._users:
            return False
        user_digest = hashlib.sha256(user).digest()
        hashed = None
        for name_digest, candidate in self._users:  # no early exit
            if hmac.compare_digest(user_digest, name_digest):
                hashed = candidate
        key = _cache_key(user, password, hashed or b"")
        if hashed is not None and key in self._verified:
            return True
        async with self._lock:
            if hashed is not None and key in self._verified:
                return True
            ok = await asyncio.to_thread(_checkpw, password, hashed or self._users[0][1])
        if ok and hashed is not None:
            self._verified.add(key)
            return True
        return False


def _checkpw(password: bytes, hashed: bytes) -> bool:
    try:
        return bcrypt.checkpw(password, hashed)
    except ValueError:  # longer than bcrypt's 72 bytes
        return False


def _cache_key(*parts: bytes) -> bytes:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return digest.digest()


def basic_credentials(header: str) -> tuple[bytes, bytes] | None:
    """(user, password) of an ``Authorization: Basic ...`` header; None if it is not one."""
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True)
    except ValueError:  # binascii.Error, or not ASCII
        return None
    user, sep, password = decoded.partition(b":")
    return (user, password) if sep else None


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class WebSecurity:
    """One endpoint's web config: `ssl_context` (None: plain HTTP; the same object for the
    life of the server), the basic-auth `middleware`, and `reload_if_changed`.

    Raises `WebConfigError` if the file is invalid at construction.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        before = self._stat((self.path,))  # a change while loading is seen by the next look
        config = load(self.path)
        self._tls = config.tls
        self._watched = self._files(config)
        self._signature = before + self._stat(self._watched[1:])
        self.ssl_context = server_context(config.tls) if config.tls else None
        self.passwords = Passwords(config.users)
        tls = config.tls
        log.info("web config %s: TLS %s%s, basic auth %s", self.path,
                 f"on (min {tls.min_version})" if tls else "off",
                 f", client certificates {tls.client_auth_type}" if tls else "",
                 _auth_summary(config))
        if config.users and not tls:
            log.warning("web config %s: basic auth without TLS sends passwords in clear text",
                        self.path)

    @property
    def scheme(self) -> str:
        return "https" if self.ssl_context else "http"

    def _files(self, config: WebConfig) -> tuple[Path, ...]:
        return (self.path, *(config.tls.files if config.tls else ()))

    @staticmethod
    def _stat(files: tuple[Path, ...]) -> tuple:
        signature = []
        for file in files:
            try:
                stat = file.stat()
                signature.append((stat.st_mtime_ns, stat.st_size, stat.st_ino))
            except OSError:
                signature.append(None)
        return tuple(signature)

    def reload_if_changed(self) -> bool:
        """Applies the file if it or a certificate file changed since the last look.

        Users and the certificate and key take effect at once (new handshakes). Turning TLS on
        or off, client_ca_file (path or content), client_auth_type and min_version need a
        restart: a change to them is logged as an error and the running values stay. An
        invalid file changes nothing and is logged. Returns whether settings were applied.
        """
        signature = self._stat(self._watched)
        if signature == self._signature:
            return False
        self._signature = signature
        try:
            config = load(self.path)
        except WebConfigError as error:
            log.error("web config %s: %s; keeping the previous settings", self.path, error)
            return False
        self.passwords = Passwords(config.users)
        if self._tls is not None and config.tls is not None:
            self._reload_tls(config.tls)
        elif self._tls != config.tls:
            log.error("web config %s: tls_server_config: turning TLS on or off needs a "
                      "restart; still serving %s", self.path, self.scheme)
        if self._files(config) != self._watched:
            self._watched = self._files(config)
            self._signature = self._stat(self._watched)
        log.info("web config %s reloaded: basic auth %s", self.path,
                 _auth_summary(config))
        return True

    def _reload_tls(self, tls: TLSSettings) -> None:
        assert self.ssl_context is not None and self._tls is not None
        fixed = [name for name in ("client_ca_file", "client_auth_type", "min_version")
                 if getattr(tls, name) != getattr(self._tls, name)]
        if tls.client_ca_digest != self._tls.client_ca_digest and "client_ca_file" not in fixed:
            fixed.insert(0, "client_ca_file")
        if fixed:
            log.error("web config %s: changing tls_server_config %s needs a restart; keeping "
                      "the running values", self.path, ", ".join(fixed))
        try:
            load_certificate(self.ssl_context, tls)
        except WebConfigError as error:  # changed again since load() checked them: the next
            # look sees the change and retries; OpenSSL may have taken the new certificate
            log.error("web config %s: %s; handshakes may fail until the files agree again",
                      self.path, error)
            return
        self._tls = replace(self._tls, cert_file=tls.cert_file, key_file=tls.key_file)

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Answers 401 unless the request carries a configured user's password."""
        passwords = self.passwords
        if passwords:
            credentials = basic_credentials(request.headers.get("Authorization", ""))
            if credentials is None or not await passwords.check(*credentials):
                return web.Response(status=401, text="Unauthorized\n", headers={
                    "WWW-Authenticate": f'Basic realm="{REALM}"'})
        return await handler(request)
