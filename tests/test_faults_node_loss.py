"""A whole Ray node lost mid-run, on a real two-node cluster on this machine.

The head (``scripts/ray_local.sh`` with ``BRAINLOOP_RAY_LOOPBACK=0``, so that other nodes can join)
holds the sampler and the learner; a second node, started with ``ray start --address ... --resources
'{"reward_node": 2}'``, holds the two reward workers (``reward.resources: {reward_node: 1}``). While
texts of step 2 are in flight, that node's raylet is killed with SIGKILL; its workers die with it. A
replacement node joins (as an autoscaler would bring one) and Ray restarts the workers there while
the pool holds the texts (within ``reward.timeout_s x max_attempts``). The run finishes with every
(step, prompt, sample) scored exactly once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest
import ray

from tests.loop_helpers import KEY, rollouts, small_config
from tests.ray_heads import head_env, local_head

ROOT = Path(__file__).parents[1]
GCS_PORT = "6690"
PORTS = {"BRAINLOOP_RAY_PORT": GCS_PORT, "BRAINLOOP_DASHBOARD_PORT": "8565", "BRAINLOOP_AGENT_PORT": "52690",
         "BRAINLOOP_METRICS_PORT": "8390", "BRAINLOOP_CLIENT_PORT": "20690", "BRAINLOOP_RAY_CPUS": "2"}

pytestmark = pytest.mark.slow


def cluster_env() -> dict[str, str]:
    # Faster node-death detection than Ray's default (about 30 s) keeps the test short; same mechanism.
    # The head carries policy_node (as in ray_cluster.yaml): the sampler's and learner's bundles go there,
    # never onto the reward node.
    return head_env(PORTS, BRAINLOOP_RAY_LOOPBACK="0", BRAINLOOP_RAY_RESOURCES='{"policy_node": 1}',
                    RAY_health_check_period_ms="1000", RAY_health_check_failure_threshold="5")


def start_reward_node(env: dict[str, str], agent_port: int) -> None:
    """``ray start --address`` of a node with the reward workers' custom resource, marked as this head's
    (ray_local.sh stop then stops it too)."""
    subprocess.run(["ray", "start", "--address", f"127.0.0.1:{GCS_PORT}", "--num-cpus", "2", "--resources",
                    '{"reward_node": 2}', "--dashboard-agent-listen-port", str(agent_port), "--metrics-export-port",
                    str(agent_port + 1), "--disable-usage-stats"],
                   cwd=ROOT, env={**env, "BRAINLOOP_RAY_HEAD": GCS_PORT}, check=True, timeout=180,
                   capture_output=True)


def reward_node_raylets() -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["pid", "name", "cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if proc.info["name"] == "raylet" and "reward_node" in cmd and f":{GCS_PORT}" in cmd:
            found.append(proc)
    return found


@pytest.fixture(scope="module")
def two_nodes():
    with local_head(cluster_env()) as env:
        start_reward_node(env, 52691)
        yield env


def run_scenario(run_dir: str) -> dict:
    """The driver side, run in its own process (``python -c``): it connects with RAY_AUTH_MODE=token in its
    environment, which this test process must not set for the other test modules. Kills the reward node
    while texts of step 2 are in flight, then brings a replacement node."""
    from brainloop.driver import Loop

    ray.init(address=f"127.0.0.1:{GCS_PORT}", namespace="brainloop-nodeloss", log_to_driver=False)
    cfg = small_config(4, run={"name": "nodeloss"},
                       sampler={"resources": {"policy_node": 0.01}}, learner={"resources": {"policy_node": 0.01}},
                       reward={"resources": {"reward_node": 1}, "timeout_s": 90, "max_attempts": 3})
    loop = Loop(cfg, Path(run_dir))
    events: dict[str, float] = {}
    [raylet] = reward_node_raylets()
    killed_node = next(a.split("=", 1)[1] for a in raylet.cmdline() if a.startswith("--node_id="))

    def kill_node_then_replace() -> None:
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            pool = getattr(loop, "pool", None)
            if (Path(run_dir) / "rollouts" / "step_000000.parquet").exists() and pool is not None and pool.in_flight:
                events["in_flight_at_kill"] = pool.in_flight
                os.kill(raylet.pid, signal.SIGKILL)
                events["killed"] = time.time()
                time.sleep(5)
                start_reward_node(cluster_env(), 52693)  # the replacement node
                events["replacement_joined"] = time.time()
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_node_then_replace, daemon=True)
    killer.start()
    try:
        summary = loop.run()
    finally:
        loop.close()
        killer.join(timeout=200)
    states = {n["NodeID"]: n["Alive"] for n in ray.nodes()}
    return {"events": events, "summary": summary, "killed_node_alive": states.get(killed_node),
            "alive_reward_nodes": sum(alive for n, alive in states.items() if n != killed_node) - 1}


def test_reward_node_lost_mid_run_every_sample_scored_once(two_nodes, tmp_path):
    run_dir = tmp_path / "nodeloss"
    script = ("import json, sys\nfrom tests.test_faults_node_loss import run_scenario\n"
              "print('RESULT ' + json.dumps(run_scenario(sys.argv[1])), flush=True)\n")
    out = subprocess.run([sys.executable, "-c", script, str(run_dir)], cwd=ROOT, env=two_nodes,
                         capture_output=True, text=True, timeout=1500)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    result = json.loads(out.stdout.split("RESULT ", 1)[1].splitlines()[0])
    events, summary = result["events"], result["summary"]
    assert {"killed", "replacement_joined"} <= set(events), events
    assert result["killed_node_alive"] is False, "the GCS should report the killed node dead"
    assert result["alive_reward_nodes"] == 1  # the replacement (the other alive node is the head)
    rows = rollouts(run_dir)
    expected = pd.DataFrame([(s, p, i) for s in range(4) for p in range(2) for i in range(2)], columns=KEY)
    pd.testing.assert_frame_equal(rows[KEY], expected, check_dtype=False)  # every (step, prompt, sample) once
    assert summary["steps"] == 4 and summary["adapter_version"] == 4
    assert (rows["status"] == "ok").all(), rows[["step", "status", "error"]]
    lost = rows[rows["reward_attempts"] > 1]
    assert len(lost) >= 1  # the texts in flight on the lost node were scored again
    assert (lost["scored_at"] > events["replacement_joined"]).all()  # on the replacement node
    assert (rows.loc[rows.step == 0, "scored_at"] < events["killed"]).all()
