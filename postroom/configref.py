"""`postroom config reference`: every config key, as Markdown (docs/config.md).

Its sources, so that the reference cannot drift from what the loader accepts: the schema
(conf/schema.py: each key's type, default and range), what a reload keeps until a restart
(postroom/reload.py's RESTART_NEEDED) and the documented example (conf/postroom.toml: the
comment above each key says what it does). A comment block documents
the run of keys that follows it up to a blank line or the next comment, so keys that go
together (max_connections, max_connections_per_ip) share one. A commented-out key line
(`# ca_file = "/etc/postroom/extra-ca.pem"`) counts as the key's place in the example and is
shown as an example; a table-valued key may be a sub-table (`[outbound.routes]`).

`undocumented()` names the schema keys the example leaves without a comment: the command
exits 1 when there are any, and tests/test_config_reference.py fails on them.
"""

from __future__ import annotations

import dataclasses
import re
import sys
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import conf
from conf.loader import _toml_value as toml_value  # the loader's own TOML spelling of a value
from conf.schema import Config
from conf.values import Duration, IPAddress, ListenAddress, Size, format_duration

EXAMPLE = Path(conf.__file__).resolve().parent / "postroom.toml"

_SECTION = re.compile(r"^\[\s*([\w.-]+)\s*\]\s*(?:#.*)?$")
_KEY = re.compile(r"^([A-Za-z_][\w-]*)\s*=")


@dataclass
class KeyDoc:
    """What the example file says about one key."""
    prose: list[str] = field(default_factory=list)  # comment lines; "" separates paragraphs
    examples: list[str] = field(default_factory=list)  # commented-out TOML lines
    value: str | None = None  # the key's line in the example, when it is not commented out


@dataclass
class Example:
    preamble: list[str]  # the file's opening comment, without "# "
    keys: dict[tuple[str, str], KeyDoc]  # (section, key) -> its documentation


def parse_example(text: str, schema: type = Config) -> Example:
    """The comment blocks of an example config, attached to the keys they document."""
    sections = _fields(schema)
    preamble: list[str] = []
    keys: dict[tuple[str, str], KeyDoc] = {}
    comment: list[str] = []  # the comment block being read
    run: KeyDoc | None = None  # the doc the keys of the current run share
    section: str | None = None
    in_subtable = False  # inside [section.key]: its lines are the key's value
    started = False  # past the preamble

    def key_line(name: str, line: str, commented: bool) -> None:
        nonlocal run, comment
        if comment or run is None:
            run = KeyDoc(prose=_prose(comment))
            comment = []
        doc = keys.setdefault((section, name), KeyDoc(prose=run.prose))
        if not doc.prose:
            doc.prose = run.prose
        if commented:
            doc.examples.append(line)
        else:
            doc.value = line

    for raw in text.splitlines():
        line = raw.strip()
        if not started:
            if line.startswith("#"):
                preamble.append(_uncomment(line))
                continue
            if not line:
                if preamble:
                    started = True
                continue
            started = True
        if not line:
            comment, run = [], None
            continue
        header = _SECTION.match(line)
        if header:
            name = header.group(1)
            parent, _, sub = name.partition(".")
            if sub and parent in sections and sub in sections[parent]:
                section, in_subtable = parent, True
                key_line(sub, f"[{name}]", commented=False)
            else:
                section, in_subtable = name, False
            comment, run = [], None
            continue
        if line.startswith("#"):
            body = _uncomment(line)
            commented_key = _commented_key(body)
            if in_subtable and commented_key is not None:
                keys[(section, _subtable_key(section, keys))].examples.append(body)
            elif commented_key is not None and section in sections and commented_key in sections[section]:
                key_line(commented_key, body, commented=True)
            else:
                if run is not None and not comment:
                    run = None  # a comment after keys starts the next run's documentation
                comment.append(body)
            continue
        m = _KEY.match(line)
        if m and not in_subtable:
            key_line(m.group(1), line, commented=False)
    return Example(preamble=_trim(preamble), keys=keys)


