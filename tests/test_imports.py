"""The import graph of rectflow runs one way: no cycles (counting imports inside functions), rectflow's own modules
imported at module top (an import inside a function says why in a comment), and nothing at the bottom (models, flow
math, data, text, autoencoders, files) importing the commands above it."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "rectflow"
# the bottom of the house: these never import what is above them
BOTTOM = ("rectflow.files", "rectflow.devices", "rectflow.flow", "rectflow.sampling", "rectflow.config",
          "rectflow.models", "rectflow.data", "rectflow.text", "rectflow.autoencoder", "rectflow.images",
          "rectflow.runs", "rectflow.checkpoints", "rectflow.lora")
TOP = ("rectflow.training", "rectflow.train", "rectflow.sample", "rectflow.evaluate", "rectflow.studies",
       "rectflow.ablate", "rectflow.demo", "rectflow.cli")


def modules() -> dict[str, Path]:
    """Module name -> file, for every module of the package."""
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imports(name: str, path: Path, known: dict) -> list[tuple[str, int, bool]]:
    """(imported rectflow module, line, at module top) for every import statement in a module."""
    tree = ast.parse(path.read_text())
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
                for _ in range(node.level - 1):
                    pkg = pkg.rsplit(".", 1)[0]
                base = f"{pkg}.{base}" if base else pkg
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rsplit(".", 1)[0] if "." in target else ""
            if target.startswith("rectflow") and target != name and target != "rectflow":
                found.append((target, node.lineno, id(node) in top_level))
    return found


def graph() -> dict[str, list[tuple[str, int, bool]]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """A cycle of the graph as a list of modules, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycles():
    edges = {name: {target for target, _, _ in found} for name, found in graph().items()}
    assert find_cycle(edges) is None, " -> ".join(find_cycle(edges))


def test_own_imports_at_module_top_or_explained():
    lines = {name: path.read_text().splitlines() for name, path in modules().items()}
    unexplained = []
    for name, found in graph().items():
        for target, lineno, top in found:
            if top:
                continue
            here = lines[name][lineno - 1] + " " + lines[name][lineno - 2]
            if "#" not in here:
                unexplained.append(f"{name}:{lineno} imports {target} inside a function without a comment saying why")
    assert not unexplained, "\n".join(unexplained)


def test_bottom_never_imports_the_top():
    wrong = [f"{name} imports {target}" for name, found in graph().items() if name.startswith(BOTTOM)
             for target, _, _ in found if target.startswith(TOP)]
    assert not wrong, "\n".join(wrong)
