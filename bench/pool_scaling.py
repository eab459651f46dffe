"""Reward-pool scaling: does ``RewardPool`` keep N workers busy?

    python -m bench.pool_scaling [--quick] [--json OUT] [--workers 1 2 4 8 16] [--latency 0.5 0.1]

The workers stand in for GPU time: ``SleepScorer.score`` sleeps a fixed latency per text (no CPU),
so N workers can at best score ``N / latency`` texts per second however few cores the machine has,
and anything below that is the pool's (or Ray's) doing. For each N and latency the same texts
(``rounds * N``, enough for several seconds of work) go through

* ``pool``: the real ``reward_workers.pool.RewardPool`` (submit all, iterate ``results()``), built
  with a ``make_worker`` factory that hands out pre-started actors (actor start-up is not measured);
* ``ray``: the ideal for the same actors: every call submitted up front, round-robin, one
  ``ray.get`` (each actor's own queue keeps it busy; no driver in the loop).

efficiency = throughput / (N / latency). Each actor records when each call ran, so the lost
worker-time is split exactly (the parts sum to 1 - efficiency):

* ``startup``: before a worker's first call began (submission, actor queueing);
* ``gaps``: idle between consecutive calls on a worker (the driver had not yet handed it the next
  text: the pool's dispatch / poll loop);
* ``tail``: after a worker's last call until the driver had every result, split into
  ``imbalance`` (others were still on their last call) and ``collect`` (all calls were done; the
  driver had not yet received the last results);
* ``overshoot``: calls running longer than the latency (sleep granularity, a busy CPU).
"""

from __future__ import annotations

import itertools
import math
import time
from typing import Any

import ray

from bench.common import common_args, load_average, machine_info, print_targets, ray_env, table, target, write_json
from brainloop.types import ScoreResult
from reward_workers.pool import RewardPool

TARGET_EFFICIENCY = 0.9
FULL_WORKERS = (1, 2, 4, 8, 16)
QUICK_WORKERS = (1, 4)
FULL_LATENCIES = (0.5, 0.1)  # 0.5 s is the target's; 0.1 s probes where the dispatch loop saturates
QUICK_LATENCIES = (0.2,)
WALL_PER_CASE_S = 4.0  # ideal seconds of work per (N, latency, mode)
QUICK_WALL_PER_CASE_S = 0.8
MIN_ROUNDS = 8  # texts per worker at least


class SleepScorer:
    """A reward worker whose 'GPU call' is a fixed sleep: same interface as ``RewardWorker``."""

    def __init__(self, name: str, latency_s: float) -> None:
        self.name = name
        self.latency_s = latency_s
        self._spans: list[tuple[float, float]] = []

    def ping(self) -> dict[str, Any]:
        return {"name": self.name, "latency_s": self.latency_s}

    def set_latency(self, latency_s: float) -> None:
        self.latency_s = latency_s

    def score(self, text: str) -> ScoreResult:
        start = time.time()
        time.sleep(self.latency_s)
        end = time.time()
        self._spans.append((start, end))
        return ScoreResult(status="ok", reward=0.0, timings={"simulated_gpu": end - start}, worker=self.name,
                           n_words=len(text.split()))

    def spans(self) -> list[tuple[float, float]]:
        """(start, end) unix times of the calls since the last ``spans()`` (then forgets them)."""
        out, self._spans = self._spans, []
        return out


def loss_split(spans: list[list[tuple[float, float]]], t0: float, t1: float, latency: float) -> dict[str, float]:
    """Worker-time accounting of one run: efficiency + startup + gaps + tail + overshoot = 1.

    ``spans[w]`` are worker w's (start, end) call times; [t0, t1] is the run as the driver saw it.
    Each part is a fraction of N * (t1 - t0), the worker-time the run had. ``tail`` splits exactly
    into ``imbalance`` (workers done before the last one: uneven shares of the texts) and
    ``collect`` (after the last call ended until the driver held every result).
    """
    n = len(spans)
    total = n * (t1 - t0)
    calls = sum(len(s) for s in spans)
    last_end = max((e for s in spans for _, e in s), default=t0)
    startup = gaps = busy = imbalance = 0.0
    for s in spans:
        s = sorted(s)
        if not s:  # a worker that got nothing idled the whole run
            imbalance += last_end - t0
            continue
        startup += s[0][0] - t0
        imbalance += last_end - s[-1][1]
        gaps += sum(b[0] - a[1] for a, b in itertools.pairwise(s))
        busy += sum(e - b for b, e in s)
    collect = n * (t1 - last_end)
    return {"efficiency": calls * latency / total, "startup": startup / total, "gaps": gaps / total,
            "tail": (imbalance + collect) / total, "overshoot": (busy - calls * latency) / total,
            "imbalance": imbalance / total, "collect": collect / total}


