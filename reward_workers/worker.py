"""The reward-worker actor: one TRIBE pipeline, loaded once, scoring texts on request.

The driver creates ``ray.remote(RewardWorker)`` actors named ``reward-worker-k`` with
``max_restarts=-1``: a worker that dies is restarted by Ray, and the pool resubmits its texts.
"""

from __future__ import annotations

import os
import socket
import time

from brainloop.metrics import RunMetrics
from brainloop.types import ScoreResult


class RewardWorker:
    def __init__(self, pipeline: dict, spec: dict, name: str, use_cache: bool = True,
                 prediction_dir: str | None = None, metrics: RunMetrics | None = None) -> None:
        from reward_workers.pipeline import build_pipeline

        self.name = name
        self.prediction_dir = prediction_dir
        self.metrics = metrics
        self.pipeline = build_pipeline(pipeline, spec, use_cache=use_cache)

    def ping(self) -> dict:
        return {"name": self.name, "pid": os.getpid(), "host": socket.gethostname(),
                "encoder_trained": self.pipeline.encoder_trained}

    def score(self, text: str) -> ScoreResult:
        started = time.perf_counter()
        result = self.pipeline.score(text, self.prediction_dir)
        result.worker = self.name
        if self.metrics is not None:  # latency is reported where it is spent
            if not result.cache_hit:  # a cache hit carries the timings of the run that scored it
                for stage, seconds in result.timings.items():
                    self.metrics.observe("reward_stage_seconds", seconds, stage=stage)
            self.metrics.observe("reward_text_seconds", time.perf_counter() - started,
                                 status="cache_hit" if result.cache_hit else result.status)
        return result

    def score_batch(self, texts: list[str]) -> list[ScoreResult]:
        return [self.score(text) for text in texts]
