"""Sampling engines behind ``actors.sampler.Sampler``: vLLM and a transformers + PEFT fallback.

Both take chat-formatted prompt token ids and return, per prompt, ``n`` pairs of
(sampled token ids, raw temperature-1 log-prob of each). EOS cutting, text decoding and version
bookkeeping live in ``Sampler`` so the engines stay small and interchangeable. Model libraries are
imported inside methods: importing this module is cheap.
"""

from __future__ import annotations

import gc
import json
import os
import random
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from brainloop.threads import set_torch_threads

RawSample = tuple[list[int], list[float]]
DEFAULT_CPU_KV_CACHE_BYTES = 512 * 1024 * 1024  # ~11k tokens of SmolLM2-135M KV in float32



@contextmanager
def preserved_global_rng() -> Iterator[None]:
    """Restore Python, NumPy and torch global RNG states on exit.

    In-process ``vllm.LLM(seed=...)`` calls ``set_random_seed`` on the caller's global RNGs; the
    caller (a test, or a driver co-hosting the sampler) must not see that.
    """
    import numpy as np
    import torch

    py_state = random.getstate()
    np_state = np.random.get_state()
    torch_state = torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.set_rng_state(torch_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)


def eos_token_ids(tokenizer: Any, model_path: str) -> frozenset[int]:
    """EOS ids from the tokenizer and generation_config.json (which may list several)."""
    ids = {int(tokenizer.eos_token_id)} if tokenizer.eos_token_id is not None else set()
    gen_cfg = Path(model_path) / "generation_config.json"
    if gen_cfg.is_file():
        eos = json.loads(gen_cfg.read_text()).get("eos_token_id")
        ids.update([eos] if isinstance(eos, int) else (eos or []))
    if not ids:
        raise ValueError(f"no EOS token id known for {model_path}")
    return frozenset(ids)


