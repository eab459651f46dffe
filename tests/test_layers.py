"""One-way layers: the import-linter contract of pyproject.toml holds, covers every module, and catches a
wrong import; no import cycle between files."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import grimp

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("brainloop", "actors", "learner", "reward_workers")


def _lint(root: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("lint-imports")
    return subprocess.run([str(exe), "--config", str(root / "pyproject.toml"), "--no-cache"], cwd=root,
                          capture_output=True, text=True, timeout=300, env={"PYTHONPATH": str(root), "PATH": ""})


def test_contract_kept_on_this_tree() -> None:
    result = _lint(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 kept, 0 broken" in result.stdout


def test_contract_names_every_module() -> None:
    """Layers list modules by name: a new module must be placed in a layer, or it would escape the contract."""
    cfg = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"][0]
    named = {m.strip() for layer in cfg["layers"] for m in layer.replace("|", ":").split(":")}
    graph = grimp.build_graph(*PACKAGES)
    covered = {m for m in graph.modules if any(m == n or m.startswith(n + ".") for n in named)}
    missing = sorted(m for m in graph.modules - covered if m not in PACKAGES)
    assert not missing, f"modules in no layer: {missing}"


def test_a_wrong_import_breaks_the_contract(tmp_path: Path) -> None:
    for pkg in PACKAGES:
        shutil.copytree(REPO / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    learner = tmp_path / "learner" / "learner.py"
    learner.write_text(learner.read_text() + "\n\ndef _wrong():\n    from reward_workers import pool  # noqa\n")
    result = _lint(tmp_path)
    assert result.returncode == 1 and "BROKEN" in result.stdout, result.stdout
    assert "learner.learner -> reward_workers.pool" in result.stdout


def test_no_import_cycle_between_files() -> None:
    graph = grimp.build_graph(*PACKAGES)
    cycles = sorted({tuple(sorted((m, i))) for m in graph.modules for i in graph.find_modules_directly_imported_by(m)
                     if graph.chain_exists(importer=i, imported=m)})
    assert not cycles, f"import cycles: {cycles}"


def test_no_module_or_benchmark_imports_a_private_name() -> None:
    """What another module needs is public API: no `from x import _name` and no `module._name` across modules."""
    import ast

    ours = (*PACKAGES, "bench")
    found = []
    for root in ours:
        for path in sorted((REPO / root).rglob("*.py")):
            tree = ast.parse(path.read_text())
            modules = set()
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in ours:
                    found += [f"{path.relative_to(REPO)}: from {node.module} import {a.name}"
                              for a in node.names if a.name.startswith("_")]
                    modules |= {a.asname or a.name for a in node.names}
                elif isinstance(node, ast.Import):
                    modules |= {a.asname or a.name.split(".")[0] for a in node.names if a.name.split(".")[0] in ours}
            found += [f"{path.relative_to(REPO)}: {node.value.id}.{node.attr}" for node in ast.walk(tree)
                      if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                      and node.value.id in modules and node.attr.startswith("_") and not node.attr.startswith("__")]
    assert not found, found


def test_every_script_that_talks_to_ray_uses_token_auth_and_no_shell_strings() -> None:
    """Security defaults that live in files: token auth in every script that starts or submits to Ray; no
    library code builds a shell command (no shell=True, os.system or os.popen)."""
    import re

    for script in sorted((REPO / "scripts").glob("*.sh")):
        text = script.read_text()
        if re.search(r"^\s*[^#\n]*\bray (start|job|status)\b", text, re.M):
            assert re.search(r"RAY_AUTH_MODE=\$?\{?RAY_AUTH_MODE:-token\}?|RAY_AUTH_MODE=token", text), script.name
    for root in PACKAGES:
        for path in (REPO / root).rglob("*.py"):
            text = path.read_text()
            assert not re.search(r"shell\s*=\s*True|os\.system\(|os\.popen\(", text), path
