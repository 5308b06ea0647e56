"""No import cycles in effbench/ — counting lazy (in-function) and ``TYPE_CHECKING`` imports, which
hide a cycle from Python but not from a reader."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "effbench"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PKG.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]
                                    + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                           for a in node.names]
            for t in targets:
                if t in modules and t != name:
                    graph[name].add(t)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (found := visit(m)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_no_import_cycles() -> None:
    cycle = _cycle(_graph())
    assert cycle is None, " → ".join(cycle or [])


def test_compare_depends_on_summaries_only() -> None:
    """effbench-compare reads summary.json files; it must not import the training side."""
    graph = _graph()
    for name, deps in graph.items():
        if name.startswith("effbench.compare"):
            # effbench.received: how a file from outside is read (bounded, data only, escaped);
            # effbench.predictions: the format of a run's predictions.npz (numpy, no torch);
            # effbench.config: the config's own default choices (yaml, no torch);
            # effbench.task: what a summary's data.task means
            bad = {d for d in deps if not d.startswith(("effbench.compare", "effbench.errors",
                                                        "effbench.rundir", "effbench.received",
                                                        "effbench.predictions",
                                                        "effbench.config", "effbench.task"))}
            assert not bad, f"{name} imports {bad}"


def test_the_core_names_no_technique() -> None:
    """Outside effbench/techniques/ no file names a technique (code or comment): techniques are
    found through the registry and known by what they declare."""
    from effbench.technique import registered

    names = "|".join(re.escape(n) for n in registered())
    word = re.compile(rf"(?<![\w.])({names})(?![\w])", re.IGNORECASE)
    package = Path(__file__).resolve().parents[1] / "effbench"
    found = [f"{path.relative_to(package)}:{i}: {line.strip()}"
             for path in sorted(package.rglob("*.py")) if "techniques" not in path.parts
             for i, line in enumerate(path.read_text().splitlines(), 1) if word.search(line)]
    assert not found, "\n".join(found)
