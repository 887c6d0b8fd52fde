"""Every setting of the agent, declared once: argument name, ``GRADWATCH_*`` variable,
type, range and default.

`AgentSettings.resolve` merges the two sources (an argument that is not ``None``
wins over the environment), then checks every value and reports all that are wrong
at once (`SettingsError`), each naming the setting and where it came from. A monitor
that gets a `SettingsError` disables itself with one log line.

The rule: a value is checked here against everything that would later refuse it (the
wire's types, the collector's always-refused characters, what gRPC accepts in a
header, memory), so no bad value gets as far as a background error or a traceback.
The parsers (`parse_task_index`, `parse_label`) also check what launchers say
(identity).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from gradwatch.agent.core.endpoints import parse_targets

DEFAULT_COLLECTOR = "127.0.0.1:8470"
#: Host memory for statistics the collector has not acknowledged yet: 10 minutes of a
#: 1,000-variable, one-replica job at 10 steps/s is 6,000 steps x 13 kB = 78 MB.
DEFAULT_MAX_BUFFER_BYTES = 128 * 2**20
#: ``task_index`` is a uint32 on the wire.
MAX_TASK_INDEX = 2**32 - 1
#: Device buffer rows per session the user may ask for (each row holds one step of
#: every variable: 65,536 rows of 1,000 variables take 850 MB).
MAX_BUFFER_STEPS = 2**16

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


class SettingsError(ValueError):
    """One or more settings are invalid; ``errors`` has one line per setting."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("; ".join(errors))
        self.errors = errors


def _flag(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"expected one of {', '.join(_TRUE)} or {', '.join(_FALSE)}")


def _number(kind: type, minimum: float, *, above: bool = False,
            maximum: float | None = None) -> Callable[[Any], Any]:
    """Parses an int or float, at least ``minimum`` (or above it, with ``above``) and at
    most ``maximum``; an int must be a whole number (``2.5`` is refused, not rounded)."""
    expected = "an integer" if kind is int else "a number"

    def parse(value: Any) -> Any:
        if isinstance(value, bool):
            raise ValueError(f"expected {expected}")
        try:
            number = float(value) if kind is float or isinstance(value, float) else int(value)
        except Exception:  # whatever the type: not a number
            raise ValueError(f"expected {expected}") from None
        if number != number or number in (float("inf"), float("-inf")):
            raise ValueError("expected a finite number")
        if kind is int:
            if number != int(number):
                raise ValueError(f"expected {expected}")
            number = int(number)
        if number < minimum or (above and number == minimum):
            raise ValueError(f"must be {'above' if above else 'at least'} {minimum:g}")
        if maximum is not None and number > maximum:
            raise ValueError(f"must be at most {maximum:g}")
        return number
    return parse


def _text(value: Any) -> str:
    text = str(value).strip()
    if not text:
        raise ValueError("must not be empty")
    return text


def parse_label(value: Any) -> str:
    """A name the collector shows and labels with (job, task type, host): text without
    control characters, which every collector refuses."""
    if not isinstance(value, str):
        raise ValueError(f"expected text, not {type(value).__name__}")
    text = _text(value)
    if any(ord(c) < 32 or 127 <= ord(c) < 160 for c in text):
        raise ValueError("must not contain control characters")
    return text


#: A task's index: a whole number from 0 to `MAX_TASK_INDEX`.
parse_task_index = _number(int, 0, maximum=MAX_TASK_INDEX)


def parse_token(value: Any) -> str:
    """A bearer token: what gRPC accepts in a header (printable ASCII), without spaces."""
    text = _text(value)
    if not all("!" <= c <= "~" for c in text):
        raise ValueError("a bearer token is printable ASCII without spaces")
    return text


