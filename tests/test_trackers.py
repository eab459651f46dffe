"""run.report_to: TensorBoard and W&B (offline) get every step's numbers, under metrics.jsonl's names."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from brainloop.trackers import open_trackers, step_scalars

pytest.importorskip("tensorboard", reason="the brainloop[trackers] extra")
pytest.importorskip("wandb", reason="the brainloop[trackers] extra")


@pytest.fixture
def offline_wandb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):  # nothing written outside the test
        monkeypatch.setenv(var, str(tmp_path / "wandb-home"))


def _record(step: int, reward: float) -> dict:
    return {"step": step, "reward_mean": reward, "num_samples": 8, "scored_ahead": False, "time": 1.7e9,
            "kl_per_token": float("nan"), "note": "not a number"}


def _scalars(run_dir: Path, name: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return [(e.step, round(e.value, 6)) for e in acc.Scalars(name)]


def _wandb_history(path: Path) -> list[dict]:
    """The history rows of an offline W&B run file (what ``wandb sync`` uploads): a LevelDB-style log, a
    7-byte header then 32 KiB blocks of records (crc32, length, type) holding ``wandb_internal`` protos."""
    from wandb.proto import wandb_internal_pb2 as pb

    blob, block = path.read_bytes(), 32 * 1024
    assert blob[:4] == b":W&B"
    rows, pos, data = [], 7, b""
    while pos + 7 <= len(blob):
        if block - pos % block < 7:  # a block's tail too short for a record header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", blob[pos:pos + 7])
        data, pos = data + blob[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a full record, or the last fragment of one
            record = pb.Record()
            record.ParseFromString(data)
            data = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
    return rows


def test_step_scalars_keeps_the_finite_numbers():
    assert step_scalars(_record(3, 0.25)) == {"reward_mean": 0.25, "num_samples": 8.0, "scored_ahead": 0.0}


def test_tensorboard_and_offline_wandb_get_each_step(tmp_path: Path, offline_wandb: None):
    run_dir = tmp_path / "run-a"
    trackers = open_trackers(["tensorboard", "wandb"], run_dir, "demo", {"run": {"steps": 2}})
    for step, reward in ((0, 0.5), (1, 0.75)):
        for tracker in trackers:
            tracker.log(step, step_scalars(_record(step, reward)))
    wandb_run = trackers[1].run  # type: ignore[attr-defined]
    assert wandb_run.config["run"] == {"steps": 2}
    for tracker in trackers:
        tracker.close()
    assert _scalars(run_dir, "reward_mean") == [(0, 0.5), (1, 0.75)]
    assert _scalars(run_dir, "num_samples") == [(0, 8.0), (1, 8.0)]
    # W&B: offline, under the run folder, with the run folder's name as the run id (a resume continues it)
    assert wandb_run.id == "run-a" and wandb_run.offline
    [log_file] = (run_dir / "wandb").glob("offline-run-*-run-a/run-run-a.wandb")
    history = [{k: v for k, v in row.items() if not k.startswith("_") or k == "_step"}  # not W&B's own timings
               for row in _wandb_history(log_file)]
    assert history == [{"reward_mean": 0.5, "num_samples": 8, "scored_ahead": 0, "_step": 0},
                       {"reward_mean": 0.75, "num_samples": 8, "scored_ahead": 0, "_step": 1}]


def test_a_resumed_session_replaces_the_steps_after_its_checkpoint(tmp_path: Path):
    run_dir = tmp_path / "run-b"
    [first] = open_trackers(["tensorboard"], run_dir, "demo", {})
    for step, reward in ((0, 0.5), (1, 0.75), (2, 0.8)):  # a session that crashed after checkpointing step 0
        first.log(step, {"reward_mean": reward})
    first.close()
    [resumed] = open_trackers(["tensorboard"], run_dir, "demo", {}, first_step=1)
    resumed.log(1, {"reward_mean": 0.625})
    resumed.close()
    assert _scalars(run_dir, "reward_mean") == [(0, 0.5), (1, 0.625)]


def test_unknown_tracker_is_an_error(tmp_path: Path):
    with pytest.raises(ValueError, match="unknown tracker 'mlflow'"):
        open_trackers(["mlflow"], tmp_path, "demo", {})
