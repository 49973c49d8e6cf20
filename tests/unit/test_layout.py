"""The package's folders follow the data's way: every import points to the same or an earlier stage.

Stages, earliest first (README "Library layout"): the shared ``core``, ``config``, the raw
``dataset`` format, the ``scanner`` DICOM import, the ``synthetic`` cohort, raw -> ``cache``,
cache -> ``batches``, ``backbones`` (with weight transfer), ``metrics``, the Lightning
``modules``, ``inference``, ``evaluation``, the ``pipeline`` runs, and the command line on top.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import sap_lightning

PACKAGE = Path(sap_lightning.__file__).parent

STAGES = (
    "core",
    "config",
    "dataset",
    "scanner",
    "synthetic",
    "cache",
    "batches",
    "backbones",
    "metrics",
    "modules",
    "inference",
    "evaluation",
    "pipeline",
    "commands",
)
TOP_LEVEL = {"cli": len(STAGES), "__main__": len(STAGES) + 1, "__init__": 0}
MAX_LINES = 600
"""A module longer than this does more than one job: split it."""


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _rank(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 1:
        return 0
    head = parts[1]
    if head in STAGES:
        return STAGES.index(head)
    return TOP_LEVEL[head]


def _imports(path: Path) -> set[str]:
    """Every ``sap_lightning`` module a file imports, at any depth (lazy imports count too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.startswith("sap_lightning"):
                found.add(node.module)
                found.update(
                    f"{node.module}.{alias.name}"
                    for alias in node.names
                    if (PACKAGE.parent / f"{node.module}.{alias.name}".replace(".", "/")).exists()
                    or (
                        PACKAGE.parent / (f"{node.module}.{alias.name}".replace(".", "/") + ".py")
                    ).exists()
                )
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("sap_lightning"))
    return found


FILES = sorted(PACKAGE.rglob("*.py"))
GRAPH = {_module_name(path): _imports(path) for path in FILES}


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_to_the_same_or_an_earlier_stage(path: Path) -> None:
    module = _module_name(path)
    late = sorted(m for m in GRAPH[module] if m != "sap_lightning" and _rank(m) > _rank(module))
    assert not late, f"{module} imports later stages: {late}"


def test_no_import_cycles_between_modules() -> None:
    """Module-level cycles (a imports b imports a), lazy imports included."""
    modules = set(GRAPH)
    edges = {m: {d for d in GRAPH[m] if d in modules and d != m} for m in modules}
    # A package's __init__ re-exporting its own modules is not a cycle of behaviour.
    for m in modules:
        edges[m] = {d for d in edges[m] if not m.startswith(d + ".")}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycle = [*stack[stack.index(nxt) :], nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for module in sorted(modules):
        if module not in state:
            visit(module)


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_modules_stay_readable_in_length(path: Path) -> None:
    module = _module_name(path)
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{module}: {lines} lines"


def test_every_stage_folder_is_in_the_readme_layout_section() -> None:
    readme = (PACKAGE.parents[1] / "README.md").read_text()
    section = readme.split("## Library layout", 1)[1].split("\n## ", 1)[0]
    for stage in STAGES:
        assert f"{stage}/" in section, f"README's Library layout misses {stage}/"


def test_top_level_api_resolves_and_public_class_names_are_unique() -> None:
    for name in sap_lightning.__all__:
        assert getattr(sap_lightning, name) is not None
    owners: dict[str, str] = {}
    for path in FILES:
        module = _module_name(path)
        if module.endswith("__init__") or path.name.startswith("_"):
            continue
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                assert node.name not in owners, (
                    f"class {node.name} in both {owners[node.name]} and {module}"
                )
                owners[node.name] = module
