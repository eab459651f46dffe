"""Adapter push latency: learner step end -> the sampler serving the new version.

    python -m bench.adapter_push [--quick] [--json OUT] [--pushes 10] [--rank 32]

The real ``Learner`` and ``Sampler`` (vLLM engine) run as Ray actors on a local cluster, exactly as
``brainloop.driver`` starts them, with a rank-32 LoRA on q/v/o/down_proj of SmolLM2-135M. Each push
is one real ``learner.update`` on a fixed batch (2 prompts x 4 completions x 32 tokens the sampler
generated at the start; ``--quick``: 1 x 2 x 8 and 3 pushes), then the driver's push, submitted as
the driver does it (no waits between):

    ref = learner.export_adapter.remote(); sampler.load_adapter.remote(v, ref); sampler.score.remote(probe, v)

and timed from ``update`` returning to ``score`` returning. The split is read by waiting on each
reference in turn (``fetch_local=False``: the driver never pulls the adapter bytes):
export (PEFT save + bytes into the object store) / transfer + load (the sampler pulls the object,
writes the files, vLLM ``add_lora``, evicts the oldest) / first use (the probe scored under v).

Side-by-side references from the same run: a second probe under the same version (warm; the first
use minus this is what activating a new adapter costs), the update itself (push / update is the
overhead a synchronous step pays), and a final check that the sampler's probe log-probs are the
learner's (the push really served the new weights).
"""

from __future__ import annotations

import time
from typing import Any

import ray

from bench.common import (
    common_args,
    load_average,
    machine_info,
    median,
    percentile,
    print_targets,
    start_local_ray,
    table,
    target,
)
from bench.common import write_json as _write_json

MODEL = "pkg:smollm2-135m-instruct"
TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]
PROMPTS = ["Describe a walk along a river at dawn.", "Explain why the sky is blue to a child."]
PROBE_PROMPT = "Describe what you hear when someone reads a poem aloud."
PROBE_COMPLETION = "I hear a voice that rises and falls with the rhythm of the words."
# A push should cost little next to the update it follows (a synchronous step waits for both).
TARGET_PUSH_OVER_UPDATE = 0.5


def _batch(completions: list, version: int) -> list:
    """TrainGroups from the generated completions, advantages +-1 alternating (normalised per group)."""
    from brainloop.types import TrainGroup, TrainSample

    groups = []
    for group in completions:
        samples = [TrainSample(c.prompt_token_ids, c.token_ids, c.logprobs, 1.0 if j % 2 == 0 else -1.0, version)
                   for j, c in enumerate(group)]
        groups.append(TrainGroup(samples))
    return groups


