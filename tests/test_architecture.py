"""The import picture docs/architecture.md promises, read from the code: no two modules import each
other (directly or round a loop, lazy imports inside functions included), and the core layer
imports nothing above it."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "reclora_ray"
CORE = {
    "config",
    "variants",
    "rundir",
    "storage",
    "base_model",
    "runtime",
    "metrics",
    "ranking",
    "console",
    "curves",
    "gpu",
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _module_of(name: str, modules: dict) -> str:
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name


def import_graph() -> dict[str, set[str]]:
    """{module: the package's modules it imports anywhere in its file}."""
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("reclora_ray"):
                targets |= {_module_of(f"{node.module}.{alias.name}", modules) for alias in node.names}
            elif isinstance(node, ast.Import):
                targets |= {_module_of(a.name, modules) for a in node.names if a.name.startswith("reclora_ray")}
        graph[name] = targets - {name, "reclora_ray"}
    return graph


def _loop_through(graph: dict, start: str) -> list[str] | None:
    """A chain of imports from `start` back to itself, if there is one."""
    stack, seen = [(start, [start])], set()
    while stack:
        node, path = stack.pop()
        for nxt in graph.get(node, ()):
            if nxt == start:
                return [*path, start]
            if nxt not in seen:
                seen.add(nxt)
                stack.append((nxt, [*path, nxt]))
    return None


def test_no_module_imports_its_way_back_to_itself():
    graph = import_graph()
    assert len(graph) > 50 and "reclora_ray.llm.plora.layer" in graph["reclora_ray.llm.plora.model"]
    loops = [loop for loop in (_loop_through(graph, m) for m in sorted(graph)) if loop]
    assert not loops, "import loops: " + "; ".join(" -> ".join(loop) for loop in loops)


def test_the_core_imports_only_the_core():
    core = {f"reclora_ray.{name}" for name in CORE}
    graph = import_graph()
    assert core <= graph.keys()
    upward = {m: sorted(graph[m] - core) for m in sorted(core) if graph[m] - core}
    assert not upward, f"core modules importing above the core: {upward}"


def test_the_loop_check_finds_a_loop_and_only_a_loop():
    assert _loop_through({"a": {"b"}, "b": {"c"}, "c": {"a"}}, "a") == ["a", "b", "c", "a"]
    assert _loop_through({"a": {"b"}, "b": set()}, "a") is None
