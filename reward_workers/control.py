"""Live control of a running job's reward pool: a small named actor between the driver and the CLI.

The driver creates one ``PoolControl`` per run, named ``<run>-pool-control`` in the job's namespace
(``brainloop-<run>`` under ``ray job submit``). It holds two things and does no work of its own:

- the newest *requested target* (``brainloop scale RUN --reward-workers N`` calls ``request``),
  clamped to the autoscaler's [min_workers, max_workers] when autoscaling is on;
- the pool's newest *status snapshot* (target, alive, pending placement, restarting, queue, in
  flight, per-worker rates, the driver's step and ETA), which ``brainloop status RUN`` reads.

The pool talks to it with one non-blocking call about once a second (``sync``: its status out, the
newest request back), so a slow or dead control actor never holds up scoring. The actor belongs to
the job's driver: it dies with the job, so a run that is not running has no control actor.
"""

from __future__ import annotations

import time
from typing import Any

import ray

SUFFIX = "-pool-control"


def control_name(run: str) -> str:
    return f"{run}{SUFFIX}"


class PoolControl:
    def __init__(self, run: str, bounds: tuple[int, int] | None = None) -> None:
        self.run = run
        self.bounds = tuple(bounds) if bounds else None
        self._seq = 0
        self._request: dict[str, Any] | None = None
        self._status: dict[str, Any] = {}
        self._published_at: float | None = None

    def request(self, workers: int, source: str = "cli") -> dict[str, Any]:
        """Ask the pool for ``workers`` workers; returns the request as the pool will see it."""
        workers = int(workers)
        if workers < 1:
            raise ValueError(f"a reward pool needs at least 1 worker, not {workers}")
        target = workers
        if self.bounds is not None:
            target = min(max(workers, self.bounds[0]), self.bounds[1])
        self._seq += 1
        self._request = {"seq": self._seq, "target": target, "requested": workers, "clamped": target != workers,
                         "bounds": list(self.bounds) if self.bounds else None, "source": source, "time": time.time()}
        return dict(self._request)

    def sync(self, status: dict[str, Any]) -> dict[str, Any] | None:
        """The pool's call: publish its status; get the newest request back (the pool applies each seq once)."""
        self._status = status
        self._published_at = time.time()
        autoscale = status.get("autoscale")
        self.bounds = (autoscale["min_workers"], autoscale["max_workers"]) if autoscale else None
        return self._request

    def status(self) -> dict[str, Any]:
        return {"run": self.run, "pool": self._status, "published_at": self._published_at,
                "request": self._request, "bounds": list(self.bounds) if self.bounds else None, "now": time.time()}


def start_control(run: str, bounds: tuple[int, int] | None = None) -> ray.actor.ActorHandle:
    """The run's control actor, named in the current namespace; owned by (and dying with) this driver."""
    return ray.remote(PoolControl).options(name=control_name(run), num_cpus=0, max_restarts=0).remote(run, bounds)


def find_control(run: str) -> tuple[ray.actor.ActorHandle, str] | None:
    """The control actor of a running job named ``run``, in any namespace (the job's own first)."""
    found = [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"] == control_name(run)]
    if not found:
        return None
    found.sort(key=lambda a: a["namespace"] != f"brainloop-{run}")
    namespace = found[0]["namespace"]
    try:
        return ray.get_actor(control_name(run), namespace=namespace), namespace
    except ValueError:  # its job ended between the listing and the lookup
        return None


def running_runs() -> list[str]:
    """Run names that have a control actor on the cluster (jobs running now)."""
    return sorted({a["name"][: -len(SUFFIX)] for a in ray.util.list_named_actors(all_namespaces=True)
                   if a["name"].endswith(SUFFIX)})
