"""The shape of the code, checked: the library's arrows run one way (no stage imports the orchestrator or the CLI, no
cycle between packages) and the library never prints (the CLI does)."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "zeroquant"
TOP = ("pipeline", "cli", "__main__", "zeroquant")  # the orchestrator, the CLI, `python -m` and the package's door


def unit(module: str) -> str:
    """zeroquant.calib.matching -> calib; zeroquant.errors -> errors (a top-level module is a unit of its own)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "zeroquant"


def modules() -> dict[str, ast.Module]:
    found = {}
    for path in sorted(ROOT.rglob("*.py")):
        name = ".".join(("zeroquant", *path.relative_to(ROOT).with_suffix("").parts)).removesuffix(".__init__")
        found[name] = ast.parse(path.read_text(), str(path))
    return found


def imports(tree: ast.Module, name: str) -> set[str]:
    """Every zeroquant module this one imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("zeroquant")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("zeroquant"):
            found |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return {m for m in found if m.split(".")[:2] != name.split(".")[:2] or len(name.split(".")) == 1}


GRAPH = {name: imports(tree, name) for name, tree in modules().items()}
LIBRARY = sorted({unit(name) for name in GRAPH} - set(TOP))  # every package and top-level module below them


def test_the_library_is_every_unit_but_the_top():
    """A new package or module is checked without anyone adding it to a list."""
    assert {"search", "quant", "calib", "graph", "export", "evaluate", "zoo", "errors", "files", "runtime",
            "distributed", "report", "options", "cpu"} <= set(LIBRARY)


@pytest.mark.parametrize("stage", LIBRARY)
def test_no_stage_imports_the_orchestrator_or_the_cli(stage):
    offenders = {name: sorted(m for m in used if unit(m) in ("pipeline", "cli"))
                 for name, used in GRAPH.items() if unit(name) == stage}
    assert not {k: v for k, v in offenders.items() if v}


def test_no_cycle_between_packages():
    edges: dict[str, set[str]] = {}
    for name, used in GRAPH.items():
        edges.setdefault(unit(name), set()).update(unit(m) for m in used if unit(m) not in (unit(name), "zeroquant"))
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(edges.get(node, ())):
            assert state.get(nxt) != "open", f"import cycle: {' -> '.join(path + [node, nxt])}"
            if nxt not in state:
                visit(nxt, path + [node])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [])


def test_only_the_cli_prints():
    printing = []
    for name, tree in modules().items():
        if unit(name) == "cli":
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                printing.append(f"{name}:{node.lineno}")
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
                if any(n and n.split(".")[0] == "rich" for n in names):
                    printing.append(f"{name}:{node.lineno} imports rich")
    assert not printing