class VllmEngine:
    """vLLM ``LLM`` in-process, raw (temperature-1) log-probs, adapters served one of two ways.

    With vLLM's LoRA (``cpu_lora_ops`` "grouped" or "vllm" on CPU; always on a GPU) each version is
    a ``LoRARequest`` and vLLM applies its factors on every adapted projection. With
    ``cpu_lora_ops="merged"`` on CPU the engine is built without LoRA and the version a call uses
    is written into the weights as ``W + scale * B @ A`` (``actors.lora_merge``) when it differs
    from the last call's, after which the prefix cache is cleared (its keys do not know the
    weights changed). Calls run one at a time (the Sampler actor), so one set of weights serves
    each call.
    """

    def __init__(
        self,
        model_path: str,
        *,
        max_lora_rank: int,
        max_loaded_adapters: int,
        max_model_len: int,
        seed: int,
        dtype: str,
        cpu_threads: int | None,
        gpu_memory_utilization: float,
        kv_cache_bytes: int | None,
        enforce_eager: bool | None,
        cpu_lora_ops: str = "merged",
    ) -> None:
        from actors import vllm_cpu_lora

        vllm_cpu_lora.check_ops(cpu_lora_ops)  # on GPU too, where vLLM's LoRA always serves
        # In-process engine core: no extra processes to place or to leak, and on CPU the only mode
        # that works reliably inside a Ray actor. Must be set before vLLM reads its env.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM
        from vllm.platforms import current_platform

        on_cpu = current_platform.is_cpu()
        self.merged = on_cpu and cpu_lora_ops == "merged"
        if self.merged and dtype != "float32":
            raise ValueError(f"sampler.cpu_lora_ops: merged needs policy dtype float32, got {dtype}: in lower "
                             "precision W + BA rounds away small adapter updates (use grouped)")
        if on_cpu:
            if cpu_threads:
                # In-process, vLLM-CPU keeps the torch thread count it finds here (and then blocks
                # torch.set_num_threads, so a second engine in this process must go around it);
                # VLLM_CPU_OMP_THREADS_BIND only applies to its multiprocess executor. Inside a Ray
                # actor OMP_NUM_THREADS = the actor's num_cpus.
                set_torch_threads(cpu_threads)
            if not self.merged:
                vllm_cpu_lora.use(cpu_lora_ops)
            if kv_cache_bytes is None and not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
                kv_cache_bytes = DEFAULT_CPU_KV_CACHE_BYTES
        self._path = model_path
        kwargs: dict[str, Any] = {
            "dtype": dtype,
            "seed": seed,
            "max_model_len": max_model_len,
            "logprobs_mode": "raw_logprobs",
            "gpu_memory_utilization": gpu_memory_utilization,
            # torch.compile on a 2-core CPU costs minutes; eager is the sane CPU default.
            "enforce_eager": on_cpu if enforce_eager is None else enforce_eager,
        }
        if not self.merged:
            kwargs |= {
                "enable_lora": True,
                "max_lora_rank": max_lora_rank,
                "max_loras": max_loaded_adapters,
                # One spare CPU slot: a new version loads before the oldest is evicted.
                "max_cpu_loras": max_loaded_adapters + 1,
            }
        if kv_cache_bytes is not None:
            kwargs["kv_cache_memory_bytes"] = int(kv_cache_bytes)
        with preserved_global_rng():  # LLM(seed=) reseeds the caller's global RNGs in-process
            self.llm = LLM(model_path, **kwargs)
        self.tokenizer = self.llm.get_tokenizer()
        self.eos_ids = eos_token_ids(self.tokenizer, model_path)
        self._lora: dict[int, Any] = {}  # version -> LoRARequest, or LoraAdapter when merged
        self._layout: dict[str, list[str]] = {}  # merged: engine module -> base modules of its shards
        self._base: dict[str, Any] = {}  # merged: base module -> its float32 weight from the checkpoint
        self.active_version = 0  # merged: the version whose weights the engine holds

    def add_adapter(self, version: int, name: str, path: str) -> None:
        if self.merged:
            self._add_merged(version, path)
            return
        from vllm.lora.request import LoRARequest

        request = LoRARequest(lora_name=name, lora_int_id=version, lora_path=path)
        with preserved_global_rng():
            self.llm.llm_engine.add_lora(request)
        if version not in self.llm.llm_engine.list_loras():
            raise RuntimeError(f"vLLM did not load adapter {name} (id {version}) from {path}")
        self._lora[version] = request

    def remove_adapter(self, version: int, name: str) -> None:
        if not self.merged:
            self.llm.llm_engine.remove_lora(version)
        self._lora.pop(version, None)

    def loaded_versions(self) -> set[int]:
        """The adapter versions the engine can serve (vLLM's LoRA ids, or the merged adapters)."""
        return set(self._lora) if self.merged else set(self.llm.llm_engine.list_loras())

    def _request(self, version: int) -> Any:
        """The LoRARequest for ``version`` (None: the weights serve it); merged: put its weights in."""
        if self.merged:
            self._activate(version)
            return None
        return self._lora[version] if version else None

    # ---- merged adapters (CPU) ------------------------------------------------------------------
    def _add_merged(self, version: int, path: str) -> None:
        """Read an adapter and check every module it adapts is a plain linear layer of the engine."""
        from actors import lora_merge

        adapter = lora_merge.read_peft_adapter(path)
        packed = self.llm.apply_model(lambda model: dict(getattr(model, "packed_modules_mapping", {})))[0]
        layout = lora_merge.engine_modules(sorted(adapter.factors), packed)
        missing = [part for parts in layout.values() for part in parts if part not in self._base]
        self._base.update(_checkpoint_weights(self._path, missing))
        problems = self.llm.apply_model(lambda model: [_unmergeable(model, name) for name in layout])[0]
        if any(problems):
            raise ValueError(f"adapter {path} cannot be merged: " + "; ".join(p for p in problems if p)
                             + " (sampler.cpu_lora_ops: grouped serves it with vLLM's LoRA)")
        for module, (a, b) in adapter.factors.items():  # shape errors now, not at the next call
            lora_merge.check_fits(self._base[module], a, b)
        self._layout.update(layout)
        self._lora[version] = adapter

    def _activate(self, version: int) -> None:
        """Put ``version``'s merged weights (0: the base model's) into the engine's layers."""
        from actors import lora_merge

        if version == self.active_version:
            return
        if version and version not in self._lora:
            raise KeyError(f"adapter version {version} is not loaded")
        weights = lora_merge.packed_weights(self._base, self._lora.get(version), self._layout)
        self.llm.apply_model(lambda model: _install_weights(model, weights))
        self.active_version = version
        if not self.llm.reset_prefix_cache():  # cached prompt keys/values were computed with the old weights
            raise RuntimeError("vLLM could not reset its prefix cache after an adapter change")

    def generate(
        self,
        prompt_ids: list[list[int]],
        *,
        n: int,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        top_k: int,
        seeds: list[int],
        version: int,
        name: str | None,
    ) -> list[list[RawSample]]:
        from vllm import SamplingParams

        greedy = temperature == 0  # vLLM refuses n > 1 for greedy: sample once, repeat
        params = [
            SamplingParams(
                n=1 if greedy else n,
                max_tokens=max_new_tokens,
                temperature=temperature,
                top_p=top_p,
                top_k=top_k,
                seed=seed,  # child j of the request gets seed + j (vLLM's parallel sampling)
                logprobs=0,  # 0 = only the sampled token's log-prob
                detokenize=False,  # the Sampler decodes after cutting at EOS
            )
            for seed in seeds
        ]
        prompts = [{"prompt_token_ids": ids} for ids in prompt_ids]
        with preserved_global_rng():
            outputs = self.llm.generate(prompts, params, use_tqdm=False, lora_request=self._request(version))
        result: list[list[RawSample]] = []
        for out in outputs:
            row: list[RawSample] = []
            for sample in sorted(out.outputs, key=lambda o: o.index):
                ids = [int(t) for t in sample.token_ids]
                lps = [float(sample.logprobs[pos][tok].logprob) for pos, tok in enumerate(ids)]
                row.append((ids, lps))
            result.append(row * n if greedy else row)
        return result

    def score(
        self, prompt_ids: list[int], completion_ids: list[int], *, version: int, name: str | None
    ) -> list[float]:
        """Raw log-probs of ``completion_ids`` after ``prompt_ids`` via ``prompt_logprobs``."""
        from vllm import SamplingParams

        # prompt_logprobs=0 returns the log-prob of each actual prompt token; vLLM skips the
        # prefix cache for such requests, so every position is really computed.
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
        full = list(prompt_ids) + list(completion_ids)
        with preserved_global_rng():
            out = self.llm.generate(
                [{"prompt_token_ids": full}], params, use_tqdm=False, lora_request=self._request(version)
            )[0]
        entries = out.prompt_logprobs[len(prompt_ids) :]
        return [float(entry[tok].logprob) for entry, tok in zip(entries, completion_ids, strict=True)]

    def close(self) -> None:
        del self.llm
        gc.collect()
        try:
            from vllm.distributed.parallel_state import (
                destroy_distributed_environment,
                destroy_model_parallel,
            )

            destroy_model_parallel()
            destroy_distributed_environment()
        except Exception:  # best-effort cleanup of an in-process engine
            pass


