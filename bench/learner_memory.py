"""Learner memory: the KL reference as the adapter-disabled policy vs a second full model copy.

    python -m bench.learner_memory [--quick] [--json OUT] [--updates 2] [--no-large]

Two learners run the same update on the same batch (2 prompts x 4 completions x 64 tokens):

* ``adapter_disabled``: brainloop's ``Learner``: pi_ref is the policy with its LoRA disabled, so
  one copy of the base weights;
* ``second_copy``: the reference script's way, written minimally here (``SecondCopyLearner``): a
  frozen second ``AutoModelForCausalLM`` computes the reference logits; the update is otherwise
  identical (it is ``Learner.update``).

Each runs in a fresh subprocess (so allocator caches and imported libraries do not carry over)
which reports its peak RSS (``getrusage(RUSAGE_SELF).ru_maxrss``), the peaks of Rss / Pss /
anonymous memory sampled every 20 ms, and memory after each phase (imports, model load, each
update). The headline is the ratio of the peak RSS with *owned* weights (``own_weights``: as on a
GPU, every copy is real memory). The ``mmap`` comparison (full mode) is the CPU loader as it is:
transformers maps the float32 safetensors file zero-copy, so the second copy shares the first's
page-cache pages: Rss counts them twice, Pss (the physical cost) about once. At 135M
parameters the weights (0.54 GB in float32) are not the bulk of a learner's memory: the torch /
transformers runtime, activations and logits over the 49k vocabulary are fixed costs both variants
pay, so the report also gives the weights-only delta and, unless ``--no-large``, the same
comparison for a larger SmolLM2-like model built from a config with random weights (offline; the
trend as weights grow, not a claim about any trained model).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from bench.common import ROOT, common_args, load_average, machine_info, print_targets, table, target, write_json
from brainloop.models import cache_dir

MODEL = "pkg:smollm2-135m-instruct"
VARIANTS = ("adapter_disabled", "second_copy")
TARGET_RATIO = 0.6
PROMPTS = ["Describe a walk along a river at dawn.", "Explain why the sky is blue to a child."]
N_COMPLETIONS = 4
COMPLETION_TOKENS = 64
QUICK_BATCH = (2, 16)  # --quick: 2 completions x 16 tokens per prompt (a smoke test, not the measurement)
# SmolLM2-360M's geometry (random weights): about 2.7x the 135M model.
LARGE = {"hidden_size": 960, "intermediate_size": 2560, "num_hidden_layers": 32, "num_attention_heads": 15,
         "num_key_value_heads": 5, "head_dim": 64}
LARGE_DIR = cache_dir() / "bench" / "smollm2-like-360m"
RESULT_PREFIX = "LEARNER_MEMORY_RESULT "


# ---- memory probes ------------------------------------------------------------------------------


def rss_now() -> dict[str, int]:
    """Current Rss / Pss / Anonymous bytes of this process (/proc/self/smaps_rollup)."""
    out: dict[str, int] = {}
    try:
        for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB" and parts[0].rstrip(":") in ("Rss", "Pss", "Anonymous"):
                out[parts[0].rstrip(":").lower()] = int(parts[1]) * 1024
    except OSError:
        pass
    return out


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


class PeakSampler(threading.Thread):
    """Samples ``rss_now()`` every ``interval_s`` and keeps the maxima: the kernel keeps a peak of Rss
    only, and Rss counts a file page mapped twice twice (see ``own_weights``); Pss and anonymous
    memory do not."""

    def __init__(self, interval_s: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.interval_s = interval_s
        self.peak: dict[str, int] = {}
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            for key, value in rss_now().items():
                self.peak[key] = max(self.peak.get(key, 0), value)
            self._halt.wait(self.interval_s)

    def stop(self) -> dict[str, int]:
        self._halt.set()
        self.join()
        return self.peak


def own_weights(model) -> None:
    """Copy a model's weights into memory the process owns.

    transformers loads a float32 safetensors file on CPU as a zero-copy mmap: the weights stay page
    cache pages of the file, and a second model loaded from the same file maps the *same* pages (no
    new physical memory, though Rss counts them twice). On a GPU, or whenever the dtype differs from
    the file's, every copy is real memory; this makes the CPU run behave that way.
    """
    for p in model.parameters():  # tied weights are one Parameter: cloned once, still tied
        p.data = p.data.clone()
    for b in model.buffers():
        b.data = b.data.clone()


# ---- the child: one learner, one variant -----------------------------------------------------------


def _second_copy_class():
    from contextlib import contextmanager

    import torch

    from learner.learner import Learner

    class SecondCopyLearner(Learner):
        """The reference's KL reference: a frozen second full copy of the base model."""

        def __init__(self, policy: dict, learner: dict, total_steps: int, seed: int, algo_cfg: dict) -> None:
            from transformers import AutoModelForCausalLM

            from brainloop.models import resolve_model
            from learner.learner import torch_dtype

            super().__init__(policy, learner, total_steps, seed, algo_cfg)
            self.ref_model = AutoModelForCausalLM.from_pretrained(
                resolve_model(policy["model"]), dtype=torch_dtype(policy["dtype"])).to(self.device).eval()
            self.ref_model.requires_grad_(False)

        @torch.no_grad()
        def _reference_logits(self, ids, attention, keep):
            # The reference's way: pi_ref from a second, frozen full copy of the model.
            return self.ref_model(input_ids=ids, attention_mask=attention, logits_to_keep=keep).logits

        @contextmanager
        def _reference(self):
            # The update's pi_ref: the second copy's decoder (its head's weights equal the policy's).
            with torch.no_grad():
                yield self.ref_model.get_decoder()

    return SecondCopyLearner


