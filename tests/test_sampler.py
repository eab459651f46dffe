"""Tests for the sampler actor (actors/sampler.py, actors/engines.py).

Real engines on SmolLM2-135M-Instruct (offline, ``pkg:smollm2-135m-instruct``), kept small
(n=2, 16 tokens). Two vLLM engines run in-process (module fixtures: adapters merged into the weights,
the default on CPU, and vLLM's LoRA with the grouped ops), one inside a Ray actor.
"""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from actors.sampler import (
    Sampler,
    adapter_name,
    cut_at_eos,
    materialise_adapter,
    preserved_global_rng,
    read_lora_rank,
    sample_seed,
    splitmix64,
    versions_to_evict,
)
from brainloop.types import Completion

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
MODEL = "pkg:smollm2-135m-instruct"
PROMPTS = ["Tell me a story about a lighthouse.", "Hi"]
FIXED_COMPLETION = "Once upon a time, a small robot learned to paint the sea."

# ---------------------------------------------------------------------------- pure helpers


def test_sample_seed_hand_cases() -> None:
    assert splitmix64(0) == 0xE220A8397B1DCDAF  # SplitMix64 reference output for state 0
    assert splitmix64(1) == 0x910A2DEC89025CC1
    assert sample_seed(0, 0, 0, 2) == 0x7B1DCDAF  # low 32 bits of splitmix64(0)
    assert sample_seed(0, 0, 1, 2) == 0x7B1DCDB0
    assert sample_seed(0, 3, 1, 2) == 0x7B1DCDAF + 7
    assert sample_seed(1, 0, 0, 4) == 0x89025CC1
    assert sample_seed(5, 2, 3, 4) == sample_seed(5, 2, 0, 4) + 3  # vLLM child rule: seed + index
    seeds = {sample_seed(s, i, j, 5) for s in range(3) for i in range(4) for j in range(5)}
    assert len(seeds) == 60 and max(seeds) < 2**32  # torch CPU generators use 32 bits only
    # Seeds that differ only above bit 32 must still give different streams.
    assert sample_seed(11, 0, 0, 2) != sample_seed(12, 0, 0, 2)
    with pytest.raises(ValueError):
        sample_seed(0, 0, 2, 2)


def test_cut_at_eos_hand_cases() -> None:
    eos = {2}
    assert cut_at_eos([5, 6, 2, 2, 2], [-1.0, -2.0, -3.0, -4.0, -5.0], eos, 5) == (
        [5, 6, 2],
        [-1.0, -2.0, -3.0],
        "stop",
    )
    assert cut_at_eos([5, 6, 7], [-1.0, -2.0, -3.0], eos, 3) == ([5, 6, 7], [-1.0, -2.0, -3.0], "length")
    assert cut_at_eos([2], [-0.5], eos, 4) == ([2], [-0.5], "stop")
    assert cut_at_eos([5, 6, 7, 8], [-1.0] * 4, eos, 2) == ([5, 6], [-1.0, -1.0], "length")
    with pytest.raises(ValueError):
        cut_at_eos([1, 2], [-1.0], eos, 4)


def test_versions_to_evict() -> None:
    assert versions_to_evict([1, 2, 3], 2) == [1]
    assert versions_to_evict([3, 1, 2, 5], 2) == [1, 2]
    assert versions_to_evict([4], 2) == []
    with pytest.raises(ValueError):
        versions_to_evict([1], 0)
    assert adapter_name(7) == "policy-v7"


def test_preserved_global_rng() -> None:
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    with preserved_global_rng():
        random.seed(9), np.random.seed(9), torch.manual_seed(9)
        random.random(), np.random.rand(), torch.rand(1)
    got = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    assert got == (random.random(), np.random.rand(), torch.rand(1).item())


