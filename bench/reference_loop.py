"""The reference's sequential design, in one process, with brainloop's models and pipeline.

The reference experiment was a single script: sample N completions with ``transformers``
``generate``, speak and score each text in turn, then take one optimizer step — every stage waiting
for the one before, each with the whole machine to itself. This module rebuilds that design from
brainloop's own parts so that ``bench/loop_speed.py`` can compare *designs*, not implementations:

- sampling: ``generate`` on the learner's own PEFT model (the policy, adapter enabled), one call per
  prompt with ``num_return_sequences = N``, ``do_sample``, ``top_k = 0``, ``top_p = 1`` (as
  ``actors.engines.TransformersEngine`` does, minus the adapter hand-over: there is one model);
- reward: ``reward_workers.pipeline.build_pipeline`` with the run's ``reward.pipeline`` config, each
  text scored in turn. Its ``torch_threads`` is raised to the machine's usable cores, because in a
  sequential design nothing else runs while a text is scored (the Loop's workers use one thread
  each, because two of them share the cores);
- update: ``learner.learner.Learner`` (the plain class, in-process) on the group-normalised
  advantages, exactly the update the Loop's learner actor runs, from rewards turned into advantages
  and samples by the Loop's own rule (``brainloop.algo.build_groups``).

    python -m bench.reference_loop [--config configs/demo.yaml] [--steps 3] [--set section.key=value ...]

prints the seconds of each step and of its stages.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/reference_loop.py` as well as `-m bench.reference_loop`
    sys.path.insert(0, str(ROOT))

from brainloop import algo  # noqa: E402  (path set above)
from brainloop.analysis import nll_per_token  # noqa: E402
from brainloop.config import Config  # noqa: E402
from brainloop.types import Completion, SampleOutcome, ScoreResult  # noqa: E402


def usable_cores() -> int:
    """CPU cores this process may run on (the whole machine in a sequential design)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@dataclass
class ReferenceStep:
    """Wall-clock seconds of one reference step and of its three stages."""

    step: int
    step_seconds: float
    sample_seconds: float
    reward_seconds: float
    update_seconds: float
    num_samples: int
    num_scored: int
    mean_tokens: float
    reward_mean: float


