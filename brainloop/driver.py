"""The actor-learner loop.

The driver holds actor handles and moves object references; actors never call each other. Data
flows one way around the loop:

    prompts -> sampler -> completions -> reward pool (streamed) -> advantages -> learner
            -> adapter (object ref) -> sampler

With ``algo.max_staleness = k >= 1`` the sampler generates step t+1 .. t+k while step t is being
scored and learned from; each sample records the adapter version it came from and the learner
corrects off-policy samples with truncated importance weights. ``k = 0`` is the synchronous
reference algorithm.

``Loop.step`` is one step of the algorithm, written once for both: sample -> score -> rewards to
advantages (``algo.build_groups``) -> update -> push -> probe -> log -> checkpoint. When each part
happens is the schedule's business: ``Schedule`` (k = 0) does everything at once, ``PipelinedSchedule``
(k >= 1) keeps generations queued ahead, scores step t+1 during the update of step t and checks a push's
probe during the next update.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import ray
from ray.exceptions import RayActorError, RayError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from brainloop import algo, analysis
from brainloop.checkpoint import latest_checkpoint, load_checkpoint, load_older_adapters, save_checkpoint
from brainloop.config import Config, dump_config
from brainloop.errors import (
    AdapterPushError,
    FailureBudgetExceeded,
    GuardStop,
    RunFailure,
    RunFolderError,
    short_cause,
)
from brainloop.guards import GuardMonitor
from brainloop.metrics import RunMetrics
from brainloop.prompts import Prompt, load_prompts, prompts_for_step, split
from brainloop.rois import ROI_NAMES
from brainloop.rollout_log import RunFiles, rollout_row
from brainloop.summary import distinct_n, summarize
from brainloop.trackers import open_trackers, step_scalars
from brainloop.types import Completion, ScoreResult, TrainGroup

log = logging.getLogger(__name__)


class AdapterProbeError(RunFailure):
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
    completions: list[list[Completion]]
    sampled_at: float
    results: dict[tuple[int, int], tuple[ScoreResult, float]] = field(default_factory=dict)
    # reward.naturalness_coef > 0: the sampler's base-model log-probs of each completion, (prompt, sample) -> ref
    base_logprob_refs: dict[tuple[int, int], ray.ObjectRef] = field(default_factory=dict)
    naturalness_wait_s: float = 0.0  # seconds the driver waited for them after the rewards were in
    reference_ref: ray.ObjectRef | None = None  # the learner's pi_ref pass over these completions

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


class Schedule:
    """When a step's work happens, synchronous (``algo.max_staleness = 0``, the reference algorithm): a
    step's completions are sampled when the step asks for them, from the newest adapter, and each pushed
    adapter is probed before the next sample. ``Loop.step`` calls these hooks; it has no branch on k."""

    def __init__(self, loop: Loop, in_flight: deque[PendingGeneration]) -> None:
        self.loop = loop
        self.queue = in_flight  # generations already launched, oldest first (relaunched by a resume)

    def sampled(self, step: int) -> ScoringBatch:
        """Step ``step``'s completions, in the reward pool."""
        return self.loop._start_scoring(self.queue.popleft() if self.queue else self.loop._launch_generation(step))

    def while_updating(self, update_ref: ray.ObjectRef | None) -> None:
        """Work to overlap with the learner's update (``None``: no update this step)."""

    def probe(self, pending: tuple[int, ray.ObjectRef, ray.ObjectRef]) -> None:
        self.loop._record_probe(self.loop._resolve_probe(pending))

    def settle(self) -> None:
        """Check what is still outstanding (a deferred probe) before a checkpoint or the end."""

    def in_flight(self) -> list[PendingGeneration]:
        """Generations of later steps already launched: a checkpoint records them for an exact resume."""
        return list(self.queue)

    def discard(self) -> None:
        """The session ends before the launched steps: let texts in the reward pool finish, drop them."""
        self.loop._discard_scoring()


