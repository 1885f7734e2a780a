"""The layout holds: no import cycle inside erasure/, registry/ or service/ (imports inside functions counted), the
top-level packages import one way (service -> registry -> erasure), and erasure's stages import only the stages below
them (README.md, "Layout")."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("erasure", "registry", "service")
# erasure's stages, lowest first: a stage imports only from the stages before it (and from the shared modules)
STAGES = ("base", "sampling", "training.methods", "redteam.families", "training.config", "redteam.config",
          "redteam.record", "redteam.judges", "pack", "toy", "training", "redteam")
SHARED = ("erasure", "erasure.errors", "erasure.files", "erasure.prompts")


def modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Every internal module ``name`` imports, wherever the import statement is (functions and TYPE_CHECKING
    blocks included); ``from P import x`` counts as importing P.x when that is a module, else P."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        found |= {t for t in targets if t in known and t != name}
    return found


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports(name, path, set(found)) for name, path in found.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
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
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def stage_of(module: str) -> str | None:
    """The most specific stage holding ``module`` (``erasure.training.methods.uce`` -> ``training.methods``)."""
    inside = module.removeprefix("erasure.")
    matches = [s for s in STAGES if inside == s or inside.startswith(s + ".")]
    return max(matches, key=len) if matches else None


def test_no_import_cycle_anywhere():
    assert cycles(graph()) == []


def test_the_cycle_check_sees_imports_inside_functions(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from erasure.pack import manifest\n")
    assert imports("x", source, {"erasure.pack", "erasure.pack.manifest"}) == {"erasure.pack.manifest"}
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_top_level_packages_import_one_way():
    rank = {"erasure": 0, "registry": 1, "service": 2}
    upward = [(a, b) for a, targets in graph().items() for b in targets
              if rank[b.split(".")[0]] > rank[a.split(".")[0]]]
    assert upward == []


@pytest.mark.parametrize("stage", STAGES)
def test_each_stage_imports_only_the_stages_below(stage):
    allowed = set(STAGES[: STAGES.index(stage) + 1])
    wrong = defaultdict(set)
    for module, targets in graph().items():
        if not module.startswith("erasure.") or stage_of(module) != stage:
            continue
        for target in targets:
            if target in SHARED or not target.startswith("erasure."):
                continue
            if stage_of(target) not in allowed:
                wrong[module].add(target)
    assert dict(wrong) == {}
