"""Seconds per step of the whole loop: async vs sync, and brainloop vs the reference's sequential design.

    python -m bench.loop_speed [--quick] [--json OUT] [--rounds 2] [--steps-per-block 4]
                               [--reward-latency match|none|SECONDS] [--set key=value ...]

Three variants run on the same config (``configs/demo.yaml``: 2 prompts x 4 completions x 48 new
tokens, SmolLM2-135M + LoRA, two TRIBE reward workers), alternated in blocks within ONE run:

- ``sync``      the brainloop ``Loop`` on a private local Ray cluster (vLLM sampler actor, PEFT
                learner actor, two reward-worker actors), ``algo.max_staleness = 0``;
- ``async``     the same Loop, the same actors, ``algo.max_staleness = 1`` (step t+1 is sampled
                while step t is scored and learned, and scored while step t is learned);
- ``reference`` ``bench.reference_loop.ReferenceLoop``: the reference's sequential design in this
                process (transformers ``generate`` -> each text scored in turn -> one update).

Two phases, each with its own actors: (1) the real pipeline as it runs on this CPU; (2) the same
with ``reward.pipeline.simulated_latency_s`` per text (a sleep after the real stages, no CPU) set
so that the reward stage takes as long as sampling + update measured in phase 1 -- the shape of a
cluster step, where TRIBE's GPU time sets the reward's pace. Phase 2 carries the async target.

The Loop's actors are started once per phase and kept across blocks (``BenchLoop``:
``Loop.run(stop_after=)`` with the start-up made idempotent); between blocks the actors are drained,
so a block never overlaps the next. Each block's first step is a warm-up (for async it also fills
the pipeline) and is dropped. A Loop step's seconds are the wall time between consecutive steps'
ends (metrics.jsonl ``time``), so everything the driver does counts; ratios use the mean over
measured steps (throughput: async steps alternate short and long), medians are reported too.

Also recorded: per-stage seconds (what the driver waited for: metrics.jsonl ``sample_seconds``,
``reward_seconds``, ``update_seconds``; ``reward_latency_seconds`` for the stage itself), and the
CPU seconds each step consumed in this process tree (driver + Ray + actors, sampled with psutil),
because on a 2-core machine the async loop cannot be faster than (CPU seconds per step) / (cores)
however well it overlaps.

Bounds printed with the result (S sample, R reward, U update, O the rest of a sync step): overlap
bound = (S + R + U + O) / max(S, R, U + O, (S + R + U + O) / 2) -- the most k=1 pipelining can
save -- and CPU bound = cores * sync step seconds / CPU seconds per sync step.

Checkpoints are off (``run.checkpoint_every`` beyond the run) and the reward cache is off, in every
variant. ``--quick`` (the smoke test): 1 prompt x 2 completions x 8 tokens, one round of 2 steps;
phase 2 without the reference.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import sys
import tempfile
import threading
import time
from collections import deque
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
from brainloop.config import Config, load_config, parse_override  # noqa: E402
from brainloop.driver import Loop  # noqa: E402
from brainloop.job import configure_logging  # noqa: E402

DEFAULT_CONFIG = ROOT / "configs" / "demo.yaml"
NEVER = 10**6  # run.steps / checkpoint_every beyond any benchmark: the loop never finishes or checkpoints
QUICK = {"prompts": {"prompts_per_step": 1},
         "sampler": {"num_completions": 2, "max_new_tokens": 8, "max_model_len": 256}}
TARGET_ASYNC_SPEEDUP = 1.6
# Thread settings that change CPU results (the Ray workers inherit them from this process).
THREAD_ENV = ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "GOMP_SPINCOUNT", "KMP_BLOCKTIME", "MKL_NUM_THREADS")


# ---- configuration ----------------------------------------------------------------------------


def merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def bench_config(config: Path | str = DEFAULT_CONFIG, quick: bool = False, overrides: dict | None = None,
                 name: str = "bench-loop-speed") -> Config:
    """The demo config for benchmarking: never finishing, no checkpoints, no reward cache."""
    base = {"run": {"name": name, "steps": NEVER, "checkpoint_every": NEVER}, "reward": {"cache": False}}
    if quick:
        base = merge(base, QUICK)
    return load_config(config, merge(base, overrides or {}))


def parse_sets(items: list[str]) -> dict:
    out: dict = {}
    for text in items:
        out = merge(out, parse_override(text))
    return out


# ---- CPU accounting ---------------------------------------------------------------------------


class CpuMeter(threading.Thread):
    """Cumulative CPU seconds of this process and all its descendants (the local Ray cluster's
    GCS, raylet and actor workers, a TRL subprocess), sampled every ``interval`` seconds, in total
    and per role (``ROLES``: which actor a Ray worker process hosts, from its process title).

    A process's time is kept after it exits (per (pid, start time)), so the totals never drop.
    """

    ROLES = ("Sampler", "Learner", "RewardWorker")

    def __init__(self, interval: float = 0.25) -> None:
        super().__init__(daemon=True, name="cpu-meter")
        self.interval = interval
        self.samples: list[tuple[float, float, dict[str, float]]] = []
        self._per_process: dict[tuple[int, float], float] = {}
        self._role: dict[tuple[int, float], str] = {}
        self._stop_event = threading.Event()
        self._lock = threading.Lock()

    def _role_of(self, proc: Any, key: tuple[int, float], me: int) -> str:
        role = self._role.get(key, "other")
        if role == "other":
            if proc.pid == me:
                role = "driver"
            else:
                title = " ".join(proc.cmdline()[:1])
                role = next((r.lower() for r in self.ROLES if title.startswith(f"ray::{r}")), "other")
                if title.startswith("ray::IDLE"):
                    return "other"  # not yet hosting an actor: look again next time
            self._role[key] = role
        return role

    def read(self) -> tuple[float, dict[str, float]]:
        import psutil

        me = psutil.Process()
        roles: dict[str, float] = {}
        for proc in [me, *me.children(recursive=True)]:
            try:
                key = (proc.pid, proc.create_time())
                times = proc.cpu_times()
                self._per_process[key] = times.user + times.system
                self._role_of(proc, key, me.pid)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        for key, cpu in self._per_process.items():
            role = self._role.get(key, "other")
            roles[role] = roles.get(role, 0.0) + cpu
        return sum(self._per_process.values()), roles

    def run(self) -> None:
        while not self._stop_event.is_set():
            total, roles = self.read()
            with self._lock:
                self.samples.append((time.time(), total, roles))
            self._stop_event.wait(self.interval)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=5)

    def at(self, t: float) -> float:
        """Cumulative CPU seconds at time ``t`` (linear interpolation between samples)."""
        with self._lock:
            samples = [(s[0], s[1]) for s in self.samples]
        if not samples:
            return float("nan")
        if t <= samples[0][0]:
            return samples[0][1]
        for (t0, c0), (t1, c1) in itertools.pairwise(samples):
            if t0 <= t <= t1:
                return c0 + (c1 - c0) * (t - t0) / max(1e-9, t1 - t0)
        return samples[-1][1]

    def between(self, t0: float, t1: float) -> float:
        return self.at(t1) - self.at(t0)

    def roles_between(self, t0: float, t1: float) -> dict[str, float]:
        """CPU seconds per role from the last sample at or before ``t0`` to the last at or before ``t1``."""
        with self._lock:
            samples = list(self.samples)

        def last(t: float) -> dict[str, float]:
            before = [s for s in samples if s[0] <= t]
            return (before[-1] if before else samples[0])[2] if samples else {}

        a, b = last(t0), last(t1)
        return {role: round(b[role] - a.get(role, 0.0), 3) for role in b}


# ---- the Loop, kept alive across blocks --------------------------------------------------------


class BenchLoop(Loop):
    """``Loop`` whose actors, probe baseline and run directory are set up once, so that
    ``run(stop_after=n)`` can be called again and again (with ``cfg.algo.max_staleness`` changed in
    between) on the same warm actors. The step code itself is ``Loop.run``, unchanged."""

    _started = False
    _restored = False

    def _start_actors(self) -> None:
        if not self._started:
            super()._start_actors()
            self._started = True

    def _prepare_probe(self) -> None:
        if not hasattr(self, "probe_base"):
            super()._prepare_probe()

    def _restore(self) -> deque:
        if self._restored:
            return deque()
        self._restored = True
        return super()._restore()

    def start(self) -> None:
        """Actors, probe baseline and run directory, once (what ``run`` does first)."""
        self._start_actors()
        self._prepare_probe()
        self._restore()

    def drain(self) -> None:
        """Wait until the sampler and learner have finished everything queued (an async block
        leaves one generation and one probe in flight), so blocks never overlap."""
        import ray

        ray.get([self.sampler.current_version.remote(), self.learner.info.remote()])

    def run_block(self, staleness: int, steps: int, meter: CpuMeter) -> list[dict[str, Any]]:
        """``steps`` steps with ``algo.max_staleness = staleness``; one record per step."""
        self.cfg.algo.max_staleness = staleness
        before = len(self.files.read_metrics())
        t_block = time.time()
        self.run(stop_after=steps)
        self.drain()
        records = [m for m in self.files.read_metrics()[before:] if "reward_mean" in m]
        out, prev = [], t_block
        for m in records:
            out.append({"step": m["step"], "wall_seconds": m["time"] - prev,
                        "cpu_seconds": meter.between(prev, m["time"]),
                        "cpu_by_role": meter.roles_between(prev, m["time"]),
                        "learner_update_seconds": m.get("update_s"), "update_threads": m.get("update_threads"),
                        "sample_seconds": m["sample_seconds"], "reward_seconds": m["reward_seconds"],
                        "update_seconds": m["update_seconds"], "loop_step_seconds": m["step_seconds"],
                        "reward_latency_seconds": m.get("reward_latency_seconds"),
                        "scored_ahead": m.get("scored_ahead"),
                        "staleness_max": m.get("staleness_max"), "mean_tokens": m["mean_tokens"],
                        "num_scored": m["num_scored"], "num_samples": m["num_samples"]})
            prev = m["time"]
        return out


def run_reference_block(ref: Any, first_step: int, steps: int, meter: CpuMeter) -> list[dict[str, Any]]:
    out = []
    for k in range(first_step, first_step + steps):
        t0 = time.time()
        s = ref.step(k)
        t1 = time.time()
        out.append({"step": k, "wall_seconds": t1 - t0, "cpu_seconds": meter.between(t0, t1),
                    "cpu_by_role": meter.roles_between(t0, t1),
                    "sample_seconds": s.sample_seconds, "reward_seconds": s.reward_seconds,
                    "update_seconds": s.update_seconds, "mean_tokens": s.mean_tokens,
                    "num_scored": s.num_scored, "num_samples": s.num_samples})
    return out


# ---- analysis ---------------------------------------------------------------------------------


def summarise_variant(blocks: list[dict[str, Any]], cores: int) -> dict[str, Any]:
    """Per-step figures over every block's steps after the first (the warm-up).

    ``step_seconds_mean`` is the throughput figure the ratios use: with k=1 and the reward scored
    ahead, async steps alternate short and long (a step whose rewards were ready waits only for its
    update), so the mean, not the median, is seconds per step over a run."""
    steps = [s for b in blocks for s in b["steps"][1:]]
    if not steps:
        return {"steps_measured": 0}
    out: dict[str, Any] = {"steps_measured": len(steps),
                           "step_seconds": [round(s["wall_seconds"], 4) for s in steps]}
    for key in ("wall_seconds", "sample_seconds", "reward_seconds", "update_seconds", "cpu_seconds", "mean_tokens"):
        out[f"{key}_median"] = median([s[key] for s in steps])
    out["step_seconds_median"] = out.pop("wall_seconds_median")
    out["step_seconds_mean"] = sum(s["wall_seconds"] for s in steps) / len(steps)
    out["other_seconds_median"] = max(0.0, out["step_seconds_median"] - out["sample_seconds_median"]
                                      - out["reward_seconds_median"] - out["update_seconds_median"])
    learner = [s["learner_update_seconds"] for s in steps if s.get("learner_update_seconds") is not None]
    if learner:  # time inside Learner.update; the rest of update_seconds is export, push and probe
        out["learner_update_seconds_median"] = median(learner)
    latency = [s["reward_latency_seconds"] for s in steps if s.get("reward_latency_seconds") is not None]
    if latency:  # the reward stage itself (sampled -> all scored), wherever the driver waited for it
        out["reward_latency_seconds_median"] = median(latency)
    roles = sorted({r for s in steps for r in s.get("cpu_by_role", {})})
    if roles:  # CPU seconds per step by process role (sampler, learner, rewardworker, driver, other)
        out["cpu_by_role_median"] = {r: median([s.get("cpu_by_role", {}).get(r, 0.0) for s in steps]) for r in roles}
    # Fraction of the machine's cores this process tree kept busy.
    out["cpu_utilisation"] = sum(s["cpu_seconds"] for s in steps) / (cores * sum(s["wall_seconds"] for s in steps))
    return out


def bounds(sync: dict[str, Any], cores: int) -> dict[str, float]:
    """How much faster k=1 pipelining could make a sync step, from the sync stages.

    With k=1 the sampler, the reward pool and the learner each work on a different step, and the
    chain "sample t+1 (after update t-1) -> score t+1 -> update t+1" spans two steps, so an async
    step takes at least max(S, R, U + O, (S + R + U + O) / 2): at most 2x."""
    s, r, u = sync["sample_seconds_median"], sync["reward_seconds_median"], sync["update_seconds_median"]
    o = max(0.0, sync["step_seconds_median"] - s - r - u)
    total = s + r + u + o
    overlap = total / max(s, r, u + o, total / 2)
    cpu = cores * sync["step_seconds_median"] / sync["cpu_seconds_median"] if sync["cpu_seconds_median"] > 0 \
        else math.inf
    return {"overlap_bound": overlap, "cpu_bound": cpu, "async_bound": min(overlap, cpu),
            "sample_share": s / total}


def why_async_missed(b: dict[str, float], sync: dict[str, Any], asyn: dict[str, Any], cores: int) -> str:
    parts = []
    if b["overlap_bound"] < TARGET_ASYNC_SPEEDUP:
        stages = {"sample": sync["sample_seconds_median"], "reward": sync["reward_seconds_median"],
                  "update": sync["update_seconds_median"]}
        slowest = max(stages, key=stages.get)
        parts.append(f"the {slowest} stage is {stages[slowest]:.2f} s of a {sync['step_seconds_median']:.2f} s sync "
                     f"step, so overlapping the others can give at most {b['overlap_bound']:.2f}x")
    if b["cpu_bound"] < TARGET_ASYNC_SPEEDUP:
        parts.append(f"CPU-bound: a sync step already burns {sync['cpu_seconds_median']:.1f} CPU-s in "
                     f"{sync['step_seconds_median']:.1f} s on {cores} cores ({sync['cpu_utilisation']:.0%} busy), so "
                     f"overlap can give at most {b['cpu_bound']:.2f}x; async used {asyn.get('cpu_utilisation', 0):.0%}")
    if not parts:
        parts.append(f"bounds allow {b['async_bound']:.2f}x; the rest is contention between the sampler, "
                     "learner and reward workers for the same cores")
    return "; ".join(parts)


# ---- main -------------------------------------------------------------------------------------


def schedule(rounds: int, names: tuple[str, ...] = ("sync", "async", "reference")) -> list[tuple[int, str]]:
    """(round, variant) blocks, the order rotated each round (A B C, B C A, C A B, ...)."""
    out = []
    for r in range(rounds):
        for i in range(len(names)):
            out.append((r, names[(r + i) % len(names)]))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = common_args(__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    parser.add_argument("--rounds", type=int, default=None, help="rounds of (sync, async, reference) blocks")
    parser.add_argument("--steps-per-block", type=int, default=None, help="steps per block, the first a warm-up")
    parser.add_argument("--reward-latency", default="match",
                        help="second phase: 'match' (simulated reward latency = sync sample + update time of the "
                             "first phase), seconds per text, or 'none' to skip it")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    args = parser.parse_args(argv)
    configure_logging()  # the loops' progress lines, as in `ray job logs`
    rounds = args.rounds or (1 if args.quick else 2)
    per_block = args.steps_per_block or (2 if args.quick else 4)
    if per_block < 2:
        parser.error("--steps-per-block must be at least 2 (the first step of a block is a warm-up)")
    if args.reward_latency not in ("match", "none"):
        try:
            float(args.reward_latency)
        except ValueError:
            parser.error("--reward-latency must be 'match', 'none' or seconds per text")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    cfg = bench_config(args.config, args.quick, parse_sets(args.set))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    partial = args.json.with_suffix(".partial.json") if args.json else None
    report = run_bench(cfg, rounds, per_block, cores, quick=args.quick, partial=partial,
                       reward_latency=args.reward_latency)
    print_report(report)
    write_json(args.json, report)
    if partial is not None:
        partial.unlink(missing_ok=True)
    return 0


def run_phase(cfg: Config, variants: tuple[str, ...], rounds: int, per_block: int, cores: int, meter: CpuMeter,
              label: str, partial: Path | None = None, done: list | None = None) -> dict[str, Any]:
    """Alternated blocks of ``variants`` on one set of actors (and one in-process reference loop)."""
    from bench.reference_loop import ReferenceLoop

    run_dir = Path(tempfile.mkdtemp(prefix="bench-loop-speed-"))
    loop = BenchLoop(cfg, run_dir)
    blocks: list[dict[str, Any]] = []
    try:
        t0 = time.time()
        loop.start()
        actors_seconds = time.time() - t0
        t0 = time.time()
        ref = ReferenceLoop(cfg) if "reference" in variants else None
        reference_load_seconds = time.time() - t0
        ref_step = 0
        for rnd, variant in schedule(rounds, variants):
            load = load_average()
            print(f"[loop_speed] {label}, round {rnd + 1}/{rounds}: {variant} x {per_block} steps (load {load})",
                  flush=True)
            if variant == "reference":
                steps = run_reference_block(ref, ref_step, per_block, meter)
                ref_step += per_block
            else:
                steps = loop.run_block(0 if variant == "sync" else 1, per_block, meter)
            blocks.append({"round": rnd, "variant": variant, "load_before": load, "load_after": load_average(),
                           "steps": steps})
            print(table([{k: v for k, v in s.items() if k in ("step", "wall_seconds", "cpu_seconds", "sample_seconds",
                                                              "reward_seconds", "update_seconds")} for s in steps]),
                  flush=True)
            if partial is not None:
                write_json(partial, {"bench": "loop_speed", "partial": True, "phase": label,
                                     "earlier_phases": done or [], "blocks": blocks})
    finally:
        loop.close()
        shutil.rmtree(run_dir, ignore_errors=True)
    summaries = {name: summarise_variant([b for b in blocks if b["variant"] == name], cores) for name in variants}
    return {"phase": label, "simulated_latency_s_per_text": cfg.reward.pipeline.simulated_latency_s,
            "setup_seconds": {"ray_and_actors": actors_seconds, "reference_models": reference_load_seconds},
            "order": [f"{v}@{r}" for r, v in schedule(rounds, variants)],
            "variants": summaries, "blocks": blocks}


def matched_latency(sync: dict[str, Any], cfg: Config) -> float:
    """Seconds per text to add so that the reward stage takes as long as sampling + update: the pool's
    workers score ``n / workers`` texts each, one after the other."""
    n = cfg.prompts.prompts_per_step * cfg.sampler.num_completions
    missing = sync["sample_seconds_median"] + sync["update_seconds_median"] - sync["reward_seconds_median"]
    return max(0.0, missing) * cfg.reward.num_workers / n


def speedups(variants: dict[str, Any]) -> dict[str, float]:
    sync, asyn = variants["sync"]["step_seconds_mean"], variants["async"]["step_seconds_mean"]
    out = {"async_speedup": sync / asyn}
    if "reference" in variants and variants["reference"].get("steps_measured"):
        ref = variants["reference"]["step_seconds_mean"]
        out |= {"reference_over_sync": ref / sync, "reference_over_async": ref / asyn}
    return out


def run_bench(cfg: Config, rounds: int, per_block: int, cores: int, quick: bool = False,
              partial: Path | None = None, reward_latency: str = "match") -> dict[str, Any]:
    """Phase 1: the real pipeline (sync, async, reference). Phase 2 (item 3 of the benchmark issue):
    the same, with a simulated reward latency per text that makes the reward stage as long as
    sampling + update, as on a cluster where TRIBE's GPU time, not our CPU, sets the reward's pace.
    ``partial``: where to dump the blocks measured so far after each one."""
    import ray

    load_start = load_average()
    t_start = time.time()
    start_local_ray("bench-loop-speed")
    meter = CpuMeter()
    meter.start()
    phases: list[dict[str, Any]] = []
    try:
        phases.append(run_phase(cfg, ("sync", "async", "reference"), rounds, per_block, cores, meter,
                                "real pipeline", partial))
        if reward_latency != "none":
            latency = matched_latency(phases[0]["variants"]["sync"], cfg) if reward_latency == "match" \
                else float(reward_latency)
            matched = cfg.model_copy(deep=True)
            matched.reward.pipeline.simulated_latency_s = round(latency, 3)
            variants = ("sync", "async") if quick else ("sync", "async", "reference")
            phases.append(run_phase(matched, variants, rounds, per_block, cores, meter,
                                    "reward latency = sample + update", partial, done=phases))
    finally:
        meter.stop()
        ray.shutdown()

    real = phases[0]
    sync, asyn = real["variants"]["sync"], real["variants"]["async"]
    b = bounds(sync, cores)
    real["ratios"], real["bounds"] = speedups(real["variants"]), b
    targets = []
    summary: dict[str, Any] = {"completions_per_step": cfg.prompts.prompts_per_step * cfg.sampler.num_completions}
    if len(phases) > 1:
        m = phases[1]
        ms, ma = m["variants"]["sync"], m["variants"]["async"]
        m["ratios"], m["bounds"] = speedups(m["variants"]), bounds(ms, cores)
        targets.append(target("async vs sync speed-up, reward latency = sample + update (sync s/step / async s/step)",
                              m["ratios"]["async_speedup"], TARGET_ASYNC_SPEEDUP, True,
                              why_async_missed(m["bounds"], ms, ma, cores)))
        summary |= {"matched_latency_s_per_text": m["simulated_latency_s_per_text"],
                    "matched_sync_seconds_per_step": ms["step_seconds_mean"],
                    "matched_async_seconds_per_step": ma["step_seconds_mean"],
                    **{f"matched_{k}": v for k, v in m["ratios"].items()},
                    "matched_bound_async": m["bounds"]["async_bound"]}
    targets.append(target("async vs sync speed-up, real pipeline on this CPU (no target of its own; >= 1.6 shown)",
                          real["ratios"]["async_speedup"], TARGET_ASYNC_SPEEDUP, True, why_async_missed(b, sync, asyn,
                                                                                                        cores)))
    summary |= {
        "sync_seconds_per_step": sync["step_seconds_mean"],
        "async_seconds_per_step": asyn["step_seconds_mean"],
        "reference_seconds_per_step": real["variants"]["reference"]["step_seconds_mean"],
        **real["ratios"],
        **{f"bound_{k}": v for k, v in b.items()},
    }
    return {
        "bench": "loop_speed", "quick": quick, "machine": machine_info(),
        "settings": {
            "prompts_per_step": cfg.prompts.prompts_per_step, "num_completions": cfg.sampler.num_completions,
            "completions_per_step": summary["completions_per_step"], "max_new_tokens": cfg.sampler.max_new_tokens,
            "reward_workers": cfg.reward.num_workers, "sampler_engine": cfg.sampler.engine,
            "lora": cfg.policy.lora.model_dump(), "rounds": rounds, "steps_per_block": per_block,
            "warmup_steps_per_block": 1, "reward_cache": cfg.reward.cache, "checkpoints": "off", "cores": cores,
            "reference_threads": cores, "step_seconds": "wall time between consecutive step ends; ratios use "
                                                        "the mean over measured steps (throughput)",
            "sampler_cpu_threads": cfg.sampler.cpu_threads, "learner_cpu_threads": cfg.learner.cpu_threads,
            "sampler_cpu_threads_alone": cfg.sampler.cpu_threads_alone,  # sync mode only
            "learner_cpu_threads_alone": cfg.learner.cpu_threads_alone,
            "reward_torch_threads": cfg.reward.pipeline.torch_threads, "reward_latency": reward_latency,
            "env": {k: os.environ.get(k) for k in THREAD_ENV},
        },
        "total_wall_seconds": time.time() - t_start,
        "load_average_start": load_start, "load_average_end": load_average(),
        # Phase 1 at the top level (what earlier reports had); every phase in full under "phases".
        "variants": real["variants"], "ratios": real["ratios"], "bounds": b, "blocks": real["blocks"],
        "phases": [{k: v for k, v in ph.items() if k != "blocks"} | {"blocks": ph["blocks"]} for ph in phases],
        "summary": summary, "targets": targets,
        "notes": [
            "k=1 async step >= max(S, R, U+O, (S+R+U+O)/2) (overlap bound, at most 2x) and >= CPU seconds per sync "
            "step / cores (CPU bound): on one 2-core machine the sampler, learner and reward workers compete for "
            "the same cores, so overlap buys only the idle core-time a sync step leaves",
            "phase 2 adds a sleep per text after the real reward stages (reward.pipeline.simulated_latency_s): it "
            "stands in for the GPU time of a full-size TRIBE and uses no CPU, as on a cluster where reward workers "
            "have their own GPUs",
            "reference = the sequential design in one process (bench/reference_loop.py): transformers generate, "
            "each text scored in turn, one Learner.update; it uses all cores in every stage",
        ],
    }


def print_report(report: dict[str, Any]) -> None:
    for phase in report["phases"]:
        rows = []
        for name, v in phase["variants"].items():
            if not v.get("steps_measured"):
                continue
            rows.append({"variant": name, "s/step": v["step_seconds_mean"], "median": v["step_seconds_median"],
                         "sample": v["sample_seconds_median"], "reward": v["reward_seconds_median"],
                         "update": v["update_seconds_median"],
                         "(learner)": v.get("learner_update_seconds_median", float("nan")),
                         "cpu-s/step": v["cpu_seconds_median"], "cpu busy": v["cpu_utilisation"],
                         "n": v["steps_measured"]})
        print(table(rows, title=f"\n{phase['phase']} (simulated reward latency "
                                f"{phase['simulated_latency_s_per_text']:g} s/text), "
                                f"{report['settings']['completions_per_step']} completions/step; s/step = mean, "
                                "stages = medians of what the driver waited for"))
        print(table([{"variant": name, **v.get("cpu_by_role_median", {})} for name, v in phase["variants"].items()],
                    title="CPU seconds per step by process (medians)"))
        print(table([phase["ratios"] | phase["bounds"]], title="ratios and bounds"))
    print_targets(report["targets"])
    print(json.dumps({"load_average_start": report["load_average_start"],
                      "load_average_end": report["load_average_end"]}))


if __name__ == "__main__":
    sys.exit(main())