class PipelinedSchedule(Schedule):
    """``algo.max_staleness = k >= 1``: up to k generations queued ahead in the sampler (which runs calls
    in order, so each samples from the newest adapter pushed when it runs: at most k versions behind);
    step t+1 scored while step t updates; each push's probe checked during the next update."""

    def __init__(self, loop: Loop, in_flight: deque[PendingGeneration], k: int) -> None:
        super().__init__(loop, in_flight)
        self.k = k
        self.next_gen = loop.state.step + len(in_flight)  # the next step to launch
        self.ahead: ScoringBatch | None = None  # step t+1, already in the reward pool while step t updated
        self.probe_pending: tuple[int, ray.ObjectRef, ray.ObjectRef] | None = None

    def sampled(self, step: int) -> ScoringBatch:
        total = self.loop.cfg.run.steps
        while (self.next_gen < total and self.next_gen <= step + (self.k if self.queue or self.ahead else 0)
               and len(self.queue) < self.k + 1):
            self.queue.append(self.loop._launch_generation(self.next_gen))
            self.next_gen += 1
        batch, self.ahead = self.ahead, None
        return batch if batch is not None else self.loop._start_scoring(self.queue.popleft())

    def while_updating(self, update_ref: ray.ObjectRef | None) -> None:
        self.settle()  # the last push's probe is checked while this update runs
        if update_ref is not None:
            self.ahead = self._score_ahead_until(update_ref)

    def _score_ahead_until(self, update_ref: ray.ObjectRef) -> ScoringBatch | None:
        """While the learner updates on step t, start scoring step t+1 as soon as it is sampled, so that
        the reward of t+1 overlaps the update of t, not only the sampling. Returns when the update has
        finished."""
        ahead, queue = None, self.queue
        while True:
            watch = [update_ref] if ahead is not None or not queue else [update_ref, queue[0].ref]
            ready, _ = ray.wait(watch, num_returns=1, timeout=0.05 if ahead is None else 0)
            if ahead is None and queue and queue[0].ref in ready:
                ahead = self.loop._start_scoring(queue.popleft())
            if ahead is not None:
                self.loop._absorb(0.05)
            if ray.wait([update_ref], timeout=0)[0]:
                return ahead

    def probe(self, pending: tuple[int, ray.ObjectRef, ray.ObjectRef]) -> None:
        self.probe_pending = pending

    def settle(self) -> None:
        if self.probe_pending is not None:
            super().probe(self.probe_pending)
            self.probe_pending = None

    def in_flight(self) -> list[PendingGeneration]:
        return [*([self.ahead.generation] if self.ahead else []), *self.queue]


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
        self.run_dir = Path(run_dir)
        with self._writing("the run folder"):
            self.files = RunFiles(run_dir)
        self.resume = resume
        self.metrics = RunMetrics(cfg.run.name, "driver")
        prompts = load_prompts(cfg.prompts.file)
        self.train_prompts = split(prompts, "train")
        self.state = LoopState()
        self.pg = None
        self.guards = GuardMonitor(cfg.guards)
        self.targets = cfg.reward.spec.target_regions()
        with self._writing("config.yaml"):
            (self.files.root / "config.yaml").write_text(dump_config(cfg))

    @contextmanager
    def _writing(self, what: str) -> Iterator[None]:
        """Turn a failed write of the run folder (unwritable, full disk) into one clear error that says
        which checkpoint a ``--resume`` will continue from; checkpoints are written atomically, so a
        failed one never replaces the last complete one."""
        try:
            yield
        except OSError as exc:
            last = latest_checkpoint(self.run_dir / "checkpoints") if (self.run_dir / "checkpoints").is_dir() else None
            reason = f"{exc.strerror} ({exc.filename})" if exc.strerror else str(exc)
            raise RunFolderError(
                f"cannot write {what} in {self.run_dir}: {reason}; last complete checkpoint: "
                f"{last.name + ' (intact)' if last else 'none'}. Free space or fix the folder, then resubmit "
                "with --resume") from None

    # ---- actors --------------------------------------------------------------------------------
    def _start_actors(self) -> None:
        from actors.sampler import Sampler
        from learner.learner import Learner
        from reward_workers.control import control_name, start_control
        from reward_workers.pool import RewardPool
        from reward_workers.worker import RewardWorker

        cfg = self.cfg
        bundles = [_bundle(cfg.sampler.num_cpus, cfg.sampler.num_gpus, cfg.sampler.resources),
                   _bundle(cfg.learner.num_cpus, cfg.learner.num_gpus, cfg.learner.resources)]
        pg_name = f"{cfg.run.name}-policy"
        release_stale_holders(pg_name, ["sampler", "learner", control_name(cfg.run.name),
                                        *(f"reward-worker-{i}" for i in range(cfg.reward.num_workers))])
        self.pg = placement_group(bundles, strategy="PACK", name=pg_name)
        try:
            ray.get(self.pg.ready(), timeout=600)
        except ray.exceptions.GetTimeoutError:
            raise RunFailure(f"placement group {pg_name} ({bundles}) could not be placed in 600 s: the cluster "
                             f"lacks the resources (ray status shows what it has)") from None
        env = {"env_vars": {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TOKENIZERS_PARALLELISM": "false",
                            **{k: v for k, v in os.environ.items() if k in PASS_THROUGH_ENV}}}
        self.sampler = ray.remote(Sampler).options(
            name="sampler", num_cpus=cfg.sampler.num_cpus, num_gpus=cfg.sampler.num_gpus, max_restarts=-1,
            runtime_env=env,
            scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=0),
        ).remote(cfg.policy.model, engine=cfg.sampler.engine, max_lora_rank=max(8, cfg.policy.lora.r),
                 max_loaded_adapters=cfg.sampler.max_loaded_adapters, max_model_len=cfg.sampler.max_model_len,
                 seed=cfg.run.seed, dtype=cfg.policy.dtype, cpu_threads=cfg.sampler.cpu_threads,
                 gpu_memory_utilization=cfg.sampler.gpu_memory_utilization, cpu_lora_ops=cfg.sampler.cpu_lora_ops,
                 metrics=RunMetrics(cfg.run.name, "sampler"))
        self.learner = ray.remote(Learner).options(
            name="learner", num_cpus=cfg.learner.num_cpus, num_gpus=cfg.learner.num_gpus, runtime_env=env,
            scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=1),
        ).remote(cfg.policy.model_dump(), cfg.learner.model_dump(), cfg.run.steps, cfg.run.seed,
                 cfg.algo.model_dump(), metrics=RunMetrics(cfg.run.name, "learner"))
        reward = cfg.reward
        prediction_dir = str(self.files.root / "predictions") if reward.pipeline.save_predictions else None

        def make_worker(index: int):
            return ray.remote(RewardWorker).options(
                name=f"reward-worker-{index}", num_cpus=reward.num_cpus_per_worker,
                num_gpus=reward.gpus_per_worker, resources=reward.resources or None, max_restarts=-1,
                runtime_env=env,
            ).remote(reward.pipeline.model_dump(), reward.spec.model_dump(mode="json"), f"reward-worker-{index}",
                     reward.cache, prediction_dir, metrics=RunMetrics(cfg.run.name, "reward-worker"))

        # Live size: `brainloop scale` / `brainloop status` reach the pool through the control actor.
        a = reward.autoscale
        self.control = start_control(cfg.run.name, (a.min_workers, a.max_workers) if a else None)
        self.pool = RewardPool(make_worker, reward.num_workers, reward.timeout_s, reward.max_attempts,
                               autoscale=a, control=self.control,
                               metrics=RunMetrics(cfg.run.name, "reward-pool"))
        # Actors that cannot start (weights that fail to load, a missing model) end the run here with
        # their own error, before any step.
        for role, wait in (("reward workers", self.pool.ready),
                           ("learner", lambda: ray.get(self.learner.info.remote())),
                           ("sampler", lambda: ray.get(self.sampler.current_version.remote()))):
            try:
                wait()
            except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError) as exc:
                raise RunFailure(f"the {role} failed to start: {short_cause(exc)}") from None
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
        self._confirm_push(version, self.sampler.load_adapter.remote(version, adapter_ref))

    def _confirm_push(self, version: int, load_ref: ray.ObjectRef) -> None:
        """Wait for the sampler to have loaded ``version``: a failed load is an error here, at the push,
        not a stale adapter silently serving the next step. The sampler runs calls in order, so with
        ``max_staleness >= 1`` the load may wait for a generation in progress; the reward pool is kept
        fed meanwhile."""
        while not ray.wait([load_ref], timeout=0.05)[0]:
            if getattr(self, "_scoring", None):
                self._absorb(0.0)
        try:
            ray.get(load_ref)
        except RayActorError:  # the sampler died: its restart reloads the newest version (this one)
            self._restore_sampler()
        except ray.exceptions.RayTaskError as exc:
            raise AdapterPushError(f"the sampler failed to load adapter v{version}: {short_cause(exc)}") from None

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
            seed=cfg.run.seed * 1_000_003 + step, version=version, cpu_threads=self.sample_threads)
        expected = version if version is not None else self._newest_pushed()
        return PendingGeneration(step, prompts, temperature, ref, time.time(), expected)

    def _collect_generation(self, pending: PendingGeneration):
        """Completions of a launched generation; a dead sampler is restarted with the latest adapter."""
        for _attempt in range(3):
            try:
                return ray.get(pending.ref)
            except RayActorError as exc:
                log.warning("sampler died during step %d (%s); waiting for the restart and reloading the latest "
                            "adapter", pending.step, type(exc).__name__)
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
        if self.cfg.reward.naturalness_coef > 0:
            # The penalty needs the base model's NLL before the advantages: the sampler scores each
            # completion under version 0 (one prefill), while the reward pool works on the same texts.
            batch.base_logprob_refs = {
                (pi, c.sample_index): self.sampler.score.remote(generation.prompts[pi].text, c.token_ids, 0)
                for pi, group in enumerate(completions) for c in group}
        self._scoring[generation.step] = batch
        return batch

    def _reference_ahead(self) -> None:
        """Queue the learner's pi_ref pass over every step in the reward pool that lacks one, so that it
        runs while the pool scores them (``learner.reference_ahead``). Called when the learner has
        nothing else queued ahead of it on the step's path: after a step is sampled, and after a push
        (a step scored ahead during an update gets its pass after that update's adapter export)."""
        if not self.cfg.learner.reference_ahead:
            return
        for step, batch in sorted(self._scoring.items()):
            if batch.reference_ref is None:
                batch.reference_ref = self.learner.prepare_reference.remote(
                    step, [[(c.prompt_token_ids, c.token_ids) for c in group] for group in batch.completions])

    def _absorb(self, timeout_s: float) -> None:
        """Route the pool's finished results to their steps' batches."""
        for (step, pi, si), result in self.pool.poll(timeout_s):
            self._scoring[step].results[(pi, si)] = (result, time.time())

    def _finish_scoring(self, batch: ScoringBatch) -> None:
        while not batch.complete:
            if not self.pool.pending():
                raise RuntimeError(f"reward pool has no texts left but step {batch.generation.step} lacks "
                                   f"{sum(map(len, batch.completions)) - len(batch.results)} results")
            self._absorb(1.0)
        del self._scoring[batch.generation.step]

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
            with self._writing("the rollouts"):
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
        self.guards.load_state_dict(driver_state.get("guards", {}))
        with self._writing("the rollouts"):
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
        log.info("resumed from %s: next step %d, adapter v%d%s", ckpt.name, self.state.step, version,
                 f", {len(relaunched)} generation(s) relaunched as they were" if relaunched else "")
        return relaunched

    def run(self, stop_after: int | None = None) -> dict:
        """Run to the configured number of steps. ``stop_after`` ends the session after that many
        steps without finishing (as a crash would: only checkpoints survive), for resume tests."""
        self._start_actors()
        self._prepare_probe()
        self._scoring: dict[int, ScoringBatch] = {}
        # Synchronous steps sample, then score, then update: sampling and the update each run with the
        # other roles idle and may use their cores (*.cpu_threads_alone). Pipelined steps overlap them.
        alone = self.cfg.algo.max_staleness == 0
        self.sample_threads = self.cfg.sampler.cpu_threads_alone if alone else None
        self.update_threads = self.cfg.learner.cpu_threads_alone if alone else None
        in_flight = self._restore()
        schedule = (PipelinedSchedule(self, in_flight, self.cfg.algo.max_staleness) if self.cfg.algo.max_staleness
                    else Schedule(self, in_flight))
        self._started_at, self._first_step = time.time(), self.state.step
        self.trackers = open_trackers(self.cfg.run.report_to, self.files.root, self.cfg.run.name,
                                      self.cfg.model_dump(mode="json"), first_step=self.state.step)
        try:
            while self.state.step < self.cfg.run.steps:
                self.step(self.state.step, schedule)
                if stop_after is not None and self.state.step - self._first_step >= stop_after:
                    schedule.discard()
                    return {"stopped_at_step": self.state.step}
            schedule.settle()
            return self._finish(self._started_at)
        finally:
            for tracker in self.trackers:
                tracker.close()

    def step(self, step: int, schedule: Schedule) -> None:
        """One step of the reference algorithm, top to bottom. ``schedule`` decides only when the work is
        done: at once (``Schedule``, max_staleness 0), or pipelined (``PipelinedSchedule``: the step was
        sampled, maybe scored, ahead; the probe is checked during the next update)."""
        t_step = time.time()
        batch = schedule.sampled(step)  # sample: completions of this step, handed to the reward pool
        self._reference_ahead()  # pi_ref's pass on the learner while the pool scores
        t_sampled = time.time()
        self._finish_scoring(batch)  # score: wait for every reward
        t_scored = time.time()
        groups, rows = self._build_update(step, batch)  # rewards -> advantages -> samples (algo.build_groups)
        self._check_failure_budget(step, rows)
        update_ref = self.learner.update.remote(groups, step, self.update_threads) if groups else None  # update
        schedule.while_updating(update_ref)  # pipelined: check the last probe, score the next step meanwhile
        update_stats = self._collect_update(update_ref, rows, batch)
        if update_ref is not None:
            self.state.version = update_stats["version"]
            self._push_adapter(self.state.version, self.learner.export_adapter.remote())  # push
            schedule.probe(self._probe_refs(self.state.version))  # probe: the sampler serves this adapter
            self._reference_ahead()  # pipelined: the next step, scored during this update
        t_updated = time.time()
        record, breaches = self._log_step(step, rows, update_stats, batch, t_step, t_sampled, t_scored, t_updated)
        self.state.step = step + 1
        if breaches and self.cfg.guards.action == "stop":
            self._checkpoint(step, schedule.in_flight())
            schedule.discard()
            raise GuardStop("guards.action is 'stop': " + "; ".join(b.message() for b in breaches)
                            + f". Checkpoint of step {step} written; the run can be inspected or resumed")
        self._log_progress(step, record)
        if self.state.step % self.cfg.run.checkpoint_every == 0 or self.state.step == self.cfg.run.steps:
            schedule.settle()
            self._checkpoint(step, schedule.in_flight())  # checkpoint

    def _collect_update(self, update_ref: ray.ObjectRef | None, rows: list[dict], batch: ScoringBatch) -> dict:
        """The learner's update statistics ({"skipped": True} without one); each used row gets its mean
        importance weight and, unless the sampler measured it already, its base-model NLL per token."""
        if update_ref is None:
            return {"skipped": True}
        update_stats = ray.get(update_ref)
        if batch.reference_ref is not None:  # done: the learner ran it before this update
            try:
                update_stats["reference_ahead_seconds"] = ray.get(batch.reference_ref)["seconds"]
            except RayError as exc:  # the update ran pi_ref itself (reference_ahead_fraction < 1)
                log.warning("pi_ref's pass ahead of step %d failed (%s); the update ran it", batch.generation.step,
                            short_cause(exc))
        weights = iter(update_stats.pop("is_weights"))
        learner_nll = iter(update_stats.pop("base_nll", []))
        nll_gaps = []
        for row in rows:
            row["is_weight"] = next(weights) if row["used_in_update"] else None
            nll = next(learner_nll, None) if row["used_in_update"] else None
            if nll is None:
                continue
            if math.isfinite(row["base_nll_per_token"]):  # the sampler's, for the naturalness penalty
                nll_gaps.append(abs(row["base_nll_per_token"] - nll))
            else:
                row["base_nll_per_token"] = nll
        if nll_gaps:  # two engines, one base model: they must agree
            update_stats["base_nll_check_max_abs"] = max(nll_gaps)
        return update_stats

    def _log_step(self, step: int, rows: list[dict], update_stats: dict, batch: ScoringBatch, t_step: float,
                  t_sampled: float, t_scored: float, t_updated: float) -> tuple[dict, list]:
        """Write the step's rollouts and metrics record, with the guards' verdict on it."""
        for row in rows:
            row["learner_version"] = self.state.version - (0 if update_stats.get("skipped") else 1)
            row["updated_at"] = t_updated
        with self._writing(f"the rollouts of step {step}"):
            self.files.write_rollouts(step, rows)
        record = self._step_metrics(step, rows, update_stats, batch, t_step, t_sampled, t_scored, t_updated)
        breaches = self.guards.observe(step, record)
        guard_metrics = self.guards.step_metrics(breaches)
        record.update(guard_metrics)
        self.metrics.set(guard_metrics)
        for breach in breaches:
            log.warning("%s", breach.message())
        with self._writing("metrics.jsonl"):
            self.files.append_metrics(record)
        for tracker in self.trackers:  # run.report_to: the same numbers
            tracker.log(step, step_scalars(record))
        return record, breaches

    def _log_progress(self, step: int, record: dict) -> None:
        total = self.cfg.run.steps
        eta = (time.time() - self._started_at) / (self.state.step - self._first_step) * (total - self.state.step)
        log.info("step %d/%d reward %.5f (max %.5f) kl/tok %.4f len %.1f %.1fs/step ETA %.0fs", step + 1, total,
                 record["reward_mean"], record["reward_max"], record.get("kl_per_token", float("nan")),
                 record["mean_tokens"], record["step_seconds"], eta)
        self.pool.report_progress(step=self.state.step, steps=total, eta_s=eta, step_seconds=record["step_seconds"])

    def _base_nll(self, batch: ScoringBatch) -> tuple[dict[tuple[int, int], float], float]:
        """The sampler's base-model NLL per token of each completion (naturalness penalty), and the
        seconds the driver waited for it (0 when it finished while the reward pool worked)."""
        if not batch.base_logprob_refs:
            return {}, 0.0
        t0 = time.time()
        keys = list(batch.base_logprob_refs)
        try:
            logprobs = ray.get([batch.base_logprob_refs[k] for k in keys])
        except RayActorError:  # the sampler died: its restart serves the base model as version 0 too
            self._restore_sampler()
            by_key = {(pi, c.sample_index): c for pi, group in enumerate(batch.completions) for c in group}
            logprobs = ray.get([self.sampler.score.remote(batch.generation.prompts[k[0]].text,
                                                          by_key[k].token_ids, 0) for k in keys])
        return {k: analysis.nll_per_token(lp) for k, lp in zip(keys, logprobs, strict=True)}, time.time() - t0

    def _build_update(self, step: int, batch: ScoringBatch) -> tuple[list[TrainGroup], list[dict]]:
        """The step's update (``algo.build_groups``: rewards -> advantages -> samples) and its rollout rows."""
        cfg = self.cfg
        base_nll, batch.naturalness_wait_s = self._base_nll(batch)
        keys = [[(pi, c.sample_index) for c in group] for pi, group in enumerate(batch.completions)]
        groups, outcomes = algo.build_groups(
            batch.completions, [[batch.results[k][0] for k in row] for row in keys], cfg.reward.unspeakable_reward,
            cfg.reward.naturalness_coef, [[base_nll.get(k) for k in row] for row in keys])
        rows = []
        for pi, group in enumerate(batch.completions):
            for c, key, outcome in zip(group, keys[pi], outcomes[pi], strict=True):
                result, scored_at = batch.results[key]
                # The base NLL comes from the sampler when the naturalness penalty needs it now, else from
                # the learner's update (filled in after it).
                rows.append(rollout_row(step, pi, batch.generation.prompts[pi], c, result, outcome,
                                        temperature=batch.generation.temperature, submitted_at=batch.sampled_at,
                                        scored_at=scored_at, targets=self.targets,
                                        controls=cfg.guards.control_regions, base_nll=base_nll.get(key)))
        self.state.samples_scored += len(rows)
        self.state.samples_failed += sum(row["status"] == "failed" for row in rows)
        return groups, rows

    def _check_failure_budget(self, step: int, rows: list[dict]) -> None:
        """Stop the run when too many completions fail to score: per step, and per run from its fifth
        step on (so that a first unlucky step is judged by the per-step budget alone). The step's rows
        are written first, so its failures and their reasons are on disk."""
        reward = self.cfg.reward
        failed = [r for r in rows if r["status"] == "failed"]
        run_fraction = self.state.samples_failed / max(1, self.state.samples_scored)
        cause = None
        if rows and len(failed) / len(rows) > reward.max_failed_fraction:
            cause = (f"step {step}: {len(failed)} of {len(rows)} completions failed to score, more than "
                     f"reward.max_failed_fraction = {reward.max_failed_fraction}")
        elif step + 1 >= min(5, self.cfg.run.steps) and run_fraction > reward.max_failed_fraction_run:
            cause = (f"{self.state.samples_failed} of {self.state.samples_scored} completions of the run failed to "
                     f"score by step {step}, more than reward.max_failed_fraction_run = "
                     f"{reward.max_failed_fraction_run}")
        if cause is None:
            return
        now = time.time()
        for row in rows:
            row.update(used_in_update=False, learner_version=self.state.version, updated_at=now, is_weight=None)
        with self._writing(f"the rollouts of step {step}"):
            self.files.write_rollouts(step, rows)
        errors = [r["error"] for r in rows if r["status"] == "failed" and r["error"]]
        raise FailureBudgetExceeded(cause + (f"; first error: {errors[0]}" if errors else ""))

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
            **analysis.step_means(rows),
            "naturalness_seconds": batch.naturalness_wait_s,
        }
        roi_means = {name: float(np.nanmean([r[f"roi_{name}"] for r in rows if r[f"roi_{name}"] is not None]))
                     for name in ROI_NAMES if any(r[f"roi_{name}"] is not None for r in rows)}
        self.metrics.set(self.metrics.select(record) | {f"roi_{name}": v for name, v in roi_means.items()})
        return record

    def _record_probe(self, probe: ProbeResult) -> None:
        with self._writing("metrics.jsonl"):
            self.files.append_metrics({"probe": probe.__dict__, "step": self.state.step - 1})
        self.metrics.set({"probe_sampler_vs_learner": probe.sampler_vs_learner,
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
                        "pending_generations": pending, "guards": self.guards.state_dict(), "time": time.time()}
        config = self.cfg.model_dump(mode="json")
        config["prompts"]["file_sha256"] = hashlib.sha256(Path(self.cfg.prompts.file).read_bytes()).hexdigest()
        with self._writing(f"the checkpoint of step {step}"):
            path = save_checkpoint(self.files.checkpoints, step, learner_state, adapter_files, driver_state,
                                   older_adapters=older, config=config)
        log.info("checkpoint %s", path)

    def _finish(self, t_start: float) -> dict:
        adapter_files = self._pushed_or_exported()
        final = self.files.root / "final_adapter"
        with self._writing("final_adapter"):
            final.mkdir(exist_ok=True)
            for name, blob in adapter_files.items():
                (final / name).write_bytes(blob)
        steps = [m for m in self.files.read_metrics() if "reward_mean" in m]
        summary = summarize(steps)
        summary.update({"run_dir": str(self.files.root), "final_adapter": str(final),
                        "sampler_restarts": self.sampler_restarts,
                        "wall_seconds": time.time() - t_start, "samples_scored": self.state.samples_scored,
                        "samples_failed": self.state.samples_failed, "adapter_version": self.state.version})
        with self._writing("summary.json"):
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
        if getattr(self, "control", None) is not None:
            from reward_workers.control import control_name

            names.append(control_name(self.cfg.run.name))
            ray.kill(self.control)
            self.control = None
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


def release_stale_holders(pg_name: str, actor_names: list[str], timeout_s: float = 120.0) -> None:
    """Free the run's placement-group and actor names from an earlier driver of the same run.

    A driver killed with SIGKILL (``kill -9``, OOM killer, lost node) cannot clean up: its named placement
    group and actors live on until the GCS notices the job is dead, and a resubmitted ``--resume`` would
    then fail with "placement group ... already exists". Holders whose job the GCS reports dead are
    removed now; holders of a job still alive (the GCS notices a dead driver within seconds) are waited
    for, and a run that is really still running elsewhere is a clear error after ``timeout_s``.

    Reads the GCS tables directly (``ray._private.state``): the public state API needs the dashboard,
    which a private local cluster does not start.
    """
    from ray._private.state import state as gcs
    from ray.core.generated import gcs_pb2
    from ray.util.placement_group import PlacementGroup

    ctx = ray.get_runtime_context()
    namespace, own_job = ctx.namespace, ctx.get_job_id()
    wanted = set(actor_names)
    deadline = time.monotonic() + timeout_s
    removed: set[str] = set()
    announced = False
    while True:
        dead_jobs = {j["JobID"] for j in ray._private.state.jobs() if j["IsDead"]}
        accessor = gcs._connect_and_get_accessor()
        live: list[tuple[str, str]] = []  # (what, job) held by a job still alive
        releasing = 0  # held by a dead job: removal asked for, not yet done (it is asynchronous)
        for blob in accessor.get_placement_group_table():
            pg = gcs_pb2.PlacementGroupTableData.FromString(blob)
            if pg.name != pg_name or pg.ray_namespace != namespace or \
                    pg.state == gcs_pb2.PlacementGroupTableData.REMOVED:
                continue
            job = pg.creator_job_id.hex()
            if job == own_job:
                continue
            if job in dead_jobs:
                if pg.placement_group_id.hex() not in removed:
                    log.info("removing placement group %s left by dead job %s", pg_name, job)
                    remove_placement_group(PlacementGroup(ray.PlacementGroupID(pg.placement_group_id)))
                    removed.add(pg.placement_group_id.hex())
                releasing += 1
                continue
            live.append((f"placement group {pg_name}", job))
        for blob in accessor.get_actor_table(None, None):
            actor = gcs_pb2.ActorTableData.FromString(blob)
            if actor.name not in wanted or actor.ray_namespace != namespace or \
                    actor.state == gcs_pb2.ActorTableData.DEAD:
                continue
            job = actor.job_id.hex()
            if job == own_job:
                continue
            if job in dead_jobs:
                if actor.actor_id.hex() not in removed:
                    log.info("killing actor %s left by dead job %s", actor.name, job)
                    try:
                        ray.kill(ray.get_actor(actor.name), no_restart=True)
                    except ValueError:  # gone meanwhile
                        pass
                    removed.add(actor.actor_id.hex())
                releasing += 1
                continue
            live.append((f"actor {actor.name}", job))
        if not live and not releasing:
            return
        if live and not announced:
            announced = True
            log.info("waiting for %s to be released (its driver may have just died); up to %.0f s",
                     ", ".join(f"{what} (job {job})" for what, job in live), timeout_s)
        if time.monotonic() > deadline:
            held = ", ".join(f"{what} (job {job})" for what, job in live) or "names being released"
            raise RunFailure(f"run names are still held after {timeout_s:.0f} s: {held}; is this run already "
                             f"running on the cluster? (ray job list)")
        time.sleep(0.5)


def _bundle(cpus: float, gpus: float, resources: dict[str, float]) -> dict[str, float]:
    """A placement-group bundle; zero GPUs is the CPU embedded default, same code."""
    return {"CPU": cpus, **({"GPU": gpus} if gpus else {}), **resources}


PASS_THROUGH_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "NILEARN_DATA", "BRAINLOOP_CACHE", "HF_HOME",
                    "VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_OMP_THREADS_BIND")
