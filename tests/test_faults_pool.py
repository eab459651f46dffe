"""Reward-pool failure handling on real reward workers (the demo pipeline) and a real local Ray cluster.

- A stage that raises on a live worker (a ``failed`` result, not a Ray error) is retried on another
  worker; out of attempts, the text is recorded ``failed`` with every attempt's reason. The failing
  worker is real: its pipeline was built with an espeak-ng voice that does not exist, so its TTS stage
  raises for every text, exactly as a broken stage would.
- Texts that wait while no worker is healthy get a deadline (``timeout_s x max_attempts``), then a
  clear error, instead of waiting forever. The worker here needs a resource no node has, so Ray can
  never place it (as when its node is gone and no other fits).
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import pytest
import ray

from brainloop.config import load_config
from brainloop.errors import RewardPoolStalled
from reward_workers.pool import RewardPool
from reward_workers.worker import RewardWorker

CONFIG = Path(__file__).parents[1] / "configs" / "demo.yaml"
TEXTS = [
    "The lighthouse keeper climbed the stairs every evening at six.",
    "Rain fell on the market, and the traders pulled their awnings down.",
    "She counted the steps twice, then decided to take the lift instead.",
    "Bees return to the hive by the angle of the sun, even on cloudy days.",
]


def make_worker(name: str, **pipeline_changes):
    reward = load_config(CONFIG).reward
    pipeline = {**reward.pipeline.model_dump(), **pipeline_changes}
    return ray.remote(RewardWorker).options(num_cpus=1, max_restarts=-1).remote(
        pipeline, reward.spec.model_dump(mode="json"), name, False, None)


@pytest.fixture(scope="module")
def workers(ray_cluster):
    broken = make_worker("broken", tts_voice="xx-no-such-voice")  # every text fails in its TTS stage
    good = make_worker("good")
    ray.get([broken.ping.remote(), good.ping.remote()], timeout=600)
    return {"broken": broken, "good": good}


def drain(pool: RewardPool, deadline_s: float) -> list:
    out = []
    stop = time.monotonic() + deadline_s
    while pool.pending():
        assert time.monotonic() < stop, f"pool still pending after {deadline_s} s"
        out.extend(pool.poll(timeout_s=0.5))
    return out


def test_failed_stage_is_retried_on_another_worker(workers):
    order = [workers["broken"], workers["good"]]
    pool = RewardPool(lambda i: order[i], num_workers=2, timeout_s=180, max_attempts=3)
    for i, text in enumerate(TEXTS):
        pool.submit(i, text)
    results = drain(pool, deadline_s=300)
    assert Counter(k for k, _ in results) == Counter(range(len(TEXTS)))  # one result per text
    for _, result in results:
        assert result.status == "ok", result.error  # every text scored, by the healthy worker
        assert result.worker == "good"
    retried = [r for _, r in results if r.attempts > 1]
    assert retried, "texts that met the broken worker first must have been retried"
    assert all(r.attempts == 2 for r in retried)  # one failure on the broken worker, then the good one


def test_failed_stage_out_of_attempts_records_every_reason(workers):
    pool = RewardPool(lambda i: workers["broken"], num_workers=1, timeout_s=180, max_attempts=2)
    pool.submit("x", TEXTS[0])
    [(key, result)] = drain(pool, deadline_s=120)
    assert key == "x" and result.status == "failed" and result.reward is None and result.attempts == 2
    assert result.error.startswith("gave up after 2 attempts")
    assert result.error.count("espeak-ng has no voice 'xx-no-such-voice'") == 2
    assert "tts" in result.timings  # the failed attempt's facts are kept


def test_texts_waiting_without_a_healthy_worker_get_a_deadline(ray_cluster):
    reward = load_config(CONFIG).reward

    def unplaceable(index: int):
        return ray.remote(RewardWorker).options(num_cpus=1, resources={"no_such_node": 1}, max_restarts=-1).remote(
            reward.pipeline.model_dump(), reward.spec.model_dump(mode="json"), f"w{index}", False, None)

    timeout_s, attempts = 2.0, 2
    pool = RewardPool(unplaceable, num_workers=1, timeout_s=timeout_s, max_attempts=attempts)
    start = time.monotonic()
    pool.submit("a", TEXTS[0])
    with pytest.raises(RewardPoolStalled, match=r"no reward worker has been healthy .* 1 texts waited"):
        drain(pool, deadline_s=60)
    elapsed = time.monotonic() - start
    # One timeout on the unplaced worker, then timeout_s x max_attempts with no healthy worker.
    assert timeout_s * attempts < elapsed < 30
    pool.close()
