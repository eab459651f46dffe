"""The streaming reward pool on a real local Ray cluster.

The real ``RewardWorker`` actors (the demo pipeline: espeak-ng, SmolLM2, the seeded encoder) score
texts, are killed mid-call, and are added and retired mid-run. Only the hung-call case uses a
stand-in actor, ``SlowScorer``: it plays a GPU call that never returns (it never stands in for the
reward), because a real call cannot be made to hang on demand.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Hashable, Iterator
from pathlib import Path

import pytest
import ray

from brainloop.config import load_config
from brainloop.types import ScoreResult
from reward_workers.pool import RewardPool
from reward_workers.worker import RewardWorker

CONFIG = Path(__file__).parents[1] / "configs" / "demo.yaml"
REAL_TIMEOUT_S = 180.0  # a restarted or newly added worker reloads its models first (slow on a busy CPU)

TEXTS = [
    "The lighthouse keeper climbed the stairs every evening at six.",
    "Rain fell on the market, and the traders pulled their awnings down.",
    "\U0001f600\U0001f389",  # unspeakable: recorded, not scored
    "She counted the steps twice, then decided to take the lift instead.",
    "A **short** note: the meeting moved to Thursday at [noon](https://x.org).",
    "Bees return to the hive by the angle of the sun, even on cloudy days.",
    "The bridge was painted red so that ships could see it through the fog.",
    "Nobody in the village remembered who had planted the old chestnut tree.",
]


@pytest.fixture(scope="module")
def demo_cfg():
    return load_config(CONFIG)


@pytest.fixture(scope="module")
def make_real(ray_cluster, demo_cfg) -> Callable[[str], ray.actor.ActorHandle]:
    """A real reward worker as the driver makes it (restartable), cache off so every call computes."""
    reward = demo_cfg.reward

    def make(name: str) -> ray.actor.ActorHandle:
        return ray.remote(RewardWorker).options(num_cpus=1, max_restarts=-1).remote(
            reward.pipeline.model_dump(), reward.spec.model_dump(mode="json"), name, False, None)

    return make


@pytest.fixture(scope="module")
def real_workers(make_real) -> Iterator[list[ray.actor.ActorHandle]]:
    """Two real workers shared by the tests (loading models is the slow part of starting one)."""
    workers = [make_real("real-0"), make_real("real-1")]
    ray.get([w.ping.remote() for w in workers], timeout=600)
    yield workers
    for worker in workers:  # a pool retires the workers it removes; these outlive every pool of the module
        ray.kill(worker)


def wait_alive(worker: ray.actor.ActorHandle, timeout_s: float = REAL_TIMEOUT_S) -> dict:
    """Ping until the actor answers. A call to a restarting actor fails at once with ActorUnavailableError
    (the workers have max_task_retries=0, as the driver makes them) instead of waiting for it."""
    stop = time.monotonic() + timeout_s
    while True:
        try:
            return ray.get(worker.ping.remote(), timeout=timeout_s)
        except ray.exceptions.ActorUnavailableError:
            if time.monotonic() > stop:
                raise
            time.sleep(0.5)


def drain(pool: RewardPool, deadline_s: float, on_result: Callable[[int], None] | None = None,
          ) -> tuple[list[tuple[Hashable, ScoreResult]], int]:
    """Every pending result, failing the test (instead of hanging) past ``deadline_s``.

    Returns the results in arrival order and the number of ``poll`` calls that returned some.
    ``on_result(n)`` runs after each batch with the number of results so far (to act mid-run).
    """
    out: list[tuple[Hashable, ScoreResult]] = []
    batches = 0
    stop = time.monotonic() + deadline_s
    while pool.pending():
        if time.monotonic() > stop:
            pytest.fail(f"pool still pending after {deadline_s} s: {pool.queued} queued, {pool.in_flight} in flight")
        got = pool.poll(timeout_s=0.5)
        if got:
            batches += 1
            out.extend(got)
            if on_result is not None:
                on_result(len(out))
    return out, batches


def assert_one_result_per_key(results: list[tuple[Hashable, ScoreResult]], keys: list[Hashable]) -> None:
    counts = Counter(k for k, _ in results)
    assert set(counts) == set(keys), f"missing {set(keys) - set(counts)}, unexpected {set(counts) - set(keys)}"
    assert all(c == 1 for c in counts.values()), f"duplicates: {[k for k, c in counts.items() if c > 1]}"


def assert_expected_statuses(results: list[tuple[Hashable, ScoreResult]]) -> None:
    for (_, index), result in results:
        expected = "unspeakable" if TEXTS[index].startswith("\U0001f600") else "ok"
        assert result.status == expected, (index, result.status, result.error)
        if expected == "ok":
            assert result.reward is not None and set(result.roi) >= {"broca", "global"}


# ---- real workers --------------------------------------------------------------------------------------


def test_two_real_workers_stream_one_result_per_key(real_workers):
    pool = RewardPool(lambda i: real_workers[i], num_workers=2, timeout_s=REAL_TIMEOUT_S, max_attempts=3)
    pool.ready()
    keys = [("t", i) for i in range(6)]
    for key in keys:
        pool.submit(key, TEXTS[key[1]])
    assert pool.in_flight == 4 and pool.queued == 2  # two per worker in flight, the rest wait
    results, batches = drain(pool, deadline_s=300)
    assert_one_result_per_key(results, keys)
    assert_expected_statuses(results)
    assert batches >= 2  # streamed as texts finish, not returned all at once
    assert {r.worker for _, r in results} == {"real-0", "real-1"}
    assert all(r.attempts == 1 and r.cache_hit is False for _, r in results)
    assert pool.busy_seconds[0] > 0 and pool.busy_seconds[1] > 0


def test_worker_killed_mid_call_every_key_answered_once(real_workers):
    pool = RewardPool(lambda i: real_workers[i], num_workers=2, timeout_s=REAL_TIMEOUT_S, max_attempts=3)
    pool.ready()
    keys = [("k", i) for i in range(len(TEXTS))]
    for key in keys:
        pool.submit(key, TEXTS[key[1]])
    # Worker 0 has two texts in flight (the first just started): kill it; Ray restarts it.
    ray.kill(real_workers[0], no_restart=False)
    results, _ = drain(pool, deadline_s=400)
    assert_one_result_per_key(results, keys)
    assert_expected_statuses(results)
    retried = [r for _, r in results if r.attempts > 1]
    assert retried, "the killed worker's texts should have been resubmitted"
    assert all(r.attempts <= 3 for _, r in results)
    # The restarted actor serves again under the same handle.
    assert wait_alive(real_workers[0])["name"] == "real-0"


def test_resize_up_and_down_mid_run(real_workers, make_real):
    made: list[str] = []

    def make_worker(index: int) -> ray.actor.ActorHandle:
        made.append(f"w{index}")
        if index < len(real_workers):
            return real_workers[index]
        return make_real(f"extra-{index}")  # a brand-new worker: it loads its models while texts wait

    for worker in real_workers:
        wait_alive(worker)  # the previous test restarted one
    pool = RewardPool(make_worker, num_workers=1, timeout_s=REAL_TIMEOUT_S, max_attempts=3)
    pool.ready()
    keys = [("r", i) for i in range(len(TEXTS))]
    for key in keys:
        pool.submit(key, TEXTS[key[1]])
    assert pool.in_flight == 2 and pool.queued == len(TEXTS) - 2
    sizes: list[int] = []

    def on_result(n_done: int) -> None:
        if n_done >= 1 and not sizes:
            pool.resize(3)  # up: the queue spreads over three workers
            sizes.append(len(pool.workers))
        elif n_done >= 4 and len(sizes) == 1:
            pool.resize(1)  # down while the new workers still hold texts: they finish or are retried
            sizes.append(len(pool.workers))

    results, _ = drain(pool, deadline_s=500, on_result=on_result)
    assert sizes == [3, 1]
    assert made == ["w0", "w1", "w2"] and list(pool.workers) == [0]
    assert "real-1" in {r.worker for _, r in results}  # the added workers took texts
    assert_one_result_per_key(results, keys)
    assert_expected_statuses(results)
    # After shrinking, new texts go only to the remaining worker.
    pool.submit("after", TEXTS[0])
    [(key, result)] = drain(pool, deadline_s=REAL_TIMEOUT_S)[0]
    assert key == "after" and result.ok and result.worker == "real-0"


# ---- hung calls ----------------------------------------------------------------------------------------


@ray.remote(num_cpus=0)
class SlowScorer:
    """Stands in for a reward worker whose GPU call hangs: ``score`` sleeps ``delay_s`` before answering."""

    def __init__(self, name: str, delay_s: float) -> None:
        self.name = name
        self.delay_s = delay_s

    def ping(self) -> dict:
        return {"name": self.name}

    def score(self, text: str) -> ScoreResult:
        time.sleep(self.delay_s)
        return ScoreResult(status="ok", reward=float(len(text)), worker=self.name)


def test_hung_calls_time_out_retry_then_fail_without_hanging(ray_cluster):
    timeout_s, attempts = 1.0, 3
    pool = RewardPool(lambda i: SlowScorer.remote(f"slow-{i}", 60.0), num_workers=2, timeout_s=timeout_s,
                      max_attempts=attempts)
    pool.ready(timeout_s=60)
    try:
        start = time.monotonic()
        pool.submit("a", "first text")
        pool.submit("b", "second text")
        results, _ = drain(pool, deadline_s=30)
        elapsed = time.monotonic() - start
    finally:
        pool.close()
    assert_one_result_per_key(results, ["a", "b"])
    for _, result in results:
        assert result.status == "failed" and result.reward is None
        assert result.attempts == attempts
        assert f"gave up after {attempts} attempts" in result.error
        assert result.error.count("timeout after 1s") == attempts
    # Each attempt waits one timeout; nothing waits for the 60 s calls to return.
    assert timeout_s * attempts <= elapsed < 20
    assert pool.workers == {} and pool.in_flight == 0


def test_hung_worker_text_is_retried_on_another_worker(ray_cluster):
    """A timed-out call cannot be interrupted (a sync actor runs it to the end), so its retry must go to
    another worker: back on the hung one it would only queue behind the stuck call."""
    delays = {0: 60.0, 1: 0.0}  # worker 0 hangs, worker 1 is healthy
    pool = RewardPool(lambda i: SlowScorer.remote(f"slow-{i}", delays[i]), num_workers=2, timeout_s=1.0,
                      max_attempts=2)
    pool.ready(timeout_s=60)
    try:
        pool.submit("x", "a text that first lands on the hung worker")
        [(key, result)] = drain(pool, deadline_s=30)[0]
    finally:
        pool.close()
    assert key == "x"
    assert result.status == "ok" and result.worker == "slow-1" and result.attempts == 2
