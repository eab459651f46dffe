"""Optional experiment trackers (``run.report_to: [tensorboard, wandb]``), as users of TRL and verl expect.

Each tracker gets the same per-step numbers the run writes to ``metrics.jsonl`` (every numeric field of
a step's record, under the same name; ``step`` is the x axis). TensorBoard event files go to
``RUN/tensorboard``; Weights & Biases runs offline unless ``WANDB_MODE`` says otherwise (the run is
then synced later with ``wandb sync RUN/wandb/offline-run-*``), under ``RUN/wandb``, with the run
folder's name as its id so that a ``--resume`` continues the same W&B run. The packages are the
``brainloop[trackers]`` extra and are imported only when a tracker is asked for.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger(__name__)

TRACKERS = ("tensorboard", "wandb")


class Tracker(Protocol):
    def log(self, step: int, metrics: Mapping[str, float]) -> None: ...

    def close(self) -> None: ...


def step_scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """The numbers of a step record a tracker plots: every int/float/bool field but the step and the
    wall-clock time (the x axis and a timestamp, not metrics)."""
    return {k: float(v) for k, v in record.items()
            if isinstance(v, (int, float)) and k not in ("step", "time") and math.isfinite(float(v))}


class TensorBoardTracker:
    def __init__(self, run_dir: Path, first_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: a resumed run drops the events a crashed session wrote after its checkpoint, as the
        # rollouts and metrics.jsonl do, so no step is plotted twice.
        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=first_step or None)

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    def __init__(self, run_dir: Path, run_name: str, config: Mapping[str, Any]) -> None:
        import wandb

        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "brainloop"), name=run_name, dir=str(run_dir),
            id=re.sub(r"[^A-Za-z0-9_-]", "-", run_dir.resolve().name), resume="allow", config=dict(config),
            mode=os.environ.get("WANDB_MODE", "offline"),  # type: ignore[arg-type]
            # The job's stdout is what `ray job logs` shows: W&B leaves it alone rather than wrapping it.
            settings=wandb.Settings(console="off"),
        )

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        self.run.log(dict(metrics), step=step)

    def close(self) -> None:
        self.run.finish()


def open_trackers(names: Sequence[str], run_dir: Path, run_name: str, config: Mapping[str, Any],
                  first_step: int = 0) -> list[Tracker]:
    """The trackers ``run.report_to`` names, started for a session whose first step is ``first_step``."""
    trackers: list[Tracker] = []
    for name in names:
        if name == "tensorboard":
            trackers.append(TensorBoardTracker(run_dir, first_step))
        elif name == "wandb":
            trackers.append(WandbTracker(run_dir, run_name, config))
        else:
            raise ValueError(f"unknown tracker {name!r}; known: {', '.join(TRACKERS)}")
        log.info("reporting per-step metrics to %s", name)
    return trackers
