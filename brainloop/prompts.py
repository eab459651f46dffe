"""The prompt set: a JSONL file of {"id", "text", "split", ...} records, train and held-out."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MAX_PROMPT_CHARS = 4000


@dataclass(frozen=True)
class Prompt:
    id: str
    text: str
    split: str  # "train" | "held_out"


class PromptFileError(ValueError):
    """A prompt file that cannot be used; the message names the line."""


def load_prompts(path: str | Path) -> list[Prompt]:
    """Read and validate every line; a broken line is an error naming it, before any actor starts."""
    path = Path(path)
    if not path.is_file():
        raise PromptFileError(f"prompt file {path} does not exist")
    prompts: list[Prompt] = []
    seen: set[str] = set()
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PromptFileError(f"{where}: not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str) or not record["text"].strip():
            raise PromptFileError(f"{where}: needs a non-empty string field 'text'")
        if len(record["text"]) > MAX_PROMPT_CHARS:
            raise PromptFileError(f"{where}: prompt longer than {MAX_PROMPT_CHARS} characters")
        pid = str(record.get("id", f"line{number}"))
        if pid in seen:
            raise PromptFileError(f"{where}: duplicate prompt id {pid!r}")
        split = record.get("split", "train")
        if split not in ("train", "held_out"):
            raise PromptFileError(f"{where}: split must be 'train' or 'held_out', got {split!r}")
        seen.add(pid)
        prompts.append(Prompt(pid, record["text"].strip(), split))
    if not prompts:
        raise PromptFileError(f"prompt file {path} holds no prompts")
    return prompts


def split(prompts: list[Prompt], name: str) -> list[Prompt]:
    chosen = [p for p in prompts if p.split == name]
    if not chosen:
        raise PromptFileError(f"the prompt set has no {name!r} prompts")
    return chosen


def prompts_for_step(train: list[Prompt], step: int, per_step: int, seed: int) -> list[Prompt]:
    """The step's prompts: a function of (seed, step) only, so a resumed run draws the same ones."""
    rng = np.random.default_rng([seed, step])
    index = rng.choice(len(train), size=min(per_step, len(train)), replace=False)
    return [train[i] for i in sorted(index)]
