"""The actor-learner loop.

The driver holds actor handles and moves object references; actors never call each other. Data
flows one way around the loop:

    prompts -> sampler -> completions -> reward pool (streamed) -> advantages -> learner
            -> adapter (object ref) -> sampler

With ``algo.max_staleness = k >= 1`` the sampler generates step t+1 .. t+k while step t is being
scored and learned from; each sample records the adapter version it came from and the learner
corrects off-policy samples with truncated importance weights. ``k = 0`` is the synchronous
reference algorithm.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import ray
from ray.exceptions import RayActorError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from brainloop import algo
from brainloop.checkpoint import latest_checkpoint, load_checkpoint, load_older_adapters, save_checkpoint
from brainloop.config import Config, dump_config
from brainloop.metrics import RunMetrics
from brainloop.prompts import Prompt, load_prompts, prompts_for_step, split
from brainloop.rois import ROI_NAMES, SUMMARY_NAMES
from brainloop.rollout_log import RunFiles
from brainloop.types import ScoreResult


class AdapterProbeError(RuntimeError):
    """The sampler is not serving the adapter the learner just produced."""


@dataclass
class PendingGeneration:
    step: int
    prompts: list[Prompt]
    temperature: float
    ref: ray.ObjectRef
    launched_at: float
    adapter_version: int  # the version it samples from: the newest pushed when it was launched


@dataclass
class ScoringBatch:
    """One step's completions in the reward pool: results arrive keyed (step, prompt, sample)."""

    generation: PendingGeneration
    completions: list
    sampled_at: float
    results: dict[tuple[int, int], tuple[ScoreResult, float]] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return len(self.results) == sum(len(group) for group in self.completions)


@dataclass
class ProbeResult:
    version: int
    sampler_vs_learner: float  # max |log p| difference, sampler vs learner, same adapter
    adapter_vs_base: float  # max |log p| difference the adapter makes (learner)
    sampler_vs_base: float


def check_probe(version: int, sampler_lp: list[float], learner_lp: list[float], base_lp: list[float],
                tolerance: float, min_effect: float, noise_floor: float = 0.0) -> ProbeResult:
    """Fail loudly unless the sampler's log-probs are the learner's adapter's.

    Two conditions: the sampler agrees with the learner within ``tolerance``; and once the adapter
    changes the probe by more than the engines' numerical disagreement on the base model
    (``noise_floor``, measured at start-up), the sampler is closer to the adapter than to the base
    model. The second catches a sampler silently serving the base model while the adapter is still
    too small for the first.
    """
    s, lrn, base = (np.asarray(x, dtype=np.float64) for x in (sampler_lp, learner_lp, base_lp))
    if not (s.shape == lrn.shape == base.shape) or s.size == 0:
        raise AdapterProbeError(f"probe log-prob shapes differ: {s.shape} {lrn.shape} {base.shape}")
    result = ProbeResult(version, float(np.abs(s - lrn).max()), float(np.abs(lrn - base).max()),
                         float(np.abs(s - base).max()))
    if result.sampler_vs_learner > tolerance:
        raise AdapterProbeError(
            f"adapter v{version}: sampler and learner log-probs differ by {result.sampler_vs_learner:.4g} "
            f"> tolerance {tolerance} (adapter effect {result.adapter_vs_base:.4g}, sampler vs base "
            f"{result.sampler_vs_base:.4g}); the sampler is not serving this adapter")
    if version > 0 and result.adapter_vs_base > max(min_effect, 2 * noise_floor) and \
            result.sampler_vs_base <= result.sampler_vs_learner:
        raise AdapterProbeError(f"adapter v{version}: the sampler matches the base model, not the adapter")
    return result


@dataclass
class LoopState:
    step: int = 0  # next step to run
    version: int = 0  # adapter version the learner holds (= updates applied)
    best_reward: float = -math.inf
    samples_scored: int = 0
    samples_failed: int = 0
    history: list[dict] = field(default_factory=list)


