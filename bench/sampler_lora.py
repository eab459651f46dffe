"""Sampling with a LoRA adapter on vLLM-CPU: vLLM's LoRA ops, grouped ones, merged weights, no adapter.

    python -m bench.sampler_lora [--quick] [--json OUT] [--rounds 3] [--threads 1]

Two in-process ``Sampler`` engines (vLLM, SmolLM2-135M, ``--threads`` torch threads), one with
vLLM's LoRA layers (``cpu_lora_ops: grouped``), one built without them (``merged``), and a rank-16
adapter on q/v/o/down_proj (lora_B drawn N(0, 0.01) so the adapter changes the output). Per round
the four variants run back to back, order rotated, each on the same sampling call as the TRL
comparison's step (2 prompts x 4 completions x 64 new tokens, the same seed):

    base     version 0 on the LoRA engine (its LoRA layers still run, with no adapter)
    vllm     the adapter with vLLM 0.32's CPU ops (a weight matrix gathered per token)
    grouped  the adapter with ``actors.vllm_cpu_lora`` (one matmul per adapter in the batch)
    merged   the adapter merged into the weights of the engine without LoRA (``actors.lora_merge``)

vllm and grouped serve the same engine, switched with ``vllm_cpu_lora.use`` between calls; merged
switches its weights between version 0 (warm-up) and 1 like a run does each step (included in its
time: the first call of a round after the other engine's). Reported: wall and process CPU seconds per
call (medians over rounds), ratios from the same rounds, and how far variants agree under one seed
(identical samples; the largest log-prob difference over the tokens before two samples first differ).
"""

from __future__ import annotations

import tempfile
import time
from typing import Any

from bench.common import common_args, load_average, machine_info, median, print_targets, table, target
from bench.common import write_json as _write_json

MODEL = "pkg:smollm2-135m-instruct"
TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]
PROMPTS = ["Describe a walk along a river at dawn.", "Explain why the sky is blue to a child."]
VARIANTS = ("base", "vllm", "grouped", "merged")
# With the grouped ops an adapter should cost little more than the base model's sampling.
TARGET_GROUPED_OVER_BASE = 1.25
# Merged weights: an adapter costs nothing per token, so below the LoRA engine's own base model.
TARGET_MERGED_OVER_BASE = 1.0


def _random_adapter(model_path: str, out_dir: str, rank: int) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.01)
    peft_model.save_pretrained(out_dir)


def _agreement(a: list, b: list) -> dict[str, float]:
    """Identical samples, and the largest |log-prob difference| before two samples first differ."""
    same, max_diff = 0, 0.0
    pairs = [(x, y) for ga, gb in zip(a, b, strict=True) for x, y in zip(ga, gb, strict=True)]
    for x, y in pairs:
        same += x.token_ids == y.token_ids
        for tx, ty, lx, ly in zip(x.token_ids, y.token_ids, x.logprobs, y.logprobs, strict=False):
            if tx != ty:
                break
            max_diff = max(max_diff, abs(lx - ly))
    return {"identical_fraction": same / len(pairs), "max_logprob_diff": max_diff}


