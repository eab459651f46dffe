"""The learner's update, old vs new, timed side by side on the demo config's batch.

    python -m bench.learner_update [--quick] [--json OUT] [--rounds 6] [--no-memory]

The batch (``demo_groups``): configs/demo.yaml's step shape, 2 chat-formatted training prompts x 4
completions of up to 48 tokens (SmolLM2-135M-Instruct float32, LoRA r=16 on q,v,o,down,
micro-batch 4, one thread). ``old`` is ``ReferenceLearner``, the update as it was before issue 15
(kept verbatim below; tests/test_learner_update.py compares the two); ``new`` is
``learner.learner.Learner``. Both learners live in this process and update alternately (the order
swapped each round, round 0 a warm-up), each round from the same state on the same batch, so the
ratio is side by side and the reported loss / KL / statistics can be compared; wall seconds and
this process's CPU seconds are both recorded (CPU seconds are less sensitive to other load on a
shared machine). Then (unless ``--quick`` / ``--no-memory``) the update's peak RSS above the loaded
learner, old vs new, each in a fresh process, at micro-batch 4 and 8.
"""

from __future__ import annotations

import argparse
import random
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from bench.common import ROOT, common_args, load_average, machine_info, median, print_targets, table, target, write_json
from brainloop import algo
from learner.learner import Learner

CONFIG = ROOT / "configs" / "demo.yaml"
TARGET_RATIO = 0.6
COMPLETION_LENGTHS = (48, 48, 47, 43)  # demo completions average ~47 of max_new_tokens = 48; shorter ones end in EOS


def make_learner(cls: type | None = None, config: Path = CONFIG, overrides: dict | None = None):
    """A learner on the demo config (``cls`` defaults to ``learner.learner.Learner``)."""
    from brainloop.config import load_config

    cfg = load_config(config, overrides)
    return (cls or Learner)(cfg.policy.model_dump(), cfg.learner.model_dump(), cfg.run.steps, cfg.run.seed,
                            cfg.algo.model_dump())


def demo_groups(learner, version: int, off_policy: bool = False, seed: int = 0, config: Path = CONFIG,
                lengths: tuple[int, ...] = COMPLETION_LENGTHS) -> list:
    """2 training prompts (as step 0 of the demo draws them) x len(lengths) completions of random
    tokens; completions shorter than the longest end in EOS. ``off_policy``: the second group's
    samples come from version - 1 (their sampler log-probs then enter the importance weights)."""
    from transformers import AutoTokenizer

    from brainloop.config import load_config
    from brainloop.models import resolve_model
    from brainloop.prompts import load_prompts, prompts_for_step, split
    from brainloop.types import TrainGroup, TrainSample

    cfg = load_config(config)
    tok = AutoTokenizer.from_pretrained(resolve_model(cfg.policy.model))
    prompts = prompts_for_step(split(load_prompts(cfg.prompts.file), "train"), 0, cfg.prompts.prompts_per_step,
                               cfg.run.seed)
    vocab = learner.model.get_input_embeddings().weight.shape[0]
    rng = random.Random(seed)
    groups = []
    for g, prompt in enumerate(prompts):
        text = tok.apply_chat_template([{"role": "user", "content": prompt.text}], add_generation_prompt=True,
                                       tokenize=False)
        prompt_ids = list(tok(text, add_special_tokens=False)["input_ids"])
        samples = []
        for j, n in enumerate(lengths):
            completion = [rng.randrange(100, vocab) for _ in range(n)]
            if n < max(lengths):
                completion[-1] = tok.eos_token_id
            sampler_lp = [-3.0 + rng.uniform(-0.5, 0.5) for _ in range(n)]
            adapter_version = version - 1 if off_policy and g == 1 else version
            samples.append(TrainSample(prompt_ids, completion, sampler_lp, (-1.0) ** j * (0.5 + 0.25 * j),
                                       adapter_version))
        groups.append(TrainGroup(samples))
    return groups


