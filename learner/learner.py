"""The LoRA learner: the reference's advantage-weighted update with an exact KL penalty.

The KL reference pi_ref is the same model with its adapter disabled, so the learner holds one copy
of the base weights (the reference script held two). In the update a group's shared prompt runs once
per forward (policy and reference), its samples' completions packed after it in one row, and the
vocabulary is reached only through ``algo.policy_head_loss`` (completion positions, in chunks, one
log_softmax per side): tests/test_learner_update.py checks it against the previous update. pi_ref
never changes, so its pass can run as soon as a step is sampled (``prepare_reference``, while the
reward pool scores the step), leaving the update only the policy's forward and backward. The
learner is a plain class; the driver runs it as a Ray actor named ``learner``.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from brainloop import algo
from brainloop.metrics import RunMetrics
from brainloop.models import resolve_model
from brainloop.threads import set_torch_threads, torch_threads
from brainloop.types import TrainGroup, TrainSample

log = logging.getLogger(__name__)


def torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


class Learner:
    def __init__(self, policy: dict, learner: dict, total_steps: int, seed: int, algo_cfg: dict,
                 metrics: RunMetrics | None = None) -> None:
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        if learner.get("cpu_threads"):
            set_torch_threads(int(learner["cpu_threads"]))  # works beside a vLLM-CPU engine in this process
        torch.manual_seed(seed)
        self.cfg = learner
        self.algo_cfg = algo_cfg
        self.total_steps = total_steps
        self.metrics = metrics
        self.device = "cuda" if torch.cuda.is_available() and learner.get("num_gpus", 0) > 0 else "cpu"
        base = AutoModelForCausalLM.from_pretrained(resolve_model(policy["model"]), dtype=torch_dtype(policy["dtype"]))
        lora = policy["lora"]
        self.model = get_peft_model(
            base,
            LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                       target_modules=list(lora["target_modules"]), task_type="CAUSAL_LM"),
        ).to(self.device)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=learner["lr"], weight_decay=learner["weight_decay"])
        self.version = 0  # number of updates applied; version 0 is the base model (LoRA B = 0)
        # step -> {(prompt ids, completion ids): pi_ref's last hidden states at its completion positions}
        self._prepared: dict[int, dict[tuple[tuple[int, ...], tuple[int, ...]], torch.Tensor]] = {}

    # ---- the update -------------------------------------------------------------------------
    def _decoder_and_head(self) -> tuple[torch.nn.Module, torch.Tensor]:
        """The transformer below the output head, and the head's weight (V, H).

        The update runs the decoder itself and applies the head in chunks (``algo.policy_head_loss``),
        which needs a plain bias-free linear head shared by the policy and pi_ref: LoRA on the head
        or logit scaling would change that, so they are refused here rather than silently ignored."""
        base = self.model.get_base_model()
        head = base.get_output_embeddings()
        if type(head) is not torch.nn.Linear or head.bias is not None:
            raise ValueError(f"the learner needs a plain bias-free linear output head (no LoRA on it), got {head}")
        for key in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
            if getattr(base.config, key, None) not in (None, 1, 1.0):
                raise ValueError(f"the learner's chunked head does not apply {key} (model {base.config.model_type})")
        return base.get_decoder(), head.weight

    @contextmanager
    def _reference(self) -> Iterator[torch.nn.Module]:
        """pi_ref's decoder: the policy's own with its adapter disabled (no second copy of the weights)."""
        with torch.no_grad(), self.model.disable_adapter():
            yield self._decoder_and_head()[0]

    def _pack(self, segments: list[list[TrainSample]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each segment (samples sharing a prompt) as one row: its prompt once, then every completion.

        Returns (ids (R, L), position ids (R, L), attention mask (R, 1, L, L), where (S, C)): a
        completion attends to the prompt and to itself, causally, at the positions it would have after
        the prompt alone, so its hidden states are those of its own sequence while the prompt runs once
        and its keys/values serve the whole group (gradients from every sample reach them).
        ``where[i, j]`` is the flat index (row * L + position) of the hidden state predicting sample i's
        completion token j (the prompt's last position for j = 0). With LoRA dropout > 0 the group's
        samples share one dropout draw on the prompt (before, each sample drew its own)."""
        lengths = [len(seg[0].prompt_ids) + sum(len(s.completion_ids) for s in seg) for seg in segments]
        rows, width = len(segments), max(lengths)
        ids = torch.zeros(rows, width, dtype=torch.long)
        positions = torch.zeros(rows, width, dtype=torch.long)
        part = torch.full((rows, width), -1)  # 0 = prompt, k = completion k, -1 = padding
        where = torch.zeros(sum(map(len, segments)), max(1, *(len(s.completion_ids) for seg in segments for s in seg)),
                            dtype=torch.long)
        i = 0
        for r, seg in enumerate(segments):
            prompt = len(seg[0].prompt_ids)
            ids[r, :prompt] = torch.tensor(seg[0].prompt_ids)
            positions[r, :prompt] = torch.arange(prompt)
            part[r, :prompt] = 0
            start = prompt
            for k, s in enumerate(seg, start=1):
                n = len(s.completion_ids)
                ids[r, start : start + n] = torch.tensor(s.completion_ids)
                positions[r, start : start + n] = torch.arange(prompt, prompt + n)
                part[r, start : start + n] = k
                where[i, 0] = r * width + prompt - 1
                where[i, 1:n] = r * width + torch.arange(start, start + n - 1)
                start, i = start + n, i + 1
        query, key = part.unsqueeze(2), part.unsqueeze(1)
        allowed = torch.ones(width, width, dtype=torch.bool).tril() & (key >= 0) & ((key == 0) | (key == query))
        allowed |= torch.eye(width, dtype=torch.bool)  # padding sees itself: no all-masked row (NaN softmax)
        return ids, positions, allowed.unsqueeze(1), where

    def _hidden(self, decoder: torch.nn.Module, ids: torch.Tensor, positions: torch.Tensor, allowed: torch.Tensor
                ) -> torch.Tensor:
        """The decoder's last hidden states (R * L, H) for packed rows (``_pack``)."""
        impl = decoder.config._attn_implementation
        if impl == "eager":  # eager attention adds the mask to the scores
            mask = torch.zeros(allowed.shape, dtype=self.model.dtype, device=ids.device)
            allowed = mask.masked_fill_(~allowed, torch.finfo(self.model.dtype).min)
        elif impl != "sdpa":
            raise ValueError(f"the learner's packed prompts need sdpa or eager attention, not {impl}")
        out = decoder(input_ids=ids, attention_mask=allowed, position_ids=positions, use_cache=False)
        return out.last_hidden_state.flatten(0, 1)

    def _reference_hidden(self, packed: tuple[torch.Tensor, ...], samples: list[TrainSample]) -> list[torch.Tensor]:
        """pi_ref's last hidden states at each sample's completion positions (len(completion), H), from
        packed rows (``_pack``) of those samples."""
        ids, positions, allowed, where = packed
        with self._reference() as ref_decoder:
            hidden = self._hidden(ref_decoder, ids, positions, allowed)
        return [hidden[where[i, : len(s.completion_ids)]] for i, s in enumerate(samples)]

    def prepare_reference(self, step: int, groups: list[list[tuple[list[int], list[int]]]]) -> dict[str, float]:
        """pi_ref's pass over step ``step``'s completions ((prompt ids, completion ids) per group), run
        when the step is sampled, while its rewards are computed.

        The update of that step takes pi_ref's hidden states from here instead of running the
        adapter-disabled decoder itself, and computes them as before for a sample not found (one whose
        content differs, a restarted learner, a resumed run). Rows are packed as the update packs them
        when every sample is used, so the numbers are the same bit for bit."""
        t0 = time.perf_counter()
        # Only the token ids matter for pi_ref; the rest of a TrainSample is filled in after the rewards.
        train = [TrainGroup([TrainSample(list(p), list(c), [], 0.0, -1) for p, c in group]) for group in groups]
        prepared = self._prepared.setdefault(step, {})
        for segments, _ in self._micro_batches(train, self.cfg["micro_batch_size"]):
            samples = [s for seg in segments for s in seg]
            packed = tuple(t.to(self.device) for t in self._pack(segments))
            for sample, hidden in zip(samples, self._reference_hidden(packed, samples), strict=True):
                prepared[self._key(sample)] = hidden
        seconds = time.perf_counter() - t0
        if self.metrics is not None:
            self.metrics.set({"reference_ahead_seconds": seconds})
        return {"samples": float(len(prepared)), "seconds": seconds}

    @staticmethod
    def _key(sample: TrainSample) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return tuple(sample.prompt_ids), tuple(sample.completion_ids)

    def _micro_loss(self, segments: list[list[TrainSample]], group_sizes: list[int],
                    prepared: dict | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss contribution and per-sample statistics of a micro-batch: segments of samples that share
        a prompt (``group_sizes``: each segment's group size), each prompt run once per forward.
        ``prepared``: pi_ref's hidden states by sample (``prepare_reference``); a micro-batch with any
        sample missing runs pi_ref itself."""
        samples = [s for seg in segments for s in seg]
        if any(s.prompt_ids != seg[0].prompt_ids for seg in segments for s in seg):
            raise ValueError("a segment's samples must share their prompt")
        n, width, dev = len(samples), max(1, *(len(s.completion_ids) for s in samples)), self.device
        real = torch.float64 if self.model.dtype == torch.float64 else torch.float32  # the loss's dtype
        completions = torch.zeros(n, width, dtype=torch.long)
        mask = torch.zeros(n, width, dtype=real)
        sampler_logp = torch.zeros(n, width)
        for i, s in enumerate(samples):
            completions[i, : len(s.completion_ids)] = torch.tensor(s.completion_ids)
            mask[i, : len(s.completion_ids)] = 1.0
            sampler_logp[i, : len(s.sampler_logprobs)] = torch.tensor(s.sampler_logprobs)
        packed = tuple(t.to(dev) for t in self._pack(segments))
        ids, positions, allowed, where = packed
        completions, mask, sampler_logp = completions.to(dev), mask.to(dev), sampler_logp.to(dev)
        keep = mask.bool()  # only completion tokens reach the vocabulary (never padding)
        ahead = [prepared.get(self._key(s)) for s in samples] if prepared else []
        ran_reference = not ahead or any(h is None for h in ahead)
        if ran_reference:
            ahead = self._reference_hidden(packed, samples)
        ref_hidden = torch.cat(ahead)  # (sum of completion lengths, H): the order of where[keep]
        decoder, head = self._decoder_and_head()
        hidden = self._hidden(decoder, ids, positions, allowed)[where[keep]]

        # Advantages are float32 numbers (as the sampler's log-probs), whatever the model's dtype.
        adv = torch.tensor([s.advantage for s in samples], device=dev, dtype=torch.float32).to(real)
        sizes = torch.tensor([g for seg, g in zip(segments, group_sizes, strict=True) for _ in seg], device=dev,
                             dtype=real)
        on_policy = torch.tensor([s.adapter_version == self.version for s in samples], device=dev)
        ce_w, kl_w = algo.loss_weights(mask, adv, sizes, self.cfg["kl_coef"])
        loss, tok, kl, rho, ref_tok = algo.policy_head_loss(
            hidden, ref_hidden, head, completions[keep], ce_w[keep], kl_w[keep], sampler_logp[keep],
            on_policy.unsqueeze(1).expand(n, width)[keep], self.algo_cfg["importance_cap"])
        logp, kl, rho, ref_logp = (v.new_zeros(mask.shape).masked_scatter_(keep, v)
                                   for v in (tok, kl, rho, ref_tok))  # back to (n, C)
        return loss, {"ce": -algo.masked_mean(logp, mask), "kl_per_token": algo.masked_mean(kl, mask),
                      "kl_per_sequence": (kl * mask).sum(-1), "is_weight": algo.masked_mean(rho, mask),
                      "base_nll": -algo.masked_mean(ref_logp, mask),
                      "ran_reference": torch.full((n,), float(ran_reference))}

    @staticmethod
    def _micro_batches(groups: list[TrainGroup], micro: int) -> Iterator[tuple[list[list[TrainSample]], list[int]]]:
        """Up to ``micro`` samples at a time, in order; within one, the samples of each group form one
        segment (their prompt runs once). Yields (segments, each segment's group size)."""
        flat = [(g, s) for g, group in enumerate(groups) for s in group.samples]
        for start in range(0, len(flat), micro):
            segments: list[list[TrainSample]] = []
            sizes: list[int] = []
            last = -1
            for g, sample in flat[start : start + micro]:
                if g != last:
                    segments.append([])
                    sizes.append(len(groups[g].samples))
                    last = g
                segments[-1].append(sample)
            yield segments, sizes

    def update(self, groups: list[TrainGroup], step: int | None = None,
               cpu_threads: int | None = None) -> dict[str, float]:
        """One optimizer step over every valid sample of the step's groups; ``step``: the step whose
        ``prepare_reference`` holds pi_ref's pass (None: run it here). ``cpu_threads``: torch threads
        for this update only (``learner.cpu_threads_alone`` when nothing else runs beside it)."""
        with torch_threads(cpu_threads):
            return self._update(groups, step)

    def _update(self, groups: list[TrainGroup], step: int | None) -> dict[str, float]:
        t0 = time.perf_counter()
        prepared = self._prepared.pop(step, None) if step is not None else None
        for old in [s for s in self._prepared if step is not None and s < step]:
            del self._prepared[old]  # steps that never reached an update (all their samples failed)
        self.model.train()
        lr = algo.lr_at(self.version, self.cfg["lr"], self.cfg["warmup_steps"], self.total_steps,
                        self.cfg["min_lr_ratio"])
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        stats: dict[str, list[float]] = {"kl_per_token": [], "kl_per_sequence": [], "ce": [], "is_weight": [],
                                         "base_nll": [], "ran_reference": []}
        loss_total = 0.0
        n_groups = max(1, len(groups))
        micro = self.cfg["micro_batch_size"]
        # Micro-batches of up to `micro` samples, across groups; each sample's loss term is divided by
        # its own group's size, so any split gives the same gradient.
        for segments, sizes in self._micro_batches(groups, micro):
            loss, st = self._micro_loss(segments, sizes, prepared)
            # Groups are averaged, so a step's loss does not grow with the number of prompts.
            (loss / n_groups).backward()
            loss_total += loss.item() / n_groups
            for key in stats:
                stats[key] += st[key].tolist()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg["grad_clip"])
        self.optimizer.step()
        self.version += 1
        n = max(1, len(stats["ce"]))
        out = {
            "loss": loss_total,
            "kl_per_token": sum(stats["kl_per_token"]) / n,
            "kl_per_sequence": sum(stats["kl_per_sequence"]) / n,
            "ce": sum(stats["ce"]) / n,
            "is_weight_mean": sum(stats["is_weight"]) / n,
            "is_weights": stats["is_weight"],  # per sample, in the order of groups and their samples
            # the base model's NLL per token of each sample (from the KL term's adapter-disabled pass)
            "base_nll": stats["base_nll"],
            "base_nll_per_token": sum(stats["base_nll"]) / n,
            "grad_norm": float(grad_norm),
            "lr": lr,
            "num_samples": len(stats["ce"]),
            # samples whose pi_ref pass ran ahead of the update (prepare_reference), of num_samples
            "reference_ahead_fraction": 1.0 - sum(stats["ran_reference"]) / n if stats["ce"] else 0.0,
            "version": self.version,
            "update_threads": torch.get_num_threads(),
            "update_s": time.perf_counter() - t0,
        }
        if self.metrics is not None:
            self.metrics.set(self.metrics.select(out))
            self.metrics.observe("learner_update_compute_seconds", out["update_s"])
        return out

    @torch.no_grad()
    def _reference_logits(self, ids: torch.Tensor, attention: torch.Tensor, keep: torch.Tensor | int) -> torch.Tensor:
        """pi_ref's logits (the probe's base-model log-probs)."""
        with self.model.disable_adapter():
            return self.model(input_ids=ids, attention_mask=attention, logits_to_keep=keep).logits

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
            # LoRA dropout on a GPU draws from the CUDA generators: one state per visible device.
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
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
        self._restore_cuda_rng(state.get("cuda_rng"))  # absent in checkpoints written before it was saved
        return self.version

    @staticmethod
    def _restore_cuda_rng(states: list[torch.Tensor] | None) -> None:
        """Put back the CUDA generators' states (set_rng_state wants CPU byte tensors)."""
        if not states:
            return
        if not torch.cuda.is_available():
            log.warning("checkpoint has CUDA RNG states but CUDA is not available: not restored")
            return
        if len(states) != torch.cuda.device_count():
            log.warning("checkpoint has CUDA RNG states for %d devices, %d visible: restoring the first %d",
                        len(states), torch.cuda.device_count(), min(len(states), torch.cuda.device_count()))
            states = states[: torch.cuda.device_count()]
        torch.cuda.set_rng_state_all([s.cpu() for s in states])

    def info(self) -> dict:
        trainable = sum(p.numel() for p in self.params)
        return {"version": self.version, "trainable_params": trainable, "device": self.device,
                "lora": json.loads(json.dumps(self.model.peft_config["default"].to_dict(), default=str))}