def _collect_spans(actors: list) -> list[list[tuple[float, float]]]:
    return ray.get([a.spans.remote() for a in actors])


def _record(used: list, t0: float, t_submitted: float, t1: float, cpu: float, latency: float) -> dict[str, Any]:
    """One run's figures from the workers' own call spans (the same for the pool and plain Ray)."""
    spans = _collect_spans(used)
    return {"wall_s": t1 - t0, "submit_s": t_submitted - t0, "driver_cpu_s": cpu,
            "calls_min": min(map(len, spans)), "calls_max": max(map(len, spans)),
            **loss_split(spans, t0, t1, latency)}


def run_pool(actors: list, n: int, texts: list[str], latency: float) -> dict[str, Any]:
    used = actors[:n]
    pool = RewardPool(lambda i: used[i], n, timeout_s=max(60.0, 20 * latency), max_attempts=1)
    pool.ready()
    _collect_spans(used)
    cpu0, t0 = time.process_time(), time.time()
    for k, text in enumerate(texts):
        pool.submit(k, text)
    t_submitted = time.time()
    results = dict(pool.results())
    t1 = time.time()
    cpu = time.process_time() - cpu0
    bad = [r for r in results.values() if not r.ok]
    if len(results) != len(texts) or bad:
        raise RuntimeError(f"pool returned {len(results)}/{len(texts)} results, {len(bad)} not ok: "
                           f"{bad[0].error if bad else ''}")
    return _record(used, t0, t_submitted, t1, cpu, latency)


def run_ray(actors: list, n: int, texts: list[str], latency: float) -> dict[str, Any]:
    used = actors[:n]
    _collect_spans(used)
    cpu0, t0 = time.process_time(), time.time()
    refs = [used[k % n].score.remote(text) for k, text in enumerate(texts)]
    t_submitted = time.time()
    results = ray.get(refs)
    t1 = time.time()
    cpu = time.process_time() - cpu0
    if not all(r.ok for r in results):
        raise RuntimeError("a SleepScorer call failed")
    return _record(used, t0, t_submitted, t1, cpu, latency)


BOUNDS = {
    "startup": "submission: workers waited for their first text (driver submit loop / Ray task start)",
    "gaps": "the pool's dispatch/poll loop: a worker idled between calls until the driver handed it the next "
            "text (RewardPool.poll -> _dispatch after ray.wait; per-worker in-flight cap)",
    "imbalance": "uneven shares: some workers finished their last text while others still ran one "
                 "(least-loaded dispatch of a finite batch under jittery latencies)",
    "collect": "the driver collected the last results late (poll's ray.wait / per-result ray.get)",
    "overshoot": "the workers themselves: calls ran longer than the latency (sleep wake-up on a busy CPU)",
}


def bounding_stage(row: dict[str, Any]) -> str:
    part = max(BOUNDS, key=lambda k: row[k])
    return f"largest loss is {part} ({row[part]:.3f} of worker-time): {BOUNDS[part]}"