def _batch(model_path: str, vocab: int, version: int, n_completions: int, n_tokens: int, seed: int = 0):
    """2 chat-formatted prompts x 4 completions of 64 fixed random tokens (no EOS): the same batch
    for both variants; advantages +-1 (normalised within each group)."""
    import random

    from transformers import AutoTokenizer

    from brainloop.types import TrainGroup, TrainSample

    tok = AutoTokenizer.from_pretrained(model_path)
    rng = random.Random(seed)
    groups = []
    for prompt in PROMPTS:
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                       tokenize=False)
        prompt_ids = list(tok(text, add_special_tokens=False)["input_ids"])
        samples = [TrainSample(prompt_ids, [rng.randrange(100, vocab) for _ in range(n_tokens)],
                               [-3.0] * n_tokens, 1.0 if j % 2 == 0 else -1.0, version)
                   for j in range(n_completions)]
        groups.append(TrainGroup(samples))
    return groups


def child(variant: str, model: str, updates: int, threads: int, weights: str, batch: tuple[int, int]) -> dict[str, Any]:
    """Run one learner variant for ``updates`` updates; return its memory by phase."""
    sampler = PeakSampler()
    sampler.start()
    phases: list[dict[str, Any]] = [{"phase": "start", **rss_now(), "peak": peak_rss()}]
    import torch

    torch.set_num_threads(threads)
    import peft  # noqa: F401  (imported here so the phase 'imports' holds every library's cost)
    import transformers  # noqa: F401

    from brainloop.config import AlgoConfig, LearnerConfig, LoraConfig, PolicyConfig
    from brainloop.models import resolve_model
    from learner.learner import Learner

    phases.append({"phase": "imports", **rss_now(), "peak": peak_rss()})
    policy = PolicyConfig(model=model, lora=LoraConfig(r=32, alpha=64, dropout=0.0))
    learner_cfg = LearnerConfig(lr=1e-3, warmup_steps=0, micro_batch_size=4, cpu_threads=threads)
    cls = Learner if variant == "adapter_disabled" else _second_copy_class()
    t0 = time.perf_counter()
    learner = cls(policy.model_dump(), learner_cfg.model_dump(), updates, 0, AlgoConfig().model_dump())
    models = [learner.model] + ([learner.ref_model] if variant == "second_copy" else [])
    if weights == "owned":
        for m in models:
            own_weights(m)
    load_s = time.perf_counter() - t0
    phases.append({"phase": "loaded", **rss_now(), "peak": peak_rss()})
    weight_bytes = sum(p.numel() * p.element_size() for m in models for p in m.parameters())
    vocab = learner.model.get_input_embeddings().weight.shape[0]
    update_s = []
    stats: dict[str, Any] = {}
    for u in range(updates):
        groups = _batch(resolve_model(model), vocab, learner.version, *batch)
        t0 = time.perf_counter()
        stats = learner.update(groups)
        update_s.append(time.perf_counter() - t0)
        phases.append({"phase": f"update{u + 1}", **rss_now(), "peak": peak_rss()})
    optim_bytes = sum(t.numel() * t.element_size() for s in learner.optimizer.state.values()
                      for t in s.values() if torch.is_tensor(t))
    n_tokens = sum(len(s.prompt_ids) + len(s.completion_ids) for g in groups for s in g.samples)
    # one float32 (rows x length x vocab) tensor of a micro-batch (a group's samples, at most micro_batch_size)
    logits_bytes = min(learner_cfg.micro_batch_size, batch[0]) * (n_tokens // (len(PROMPTS) * batch[0])) * vocab * 4
    sampled = sampler.stop()
    return {"variant": variant, "model": model, "weights": weights, "peak_rss": peak_rss(),
            "peak_pss_sampled": sampled.get("pss", 0), "peak_anonymous_sampled": sampled.get("anonymous", 0),
            "peak_rss_sampled": sampled.get("rss", 0), "phases": phases,
            "weight_bytes": weight_bytes, "lora_bytes": sum(p.numel() * p.element_size() for p in learner.params),
            "optimizer_state_bytes": optim_bytes, "vocab": vocab, "batch_tokens": n_tokens,
            "logits_bytes_per_micro_batch": logits_bytes,
            "batch": f"{len(PROMPTS)} prompts x {batch[0]} completions x {batch[1]} tokens",
            "load_s": load_s, "update_s": update_s, "loss": stats.get("loss"), "torch_threads": threads}


def run_child(variant: str, model: str, updates: int, threads: int, weights: str, batch: tuple[int, int],
              timeout_s: float) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "bench.learner_memory", "--child", variant, "--model", model,
           "--updates", str(updates), "--threads", str(threads), "--weights", weights,
           "--batch", str(batch[0]), str(batch[1])]
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
           "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
    wall = time.perf_counter() - t0
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{variant} child failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    result = json.loads(lines[-1][len(RESULT_PREFIX):])
    result["wall_s"] = wall
    return result


