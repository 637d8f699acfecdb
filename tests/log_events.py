"""The log events Postroom's code can write, read from its source: the first argument of each
`log.info("event", ...)`-style call (conf.logfmt.EventLogger's debug, info, warning, error),
also when the level is chosen (`(log.info if up else log.debug)("service", ...)`) or the event
is (`log.info("queue_held" if held else "queue_released", ...)`). An event passed in a variable
is not seen: docs/troubleshooting.md names only events written out in the code.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("postroom", "mtad", "imapd", "pop3d", "storage", "policy", "wire", "conf", "cluster")
LEVELS = ("debug", "info", "warning", "error")


@dataclass(frozen=True)
class Site:
    path: str  # relative to the repository
    line: int
    level: str


def events(root: Path = REPO) -> dict[str, list[Site]]:
    """Each event name the code logs, with where and at which level."""
    found: dict[str, list[Site]] = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            tree = ast.parse(path.read_text(), str(path))
            for node in ast.walk(tree):
                if not isinstance(node, ast.Call) or not node.args:
                    continue
                levels = levels_of(node.func)
                if not levels:
                    continue
                for name in _strings(node.args[0]):
                    for level in levels:
                        found.setdefault(name, []).append(Site(str(path.relative_to(root)), node.lineno, level))
    return found


def levels_of(func: ast.expr) -> list[str]:
    if isinstance(func, ast.Attribute) and func.attr in LEVELS:
        return [func.attr]
    if isinstance(func, ast.IfExp):
        return levels_of(func.body) + levels_of(func.orelse)
    return []


def _strings(arg: ast.expr) -> list[str]:
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        return [arg.value]
    if isinstance(arg, ast.IfExp):
        return _strings(arg.body) + _strings(arg.orelse)
    return []
