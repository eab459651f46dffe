"""A pool of reward-worker actors that streams scores back as each text finishes, and changes size
while the job runs.

The reward is the loop's bottleneck, so texts are scored one per task, as soon as they exist, on
whichever worker has room (a bounded number in flight per worker). Results come back through the
object store in completion order (``ray.wait``). A call that takes longer than ``timeout_s`` is
cancelled and retried on another worker; a worker that dies mid-call has its text resubmitted; a
stage that fails (a ``failed`` result: the worker is alive but its pipeline raised) is retried on
another worker too; after ``max_attempts`` the text is recorded as failed with every attempt's
reason. Scoring is idempotent (content-addressed cache in the worker), so a retry never
double-counts: each submitted key yields exactly one result.

While the pool changes size (autoscaling on, or a worker still starting) each worker gets one text at a
time and the rest wait in the pool's queue, where a worker that has just joined can take them; a text
sent to a busy actor would wait in that actor's own queue, out of reach of the others.

Membership. A worker is *pending* until its actor is placed (no node has the CPU, GPU or custom
resource it asks for yet: the Ray autoscaler launches one), *starting* while it loads its models,
then *alive*; texts go to alive workers only, found ready with a non-blocking ``ray.wait`` on a
ping. ``resize`` adds workers or retires them; a retired worker is *drained* (no new texts, its
texts in flight finish) and then released (``ray.kill``). Workers lost for good (their node died, no
restarts left) are replaced by new actors, which Ray places on whatever capacity remains or on a
node that joins later. Texts never wait forever: when no worker has been alive for ``timeout_s *
max_attempts`` while texts wait, ``poll`` raises ``RewardPoolStalled``; pending workers do not stop
the run while others are alive.

Size. With ``autoscale`` (``brainloop.config.AutoscaleConfig``) the pool follows its queue: it adds a
worker while the texts waiting per worker stay above the target for ``up_after_s``, and drains a
worker idle for ``down_after_idle_s``, within [min_workers, max_workers]. A ``PoolControl`` actor
(``reward_workers.control``) carries size requests in and status snapshots out (``brainloop
scale`` / ``brainloop status``). Every decision is logged with its reason, kept in ``decisions``
and exported as metrics (role ``reward-pool``).
"""

from __future__ import annotations

import logging
import time
from collections import Counter, deque
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import ActorDiedError, GetTimeoutError, RayError

from brainloop.errors import RewardPoolStalled, RunFailure, short_cause
from brainloop.metrics import RunMetrics
from brainloop.types import ScoreResult

log = logging.getLogger(__name__)

STATUS_PERIOD_S = 1.0  # status snapshot to the control actor and metrics, at most this often
RATE_WINDOW_S = 60.0  # per-worker texts/s and utilisation over about this window
PLACEMENT_CACHE_S = 2.0  # how long the GCS's answer "which actors wait for resources" is reused
PLACEMENT_PENDING = ("DEPENDENCIES_UNREADY", "PENDING_CREATION")


@dataclass
class _Job:
    key: Hashable
    text: str
    attempt: int = 1
    worker: int = -1
    started: float = 0.0
    deadline: float = 0.0
    errors: tuple[str, ...] = ()
    spared: bool = False  # its worker was restarted for another text's timeout: that failure is not its attempt


@dataclass
class _Worker:
    """Bookkeeping of one worker actor (times are time.monotonic())."""

    created: float
    ready_ref: ray.ObjectRef | None = None  # its ping while not yet ready
    ping_after: float = 0.0  # when a ping failed (actor restarting before ready): ask again after this
    ready_at: float | None = None
    removed: float | None = None
    info: dict | None = None  # its ping's answer: name, pid, host
    idle_since: float = 0.0
    active_since: float | None = None  # since when it has had texts in flight
    busy_s: float = 0.0  # time with at least one text in flight
    texts: int = 0  # results it returned


