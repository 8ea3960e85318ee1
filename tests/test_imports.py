"""The packages' imports read one way: no cycles between modules, no other module's private names.

Reads the source with `ast` (nothing is imported): every `import` and `from ... import` in a module,
at module level or inside a function (an import moved into a function to dodge a cycle at run time
is still a cycle in the design), except those under `if TYPE_CHECKING:`. Relative imports are
resolved, and `from pkg import name` counts as importing `pkg.name` when that is a module.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("mpsearch", "hw_models", "search_spaces")


@dataclass
class Module:
    name: str
    path: Path
    is_package: bool
    # imported module -> names that tie them (the imported names, or the module itself)
    edges: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    # (line, text) of each use of another module's private name
    private: list[tuple[int, str]] = field(default_factory=list)


def _module_name(path: Path) -> tuple[str, bool]:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        return ".".join(parts[:-1]), True
    return ".".join(parts), False


def _modules() -> dict[str, Module]:
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            name, is_package = _module_name(path)
            modules[name] = Module(name, path, is_package)
    return modules


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _walk(tree: ast.AST):
    """Every node except those under `if TYPE_CHECKING:` (its `else:` branch is walked)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.append(node.test)
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def _ours(name: str, modules: dict[str, Module]) -> str | None:
    """The longest prefix of the dotted `name` that is one of our modules."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        prefix = ".".join(parts[:i])
        if prefix in modules:
            return prefix
    return None


def _resolve(mod: Module, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = mod.name.split(".")
    if not mod.is_package:
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _read(mod: Module, modules: dict[str, Module]) -> None:
    tree = ast.parse(mod.path.read_text(), filename=str(mod.path))
    # local name -> our module it is bound to (for `module._private` attribute access)
    aliases: dict[str, str] = {}
    for node in _walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = _ours(alias.name, modules)
                if target is None:
                    continue
                mod.edges[target].add(alias.name)
                if alias.asname:
                    aliases[alias.asname] = target
                else:
                    top = alias.name.split(".")[0]
                    aliases[top] = top
                if _is_private(alias.name.rsplit(".", 1)[-1]):
                    mod.private.append((node.lineno, f"import {alias.name}"))
        elif isinstance(node, ast.ImportFrom):
            source = _resolve(mod, node)
            target = _ours(source, modules)
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                if submodule in modules:
                    mod.edges[submodule].add(submodule)
                    aliases[alias.asname or alias.name] = submodule
                    continue
                if target is None:
                    continue
                mod.edges[target].add(alias.name)
                if _is_private(alias.name) and target != mod.name:
                    mod.private.append((node.lineno, f"from {source} import {alias.name}"))
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Attribute) and _is_private(node.attr)):
            continue
        chain = _dotted(node.value)
        if chain is None or chain[0] not in aliases:
            continue
        owner = ".".join([aliases[chain[0]], *chain[1:]])
        if owner in modules and owner != mod.name:
            mod.private.append((node.lineno, f"{'.'.join(chain)}.{node.attr}"))


def _dotted(node: ast.expr) -> list[str] | None:
    """`a.b.c` as ["a", "b", "c"]; None for anything but names and attributes."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return [node.id, *reversed(parts)]


def _graph() -> dict[str, Module]:
    """Every module with its imports of our modules. An import counts for the module it names only:
    importing `a.b.c` runs `a/__init__` too, but a package re-exporting its submodules is not a
    dependency of those submodules on it."""
    modules = _modules()
    for mod in modules.values():
        _read(mod, modules)
        mod.edges.pop(mod.name, None)
    return modules


