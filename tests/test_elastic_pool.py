"""The elastic reward pool on a real Ray cluster on this machine: hand scaling through the run's
``PoolControl`` actor, autoscaling by queue, a worker pending for a resource until a node with it
joins, and ``brainloop scale`` / ``brainloop status`` against the running pool.

The head is started the way the demo starts it (``scripts/ray_local.sh``: token auth, its own ports),
but joinable (``BRAINLOOP_RAY_LOOPBACK=0``) and with one ``reward_node`` resource. The workers are
real ``RewardWorker`` actors (the demo pipeline) with ``simulated_latency_s`` per text standing in for
GPU time. The driver side runs in its own process (``python -c``, like test_faults_node_loss.py): it
joins that head with token auth, which the shared test cluster of this process must not see. It
writes what it observed as JSON; each test below checks one part of it.

Scenarios, in order, on two pre-loaded workers (loading one costs half a minute on two cores):
1. hand: 12 keys streaming through a pool of 1; ``PoolControl.request(2)`` after the first result,
   ``request(1)`` later while the second worker still has texts in flight (drained, not killed);
2. autoscale [1, 2]: a queue grows the pool to 2 (never 3), idleness shrinks it to 1 (never 0);
   ``brainloop scale`` asks for 5 and is clamped to 2;
3. pending: the first worker holds the head's only ``reward_node``; ``brainloop scale`` asks for a
   second worker that needs one: it stays pending while the first keeps scoring; a second node with
   ``reward_node`` joins (``ray start --address``) and the pending worker is placed there and scores.
   ``brainloop status`` shows it pending, then alive; wrong run name, unreachable cluster and a
   stopped job are exit 2 with one line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from brainloop.metrics import RunMetrics
from tests.conftest import ENV_KEYS
from tests.ray_heads import head_env, local_head

ROOT = Path(__file__).parents[1]
CONFIG = ROOT / "configs" / "demo.yaml"
GCS_PORT = "6790"
UNUSED_GCS = "6890"  # nothing listens there: the unreachable-cluster case
PORTS = {"BRAINLOOP_RAY_PORT": GCS_PORT, "BRAINLOOP_DASHBOARD_PORT": "8665", "BRAINLOOP_AGENT_PORT": "52790",
         "BRAINLOOP_METRICS_PORT": "8590", "BRAINLOOP_CLIENT_PORT": "20790", "BRAINLOOP_RAY_CPUS": "4"}
NODE_PORTS = (52890, 8690)  # the joining node's dashboard agent and metrics ports
LATENCY_S = 1.0  # simulated GPU seconds per text, after the real stages
TEXTS = [
    "The lighthouse keeper climbed the stairs every evening at six.",
    "Rain fell on the market, and the traders pulled their awnings down.",
    "She counted the steps twice, then decided to take the lift instead.",
    "Bees return to the hive by the angle of the sun, even on cloudy days.",
    "The bridge was painted red so that ships could see it through the fog.",
    "Nobody in the village remembered who had planted the old chestnut tree.",
]

pytestmark = pytest.mark.slow


# ---- the driver side (runs in its own process) ----------------------------------------------------------


class _Recorder(RunMetrics):
    """The pool's RunMetrics, keeping what it exports (names still checked against the documented set)."""

    def __init__(self) -> None:
        super().__init__("elastic", "reward-pool")
        self.seen: dict[str, float] = {}

    def set(self, values: dict) -> None:
        for name in values:
            self._spec(name, "gauge")
        self.seen.update({k: float(v) for k, v in values.items()})