# ---- the update as it was before issue 15 (commit 3d3564c), kept verbatim as the reference ----------
# The old math: three log_softmax passes over (rows, tokens, vocabulary) per micro-batch (token
# log-probs, the loss's log-probs, the KL), logits materialised for the whole micro-batch, and every
# sample's prompt run through both the policy and the reference forward.


def _float(x):
    """``x.float()``, as the old code wrote it, except that float64 stays float64 (so the equivalence
    test can also run in double precision); identical for float32 / bf16 / fp16 models."""
    return x if x.dtype == torch.float64 else x.float()


def reference_token_log_probs(logits, targets):
    return torch.gather(F.log_softmax(_float(logits), dim=-1), -1, targets.unsqueeze(-1)).squeeze(-1)


def reference_full_kl(logits, ref_logits):
    logp = F.log_softmax(_float(logits), dim=-1)
    ref_logp = F.log_softmax(_float(ref_logits), dim=-1)
    return (logp.exp() * (logp - ref_logp)).sum(-1)


def reference_policy_loss(logits, ref_logits, targets, mask, advantages, kl_coef, group_size, is_weights=None):
    masked_mean = algo.masked_mean
    logp = reference_token_log_probs(logits, targets)
    weights = torch.ones_like(logp) if is_weights is None else is_weights
    weighted_ce = -masked_mean(weights * logp, mask)  # (B,)
    kl_tok = reference_full_kl(logits, ref_logits)
    kl_mean = masked_mean(kl_tok, mask)  # nats per token
    kl_sum = (kl_tok * mask).sum(-1)  # nats per sequence
    loss = ((advantages * weighted_ce + kl_coef * kl_mean) / group_size).sum()
    stats = {"ce": -masked_mean(logp.detach(), mask), "kl_per_token": kl_mean.detach(),
             "kl_per_sequence": kl_sum.detach(), "logp": logp.detach()}
    return loss, stats


