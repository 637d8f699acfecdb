"""The tree's imports run one way (../shared/DESIGN.md, Layout): no module imports, even
inside a function, one that imports it back; each floor imports only the floors below it;
the daemons never import each other and reach storage through its face (`storage`) alone."""

from __future__ import annotations

import ast
import functools
import importlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@functools.cache
def _import_nodes(path: Path) -> tuple[ast.Import | ast.ImportFrom, ...]:
    """`path`'s import statements, at any depth of its code: parsed once per run, not once
    per package asked about (the tests below ask about eight for each file)."""
    tree = ast.parse(path.read_text())
    return tuple(node for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom)))


def _imports(path: Path, package: str) -> set[str]:
    """The modules of `package` that `path` imports, at any depth of its code."""
    found = set()
    for node in _import_nodes(path):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == package:
                found |= {f"{package}.{alias.name}" for alias in node.names}  # a module, or a name of the face
            elif node.module.startswith(package + "."):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith(package + ".")}
    return found


PACKAGES = ("postroom", "mtad", "imapd", "pop3d", "cluster", "storage", "policy", "wire", "conf")
# What each package may import from the others: the floors, top to bottom.
MAY_IMPORT = {
    "postroom": {"mtad", "imapd", "pop3d", "cluster", "storage", "policy", "wire", "conf"},
    "mtad": {"cluster", "storage", "policy", "wire", "conf"},  # cluster.view: the owners of shards
    # The shared accounts' mirror writes storage's own records (storage.accounts): cluster is
    # storage's placement, below the daemons, and reaches past the face for that alone.
    "cluster": {"storage", "wire", "conf"},
    "imapd": {"storage", "policy", "wire", "conf"},
    "pop3d": {"storage", "policy", "wire", "conf"},
    "storage": {"wire", "conf"},  # wire.metrics: fsync latency
    "policy": {"wire", "conf"},
    "wire": {"conf"},
    "conf": set(),
}


def _modules(package: str) -> dict[str, Path]:
    """Every module of `package`, its subpackages' (mtad.outbound) included."""
    return {".".join((package, *p.relative_to(ROOT / package).with_suffix("").parts)): p
            for p in (ROOT / package).rglob("*.py") if p.stem != "__init__"}


def _graph(packages=PACKAGES) -> dict[str, set[str]]:
    modules = {name: path for package in packages for name, path in _modules(package).items()}
    graph = {}
    for name, path in modules.items():
        found: set[str] = set()
        for package in PACKAGES:
            found |= _imports(path, package)
        graph[name] = found & modules.keys() - {name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, str] = {}

    def visit(name: str, path: list[str]) -> list[str] | None:
        state[name] = "open"
        for target in sorted(graph[name]):
            if state.get(target) == "open":
                return path[path.index(target):] + [target]
            if target not in state and (found := visit(target, path + [target])):
                return found
        state[name] = "done"
        return None

    for name in sorted(graph):
        if name not in state and (found := visit(name, [name])):
            return found
    return None


def test_storage_has_no_import_cycle():
    graph = _graph(("storage",))
    assert len(graph) > 15, "storage's modules were not found"
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_the_tree_has_no_import_cycle():
    graph = _graph()
    assert len(graph) > 60, "the tree's modules were not found"
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_each_package_imports_only_the_floors_below_it():
    offenders = []
    for package in PACKAGES:
        if not (ROOT / package).is_dir():
            continue
        for path in sorted((ROOT / package).rglob("*.py")):
            for other in PACKAGES:
                if other != package and other not in MAY_IMPORT[package] and _imports(path, other) | (
                        {other} if _imports_package(path, other) else set()):
                    offenders.append(f"{path.relative_to(ROOT)} imports {other}")
    assert not offenders, offenders


def _imports_package(path: Path, package: str) -> bool:
    for node in _import_nodes(path):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in (package,):
            return True
        if isinstance(node, ast.Import) and any(a.name == package or a.name.startswith(package + ".")
                                                for a in node.names):
            return True
    return False


def test_the_cycle_finder_finds_one():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_daemons_import_the_face_of_storage_only():
    offenders = []
    for package in ("mtad", "imapd", "pop3d"):
        for path in sorted((ROOT / package).glob("**/*.py")):
            inner = _imports(path, "storage") - {f"storage.{name}" for name in _face()}
            offenders += [f"{path.relative_to(ROOT)}: {module}" for module in sorted(inner)]
    assert not offenders, offenders


def _face() -> set[str]:
    import storage

    return set(storage.__all__)


def test_the_storage_faces_names_for_editors_are_the_names_it_gives():
    """storage/__init__.py looks its names up on first use (_FACE); its TYPE_CHECKING imports
    say the same to editors and type checkers, and must not drift from it."""
    import storage

    tree = ast.parse((ROOT / "storage" / "__init__.py").read_text())
    checking = next(node for node in tree.body if isinstance(node, ast.If))
    named = {(alias.asname or alias.name): (node.module, alias.name)
             for node in checking.body for alias in node.names}
    given = {name: (module, storage._RENAMED.get(name, name)) for name, module in storage._MODULE_OF.items()}
    assert named == given
    for name in storage.__all__:
        module, attr = given[name]
        assert getattr(storage, name) is getattr(importlib.import_module(module), attr)