def _cli(pool, args: list[str], env: dict[str, str]) -> dict:
    """``brainloop ARGS`` in a subprocess while this process keeps polling the pool (the pool answers the
    control actor only while it is polled, as the driver does while it scores)."""
    proc = subprocess.Popen([sys.executable, "-m", "brainloop.cli", *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    results = []
    while proc.poll() is None:
        results += pool.poll(0.2) if pool is not None else []
        time.sleep(0.05)
    out, err = proc.communicate()
    return {"args": args, "rc": proc.returncode, "out": out, "err": err, "results": results}


def _row(key, result, t: float) -> dict:
    return {"key": list(key), "worker": result.worker, "status": result.status, "attempts": result.attempts,
            "at": t}


def scenario(out_path: str) -> None:
    import ray

    from brainloop.config import AutoscaleConfig, load_config
    from reward_workers.control import start_control
    from reward_workers.pool import RewardPool
    from reward_workers.worker import RewardWorker

    env = {k: v for k, v in os.environ.items() if k in ENV_KEYS}
    ray.init(address=f"127.0.0.1:{GCS_PORT}", namespace="brainloop-elastic", log_to_driver=False,
             runtime_env={"env_vars": env})
    reward = load_config(CONFIG).reward
    pipeline = {**reward.pipeline.model_dump(), "simulated_latency_s": LATENCY_S}
    spec = reward.spec.model_dump(mode="json")
    # No RAY_AUTH_MODE for the CLI: it finds the token itself.
    cli_env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    address = ["--address", f"127.0.0.1:{GCS_PORT}"]
    out: dict = {}

    def real(name: str, **options):
        return ray.remote(RewardWorker).options(num_cpus=1, max_restarts=-1, **options).remote(
            pipeline, spec, name, False, None)

    t0 = time.time()
    # warm-0 holds the head's only reward_node (scenario 3); warm-1 needs none.
    warm = [real("warm-0", resources={"reward_node": 1}), real("warm-1")]
    ray.get([w.ping.remote() for w in warm], timeout=600)
    out["warm_load_s"] = time.time() - t0

    # 1. hand scale up and down mid-stream through the control actor --------------------------------
    control = start_control("elastic-hand")
    released: list[tuple[str, float]] = []
    pool = RewardPool(lambda i: warm[i], 1, timeout_s=180, max_attempts=3, control=control,
                      release=lambda h: released.append((ray.get(h.ping.remote())["name"], time.time())))
    pool.ready()
    keys = [(s, p, i) for s in range(3) for p in range(2) for i in range(2)]
    for n, key in enumerate(keys):
        pool.submit(key, TEXTS[n % len(TEXTS)])
    rows, sizes, asked, draining = [], [], [], []
    deadline = time.monotonic() + 300
    while pool.pending() and time.monotonic() < deadline:
        rows += [_row(k, r, time.time()) for k, r in pool.poll(0.3)]
        sizes.append(len(pool.workers))
        draining += [w["in_flight"] for w in pool.status()["workers"] if w["state"] == "draining"]
        if len(rows) >= 1 and not asked:
            asked.append(ray.get(control.request.remote(2, source="test")))
        elif len(rows) >= 6 and len(asked) == 1 and len(pool.workers) == 2:
            asked.append(ray.get(control.request.remote(1, source="test")))
    out["hand_in_flight_on_retired"] = max(draining, default=0)
    for _ in range(10):
        pool.poll(0.2)
    out["hand"] = {"rows": rows, "sizes": sizes, "asked": asked, "released": released,
                   "decisions": list(pool.decisions), "status": pool.status(),
                   "control": ray.get(control.status.remote())}
    ray.kill(control)

    # 2. autoscale by queue within [1, 2], and a hand request clamped to it -------------------------------
    free = list(warm)
    autoscale = AutoscaleConfig(min_workers=1, max_workers=2, target_queue_per_worker=0.5, up_after_s=1.0,
                                down_after_idle_s=3.0)
    control = start_control("elastic-auto", (1, 2))
    metrics = _Recorder()
    pool = RewardPool(lambda i: free.pop(0), 1, timeout_s=180, max_attempts=3, autoscale=autoscale, control=control,
                      metrics=metrics, release=free.append)
    pool.ready()
    akeys = [("a", n) for n in range(10)]
    for n, key in enumerate(akeys):
        pool.submit(key, TEXTS[n % len(TEXTS)])
    rows, timeline = [], []
    t_start = time.monotonic()
    deadline = t_start + 300
    while pool.pending() and time.monotonic() < deadline:
        rows += [_row(k, r, time.time()) for k, r in pool.poll(0.3)]
        timeline.append((time.monotonic() - t_start, len(pool.workers), pool.waiting))
    t_drained = time.monotonic()
    while time.monotonic() - t_drained < 8:  # idle: back to min_workers after down_after_idle_s
        pool.poll(0.3)
        timeline.append((time.monotonic() - t_start, len(pool.workers), pool.waiting))
    shrunk_at = next((t for t, n, _ in timeline if t > t_drained - t_start and n == 1), None)
    clamp = _cli(pool, ["scale", "elastic-auto", "--reward-workers", "5", *address], cli_env)
    for _ in range(5):
        pool.poll(0.2)
    out["auto"] = {"rows": rows, "timeline": timeline, "drained_at": t_drained - t_start, "shrunk_at": shrunk_at,
                   "decisions": list(pool.decisions), "metrics": metrics.seen, "clamp": clamp,
                   "size_after_clamp": len(pool.workers)}
    pool.close()  # releases back to `free`: nothing is killed
    ray.kill(control)

    # 3. a worker pending for a resource, placed when a node with it joins; the CLI against it -----------
    control = start_control("elastic-pending")
    made: dict[int, float] = {}

    def make(i: int):
        made[i] = time.time()
        return warm[0] if i == 0 else real(f"joined-{i}", resources={"reward_node": 1})

    pool = RewardPool(make, 1, timeout_s=180, max_attempts=3, control=control, release=lambda h: None)
    pool.ready()
    rows, events, n = [], {}, 0

    def feed(limit: int = 4) -> None:
        nonlocal n
        while pool.waiting + pool.in_flight < limit:
            pool.submit(("p", n), TEXTS[n % len(TEXTS)])
            n += 1

    feed()
    scale = _cli(pool, ["scale", "elastic-pending", "--reward-workers", "2", *address], cli_env)
    rows += [_row(k, r, time.time()) for k, r in scale.pop("results")]
    events["scaled"] = time.time()
    t_pending = time.monotonic()
    while time.monotonic() - t_pending < 6:  # pending: the run goes on with the placed worker
        feed()
        rows += [_row(k, r, time.time()) for k, r in pool.poll(0.3)]
    status_pending = _cli(pool, ["status", "elastic-pending", *address], cli_env)
    rows += [_row(k, r, time.time()) for k, r in status_pending.pop("results")]
    events["pending_states"] = [w["state"] for w in pool.status()["workers"]]
    events["node_start"] = time.time()
    node = subprocess.run(["ray", "start", "--address", f"127.0.0.1:{GCS_PORT}", "--num-cpus", "1", "--resources",
                           '{"reward_node": 1}', "--dashboard-agent-listen-port", str(NODE_PORTS[0]),
                           "--metrics-export-port", str(NODE_PORTS[1]), "--disable-usage-stats"],
                          cwd=ROOT, env={**os.environ, "BRAINLOOP_RAY_HEAD": GCS_PORT}, capture_output=True,
                          text=True, timeout=240)
    events["node_joined"] = time.time()
    events["node_rc"] = node.returncode
    events["node_err"] = node.stderr[-2000:]
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline and sum(r["worker"] == "joined-1" for r in rows) < 2:
        feed()
        rows += [_row(k, r, time.time()) for k, r in pool.poll(0.3)]
    status_alive = _cli(pool, ["status", "elastic-pending", *address], cli_env)
    rows += [_row(k, r, time.time()) for k, r in status_alive.pop("results")]
    while pool.pending() and time.monotonic() < deadline:
        rows += [_row(k, r, time.time()) for k, r in pool.poll(0.3)]
    wrong = _cli(None, ["status", "no-such-run", *address], cli_env)
    unreachable = _cli(None, ["status", "elastic-pending", "--address", f"127.0.0.1:{UNUSED_GCS}"], cli_env)
    submitted = n
    final = pool.status()
    placed = [w for w in final["workers"] if w["name"] == "joined-1"]
    pool.close()
    ray.kill(control)
    time.sleep(1.0)
    stopped = _cli(None, ["status", "elastic-pending", *address], cli_env)
    out["pending"] = {"rows": rows, "submitted": submitted, "events": events, "scale": scale,
                      "status_pending": status_pending, "status_alive": status_alive, "wrong": wrong,
                      "unreachable": unreachable, "stopped": stopped, "final": final, "placed": placed,
                      "nodes_alive": sum(node["Alive"] for node in ray.nodes())}
    Path(out_path).write_text(json.dumps(out, default=str))


# ---- the tests -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def observed(tmp_path_factory) -> dict:
    env = head_env(PORTS, BRAINLOOP_RAY_LOOPBACK="0", BRAINLOOP_RAY_RESOURCES='{"reward_node": 1}')
    out = tmp_path_factory.mktemp("elastic") / "observed.json"
    with local_head(env):
        script = "import sys\nfrom tests.test_elastic_pool import scenario\nscenario(sys.argv[1])\n"
        done = subprocess.run([sys.executable, "-c", script, str(out)], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=1500)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return json.loads(out.read_text())


def _once(rows: list[dict], keys: list) -> None:
    counts = Counter(tuple(r["key"]) for r in rows)
    assert set(counts) == {tuple(k) for k in keys}, (set(counts) ^ {tuple(k) for k in keys})
    assert all(c == 1 for c in counts.values()), [k for k, c in counts.items() if c > 1]
    assert all(r["status"] == "ok" for r in rows), [r for r in rows if r["status"] != "ok"]


def test_hand_scale_up_and_down_mid_stream_scores_every_key_once(observed):
    hand = observed["hand"]
    keys = [(s, p, i) for s in range(3) for p in range(2) for i in range(2)]
    _once(hand["rows"], keys)
    assert [a["target"] for a in hand["asked"]] == [2, 1]
    assert max(hand["sizes"]) == 2 and hand["sizes"][-1] == 1
    assert [(d["from"], d["to"]) for d in hand["decisions"]] == [(0, 1), (1, 2), (2, 1)]
    assert all("requested by hand (test)" in d["reason"] for d in hand["decisions"][1:])
    assert {r["worker"] for r in hand["rows"]} == {"warm-0", "warm-1"}  # the added worker took texts
    # Retired while it still had texts in flight: drained, not killed — none of them was retried, and it
    # was released only after its last text came back.
    assert observed["hand_in_flight_on_retired"] >= 1
    assert all(r["attempts"] == 1 for r in hand["rows"])
    [(name, released_at)] = hand["released"]
    assert name == "warm-1"
    assert released_at >= max(r["at"] for r in hand["rows"] if r["worker"] == "warm-1") - 0.5
    # The control actor holds the request and the pool's newest snapshot.
    snap = hand["control"]
    assert snap["request"]["target"] == 1 and snap["pool"]["applied_seq"] == 2 and snap["pool"]["target"] == 1


def test_autoscale_grows_under_a_queue_and_shrinks_when_idle_within_bounds(observed):
    auto = observed["auto"]
    _once(auto["rows"], [("a", n) for n in range(10)])
    sizes = [n for _, n, _ in auto["timeline"]]
    assert max(sizes) == 2 and min(sizes) == 1  # never outside [min_workers, max_workers]
    assert sizes[-1] == 1
    reasons = [d["reason"] for d in auto["decisions"]]
    assert any(r.startswith("queue per worker") and "> target 0.5" in r for r in reasons), reasons
    assert any("idle for" in r and "down_after_idle_s 3" in r for r in reasons), reasons
    # Back to min_workers within down_after_idle_s (+ the poll period) of the last text.
    assert auto["shrunk_at"] is not None and auto["shrunk_at"] - auto["drained_at"] <= 3.0 + 1.5
    assert {r["worker"] for r in auto["rows"]} == {"warm-0", "warm-1"}
    m = auto["metrics"]
    assert {"pool_target_workers", "pool_alive_workers", "pool_pending_workers", "pool_queue_per_worker",
            "queue_depth", "in_flight"} <= set(m)
    assert m["pool_scale_ups"] >= 1 and m["pool_scale_downs"] >= 1
    clamp = auto["clamp"]
    assert clamp["rc"] == 0, clamp["err"]
    assert "reward pool target 2 (clamped from 5: reward.autoscale keeps it within [1, 2])" in clamp["out"]
    assert "applied: target 2" in clamp["out"]
    assert auto["size_after_clamp"] == 2


def test_pending_worker_is_placed_when_a_node_with_the_resource_joins(observed):
    p = observed["pending"]
    ev = p["events"]
    assert ev["node_rc"] == 0, ev["node_err"]
    _once(p["rows"], [("p", n) for n in range(p["submitted"])])
    assert p["scale"]["rc"] == 0, p["scale"]["err"]
    assert "reward pool target 2" in p["scale"]["out"] and "pending placement 1" in p["scale"]["out"]
    assert ev["pending_states"] == ["alive", "pending"]
    # While the second worker waited for a node, the run went on with the first one.
    while_pending = [r for r in p["rows"] if ev["scaled"] <= r["at"] <= ev["node_start"]]
    assert len(while_pending) >= 2 and {r["worker"] for r in while_pending} == {"warm-0"}
    # Placed on the joining node and used as soon as it was ready.
    joined = [r for r in p["rows"] if r["worker"] == "joined-1"]
    assert len(joined) >= 2 and min(r["at"] for r in joined) > ev["node_joined"] - 30
    assert min(r["at"] for r in joined) > ev["node_start"]
    [placed] = p["placed"]
    assert placed["state"] == "alive" and placed["texts"] >= 2
    assert p["nodes_alive"] == 2


def test_cli_status_and_errors(observed):
    p = observed["pending"]
    pending = p["status_pending"]
    assert pending["rc"] == 0, pending["err"]
    assert "pending placement 1" in pending["out"] and "fixed size" in pending["out"]
    assert any(line.split()[:2] == ["#1", "pending"] for line in pending["out"].splitlines()), pending["out"]
    alive = p["status_alive"]
    assert alive["rc"] == 0, alive["err"]
    assert "alive 2, pending placement 0" in alive["out"]
    assert any(line.split()[:2] == ["joined-1", "alive"] for line in alive["out"].splitlines()), alive["out"]
    for case, expected in (("wrong", "no running job named 'no-such-run' on the Ray cluster at 127.0.0.1:6790 "
                                      "(running: elastic-pending)"),
                           ("unreachable", "cannot reach the Ray cluster at 127.0.0.1:6890"),
                           ("stopped", "no running job named 'elastic-pending'")):
        result = p[case]
        assert result["rc"] == 2, (case, result)
        err = result["err"].strip()
        assert expected in err and "Traceback" not in err and len(err.splitlines()) == 1, (case, err)


def test_autoscale_config_is_checked_before_any_actor():
    from brainloop.config import ConfigError, load_config

    cfg = load_config(CONFIG, {"reward": {"num_workers": 1, "autoscale": {"max_workers": 8}}})
    a = cfg.reward.autoscale
    assert (a.min_workers, a.max_workers, a.target_queue_per_worker) == (1, 8, 1.0)
    assert load_config(CONFIG).reward.autoscale is None  # absent: a fixed size, as before
    for bad, message in (({"autoscale": {"min_workers": 3, "max_workers": 2}}, "min_workers 3 is above max_workers 2"),
                         ({"num_workers": 9, "autoscale": {"max_workers": 8}}, "num_workers 9 (the size the pool "
                                                                                "starts with) is outside autoscale"),
                         ({"autoscale": {"up_after": 3}}, "reward.autoscale.up_after"),
                         ({"autoscale": {"down_after_idle_s": 0}}, "reward.autoscale.down_after_idle_s")):
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            load_config(CONFIG, {"reward": bad})


def test_private_cluster_has_room_for_the_largest_pool():
    """Without RAY_ADDRESS the job starts a private cluster sized from the config: an autoscaled pool must
    fit at max_workers there, or its extra workers would stay pending for ever."""
    from brainloop.config import load_config
    from brainloop.job import logical_cpus

    one_cpu_each = {"sampler": {"num_cpus": 1}, "learner": {"num_cpus": 1}}
    fixed = load_config(CONFIG, {**one_cpu_each, "reward": {"num_workers": 1, "num_cpus_per_worker": 1}})
    elastic = load_config(CONFIG, {**one_cpu_each, "reward": {"num_workers": 1, "num_cpus_per_worker": 1,
                                                              "autoscale": {"max_workers": 8}}})
    cores = os.cpu_count() or 1
    assert logical_cpus(fixed) == max(cores, 1 + 1 + 1)
    assert logical_cpus(elastic) == max(cores, 1 + 1 + 8)
