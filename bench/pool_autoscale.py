"""An autoscaled reward pool against fixed ones, in the whole loop, when rewards are the bottleneck.

    python -m bench.pool_autoscale [--quick] [--json OUT] [--steps 8] [--fixed-steps 4] [--latency S]

One ``Loop`` (``bench.loop_speed.BenchLoop``: sampler, learner and the pool kept across variants) on a
private local Ray cluster, synchronous (``algo.max_staleness: 0``), 2 prompts x 4 completions x 8 new
tokens per step: 8 texts. First a calibration block with no simulated latency measures sample +
update (S + U); then every reward worker sleeps ``reward.pipeline.simulated_latency_s = 3 x (S + U)``
per text after its real stages (no CPU: it stands in for a full-size TRIBE's GPU time), so one worker
makes the reward stage 8 x 3 = 24x sample + update and eight workers 3x. Variants, in order, on the
same sampler and learner:

- ``autoscale``: starts with 1 fresh worker and ``reward.autoscale: {min_workers: 1, max_workers: 8,
  target_queue_per_worker: 0, up_after_s: 2, down_after_idle_s: D}`` (D = 2 x (S + U + the latency): longer
  than a step, the time between a worker's bursts of texts); after its steps the load stops and the pool is
  watched until it is back at min_workers;
- ``fixed-8``: eight workers (new ones load their models first; the first step is a warm-up);
- ``fixed-1``: one worker (the first step is a warm-up).

Reported per variant: seconds per step after warm-up (autoscale: after the step at which it reached
its size, "steady state"), the step at which it reached its size, worker-seconds spent (each worker
actor from the request to its release, ``RewardPool.worker_seconds``), and for autoscale its size
after the load stopped and the seconds it took to get back to min_workers. Pool sizes come from
the pool's own status metrics (recorded from ``Loop.metrics``, once a second and at each decision).

Targets: autoscaled steady-state s/step within 1.2x of fixed-8; back to min_workers within
down_after_idle_s + one step once texts stop arriving. ``--quick``: a smoke run (1 prompt x 2
completions x 4 tokens, at most 2 workers, 2-3 steps per variant); its numbers mean nothing.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import (  # noqa: E402
    common_args,
    load_average,
    machine_info,
    median,
    print_targets,
    start_local_ray,
    table,
    target,
    write_json,
)
from bench.loop_speed import BenchLoop, CpuMeter, bench_config  # noqa: E402
from brainloop.config import AutoscaleConfig  # noqa: E402

SHAPE = {"prompts": {"prompts_per_step": 2},
         "sampler": {"num_completions": 4, "max_new_tokens": 8, "max_model_len": 256}, "reward": {"num_workers": 1}}
QUICK_SHAPE = {"prompts": {"prompts_per_step": 1}, "sampler": {"num_completions": 2, "max_new_tokens": 4,
                                                               "max_model_len": 256}, "reward": {"num_workers": 1}}
LATENCY_FACTOR = 3.0  # simulated reward latency per text = 3 x (sample + update)
MAX_WORKERS = 8
TARGET_STEADY_RATIO = 1.2
UP_AFTER_S = 2.0


class PoolTimeline:
    """Wraps ``Loop.metrics.gauges`` to keep the pool's own status exports (role ``reward-pool``) with their time."""

    def __init__(self, metrics: Any) -> None:
        self.points: list[tuple[float, dict[str, float]]] = []
        self._gauges = metrics.gauges
        metrics.gauges = self.gauges

    def gauges(self, role: str, values: dict, prefix: str = "") -> None:
        if role == "reward-pool" and "pool_alive_workers" in values:
            self.points.append((time.time(), dict(values)))
        self._gauges(role, values, prefix)

    def at(self, t: float, key: str) -> float | None:
        """The newest value of ``key`` published at or before ``t``."""
        before = [v[key] for when, v in self.points if when <= t]
        return before[-1] if before else None