def _cycles(modules: dict[str, Module]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    counter = 0

    def visit(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in modules[v].edges:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(modules):
        if v not in index:
            visit(v)
    return sorted(found)


def _describe(component: list[str], modules: dict[str, Module]) -> str:
    members = set(component)
    lines = [" <-> ".join(component)]
    for name in component:
        for target in sorted(set(modules[name].edges) & members):
            lines.append(f"    {name} -> {target}: {', '.join(sorted(modules[name].edges[target]))}")
    return "\n".join(lines)


def test_graph_sees_every_package():
    modules = _graph()
    assert {"mpsearch.cli", "mpsearch.deploy.build", "hw_models.profiles", "search_spaces.space"} <= set(
        modules
    )
    # the walk sees the imports (a broken walk would find no cycles because it found no edges),
    # those inside functions included
    assert "hw_models.precision" in modules["hw_models.cost"].edges
    assert {"mpsearch.scoring.evaluator", "mpsearch.deploy.verify"} <= set(modules["mpsearch.cli"].edges)


def test_walk_reads_relative_lazy_submodule_and_private_imports(tmp_path):
    source = tmp_path / "b.py"
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "from . import c\n"
        "from .c import _helper, __version__\n"
        "import pkg.d as d\n"
        "if TYPE_CHECKING:\n"
        "    from pkg.e import Thing\n"
        "def f():\n"
        "    from ..other import name\n"
        "    return c._private, d.public, d._hidden\n"
    )
    modules = {
        name: Module(name, tmp_path / f"{name}.py", False)
        for name in ("pkg.sub.b", "pkg.sub.c", "pkg.d", "pkg.e", "pkg.other")
    }
    modules["pkg.sub.b"].path = source
    _read(modules["pkg.sub.b"], modules)
    mod = modules["pkg.sub.b"]
    assert dict(mod.edges) == {
        "pkg.sub.c": {"pkg.sub.c", "_helper", "__version__"},
        "pkg.d": {"pkg.d"},
        "pkg.other": {"name"},
    }
    assert sorted(text for _, text in mod.private) == [
        "c._private",
        "d._hidden",
        "from pkg.sub.c import _helper",
    ]


def test_no_import_cycles():
    modules = _graph()
    cycles = _cycles(modules)
    assert not cycles, "import cycles between modules:\n" + "\n".join(_describe(c, modules) for c in cycles)


def test_no_private_imports():
    modules = _graph()
    found = [
        f"{mod.path.relative_to(ROOT)}:{line}: {text}"
        for mod in modules.values()
        for line, text in mod.private
    ]
    assert not found, "imports of another module's private name:\n" + "\n".join(sorted(found))


FACES = {"mpsearch", "mpsearch.api", "mpsearch.cli"}  # may import every part


def _part(name: str) -> str:
    """The part of mpsearch a module belongs to: its subpackage ("engine"), or the top-level
    module's own name ("errors") for the shared pieces and the faces."""
    return name.split(".")[1]


def _may_import(package: Path) -> set[str] | None:
    """The parts named on the "May import:" line of a subpackage's docstring."""
    doc = ast.get_docstring(ast.parse((package / "__init__.py").read_text())) or ""
    for line in doc.splitlines():
        if line.startswith("May import:"):
            return {p.strip() for p in line.removeprefix("May import:").split(",")}
    return None


def _part_violations(modules: dict[str, Module]) -> list[str]:
    mp = ROOT / "mpsearch"
    subpackages = {p.name for p in mp.iterdir() if (p / "__init__.py").is_file()}
    shared = {p.stem for p in mp.glob("*.py")} - {"__init__", "api", "cli"}
    allowed = {pkg: _may_import(mp / pkg) for pkg in subpackages}
    allowed |= {name: shared | {"tasks"} for name in shared}
    found = []
    for mod in modules.values():
        if not mod.name.startswith("mpsearch.") or mod.name in FACES:
            continue
        part = _part(mod.name)
        for target in mod.edges:
            if not target.startswith("mpsearch.") or _part(target) == part:
                continue
            other = _part(target)
            if allowed[part] is None or other not in allowed[part]:
                found.append(f"{mod.name} -> {target} ({part} may import: {', '.join(sorted(allowed[part] or []))})")
    return sorted(found)


def test_every_subpackage_says_what_it_may_import():
    mp = ROOT / "mpsearch"
    missing = [p.name for p in mp.iterdir() if (p / "__init__.py").is_file() and _may_import(p) is None]
    assert not missing, f"subpackages whose docstring has no 'May import:' line: {missing}"
    assert _may_import(mp / "results") == {"errors", "defaults", "cache", "metrics"}  # the line is read


def test_imports_follow_each_part_s_may_import_line():
    found = _part_violations(_graph())
    assert not found, "imports a part's docstring does not allow:\n" + "\n".join(found)


def test_a_forbidden_import_is_caught():
    # results may not import a view: a results module importing mpsearch.report.text is reported
    modules = _graph()
    records = modules["mpsearch.results.records"]
    records.edges["mpsearch.report.text"].add("summary_text")
    assert _part_violations(modules) == [
        "mpsearch.results.records -> mpsearch.report.text (results may import: cache, defaults, errors, metrics)"]
