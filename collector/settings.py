"""How a collector setting is declared once and read from every source.

A setting is a dataclass field made with `setting`: its default, help, parser and,
derived from its name unless given, its YAML key (the name), command-line flag
(``--name-with-dashes``) and environment variable (``GRADWATCH_NAME``). A field whose
type is itself such a dataclass (``limits``) is a section: YAML ``limits.max_jobs``,
flag ``--limits.max-jobs``, variable ``GRADWATCH_LIMITS_MAX_JOBS``.

`Sources` collects raw values (YAML file, then variables, then flags: later wins;
list settings are combined) and `Sources.build` parses every one, reporting all
errors at once, each naming the setting and where its value came from. Parsers take
a YAML value or a string and raise ``ValueError`` with a short reason.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Parser = Callable[[Any], Any]


@dataclass(frozen=True)
class Setting:
    """The user-facing side of one field (see the module docstring for derived names)."""

    help: str
    parse: Parser
    flag: str = ""
    env: str = ""
    metavar: str = ""
    #: A list: values from every source are combined (a repeatable flag, a
    #: comma-separated variable, a YAML list).
    repeatable: bool = False
    #: A file path: relative to the YAML file's folder when it comes from there.
    path: bool = False


def setting(default: Any, help: str, parse: Parser, **options: Any) -> Any:
    """A dataclass field declaring a setting (``options``: the other `Setting` fields)."""
    declaration = Setting(help, parse, **options)
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default),
                                 metadata={"setting": declaration})
    return dataclasses.field(default=default, metadata={"setting": declaration})


@dataclass(frozen=True)
class Declared:
    """A setting with its derived names. ``key`` is its YAML path (``limits.max_jobs``)."""

    key: str
    attribute: str
    section: str
    default: Any
    setting: Setting

    @property
    def flag(self) -> str:
        if self.setting.flag:
            return self.setting.flag
        name = self.attribute.replace("_", "-")
        return f"--{self.section}.{name}" if self.section else f"--{name}"

    @property
    def env(self) -> str:
        return self.setting.env or "GRADWATCH_" + self.key.replace(".", "_").upper()

    @property
    def dest(self) -> str:
        return "setting:" + self.key


def declared(config_type: type, section: str = "") -> Iterator[Declared]:
    """Every setting of ``config_type`` and its sections, in declaration order."""
    for field in dataclasses.fields(config_type):
        if "setting" in field.metadata:
            default = (field.default_factory() if field.default is dataclasses.MISSING
                       else field.default)
            key = f"{section}.{field.name}" if section else field.name
            yield Declared(key, field.name, section, default, field.metadata["setting"])
        elif "section" in field.metadata:
            yield from declared(field.metadata["section"], field.name)


def section(config_type: type) -> Any:
    """A dataclass field holding a section of settings (all defaults)."""
    return dataclasses.field(default_factory=config_type, metadata={"section": config_type})


def add_flags(parser: argparse.ArgumentParser, config_type: type) -> None:
    """One flag per setting; its help shows the variable, the YAML key and the default."""
    for item in declared(config_type):
        default = item.default if item.default not in (None, [], "") else "none"
        parser.add_argument(
            item.flag, dest=item.dest, metavar=item.setting.metavar or item.attribute.upper(),
            action="append" if item.setting.repeatable else "store",
            help=f"{item.setting.help} (env {item.env}"
                 f"{', comma-separated' if item.setting.repeatable else ''}, YAML {item.key}; "
                 f"default: {default})")


class Sources:
    """Raw values of settings and where each came from, merged in the order given."""

    def __init__(self, config_type: type) -> None:
        self.config_type = config_type
        self.settings = {item.key: item for item in declared(config_type)}
        self.raw: dict[str, list[tuple[Any, str]]] = {}
        self.errors: list[str] = []

    def _put(self, key: str, value: Any, source: str) -> None:
        if self.settings[key].setting.repeatable:
            self.raw.setdefault(key, []).append((value, source))
        else:
            self.raw[key] = [(value, source)]

    def add_mapping(self, data: Mapping[str, Any], source: str, folder: Path | None = None,
                    ignore: tuple[str, ...] = ()) -> None:
        """Values from a parsed YAML file (``folder``: where relative paths start)."""
        sections = {item.section for item in self.settings.values() if item.section}
        for key, value in data.items():
            if key in ignore:
                continue
            if key in sections:
                if not isinstance(value, dict):
                    self.errors.append(f"{key}: expected a mapping, got {value!r} "
                                       f"(from {source})")
                    continue
                for name, item_value in value.items():
                    self._add_known(f"{key}.{name}", item_value, source, folder)
            else:
                self._add_known(key, value, source, folder)

    def _add_known(self, key: str, value: Any, source: str, folder: Path | None) -> None:
        item = self.settings.get(key)
        if item is None:
            prefix = key.rpartition(".")[0]
            known = sorted(k.rpartition(".")[2] for k in self.settings
                           if k.rpartition(".")[0] == prefix)
            self.errors.append(f"{key}: unknown setting (from {source}); known: "
                               f"{', '.join(known)}")
            return
        if item.setting.repeatable:
            if not isinstance(value, list):
                self.errors.append(f"{key}: expected a list, got {value!r} (from {source})")
                return
            for element in value:
                self._put(key, element, source)
            return
        if item.setting.path and folder is not None and isinstance(value, str):
            value = str(folder / value)
        self._put(key, value, source)

    def add_environment(self, environ: Mapping[str, str]) -> None:
        """``GRADWATCH_*`` variables; set to an empty string counts as unset."""
        for key, item in self.settings.items():
            text = environ.get(item.env, "").strip()
            if not text:
                continue
            if item.setting.repeatable:
                for element in (e.strip() for e in text.split(",")):
                    if element:
                        self._put(key, element, item.env)
            else:
                self._put(key, text, item.env)

    def add_flags(self, args: argparse.Namespace) -> None:
        for key, item in self.settings.items():
            value = getattr(args, item.dest, None)
            if value is None:
                continue
            for element in value if item.setting.repeatable else [value]:
                self._put(key, element, item.flag)

    def build(self) -> Any:
        """The config with every value parsed; raises `SettingsErrors` listing every
        invalid one (and those found while reading the sources)."""
        values: dict[str, Any] = {}
        errors = list(self.errors)
        for key, entries in self.raw.items():
            parse = self.settings[key].setting.parse
            parsed = []
            for value, source in entries:
                try:
                    parsed.append(parse(value))
                except ValueError as error:
                    errors.append(f"{key} = {value!r} (from {source}): {error}")
            if self.settings[key].setting.repeatable:
                values[key] = parsed
            elif parsed:
                values[key] = parsed[0]
        if errors:
            raise SettingsErrors(errors)
        return _construct(self.config_type, values)

    def source_of(self, key: str) -> str:
        """Where the value of ``key`` came from ("default" when from nowhere)."""
        entries = self.raw.get(key)
        return entries[-1][1] if entries else "default"


def _construct(config_type: type, values: Mapping[str, Any], section: str = "") -> Any:
    arguments = {}
    for field in dataclasses.fields(config_type):
        key = f"{section}.{field.name}" if section else field.name
        if "section" in field.metadata:
            arguments[field.name] = _construct(field.metadata["section"], values, key)
        elif key in values:
            arguments[field.name] = values[key]
    return config_type(**arguments)


class SettingsErrors(ValueError):
    """Invalid settings; ``errors`` has one line each."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("; ".join(errors))
        self.errors = errors