def undocumented(example: Example, schema: type = Config) -> list[str]:
    """`section.key` of each schema key the example does not show, or shows with no comment."""
    missing = []
    for section, fields in _fields(schema).items():
        for key in fields:
            doc = example.keys.get((section, key))
            if doc is None or not any(doc.prose):
                missing.append(f"{section}.{key}")
    return missing


def reference(example: Example, schema: type = Config, source: str = "conf/postroom.toml") -> str:
    """docs/config.md."""
    out = [
        "# Config reference",
        "",
        "<!-- Generated by `postroom config reference` from conf/schema.py, postroom/reload.py and",
        f"     the comments of {source}. Do not edit: change those and run `make config-doc`. -->",
        "",
        "Every key of `/etc/postroom/postroom.toml`, section by section: its type, its default, the",
        "values it accepts and what it does. `postroom config check` validates a file and prints the",
        "effective config, defaults included. \"On reload\" says what `postroom reload` does with a",
        "changed key: applied to new sessions, or kept until a restart (and logged as",
        "`reload.restart_needed`). The example file this page is made from opens with:",
        "",
        "```text",
        *example.preamble,
        "```",
        "",
        "Sections: " + ", ".join(f"[`[{name}]`](#{name})" for name in _fields(schema)) + ".",
    ]
    hints = typing.get_type_hints(schema)
    for name in _dataclass_fields(schema):
        cls = hints[name]
        out += ["", f"## [{name}]", ""]
        if cls.__doc__ and not cls.__doc__.startswith(f"{cls.__name__}("):  # dataclass's made-up doc
            out += [_text(" ".join(cls.__doc__.split())), ""]
        cls_hints = typing.get_type_hints(cls)
        for group in _groups(name, _dataclass_fields(cls), example):
            docs = [example.keys.get((name, key), KeyDoc()) for key, _ in group]
            out += ["### " + ", ".join(f"`{name}.{key}`" for key, _ in group), "",
                    "| key | type | default | accepts | on reload |", "|---|---|---|---|---|"]
            for key, f in group:
                out.append(f"| `{key}` | {_type_name(cls_hints[key])} | {_default_text(f)} | "
                           f"{_range(cls_hints[key], f)} | {_on_reload(name, key)} |")
            out.append("")
            for paragraph in _paragraphs(docs[0].prose):
                out += [paragraph, ""]
            shown = [line for (_, f), doc in zip(group, docs, strict=True) for line in [*doc.examples, doc.value]
                     if line and not line.startswith("[") and line.split("=", 1)[1].strip() != _default_toml(f)]
            if shown:
                out += ["In the example: " + ", ".join(f"`{line}`" for line in shown), ""]
    text = "\n".join(out).rstrip("\n") + "\n"
    return re.sub(r"\n{3,}", "\n\n", text)


def config_reference(args: Any) -> int:
    """The command: the reference on stdout; exit 1 (after printing it) when a key has no comment."""
    path = Path(args.example) if args.example else EXAMPLE
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        print(f"postroom: {path}: {e.strerror}", file=sys.stderr)
        return 1
    example = parse_example(text)
    source = "conf/postroom.toml" if path == EXAMPLE else str(path)
    sys.stdout.write(reference(example, source=source))
    missing = undocumented(example)
    if missing:
        print(f"postroom: {path}: keys without a comment: {', '.join(missing)}", file=sys.stderr)
        return 1
    return 0


# -- types, defaults, ranges ------------------------------------------------------------------

def _groups(section: str, fields: dict[str, dataclasses.Field],
            example: Example) -> list[list[tuple[str, dataclasses.Field]]]:
    """The section's keys in schema order, those next to each other that share one comment
    block of the example together."""
    groups: list[list[tuple[str, dataclasses.Field]]] = []
    last = None
    for key, f in fields.items():
        doc = example.keys.get((section, key))
        prose = doc.prose if doc is not None and any(doc.prose) else None
        if groups and prose is not None and prose is last:
            groups[-1].append((key, f))
        else:
            groups.append([(key, f)])
        last = prose
    return groups