def test_materialise_adapter_forms(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    config = {"r": 4, "rank_pattern": {"q_proj": 6}, "peft_type": "LORA"}
    weights = {"base_model.model.a.lora_A.weight": torch.ones(4, 3)}
    src = tmp_path / "src"
    src.mkdir()
    (src / "adapter_config.json").write_text(json.dumps(config))
    save_file(weights, str(src / "adapter_model.safetensors"))
    assert read_lora_rank(src) == 6

    from_path = materialise_adapter(str(src), tmp_path / "a")
    from_bytes = materialise_adapter(
        {
            "adapter_config.json": (src / "adapter_config.json").read_bytes(),
            "adapter_model.safetensors": (src / "adapter_model.safetensors").read_bytes(),
        },
        tmp_path / "b",
    )
    from_tensors = materialise_adapter({"adapter_config.json": config, **weights}, tmp_path / "c")
    for out in (from_path, from_bytes, from_tensors):
        assert json.loads((out / "adapter_config.json").read_text()) == config
        loaded = load_file(str(out / "adapter_model.safetensors"))
        key = "base_model.model.a.lora_A.weight"
        assert torch.equal(loaded[key], weights[key])
    with pytest.raises(ValueError):
        materialise_adapter({"adapter_config.json": b"{}", "../x": b""}, tmp_path / "d")
    with pytest.raises(ValueError):
        materialise_adapter({"adapter_config.json": b"{}"}, tmp_path / "e")  # no weights
    with pytest.raises(FileNotFoundError):
        materialise_adapter(str(tmp_path), tmp_path / "f")


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def model_path() -> str:
    from brainloop.models import resolve_model

    return resolve_model(MODEL)


@pytest.fixture(scope="module")
def hf_base(model_path: str):
    """Plain transformers model + tokenizer: the independent reference for log-probs."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(model_path)


@pytest.fixture(scope="module")
def adapters(model_path: str, hf_base, tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """Three random, non-zero LoRA adapters (r=8 on q_proj, v_proj) saved as PEFT directories."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("adapters")
    out: dict[int, Path] = {}
    for version in (1, 2, 3):
        with preserved_global_rng():
            torch.manual_seed(100 + version)
            model = AutoModelForCausalLM.from_config(hf_base[0].config)  # weights don't matter for LoRA
            cfg = LoraConfig(r=8, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
            peft_model = get_peft_model(model, cfg)
        path = root / f"v{version}"
        peft_model.save_pretrained(str(path))
        out[version] = path
    return out


@pytest.fixture(scope="module")
def vllm_sampler(model_path: str):
    """In-process vLLM sampler; records whether construction touched the global RNGs."""
    random.seed(123), np.random.seed(123), torch.manual_seed(123)
    sampler = Sampler(MODEL, engine="vllm", max_model_len=512, max_loaded_adapters=2, seed=7, cpu_threads=1)
    sampler.rng_after_init = (random.random(), np.random.rand(), torch.rand(1).item())  # type: ignore[attr-defined]
    yield sampler
    sampler.close()


@pytest.fixture(scope="module")
def vllm_lora_sampler(model_path: str):
    """In-process vLLM sampler serving adapters with vLLM's LoRA layers (the grouped CPU ops)."""
    sampler = Sampler(MODEL, engine="vllm", max_model_len=512, max_loaded_adapters=2, seed=7, cpu_threads=1,
                      cpu_lora_ops="grouped")
    yield sampler
    sampler.close()


@pytest.fixture(scope="module")
def transformers_sampler(model_path: str):
    sampler = Sampler(MODEL, engine="transformers", max_model_len=512, max_loaded_adapters=2, cpu_threads=1)
    yield sampler
    sampler.close()


@pytest.fixture(params=["vllm", "vllm_lora", "transformers"])
def sampler(request: pytest.FixtureRequest) -> Sampler:
    return request.getfixturevalue(f"{request.param}_sampler")


def _reference_logprobs(model, prompt_ids: list[int], completion_ids: list[int]) -> np.ndarray:
    full = torch.tensor([prompt_ids + completion_ids])
    with torch.inference_mode():
        logits = model(input_ids=full).logits[0, len(prompt_ids) - 1 : -1].float()
    logp = torch.log_softmax(logits, dim=-1)
    return logp.gather(-1, torch.tensor(completion_ids).unsqueeze(-1)).squeeze(-1).numpy()


def _check_completions(
    result: list[list[Completion]], sampler: Sampler, n: int, max_new: int, version: int
) -> None:
    assert len(result) == len(PROMPTS)
    for i, row in enumerate(result):
        assert [c.sample_index for c in row] == list(range(n))
        for c in row:
            assert isinstance(c, Completion) and c.prompt_index == i and c.adapter_version == version
            assert 1 <= len(c.token_ids) <= max_new and len(c.logprobs) == len(c.token_ids)
            assert all(lp <= 1e-6 and np.isfinite(lp) for lp in c.logprobs)
            eos_positions = [k for k, t in enumerate(c.token_ids) if t in sampler.eos_ids]
            if c.finish_reason == "stop":
                assert eos_positions == [len(c.token_ids) - 1]  # cut right after the first EOS
            else:
                assert c.finish_reason == "length" and not eos_positions and len(c.token_ids) == max_new
            assert "<|im_end|>" not in c.text
            body = [t for t in c.token_ids if t not in sampler.eos_ids]
            assert c.text == sampler.tokenizer.decode(body, skip_special_tokens=True)


# ---------------------------------------------------------------------------- engine tests


def test_vllm_construction_keeps_caller_rng(vllm_sampler: Sampler) -> None:
    random.seed(123), np.random.seed(123), torch.manual_seed(123)
    assert vllm_sampler.rng_after_init == (random.random(), np.random.rand(), torch.rand(1).item())


def test_format_prompt_uses_chat_template(sampler: Sampler) -> None:
    ids = sampler.format_prompt("Hi")
    text = sampler.tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system") and text.endswith("<|im_start|>assistant\n")
    assert "<|im_start|>user\nHi<|im_end|>" in text


def test_generate_interface_and_logprobs(sampler: Sampler, hf_base) -> None:
    state = torch.get_rng_state()
    result = sampler.generate(PROMPTS, n=2, max_new_tokens=16, temperature=1.0, seed=3)
    assert torch.equal(state, torch.get_rng_state())  # sampling does not consume the caller's RNG
    _check_completions(result, sampler, n=2, max_new=16, version=0)
    # Sampler log-probs are the temperature-1 model log-probs of the sampled tokens.
    for row in result:
        for c in row:
            ref = _reference_logprobs(hf_base[0], sampler.format_prompt(PROMPTS[c.prompt_index]), c.token_ids)
            assert np.max(np.abs(ref - np.array(c.logprobs))) < 1e-3


def test_raw_logprobs_ignore_temperature(sampler: Sampler, hf_base) -> None:
    """At temperature 0.5 the recorded log-probs are still those of the temperature-1 model."""
    c = sampler.generate(PROMPTS[:1], n=1, max_new_tokens=8, temperature=0.5, seed=4)[0][0]
    ref = _reference_logprobs(hf_base[0], sampler.format_prompt(PROMPTS[0]), c.token_ids)
    assert np.max(np.abs(ref - np.array(c.logprobs))) < 1e-3


def test_determinism(sampler: Sampler) -> None:
    def ids(seed: int) -> list[list[list[int]]]:
        out = sampler.generate(PROMPTS, n=2, max_new_tokens=16, temperature=1.0, seed=seed)
        return [[c.token_ids for c in row] for row in out]

    first = ids(11)
    assert ids(11) == first
    assert ids(12) != first
    assert first[0][0] != first[0][1]  # the n samples of one prompt are not copies


def test_eos_cut_and_finish_reason(sampler: Sampler) -> None:
    """Greedy "Hi" ends with EOS well inside 48 tokens; 3 tokens truncates it."""
    stop = sampler.generate(["Hi"], n=2, max_new_tokens=48, temperature=0.0, seed=0)[0]
    assert all(c.finish_reason == "stop" and c.token_ids[-1] in sampler.eos_ids for c in stop)
    assert stop[0].token_ids == stop[1].token_ids and stop[0].text.strip()
    short = sampler.generate(["Hi"], n=1, max_new_tokens=3, temperature=0.0, seed=0)[0][0]
    assert short.finish_reason == "length" and short.token_ids == stop[0].token_ids[:3]


def test_greedy_agrees_across_engines(vllm_sampler: Sampler, transformers_sampler: Sampler) -> None:
    a = vllm_sampler.generate(PROMPTS, n=1, max_new_tokens=16, temperature=0.0, seed=0, version=0)
    b = transformers_sampler.generate(PROMPTS, n=1, max_new_tokens=16, temperature=0.0, seed=0, version=0)
    assert [r[0].token_ids for r in a] == [r[0].token_ids for r in b]
    for ra, rb in zip(a, b, strict=True):
        assert np.max(np.abs(np.array(ra[0].logprobs) - np.array(rb[0].logprobs))) < 1e-3


def test_adapters_scores_versions_eviction(sampler: Sampler, hf_base, adapters: dict[int, Path]) -> None:
    """LoRA log-probs match transformers+peft, differ from base; new name per version; eviction."""
    from peft import PeftModel

    model, tokenizer = hf_base
    prompt = PROMPTS[0]
    prompt_ids = sampler.format_prompt(prompt)
    completion = tokenizer(FIXED_COMPLETION, add_special_tokens=False)["input_ids"] + [min(sampler.eos_ids)]
    base_ref = _reference_logprobs(model, prompt_ids, completion)

    assert sampler.current_version() == 0
    base_score = np.array(sampler.score(prompt, completion, None))
    assert np.max(np.abs(base_score - base_ref)) < 1e-3

    # v1 from a directory path, v2 as file bytes, v3 as a tensor state dict (object-store forms).
    sampler.load_adapter(1, str(adapters[1]))
    assert sampler.current_version() == 1
    peft_ref = PeftModel.from_pretrained(model, str(adapters[1]), adapter_name="ref").eval()
    try:
        lora_ref = _reference_logprobs(peft_ref, prompt_ids, completion)
    finally:
        peft_ref.unload()  # put the shared base model back as it was
    lora_score = np.array(sampler.score(prompt, completion, 1))
    diff = float(np.max(np.abs(lora_score - lora_ref)))
    print(
        f"\n[{sampler.engine_name}] max |score(v1) - transformers+peft| = {diff:.2e}; "
        f"max |v1 - base| = {np.max(np.abs(lora_ref - base_ref)):.3f}"
    )
    assert diff < 1e-3
    assert np.max(np.abs(lora_ref - base_ref)) > 0.05  # the adapter really changes the model
    assert np.max(np.abs(np.array(sampler.score(prompt, completion, 0)) - base_ref)) < 1e-3

    # Generation uses the newest adapter and records it; its log-probs are the adapter's.
    out = sampler.generate(PROMPTS, n=2, max_new_tokens=16, temperature=1.0, seed=5)
    _check_completions(out, sampler, n=2, max_new=16, version=1)
    c = out[0][0]
    assert np.max(np.abs(np.array(sampler.score(prompt, c.token_ids, 1)) - np.array(c.logprobs))) < 1e-3
    base_out = sampler.generate(PROMPTS, n=2, max_new_tokens=16, temperature=1.0, seed=5, version=0)
    assert all(c.adapter_version == 0 for row in base_out for c in row)

    from safetensors.torch import load_file

    sampler.load_adapter(2, {f.name: f.read_bytes() for f in adapters[2].iterdir()})
    cfg = json.loads((adapters[3] / "adapter_config.json").read_text())
    tensors = load_file(str(adapters[3] / "adapter_model.safetensors"))
    sampler.load_adapter(3, {"adapter_config.json": cfg, **tensors})
    assert sampler.loaded_versions() == [2, 3] and sampler.current_version() == 3
    assert not (sampler._adapter_root / adapter_name(1)).exists()  # evicted copy deleted
    assert (sampler._adapter_root / adapter_name(3)).is_dir()
    if sampler.engine_name == "vllm":
        assert sampler._engine.loaded_versions() == {2, 3}
    else:
        assert set(sampler._engine.peft.peft_config) == {"policy-v2", "policy-v3"}
    v2, v3 = (np.array(sampler.score(prompt, completion, v)) for v in (2, 3))
    assert np.max(np.abs(v2 - v3)) > 0.05 and np.max(np.abs(v3 - lora_score)) > 0.05
    newest = sampler.generate(PROMPTS[:1], n=1, max_new_tokens=4, temperature=1.0, seed=0)[0][0]
    assert newest.adapter_version == 3

    with pytest.raises(ValueError):
        sampler.load_adapter(3, str(adapters[3]))  # never reload in place
    with pytest.raises(ValueError):
        sampler.load_adapter(2, str(adapters[2]))  # nor go back
    with pytest.raises(KeyError):
        sampler.score(prompt, completion, 1)  # evicted
    assert sampler.loaded_versions() == [2, 3]


def test_vllm_grouped_lora_ops_sample_as_vllms_own(vllm_lora_sampler: Sampler, adapters: dict[int, Path]) -> None:
    """Same seed, same adapter: vLLM-CPU's own LoRA ops and the grouped ones give the same samples."""
    from actors import vllm_cpu_lora

    if vllm_lora_sampler.current_version() == 0:  # run alone; in file order v2, v3 are loaded by now
        vllm_lora_sampler.load_adapter(1, str(adapters[1]))
    outs = {}
    try:
        for ops in ("vllm", "grouped"):
            vllm_cpu_lora.use(ops)
            outs[ops] = vllm_lora_sampler.generate(PROMPTS, n=2, max_new_tokens=16, temperature=1.0, seed=21)
    finally:
        vllm_cpu_lora.use("grouped")
    pairs = [(a, b) for ra, rb in zip(outs["vllm"], outs["grouped"], strict=True) for a, b in zip(ra, rb, strict=True)]
    assert all(a.token_ids == b.token_ids for a, b in pairs)
    assert max(abs(x - y) for a, b in pairs for x, y in zip(a.logprobs, b.logprobs, strict=True)) < 1e-4


def _same_samples(a: list[list[Completion]], b: list[list[Completion]], tol: float) -> None:
    pairs = [(x, y) for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb, strict=True)]
    assert all(x.token_ids == y.token_ids for x, y in pairs)
    assert max(abs(p - q) for x, y in pairs for p, q in zip(x.logprobs, y.logprobs, strict=True)) <= tol


def test_merged_adapters_sample_as_vllms_lora(vllm_sampler: Sampler, vllm_lora_sampler: Sampler,
                                              adapters: dict[int, Path]) -> None:
    """An adapter merged into the weights samples as vLLM's LoRA serves it (same seed: same tokens,
    log-probs within 1e-4), and switching versions puts the right weights back each time: the base
    model after an adapter (a stale prefix cache or weight would show here), the adapter again after
    the base model, bit for bit."""
    assert vllm_sampler._engine.merged and not vllm_lora_sampler._engine.merged
    for sampler in (vllm_sampler, vllm_lora_sampler):
        sampler.load_adapter(sampler.current_version() + 1, str(adapters[1]))  # newer whatever ran before

    def both(version_of: dict) -> list:
        return [s.generate(PROMPTS, n=2, max_new_tokens=16, temperature=1.0, seed=33, version=version_of[id(s)])
                for s in (vllm_sampler, vllm_lora_sampler)]

    newest = {id(s): s.current_version() for s in (vllm_sampler, vllm_lora_sampler)}
    merged, lora = both(newest)
    _same_samples(merged, lora, 1e-4)
    base_merged, base_lora = both({key: 0 for key in newest})
    _same_samples(base_merged, base_lora, 1e-4)
    assert any(x.token_ids != y.token_ids for rx, ry in zip(merged, base_merged, strict=True)
               for x, y in zip(rx, ry, strict=True))
    again, _ = both(newest)
    _same_samples(again, merged, 0.0)
    completion = merged[0][0].token_ids
    score = vllm_sampler.score(PROMPTS[0], completion, vllm_sampler.current_version())
    assert max(abs(p - q) for p, q in zip(score, merged[0][0].logprobs, strict=True)) < 1e-4


def test_merged_adapter_refused_with_a_clear_error(vllm_sampler: Sampler, tmp_path: Path, hf_base) -> None:
    """An adapter on a module that is not a plain linear layer of the engine is refused at load
    time; the versions loaded before keep serving."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    with preserved_global_rng():
        model = AutoModelForCausalLM.from_config(hf_base[0].config)
        peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=4, target_modules=["lm_head"]))
    peft_model.save_pretrained(str(tmp_path / "head"))
    before = vllm_sampler.loaded_versions()
    with pytest.raises(ValueError, match="lm_head"):
        vllm_sampler.load_adapter(vllm_sampler.current_version() + 1, str(tmp_path / "head"))
    assert vllm_sampler.loaded_versions() == before


def test_generate_threads_for_one_call(sampler: Sampler, monkeypatch) -> None:
    """``cpu_threads`` applies to the engine's work in this call only, after vLLM-CPU has blocked
    ``torch.set_num_threads``; the samples are those of the engine's own thread count."""
    import torch

    from brainloop.threads import set_torch_threads

    set_torch_threads(1)  # the fixtures' cpu_threads=1, whatever ran before in this process
    seen: list[int] = []
    engine_generate = sampler._engine.generate

    def counting(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return engine_generate(*args, **kwargs)

    monkeypatch.setattr(sampler._engine, "generate", counting)
    own = sampler.generate(PROMPTS, n=2, max_new_tokens=16, temperature=1.0, seed=31)
    two = sampler.generate(PROMPTS, n=2, max_new_tokens=16, temperature=1.0, seed=31, cpu_threads=2)
    assert seen == [1, 2] and torch.get_num_threads() == 1
    pairs = [(a, b) for ra, rb in zip(own, two, strict=True) for a, b in zip(ra, rb, strict=True)]
    assert all(a.token_ids == b.token_ids for a, b in pairs)
    assert max(abs(x - y) for a, b in pairs for x, y in zip(a.logprobs, b.logprobs, strict=True)) < 1e-4


# ---------------------------------------------------------------------------- Ray actor


def test_vllm_sampler_in_ray_actor(ray_cluster, adapters: dict[int, Path]) -> None:
    """The driver's pattern: ray.remote(Sampler), adapter bytes through the object store."""
    import ray

    actor = None
    try:
        env = {
            "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
            "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p),
        }
        actor_cls = ray.remote(num_cpus=1, runtime_env={"env_vars": env})(Sampler)
        actor = actor_cls.remote(MODEL, engine="vllm", max_model_len=512, seed=0)
        assert ray.get(actor.current_version.remote(), timeout=300) == 0

        def timed(version: int | None) -> tuple[list[list[Completion]], float]:
            t0 = time.perf_counter()
            out = ray.get(actor.generate.remote(PROMPTS, 2, 32, 1.0, seed=1, version=version), timeout=300)
            n_tok = sum(len(c.token_ids) for row in out for c in row)
            return out, n_tok / (time.perf_counter() - t0)

        base, base_tps = timed(0)
        payload = ray.put({f.name: f.read_bytes() for f in adapters[1].iterdir()})
        ray.get(actor.load_adapter.remote(1, payload), timeout=120)
        lora, lora_tps = timed(None)
        print(
            f"\n[ray actor, vllm-cpu, 2 prompts x n=2 x <=32 tokens] base {base_tps:.1f} tok/s, "
            f"LoRA {lora_tps:.1f} tok/s"
        )
        assert all(c.adapter_version == 0 for row in base for c in row)
        assert all(c.adapter_version == 1 for row in lora for c in row)
        assert ray.get(actor.current_version.remote()) == 1
        assert [[c.token_ids for c in r] for r in base] != [[c.token_ids for c in r] for r in lora]
        info = ray.get(actor.engine_info.remote())
        assert info["engine"] == "vllm" and info["loaded_versions"] == [1]
        ray.get(actor.close.remote())
    finally:
        if actor is not None:
            ray.kill(actor)