def _checkpoint_weights(model_path: str, modules: list[str]) -> dict[str, Any]:
    """``{module: weight}`` for linear modules of a safetensors checkpoint, as float32."""
    import torch
    from safetensors import safe_open

    wanted = {f"{m}.weight": m for m in modules}
    out: dict[str, Any] = {}
    for file in sorted(Path(model_path).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for key in wanted.keys() & set(handle.keys()):
                out[wanted[key]] = handle.get_tensor(key).to(torch.float32)
    if len(out) != len(wanted):
        raise ValueError(f"{model_path}: no weight for {sorted(set(wanted.values()) - set(out))[:3]} in its "
                         "safetensors files (merged adapters read the base weights from there)")
    return out


def _unmergeable(model: Any, name: str) -> str:
    """Why the engine's module ``name`` cannot take a merged weight ('' if it can)."""
    from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod

    try:
        layer = model.get_submodule(name)
    except AttributeError:
        return f"{name} is not a module of the engine's {type(model).__name__}"
    if not isinstance(layer, LinearBase) or not isinstance(layer.quant_method, UnquantizedLinearMethod):
        return f"{name} is not an unquantized linear layer ({type(layer).__name__})"
    if getattr(layer, "tp_size", 1) != 1:
        return f"{name} is split over {layer.tp_size} tensor-parallel ranks"
    return ""


def _install_weights(model: Any, weights: dict[str, Any]) -> None:
    """Give each named linear layer a new weight and let vLLM prepare it as at load time (on CPU:
    packed for oneDNN, the plain tensor dropped)."""
    import torch

    for name, weight in weights.items():
        layer = model.get_submodule(name)
        expected = (layer.output_size_per_partition, layer.input_size_per_partition)
        if tuple(weight.shape) != expected:
            raise ValueError(f"merged weight for {name} is {tuple(weight.shape)}, the layer takes {expected}")
        layer.weight = torch.nn.Parameter(weight, requires_grad=False)
        layer.quant_method.process_weights_after_loading(layer)


class TransformersEngine:
    """``model.generate`` + PEFT adapters; slower than vLLM but needs nothing beyond transformers."""

    def __init__(self, model_path: str, *, dtype: str, cpu_threads: int | None) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if cpu_threads:
            set_torch_threads(cpu_threads)  # works beside a vLLM-CPU engine in this process
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch_dtype)
        self.model.to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.eos_ids = eos_token_ids(self.tokenizer, model_path)
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad) if pad is not None else min(self.eos_ids)
        self.peft: Any = None  # PeftModel once the first adapter arrives

    def add_adapter(self, version: int, name: str, path: str) -> None:
        from peft import PeftModel

        if self.peft is None:
            self.peft = PeftModel.from_pretrained(self.model, path, adapter_name=name, is_trainable=False)
        else:
            self.peft.load_adapter(path, adapter_name=name, is_trainable=False)
        self.peft.eval()

    def remove_adapter(self, version: int, name: str) -> None:
        self.peft.delete_adapter(name)

    @contextmanager
    def _using(self, version: int, name: str | None) -> Iterator[Any]:
        """The module to run for ``version``: base (adapters disabled) or one named adapter."""
        if self.peft is None:
            if version:
                raise KeyError(f"adapter version {version} is not loaded")
            yield self.model
        elif version == 0:
            with self.peft.disable_adapter():
                yield self.peft
        else:
            self.peft.set_adapter(name, inference_mode=True)
            yield self.peft

    def generate(
        self,
        prompt_ids: list[list[int]],
        *,
        n: int,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        top_k: int,
        seeds: list[int],
        version: int,
        name: str | None,
    ) -> list[list[RawSample]]:
        import torch
        from transformers import GenerationConfig

        greedy = temperature == 0
        gen = GenerationConfig(
            do_sample=not greedy,
            temperature=None if greedy else temperature,
            top_p=None if greedy else top_p,
            top_k=None if greedy else top_k,  # 0 disables top-k; HF's own default would be 50
            max_new_tokens=max_new_tokens,
            num_return_sequences=1 if greedy else n,
            eos_token_id=sorted(self.eos_ids),
            pad_token_id=self.pad_id,
            return_dict_in_generate=True,
            output_logits=True,  # raw logits, before temperature/top-k/top-p (unlike `scores`)
        )
        result: list[list[RawSample]] = []
        with torch.inference_mode(), self._using(version, name) as model:
            for ids, seed in zip(prompt_ids, seeds, strict=True):
                input_ids = torch.tensor([ids], device=self.device)
                # generate() has no generator argument: seed the global RNG per prompt and put the
                # caller's state back afterwards.
                with preserved_global_rng():
                    torch.manual_seed(seed)
                    out = model.generate(
                        input_ids=input_ids,
                        attention_mask=torch.ones_like(input_ids),
                        generation_config=gen,
                    )
                new = out.sequences[:, len(ids) :]
                logp = torch.log_softmax(torch.stack(out.logits, dim=1).float(), dim=-1)
                chosen = logp.gather(-1, new.unsqueeze(-1)).squeeze(-1)
                row = [
                    ([int(t) for t in new[k].tolist()], [float(x) for x in chosen[k].tolist()])
                    for k in range(new.shape[0])
                ]
                result.append(row * n if greedy else row)
        return result

    def score(
        self, prompt_ids: list[int], completion_ids: list[int], *, version: int, name: str | None
    ) -> list[float]:
        import torch

        full = torch.tensor([list(prompt_ids) + list(completion_ids)], device=self.device)
        with torch.inference_mode(), self._using(version, name) as model:
            logits = model(input_ids=full).logits[0, len(prompt_ids) - 1 : -1].float()
        logp = torch.log_softmax(logits, dim=-1)
        target = torch.tensor(completion_ids, device=self.device)
        return [float(x) for x in logp.gather(-1, target.unsqueeze(-1)).squeeze(-1).tolist()]

    def close(self) -> None:
        self.peft = None
        del self.model
        gc.collect()
