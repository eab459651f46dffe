"""A pool of reward-worker actors that streams scores back as each text finishes.

The reward is the loop's bottleneck, so texts are scored one per task, as soon as they exist, on
whichever worker has room (a bounded number in flight per worker). Results come back through the
object store in completion order (``ray.wait``). A call that takes longer than ``timeout_s`` is
cancelled and retried on another worker; a worker that dies mid-call has its text resubmitted; a
stage that fails (a ``failed`` result: the worker is alive but its pipeline raised) is retried on
another worker too; after ``max_attempts`` the text is recorded as failed with every attempt's
reason. Scoring is idempotent (content-addressed cache in the worker), so a retry never
double-counts: each submitted key yields exactly one result.

Workers lost for good (their node died, no restarts left) are replaced by new actors, which Ray
places on whatever capacity remains or on a node that joins later. Texts never wait forever: when no
worker has been healthy for ``timeout_s * max_attempts`` while texts wait, ``poll`` raises
``RewardPoolStalled``.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass

import ray
from ray.exceptions import ActorDiedError, GetTimeoutError, RayError

from brainloop.errors import RewardPoolStalled
from brainloop.types import ScoreResult

log = logging.getLogger(__name__)


@dataclass
class _Job:
    key: Hashable
    text: str
    attempt: int = 1
    worker: int = -1
    started: float = 0.0
    deadline: float = 0.0
    errors: tuple[str, ...] = ()


class RewardPool:
    def __init__(
        self,
        make_worker: Callable[[int], ray.actor.ActorHandle],
        num_workers: int,
        timeout_s: float,
        max_attempts: int,
        max_in_flight_per_worker: int = 2,
    ) -> None:
        self._make_worker = make_worker
        self.timeout_s = timeout_s
        self.max_attempts = max_attempts
        self.per_worker = max_in_flight_per_worker
        self.workers: dict[int, ray.actor.ActorHandle] = {}
        self._next_index = 0
        self._queue: deque[_Job] = deque()
        self._in_flight: dict[ray.ObjectRef, _Job] = {}
        self._done: list[tuple[Hashable, ScoreResult]] = []
        self._recovering: dict[int, tuple[ray.ObjectRef, float]] = {}
        self._no_worker_since: float | None = None  # texts waiting and no healthy worker, since (monotonic)
        self.replaced = 0  # workers replaced after dying for good
        self.busy_seconds: dict[int, float] = {}
        self.resize(num_workers)

    # ---- membership -------------------------------------------------------------------------
    def resize(self, num_workers: int) -> None:
        """Add or retire workers; a retired worker's in-flight texts finish or are retried."""
        self._target = num_workers
        while len(self.workers) < num_workers:
            index = self._next_index
            self._next_index += 1
            self.workers[index] = self._make_worker(index)
            self.busy_seconds[index] = 0.0
        while len(self.workers) > num_workers:
            index = max(self.workers)
            self.workers.pop(index)

    def ready(self, timeout_s: float = 600.0) -> None:
        """Block until every worker has loaded its models (surfaces load errors early)."""
        ray.get([w.ping.remote() for w in self.workers.values()], timeout=timeout_s)

    # ---- submission and streaming ---------------------------------------------------------------
    def submit(self, key: Hashable, text: str) -> None:
        self._queue.append(_Job(key, text))
        self._dispatch()

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def pending(self) -> int:
        return len(self._queue) + len(self._in_flight) + len(self._done)

    def _load(self, index: int) -> int:
        return sum(1 for job in self._in_flight.values() if job.worker == index)

    def _mark_unhealthy(self, index: int) -> None:
        """Hold texts back from a worker that failed until it answers a ping again (Ray restarts it)."""
        if index in self.workers and index not in self._recovering:
            self._recovering[index] = (self.workers[index].ping.remote(), time.monotonic())

    def _healthy(self) -> list[int]:
        now = time.monotonic()
        for index, (ref, sent) in list(self._recovering.items()):
            if index not in self.workers:
                del self._recovering[index]
                continue
            ready, _ = ray.wait([ref], timeout=0)
            if not ready:
                continue
            try:
                ray.get(ref)
                del self._recovering[index]
            except ActorDiedError as exc:  # gone for good (no restarts left, node lost): replace it
                del self._recovering[index]
                self.workers.pop(index)
                log.warning("reward worker %d is gone for good (%s); starting a replacement", index,
                            str(exc).splitlines()[0][:200])
                self.replaced += 1
                self.resize(self._target)
            except RayError:  # still restarting: ask again, at most every half second
                if now - sent > 0.5:
                    self._recovering[index] = (self.workers[index].ping.remote(), now)
        return [i for i in self.workers if i not in self._recovering]

    @property
    def stall_deadline_s(self) -> float:
        """How long texts may wait while no worker is healthy: every attempt's timeout."""
        return self.timeout_s * self.max_attempts

    def _dispatch(self) -> None:
        while self._queue:
            healthy = self._healthy()
            if not healthy:
                now = time.monotonic()
                if self._no_worker_since is None:
                    self._no_worker_since = now
                elif now - self._no_worker_since > self.stall_deadline_s:
                    raise RewardPoolStalled(
                        f"no reward worker has been healthy for {now - self._no_worker_since:.0f} s "
                        f"(reward.timeout_s x reward.max_attempts = {self.stall_deadline_s:.0f} s) while "
                        f"{len(self._queue)} texts waited; {len(self.workers)} workers restarting or unplaceable "
                        "(lost node? missing resources? see `ray status`)")
                return
            self._no_worker_since = None
            # Least loaded, but never back to the worker this text just failed or timed out on while
            # another exists (it may be restarting or still stuck in the old call).
            index = min(healthy, key=lambda i: (i == self._queue[0].worker, self._load(i)))
            if self._load(index) >= self.per_worker:
                return
            job = self._queue.popleft()
            job.worker, job.started = index, time.monotonic()
            # Calls on one actor run in turn: a text queued behind others gets their time too.
            job.deadline = job.started + self.timeout_s * (1 + self._load(index))
            self._in_flight[self.workers[index].score.remote(job.text)] = job

    def _retry_or_fail(self, job: _Job, reason: str, last: ScoreResult | None = None) -> None:
        """Queue the text again (first in line, for another worker) or, out of attempts, record it failed
        with every attempt's reason (and the last failed result's facts, when the stage itself failed)."""
        job.errors = (*job.errors, reason)
        if job.attempt >= self.max_attempts:
            result = last if last is not None else ScoreResult(status="failed")
            result.status, result.reward, result.attempts = "failed", None, job.attempt
            result.error = f"gave up after {job.attempt} attempts: " + " | ".join(job.errors)
            self._done.append((job.key, result))
            return
        job.attempt += 1
        self._queue.appendleft(job)

    def poll(self, timeout_s: float = 0.0) -> list[tuple[Hashable, ScoreResult]]:
        """Results finished so far (waiting up to ``timeout_s`` for the first one)."""
        self._dispatch()
        if self._in_flight and not self._done:
            ready, _ = ray.wait(list(self._in_flight), num_returns=1, timeout=timeout_s)
            ready, _ = ray.wait(list(self._in_flight), num_returns=len(self._in_flight), timeout=0)
            now = time.monotonic()
            for ref in ready:
                job = self._in_flight.pop(ref)
                self.busy_seconds[job.worker] = self.busy_seconds.get(job.worker, 0.0) + now - job.started
                try:
                    result: ScoreResult = ray.get(ref, timeout=self.timeout_s)
                except (RayError, GetTimeoutError) as exc:  # worker died, task raised, or cancelled
                    self._mark_unhealthy(job.worker)
                    self._retry_or_fail(job, f"{type(exc).__name__} on worker {job.worker}: {str(exc)[:300]}")
                    continue
                if result.status == "failed":  # a stage raised on a live worker: another worker may succeed
                    self._retry_or_fail(job, f"failed on worker {job.worker}: {(result.error or '')[:300]}", result)
                    continue
                result.attempts = job.attempt
                self._done.append((job.key, result))
            for ref, job in list(self._in_flight.items()):
                if now > job.deadline:
                    self._in_flight.pop(ref)
                    # A running actor call cannot be cancelled: restart the stuck worker instead (its
                    # other in-flight texts fail over and are retried elsewhere).
                    if job.worker in self.workers:
                        ray.kill(self.workers[job.worker], no_restart=False)
                        self._mark_unhealthy(job.worker)
                    self._retry_or_fail(job, f"timeout after {self.timeout_s:.0f}s on worker {job.worker}")
            self._dispatch()
        elif not self._done:
            time.sleep(min(timeout_s, 0.1))  # texts queued but no healthy worker yet: don't spin
        done, self._done = self._done, []
        return done

    def results(self, timeout_s: float = 1.0) -> Iterator[tuple[Hashable, ScoreResult]]:
        """Yield every pending result as it completes, until nothing is left."""
        while self.pending():
            yield from self.poll(timeout_s)

    def close(self) -> None:
        for ref in list(self._in_flight):
            ray.cancel(ref, force=False)
        self._in_flight.clear()
        for worker in self.workers.values():
            ray.kill(worker)
        self.workers.clear()

