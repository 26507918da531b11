"""The package's shape is enforced, not hoped for: the import contracts in pyproject.toml
(import-linter), no import cycle between any two modules, and modules of a readable size."""

from __future__ import annotations

from pathlib import Path

import grimp
from importlinter.cli import lint_imports

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "vllm_supervisor"
MAX_LINES = 400


def test_import_contracts_hold(monkeypatch):
    monkeypatch.chdir(REPO)
    assert lint_imports(config_filename=str(REPO / "pyproject.toml"), no_cache=True,
                        no_logo=True) == 0


def test_no_import_cycles_between_modules():
    graph = grimp.build_graph("vllm_supervisor")
    cycles = []
    for module in sorted(graph.modules):
        for imported in graph.find_modules_directly_imported_by(module):
            chain = graph.find_shortest_chain(importer=imported, imported=module)
            if chain:
                cycles.append(" -> ".join((module, *chain)))
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_modules_stay_under_the_size_a_newcomer_can_read():
    big = {str(p.relative_to(REPO)): n for p in PACKAGE.rglob("*.py")
           if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not big, f"modules over {MAX_LINES} lines: {big}"


def test_no_mixins_every_collaborator_is_composed():
    import ast

    bases = {}
    for p in (PACKAGE / "lifecycle").glob("*.py"):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ClassDef) and len(node.bases) > 1:
                bases[f"{p.name}:{node.name}"] = len(node.bases)
    assert not bases, f"classes with several bases (mixins?): {bases}"