def main(argv: list[str] | None = None) -> int:
    parser = common_args(__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=None)
    parser.add_argument("--latency", type=float, nargs="+", default=None, help="simulated seconds per text")
    args = parser.parse_args(argv)
    workers = tuple(args.workers or (QUICK_WORKERS if args.quick else FULL_WORKERS))
    latencies = tuple(args.latency or (QUICK_LATENCIES if args.quick else FULL_LATENCIES))
    wall_per_case = QUICK_WALL_PER_CASE_S if args.quick else WALL_PER_CASE_S
    load_before = load_average()

    # 32 logical CPUs whatever the machine has: the actors sleep, they do not compute.
    ray.init(address="local", num_cpus=32, include_dashboard=False, log_to_driver=False,
             namespace="bench-pool-scaling", runtime_env=ray_env(), object_store_memory=128 * 1024**2)
    try:
        t_start = time.time()
        actors = [ray.remote(SleepScorer).options(num_cpus=1).remote(f"sleep-{i}", latencies[0])
                  for i in range(max(workers))]
        ray.get([a.ping.remote() for a in actors], timeout=600)
        startup_s = time.time() - t_start
        rows: list[dict[str, Any]] = []
        for latency in latencies:
            ray.get([a.set_latency.remote(latency) for a in actors])
            rounds = max(MIN_ROUNDS if not args.quick else 2, math.ceil(wall_per_case / latency))
            for n in workers:
                texts = [f"passage number {k} for the sleeping scorer" for k in range(rounds * n)]
                ideal = n / latency
                for mode, fn in (("ray", run_ray), ("pool", run_pool)):
                    r = fn(actors, n, texts, latency)
                    row = {"latency_s": latency, "workers": n, "mode": mode, "texts": len(texts),
                           "throughput": len(texts) / r["wall_s"], "ideal": ideal, **r,
                           "driver_cpu_ms_per_text": 1000 * r["driver_cpu_s"] / len(texts)}
                    rows.append(row)
                    print(f"latency {latency:g}s N={n:2d} {mode:4s}: {row['throughput']:7.2f} texts/s "
                          f"(ideal {ideal:.1f}) efficiency {row['efficiency']:.3f}", flush=True)
        for row in rows:
            if row["mode"] == "pool":
                raw = next(r for r in rows if r["mode"] == "ray" and r["workers"] == row["workers"]
                           and r["latency_s"] == row["latency_s"])
                row["pool_vs_ray"] = row["throughput"] / raw["throughput"]
    finally:
        ray.shutdown()

    cols = ["latency_s", "workers", "mode", "texts", "throughput", "ideal", "efficiency", "pool_vs_ray",
            "startup", "gaps", "imbalance", "collect", "overshoot", "calls_min", "calls_max",
            "driver_cpu_ms_per_text", "wall_s"]
    print()
    print(table(rows, cols, title="reward-pool scaling (fractions of worker-time; efficiency + losses = 1)"))
    main_latency = latencies[0]
    n_max = max(workers)
    headline = next(r for r in rows if r["mode"] == "pool" and r["workers"] == n_max and r["latency_s"] == main_latency)
    raw_headline = next(r for r in rows if r["mode"] == "ray" and r["workers"] == n_max
                        and r["latency_s"] == main_latency)
    fastest = max((r for r in rows if r["mode"] == "pool"), key=lambda r: r["throughput"])
    fastest_raw = next(r for r in rows if r["mode"] == "ray" and r["workers"] == fastest["workers"]
                       and r["latency_s"] == fastest["latency_s"])
    summary = {
        f"pool_efficiency_n{n_max}_lat{main_latency:g}": headline["efficiency"],
        f"ray_efficiency_n{n_max}_lat{main_latency:g}": raw_headline["efficiency"],
        f"pool_vs_ray_n{n_max}_lat{main_latency:g}": headline["pool_vs_ray"],
        **{f"pool_efficiency_n{r['workers']}_lat{r['latency_s']:g}": r["efficiency"]
           for r in rows if r["mode"] == "pool"},
        # The driver's CPU per text through the pool at the highest rate measured, and the rate at
        # which that alone would saturate one driver core: the pool's own ceiling on this CPU.
        "pool_driver_cpu_ms_per_text_fastest": fastest["driver_cpu_ms_per_text"],
        "ray_driver_cpu_ms_per_text_fastest": fastest_raw["driver_cpu_ms_per_text"],
        "pool_driver_ceiling_texts_per_s": 1000.0 / max(1e-9, fastest["driver_cpu_ms_per_text"]),
    }
    why = bounding_stage(headline)
    if raw_headline["efficiency"] < TARGET_EFFICIENCY:
        why += f"; Ray itself (all calls queued up front) reaches only {raw_headline['efficiency']:.3f} here"
    targets = [target(f"pool efficiency at N={n_max}, latency {main_latency:g}s", headline["efficiency"],
                      TARGET_EFFICIENCY, True, why)]
    print()
    print_targets(targets)
    for r in rows:
        if r["mode"] == "pool" and r["efficiency"] < TARGET_EFFICIENCY:
            print(f"  N={r['workers']} latency {r['latency_s']:g}s: {bounding_stage(r)}")
    report = {"bench": "pool_scaling", "quick": args.quick, "machine": machine_info(),
              "load_average_before": load_before, "load_average_after": load_average(),
              "actor_startup_s": startup_s, "latencies_s": list(latencies), "workers": list(workers),
              "summary": summary, "targets": targets, "rows": rows}
    write_json(args.json, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
