"""Run every benchmark in bench/, each in its own process, and print one combined table.

    python -m bench.run_all [--quick] [--only NAME ...] [--out DIR] [--timeout S]

Each bench module that exists is run as ``python -m bench.<name> [--quick] --json <out>/<name>.json``
(sequentially: they would disturb each other's timings on a shared CPU); a missing module is
skipped with a note. Reports go to ``bench/results/`` (``bench/results/quick/`` with ``--quick``, so
a smoke run never overwrites a measurement), with each bench's output in ``<name>.log`` and an
index ``run_all.json``. The combined table shows each report's ``summary`` and ``targets`` (see
``bench.common``); a report without a summary is shown by its top-level numbers.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from bench.common import RESULTS_DIR, ROOT, fmt, load_average, machine_info, table, write_json

BENCHES = ("reward_pipeline", "pool_scaling", "adapter_push", "learner_memory", "learner_update", "sampler_lora",
           "loop_speed", "pool_autoscale", "trl_grpo")
MAX_FALLBACK_ITEMS = 15


def headline(report: dict[str, Any]) -> dict[str, Any]:
    """The numbers to show for a report: its ``summary``, else its top-level (and one level down)
    numeric scalars, at most ``MAX_FALLBACK_ITEMS``."""
    if isinstance(report.get("summary"), dict):
        return dict(report["summary"])
    out: dict[str, Any] = {}
    for key, value in report.items():
        if key in ("machine", "quick"):
            continue
        items = value.items() if isinstance(value, dict) else [("", value)]
        for sub, v in items:
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                out[f"{key}.{sub}" if sub else key] = v
            if len(out) >= MAX_FALLBACK_ITEMS:
                return out
    return out


def _stream(proc: subprocess.Popen, log: Any, name: str) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        log.write(line)
        print(f"[{name}] {line}", end="", flush=True)


def _shown(path: Path) -> str:
    """A path relative to the checkout when inside it (committed results name no one's home)."""
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def run_bench(name: str, quick: bool, out_dir: Path, timeout_s: float) -> dict[str, Any]:
    if importlib.util.find_spec(f"bench.{name}") is None:  # finds the file without importing it
        return {"bench": name, "status": "skipped", "note": f"bench/{name}.py does not exist"}
    json_path = out_dir / f"{name}.json"
    log_path = out_dir / f"{name}.log"
    json_path.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", f"bench.{name}", "--json", str(json_path), *(["--quick"] if quick else [])]
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    print(f"=== {name}: {' '.join(cmd[1:])}", flush=True)
    t0 = time.perf_counter()
    load = load_average()
    timed_out = False
    try:
        with open(log_path, "w") as log:
            # Own process group: on a timeout the bench and everything it started (its local Ray
            # cluster, actors, child processes) are terminated together.
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True, bufsize=1, start_new_session=True)
            reader = threading.Thread(target=_stream, args=(proc, log, name), daemon=True)
            reader.start()  # stream: a long bench shows progress
            try:
                rc = proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
                os.killpg(proc.pid, signal.SIGTERM)
                rc = proc.wait()
            reader.join(timeout=10)
    except OSError as exc:
        return {"bench": name, "status": "error", "note": str(exc)}
    wall = time.perf_counter() - t0
    entry: dict[str, Any] = {"bench": name, "rc": rc, "wall_s": wall, "load_average_before": load,
                             "json": _shown(json_path), "log": _shown(log_path)}
    if timed_out:
        entry.update(status="failed", note=f"timed out after {timeout_s:.0f}s; see {_shown(log_path)}")
        return entry
    if rc != 0 or not json_path.is_file():
        entry.update(status="failed", note=f"exit code {rc}; see {_shown(log_path)}")
        return entry
    report = json.loads(json_path.read_text())
    entry.update(status="ok", date=report.get("machine", {}).get("date"), summary=headline(report),
                 targets=report.get("targets", []))
    return entry


def merged(index: Path, entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The index of every bench's latest run: ``--only`` replaces its benches' entries and keeps the
    others (each entry is dated by its own report)."""
    fresh = {e["bench"]: e for e in entries}
    try:
        earlier = json.loads(index.read_text()).get("benches", [])
    except (OSError, ValueError):
        earlier = []
    kept = {e["bench"]: e for e in earlier if e.get("bench") in BENCHES and e["bench"] not in fresh}
    return [fresh.get(name) or kept[name] for name in BENCHES if name in fresh or name in kept]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="every bench in its smoke mode")
    parser.add_argument("--only", nargs="+", choices=BENCHES, default=None)
    parser.add_argument("--out", type=Path, default=None, help="default bench/results (bench/results/quick)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per bench")
    args = parser.parse_args(argv)
    out_dir = args.out or (RESULTS_DIR / "quick" if args.quick else RESULTS_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    entries = [run_bench(name, args.quick, out_dir, args.timeout) for name in (args.only or BENCHES)]

    print()
    print(table([{"bench": e["bench"], "status": e["status"], "wall_s": e.get("wall_s", ""),
                  "note": e.get("note", "")} for e in entries], title="benchmarks"))
    metric_rows = [{"bench": e["bench"], "metric": k, "value": v}
                   for e in entries if e["status"] == "ok" for k, v in e["summary"].items()
                   if not isinstance(v, (dict, list))]
    if metric_rows:
        print()
        print(table(metric_rows, title="headline numbers (ratios are side by side within one bench run)"))
    target_rows = [{"bench": e["bench"], "target": t["name"], "value": fmt(t["value"]), "goal": t["goal"],
                    "met": t["met"]} for e in entries if e["status"] == "ok" for t in e["targets"]]
    if target_rows:
        print()
        print(table(target_rows, title="targets"))
        for e in entries:
            for t in e.get("targets", []):
                if not t["met"]:
                    print(f"  {e['bench']}: {t['name']} missed -- {t.get('why_missed', '')}")
    write_json(out_dir / "run_all.json", {"quick": args.quick, "machine": machine_info(),
                                          "benches": merged(out_dir / "run_all.json", entries)})
    return 0 if all(e["status"] in ("ok", "skipped") for e in entries) else 1


if __name__ == "__main__":
    raise SystemExit(main())