def main(argv: list[str] | None = None) -> int:
    parser = common_args(__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=None, help="default 3 (1 with --quick)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the sampler")
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args(argv)
    rounds = args.rounds or (1 if args.quick else 3)
    max_new_tokens = 8 if args.quick else 64
    load_before = load_average()

    from actors import vllm_cpu_lora
    from actors.sampler import Sampler
    from brainloop.models import resolve_model

    model_path = resolve_model(MODEL)
    adapter_dir = tempfile.mkdtemp(prefix="bench-sampler-lora-")
    _random_adapter(model_path, adapter_dir, args.rank)
    sampler = Sampler(model_path, engine="vllm", max_lora_rank=max(8, args.rank), max_model_len=512, seed=0,
                      cpu_threads=args.threads, cpu_lora_ops="grouped")
    sampler.load_adapter(1, adapter_dir)
    merged = Sampler(model_path, engine="vllm", max_model_len=512, seed=0, cpu_threads=args.threads,
                     cpu_lora_ops="merged")
    merged.load_adapter(1, adapter_dir)

    def call(variant: str, seed: int) -> tuple[dict[str, Any], list]:
        if variant in ("vllm", "grouped"):
            vllm_cpu_lora.use(variant)
        engine = merged if variant == "merged" else sampler
        if variant == "merged":
            merged.generate(PROMPTS[:1], 1, 1, 1.0, seed=seed, version=0)  # the base weights back, as between steps
        t0, c0 = time.perf_counter(), time.process_time()
        out = engine.generate(PROMPTS, 4, max_new_tokens, 1.0, seed=seed, version=0 if variant == "base" else 1)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        tokens = sum(len(c.token_ids) for group in out for c in group)
        return {"variant": variant, "seconds": wall, "cpu_seconds": cpu, "tokens": tokens,
                "tokens_per_s": tokens / wall}, out

    for variant in VARIANTS:  # warm each path once (first calls allocate and load)
        call(variant, seed=10_000)
    rows: list[dict[str, Any]] = []
    agreement: list[dict[str, float]] = []
    merged_agreement: list[dict[str, float]] = []
    t_start = time.time()
    for r in range(rounds):
        order = VARIANTS[r % len(VARIANTS):] + VARIANTS[: r % len(VARIANTS)]
        outs = {}
        for variant in order:
            row, outs[variant] = call(variant, seed=r)
            row["round"] = r
            rows.append(row)
            print(f"round {r} {variant:8s} {row['seconds']:.2f} s  {row['cpu_seconds']:.2f} CPU-s  "
                  f"{row['tokens']} tokens", flush=True)
        agreement.append(_agreement(outs["vllm"], outs["grouped"]))
        merged_agreement.append(_agreement(outs["grouped"], outs["merged"]))
    vllm_cpu_lora.use("grouped")

    variants: dict[str, Any] = {}
    for variant in VARIANTS:
        mine = [x for x in rows if x["variant"] == variant]
        variants[variant] = {"seconds_median": median([x["seconds"] for x in mine]),
                            "cpu_seconds_median": median([x["cpu_seconds"] for x in mine]),
                            "tokens_per_s_median": median([x["tokens_per_s"] for x in mine])}

    def ratio(a: str, b: str) -> float:  # per-round ratio, median over rounds
        return median([x["seconds"] / y["seconds"] for x in rows for y in rows
                       if x["round"] == y["round"] and x["variant"] == a and y["variant"] == b])

    ratios = {"grouped_over_vllm": ratio("grouped", "vllm"), "grouped_over_base": ratio("grouped", "base"),
              "vllm_over_base": ratio("vllm", "base"), "merged_over_grouped": ratio("merged", "grouped"),
              "merged_over_base": ratio("merged", "base")}
    print(table(rows, ["round", "variant", "seconds", "cpu_seconds", "tokens", "tokens_per_s"]))
    print(table([{"variant": v, **variants[v]} for v in VARIANTS]))
    print(table([{"round": i, **a} for i, a in enumerate(agreement)], title="vllm vs grouped, same seed"))
    print(table([{"round": i, **a} for i, a in enumerate(merged_agreement)], title="grouped vs merged, same seed"))
    print("ratios (per round, median): " + ", ".join(f"{k} {v:.3f}" for k, v in ratios.items()), flush=True)
    targets = [target("sampling with an adapter (grouped ops) / without", ratios["grouped_over_base"],
                      TARGET_GROUPED_OVER_BASE, higher_is_better=False,
                      why_missed="the adapter's matmuls and their Python dispatch per layer"),
               target("sampling with an adapter (merged) / the LoRA engine without", ratios["merged_over_base"],
                      TARGET_MERGED_OVER_BASE, higher_is_better=False,
                      why_missed="the weight switch before the call, or noise between the two engines")]
    print_targets(targets)
    _write_json(args.json, {
        "bench": "sampler_lora", "quick": args.quick, "machine": machine_info(),
        "settings": {"model": MODEL, "rank": args.rank, "targets": TARGETS, "prompts": len(PROMPTS),
                     "completions": 4, "max_new_tokens": max_new_tokens, "threads": args.threads, "rounds": rounds,
                     "order": "variants rotated per round; same seed for all variants of a round"},
        "load_average_before": load_before, "load_average_after": load_average(),
        "measured_seconds": time.time() - t_start, "rows": rows, "variants": variants, "ratios": ratios,
        "summary": {**ratios, **{f"{v}_seconds": variants[v]["seconds_median"] for v in VARIANTS},
                    "identical_fraction": min(a["identical_fraction"] for a in agreement),
                    "max_logprob_diff": max(a["max_logprob_diff"] for a in agreement),
                    "merged_identical_fraction": min(a["identical_fraction"] for a in merged_agreement),
                    "merged_max_logprob_diff": max(a["max_logprob_diff"] for a in merged_agreement)},
        "agreement": agreement, "merged_agreement": merged_agreement, "targets": targets,
    })
    sampler.close()
    merged.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
