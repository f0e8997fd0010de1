"""The tree's architecture, checked: no import cycles between modules, and dependencies point one way
(rac -> loadtests -> models -> service; Ray only in service.cluster and models.memory.ray_embed).

Every import counts, at module level or inside a function, except those only a type checker sees
(`if TYPE_CHECKING:`)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("rac", "service", "models", "loadtests", "deploy")
RAY_EMBED = "models.memory.ray_embed"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _type_checking_only(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST) -> list[tuple[str, list[str]]]:
    """(module, names imported from it) for every import outside `if TYPE_CHECKING:` blocks."""
    found: list[tuple[str, list[str]]] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _type_checking_only(node):
            for stmt in node.orelse:
                visit(stmt)
            return
        if isinstance(node, ast.Import):
            found.extend((a.name, []) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.module, [a.name for a in node.names]))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def import_graph() -> dict[str, set[str]]:
    """Project module -> the project modules it imports (a `from package import module` names the module)."""
    files = {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        for module, names in _imports(ast.parse(path.read_text())):
            if module.split(".")[0] not in PACKAGES:
                continue
            targets = [f"{module}.{n}" for n in names if f"{module}.{n}" in files] or [module]
            graph[name].update(t for t in targets if t in files and t != name)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
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
                out.append(sorted(component))

    for v in graph:
        if v not in index:
            connect(v)
    return out


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles() -> None:
    assert cycles(import_graph()) == []


def test_dependencies_point_one_way() -> None:
    """service reads artifacts and never imports the offline side, the load tests or the CLI; models may
    import service (the memory is built with the service's own preprocessing), never loadtests or the CLI."""
    allowed = {
        "service": {"service"},
        "models": {"models", "service"},
        "loadtests": {"loadtests", "models", "service"},
        "deploy": {"deploy", "loadtests", "service"},
        "rac": set(PACKAGES),
    }
    wrong = [
        f"{src} imports {dst}"
        for src, targets in import_graph().items()
        for dst in targets
        if dst.split(".")[0] not in allowed[src.split(".")[0]]
    ]
    assert wrong == []


def test_ray_stays_in_the_cluster_package() -> None:
    """Ray is an optional extra: only service.cluster, the Ray Data embedding step of `rac memory add --ray`
    (models.memory.ray_embed) and the tools that start clusters import it."""
    files = [p for pkg in ("service", "models", "rac") for p in (ROOT / pkg).rglob("*.py")]
    importers = sorted(
        _module_name(p) for p in files if any(m.split(".")[0] == "ray" for m, _ in _imports(ast.parse(p.read_text())))
    )
    allowed = [name for name in importers if name.startswith("service.cluster") or name == RAY_EMBED]
    assert allowed == importers, importers
    assert RAY_EMBED in importers  # the rule still names a real module


def test_nothing_imports_the_ray_modules_at_module_level() -> None:
    """The default install never imports Ray: the Ray modules are reached only from inside the functions that
    need them (`rac memory add --ray`, `rac serve-ray`), never by a module-level import of the default path."""
    ray_modules = ("service.cluster", RAY_EMBED)
    for path in (p for pkg in ("service", "models", "rac") for p in (ROOT / pkg).rglob("*.py")):
        name = _module_name(path)
        if name.startswith(ray_modules):
            continue
        tree = ast.parse(path.read_text())
        top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        for node in top:
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            assert not any(m.startswith(ray_modules) for m in modules), (name, modules)