class Loop:
    def __init__(self, cfg: Config, run_dir: Path, resume: bool = False) -> None:
        self.cfg = cfg
        self.files = RunFiles(run_dir)
        self.resume = resume
        self.metrics = RunMetrics(cfg.run.name)
        prompts = load_prompts(cfg.prompts.file)
        self.train_prompts = split(prompts, "train")
        self.state = LoopState()
        self.pg = None
        (self.files.root / "config.yaml").write_text(dump_config(cfg))

    # ---- actors --------------------------------------------------------------------------------
    def _start_actors(self) -> None:
        from actors.sampler import Sampler
        from learner.learner import Learner
        from reward_workers.pool import RewardPool
        from reward_workers.worker import RewardWorker

        cfg = self.cfg
        bundles = [_bundle(cfg.sampler.num_cpus, cfg.sampler.num_gpus, cfg.sampler.resources),
                   _bundle(cfg.learner.num_cpus, cfg.learner.num_gpus, cfg.learner.resources)]
        self.pg = placement_group(bundles, strategy="PACK", name=f"{cfg.run.name}-policy")
        ray.get(self.pg.ready(), timeout=600)
        env = {"env_vars": {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TOKENIZERS_PARALLELISM": "false",
                            **{k: v for k, v in os.environ.items() if k in PASS_THROUGH_ENV}}}
        self.sampler = ray.remote(Sampler).options(
            name="sampler", num_cpus=cfg.sampler.num_cpus, num_gpus=cfg.sampler.num_gpus, max_restarts=-1,
            runtime_env=env,
            scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=0),
        ).remote(cfg.policy.model, engine=cfg.sampler.engine, max_lora_rank=max(8, cfg.policy.lora.r),
                 max_loaded_adapters=cfg.sampler.max_loaded_adapters, max_model_len=cfg.sampler.max_model_len,
                 seed=cfg.run.seed, dtype=cfg.policy.dtype, cpu_threads=cfg.sampler.cpu_threads,
                 gpu_memory_utilization=cfg.sampler.gpu_memory_utilization)
        self.learner = ray.remote(Learner).options(
            name="learner", num_cpus=cfg.learner.num_cpus, num_gpus=cfg.learner.num_gpus, runtime_env=env,
            scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=1),
        ).remote(cfg.policy.model_dump(), cfg.learner.model_dump(), cfg.run.steps, cfg.run.seed,
                 cfg.algo.model_dump())
        reward = cfg.reward
        prediction_dir = str(self.files.root / "predictions") if reward.pipeline.save_predictions else None

        def make_worker(index: int):
            return ray.remote(RewardWorker).options(
                name=f"reward-worker-{index}", num_cpus=reward.num_cpus_per_worker,
                num_gpus=reward.gpus_per_worker, resources=reward.resources or None, max_restarts=-1,
                runtime_env=env,
            ).remote(reward.pipeline.model_dump(), reward.spec.model_dump(mode="json"), f"reward-worker-{index}",
                     reward.cache, prediction_dir)

        self.pool = RewardPool(make_worker, reward.num_workers, reward.timeout_s, reward.max_attempts)
        self.pool.ready()
        ray.get(self.learner.info.remote())
        # version -> ObjectRef of its exported adapter files, for the last k+1 versions pushed
        self.recent_adapters: dict[int, ray.ObjectRef] = {}
        self.sampler_restarts = 0

    def _prepare_probe(self) -> None:
        from transformers import AutoTokenizer

        from brainloop.models import resolve_model

        tokenizer = AutoTokenizer.from_pretrained(resolve_model(self.cfg.policy.model))
        self.probe_prompt_ids = ray.get(self.sampler.format_prompt.remote(self.cfg.probe.prompt))
        self.probe_completion_ids = tokenizer(self.cfg.probe.completion, add_special_tokens=False)["input_ids"]
        self.probe_base = ray.get(self.learner.completion_logprobs.remote(
            self.probe_prompt_ids, self.probe_completion_ids, False))
        sampler_base = ray.get(self.sampler.score.remote(self.cfg.probe.prompt, self.probe_completion_ids, 0))
        # How far the two engines disagree on the same weights: the noise any adapter must exceed.
        self.probe_noise = check_probe(0, sampler_base, self.probe_base, self.probe_base, self.cfg.probe.tolerance,
                                       self.cfg.probe.min_adapter_effect).sampler_vs_learner

    def _probe_refs(self, version: int) -> tuple[int, ray.ObjectRef, ray.ObjectRef]:
        return (version,
                self.sampler.score.remote(self.cfg.probe.prompt, self.probe_completion_ids, version),
                self.learner.completion_logprobs.remote(self.probe_prompt_ids, self.probe_completion_ids, True))

    def _resolve_probe(self, pending: tuple[int, ray.ObjectRef, ray.ObjectRef]) -> ProbeResult:
        version, sampler_ref, learner_ref = pending
        try:
            sampler_lp = ray.get(sampler_ref)
        except RayActorError:  # the sampler died after the push: restore it, then probe again
            self._restore_sampler()
            sampler_lp = ray.get(self.sampler.score.remote(self.cfg.probe.prompt, self.probe_completion_ids, version))
        return check_probe(version, sampler_lp, ray.get(learner_ref), self.probe_base,
                           self.cfg.probe.tolerance, self.cfg.probe.min_adapter_effect, self.probe_noise)

    def _restore_sampler(self) -> None:
        """Wait for Ray to restart a dead sampler, then load the newest adapter into it."""
        self._wait_for_sampler()
        newest = self._newest_pushed()
        if newest and newest not in ray.get(self.sampler.loaded_versions.remote()):
            ray.get(self.sampler.load_adapter.remote(newest, self.recent_adapters[newest]))
        self.sampler_restarts += 1

    def _newest_pushed(self) -> int:
        """The newest adapter version pushed to the sampler, 0 (the base model) before any."""
        return max(self.recent_adapters, default=0)

    def _pushed_or_exported(self) -> dict[str, bytes]:
        """The learner's current adapter files: the push already exported them, else export now."""
        ref = self.recent_adapters.get(self.state.version)
        return ray.get(ref if ref is not None else self.learner.export_adapter.remote())

    def _push_adapter(self, version: int, adapter_ref: ray.ObjectRef) -> None:
        # Generations in flight may sample from the last k+1 versions: a checkpoint keeps them.
        self.recent_adapters[version] = adapter_ref
        for old in sorted(self.recent_adapters)[: -(self.cfg.algo.max_staleness + 1)]:
            del self.recent_adapters[old]
        self.sampler.load_adapter.remote(version, adapter_ref)

    # ---- generation ------------------------------------------------------------------------------
    def _launch_generation(self, step: int, version: int | None = None) -> PendingGeneration:
        """Queue step ``step``'s sampling; ``version=None``: the newest adapter pushed so far (the
        sampler runs calls in order, so that is the newest when it runs)."""
        cfg = self.cfg
        prompts = prompts_for_step(self.train_prompts, step, cfg.prompts.prompts_per_step, cfg.run.seed)
        temperature = algo.linear_schedule(step, cfg.run.steps, cfg.sampler.temperature_start,
                                           cfg.sampler.temperature_end)
        ref = self.sampler.generate.remote(
            [p.text for p in prompts], n=cfg.sampler.num_completions, max_new_tokens=cfg.sampler.max_new_tokens,
            temperature=temperature, top_p=cfg.sampler.top_p, top_k=cfg.sampler.top_k,
            seed=cfg.run.seed * 1_000_003 + step, version=version)
        expected = version if version is not None else self._newest_pushed()
        return PendingGeneration(step, prompts, temperature, ref, time.time(), expected)

    def _collect_generation(self, pending: PendingGeneration):
        """Completions of a launched generation; a dead sampler is restarted with the latest adapter."""
        for _attempt in range(3):
            try:
                return ray.get(pending.ref)
            except RayActorError as exc:
                print(f"[brainloop] sampler died during step {pending.step} ({type(exc).__name__}); "
                      "waiting for the restart and reloading the latest adapter", flush=True)
                self._restore_sampler()
                relaunched = self._launch_generation(pending.step)
                pending.ref, pending.launched_at = relaunched.ref, relaunched.launched_at
                pending.adapter_version = relaunched.adapter_version
        raise RuntimeError(f"sampler failed three times on step {pending.step}")

    # ---- scoring ---------------------------------------------------------------------------------
    def _start_scoring(self, generation: PendingGeneration) -> ScoringBatch:
        """Wait for a generation's completions and hand every text to the reward pool."""
        completions = self._collect_generation(generation)
        batch = ScoringBatch(generation, completions, time.time())
        for pi, group in enumerate(completions):
            for c in group:
                self.pool.submit((generation.step, pi, c.sample_index), c.text)
        self._scoring[generation.step] = batch
        return batch

    def _absorb(self, timeout_s: float) -> None:
        """Route the pool's finished results to their steps' batches."""
        for (step, pi, si), result in self.pool.poll(timeout_s):
            self._scoring[step].results[(pi, si)] = (result, time.time())
            for stage, seconds in result.timings.items():
                self.metrics.latency("reward-worker", stage, seconds)

    def _finish_scoring(self, batch: ScoringBatch) -> None:
        while not batch.complete:
            if not self.pool.pending():
                raise RuntimeError(f"reward pool has no texts left but step {batch.generation.step} lacks "
                                   f"{sum(map(len, batch.completions)) - len(batch.results)} results")
            self._absorb(1.0)
        del self._scoring[batch.generation.step]

    def _score_ahead_until(self, update_ref: ray.ObjectRef, queue: deque[PendingGeneration]) -> ScoringBatch | None:
        """While the learner updates on step t, start scoring step t+1 as soon as it is sampled, so
        that with ``max_staleness >= 1`` the reward of t+1 overlaps the update of t, not only the
        sampling. Returns when the update has finished."""
        ahead = None
        while True:
            watch = [update_ref] if ahead is not None or not queue else [update_ref, queue[0].ref]
            ready, _ = ray.wait(watch, num_returns=1, timeout=0.05 if ahead is None else 0)
            if ahead is None and queue and queue[0].ref in ready:
                ahead = self._start_scoring(queue.popleft())
            if ahead is not None:
                self._absorb(0.05)
            if ray.wait([update_ref], timeout=0)[0]:
                return ahead

    def _discard_scoring(self) -> None:
        """Let texts scored ahead finish and drop them (the session ends before their step)."""
        for batch in list(self._scoring.values()):
            self._finish_scoring(batch)

    def _wait_for_sampler(self, timeout_s: float = 600.0) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                ray.get(self.sampler.current_version.remote(), timeout=60)
                return
            except (RayActorError, ray.exceptions.GetTimeoutError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(1.0)

    # ---- the loop ----------------------------------------------------------------------------------
    def _restore(self) -> deque[PendingGeneration]:
        """Continue from the latest checkpoint (with ``--resume``). Returns the generations that were
        in flight when it was written, relaunched from the adapter versions they sampled from, in the
        order the uninterrupted run pushed and launched them."""
        ckpt = latest_checkpoint(self.files.checkpoints) if self.resume else None
        if ckpt is None:
            self.files.truncate_after(-1)
            return deque()
        learner_state, adapter_files, driver_state = load_checkpoint(ckpt)
        older = load_older_adapters(ckpt)
        version = ray.get(self.learner.load_state.remote(learner_state))
        self.state.step = driver_state["step"] + 1
        self.state.version = version
        self.state.best_reward = driver_state["best_reward"]
        self.state.samples_scored = driver_state["samples_scored"]
        self.state.samples_failed = driver_state["samples_failed"]
        self.files.truncate_after(driver_state["step"])
        relaunched: deque[PendingGeneration] = deque()
        for pending in sorted(driver_state.get("pending_generations", []), key=lambda p: p["step"]):
            used = pending["adapter_version"]
            if used > self._newest_pushed():
                files = adapter_files if used == version else older[used]
                self._push_adapter(used, ray.put(files))
            relaunched.append(self._launch_generation(pending["step"], version=used))
        if version > self._newest_pushed():
            self._push_adapter(version, ray.put(adapter_files))
        print(f"[brainloop] resumed from {ckpt.name}: next step {self.state.step}, adapter v{version}"
              + (f", {len(relaunched)} generation(s) relaunched as they were" if relaunched else ""), flush=True)
        return relaunched

    def run(self, stop_after: int | None = None) -> dict:
        """Run to the configured number of steps. ``stop_after`` ends the session after that many
        steps without finishing (as a crash would: only checkpoints survive), for resume tests."""
        cfg = self.cfg
        self._start_actors()
        self._prepare_probe()
        queue = self._restore()
        total = cfg.run.steps
        k = cfg.algo.max_staleness
        self._scoring: dict[int, ScoringBatch] = {}
        ahead: ScoringBatch | None = None  # step t+1, already in the reward pool while step t updated
        next_gen = self.state.step + len(queue)
        probe_pending = None
        t_start = time.time()
        first_step = self.state.step
        while self.state.step < total:
            step = self.state.step
            t_step = time.time()
            # Keep up to k generations ahead in the sampler's queue: with k >= 1 step t+1 is sampled
            # while step t is scored and learned. The sampler runs calls in order, so a generation
            # launched now uses the newest adapter pushed so far: at most k versions behind.
            while next_gen < total and next_gen <= step + (k if queue or ahead else 0) and len(queue) < k + 1:
                queue.append(self._launch_generation(next_gen))
                next_gen += 1
            batch, ahead = (ahead, None) if ahead is not None else (self._start_scoring(queue.popleft()), None)
            t_sampled = time.time()
            self._finish_scoring(batch)
            t_scored = time.time()
            groups, rows = self._build_update(step, batch)
            update_ref = self.learner.update.remote(groups) if groups else None
            if probe_pending is not None:  # k >= 1: the last push's probe is checked while this update runs
                self._record_probe(self._resolve_probe(probe_pending))
                probe_pending = None
            update_stats: dict = {"skipped": True}
            if update_ref is not None:
                if k > 0:
                    ahead = self._score_ahead_until(update_ref, queue)
                update_stats = ray.get(update_ref)
                weights = iter(update_stats.pop("is_weights"))
                for row in rows:
                    row["is_weight"] = next(weights) if row["used_in_update"] else None
                self.state.version = update_stats["version"]
                adapter_ref = self.learner.export_adapter.remote()
                self._push_adapter(self.state.version, adapter_ref)
                probe_pending = self._probe_refs(self.state.version)
                if k == 0:  # synchronous: prove the adapter before the next sample
                    self._record_probe(self._resolve_probe(probe_pending))
                    probe_pending = None
            t_updated = time.time()
            for row in rows:
                row["learner_version"] = self.state.version - (0 if update_stats.get("skipped") else 1)
                row["updated_at"] = t_updated
            self.files.write_rollouts(step, rows)
            record = self._step_metrics(step, rows, update_stats, batch, t_step, t_sampled, t_scored, t_updated)
            self.files.append_metrics(record)
            self.state.step = step + 1
            done = self.state.step - first_step
            eta = (time.time() - t_start) / done * (total - self.state.step)
            print(f"[brainloop] step {step + 1}/{total} reward {record['reward_mean']:.5f} "
                  f"(max {record['reward_max']:.5f}) kl/tok {record.get('kl_per_token', float('nan')):.4f} "
                  f"len {record['mean_tokens']:.1f} {record['step_seconds']:.1f}s/step ETA {eta:.0f}s", flush=True)
            if self.state.step % cfg.run.checkpoint_every == 0 or self.state.step == total:
                if probe_pending is not None:
                    self._record_probe(self._resolve_probe(probe_pending))
                    probe_pending = None
                self._checkpoint(step, [*([ahead.generation] if ahead else []), *queue])
            if stop_after is not None and self.state.step - first_step >= stop_after:
                self._discard_scoring()
                return {"stopped_at_step": self.state.step}
        if probe_pending is not None:
            self._record_probe(self._resolve_probe(probe_pending))
        return self._finish(t_start)

    def _build_update(self, step: int, batch: ScoringBatch):
        from learner.learner import TrainGroup, TrainSample

        cfg = self.cfg
        pending, completions, results = batch.generation, batch.completions, batch.results
        sampled_at = batch.sampled_at
        groups, rows = [], []
        for pi, group in enumerate(completions):
            rewards = []
            for c in group:
                result, _ = results[(pi, c.sample_index)]
                if result.ok:
                    rewards.append(result.reward)
                elif result.status == "unspeakable" and cfg.reward.unspeakable_reward != "exclude":
                    rewards.append(float(cfg.reward.unspeakable_reward))
                else:
                    rewards.append(float("nan"))
            advantages = algo.group_advantages(rewards)
            samples = []
            for c, reward, adv in zip(group, rewards, advantages, strict=True):
                result, scored_at = results[(pi, c.sample_index)]
                self.state.samples_scored += 1
                self.state.samples_failed += int(result.status == "failed")
                used = bool(np.isfinite(adv)) and len(c.token_ids) > 0
                if used:
                    samples.append(TrainSample(c.prompt_token_ids, c.token_ids, c.logprobs, float(adv),
                                               c.adapter_version))
                row = {
                    "step": step, "prompt_index": pi, "sample_index": c.sample_index,
                    "prompt_id": pending.prompts[pi].id, "prompt": pending.prompts[pi].text, "completion": c.text,
                    "num_tokens": len(c.token_ids), "finish_reason": c.finish_reason,
                    "adapter_version": c.adapter_version, "temperature": pending.temperature,
                    "status": result.status, "error": result.error,
                    "reward": reward if np.isfinite(reward) else None,
                    "advantage": float(adv) if np.isfinite(adv) else None, "used_in_update": used,
                    "n_words": result.n_words, "n_trs": result.n_trs, "audio_seconds": result.audio_seconds,
                    "reward_worker": result.worker, "reward_attempts": result.attempts,
                    "cache_hit": result.cache_hit, "encoder_trained": result.encoder_trained,
                    "timings_json": json.dumps(result.timings), "sample_started_at": c.started_at,
                    "sample_finished_at": c.finished_at, "submitted_at": sampled_at, "scored_at": scored_at,
                }
                for name in (*ROI_NAMES, *SUMMARY_NAMES):
                    row[f"roi_{name}"] = result.roi.get(name)
                rows.append(row)
            if samples:
                groups.append(TrainGroup(samples))
        return groups, rows

    def _step_metrics(self, step, rows, update_stats, batch: ScoringBatch, t_step, t_sampled, t_scored,
                      t_updated) -> dict:
        """One step's record. ``*_seconds`` are what this step's iteration waited for each stage (a step
        sampled and scored ahead waits ~0 for both); ``reward_latency_seconds`` is the stage itself."""
        pending = batch.generation
        rewards = np.array([r["reward"] for r in rows if r["reward"] is not None], dtype=np.float64)
        tokens = np.array([r["num_tokens"] for r in rows], dtype=np.float64)
        reward_mean = float(rewards.mean()) if rewards.size else float("nan")
        if rewards.size:
            self.state.best_reward = max(self.state.best_reward, float(rewards.max()))
        record = {
            "step": step, "reward_mean": reward_mean,
            "reward_std": float(rewards.std()) if rewards.size else float("nan"),
            "reward_max": float(rewards.max()) if rewards.size else float("nan"),
            "best_reward": self.state.best_reward,
            "num_samples": len(rows), "num_scored": int(rewards.size),
            "num_failed": sum(r["status"] == "failed" for r in rows),
            "num_unspeakable": sum(r["status"] == "unspeakable" for r in rows),
            "mean_tokens": float(tokens.mean()) if tokens.size else 0.0,
            "distinct_2": distinct_n([r["completion"] for r in rows], 2),
            "temperature": pending.temperature,
            "staleness_max": max((self.state.version - (0 if update_stats.get("skipped") else 1)) - r["adapter_version"]
                                 for r in rows) if rows else 0,
            "sample_seconds": t_sampled - t_step, "reward_seconds": t_scored - t_sampled,
            "update_seconds": t_updated - t_scored, "reward_latency_seconds": t_scored - batch.sampled_at,
            "scored_ahead": batch.sampled_at < t_step,
            "step_seconds": t_updated - t_step, "time": t_updated,
            "tokens_per_second": float(tokens.sum()) / max(1e-6, max(r["sample_finished_at"] for r in rows)
                                                           - min(r["sample_started_at"] for r in rows)),
            **{k: v for k, v in update_stats.items() if isinstance(v, (int, float))},
        }
        roi_means = {name: float(np.nanmean([r[f"roi_{name}"] for r in rows if r[f"roi_{name}"] is not None]))
                     for name in ROI_NAMES if any(r[f"roi_{name}"] is not None for r in rows)}
        self.metrics.gauges("driver", {k: v for k, v in record.items() if isinstance(v, (int, float))
                                       and k not in ("time",)})
        self.metrics.gauges("reward-worker", roi_means, prefix="roi_")
        self.metrics.gauges("reward-pool", {"queue_depth": self.pool.queued, "in_flight": self.pool.in_flight})
        return record

    def _record_probe(self, probe: ProbeResult) -> None:
        self.files.append_metrics({"probe": probe.__dict__, "step": self.state.step - 1})
        self.metrics.gauges("driver", {"probe_sampler_vs_learner": probe.sampler_vs_learner,
                                       "probe_adapter_vs_base": probe.adapter_vs_base})

    def _checkpoint(self, step: int, in_flight: list[PendingGeneration]) -> None:
        """``in_flight``: generations of later steps already launched (max_staleness >= 1); a resume
        relaunches them from the same adapter versions."""
        learner_state = ray.get(self.learner.state.remote())
        adapter_files = self._pushed_or_exported()
        pending = [{"step": g.step, "adapter_version": g.adapter_version} for g in in_flight]
        older = {g.adapter_version: ray.get(self.recent_adapters[g.adapter_version]) for g in in_flight
                 if 0 < g.adapter_version != self.state.version}
        driver_state = {"step": step, "version": self.state.version, "best_reward": self.state.best_reward,
                        "samples_scored": self.state.samples_scored, "samples_failed": self.state.samples_failed,
                        "pending_generations": pending, "time": time.time()}
        path = save_checkpoint(self.files.checkpoints, step, learner_state, adapter_files, driver_state,
                               older_adapters=older)
        print(f"[brainloop] checkpoint {path}", flush=True)

    def _finish(self, t_start: float) -> dict:
        adapter_files = self._pushed_or_exported()
        final = self.files.root / "final_adapter"
        final.mkdir(exist_ok=True)
        for name, blob in adapter_files.items():
            (final / name).write_bytes(blob)
        steps = [m for m in self.files.read_metrics() if "reward_mean" in m]
        summary = summarize(steps)
        summary.update({"run_dir": str(self.files.root), "final_adapter": str(final),
                        "sampler_restarts": self.sampler_restarts,
                        "wall_seconds": time.time() - t_start, "samples_scored": self.state.samples_scored,
                        "samples_failed": self.state.samples_failed, "adapter_version": self.state.version})
        (self.files.root / "summary.json").write_text(json.dumps(summary, indent=1))
        return summary

    def close(self, timeout_s: float = 60.0) -> None:
        """Kill the run's actors and wait until their names are free (a resumed run reuses them)."""
        names = ["sampler", "learner"]
        for handle in (getattr(self, "sampler", None), getattr(self, "learner", None)):
            if handle is not None:
                ray.kill(handle)
        if getattr(self, "pool", None) is not None:
            names += [f"reward-worker-{i}" for i in self.pool.workers]
            self.pool.close()
        if self.pg is not None:
            remove_placement_group(self.pg)
            self.pg = None
        deadline = time.monotonic() + timeout_s
        for name in names:
            while time.monotonic() < deadline:
                try:
                    ray.get_actor(name)
                except ValueError:
                    break
                time.sleep(0.2)


def _bundle(cpus: float, gpus: float, resources: dict[str, float]) -> dict[str, float]:
    """A placement-group bundle; zero GPUs is the CPU embedded default, same code."""
    return {"CPU": cpus, **({"GPU": gpus} if gpus else {}), **resources}


PASS_THROUGH_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "NILEARN_DATA", "BRAINLOOP_CACHE", "HF_HOME",
                    "VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_OMP_THREADS_BIND")


