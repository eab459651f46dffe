"""The run's records on disk: rollouts as Parquet, one file per step, and per-step metrics.

One file per step makes a step's rows appear atomically (written to a temporary name, then
renamed) and makes resume exact: files of steps after the checkpoint are removed, so no row is
duplicated or lost. ``pandas.read_parquet(run/"rollouts")``, ``ray.data.read_parquet`` and DuckDB's
``read_parquet('run/rollouts/*.parquet')`` all read the folder as one table.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from brainloop import analysis
from brainloop.analysis import ANALYSIS_COLUMNS
from brainloop.prompts import Prompt
from brainloop.rois import ROI_NAMES, SUMMARY_NAMES
from brainloop.types import Completion, SampleOutcome, ScoreResult

ROI_COLUMNS = [f"roi_{name}" for name in (*ROI_NAMES, *SUMMARY_NAMES)]

ROLLOUT_SCHEMA = pa.schema(
    [
        ("step", pa.int32()),
        ("prompt_index", pa.int32()),  # position of the prompt within the step
        ("sample_index", pa.int32()),  # position of the completion within its group
        ("prompt_id", pa.string()),
        ("prompt", pa.string()),
        ("completion", pa.string()),
        ("num_tokens", pa.int32()),
        ("finish_reason", pa.string()),
        ("adapter_version", pa.int32()),
        ("learner_version", pa.int32()),  # the adapter version the update was applied to
        ("temperature", pa.float32()),
        ("status", pa.string()),  # ok | unspeakable | failed
        ("error", pa.string()),
        ("reward", pa.float64()),
        ("advantage", pa.float64()),
        ("used_in_update", pa.bool_()),
        *[(col, pa.float64()) for col in ROI_COLUMNS],
        ("n_words", pa.int32()),
        ("n_trs", pa.int32()),
        ("audio_seconds", pa.float32()),
        ("reward_worker", pa.string()),
        ("reward_attempts", pa.int32()),
        ("cache_hit", pa.bool_()),
        ("encoder_trained", pa.bool_()),
        ("official_release", pa.bool_()),  # encoder and feature settings from an official TRIBE release
        ("splitter", pa.string()),  # spaCy sentence splitter of the word contexts (en_core_web_lg | sentencizer)
        ("n_words_kept", pa.int32()),  # words that got a context (upstream drops words it cannot locate)
        ("timings_json", pa.string()),  # seconds per pipeline stage
        ("is_weight", pa.float64()),  # mean truncated importance weight of its tokens (1 when on-policy)
        ("sample_started_at", pa.float64()),  # unix times: the sampler's generate call started / finished,
        ("sample_finished_at", pa.float64()),
        ("submitted_at", pa.float64()),  # the text was submitted to the reward pool,
        ("scored_at", pa.float64()),  # its reward arrived at the driver,
        ("updated_at", pa.float64()),  # the update using it finished
        # brainloop.analysis: selectivity (target - whole cortex / - control regions), the base model's NLL
        # per token, words per second, fraction of tokens removed before speech, text statistics
        *[(col, pa.float64()) for col in ANALYSIS_COLUMNS],
    ]
)


def rollout_row(step: int, prompt_index: int, prompt: Prompt, completion: Completion, result: ScoreResult,
                outcome: SampleOutcome, *, temperature: float, submitted_at: float, scored_at: float,
                targets: Sequence[str], controls: Sequence[str], base_nll: float | None) -> dict:
    """One completion's row of ``ROLLOUT_SCHEMA``, as far as it is known before the update.

    ``outcome`` is what ``algo.build_groups`` made of it; ``base_nll`` the base model's NLL per token
    when the sampler measured it (naturalness penalty), else the learner's update fills it in later, as
    it does ``learner_version``, ``updated_at`` and ``is_weight``.
    """
    c = completion
    row = {
        "step": step, "prompt_index": prompt_index, "sample_index": c.sample_index,
        "prompt_id": prompt.id, "prompt": prompt.text, "completion": c.text,
        "num_tokens": len(c.token_ids), "finish_reason": c.finish_reason,
        "adapter_version": c.adapter_version, "temperature": temperature,
        "status": result.status, "error": result.error,
        "reward": outcome.reward, "advantage": outcome.advantage, "used_in_update": outcome.used,
        "n_words": result.n_words, "n_trs": result.n_trs, "audio_seconds": result.audio_seconds,
        "reward_worker": result.worker, "reward_attempts": result.attempts,
        "cache_hit": result.cache_hit, "encoder_trained": result.encoder_trained,
        "timings_json": json.dumps(result.timings), "sample_started_at": c.started_at,
        "sample_finished_at": c.finished_at, "submitted_at": submitted_at, "scored_at": scored_at,
        "official_release": result.official_release, "splitter": result.splitter,
        "n_words_kept": result.n_words_kept,
    }
    for name in (*ROI_NAMES, *SUMMARY_NAMES):
        row[f"roi_{name}"] = result.roi.get(name)
    # What the sample is beyond its reward (brainloop.analysis).
    row.update(analysis.sample_measures(
        c.text, result.roi, scored=result.ok, n_words=result.n_words, audio_seconds=result.audio_seconds,
        removed_fraction=result.removed_token_fraction, targets=targets, controls=controls, base_nll=base_nll))
    return row


class RunFiles:
    def __init__(self, run_dir: str | Path) -> None:
        self.root = Path(run_dir)
        self.rollouts = self.root / "rollouts"
        self.checkpoints = self.root / "checkpoints"
        self.metrics = self.root / "metrics.jsonl"
        for d in (self.rollouts, self.checkpoints):
            d.mkdir(parents=True, exist_ok=True)

    def rollout_file(self, step: int) -> Path:
        return self.rollouts / f"step_{step:06d}.parquet"

    def write_rollouts(self, step: int, rows: list[dict]) -> None:
        table = pa.Table.from_pylist(rows, schema=ROLLOUT_SCHEMA)
        final = self.rollout_file(step)
        tmp = final.with_suffix(".parquet.tmp")
        pq.write_table(table, tmp)
        os.replace(tmp, final)

    def append_metrics(self, record: dict) -> None:
        with open(self.metrics, "a") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def read_metrics(self) -> list[dict]:
        if not self.metrics.is_file():
            return []
        return [json.loads(line) for line in self.metrics.read_text().splitlines() if line.strip()]

    def truncate_after(self, last_step: int) -> None:
        """Forget everything recorded after ``last_step`` (the checkpoint a resume starts from)."""
        for path in self.rollouts.glob("step_*.parquet*"):
            step = int(path.name.split("_")[1].split(".")[0])
            if step > last_step or path.name.endswith(".tmp"):
                path.unlink()
        kept = [m for m in self.read_metrics() if m.get("step", -1) <= last_step]
        tmp = self.metrics.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(m) + "\n" for m in kept))
        os.replace(tmp, self.metrics)