def ensure_large_model(source: str = MODEL) -> str:
    """A SmolLM2-like model at 360M geometry with seeded random weights, saved once (offline)."""
    if (LARGE_DIR / "config.json").is_file():
        return str(LARGE_DIR)
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from brainloop.models import resolve_model

    base = Path(resolve_model(source))
    config = AutoConfig.from_pretrained(base)
    for key, value in LARGE.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tmp = LARGE_DIR.with_name(LARGE_DIR.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        if (base / name).is_file():
            shutil.copy(base / name, tmp / name)
    tmp.replace(LARGE_DIR)
    return str(LARGE_DIR)


def compare(model: str, label: str, updates: int, threads: int, weights: str, batch: tuple[int, int],
            timeout_s: float) -> dict[str, Any]:
    res = {v: run_child(v, model, updates, threads, weights, batch, timeout_s) for v in VARIANTS}
    ours, ref = res["adapter_disabled"], res["second_copy"]
    imports = {v: next(p for p in r["phases"] if p["phase"] == "imports")["rss"] for v, r in res.items()}
    loaded = {v: next(p for p in r["phases"] if p["phase"] == "loaded") for v, r in res.items()}
    return {
        "label": label, "model": model, "weights": weights, "updates": updates,
        "peak_rss_adapter_disabled": ours["peak_rss"], "peak_rss_second_copy": ref["peak_rss"],
        "peak_ratio": ours["peak_rss"] / ref["peak_rss"],
        # Proportional set size: a file page mapped by both models counts once (the physical cost).
        "peak_pss_ratio": ours["peak_pss_sampled"] / ref["peak_pss_sampled"],
        # The same ratio without the runtime both pay before any model exists (torch, transformers, peft).
        "peak_ratio_above_imports": (ours["peak_rss"] - imports["adapter_disabled"])
        / (ref["peak_rss"] - imports["second_copy"]),
        "peak_delta": ref["peak_rss"] - ours["peak_rss"],
        "peak_pss_delta": ref["peak_pss_sampled"] - ours["peak_pss_sampled"],
        "weights_one_copy": ours["weight_bytes"], "weights_second_copy_variant": ref["weight_bytes"],
        "loaded_rss_delta": loaded["second_copy"]["rss"] - loaded["adapter_disabled"]["rss"],
        "imports_rss": imports["adapter_disabled"], "loaded_rss": loaded["adapter_disabled"]["rss"],
        # Everything but the one weight copy (runtime, activations, logits, optimizer, slack): the
        # ratio F+W / F+2W reaches 0.6 only once the weights W are at least twice this.
        "rest_bytes": ours["peak_rss"] - ours["weight_bytes"],
        "weights_needed_for_target": 2 * (ours["peak_rss"] - ours["weight_bytes"]),
        "update_s_adapter_disabled": ours["update_s"], "update_s_second_copy": ref["update_s"],
        "variants": res,
    }


def main(argv: list[str] | None = None) -> int:
    parser = common_args(__doc__.splitlines()[0])
    parser.add_argument("--updates", type=int, default=None, help="updates per learner (default 2; 1 with --quick)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in each learner process")
    parser.add_argument("--no-large", action="store_true", help="skip the larger random-weight model")
    parser.add_argument("--child", choices=VARIANTS, help=argparse_hidden())
    parser.add_argument("--model", default=MODEL, help=argparse_hidden())
    parser.add_argument("--weights", choices=("owned", "mmap"), default="owned", help=argparse_hidden())
    parser.add_argument("--batch", type=int, nargs=2, default=None, help=argparse_hidden())
    args = parser.parse_args(argv)
    if args.child:
        result = child(args.child, args.model, args.updates or 1, args.threads, args.weights,
                       tuple(args.batch or (N_COMPLETIONS, COMPLETION_TOKENS)))
        print(RESULT_PREFIX + json.dumps(result), flush=True)
        return 0

    updates = args.updates or (1 if args.quick else 2)
    load_before = load_average()
    batch = QUICK_BATCH if args.quick else (N_COMPLETIONS, COMPLETION_TOKENS)
    comparisons = [compare(MODEL, "smollm2-135m", updates, args.threads, "owned", batch, 900)]
    if not args.quick:
        comparisons.append(compare(MODEL, "smollm2-135m", updates, args.threads, "mmap", batch, 900))
        if not args.no_large:
            # One update: the peak is set by the first update's forward/backward (optimizer state is LoRA-sized).
            comparisons.append(compare(ensure_large_model(), "smollm2-like-360m", 1, args.threads, "owned", batch,
                                       2400))

    gb = 1024**3
    rows = []
    for c in comparisons:
        for v in VARIANTS:
            r = c["variants"][v]
            ph = {p["phase"]: p for p in r["phases"]}
            rows.append({"model": c["label"], "weights": c["weights"], "variant": v,
                         "peak_rss_GiB": r["peak_rss"] / gb, "peak_pss_GiB": r["peak_pss_sampled"] / gb,
                         "imports_GiB": ph["imports"]["rss"] / gb, "loaded_GiB": ph["loaded"]["rss"] / gb,
                         "weights_GiB": r["weight_bytes"] / gb,
                         "update_s": sum(r["update_s"]) / len(r["update_s"])})
    print()
    print(table(rows, title="learner peak memory by variant (each in a fresh process)"))
    print()
    print(table([{"model": c["label"], "weights": c["weights"], "peak_rss_ratio": c["peak_ratio"],
                  "peak_pss_ratio": c["peak_pss_ratio"], "ratio_above_imports": c["peak_ratio_above_imports"],
                  "peak_rss_delta_GiB": c["peak_delta"] / gb, "peak_pss_delta_GiB": c["peak_pss_delta"] / gb,
                  "one_copy_weights_GiB": c["weights_one_copy"] / gb} for c in comparisons],
                title="adapter-disabled reference / second-copy reference"))
    head = comparisons[0]
    ours = head["variants"]["adapter_disabled"]
    peak = ours["peak_rss"]
    update_part = peak - head["loaded_rss"]
    why = (f"the weights are {head['weights_one_copy'] / gb:.2f} GiB of our {peak / gb:.2f} GiB peak: the runtime "
           f"before any model ({head['imports_rss'] / gb:.2f} GiB: torch, transformers, peft) and the update "
           f"itself ({update_part / gb:.2f} GiB: activations, logits and log-softmaxes over the {ours['vocab']}-token "
           f"vocabulary at {ours['logits_bytes_per_micro_batch'] / gb:.2f} GiB each per micro-batch, allocator "
           f"slack) are paid by both variants, so dropping one weight copy "
           f"({head['peak_delta'] / gb:.2f} GiB measured) cannot reach 0.6x at this size: "
           f"(F + W) / (F + 2W) <= 0.6 needs W >= 2F = {head['weights_needed_for_target'] / gb:.1f} GiB")
    targets = [target("peak RSS ratio, 135M (owned weights)", head["peak_ratio"], TARGET_RATIO, False, why)]
    for c in comparisons[1:]:
        targets.append(target(f"peak RSS ratio, {c['label']} ({c['weights']} weights)", c["peak_ratio"],
                              TARGET_RATIO, False,
                              f"the rest F = {c['rest_bytes'] / gb:.2f} GiB outweighs the weights W = "
                              f"{c['weights_one_copy'] / gb:.2f} GiB (0.6x needs W >= 2F)"
                              + ("; with mmap-loaded weights the second copy shares the file's pages: Pss ratio "
                                 f"{c['peak_pss_ratio']:.3f}" if c["weights"] == "mmap" else "")))
    summary = {f"{c['label']}_{c['weights']}_{k}": c[k] for c in comparisons
               for k in ("peak_ratio", "peak_pss_ratio", "peak_ratio_above_imports", "peak_delta",
                         "weights_one_copy", "rest_bytes", "peak_rss_adapter_disabled", "peak_rss_second_copy")}
    print()
    print_targets(targets)
    report = {"bench": "learner_memory", "quick": args.quick, "machine": machine_info(),
              "load_average_before": load_before, "load_average_after": load_average(),
              "config": {"batch": f"{len(PROMPTS)} prompts x {batch[0]} completions x {batch[1]} tokens",
                         "lora": "r=32 alpha=64 on q,v,o,down", "micro_batch_size": 4,
                         "dtype": "float32", "torch_threads": args.threads, "updates": updates},
              "summary": summary, "targets": targets, "rows": rows, "comparisons": comparisons}
    write_json(args.json, report)
    return 0


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    raise SystemExit(main())