def distinct_n(texts: list[str], n: int) -> float:
    """Distinct n-grams over all n-grams of a set of texts (a diversity measure)."""
    grams = [tuple(words[i : i + n]) for t in texts for words in [t.split()] for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def summarize(steps: list[dict], window: int = 15) -> dict:
    """First/last window means of the reward with standard errors, KL, length, speed."""
    if not steps:
        return {}
    rewards = [s["reward_mean"] for s in steps]
    w = min(window, max(1, len(steps) // 2))
    first, last = np.array(rewards[:w]), np.array(rewards[-w:])

    def se(x: np.ndarray) -> float:
        return float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else float("nan")

    diff_se = math.sqrt(se(first) ** 2 + se(last) ** 2) if len(first) > 1 else float("nan")
    return {
        "steps": len(steps), "window": w,
        "reward_first": float(first.mean()), "reward_first_se": se(first),
        "reward_last": float(last.mean()), "reward_last_se": se(last),
        "reward_gain": float(last.mean() - first.mean()), "reward_gain_se": diff_se,
        "reward_gain_z": float((last.mean() - first.mean()) / diff_se) if diff_se and diff_se > 0 else float("nan"),
        "best_reward": float(max(s.get("best_reward", -math.inf) for s in steps)),
        "kl_per_token_last": float(steps[-1].get("kl_per_token", float("nan"))),
        "kl_per_sequence_last": float(steps[-1].get("kl_per_sequence", float("nan"))),
        "mean_tokens_first": float(np.mean([s["mean_tokens"] for s in steps[:w]])),
        "mean_tokens_last": float(np.mean([s["mean_tokens"] for s in steps[-w:]])),
        "distinct_2_first": float(np.mean([s["distinct_2"] for s in steps[:w]])),
        "distinct_2_last": float(np.mean([s["distinct_2"] for s in steps[-w:]])),
        "seconds_per_step": float(np.median([s["step_seconds"] for s in steps])),
    }