class ReferenceLearner(Learner):
    """``Learner`` with the pre-issue-15 update (its ``_forward`` and ``update``, verbatim)."""

    def _ref_forward(self, samples):
        seqs = [s.prompt_ids + s.completion_ids for s in samples]
        length = max(map(len, seqs))
        first = min(len(s.prompt_ids) for s in samples) - 1
        ids = torch.zeros(len(seqs), length, dtype=torch.long)
        attention = torch.zeros(len(seqs), length, dtype=torch.long)
        mask = torch.zeros(len(seqs), length - 1 - first)
        for i, (s, seq) in enumerate(zip(samples, seqs, strict=True)):
            ids[i, : len(seq)] = torch.tensor(seq)
            attention[i, : len(seq)] = 1
            mask[i, len(s.prompt_ids) - 1 - first : len(seq) - 1 - first] = 1.0
        ids, attention, mask = ids.to(self.device), attention.to(self.device), mask.to(self.device)
        keep = torch.arange(first, length - 1, device=self.device)
        with torch.no_grad(), self.model.disable_adapter():
            ref_logits = self.model(input_ids=ids, attention_mask=attention, logits_to_keep=keep).logits
        logits = self.model(input_ids=ids, attention_mask=attention, logits_to_keep=keep).logits
        return logits, ref_logits, ids[:, first + 1 :], mask

    def _ref_sampler_logprobs(self, samples, mask):
        out = torch.zeros_like(mask)
        starts = mask.argmax(dim=1).tolist()
        for i, s in enumerate(samples):
            out[i, starts[i] : starts[i] + len(s.sampler_logprobs)] = torch.tensor(s.sampler_logprobs)
        return out

    def update(self, groups):
        t0 = time.perf_counter()
        self.model.train()
        lr = algo.lr_at(self.version, self.cfg["lr"], self.cfg["warmup_steps"], self.total_steps,
                        self.cfg["min_lr_ratio"])
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        stats: dict[str, list[float]] = {"kl_per_token": [], "kl_per_sequence": [], "ce": [], "is_weight": []}
        loss_total = 0.0
        n_groups = max(1, len(groups))
        micro = self.cfg["micro_batch_size"]
        flat = [(sample, len(group.samples)) for group in groups for sample in group.samples]
        for start in range(0, len(flat), micro):
            chunk = [sample for sample, _ in flat[start : start + micro]]
            sizes = torch.tensor([size for _, size in flat[start : start + micro]], device=self.device,
                                 dtype=torch.float32)
            logits, ref_logits, targets, mask = self._ref_forward(chunk)
            on_policy = torch.tensor([s.adapter_version == self.version for s in chunk], device=self.device)
            learner_logp = reference_token_log_probs(logits, targets)
            weights = algo.truncated_importance_weights(
                learner_logp, self._ref_sampler_logprobs(chunk, mask), on_policy, self.algo_cfg["importance_cap"]
            )
            adv = torch.tensor([s.advantage for s in chunk], device=self.device, dtype=torch.float32)
            loss, st = reference_policy_loss(logits, ref_logits, targets, mask, adv, self.cfg["kl_coef"],
                                             group_size=sizes, is_weights=weights)
            (loss / n_groups).backward()
            loss_total += loss.item() / n_groups
            for key in ("kl_per_token", "kl_per_sequence", "ce"):
                stats[key] += st[key].tolist()
            stats["is_weight"] += algo.masked_mean(weights, mask).tolist()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg["grad_clip"])
        self.optimizer.step()
        self.version += 1
        n = max(1, len(stats["ce"]))
        return {
            "loss": loss_total,
            "kl_per_token": sum(stats["kl_per_token"]) / n,
            "kl_per_sequence": sum(stats["kl_per_sequence"]) / n,
            "ce": sum(stats["ce"]) / n,
            "is_weight_mean": sum(stats["is_weight"]) / n,
            "is_weights": stats["is_weight"],
            "grad_norm": float(grad_norm),
            "lr": lr,
            "num_samples": len(stats["ce"]),
            "version": self.version,
            "update_s": time.perf_counter() - t0,
        }



# ---- the benchmark ------------------------------------------------------------------------------


def compare_results(old: dict[str, Any], new: dict[str, Any]) -> dict[str, float]:
    """Relative differences of the update's reported numbers (same samples, same learner state)."""
    out = {k: abs(new[k] - old[k]) / max(abs(old[k]), 1e-12)
           for k in ("loss", "kl_per_token", "kl_per_sequence", "ce", "is_weight_mean", "grad_norm")}
    out["is_weights"] = max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(old["is_weights"], new["is_weights"],
                                                                              strict=True))
    return out


def _timed(fn) -> tuple[Any, float, float]:
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - t0, time.process_time() - c0  # CPU: this process only, robust to load


