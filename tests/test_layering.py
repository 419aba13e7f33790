"""The layers import one way: features <- models <- tracking <- serving <- flows <- CLI.

Parsed from the source (``ast``), so an import hidden in a function body counts too; project
modules are imported at module level only (no cycle hidden behind a function-local import), and
the module graph has no cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: Subpackage -> folder (pyproject.toml ``package-dir``).
FOLDERS = {"kgrec.features": "features", "kgrec.models": "models", "kgrec.serving": "serving",
           "kgrec.flows": "flows", "kgrec": "kgrec"}
#: Lowest first; a module may import its own layer and the ones below it. The longest matching
#: prefix decides a module's layer.
LAYERS = (
    ("features", ("kgrec.features",)),
    ("models", ("kgrec.models",)),
    ("tracking", ("kgrec.models.tracking",)),
    ("serving", ("kgrec.serving",)),
    ("flows", ("kgrec.flows",)),
    ("cli", ("kgrec.cli", "kgrec.__main__", "kgrec")),
)


def project_modules() -> dict[str, Path]:
    modules = {}
    for package, folder in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            name = ".".join((package, *parts))
            modules[name.removesuffix(".__init__")] = path
    return modules


def layer_of(module: str) -> int:
    best, rank = -1, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, rank = len(prefix), index
    return rank


def imports_of(path: Path) -> list[tuple[str, int, bool]]:
    """``(module, line, at module level)`` of every ``kgrec`` import in ``path``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    top_level = {id(node) for node in tree.body}
    for node in tree.body:  # `if TYPE_CHECKING:` blocks count as module level
        if isinstance(node, ast.If):
            top_level |= {id(n) for n in ast.walk(node)}
    out = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            if name == "kgrec" or name.startswith("kgrec."):
                out.append((name, node.lineno, id(node) in top_level))
    return out


def resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The project module an import name refers to (``from a.b import c``: ``a.b.c`` or ``a.b``)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


MODULES = project_modules()


def test_every_import_points_down_or_sideways():
    upward = []
    for module, path in MODULES.items():
        for name, line, _ in imports_of(path):
            target = resolve(name, MODULES)
            if target is not None and layer_of(target) > layer_of(module):
                upward.append(
                    f"{path.relative_to(ROOT)}:{line} ({LAYERS[layer_of(module)][0]}) imports "
                    f"{target} ({LAYERS[layer_of(target)][0]})"
                )
    assert not upward, "imports against the layering:\n" + "\n".join(sorted(set(upward)))


def test_project_modules_are_imported_at_module_level():
    local = [
        f"{path.relative_to(ROOT)}:{line} imports {name} inside a function"
        for module, path in MODULES.items()
        for name, line, top in imports_of(path)
        if not top
    ]
    assert not local, "\n".join(local)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of ``graph`` as ``[a, b, ..., a]``, or None (depth-first search, sorted order)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)) is not None:
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)) is not None:
            return cycle
    return None


def test_the_module_graph_has_no_cycle():
    graph = {
        module: {t for name, _, _ in imports_of(path) if (t := resolve(name, MODULES)) and t != module}
        for module, path in MODULES.items()
    }
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_checker_sees_a_violation():
    """The checks above would fail on a planted upward or function-local import."""
    source = "import kgrec.serving.bundle\n\ndef f():\n    from kgrec.features import spec\n"
    path = ROOT / "build" / "layering_probe.py"
    path.parent.mkdir(exist_ok=True)
    path.write_text(source)
    try:
        found = imports_of(path)
    finally:
        path.unlink()
    assert ("kgrec.serving.bundle", 1, True) in found
    assert any(name.startswith("kgrec.features") and not top for name, _, top in found)
    assert layer_of("kgrec.serving.bundle") > layer_of("kgrec.models.spec") > layer_of("kgrec.features.spec")
    assert layer_of("kgrec.models.tracking.registry") > layer_of("kgrec.models.families")
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None
