"""The LoRA learner: the reference's advantage-weighted update with an exact KL penalty.

The KL reference pi_ref is the same model with its adapter disabled, so the learner holds one copy
of the base weights (the reference script held two). The learner is a plain class; the driver runs
it as a Ray actor named ``learner``.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from brainloop import algo
from brainloop.models import resolve_model


@dataclass
class TrainSample:
    """One completion to learn from (token ids as the sampler produced them)."""

    prompt_ids: list[int]
    completion_ids: list[int]  # up to and including EOS when the completion stopped; never padding
    sampler_logprobs: list[float]
    advantage: float
    adapter_version: int


@dataclass
class TrainGroup:
    """The N completions of one prompt; advantages were normalised within it."""

    samples: list[TrainSample]


def _dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


class Learner:
    def __init__(self, policy: dict, learner: dict, total_steps: int, seed: int, algo_cfg: dict) -> None:
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        if learner.get("cpu_threads"):
            torch.set_num_threads(int(learner["cpu_threads"]))
        torch.manual_seed(seed)
        self.cfg = learner
        self.algo_cfg = algo_cfg
        self.total_steps = total_steps
        self.device = "cuda" if torch.cuda.is_available() and learner.get("num_gpus", 0) > 0 else "cpu"
        base = AutoModelForCausalLM.from_pretrained(resolve_model(policy["model"]), dtype=_dtype(policy["dtype"]))
        lora = policy["lora"]
        self.model = get_peft_model(
            base,
            LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                       target_modules=list(lora["target_modules"]), task_type="CAUSAL_LM"),
        ).to(self.device)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=learner["lr"], weight_decay=learner["weight_decay"])
        self.version = 0  # number of updates applied; version 0 is the base model (LoRA B = 0)

    # ---- the update -------------------------------------------------------------------------
    def _forward(self, samples: list[TrainSample]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Right-padded batch -> (logits, ref_logits, targets, completion mask), shifted by one.

        Only positions from the first completion token on reach the vocabulary projection
        (``logits_to_keep``): prompt positions predict nothing we learn from, and the
        vocabulary-sized logits are the largest tensors of the update. Column j of every
        returned tensor is sequence position ``first + j``, ``first = shortest prompt - 1``."""
        seqs = [s.prompt_ids + s.completion_ids for s in samples]
        length = max(map(len, seqs))
        first = min(len(s.prompt_ids) for s in samples) - 1
        ids = torch.zeros(len(seqs), length, dtype=torch.long)
        attention = torch.zeros(len(seqs), length, dtype=torch.long)
        mask = torch.zeros(len(seqs), length - 1 - first)
        for i, (s, seq) in enumerate(zip(samples, seqs, strict=True)):
            ids[i, : len(seq)] = torch.tensor(seq)
            attention[i, : len(seq)] = 1
            # position t predicts token t+1: completion tokens are predicted from P-1 .. P+C-2
            mask[i, len(s.prompt_ids) - 1 - first : len(seq) - 1 - first] = 1.0
        ids, attention, mask = ids.to(self.device), attention.to(self.device), mask.to(self.device)
        keep = torch.arange(first, length - 1, device=self.device)
        ref_logits = self._reference_logits(ids, attention, keep)
        logits = self.model(input_ids=ids, attention_mask=attention, logits_to_keep=keep).logits
        return logits, ref_logits, ids[:, first + 1 :], mask

    @torch.no_grad()
    def _reference_logits(self, ids: torch.Tensor, attention: torch.Tensor, keep: torch.Tensor | int) -> torch.Tensor:
        """pi_ref: the same model with its adapter disabled (no second copy of the weights)."""
        with self.model.disable_adapter():
            return self.model(input_ids=ids, attention_mask=attention, logits_to_keep=keep).logits

    def _sampler_logprobs(self, samples: list[TrainSample], mask: torch.Tensor) -> torch.Tensor:
        """The sampler's per-token log-probs laid out like ``mask`` (column = first masked one per row)."""
        out = torch.zeros_like(mask)
        starts = mask.argmax(dim=1).tolist()  # the first completion column of each row
        for i, s in enumerate(samples):
            out[i, starts[i] : starts[i] + len(s.sampler_logprobs)] = torch.tensor(s.sampler_logprobs)
        return out

    def update(self, groups: list[TrainGroup]) -> dict[str, float]:
        """One optimizer step over every valid sample of the step's groups."""
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
        # Micro-batches of up to `micro` sequences, across groups: each sequence's loss term is
        # divided by its own group's size, so any batching gives the same gradient.
        flat = [(sample, len(group.samples)) for group in groups for sample in group.samples]
        for start in range(0, len(flat), micro):
            chunk = [sample for sample, _ in flat[start : start + micro]]
            sizes = torch.tensor([size for _, size in flat[start : start + micro]], device=self.device,
                                 dtype=torch.float32)
            logits, ref_logits, targets, mask = self._forward(chunk)
            on_policy = torch.tensor([s.adapter_version == self.version for s in chunk], device=self.device)
            learner_logp = algo.token_log_probs(logits, targets)
            weights = algo.truncated_importance_weights(
                learner_logp, self._sampler_logprobs(chunk, mask), on_policy, self.algo_cfg["importance_cap"]
            )
            adv = torch.tensor([s.advantage for s in chunk], device=self.device, dtype=torch.float32)
            loss, st = algo.policy_loss(logits, ref_logits, targets, mask, adv, self.cfg["kl_coef"],
                                        group_size=sizes, is_weights=weights)
            # Groups are averaged, so a step's loss does not grow with the number of prompts.
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
            "is_weights": stats["is_weight"],  # per sample, in the order of groups and their samples
            "grad_norm": float(grad_norm),
            "lr": lr,
            "num_samples": len(stats["ce"]),
            "version": self.version,
            "update_s": time.perf_counter() - t0,
        }

    # ---- adapter export and probes ------------------------------------------------------------
    def export_adapter(self) -> dict[str, bytes]:
        """The current adapter as PEFT files (adapter_config.json, adapter_model.safetensors)."""
        with tempfile.TemporaryDirectory() as tmp:
            self.model.save_pretrained(tmp, safe_serialization=True)
            return {name: Path(tmp, name).read_bytes() for name in os.listdir(tmp) if name.startswith("adapter_")}

    def save_adapter(self, path: str) -> None:
        self.model.save_pretrained(path, safe_serialization=True)

    @torch.no_grad()
    def completion_logprobs(self, prompt_ids: list[int], completion_ids: list[int],
                            adapter: bool = True) -> list[float]:
        """Per-token log-probs of a completion at temperature 1 (eval mode: no dropout)."""
        self.model.eval()
        ids = torch.tensor([prompt_ids + completion_ids], device=self.device)
        keep = len(completion_ids) + 1  # positions P-1 .. P+C-1; the last predicts nothing we score
        attention = torch.ones_like(ids)
        if adapter:
            logits = self.model(input_ids=ids, attention_mask=attention, logits_to_keep=keep).logits
        else:
            logits = self._reference_logits(ids, attention, keep)
        logp = algo.token_log_probs(logits[:, :-1], ids[:, len(prompt_ids) :])
        return logp[0].tolist()

    # ---- checkpoints -------------------------------------------------------------------------
    def state(self) -> bytes:
        """Everything needed to continue exactly: adapter, optimizer, version, RNG."""
        from peft import get_peft_model_state_dict

        buffer = io.BytesIO()
        torch.save({
            "adapter": {k: v.detach().cpu() for k, v in get_peft_model_state_dict(self.model).items()},
            "optimizer": self.optimizer.state_dict(),
            "version": self.version,
            "torch_rng": torch.get_rng_state(),
        }, buffer)
        return buffer.getvalue()

    def load_state(self, blob: bytes) -> int:
        from peft import set_peft_model_state_dict

        state = torch.load(io.BytesIO(blob), map_location=self.device, weights_only=True)
        result = set_peft_model_state_dict(self.model, state["adapter"])
        if getattr(result, "unexpected_keys", None):
            raise RuntimeError(f"checkpoint adapter has unexpected keys: {result.unexpected_keys[:5]}")
        self.optimizer.load_state_dict(state["optimizer"])
        self.version = int(state["version"])
        torch.set_rng_state(state["torch_rng"].cpu())
        return self.version

    def info(self) -> dict:
        trainable = sum(p.numel() for p in self.params)
        return {"version": self.version, "trainable_params": trainable, "device": self.device,
                "lora": json.loads(json.dumps(self.model.peft_config["default"].to_dict(), default=str))}