def run(rounds: int, lengths: tuple[int, ...], new_micro: int | None = None) -> dict[str, Any]:
    """Three learners take the same updates on the same batches, in an order rotated each round; round
    0 is a warm-up. ``old``: the previous update; ``new``: the current one running pi_ref itself;
    ``ahead``: the current one with pi_ref's pass done first by ``prepare_reference`` (as the driver
    does while the rewards are computed), timed apart from the update. Each round starts all three
    from one state (the old learner's) and compares what the updates report."""
    overrides = {"learner": {"micro_batch_size": new_micro}} if new_micro else None
    learners = {"old": make_learner(ReferenceLearner), "new": make_learner(overrides=overrides),
                "ahead": make_learner(overrides=overrides)}
    for name in ("new", "ahead"):
        learners[name].load_state(learners["old"].state())
    rows: list[dict[str, Any]] = []
    before: dict[str, torch.Tensor] = {}
    names = list(learners)
    for r in range(rounds + 1):
        order = names[r % 3:] + names[: r % 3]
        results: dict[str, dict[str, Any]] = {}
        load = load_average()
        for name in order:
            learner = learners[name]
            # Half the batch off-policy from round 1 on (as with algo.max_staleness = 1).
            groups = demo_groups(learner, version=learner.version, off_policy=r > 0, seed=r, lengths=lengths)
            prepare_s = prepare_cpu = 0.0
            if name == "ahead":
                pairs = [[(s.prompt_ids, s.completion_ids) for s in g.samples] for g in groups]
                _, prepare_s, prepare_cpu = _timed(partial(learner.prepare_reference, r, pairs))
            update = partial(learner.update, groups, r) if name == "ahead" else partial(learner.update, groups)
            results[name], wall, cpu = _timed(update)
            results[name].update(wall_s=wall, cpu_s=cpu, prepare_s=prepare_s, prepare_cpu_s=prepare_cpu)
        assert results["ahead"]["reference_ahead_fraction"] == 1.0
        # How far one update moved the adapters apart, relative to the largest step it took
        # (Adam's first steps are ~lr * sign(g): float noise on near-zero gradients shows up here).
        params = {n: {k: p.detach().clone() for k, p in m.model.named_parameters() if p.requires_grad}
                  for n, m in learners.items()}
        step = max((params["old"][k] - before[k]).abs().max().item() for k in before) if r else float("nan")
        drift = (max((params["new"][k] - p).abs().max().item() for k, p in params["old"].items()) / step
                 if r else float("nan"))
        same = all(torch.equal(params["new"][k], params["ahead"][k]) for k in params["new"])
        # The next round starts all from the old learner's state, so every round compares one update.
        for name in ("new", "ahead"):
            learners[name].load_state(learners["old"].state())
        before = params["old"]
        old, new, ahead = results["old"], results["new"], results["ahead"]
        rows.append({"round": r, "warmup": r == 0, "order": "/".join(order), "old_s": old["wall_s"],
                     "new_s": new["wall_s"], "ratio": new["wall_s"] / old["wall_s"],
                     "ahead_update_s": ahead["wall_s"], "ahead_prepare_s": ahead["prepare_s"],
                     "ahead_ratio": ahead["wall_s"] / old["wall_s"],
                     "ahead_total_ratio": (ahead["wall_s"] + ahead["prepare_s"]) / old["wall_s"],
                     "old_cpu_s": old["cpu_s"], "new_cpu_s": new["cpu_s"], "cpu_ratio": new["cpu_s"] / old["cpu_s"],
                     "ahead_update_cpu_s": ahead["cpu_s"], "ahead_prepare_cpu_s": ahead["prepare_cpu_s"],
                     "ahead_cpu_ratio": ahead["cpu_s"] / old["cpu_s"],
                     "loss_old": old["loss"], "loss_new": new["loss"], "loss_ahead": ahead["loss"],
                     "kl_old": old["kl_per_token"], "kl_new": new["kl_per_token"],
                     "max_rel_diff": max(compare_results(old, new).values()),
                     "ahead_equals_new": same and all(ahead[k] == new[k] for k in ("loss", "kl_per_token",
                                                                                   "grad_norm")),
                     "adapter_rel_drift": drift, "load_before": load})
        print(f"[learner_update] round {r}: old {old['wall_s']:.2f} s, new {new['wall_s']:.2f} s "
              f"({rows[-1]['ratio']:.3f}), ahead: update {ahead['wall_s']:.2f} s ({rows[-1]['ahead_ratio']:.3f}) "
              f"+ pi_ref {ahead['prepare_s']:.2f} s; max rel diff {rows[-1]['max_rel_diff']:.2e}, "
              f"ahead == new: {rows[-1]['ahead_equals_new']}, load {load}", flush=True)
    return {"rows": rows, "torch_threads": torch.get_num_threads()}