def _on_reload(section: str, key: str) -> str:
    from postroom.reload import RESTART_NEEDED  # what a reload keeps (postroom/reload.py)

    return "restart" if section in RESTART_NEEDED or f"{section}.{key}" in RESTART_NEEDED else "applied"


def _range(tp: Any, f: dataclasses.Field) -> str:
    low, high = f.metadata.get("min"), f.metadata.get("max")
    if low is None and high is None:
        return "0 or more" if tp in (Size, Duration) else "—"
    return f"{_bound(tp, low)} to {_bound(tp, high)}"


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return f"{_type_name(args[0])}, optional"
    if origin is tuple:
        return f"list of {_plural(typing.get_args(tp)[0])}"
    if origin is dict:
        key_type, value_type = typing.get_args(tp)
        return f"table of {_type_name(key_type)} = {_type_name(value_type)}"
    if origin is Literal:
        return "one of " + ", ".join(f"`{toml_value(c)}`" for c in typing.get_args(tp))
    return {Size: "size", Duration: "duration", ListenAddress: "listen address", IPAddress: "IP address",
            Path: "path", bool: "boolean", int: "integer", float: "number", str: "string"}[tp]


def _plural(tp: Any) -> str:
    name = _type_name(tp)
    return {"IP address": "IP addresses", "listen address": "listen addresses"}.get(name, name + "s")


def _default_text(f: dataclasses.Field) -> str:
    if f.default is dataclasses.MISSING and f.default_factory is not dataclasses.MISSING \
            and f.default_factory not in (dict, list, tuple):
        return "computed at start (see below)"  # the machine's host name, say
    value = _default_toml(f)
    return "not set" if value is None else f"`{value}`"


def _default_toml(f: dataclasses.Field) -> str | None:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory in (dict, list, tuple):
        value = f.default_factory()
    else:
        return None
    return None if value is None else toml_value(value)


def _bound(tp: Any, value: Any) -> str:
    if value is None:
        return "any"
    if tp is Duration:
        return f"`{toml_value(format_duration(value))}`"
    return f"`{value}`"


# -- the example's text -----------------------------------------------------------------------

def _fields(schema: type) -> dict[str, dict[str, dataclasses.Field]]:
    hints = typing.get_type_hints(schema)
    return {name: _dataclass_fields(hints[name]) for name in _dataclass_fields(schema)}


def _dataclass_fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}


def _uncomment(line: str) -> str:
    body = line[1:]
    return body[1:] if body.startswith(" ") else body


def _commented_key(body: str) -> str | None:
    """The key of a commented-out TOML line (`relay = "smtp.example.net:587"`), else None."""
    try:
        table = tomllib.loads(body)
    except tomllib.TOMLDecodeError:
        return None
    return next(iter(table)) if len(table) == 1 else None


def _subtable_key(section: str, keys: dict[tuple[str, str], KeyDoc]) -> str:
    return next(key for (s, key), doc in reversed(keys.items()) if s == section and doc.value
                and doc.value.startswith("["))


def _prose(lines: list[str]) -> list[str]:
    return [line.strip() for line in lines]


def _paragraphs(lines: list[str]) -> list[str]:
    paragraphs, current = [], []
    for line in [*lines, ""]:
        if line:
            current.append(line)
        elif current:
            paragraphs.append(_text(" ".join(current)))
            current = []
    return paragraphs


def _trim(lines: list[str]) -> list[str]:
    while lines and not lines[-1].strip():
        lines.pop()
    return lines


def _text(prose: str) -> str:
    """Prose as Markdown: "<data_dir>/srs.key" is text, not an HTML tag (CommonMark's
    backslash escapes)."""
    return prose.replace("<", "\\<").replace(">", "\\>")