# -- parsers ---------------------------------------------------------------------------------

def number(kind: type, minimum: float = 0, *, above: bool = False) -> Parser:
    """An int or float (YAML number or text), at least ``minimum`` (above it with
    ``above``). YAML integers are fine for floats; booleans are not numbers."""
    name = "an integer" if kind is int else "a number"

    def parse(value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError(f"expected {name}")
        if kind is int and isinstance(value, float):
            raise ValueError(f"expected {name}")
        try:
            result = kind(value)
        except ValueError:
            raise ValueError(f"expected {name}") from None
        if isinstance(result, float) and not math.isfinite(result):
            raise ValueError("expected a finite number")
        if result < minimum or (above and result == minimum):
            raise ValueError(f"must be {'above' if above else 'at least'} {minimum:g}")
        return result

    return parse


def text(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError("expected a non-empty string")
    return value


def address(value: Any) -> str:
    """``HOST:PORT`` (port 0 picks a free one)."""
    if not isinstance(value, str):
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    split_host_port(value)
    return value


def url(value: Any) -> str:
    """An ``http://`` or ``https://`` URL with a host, a valid port if any, and no
    whitespace (a list of several goes comma-separated in a variable)."""
    if not text(value).startswith(("http://", "https://")):
        raise ValueError("must start with http:// or https://")
    if any(c.isspace() for c in value):
        raise ValueError("must not contain whitespace (separate several URLs with commas)")
    parsed = urllib.parse.urlsplit(value)
    if not parsed.hostname:
        raise ValueError("has no host")
    try:
        parsed.port  # noqa: B018  (raises on a port out of range or not a number)
    except ValueError as error:
        raise ValueError(f"bad port: {error}") from None
    return value


def split_host_port(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"expected HOST:PORT, got {address!r}")
    if int(port) > 65535:
        raise ValueError(f"port {int(port)} out of range (0 to 65535) in {address!r}")
    return host.strip("[]") or "0.0.0.0", int(port)