def memory_child(variant: str, micro: int) -> dict[str, Any]:
    """Peak memory of two updates of one variant in this (fresh) process, above the loaded learner."""
    from bench.learner_memory import PeakSampler, own_weights, rss_now

    learner = make_learner(ReferenceLearner if variant == "old" else None,
                           overrides={"learner": {"micro_batch_size": micro}})
    own_weights(learner.model)  # weights as real memory (not page cache), as on a GPU
    learner.update(demo_groups(learner, version=learner.version))  # allocator and imports warm
    loaded = rss_now()
    sampler = PeakSampler(0.005)
    sampler.start()
    for _ in range(2):
        learner.update(demo_groups(learner, version=learner.version, off_policy=True))
    peak = sampler.stop()
    return {"variant": variant, "micro_batch_size": micro, "rss_before_update": loaded.get("rss", 0),
            "peak_rss": peak.get("rss", 0), "update_peak_above_rss": peak.get("rss", 0) - loaded.get("rss", 0),
            "peak_anonymous": peak.get("anonymous", 0)}


def memory_report(micros: tuple[int, ...] = (4, 8)) -> dict[str, Any]:
    """Each variant and micro-batch size in a fresh process: how the update's peak grows with the
    micro-batch (old: its vocabulary-sized tensors grow with rows x tokens x vocabulary)."""
    import json
    import os
    import subprocess
    import sys

    rows = []
    for micro in micros:
        for variant in ("old", "new"):
            proc = subprocess.run([sys.executable, "-m", "bench.learner_update", "--memory-child", variant,
                                   str(micro)], cwd=ROOT, capture_output=True, text=True, timeout=900,
                                  env={**os.environ, "OMP_NUM_THREADS": "1"})
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("MEMORY ")]
            if proc.returncode or not lines:
                raise RuntimeError(f"memory child {variant} failed:\n{proc.stderr[-3000:]}")
            rows.append(json.loads(lines[-1][len("MEMORY "):]))
    by = {(r["variant"], r["micro_batch_size"]): r["update_peak_above_rss"] for r in rows}
    return {"rows": rows, "summary": {f"update_peak_new_over_old_micro{m}": by["new", m] / by["old", m]
                                      for m in micros}}


