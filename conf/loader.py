"""Read a TOML config file into the frozen dataclasses of conf.schema, and print one back.

Every problem is a ConfigError that names the file, the key and what is wrong, in one line:
unknown sections and keys (with a "did you mean"), wrong types, bad sizes, durations and
addresses, integers out of range. Relative paths are taken from the working directory at
load time and stored absolute, so the rest of the program never depends on the cwd.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

from conf.schema import Config
from conf.values import (
    Duration,
    IPAddress,
    ListenAddress,
    Size,
    format_duration,
    format_size,
    parse_duration,
    parse_ip,
    parse_listen,
    parse_size,
)

DEFAULT_PATH = Path("/etc/postroom/postroom.toml")

# How the file spells a type in "expected ..." messages.
_TYPE_NAMES = {str: "a string", int: "an integer", bool: "true or false", Path: "a path string"}


class ConfigError(Exception):
    """A config file that cannot be used; str() is the one line to show the sysadmin."""

    def __init__(self, source: Path | str, key: str | None, problem: str):
        self.source, self.key, self.problem = str(source), key, problem
        where = f"{self.source}: {key}" if key else self.source
        super().__init__(f"{where}: {problem}")


def load(path: Path | str) -> Config:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError(path, None, f"cannot read config file: {e.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(path, None, f"not UTF-8 (byte {e.start})") from None
    return loads(text, source=path)


def loads(text: str, source: Path | str = "<config>") -> Config:
    try:
        table = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(source, _key_at_error(text, str(e)), f"invalid TOML: {e}") from None
    sections = {}
    known = _known_fields(Config)
    for name, value in table.items():
        if name not in known:
            raise ConfigError(source, name, f"unknown section{_suggest(name, known)}")
        if not isinstance(value, dict):
            raise ConfigError(source, name, f"expected a [{name}] section, got {_describe(value)}")
        sections[name] = _build(known[name].type, value, name, source)
    config = Config(**sections)
    # What one key cannot say alone: keys that go together, defaults that do not fit here.
    for name in known:
        section = getattr(config, name)
        for key, problem in getattr(section, "problems", lambda: [])():
            raise ConfigError(source, f"{name}.{key}", problem)
    return dataclasses.replace(config, source=Path(source))


class _Key(typing.NamedTuple):
    type: Any
    metadata: typing.Mapping[str, Any]


def _known_fields(cls: type) -> dict[str, _Key]:
    """The file's keys of a schema class, with their resolved types."""
    hints = typing.get_type_hints(cls)
    return {
        f.name: _Key(hints[f.name], f.metadata)
        for f in dataclasses.fields(cls)
        if not f.metadata.get("internal")
    }


def _build(cls: type, table: dict[str, Any], section: str, source: Path | str) -> Any:
    known = _known_fields(cls)
    values = {}
    for key, raw in table.items():
        dotted = f"{section}.{key}"
        if key not in known:
            raise ConfigError(source, dotted, f"unknown key{_suggest(key, known)}")
        f = known[key]
        try:
            value = _coerce(f.type, raw)
            _check_range(f, value)
            if "check" in f.metadata:
                f.metadata["check"](value)
        except ValueError as e:
            raise ConfigError(source, dotted, str(e)) from None
        values[key] = value
    return cls(**values)


def _coerce(tp: Any, raw: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _coerce(args[0], raw)
    if origin is tuple:
        (item,) = typing.get_args(tp)[:1]
        if isinstance(raw, str):
            raw = [raw]  # a single "host:port" is a list of one; sysadmins write it either way
        if not isinstance(raw, list):
            raise ValueError(f"expected a list, got {_describe(raw)}")
        out = []
        for i, element in enumerate(raw):
            try:
                out.append(_coerce(item, element))
            except ValueError as e:
                raise ValueError(f"item {i + 1}: {e}") from None
        return tuple(out)
    if origin is dict:
        key_type, value_type = typing.get_args(tp)
        if not isinstance(raw, dict):
            raise ValueError(f"expected a table, got {_describe(raw)}")
        out = {}
        for key, element in raw.items():
            try:
                out[_coerce(key_type, key)] = _coerce(value_type, element)
            except ValueError as e:
                raise ValueError(f"{key!r}: {e}") from None
        return out
    if origin is Literal:
        choices = typing.get_args(tp)
        if raw not in choices:
            raise ValueError(f"expected one of {', '.join(map(repr, choices))}, got {raw!r}")
        return raw
    parser = {Size: parse_size, Duration: parse_duration, ListenAddress: parse_listen, IPAddress: parse_ip}.get(tp)
    if parser:
        return parser(raw)
    if tp is Path:
        if not isinstance(raw, str) or not raw:
            raise ValueError(f"expected a path string, got {_describe(raw)}")
        if not raw.isprintable():
            raise ValueError(f"path contains control characters: {raw!r}")
        return Path(os.path.abspath(os.path.expanduser(raw)))
    if tp is bool:
        if not isinstance(raw, bool):
            raise ValueError(f"expected true or false, got {_describe(raw)}")
        return raw
    if tp is float:
        if not isinstance(raw, (int, float)) or isinstance(raw, bool):
            raise ValueError(f"expected a number, got {_describe(raw)}")
        return float(raw)
    if tp in (int, str):
        if not isinstance(raw, tp) or isinstance(raw, bool):
            raise ValueError(f"expected {_TYPE_NAMES[tp]}, got {_describe(raw)}")
        return raw
    raise TypeError(f"conf.schema uses an unsupported type {tp!r}")


def _check_range(f: _Key, value: Any) -> None:
    low, high = f.metadata.get("min"), f.metadata.get("max")
    if low is not None and value < low or high is not None and value > high:
        raise ValueError(f"{value} out of range {low}-{high}")


def _key_at_error(text: str, message: str) -> str | None:
    """The dotted key on the line a TOML error names (tomllib says only "line N")."""
    m = re.search(r"line (\d+)", message)
    if not m:
        return None
    lines = text.splitlines()
    number = int(m.group(1))
    if not 1 <= number <= len(lines):
        return None
    key = lines[number - 1].split("=", 1)[0].strip()
    section = next((line.strip()[1:-1].strip() for line in reversed(lines[: number - 1])
                    if line.strip().startswith("[") and line.strip().endswith("]")), None)
    if not key or key.startswith("["):
        return None
    return f"{section}.{key}" if section else key


def _describe(value: Any) -> str:
    kind = {str: "string", bool: "boolean", int: "integer", float: "number", list: "list", dict: "table"}
    return f"{kind.get(type(value), type(value).__name__)} {value!r}"


def _suggest(name: str, known: dict[str, Any]) -> str:
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f" (known: {', '.join(known)}){hint}"


def dump(config: Config) -> str:
    """The effective config as TOML, every key present; `loads(dump(c)) == c`."""
    lines = []
    if config.source:
        lines.append(f"# effective config loaded from {config.source}")
    for name, section_field in _known_fields(Config).items():
        section = getattr(config, name)
        lines.append(f"\n[{name}]")
        for key in _known_fields(section_field.type):
            value = getattr(section, key)
            if value is None:
                lines.append(f"# {key} is not set")
            else:
                lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join(lines).lstrip("\n") + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_toml_value(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Size):
        return _toml_value(format_size(value))
    if isinstance(value, Duration):
        return _toml_value(format_duration(value))
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    text = str(value)
    escaped = "".join(
        "\\\\" if c == "\\" else '\\"' if c == '"' else c if c.isprintable() else f"\\u{ord(c):04x}" for c in text
    )
    return f'"{escaped}"'
