"""The shape of the code: dependencies point one way (no import circle between modules or
between packages), no file grows past a reviewable size, the product cites no document it does
not contain, and validation survives ``python -O``."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import vdiff_sparse

ROOT = Path(__file__).resolve().parents[1]
# Source folders and the package names they are installed as (pyproject's package-dir).
SOURCES = {"vdiff_sparse": "vdiff_sparse", "kernels": "vdiff_sparse.kernels", "pipelines": "vdiff_sparse.pipelines"}
MAX_LINES = 600


def _modules() -> dict[str, Path]:
    out = {}
    for folder, package in SOURCES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([package, *parts])] = path
    return out


MODULES = _modules()


def _resolve(module: str, path: Path, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _target(name: str) -> str | None:
    """The module of ours that importing ``name`` runs (its longest known prefix)."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def import_graph() -> dict[str, set[str]]:
    """``{module: modules of ours it imports}``, imports inside functions included (a lazy
    import is still a dependency). ``from vdiff_sparse import name`` counts as importing the
    module that defines ``name`` (the package loads its public names lazily)."""
    graph: dict[str, set[str]] = {}
    for module, path in MODULES.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(module, path, node)
                names = []
                for alias in node.names:
                    if base == "vdiff_sparse" and alias.name in vdiff_sparse._EXPORTS:
                        names.append("vdiff_sparse." + vdiff_sparse._EXPORTS[alias.name])
                    elif f"{base}.{alias.name}" in MODULES:
                        names.append(f"{base}.{alias.name}")
                    else:
                        names.append(base)
            else:
                continue
            for name in names:
                target = _target(name)
                if target is not None and target != module and target != "vdiff_sparse":
                    deps.add(target)
        graph[module] = deps
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
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

    for v in graph:
        if v not in index:
            visit(v)
    return out


def _package_of(module: str) -> str:
    """The unit a package-level circle is counted between: a subpackage of ``vdiff_sparse``
    (``vdiff_sparse.backends``) or a top-level module (``vdiff_sparse.plan``)."""
    parts = module.split(".")
    candidate = ".".join(parts[:2])
    is_package = MODULES.get(candidate) is not None and MODULES[candidate].name == "__init__.py"
    return candidate if is_package else module if len(parts) <= 2 else candidate


def test_no_import_circle_between_modules():
    assert _cycles(import_graph()) == []


def test_no_import_circle_between_packages():
    packages: dict[str, set[str]] = {}
    for module, deps in import_graph().items():
        unit = _package_of(module)
        packages.setdefault(unit, set()).update(_package_of(d) for d in deps if _package_of(d) != unit)
    assert _cycles(packages) == []


def test_the_import_graph_sees_lazy_and_relative_imports():
    graph = import_graph()
    # A lazy import inside a function (the Triton adapter loads the kernels on first call).
    assert "vdiff_sparse.kernels.ops" in graph["vdiff_sparse.backends.triton"] or \
        "vdiff_sparse.kernels" in graph["vdiff_sparse.backends.triton"]
    # Relative imports resolve to the package's own modules.
    assert "vdiff_sparse.methods.registry" in graph["vdiff_sparse.methods.gna"]
    # A circle put in on purpose is found.
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("module", sorted(MODULES), ids=str)
def test_files_stay_reviewable(module):
    lines = MODULES[module].read_text().count("\n")
    assert lines <= MAX_LINES, f"{MODULES[module].relative_to(ROOT)} has {lines} lines; split it by concern"


def test_no_references_to_documents_outside_the_repository():
    offenders = []
    for folder in ("vdiff_sparse", "kernels", "pipelines", "configs"):
        for path in sorted((ROOT / folder).rglob("*")):
            if path.suffix in (".py", ".yaml", ".md") and "DESIGN" in path.read_text():
                offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []


def test_validation_survives_python_O():
    """``python -O`` strips ``assert``: hand-built plans and configs must still be checked."""
    code = (
        "import torch\n"
        "from vdiff_sparse.plan import AttentionPlan\n"
        "o = torch.tensor([0, 4, 8])\n"
        "try:\n"
        "    AttentionPlan(None, o, torch.tensor([0, 4, 9]), torch.zeros(1, 1, 2, 1, dtype=torch.long))\n"
        "except ValueError as e:\n"
        "    print('refused:', e)\n"
    )
    run = subprocess.run([sys.executable, "-O", "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "refused: q_offsets and k_offsets must cover the same N" in run.stdout