class RewardPool:
    def __init__(
        self,
        make_worker: Callable[[int], ray.actor.ActorHandle],
        num_workers: int,
        timeout_s: float,
        max_attempts: int,
        max_in_flight_per_worker: int = 2,
        autoscale: Any = None,
        control: ray.actor.ActorHandle | None = None,
        metrics: RunMetrics | None = None,
        release: Callable[[ray.actor.ActorHandle], None] | None = None,
    ) -> None:
        """``autoscale``: an ``AutoscaleConfig`` (None: fixed size); ``control``: a ``PoolControl``
        actor; ``metrics``: a ``RunMetrics``; ``release``: how a retired worker is let go once drained
        (default ``ray.kill``)."""
        self._make_worker = make_worker
        self.timeout_s = timeout_s
        self.max_attempts = max_attempts
        self.per_worker = max_in_flight_per_worker
        self.autoscale = autoscale
        self._control = control
        self._metrics = metrics
        self._release = release or ray.kill
        self.workers: dict[int, ray.actor.ActorHandle] = {}  # members: pending, starting, alive, restarting
        self._draining: dict[int, ray.actor.ActorHandle] = {}  # retired, texts still in flight
        self._w: dict[int, _Worker] = {}  # every worker the pool made, removed ones included
        self._next_index = 0
        self._target = 0
        self._queue: deque[_Job] = deque()
        self._in_flight: dict[ray.ObjectRef, _Job] = {}
        self._loads: Counter[int] = Counter()  # texts in flight per worker
        self._done: list[tuple[Hashable, ScoreResult]] = []
        self._recovering: dict[int, tuple[ray.ObjectRef, float]] = {}
        self._no_worker_since: float | None = None  # texts waiting and no alive worker, since (monotonic)
        self._over_since: float | None = None  # queue per worker above target, since
        self._no_wait_since: float | None = time.monotonic()  # no text waiting, since
        self._start_failures = 0  # workers in a row that died before they were ever ready
        self.replaced = 0  # workers replaced after dying for good
        self.busy_seconds: dict[int, float] = {}  # per worker: sum of its texts' times in flight
        self.decisions: deque[dict] = deque(maxlen=100)
        self.scale_ups = self.scale_downs = 0
        self._progress: dict[str, Any] = {}
        self._control_ref: ray.ObjectRef | None = None
        self._control_sent = -1e9
        self._applied_seq = 0
        self._published = -1e9
        self._placement: tuple[float, set[int], set[int]] = (-1e9, set(), set())  # (when, asked, pending)
        self._rates: deque[tuple[float, dict[int, tuple[int, float]]]] = deque()
        self.resize(num_workers, reason="start")

    # ---- membership -------------------------------------------------------------------------
    def resize(self, num_workers: int, reason: str = "resize") -> None:
        """Set the target size: add workers, or retire some (those not yet placed first, then the
        newest); a retired worker's texts in flight finish, then it is released."""
        num_workers = max(0, int(num_workers))
        before = len(self.workers)
        self._target = num_workers
        while len(self.workers) < num_workers:
            self._add()
        while len(self.workers) > num_workers:
            victim = max(self.workers, key=lambda i: (self._w[i].ready_at is None, i in self._recovering, i))
            self._retire(victim)
        if len(self.workers) != before:
            self._decide(before, len(self.workers), reason)

    def _add(self) -> None:
        index = self._next_index
        self._next_index += 1
        handle = self._make_worker(index)
        now = time.monotonic()
        self.workers[index] = handle
        self.busy_seconds[index] = 0.0
        self._w[index] = _Worker(created=now, ready_ref=handle.ping.remote(), idle_since=now)

    def _retire(self, index: int) -> None:
        handle = self.workers.pop(index)
        self._recovering.pop(index, None)
        if self._loads[index]:
            self._draining[index] = handle  # released by _reap once its texts are back
        else:
            self._remove(index, handle)

    def _remove(self, index: int, handle: ray.actor.ActorHandle) -> None:
        self._w[index].removed = time.monotonic()
        self._draining.pop(index, None)
        try:
            self._release(handle)
        except Exception as exc:  # already gone: nothing to release
            log.debug("releasing reward worker %d: %s", index, exc)

    def _reap(self) -> None:
        for index, handle in list(self._draining.items()):
            if not self._loads[index]:
                self._remove(index, handle)

    def _decide(self, before: int, after: int, reason: str) -> None:
        if after > before:
            self.scale_ups += 1
        elif after < before:
            self.scale_downs += 1
        self.decisions.append({"time": time.time(), "from": before, "to": after, "reason": reason})
        log.info("reward pool: %d -> %d workers: %s", before, after, reason)
        self._published = -1e9  # publish the new size at the next chance

    @property
    def target(self) -> int:
        return self._target

    def ready(self, timeout_s: float = 600.0) -> None:
        """Block until every worker has loaded its models (surfaces load errors early), or until at
        least one has and the others only wait for a node to be placed on (they join when one does)."""
        deadline = time.monotonic() + timeout_s
        while True:
            for index in self.workers:
                w = self._w[index]
                if w.ready_at is None and w.ready_ref is None:
                    w.ready_ref = self.workers[index].ping.remote()
            refs = {w.ready_ref: i for i, w in self._w.items() if i in self.workers and w.ready_ref is not None}
            if refs:
                done, _ = ray.wait(list(refs), num_returns=len(refs),
                                   timeout=max(0.0, min(1.0, deadline - time.monotonic())))
                for ref in done:
                    self._mark_ready(refs[ref], ray.get(ref))  # a worker that failed to load raises here
            waiting = [i for i in self.workers if self._w[i].ready_at is None]
            if not waiting:
                return
            if self._alive() and set(waiting) <= self._pending_placement(fresh=True):
                log.warning("reward pool: starting with %d workers; %d wait for resources to be placed (they "
                            "join when a node with room does)", len(self._alive()), len(waiting))
                return
            if time.monotonic() > deadline:
                raise GetTimeoutError(f"{len(waiting)} reward workers not ready after {timeout_s:.0f} s")

    def _mark_ready(self, index: int, info: dict) -> None:
        w = self._w[index]
        now = time.monotonic()
        w.ready_ref, w.ready_at, w.info, w.idle_since = None, now, info, now
        self._start_failures = 0
        info = info if isinstance(info, dict) else {}
        log.info("reward pool: worker %d ready (%s on %s) %.1f s after it was asked for", index,
                 info.get("name", index), info.get("host", "?"), now - w.created)

    def _refresh(self) -> None:
        """Non-blocking: workers that became ready, recovered, or are gone for good."""
        now = time.monotonic()
        starting = {}
        for index in self.workers:
            w = self._w[index]
            if w.ready_at is None and w.ready_ref is None and now >= w.ping_after:
                w.ready_ref = self.workers[index].ping.remote()
            if w.ready_ref is not None:
                starting[w.ready_ref] = index
        if starting:
            done, _ = ray.wait(list(starting), num_returns=len(starting), timeout=0)
            for ref in done:
                index = starting[ref]
                try:
                    self._mark_ready(index, ray.get(ref))
                except ActorDiedError as exc:  # never started: its constructor raised, or its node died
                    self._start_failures += 1
                    cause = short_cause(exc)
                    if self._start_failures >= max(3, self.max_attempts):
                        raise RunFailure(f"reward workers failed to start {self._start_failures} times in a row: "
                                         f"{cause}") from None
                    log.warning("reward worker %d died before it was ready (%s); starting a replacement", index,
                                cause)
                    self._lost(index)
                except RayError:  # restarting before it answered: ask again in a moment
                    self._w[index].ready_ref, self._w[index].ping_after = None, now + 0.5
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
                log.warning("reward worker %d is gone for good (%s); starting a replacement", index,
                            str(exc).splitlines()[0][:200])
                self._lost(index)
            except RayError:  # still restarting: ask again, at most every half second
                if now - sent > 0.5:
                    self._recovering[index] = (self.workers[index].ping.remote(), now)

    def _lost(self, index: int) -> None:
        self.workers.pop(index)
        self._w[index].removed = time.monotonic()
        self.replaced += 1
        while len(self.workers) < self._target:
            self._add()

    def _starting_in_time(self, now: float) -> bool:
        """A worker placed on a node and loading its models, asked for less than ``stall_deadline_s`` ago.

        While one exists the stall deadline does not run (a new or replacement worker gets that long to
        load); a worker waiting for resources (pending placement) does not count."""
        recent = [i for i in self.workers if self._w[i].ready_at is None and i not in self._recovering
                  and now - self._w[i].created < self.stall_deadline_s]
        return bool(recent) and not set(recent) <= self._pending_placement()

    def _alive(self) -> list[int]:
        return [i for i in self.workers if self._w[i].ready_at is not None and i not in self._recovering]

    def _pending_placement(self, fresh: bool = False) -> set[int]:
        """Members whose actor waits for resources, as of at most a few seconds ago: the GCS has not
        given it a worker process, and no node has the CPUs / GPUs / custom resources it asks for free."""
        now = time.monotonic()
        unready = {i for i in self.workers if self._w[i].ready_at is None}
        checked_at, checked, pending = self._placement
        if not fresh and checked == unready and now - checked_at < PLACEMENT_CACHE_S:
            return pending
        pending = set()
        if unready:
            # The GCS tables directly: the public state API needs the dashboard, which a private cluster lacks.
            from ray._private.state import state
            from ray.core.generated import gcs_pb2

            try:
                accessor = state._connect_and_get_accessor()
                free = list(state.available_resources_per_node().values())
                for index in unready:
                    blob = accessor.get_actor_info(self.workers[index]._actor_id)
                    if not blob:  # not registered yet
                        pending.add(index)
                        continue
                    actor = gcs_pb2.ActorTableData.FromString(blob)
                    if gcs_pb2.ActorTableData.ActorState.Name(actor.state) in PLACEMENT_PENDING and not actor.pid:
                        need = dict(actor.required_resources)
                        if not any(all(node.get(k, 0.0) >= v for k, v in need.items()) for node in free):
                            pending.add(index)
            except Exception as exc:  # no answer from the GCS: count them as starting
                log.debug("placement state of reward workers: %s", exc)
        self._placement = (now, unready, pending)
        return pending

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

    @property
    def waiting(self) -> int:
        """Texts waiting for a worker: in the pool's queue, or queued on an actor behind its running call."""
        return len(self._queue) + sum(max(0, n - 1) for n in self._loads.values())

    def pending(self) -> int:
        return len(self._queue) + len(self._in_flight) + len(self._done)

    def _load(self, index: int) -> int:
        return self._loads[index]

    def _mark_unhealthy(self, index: int) -> None:
        """Hold texts back from a worker that failed until it answers a ping again (Ray restarts it)."""
        if index in self.workers and index not in self._recovering:
            self._recovering[index] = (self.workers[index].ping.remote(), time.monotonic())

    def _healthy(self) -> list[int]:
        self._refresh()
        return self._alive()

    @property
    def stall_deadline_s(self) -> float:
        """How long texts may wait while no worker is alive: every attempt's timeout."""
        return self.timeout_s * self.max_attempts

    def _dispatch(self) -> None:
        if not self._queue:
            return
        healthy = self._healthy()
        if not healthy:
            now = time.monotonic()
            if self._starting_in_time(now):  # placed and loading its models: texts wait for it, no deadline yet
                self._no_worker_since = None
                return
            if self._no_worker_since is None:
                self._no_worker_since = now
            elif now - self._no_worker_since > self.stall_deadline_s:
                raise RewardPoolStalled(
                    f"no reward worker has been healthy for {now - self._no_worker_since:.0f} s "
                    f"(reward.timeout_s x reward.max_attempts = {self.stall_deadline_s:.0f} s) while "
                    f"{len(self._queue)} texts waited; {len(self.workers)} workers restarting or unplaceable "
                    f"({len(self._pending_placement())} waiting for resources; lost node? missing resources? "
                    "see `ray status`)")
            return
        self._no_worker_since = None
        # A text sent to a busy worker waits in that actor's queue, where no other worker can take it. While
        # the pool changes size (autoscaling, or workers still starting) texts wait in the pool's own queue
        # instead, for whichever worker is free first, a new one included; a fixed, ready pool keeps
        # per_worker in flight to hide the round trip.
        growing = self.autoscale is not None or len(healthy) < len(self.workers)
        cap = 1 if growing else self.per_worker
        while self._queue:
            # Least loaded, but never back to the worker this text just failed or timed out on while
            # another exists (it may be restarting or still stuck in the old call).
            index = min(healthy, key=lambda i: (i == self._queue[0].worker, self._loads[i]))
            if self._loads[index] >= cap:
                return
            job = self._queue.popleft()
            job.worker, job.started = index, time.monotonic()
            # Calls on one actor run in turn: a text queued behind others gets their time too.
            job.deadline = job.started + self.timeout_s * (1 + self._loads[index])
            self._in_flight[self.workers[index].score.remote(job.text)] = job
            self._loads[index] += 1
            w = self._w[index]
            if w.active_since is None:
                w.active_since = job.started

    def _take(self, ref: ray.ObjectRef, now: float) -> _Job:
        """Remove a call from the in-flight set, keeping each worker's load and busy time."""
        job = self._in_flight.pop(ref)
        self._loads[job.worker] -= 1
        if self._loads[job.worker] <= 0:
            del self._loads[job.worker]
            w = self._w.get(job.worker)
            if w is not None and w.active_since is not None:
                w.busy_s += now - w.active_since
                w.active_since, w.idle_since = None, now
        return job

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
                job = self._take(ref, now)
                self.busy_seconds[job.worker] = self.busy_seconds.get(job.worker, 0.0) + now - job.started
                try:
                    result: ScoreResult = ray.get(ref, timeout=self.timeout_s)
                except (RayError, GetTimeoutError) as exc:  # worker died, task raised, or cancelled
                    self._mark_unhealthy(job.worker)
                    if job.spared:  # lost to the restart of its worker for another text: again, same attempt
                        job.spared = False
                        self._queue.appendleft(job)
                        continue
                    self._retry_or_fail(job, f"{type(exc).__name__} on worker {job.worker}: {str(exc)[:300]}")
                    continue
                self._w[job.worker].texts += 1
                if result.status == "failed":  # a stage raised on a live worker: another worker may succeed
                    self._retry_or_fail(job, f"failed on worker {job.worker}: {(result.error or '')[:300]}", result)
                    continue
                result.attempts = job.attempt
                self._done.append((job.key, result))
            for ref, job in list(self._in_flight.items()):
                if now > job.deadline:
                    self._take(ref, now)
                    # A running actor call cannot be cancelled: restart the stuck worker instead (its
                    # other in-flight texts fail over and are retried elsewhere).
                    if job.worker in self.workers:
                        ray.kill(self.workers[job.worker], no_restart=False)
                        self._mark_unhealthy(job.worker)
                    elif job.worker in self._draining:
                        ray.kill(self._draining[job.worker], no_restart=True)
                    for other in self._in_flight.values():
                        other.spared = other.spared or other.worker == job.worker
                    self._retry_or_fail(job, f"timeout after {self.timeout_s:.0f}s on worker {job.worker}")
            self._reap()
            self._dispatch()
        elif not self._done:
            time.sleep(min(timeout_s, 0.1))  # texts queued but no healthy worker yet: don't spin
        self.maintain()
        done, self._done = self._done, []
        return done

    def results(self, timeout_s: float = 1.0) -> Iterator[tuple[Hashable, ScoreResult]]:
        """Yield every pending result as it completes, until nothing is left."""
        while self.pending():
            yield from self.poll(timeout_s)

    # ---- size: requests, autoscaling, status ------------------------------------------------------
    def maintain(self) -> None:
        """Non-blocking upkeep (``poll`` runs it; the driver also once per step): workers that became
        ready, drained workers released, size requests applied, the autoscaler's decision, status
        published."""
        self._refresh()
        self._reap()
        self._sync_control()
        self._autoscale()
        self._dispatch()
        self._publish()

    def report_progress(self, **progress: Any) -> None:
        """The driver's step, steps and ETA, shown by ``brainloop status``; published at once."""
        self._progress = {**progress, "time": time.time()}
        self._published = -1e9
        self.maintain()

    def set_autoscale(self, autoscale: Any) -> None:
        """Turn autoscaling on (an ``AutoscaleConfig``), change its settings, or turn it off (None)."""
        self.autoscale = autoscale
        self._over_since = None
        if autoscale is not None:
            bounded = min(max(len(self.workers), autoscale.min_workers), autoscale.max_workers)
            if bounded != len(self.workers):
                self.resize(bounded, reason=f"autoscale bounds [{autoscale.min_workers}, {autoscale.max_workers}]")

    def _autoscale(self) -> None:
        a = self.autoscale
        now = time.monotonic()
        waiting = self.waiting
        if waiting:
            self._no_wait_since = None
        elif self._no_wait_since is None:
            self._no_wait_since = now
        if a is None:
            return
        members = len(self.workers)
        per_worker = waiting / max(1, members)
        if per_worker > a.target_queue_per_worker and members < a.max_workers:
            if self._over_since is None:
                self._over_since = now
            if now - self._over_since >= a.up_after_s:
                self.resize(members + 1, reason=f"queue per worker {per_worker:.2f} > target "
                            f"{a.target_queue_per_worker:g} for {now - self._over_since:.1f} s "
                            f"(up_after_s {a.up_after_s:g}; {waiting} texts waiting)")
                self._over_since = now  # another up_after_s before the next one
            return
        self._over_since = None
        if waiting or members <= a.min_workers:
            return
        idle = []
        for index in self.workers:
            w = self._w[index]
            if w.ready_at is None:  # not placed or still loading: idle since the pool last had texts waiting
                since = max(w.created, self._no_wait_since or now)
            elif not self._loads[index] and index not in self._recovering:
                since = w.idle_since
            else:
                continue
            if now - since >= a.down_after_idle_s:
                idle.append((w.ready_at is not None, since, index))
        alive = len(self._alive())
        for placed, since, index in sorted(idle)[: members - a.min_workers]:  # not yet placed first, then longest idle
            if placed and alive <= 1:
                break  # never the last worker that can score while others are still starting
            alive -= placed
            before = len(self.workers)
            self._retire(index)
            self._target = len(self.workers)
            self._decide(before, self._target, f"worker {index} idle for {now - since:.1f} s >= down_after_idle_s "
                                               f"{a.down_after_idle_s:g}")

    def _sync_control(self) -> None:
        """Read the control actor's answer to the last snapshot, if it has come: the newest size request."""
        if self._control is None or self._control_ref is None:
            return
        ready, _ = ray.wait([self._control_ref], timeout=0)
        if not ready:
            if time.monotonic() - self._control_sent > 60:
                log.warning("reward pool: the control actor has not answered for 60 s; asking again")
                self._control_ref = None
            return
        ref, self._control_ref = self._control_ref, None
        try:
            request = ray.get(ref)
        except RayError as exc:
            log.warning("reward pool: control actor failed (%s); live scaling is off for this run", short_cause(exc))
            self._control = None
            return
        if request and request["seq"] > self._applied_seq:
            self._apply_request(request)

    def _apply_request(self, request: dict) -> None:
        self._applied_seq = request["seq"]
        target, a = request["target"], self.autoscale
        if a is not None:
            target = min(max(target, a.min_workers), a.max_workers)
        reason = f"requested by hand ({request.get('source', '?')}): {request['requested']} workers"
        if target != request["requested"]:
            reason += f", clamped to autoscale [{a.min_workers}, {a.max_workers}]" if a else ""
        # The autoscaler goes on from the new size: idle clocks restart, so it keeps at least down_after_idle_s.
        now = time.monotonic()
        self._over_since, self._no_wait_since = None, now
        for index in self._alive():
            if not self._loads[index]:
                self._w[index].idle_since = now
        if target == len(self.workers):
            log.info("reward pool: %s; already %d workers", reason, target)
            return
        self.resize(target, reason=reason)

    def _publish(self) -> None:
        """Metrics and a snapshot to the control actor (one call at a time, never waited for), at most every
        STATUS_PERIOD_S, and at once after a decision."""
        now = time.monotonic()
        if now - self._published < STATUS_PERIOD_S:
            return
        self._published = now
        s = self.status()
        if self._metrics is not None:
            self._metrics.set({
                "pool_target_workers": s["target"], "pool_alive_workers": s["alive"],
                "pool_pending_workers": s["pending"], "pool_starting_workers": s["starting"],
                "pool_restarting_workers": s["restarting"], "pool_draining_workers": s["draining"],
                "pool_waiting_texts": s["waiting"], "pool_queue_per_worker": s["queue_per_worker"],
                "queue_depth": s["queued"], "in_flight": s["in_flight"], "pool_worker_seconds": s["worker_seconds"],
                "pool_scale_ups": self.scale_ups, "pool_scale_downs": self.scale_downs})
        if self._control is not None and self._control_ref is None:
            self._control_ref = self._control.sync.remote(s)
            self._control_sent = now

    def worker_seconds(self) -> float:
        """Seconds each worker actor existed (from the request to its release), summed: what the pool cost."""
        now = time.monotonic()
        return sum((w.removed if w.removed is not None else now) - w.created for w in self._w.values())

    def status(self) -> dict[str, Any]:
        """A snapshot: sizes by state, queue, in flight, per-worker texts/s and utilisation (over about the
        last minute), recent decisions, the driver's progress."""
        now = time.monotonic()
        placement = self._pending_placement()
        counters = {}
        for index, w in self._w.items():
            if w.removed is None:
                busy = w.busy_s + (now - w.active_since if w.active_since is not None else 0.0)
                counters[index] = (w.texts, busy)
        self._rates.append((now, counters))
        while len(self._rates) > 2 and now - self._rates[1][0] >= RATE_WINDOW_S:
            self._rates.popleft()
        base_t, base = self._rates[0]
        workers = []
        for index, w in sorted(self._w.items()):
            if w.removed is not None:
                continue
            state = ("draining" if index in self._draining else "restarting" if index in self._recovering
                     else "alive" if w.ready_at is not None else "pending" if index in placement else "starting")
            info = w.info if isinstance(w.info, dict) else {}
            row = {"index": index, "state": state, "in_flight": self._loads[index], "texts": w.texts,
                   "name": info.get("name", f"#{index}"), "host": info.get("host"), "age_s": now - w.created}
            if w.ready_at is not None:
                t0 = max(base_t, w.ready_at)
                texts0, busy0 = base.get(index, (0, 0.0)) if base_t >= w.ready_at else (0, 0.0)
                span = now - t0
                texts1, busy1 = counters[index]
                row["texts_per_s"] = (texts1 - texts0) / span if span > 0.5 else None
                row["utilisation"] = min(1.0, (busy1 - busy0) / span) if span > 0.5 else None
                row["idle_s"] = now - w.idle_since if not self._loads[index] else 0.0
            workers.append(row)
        states = Counter(r["state"] for r in workers)
        a = self.autoscale
        return {
            "target": self._target, "alive": states["alive"], "pending": states["pending"],
            "starting": states["starting"], "restarting": states["restarting"], "draining": states["draining"],
            "queued": len(self._queue), "waiting": self.waiting, "in_flight": len(self._in_flight),
            "queue_per_worker": self.waiting / max(1, len(self.workers)),
            "autoscale": None if a is None else {k: getattr(a, k) for k in (
                "min_workers", "max_workers", "target_queue_per_worker", "up_after_s", "down_after_idle_s")},
            "workers": workers, "decisions": list(self.decisions)[-10:], "applied_seq": self._applied_seq,
            "replaced": self.replaced, "worker_seconds": self.worker_seconds(), "progress": self._progress,
            "time": time.time(),
        }

    def close(self) -> None:
        for ref in list(self._in_flight):
            ray.cancel(ref, force=False)
        self._in_flight.clear()
        self._loads.clear()
        now = time.monotonic()
        for index, worker in [*self.workers.items(), *self._draining.items()]:
            self._w[index].removed = now
            try:
                self._release(worker)
            except Exception as exc:
                log.debug("releasing reward worker %d: %s", index, exc)
        self.workers.clear()
        self._draining.clear()
