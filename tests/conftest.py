"""Fixtures shared by the test modules.

One local Ray cluster serves every test module that asks for ``ray_cluster`` (started at the first,
stopped at the end of the session): starting a cluster costs seconds of this machine's two cores per
module. Sharing it is safe only if each module leaves it as it found it, so the fixture checks that at
the end of each module: every CPU free again (no actor or placement group left behind), else the
module fails with what was left and the cluster is restarted for the next one.
The tests that need a cluster of their own (a ``ray start`` head with token auth, a second node, a
private cluster of the job entrypoint) start it in a subprocess and never touch this one.
"""

from __future__ import annotations

import os
import random
import socket
import time

import pytest
import ray

# What the reward workers and the sampler need from the test's environment (offline hub, atlas, caches).
ENV_KEYS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "NILEARN_DATA", "BRAINLOOP_CACHE", "HF_HOME")
CPUS = 4  # sampler + learner + two reward workers, as the demo config asks (logical CPUs, not cores)


def _free_ports(count: int, low: int = 18200, high: int = 19000) -> list[int]:
    """``count`` ports free now on 127.0.0.1, from a range below the kernel's ephemeral ports (where
    other tests' fixed ports live), starting at a random place: two pytest sessions on one machine
    get different ports."""
    start = random.randrange(low, high)
    found: list[int] = []
    for port in (low + (start - low + i) % (high - low) for i in range(high - low)):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        found.append(port)
        if len(found) == count:
            return found
    raise RuntimeError(f"no {count} free ports in [{low}, {high})")


# tests/test_monitoring.py reads this session's dashboard and metrics endpoint.
DASHBOARD_PORT, METRICS_PORT = _free_ports(2)


def _start() -> ray.runtime_context.RuntimeContext:
    env = {k: v for k, v in os.environ.items() if k in ENV_KEYS}
    env.setdefault("HF_HUB_OFFLINE", "1")
    # address="local": our own cluster, never a head someone else started on this machine.
    return ray.init(address="local", num_cpus=CPUS, namespace="brainloop-tests", include_dashboard=True,
                    dashboard_host="127.0.0.1", dashboard_port=DASHBOARD_PORT, _metrics_export_port=METRICS_PORT,
                    log_to_driver=False, runtime_env={"env_vars": env})


_context: list = []  # the running cluster's context, when one runs


def _wait_until_idle(timeout_s: float = 60.0) -> float:
    """Free CPUs once the module's actors are gone (ray.kill and placement-group removal are asynchronous)."""
    deadline = time.monotonic() + timeout_s
    while True:
        free = ray.available_resources().get("CPU", 0.0)
        if free >= CPUS or time.monotonic() > deadline:
            return free
        time.sleep(0.5)


@pytest.fixture(scope="module")
def ray_cluster():
    if not ray.is_initialized():
        _context[:] = [_start()]
    yield _context[0]
    free = _wait_until_idle()
    if free < CPUS:
        ray.shutdown()  # the next module gets a clean cluster
        pytest.fail(f"the module left actors or placement groups holding {CPUS - free:g} of {CPUS} CPUs "
                    "on the shared test cluster: kill what it starts (ray.kill / Loop.close)")


@pytest.fixture(scope="session", autouse=True)
def _shutdown_shared_ray():
    yield
    if ray.is_initialized():
        ray.shutdown()