def main(argv: list[str] | None = None) -> int:
    parser = common_args(__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=None, help="measured rounds after one warm-up (default 6)")
    parser.add_argument("--new-micro", type=int, default=None, help="the new learner's micro-batch size (default: "
                        "the demo config's, as the old one)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory comparison (a fresh "
                        "process per variant and micro-batch size 4 / 8; never in --quick)")
    parser.add_argument("--memory-child", nargs=2, metavar=("VARIANT", "MICRO"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        import json

        torch.set_num_threads(1)
        print("MEMORY " + json.dumps(memory_child(args.memory_child[0], int(args.memory_child[1]))), flush=True)
        return 0
    rounds = args.rounds or (1 if args.quick else 6)
    lengths = (8, 6) if args.quick else COMPLETION_LENGTHS
    load_start = load_average()
    t0 = time.time()
    result = run(rounds, lengths, args.new_micro)
    measured = [r for r in result["rows"] if not r["warmup"]]
    old_s, new_s = sum(r["old_s"] for r in measured), sum(r["new_s"] for r in measured)
    old_cpu, new_cpu = sum(r["old_cpu_s"] for r in measured), sum(r["new_cpu_s"] for r in measured)
    summary = {"old_update_s_mean": old_s / len(measured), "new_update_s_mean": new_s / len(measured),
               "new_over_old": new_s / old_s, "new_over_old_median_round": median([r["ratio"] for r in measured]),
               "old_update_cpu_s_mean": old_cpu / len(measured), "new_update_cpu_s_mean": new_cpu / len(measured),
               "new_over_old_cpu": new_cpu / old_cpu,
               "ahead_update_s_mean": sum(r["ahead_update_s"] for r in measured) / len(measured),
               "ahead_prepare_s_mean": sum(r["ahead_prepare_s"] for r in measured) / len(measured),
               "ahead_update_over_old": sum(r["ahead_update_s"] for r in measured) / old_s,
               "ahead_update_over_old_cpu": sum(r["ahead_update_cpu_s"] for r in measured) / old_cpu,
               "ahead_update_plus_prepare_over_old": sum(r["ahead_update_s"] + r["ahead_prepare_s"]
                                                         for r in measured) / old_s,
               "ahead_equals_new_every_round": all(r["ahead_equals_new"] for r in result["rows"]),
               "max_rel_diff": max(r["max_rel_diff"] for r in result["rows"]),
               "max_adapter_rel_drift": max(r["adapter_rel_drift"] for r in result["rows"])}
    why = ("the update is matmul-bound (bench/results/learner_profile_after.txt); per group the model now runs "
           "prompt + 4 completions (~230 tokens) instead of 4 x (prompt + completion) (~370, padding included): "
           "0.63x the tokens in each of the three passes (reference, policy, backward), and the head (3 matmuls "
           "over the completion positions x 49k vocabulary, ~20% of the new update) cannot shrink: the exact KL "
           "needs both full distributions")
    ahead_why = ("pi_ref's pass runs when the step is sampled (learner.reference_ahead, the driver's default), "
                 "while the reward pool scores it; the update is left the policy's forward and backward and the "
                 "head; the numbers equal the update that runs pi_ref itself bit for bit (ahead_equals_new)")
    targets = [target("update wall seconds on the step's path, pi_ref ahead / old (same batches)",
                      summary["ahead_update_over_old"], TARGET_RATIO, False, ahead_why),
               target("update CPU seconds on the step's path, pi_ref ahead / old (robust to other load)",
                      summary["ahead_update_over_old_cpu"], TARGET_RATIO, False, ahead_why),
               target("update wall seconds, new with pi_ref inside / old (all the learner's work in the update)",
                      summary["new_over_old"], TARGET_RATIO, False, why),
               target("update CPU seconds of the process, new with pi_ref inside / old",
                      summary["new_over_old_cpu"], TARGET_RATIO, False, why)]
    print(table(result["rows"], columns=["round", "order", "old_s", "new_s", "ratio", "ahead_update_s",
                                         "ahead_prepare_s", "ahead_ratio", "ahead_total_ratio", "max_rel_diff",
                                         "ahead_equals_new", "load_before"], title="\nlearner update, old vs new"))
    memory = None if args.quick or args.no_memory else memory_report()
    if memory:
        gib = 1024**3
        print(table([{**r, "update_peak_above_rss_GiB": r["update_peak_above_rss"] / gib} for r in memory["rows"]],
                    columns=["variant", "micro_batch_size", "update_peak_above_rss_GiB"],
                    title="\nupdate peak RSS above the loaded learner"))
        summary.update(memory["summary"])
    print_targets(targets)
    report = {"bench": "learner_update", "quick": args.quick, "machine": machine_info(),
              "load_average_start": load_start, "load_average_end": load_average(),
              "total_wall_seconds": time.time() - t0,
              "config": {"model": "configs/demo.yaml policy (SmolLM2-135M-Instruct float32, LoRA r=16 q,v,o,down)",
                         "batch": f"2 prompts x {len(lengths)} completions of {list(lengths)} tokens",
                         "micro_batch_size": {"old": 4, "new": args.new_micro or 4},
                         "torch_threads": result["torch_threads"],
                         "old": "bench.learner_update.ReferenceLearner (the update of commit 3d3564c)",
                         "new": "learner.learner.Learner (working tree), pi_ref in the update",
                         "ahead": "learner.learner.Learner, pi_ref by prepare_reference before the update"},
              "summary": summary, "targets": targets, "rows": result["rows"], "memory": memory}
    write_json(args.json, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
