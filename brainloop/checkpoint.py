"""Checkpoints written atomically: a half-written checkpoint is never used.

A checkpoint is a folder ``checkpoints/step_000012/`` holding the learner state (adapter,
optimizer, version, RNG; a torch file loaded with ``weights_only=True``), the adapter in PEFT
format, ``driver.json`` (step, counters, the generations in flight and the adapter version each
samples from) and, with ``max_staleness >= 1``, the older adapters those generations use
(``adapter_v000011/``), so that a resumed asynchronous run samples exactly what it would have, and
``config.json``: the run's config, which a ``--resume`` compares its own with.
It is built under a temporary name and renamed into place once complete, with a ``COMPLETE``
marker written last; readers ignore folders without it. A write that fails (full disk, unwritable
folder) removes its temporary folder and raises: the complete checkpoints before it stay intact.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

MARKER = "COMPLETE"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def save_checkpoint(root: Path, step: int, learner_state: bytes, adapter_files: dict[str, bytes],
                    driver_state: dict, keep: int = 3,
                    older_adapters: dict[int, dict[str, bytes]] | None = None,
                    config: dict | None = None) -> Path:
    final = root / f"step_{step:06d}"
    tmp = root / f".tmp-step_{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        (tmp / "adapter").mkdir(parents=True)
        _write(tmp / "learner_state.pt", learner_state)
        for name, blob in adapter_files.items():
            _write(tmp / "adapter" / name, blob)
        for version, files in (older_adapters or {}).items():
            folder = tmp / f"adapter_v{version:06d}"
            folder.mkdir()
            for name, blob in files.items():
                _write(folder / name, blob)
        if config is not None:
            _write(tmp / "config.json", json.dumps(config, indent=1).encode())
        _write(tmp / "driver.json", json.dumps(driver_state, indent=1).encode())
        _write(tmp / MARKER, b"")
        # A checkpoint of the same step (a resumed run redoing it) is moved aside, not deleted first:
        # until the new one is in place the old one is still there.
        aside = root / f".old-step_{step:06d}"
        if final.exists():
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(final, aside)
        os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # frees what the failed write took (a full disk)
        raise
    shutil.rmtree(aside, ignore_errors=True)
    for old in complete_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint folders, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step_*") if p.is_dir() and (p / MARKER).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def latest_checkpoint(root: Path) -> Path | None:
    found = complete_checkpoints(root)
    return found[-1] if found else None


def load_checkpoint(path: Path) -> tuple[bytes, dict[str, bytes], dict]:
    adapter = {p.name: p.read_bytes() for p in (path / "adapter").iterdir() if p.is_file()}
    return (path / "learner_state.pt").read_bytes(), adapter, json.loads((path / "driver.json").read_text())


def checkpoint_config(path: Path) -> dict | None:
    """The config the run had when it wrote this checkpoint (None for checkpoints older than this record)."""
    file = path / "config.json"
    return json.loads(file.read_text()) if file.is_file() else None


def load_older_adapters(path: Path) -> dict[int, dict[str, bytes]]:
    """The older adapter versions a checkpoint keeps for its in-flight generations (may be none)."""
    return {int(folder.name.removeprefix("adapter_v")): {p.name: p.read_bytes() for p in folder.iterdir()
                                                         if p.is_file()}
            for folder in sorted(path.glob("adapter_v*")) if folder.is_dir()}