def _collector(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected text, not {type(value).__name__}")
    parse_targets(value)  # raises ValueError naming the bad address
    return value


def shown(value: Any, limit: int = 60) -> str:
    """``repr(value)`` for a message: at most ``limit`` characters, never raising."""
    try:
        text = repr(value)
    except Exception:  # e.g. an int of more than 4,300 digits
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


#: The collector's variables close to an agent's: an environment may hold both, and these
#: are no typos (the agent does not import the collector; a test keeps this complete).
COLLECTOR_LOOKALIKES = frozenset({"GRADWATCH_GRPC_TLS_CERT_FILE", "GRADWATCH_GRPC_TLS_KEY_FILE",
                                  "GRADWATCH_TOKENS_FILE"})


def setting(default: Any, env: str, parse: Callable[[Any], Any], *,
            invert: bool = False) -> Any:
    """A field of `AgentSettings`: read from ``env`` (``invert``: the variable says the
    opposite, as ``GRADWATCH_DISABLED`` does for ``enabled``), checked by ``parse``."""
    return dataclasses.field(default=default,
                             metadata={"env": env, "parse": parse, "invert": invert})


@dataclass(frozen=True)
class AgentSettings:
    """What a monitor is told; the README's table says what each does."""

    #: ``host:port``, a comma-separated list of replicas, or ``dns:///name:port``.
    collector: str = setting(DEFAULT_COLLECTOR, "GRADWATCH_COLLECTOR", _collector)
    #: Shared by all tasks of one run; None: from the launcher, else the script's name.
    training_job: str | None = setting(None, "GRADWATCH_TRAINING_JOB", parse_label)
    task_type: str | None = setting(None, "GRADWATCH_TASK_TYPE", parse_label)
    task_index: int | None = setting(None, "GRADWATCH_TASK_INDEX", parse_task_index)
    #: False (``GRADWATCH_DISABLED=1``) turns every call into a no-op.
    enabled: bool = setting(True, "GRADWATCH_DISABLED", _flag, invert=True)
    #: Explain missing gradients (the front end's diagnosis hooks).
    diagnose: bool = setting(True, "GRADWATCH_DIAGNOSE", _flag)
    #: On-device ring buffer per session, in steps; None: as many as fit in 4 MiB per
    #: replica, 16 to 1,024 (`gradwatch.agent.core.session.ring_capacity`).
    buffer_steps: int | None = setting(None, "GRADWATCH_BUFFER_STEPS",
                                       _number(int, 1, maximum=MAX_BUFFER_STEPS))
    #: Statistics (norms, NaN/Inf counts) at every Nth optimizer step only, to trade
    #: resolution for cost on millisecond steps; 1 (the default): every step. Which
    #: gradients are missing is still reported from the first step on (docs/limits.md).
    statistics_every: int = setting(1, "GRADWATCH_STATISTICS_EVERY",
                                    _number(int, 1, maximum=1_000_000))
    #: Host memory for steps not yet acknowledged, over all sessions.
    max_buffer_bytes: int = setting(DEFAULT_MAX_BUFFER_BYTES, "GRADWATCH_MAX_BUFFER_BYTES",
                                    _number(int, 0))
    #: How often statistics leave the device, in seconds (at least 1 ms: less would keep
    #: the sender thread spinning).
    flush_interval_s: float = setting(0.25, "GRADWATCH_FLUSH_INTERVAL", _number(float, 0.001))
    #: A collector that acknowledges nothing for this long is left for another (at least
    #: 0.1 s: less would leave a healthy collector at every batch).
    ack_timeout_s: float = setting(10.0, "GRADWATCH_ACK_TIMEOUT", _number(float, 0.1))
    #: How often a preferred collector is checked while on a fallback.
    failback_interval_s: float = setting(30.0, "GRADWATCH_FAILBACK_INTERVAL",
                                         _number(float, 0.1))
    tls: bool = setting(False, "GRADWATCH_TLS", _flag)
    tls_ca_file: str | None = setting(None, "GRADWATCH_TLS_CA_FILE", _text)
    tls_cert_file: str | None = setting(None, "GRADWATCH_TLS_CERT_FILE", _text)
    tls_key_file: str | None = setting(None, "GRADWATCH_TLS_KEY_FILE", _text)
    token: str | None = setting(None, "GRADWATCH_TOKEN", parse_token)
    token_file: str | None = setting(None, "GRADWATCH_TOKEN_FILE", _text)

    @classmethod
    def resolve(cls, environ: Mapping[str, str] | None = None,
                **arguments: Any) -> AgentSettings:
        """Arguments that are not None, else ``environ`` (default ``os.environ``; a variable
        set to an empty string counts as unset, as Kubernetes' Downward API leaves a missing
        label), else the default; raises `SettingsError` listing every invalid value."""
        environ = os.environ if environ is None else environ
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(arguments) - set(fields))
        if unknown:
            raise TypeError(f"unknown gradwatch settings: {', '.join(unknown)}")
        values, sources, errors = {}, {}, []
        for name, field in fields.items():
            meta = field.metadata
            if arguments.get(name) is not None:
                raw, source = arguments[name], f"argument {name}"
            elif environ.get(meta["env"], "").strip():  # set and not empty
                raw, source = environ[meta["env"]], meta["env"]
            else:
                continue
            sources[name] = source
            try:
                value = meta["parse"](raw)
                values[name] = (not value) if meta["invert"] and source == meta["env"] else value
            except Exception as error:  # whatever the value was: report it, never raise
                errors.append(f"{name} = {shown(raw)} (from {source}): {error}")
        settings = cls(**values)
        if bool(settings.tls_cert_file) != bool(settings.tls_key_file):
            given, missing = (("tls_cert_file", "tls_key_file") if settings.tls_cert_file
                              else ("tls_key_file", "tls_cert_file"))
            errors.append(f"{given} is set (from {sources[given]}) but {missing} is not: a "
                          "client certificate needs both")
        if errors:
            raise SettingsError(errors)
        return settings

    @classmethod
    def misspelt_variables(cls, environ: Mapping[str, str] | None = None) -> dict[str, str]:
        """Set ``GRADWATCH_*`` variables that are no setting but close to one (a typo, as
        ``GRADWATCH_COLECTOR``), each with the setting's variable; the collector's own
        (``GRADWATCH_GRPC_TLS_CERT_FILE``), which may share an environment, are none."""
        environ = os.environ if environ is None else environ
        known = list(cls.environment_variables().values())
        found = {}
        for name in environ:
            if name.startswith("GRADWATCH_") and name not in known:
                close = difflib.get_close_matches(name, known, n=1, cutoff=0.85)
                if close and name not in COLLECTOR_LOOKALIKES:
                    found[name] = close[0]
        return found

    @classmethod
    def environment_variables(cls) -> dict[str, str]:
        """Setting name → its variable (for documentation and tests)."""
        return {f.name: f.metadata["env"] for f in dataclasses.fields(cls)}
