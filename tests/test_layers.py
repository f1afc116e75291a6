"""The one-way layering of docs/architecture.md, checked on the source: errors → model → runtime →
cluster → vcluster → bench → cli. A module may import its own package and any package before it, never
one after it; only one module imports mpi4py; the top level holds the CLI, the errors and the packages."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "fluid_mpi"
LAYERS = ["errors", "model", "runtime", "cluster", "vcluster", "bench", "cli"]


def _module(path: Path, pkg: Path = PKG) -> list[str]:
    return list(path.relative_to(pkg.parent).with_suffix("").parts)


def imports_of(path: Path, pkg: Path = PKG) -> set[str]:
    """Absolute names of the fluid_mpi modules that ``path`` imports (relative imports resolved)."""
    parts = _module(path, pkg)
    package = parts if path.name == "__init__.py" else parts[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)]
                name = ".".join(base + ([node.module] if node.module else []))
                names = [name] if node.module else [f"{name}.{a.name}" for a in node.names]
            else:
                names = [node.module or ""]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found.update(n for n in names if n == "fluid_mpi" or n.startswith("fluid_mpi."))
    return found


def layer(module: str) -> int | None:
    """Index of the layer ``fluid_mpi.X…`` belongs to; None for the package root itself."""
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else None


def violations(pkg: Path = PKG) -> list[str]:
    out = []
    for path in sorted(pkg.rglob("*.py")):
        here = layer(".".join(_module(path, pkg)))
        for name in sorted(imports_of(path, pkg)):
            there = layer(name)
            if here is not None and there is not None and there > here:
                out.append(f"{path.relative_to(pkg.parent)} imports {name} ({LAYERS[there]} is above "
                           f"{LAYERS[here]})")
    return out


def test_no_lower_layer_imports_a_higher_one():
    assert violations() == []


def test_the_check_catches_an_upward_import(tmp_path):
    fake = tmp_path / "fluid_mpi"
    (fake / "runtime").mkdir(parents=True)
    (fake / "runtime" / "x.py").write_text("from ..cli import cli\nfrom ..model import data\n")
    (fake / "model").mkdir()
    (fake / "model" / "y.py").write_text("import fluid_mpi.bench.report\n")
    assert violations(fake) == ["fluid_mpi/model/y.py imports fluid_mpi.bench.report (bench is above model)",
                                "fluid_mpi/runtime/x.py imports fluid_mpi.cli (cli is above runtime)"]


def test_top_level_holds_the_cli_errors_and_packages_only():
    entries = {p.name for p in PKG.iterdir() if p.name != "__pycache__"}
    assert entries == {"__init__.py", "errors.py", "model", "runtime", "cluster", "vcluster", "bench", "cli"}


def test_only_one_module_imports_mpi4py():
    users = [str(p.relative_to(PKG)) for p in PKG.rglob("*.py") if "mpi4py" in p.read_text(encoding="utf-8")
             and any(isinstance(n, (ast.Import, ast.ImportFrom)) and "mpi4py" in ast.dump(n)
                     for n in ast.walk(ast.parse(p.read_text(encoding="utf-8"))))]
    assert users == ["runtime/mpi_transport.py"]


def test_no_module_over_300_lines():
    long = {str(p.relative_to(PKG)): n for p in PKG.rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > 300}
    assert long == {}


@pytest.mark.parametrize("package", ["cluster", "runtime"])
def test_no_function_over_60_lines(package):
    long = {}
    for path in (PKG / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > 60:
                    long[f"{path.relative_to(PKG)}:{node.name}"] = n
    assert long == {}