class ReferenceLoop:
    """Sample -> score each text in turn -> one update, in this process, nothing overlapped.

    Models are loaded once, in ``__init__`` (not timed: the Loop's actor start-up is not timed
    either). ``step(k)`` runs step ``k`` with the same prompts, temperature and seed rule as
    ``brainloop.driver.Loop``.
    """

    def __init__(self, cfg: Config, threads: int | None = None) -> None:
        import torch
        from transformers import AutoTokenizer

        from actors.engines import eos_token_ids
        from brainloop.models import resolve_model
        from brainloop.prompts import load_prompts, split
        from learner.learner import Learner
        from reward_workers.pipeline import build_pipeline

        self.cfg = cfg
        self.threads = threads or usable_cores()
        self.train_prompts = split(load_prompts(cfg.prompts.file), "train")
        model_path = resolve_model(cfg.policy.model)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.eos_token_ids = eos_token_ids(self.tokenizer, model_path)
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad) if pad is not None else min(self.eos_token_ids)
        pipeline = cfg.reward.pipeline.model_dump()
        pipeline["torch_threads"] = self.threads
        # build_pipeline sets torch's (process-wide) thread count; the learner sets it again below.
        self.pipeline = build_pipeline(pipeline, cfg.reward.spec.model_dump(mode="json"), use_cache=cfg.reward.cache)
        learner_cfg = cfg.learner.model_dump()
        learner_cfg["cpu_threads"] = self.threads
        self.learner = Learner(cfg.policy.model_dump(), learner_cfg, cfg.run.steps, cfg.run.seed,
                               cfg.algo.model_dump())
        torch.set_num_threads(self.threads)

    # ---- stages -------------------------------------------------------------------------------
    def format_prompt(self, text: str) -> list[int]:
        """The chat-formatted prompt, as ``actors.sampler.Sampler.format_prompt`` builds it."""
        chat = self.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                  tokenize=False)
        return list(self.tokenizer(chat, add_special_tokens=False)["input_ids"])

    def sample(self, prompts: list[str], temperature: float, seed: int) -> list[list[Completion]]:
        """N completions per prompt from the current policy (transformers ``generate``)."""
        import torch
        from transformers import GenerationConfig

        from actors.sampler import cut_at_eos

        cfg = self.cfg.sampler
        gen = GenerationConfig(
            do_sample=True, temperature=temperature, top_k=0, top_p=1.0, max_new_tokens=cfg.max_new_tokens,
            num_return_sequences=cfg.num_completions, eos_token_id=sorted(self.eos_token_ids), pad_token_id=self.pad_id,
            return_dict_in_generate=True, output_logits=True,  # raw logits: temperature-1 log-probs
        )
        model = self.learner.model
        model.eval()
        groups = []
        with torch.inference_mode():
            for i, text in enumerate(prompts):
                ids = self.format_prompt(text)
                input_ids = torch.tensor([ids], device=self.learner.device)
                torch.manual_seed((seed + i) % (1 << 32))
                out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                     generation_config=gen)
                new = out.sequences[:, len(ids):]
                logp = torch.log_softmax(torch.stack(out.logits, dim=1).float(), dim=-1)
                chosen = logp.gather(-1, new.unsqueeze(-1)).squeeze(-1)
                group = []
                for k in range(new.shape[0]):
                    tokens, lps, finish = cut_at_eos(new[k].tolist(), chosen[k].tolist(), self.eos_token_ids,
                                                     cfg.max_new_tokens)
                    text_ids = [t for t in tokens if t not in self.eos_token_ids]
                    group.append(Completion(i, k, self.tokenizer.decode(text_ids, skip_special_tokens=True), tokens,
                                            lps, finish, self.learner.version, prompt_token_ids=ids))
                groups.append(group)
        return groups

    def score(self, groups: list[list[Completion]]) -> list[list[ScoreResult]]:
        """Each text through the TRIBE pipeline, one after another."""
        return [[self.pipeline.score(c.text) for c in group] for group in groups]

    def base_nll(self, groups: list[list[Completion]]) -> list[list[float]] | None:
        """The base model's NLL per token of each completion (adapter disabled), for the naturalness
        penalty; None when ``reward.naturalness_coef`` is 0 (the Loop's sampler measures it only then)."""
        if self.cfg.reward.naturalness_coef <= 0:
            return None
        return [[nll_per_token(self.learner.completion_logprobs(c.prompt_token_ids, c.token_ids, False))
                 for c in group] for group in groups]

    def update(self, groups: list[list[Completion]], results: list[list[ScoreResult]]
               ) -> tuple[dict[str, Any], list[list[SampleOutcome]]]:
        """Rewards -> group advantages -> one ``Learner.update`` (all samples on-policy), by the Loop's rule
        (``algo.build_groups``)."""
        reward = self.cfg.reward
        train, outcomes = algo.build_groups(groups, results, reward.unspeakable_reward, reward.naturalness_coef,
                                            self.base_nll(groups))
        return (self.learner.update(train) if train else {"skipped": True}), outcomes

    # ---- one step -----------------------------------------------------------------------------
    def step(self, step: int) -> ReferenceStep:
        import numpy as np

        from brainloop.prompts import prompts_for_step

        cfg = self.cfg
        prompts = prompts_for_step(self.train_prompts, step, cfg.prompts.prompts_per_step, cfg.run.seed)
        temperature = algo.linear_schedule(step, cfg.run.steps, cfg.sampler.temperature_start,
                                           cfg.sampler.temperature_end)
        t0 = time.perf_counter()
        groups = self.sample([p.text for p in prompts], temperature, cfg.run.seed * 1_000_003 + step)
        t1 = time.perf_counter()
        results = self.score(groups)
        t2 = time.perf_counter()
        _, outcomes = self.update(groups, results)
        t3 = time.perf_counter()
        rewards = [o.reward for row in outcomes for o in row if o.reward is not None]
        tokens = [len(c.token_ids) for g in groups for c in g]
        return ReferenceStep(step, t3 - t0, t1 - t0, t2 - t1, t3 - t2, len(tokens), len(rewards),
                             float(np.mean(tokens)), float(np.mean(rewards)) if rewards else np.nan)


def run_reference_steps(cfg: Config, steps: int) -> list[float]:
    """Seconds of each of ``steps`` reference steps (models loaded first, untimed)."""
    loop = ReferenceLoop(cfg)
    return [loop.step(k).step_seconds for k in range(steps)]


def main(argv: list[str] | None = None) -> int:
    from brainloop.config import load_config, parse_override
    from brainloop.config import merge_overrides as merge

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    args = parser.parse_args(argv)
    overrides: dict = {"reward": {"cache": False}}
    for text in args.set:
        overrides = merge(overrides, parse_override(text))
    cfg = load_config(args.config, overrides)
    loop = ReferenceLoop(cfg)
    for k in range(args.steps):
        s = loop.step(k)
        print(f"step {k}: {s.step_seconds:.2f} s (sample {s.sample_seconds:.2f}, reward {s.reward_seconds:.2f}, "
              f"update {s.update_seconds:.2f}); {s.num_scored}/{s.num_samples} scored, "
              f"{s.mean_tokens:.1f} tokens, reward {s.reward_mean:.5f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
