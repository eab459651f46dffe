"""Monitoring on a real local Ray cluster with its dashboard: the Prometheus endpoint carries
brainloop's metrics with sensible values during a run, and the dashboard's state API lists the
loop's named actors."""

from __future__ import annotations

import re
import threading
import time
import urllib.request

import pytest

from brainloop.driver import Loop
from tests.conftest import METRICS_PORT
from tests.loop_helpers import small_config

pytestmark = pytest.mark.slow


RUN = "monitored"  # the shared test cluster still exports the gauges of earlier modules' runs ("e2e")
# Each metric comes from the role that does the work (brainloop.metrics), not from the driver.
WANTED = (("reward_mean", "driver"), ("roi_broca", "driver"), ("kl_per_token", "learner"), ("grad_norm", "learner"),
          ("lr", "learner"), ("tokens_per_second", "sampler"), ("sampler_generate_seconds_count", "sampler"),
          ("pool_alive_workers", "reward-pool"), ("reward_stage_seconds_count", "reward-worker"),
          ("reward_text_seconds_count", "reward-worker"))


def scrape() -> dict[str, list[tuple[str, float]]]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=10).read().decode()
    found: dict[str, list[tuple[str, float]]] = {}
    for line in text.splitlines():
        match = re.match(r"^(ray_brainloop_\w+?)(\{.*\})?\s+([-+0-9.eEinfNa]+)$", line)
        if match and f'run="{RUN}"' in (match.group(2) or ""):
            found.setdefault(match.group(1), []).append((match.group(2) or "", float(match.group(3))))
    return found


def test_metrics_endpoint_and_named_actors_during_a_run(ray_cluster, tmp_path):
    from ray.util.state import list_actors

    # This cluster's own dashboard (another Ray head on the machine must not answer for it).
    dashboard = "http://" + ray_cluster.dashboard_url
    loop = Loop(small_config(4, run={"name": RUN}), tmp_path / "monitored")
    seen: dict = {}
    actors: list = []

    def watch() -> None:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and not all(f"ray_brainloop_{m}" in seen for m, _ in WANTED):
            time.sleep(2)
            try:
                seen.update(scrape())
                alive = list_actors(address=dashboard, filters=[("state", "=", "ALIVE")])
                actors.extend(a for a in alive if a.name and a.name not in {b.name for b in actors})
            except Exception:  # endpoint not up yet, or a state-API timeout: try again
                continue

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        loop.run()
        watcher.join(timeout=60)  # metrics are exported every few seconds: allow the last report
    finally:
        loop.close()
    names = {a.name for a in actors}
    assert {"sampler", "learner", "reward-worker-0", "reward-worker-1"} <= names, names
    for metric, role in WANTED:
        assert f"ray_brainloop_{metric}" in seen, (metric, sorted(seen))
        assert all(f'role="{role}"' in tags for tags, _ in seen[f"ray_brainloop_{metric}"]), (metric, seen)
    tags, value = seen["ray_brainloop_reward_mean"][0]
    assert f'run="{RUN}"' in tags and -1.0 < value < 1.0
    assert all(v > 0 for _, v in seen["ray_brainloop_tokens_per_second"])
    assert {'stage="tts"' in tags for tags, _ in seen["ray_brainloop_reward_stage_seconds_count"]} == {True, False}
    assert all(v > 0 for _, v in seen["ray_brainloop_lr"])
    assert all(v >= 0 for _, v in seen["ray_brainloop_kl_per_token"])
    assert any(name.startswith("ray_brainloop_reward_stage_seconds") for name in seen)