def main(argv: list[str] | None = None) -> int:
    parser = common_args(__doc__.splitlines()[0])
    parser.add_argument("--pushes", type=int, default=None, help="default 10 (3 with --quick)")
    parser.add_argument("--rank", type=int, default=32)
    # One thread each: two actors share a 2-core machine with other jobs, and oversubscribed OpenMP
    # threads made the update ~3x slower and the scores erratic in a trial run.
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each actor")
    args = parser.parse_args(argv)
    pushes = args.pushes or (3 if args.quick else 10)
    # --quick: a smaller update (1 prompt x 2 completions x 8 tokens): a smoke test, not the measurement
    prompts, n_completions, max_new_tokens = (PROMPTS[:1], 2, 8) if args.quick else (PROMPTS, 4, 32)
    load_before = load_average()

    from transformers import AutoTokenizer

    from actors.sampler import Sampler
    from brainloop.config import AlgoConfig, LearnerConfig, LoraConfig, PolicyConfig
    from brainloop.driver import check_probe
    from brainloop.models import resolve_model
    from learner.learner import Learner

    policy = PolicyConfig(model=MODEL, lora=LoraConfig(r=args.rank, alpha=2 * args.rank, dropout=0.0,
                                                       target_modules=TARGETS))
    learner_cfg = LearnerConfig(lr=1e-3, warmup_steps=0, micro_batch_size=4, cpu_threads=args.threads)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(MODEL))
    probe_ids = tokenizer(PROBE_COMPLETION, add_special_tokens=False)["input_ids"]

    start_local_ray("bench-adapter-push",
                    env_vars={"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TOKENIZERS_PARALLELISM": "false"})
    rows: list[dict[str, Any]] = []
    try:
        t_start = time.time()
        sampler = ray.remote(Sampler).options(num_cpus=1).remote(
            MODEL, engine="vllm", max_lora_rank=max(8, args.rank), max_loaded_adapters=2, max_model_len=512,
            seed=0, dtype="float32", cpu_threads=args.threads)
        learner = ray.remote(Learner).options(num_cpus=1).remote(
            policy.model_dump(), learner_cfg.model_dump(), pushes + 1, 0, AlgoConfig().model_dump())
        info = ray.get(learner.info.remote(), timeout=900)
        ray.get(sampler.current_version.remote(), timeout=900)
        startup_s = time.time() - t_start
        completions = ray.get(sampler.generate.remote(prompts, n=n_completions, max_new_tokens=max_new_tokens,
                                                      temperature=1.0, seed=1))
        probe_prompt_ids = ray.get(sampler.format_prompt.remote(PROBE_PROMPT))
        ray.get(sampler.score.remote(PROBE_PROMPT, probe_ids, 0))  # warm the scoring path once
        t0 = time.perf_counter()
        ray.get(sampler.score.remote(PROBE_PROMPT, probe_ids, 0))
        base_score_s = time.perf_counter() - t0
        adapter_bytes = 0
        for v in range(1, pushes + 1):
            groups = _batch(completions, v - 1)  # on-policy for the learner's current version
            t_u = time.perf_counter()
            stats = ray.get(learner.update.remote(groups))
            t0 = time.perf_counter()  # the learner step has ended: the push starts here
            export_ref = learner.export_adapter.remote()
            load_ref = sampler.load_adapter.remote(v, export_ref)
            score_ref = sampler.score.remote(PROBE_PROMPT, probe_ids, v)
            ray.wait([export_ref], fetch_local=False)
            t1 = time.perf_counter()
            ray.get(load_ref)
            t2 = time.perf_counter()
            sampler_lp = ray.get(score_ref)
            t3 = time.perf_counter()
            ray.get(sampler.score.remote(PROBE_PROMPT, probe_ids, v))
            t4 = time.perf_counter()
            if v == 1:
                adapter_bytes = sum(len(b) for b in ray.get(export_ref).values())
            del export_ref
            row = {"version": v, "push_s": t3 - t0, "export_s": t1 - t0, "transfer_load_s": t2 - t1,
                   "first_use_s": t3 - t2, "second_use_s": t4 - t3, "update_s": t0 - t_u,
                   "update_in_actor_s": stats["update_s"], "load1": load_average()[0]}
            row["push_over_update"] = row["push_s"] / row["update_s"]
            rows.append(row)
            print(f"push v{v}: {row['push_s']:.3f}s (export {row['export_s']:.3f} load {row['transfer_load_s']:.3f} "
                  f"first use {row['first_use_s']:.3f}; warm use {row['second_use_s']:.3f}; "
                  f"update {row['update_s']:.2f}s)", flush=True)
        # The last push really is served: the sampler's probe log-probs are the learner's.
        learner_lp = ray.get(learner.completion_logprobs.remote(probe_prompt_ids, probe_ids, True))
        base_lp = ray.get(learner.completion_logprobs.remote(probe_prompt_ids, probe_ids, False))
        probe = check_probe(pushes, sampler_lp, learner_lp, base_lp, tolerance=0.05, min_effect=1e-4)
        loaded = ray.get(sampler.loaded_versions.remote())
    finally:
        ray.shutdown()

    print()
    print(table(rows, ["version", "push_s", "export_s", "transfer_load_s", "first_use_s", "second_use_s",
                       "update_s", "push_over_update", "load1"], title=f"adapter push, LoRA r={args.rank}"))
    col = {k: [r[k] for r in rows] for k in rows[0]}
    summary = {
        "push_median_s": median(col["push_s"]), "push_p95_s": percentile(col["push_s"], 95),
        "export_median_s": median(col["export_s"]), "transfer_load_median_s": median(col["transfer_load_s"]),
        "first_use_median_s": median(col["first_use_s"]), "second_use_median_s": median(col["second_use_s"]),
        "base_score_s": base_score_s, "update_median_s": median(col["update_s"]),
        "push_over_update_median": median(col["push_over_update"]),
        "first_over_second_use_median": median([a / b for a, b in zip(col["first_use_s"], col["second_use_s"],
                                                                      strict=True)]),
        "adapter_bytes": adapter_bytes, "trainable_params": info["trainable_params"],
        "probe_sampler_vs_learner": probe.sampler_vs_learner, "probe_adapter_vs_base": probe.adapter_vs_base,
    }
    parts = {"export": summary["export_median_s"], "transfer+load": summary["transfer_load_median_s"],
             "first use": summary["first_use_median_s"]}
    bound = max(parts, key=parts.get)
    why = (f"{bound} bounds the push ({parts[bound]:.3f}s of {summary['push_median_s']:.3f}s median); "
           f"the update it follows took {summary['update_median_s']:.2f}s")
    targets = [target("push / update (median)", summary["push_over_update_median"], TARGET_PUSH_OVER_UPDATE,
                      False, why)]
    print()
    for k, v in summary.items():
        print(f"{k:32s} {v:.4g}" if isinstance(v, float) else f"{k:32s} {v}")
    print("push split (median): " + ", ".join(f"{k} {v:.3f}s ({v / summary['push_median_s']:.0%})"
                                                for k, v in parts.items()))
    print_targets(targets)
    report = {"bench": "adapter_push", "quick": args.quick, "machine": machine_info(),
              "load_average_before": load_before, "load_average_after": load_average(),
              "config": {"model": MODEL, "rank": args.rank, "alpha": 2 * args.rank, "target_modules": TARGETS,
                         "engine": "vllm", "actor_threads": args.threads,
                         "batch": f"{len(prompts)} prompts x {n_completions} completions",
                         "max_new_tokens": max_new_tokens, "pushes": pushes, "probe_tokens": len(probe_ids)},
              "actor_startup_s": startup_s, "loaded_versions_at_end": loaded,
              "summary": summary, "targets": targets, "pushes": rows}
    _write_json(args.json, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
