"""Who may report which training job: bearer tokens scoped to jobs, from a file.

The tokens file (``--tokens-file``) is YAML::

    tokens:
      - name: team-vision            # appears in logs and errors, never the token
        sha256: 9f86d08...           # hex SHA-256 of the token (or ``token: <plain text>``)
        training_jobs: ["vision-*"]  # shell-style patterns of the jobs it may write

Agents send ``authorization: Bearer <token>`` with ``Register`` and ``Report``.
No or an unknown token: ``UNAUTHENTICATED``; a token whose patterns do not
match the job: ``PERMISSION_DENIED``. The file is checked for changes at most
once a second and re-read, so tokens are added, rotated and revoked without a
restart; a stream whose token was revoked is rejected at its next batch. A
file that fails to load keeps the previous tokens (and logs why, without them).

Runs on the collector's event loop only.
"""

from __future__ import annotations

import fnmatch
import hashlib
import logging
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import yaml

from gradwatch.collector.ingest import InvalidReport, Reason

log = logging.getLogger(__name__)

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class TokensFileError(ValueError):
    """The tokens file is invalid; the message names the entry and field."""


@dataclass(frozen=True)
class Grant:
    name: str
    training_jobs: tuple[str, ...]

    def allows(self, training_job: str) -> bool:
        return any(fnmatch.fnmatchcase(training_job, p) for p in self.training_jobs)


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def load_tokens(path: str | os.PathLike) -> dict[str, Grant]:
    """Grants by token digest; raises TokensFileError."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as error:
        raise TokensFileError(f"{path}: {error}") from None
    except yaml.YAMLError as error:  # its message may quote a token: give the place only
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise TokensFileError(f"{path}: invalid YAML{where}") from None
    if not isinstance(data, dict) or set(data) != {"tokens"} or not isinstance(
            data["tokens"], list):
        raise TokensFileError(f"{path}: expected a mapping with one key, tokens: a list")
    grants: dict[str, Grant] = {}
    for i, entry in enumerate(data["tokens"]):
        where = f"{path}: tokens[{i}]"
        if not isinstance(entry, dict):
            raise TokensFileError(f"{where}: expected a mapping")
        unknown = set(entry) - {"name", "token", "sha256", "training_jobs"}
        if unknown:
            raise TokensFileError(f"{where}: unknown field {sorted(unknown)[0]!r}")
        name = entry.get("name")
        if not isinstance(name, str) or not name:
            raise TokensFileError(f"{where}.name: required")
        if ("token" in entry) == ("sha256" in entry):
            raise TokensFileError(f"{where} ({name}): give exactly one of token and sha256")
        if "token" in entry:
            if not isinstance(entry["token"], str) or len(entry["token"]) < 16:
                raise TokensFileError(f"{where} ({name}).token: at least 16 characters")
            key = digest(entry["token"])
        else:
            key = str(entry["sha256"]).lower()
            if not _SHA256.match(key):
                raise TokensFileError(f"{where} ({name}).sha256: expected 64 hex digits")
        jobs = entry.get("training_jobs")
        if not isinstance(jobs, list) or not jobs or not all(
                isinstance(j, str) and j for j in jobs):
            raise TokensFileError(f"{where} ({name}).training_jobs: a non-empty list of "
                                  "patterns")
        if key in grants:
            raise TokensFileError(f"{where} ({name}): same token as {grants[key].name!r}")
        grants[key] = Grant(name, tuple(jobs))
    return grants


def bearer_token(metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
            return value.removeprefix("Bearer ").strip()
    return None


class TokenAuthority:
    """Checks bearer tokens against the tokens file (see the module docstring)."""

    def __init__(self, path: str | os.PathLike, check_interval_s: float = 1.0) -> None:
        self.path = Path(path)
        self.check_interval_s = check_interval_s
        self._grants = load_tokens(self.path)  # invalid at start: the collector refuses
        self._stamp = self._file_stamp()
        self._checked_at = time.monotonic()

    def _file_stamp(self) -> tuple[float, int] | None:
        try:
            stat = self.path.stat()
        except OSError:
            return None
        return stat.st_mtime, stat.st_size

    def _maybe_reload(self) -> None:
        now = time.monotonic()
        if now - self._checked_at < self.check_interval_s:
            return
        self._checked_at = now
        stamp = self._file_stamp()
        if stamp == self._stamp:
            return
        self._stamp = stamp
        try:
            self._grants = load_tokens(self.path)
        except TokensFileError as error:
            log.error("tokens file not reloaded, keeping the previous tokens: %s", error)
            return
        log.info("tokens file reloaded: %d tokens", len(self._grants))

    def authorize(self, token_digest: str | None, training_job: str) -> str:
        """The grant's name if the token (by `digest`) may write ``training_job``;
        raises `InvalidReport` (UNAUTHENTICATED or PERMISSION_DENIED) otherwise."""
        self._maybe_reload()
        if token_digest is None:
            raise InvalidReport(grpc.StatusCode.UNAUTHENTICATED,
                                "missing token: send 'authorization: Bearer <token>' metadata",
                                Reason.UNAUTHENTICATED)
        grant = self._grants.get(token_digest)
        if grant is None:
            raise InvalidReport(grpc.StatusCode.UNAUTHENTICATED, "unknown or revoked token",
                                Reason.UNAUTHENTICATED)
        if not grant.allows(training_job):
            raise InvalidReport(grpc.StatusCode.PERMISSION_DENIED,
                                f"token {grant.name!r} may not report training job "
                                f"{training_job!r}", Reason.NOT_PERMITTED)
        return grant.name

    @staticmethod
    def caller(context: grpc.aio.ServicerContext) -> str | None:
        """The digest of the call's bearer token, if it sent one."""
        token = bearer_token(context.invocation_metadata())
        return None if token is None else digest(token)