def run_variant(loop: BenchLoop, name: str, steps: int, meter: CpuMeter, timeline: PoolTimeline,
                size: int, autoscale: AutoscaleConfig | None) -> dict[str, Any]:
    """``steps`` steps with the pool at ``size`` fresh workers (autoscale: starting at ``size``)."""
    pool = loop.pool
    t_mark = time.time()
    pool.set_autoscale(None)
    pool.resize(0, reason=f"bench: fresh workers for {name}")  # drained and killed: no worker carries over
    pool.resize(size, reason=f"bench: {name}")
    t0 = time.time()
    ws0 = pool.worker_seconds()
    pool.ready(timeout_s=900)
    ready_s = time.time() - t0
    pool.set_autoscale(autoscale)
    print(f"[pool_autoscale] {name}: {size} worker(s) ready in {ready_s:.0f} s; {steps} steps (load {load_average()})",
          flush=True)
    t_block = time.time()
    records = loop.run_block(0, steps, meter)
    t_end = time.time()
    for r in records:
        t_block += r["wall_seconds"]  # run_block: wall time between consecutive step ends, from its start
        r["end_time"] = t = t_block
        r["pool_alive"] = timeline.at(t, "pool_alive_workers")
        r["pool_target"] = timeline.at(t, "pool_target_workers")
    out: dict[str, Any] = {"variant": name, "start_size": size, "ready_s": ready_s, "steps": records,
                           "worker_seconds": pool.worker_seconds() - ws0, "wall_s": t_end - t0}
    top = max((r["pool_alive"] or 0) for r in records)
    reached = next((i for i, r in enumerate(records) if (r["pool_alive"] or 0) >= top), None)
    out["size_reached"] = top
    out["step_reached"] = reached  # index within the variant's steps (0 = its first step)
    warm = 1 if autoscale is None else (reached or 0) + 1
    steady = [r["wall_seconds"] for r in records[warm:]]
    out["steady_steps"] = len(steady)
    out["seconds_per_step"] = sum(steady) / len(steady) if steady else float("nan")
    out["seconds_per_step_median"] = median(steady)
    if autoscale is not None:
        # The load stops: nothing is submitted any more. Upkeep as the driver does it between polls.
        t_stop = time.time()
        size_at_stop = len(pool.workers)
        while len(pool.workers) > autoscale.min_workers and time.time() - t_stop < 4 * autoscale.down_after_idle_s:
            pool.maintain()
            time.sleep(0.25)
        out["after_load"] = {"size_at_stop": size_at_stop, "size_after": len(pool.workers),
                             "seconds_to_min": time.time() - t_stop if len(pool.workers) <= autoscale.min_workers
                             else None,
                             "worker_seconds_idle": pool.worker_seconds() - ws0 - out["worker_seconds"]}
    out["decisions"] = [d for d in pool.decisions if d["time"] >= t_mark]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = common_args(__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=None, help="autoscaled steps (default 8; quick 3)")
    parser.add_argument("--fixed-steps", type=int, default=None, help="steps per fixed pool, the first a warm-up "
                                                                       "(default 4 for 8 workers, 2 for 1; quick 2)")
    parser.add_argument("--latency", type=float, default=None,
                        help="simulated seconds per text (default: 3 x the calibrated sample + update)")
    args = parser.parse_args(argv)
    quick = args.quick
    max_workers = 2 if quick else MAX_WORKERS
    auto_steps = args.steps or (3 if quick else 8)
    # fixed-1 is slow (8 x the latency per step) and predictable: one warm-up and one measured step by default
    fixed_steps = {max_workers: args.fixed_steps or (2 if quick else 4), 1: args.fixed_steps or 2}
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    cfg = bench_config(overrides=QUICK_SHAPE if quick else SHAPE, name="bench-pool-autoscale")
    load_start = load_average()
    t_start = time.time()
    # Logical CPUs: sampler 1, learner 1, up to max_workers reward workers 1 each (they mostly sleep).
    start_local_ray("bench-pool-autoscale", num_cpus=max_workers + 4)
    meter = CpuMeter()
    meter.start()
    run_dir = Path(tempfile.mkdtemp(prefix="bench-pool-autoscale-"))
    loop = BenchLoop(cfg, run_dir)
    variants: list[dict[str, Any]] = []
    try:
        loop.start()
        timeline = PoolTimeline(loop.metrics)
        setup_s = time.time() - t_start
        print(f"[pool_autoscale] calibration, no simulated latency (set-up {setup_s:.0f} s)", flush=True)
        calib = loop.run_block(0, 2 if quick else 4, meter)[1:]
        s_plus_u = median([r["sample_seconds"] + r["update_seconds"] for r in calib])
        latency = args.latency if args.latency is not None else round(LATENCY_FACTOR * s_plus_u, 2)
        loop.cfg.reward.pipeline.simulated_latency_s = latency  # what every worker made from now on sleeps
        # Longer than a step with the latency (a worker done early in a step's reward stage idles until the
        # next step's texts): twice its lower bound, sample + update + one text's latency.
        down_after = max(10.0, round(2 * (s_plus_u + latency), 1))
        autoscale = AutoscaleConfig(min_workers=1, max_workers=max_workers, target_queue_per_worker=0.0,
                                    up_after_s=UP_AFTER_S, down_after_idle_s=down_after)
        print(f"[pool_autoscale] sample + update {s_plus_u:.2f} s -> simulated latency {latency:.2f} s per text; "
              f"down_after_idle_s {down_after:g}", flush=True)
        for name, steps, size, scaler in (("autoscale", auto_steps, 1, autoscale),
                                          (f"fixed-{max_workers}", fixed_steps[max_workers], max_workers, None),
                                          ("fixed-1", fixed_steps[1], 1, None)):
            variants.append(run_variant(loop, name, steps, meter, timeline, size, scaler))
            v = variants[-1]
            print(table([{k: s[k] for k in ("step", "wall_seconds", "sample_seconds", "reward_seconds",
                                            "update_seconds", "pool_alive", "pool_target")} for s in v["steps"]],
                        title=f"{name}: {v['seconds_per_step']:.2f} s/step after warm-up, "
                              f"{v['worker_seconds']:.0f} worker-seconds"), flush=True)
    finally:
        meter.stop()
        loop.close()
        shutil.rmtree(run_dir, ignore_errors=True)
        import ray

        ray.shutdown()

    auto, big = variants[:2]
    after = auto["after_load"]
    steady_ratio = auto["seconds_per_step"] / big["seconds_per_step"]
    back_limit = autoscale.down_after_idle_s + auto["seconds_per_step"]
    summary = {
        "sample_plus_update_s": s_plus_u, "simulated_latency_s_per_text": latency,
        "texts_per_step": cfg.prompts.prompts_per_step * cfg.sampler.num_completions,
        **{f"{v['variant']}_seconds_per_step": v["seconds_per_step"] for v in variants},
        **{f"{v['variant']}_worker_seconds": v["worker_seconds"] for v in variants},
        "autoscale_size_reached": auto["size_reached"], "autoscale_step_reached": auto["step_reached"],
        "autoscale_vs_fixed_max": steady_ratio,
        "autoscale_size_after_load": after["size_after"], "autoscale_seconds_to_min": after["seconds_to_min"],
        "down_after_idle_s": autoscale.down_after_idle_s,
    }
    targets = [
        target(f"autoscaled steady-state s/step / fixed-{max_workers} s/step", steady_ratio, TARGET_STEADY_RATIO, False,
               f"steady state at {auto['size_reached']} workers (of {max_workers}) took "
               f"{auto['seconds_per_step']:.1f} s/step vs {big['seconds_per_step']:.1f}"),
        target("seconds back to min_workers after the load stopped, over down_after_idle_s + one step",
               (after["seconds_to_min"] if after["seconds_to_min"] is not None else float("inf")) / back_limit, 1.0,
               False, f"still {after['size_after']} workers after {4 * autoscale.down_after_idle_s:.0f} s"),
    ]
    report = {
        "bench": "pool_autoscale", "quick": quick, "machine": machine_info(),
        "settings": {"prompts_per_step": cfg.prompts.prompts_per_step, "num_completions": cfg.sampler.num_completions,
                     "max_new_tokens": cfg.sampler.max_new_tokens, "max_staleness": 0,
                     "autoscale": autoscale.model_dump(), "latency_factor": LATENCY_FACTOR,
                     "calibration_steps": [{k: r[k] for k in ("wall_seconds", "sample_seconds", "update_seconds",
                                                              "reward_seconds")} for r in calib],
                     "step_seconds": "wall time between consecutive step ends (metrics.jsonl time)",
                     "worker_seconds": "each reward-worker actor from its request to its release, summed"},
        "total_wall_seconds": time.time() - t_start, "load_average_start": load_start,
        "load_average_end": load_average(),
        "summary": summary, "targets": targets, "variants": variants,
    }
    print(table([{"variant": v["variant"], "s/step": v["seconds_per_step"], "median": v["seconds_per_step_median"],
                  "n": v["steady_steps"], "size": v["size_reached"], "reached at step": v["step_reached"],
                  "worker-s": v["worker_seconds"]} for v in variants],
                title=f"\nreward pool autoscaling, {latency:.2f} s simulated per text (3 x sample + update)"))
    print(f"after the load stopped: {after['size_at_stop']} -> {after['size_after']} workers in "
          f"{after['seconds_to_min']} s (down_after_idle_s {autoscale.down_after_idle_s:g})")
    print_targets(targets)
    write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
