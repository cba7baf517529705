"""The package's floors: no import circle between modules, and no module importing a higher floor.

Every import is counted, those inside functions too (a lazy import is still a dependency)."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "quantscope"

# Lowest first. A module may import its own floor and the floors below it, never one above.
FLOORS = [
    ("errors", "dtypes", "units", "fileio", "finite", "logs", "interrupt", "placement"),
    ("formats",),
    ("modules",),
    ("evaluate", "measure"),
    ("methods", "backends", "model"),
    ("quantization",),
    ("plan", "results", "recommend"),
    ("harness",),
    ("save", "sweep", "sweep_measure", "report"),
    ("api",),
    ("cli", "__init__", "__main__"),
]
RANK = {name: i for i, names in enumerate(FLOORS) for name in names}


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    mod = _module_name(path)
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [f"{target}.{a.name}" for a in node.names]
            out.update(n for n in names if (PKG.parent / (n.replace(".", "/") + ".py")).exists()
                       or (PKG.parent / n.replace(".", "/")).is_dir())
            out.add(target)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {t for t in out if t.startswith("quantscope") and t != mod}


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PKG.rglob("*.py")}
    graph = {}
    for mod, path in files.items():
        graph[mod] = {t for t in _imports(path) if t in files}
    return graph


def _floor(mod: str) -> int:
    parts = mod.split(".")
    key = parts[1] if len(parts) > 1 else "__init__"
    return RANK[key]


def test_every_package_has_a_floor():
    assert not [m for m in _graph() if (m.split(".") + ["__init__"])[1] not in RANK]


def test_no_module_imports_a_higher_floor():
    # importing the top package for __version__ is allowed from anywhere (it imports nothing)
    bad = [(m, t) for m, ts in _graph().items() for t in ts if t != "quantscope" and _floor(t) > _floor(m)]
    assert not bad, bad


def test_no_import_circles():
    graph = _graph()
    # the package __init__ files re-export their own submodules: an edge from a package to its own
    # members is not a dependency between floors, and a member importing its package __init__ for a
    # name is the same edge reversed; both are dropped before looking for cycles
    def own(a, b):
        return b.startswith(a + ".") or a.startswith(b + ".")

    edges = {m: {t for t in ts if not own(m, t) and t != "quantscope"} for m, ts in graph.items()}
    index, low, stack, on, cycles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in list(edges):
        if v not in index:
            visit(v)
    assert not cycles, cycles


def test_no_module_over_400_lines():
    long = {str(p.relative_to(PKG)): n for p in PKG.rglob("*.py") if (n := len(p.read_text().splitlines())) > 400}
    assert not long, long
