"""The adapter probe: a sampler that did not load the adapter is caught.

Real engines in-process: the PEFT learner takes one update, exports its adapter; a vLLM sampler
that loads it passes the probe, and one that "loads" it but serves the base weights under the new
name (the silent failure peer trackers report most) fails it loudly.
"""

from __future__ import annotations

import io
import json

import pytest
import torch
from safetensors.torch import load, save

from brainloop.config import Config
from brainloop.driver import AdapterProbeError, check_probe


def test_check_probe_hand_cases():
    base = [-1.0, -2.0, -3.0]
    adapter = [-0.5, -2.5, -3.0]
    ok = check_probe(1, [-0.501, -2.499, -3.0], adapter, base, tolerance=0.05, min_effect=1e-4)
    assert ok.sampler_vs_learner == pytest.approx(0.001) and ok.adapter_vs_base == pytest.approx(0.5)
    with pytest.raises(AdapterProbeError, match="not serving this adapter"):
        check_probe(1, base, adapter, base, tolerance=0.05, min_effect=1e-4)
    # Tiny adapter (below the tolerance): a base-serving sampler is caught by the closeness rule,
    # once the adapter's effect exceeds twice the engines' noise on the base model.
    tiny = [-1.01, -2.0, -3.0]
    with pytest.raises(AdapterProbeError, match="matches the base model"):
        check_probe(2, base, tiny, base, tolerance=0.05, min_effect=1e-4, noise_floor=1e-4)
    check_probe(2, base, tiny, base, tolerance=0.05, min_effect=1e-4, noise_floor=0.01)  # not yet distinguishable
    # Version 0 is the base model: equal log-probs are correct.
    check_probe(0, base, base, base, tolerance=0.05, min_effect=1e-4)


def zeroed(adapter_files: dict[str, bytes]) -> dict[str, bytes]:
    """The same adapter files with every LoRA weight zero: the base model under the adapter's name."""
    tensors = load(adapter_files["adapter_model.safetensors"])
    return {**adapter_files, "adapter_model.safetensors": save({k: torch.zeros_like(v) for k, v in tensors.items()})}


@pytest.mark.slow
def test_probe_catches_sampler_serving_the_base_model():
    from actors.sampler import Sampler
    from brainloop.types import TrainGroup, TrainSample
    from learner.learner import Learner

    cfg = Config()
    sampler = Sampler(cfg.policy.model, engine="vllm", max_lora_rank=16, max_loaded_adapters=2, max_model_len=256,
                      seed=0, cpu_threads=2)
    learner = Learner(cfg.policy.model_dump(), {**cfg.learner.model_dump(), "lr": 5e-3, "warmup_steps": 0}, 10, 0,
                      cfg.algo.model_dump())
    prompt = "Describe the sound of rain."
    groups = sampler.generate([prompt], n=4, max_new_tokens=12, temperature=1.0, seed=3)
    samples = [TrainSample(c.prompt_token_ids, c.token_ids, c.logprobs, adv, c.adapter_version)
               for c, adv in zip(groups[0], (1.5, -0.5, 0.5, -1.5), strict=True)]
    learner.update([TrainGroup(samples)])
    adapter = learner.export_adapter()
    assert json.loads(adapter["adapter_config.json"])["r"] == 16

    probe_prompt_ids = sampler.format_prompt(cfg.probe.prompt)
    completion_ids = groups[0][0].token_ids
    learner_lp = learner.completion_logprobs(probe_prompt_ids, completion_ids, True)
    base_lp = learner.completion_logprobs(probe_prompt_ids, completion_ids, False)
    noise = check_probe(0, sampler.score(cfg.probe.prompt, completion_ids, 0), base_lp, base_lp, cfg.probe.tolerance,
                        cfg.probe.min_adapter_effect).sampler_vs_learner

    sampler.load_adapter(1, adapter)
    good = check_probe(1, sampler.score(cfg.probe.prompt, completion_ids, 1), learner_lp, base_lp,
                       cfg.probe.tolerance, cfg.probe.min_adapter_effect, noise)
    assert good.sampler_vs_learner < cfg.probe.tolerance < good.adapter_vs_base

    sampler.load_adapter(2, zeroed(adapter))  # "loaded", but serving the base weights
    with pytest.raises(AdapterProbeError):
        check_probe(1, sampler.score(cfg.probe.prompt, completion_ids, 2), learner_lp, base_lp,
                    cfg.probe.tolerance, cfg.probe.min_adapter_effect, noise)
    sampler.close()


def test_zeroed_adapter_helper_really_zeroes():
    files = {"adapter_model.safetensors": save({"a.lora_B.weight": torch.ones(2, 2)}), "adapter_config.json": b"{}"}
    out = load(zeroed(files)["adapter_model.safetensors"])
    assert torch.count_nonzero(out["a.lora_B.weight"]) == 0
    assert io.BytesIO(files["adapter_config.json"]).read() == b"{}"
