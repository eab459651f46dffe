"""Real process-level faults on a real local Ray head, started the way the demo starts it
(``scripts/ray_local.sh``, token auth, loopback only), jobs submitted with ``ray job submit``.

- the head listens on 127.0.0.1 only: every socket its processes (GCS, raylet, dashboard, agents,
  client server, job supervisor, driver, actors) listen on is listed and checked;
- SIGKILL of the ``python -m brainloop.job`` driver mid-step: ``scripts/submit_with_retry.sh``
  resubmits it with ``--resume-or-start`` and the run finishes with exactly the rollouts of an
  uninterrupted run (keys, prompts, completions, adapter versions).

The head uses its own ports (GCS 6490, dashboard 8365, ...) so that it never meets another head on the
machine, and is stopped by its own port (never ``ray stop``), also when a test fails.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest

from tests.ray_heads import head_env, local_head

ROOT = Path(__file__).parents[1]
DEMO = ROOT / "configs" / "demo.yaml"
KEY = ["step", "prompt_index", "sample_index"]
PORTS = {"BRAINLOOP_RAY_PORT": "6490", "BRAINLOOP_DASHBOARD_PORT": "8365", "BRAINLOOP_AGENT_PORT": "52490",
         "BRAINLOOP_METRICS_PORT": "8190", "BRAINLOOP_CLIENT_PORT": "20490"}
DASHBOARD = f"http://127.0.0.1:{PORTS['BRAINLOOP_DASHBOARD_PORT']}"
# The e2e tests' small config: 2 prompts x 2 completions x 12 tokens, checkpoints after steps 2 and 4.
SMALL = ["run.name=e2e", "run.steps=4", "run.checkpoint_every=2", "run.seed=7", "sampler.num_completions=2",
         "sampler.max_new_tokens=12", "sampler.max_model_len=256", "learner.lr=5e-3", "learner.warmup_steps=0",
         "reward.cache=false"]

pytestmark = pytest.mark.slow


def head_processes(gcs_port: str) -> list[psutil.Process]:
    """Every process of the head: those ray_local.sh marks, and their descendants.

    The marker (an environment variable) reaches the GCS, the raylet and the workers, but
    /proc/PID/environ is not a reliable witness for every process: Ray renames some (e.g.
    ``ray::DashboardAgent``) with setproctitle, which can overwrite the memory that file shows. Such a
    process is still a child of the marked raylet, so descendants count too. (Looking only for the
    marker, the agent's ports were sometimes never seen and this test waited 13 minutes, then failed.)
    """
    marker = f"BRAINLOOP_RAY_HEAD={gcs_port}".encode()
    found: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter(["pid"]):
        try:
            with open(f"/proc/{proc.pid}/environ", "rb") as handle:
                if marker in handle.read().split(b"\0"):
                    found[proc.pid] = proc
        except OSError:
            continue
    for proc in list(found.values()):
        try:
            for child in proc.children(recursive=True):
                found.setdefault(child.pid, child)
        except psutil.Error:
            continue
    return list(found.values())


@pytest.fixture(scope="module")
def head():
    with local_head(head_env(PORTS)) as env:
        yield env


def submit(env: dict[str, str], submission_id: str, entrypoint: list[str]) -> None:
    """``ray job submit --no-wait``; the job agent registers a few seconds after the head starts."""
    for _ in range(20):
        out = subprocess.run(["ray", "job", "submit", "--no-wait", "--address", DASHBOARD, "--submission-id",
                              submission_id, "--", *entrypoint], cwd=ROOT, env=env, capture_output=True, text=True)
        if out.returncode == 0:
            return
        time.sleep(3)
    raise AssertionError(f"ray job submit failed: {out.stderr[-2000:]}")


QUERY = (
    "import json, sys\n"
    "from ray.job_submission import JobSubmissionClient\n"
    "client = JobSubmissionClient(sys.argv[1])\n"
    "info = client.get_job_info(sys.argv[2])\n"
    "print(json.dumps({'status': info.status.value, 'logs': client.get_job_logs(sys.argv[2])}))\n"
)


def job_query(submission_id: str) -> dict:
    """Status and logs of a job, asked in a subprocess: the job client reads RAY_AUTH_MODE=token from its
    environment, which this test process must not change for the other test modules."""
    out = subprocess.run([sys.executable, "-c", QUERY, DASHBOARD, submission_id], env=head_env(PORTS),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def job_logs(submission_id: str) -> str:
    return job_query(submission_id)["logs"]


def wait_job(submission_id: str, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = job_query(submission_id)["status"]
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            return status
        time.sleep(5)
    raise AssertionError(f"job {submission_id} still running after {timeout_s} s")


def rollouts(run_dir: Path) -> pd.DataFrame:
    return pd.read_parquet(run_dir / "rollouts").sort_values(KEY).reset_index(drop=True)


def job_entrypoint(run_dir: Path) -> list[str]:
    args = ["python", "-m", "brainloop.job", "--config", str(DEMO), "--run-dir", str(run_dir)]
    for item in SMALL:
        args += ["--set", item]
    return args


# ---- security --------------------------------------------------------------------------------------------
LISTENER = (
    "import os, time, ray\n"
    "ray.init()\n"
    "@ray.remote(num_cpus=0)\n"
    "class Idle:\n"
    "    def pid(self):\n"
    "        return os.getpid()\n"
    "actor = Idle.remote()\n"
    "print('actor pid', ray.get(actor.pid.remote()), flush=True)\n"
    "time.sleep(600)\n"
)


def test_local_head_listens_on_loopback_only(head):
    """The demo head, a job's driver and an actor are running: every listening socket of theirs is on
    127.0.0.1. (Ray 2.60 would bind the GCS, the raylet, the metrics endpoint, the client server, the
    dashboard agent and every worker's gRPC port to all interfaces without ray_local.sh's settings.)"""
    submit(head, "listen-check", ["python", "-c", LISTENER])
    try:
        deadline = time.monotonic() + 180
        while not (found := re.search(r"^actor pid (\d+)$", job_logs("listen-check"), re.MULTILINE)):
            assert time.monotonic() < deadline, job_logs("listen-check")[-2000:]
            time.sleep(1)
        actor_pid = int(found.group(1))
        # The dashboard agent may open its ports (agent, metrics) after the actor runs: list the sockets
        # until every expected one is there (then check them all), or fail at the deadline.
        wanted = {6490, 8365, 52490, 8190, 20490}  # GCS, dashboard, agent, metrics, client server
        while True:
            pids = {p.pid: p.name() for p in head_processes(PORTS["BRAINLOOP_RAY_PORT"])}
            listening = [(pids[c.pid], c.laddr.ip, c.laddr.port) for c in psutil.net_connections(kind="inet")
                         if c.status == psutil.CONN_LISTEN and c.pid in pids]
            ports = {port for _, _, port in listening}
            if wanted <= ports or time.monotonic() > deadline + 600:
                break
            time.sleep(2)
        assert actor_pid in pids  # the marker reaches the workers
        names = " ".join(name for name, _, _ in listening)
        for expected in ("gcs_server", "raylet"):
            assert expected in names, listening
        assert wanted <= ports, listening
        exposed = [(name, ip, port) for name, ip, port in listening if ip not in ("127.0.0.1", "::ffff:127.0.0.1")]
        assert not exposed, f"listening beyond loopback: {exposed}"
    finally:
        subprocess.run(["ray", "job", "stop", "--address", DASHBOARD, "listen-check"], cwd=ROOT, env=head,
                       capture_output=True, timeout=60)


# ---- driver SIGKILL ---------------------------------------------------------------------------------------
def driver_process(run_dir: Path) -> psutil.Process | None:
    """The ``python -m brainloop.job`` process of this run (not the ``/bin/sh -c`` Ray wraps it in)."""
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmd = proc.info["cmdline"] or []
        if len(cmd) > 2 and cmd[1:3] == ["-m", "brainloop.job"] and str(run_dir) in cmd:
            return proc
    return None


def test_driver_sigkill_mid_step_then_resubmitted_run_matches_uninterrupted(head, tmp_path):
    # Uninterrupted: four steps, checkpoints after steps 2 and 4.
    full_dir = tmp_path / "full"
    submit(head, "sigkill-full", job_entrypoint(full_dir))
    assert wait_job("sigkill-full", 900) == "SUCCEEDED", job_logs("sigkill-full")[-3000:]
    full = rollouts(full_dir)
    assert len(full) == 16

    # The same run through submit_with_retry.sh; its driver is killed with SIGKILL during step 3, after
    # the checkpoint of step 2: the script resubmits with --resume-or-start.
    cut_dir = tmp_path / "cut"
    env = head_env(PORTS, RAY_ADDRESS=DASHBOARD, BRAINLOOP_MAX_SUBMITS="2")
    entrypoint = [a for i, a in enumerate(job_entrypoint(cut_dir)) if a != "--run-dir" and i != 6]  # the script adds it
    wrapper = subprocess.Popen(["bash", "scripts/submit_with_retry.sh", str(cut_dir), "--", *entrypoint],
                               cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 900
        first = None
        while not (cut_dir / "checkpoints" / "step_000001" / "COMPLETE").is_file():
            assert wrapper.poll() is None and time.monotonic() < deadline, "the first attempt never checkpointed"
            first = driver_process(cut_dir) or first
            time.sleep(0.2)
        assert not (cut_dir / "rollouts" / "step_000002.parquet").exists()  # step 3 is under way
        victim = driver_process(cut_dir)
        assert victim is not None and (first is None or victim.pid == first.pid)
        os.kill(victim.pid, signal.SIGKILL)
        killed_at = time.time()
        out, _ = wrapper.communicate(timeout=900)
    finally:
        if wrapper.poll() is None:
            wrapper.kill()
    assert wrapper.returncode == 0, out[-4000:]
    assert "attempt 1 failed" in out and "resubmitting with --resume-or-start" in out
    assert "resumed from step_000001: next step 2" in out
    resumed = rollouts(cut_dir)
    pd.testing.assert_frame_equal(resumed[KEY], full[KEY])
    for column in ("prompt_id", "prompt", "completion", "adapter_version", "learner_version"):
        assert list(resumed[column]) == list(full[column]), column
    # Steps 1-2 are the first attempt's rows, steps 3-4 were redone after the kill.
    assert (resumed.loc[resumed.step >= 2, "submitted_at"] > killed_at).all()
    assert (resumed.loc[resumed.step < 2, "submitted_at"] < killed_at).all()
    summary = json.loads((cut_dir / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["adapter_version"] == 4


def test_submit_with_retry_does_not_resubmit_a_config_error(head, tmp_path):
    env = head_env(PORTS, RAY_ADDRESS=DASHBOARD, BRAINLOOP_MAX_SUBMITS="3")
    out = subprocess.run(["bash", "scripts/submit_with_retry.sh", str(tmp_path / "bad"), "--", "python", "-m",
                          "brainloop.job", "--config", str(DEMO), "--set", "run.stepz=2"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    assert "run.stepz: Extra inputs are not permitted" in out.stdout + out.stderr
    assert "not resubmitting" in out.stderr and "attempt 2" not in out.stderr



# ---- names held by another driver's job -------------------------------------------------------------------
HOLDER = (
    "import time, ray\n"
    "from ray.util.placement_group import placement_group\n"
    "ray.init(address='127.0.0.1:6490', namespace='brainloop-stale')\n"
    "pg = placement_group([{'CPU': 0.01}], name='stale-policy')\n"
    "ray.get(pg.ready())\n"
    "@ray.remote(num_cpus=0)\n"
    "class Holder:\n"
    "    def ping(self):\n"
    "        return 1\n"
    "actor = Holder.options(name='sampler').remote()\n"
    "ray.get(actor.ping.remote())\n"
    "print('holding', flush=True)\n"
    "time.sleep(600)\n"
)
CLAIMER = (
    "import sys, time, ray\n"
    "from ray.util.placement_group import placement_group\n"
    "from brainloop.driver import release_stale_holders\n"
    "from brainloop.errors import RunFailure\n"
    "from brainloop.job import configure_logging\n"
    "configure_logging()  # the driver's progress lines on stdout, as in the job\n"
    "ray.init(address='127.0.0.1:6490', namespace='brainloop-stale')\n"
    "try:\n"
    "    release_stale_holders('stale-policy', ['sampler'], timeout_s=float(sys.argv[1]))\n"
    "except RunFailure as exc:\n"
    "    print('refused', exc, flush=True)\n"
    "    sys.exit(0)\n"
    "pg = placement_group([{'CPU': 0.01}], name='stale-policy')\n"
    "ray.get(pg.ready(), timeout=60)\n"
    "@ray.remote(num_cpus=0)\n"
    "class Sampler:\n"
    "    def ping(self):\n"
    "        return 1\n"
    "ray.get(Sampler.options(name='sampler').remote().ping.remote(), timeout=60)\n"
    "print('claimed at', time.time(), flush=True)\n"
)


def test_run_names_held_by_a_driver_that_is_killed_are_released(head):
    """The placement group and actor names of a run, held by a driver that is then SIGKILLed: a new driver
    of the same run waits for them and then creates its own (before the fix it failed at once with
    "placement group ... already exists"); while the holder stays alive it refuses with a clear error."""
    env = head_env(PORTS, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")  # as ray_local.sh: connect to the loopback head
    holder = subprocess.Popen([sys.executable, "-c", HOLDER], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        refused = subprocess.run([sys.executable, "-c", CLAIMER, "5"], cwd=ROOT, env=env, capture_output=True,
                                 text=True, timeout=120)
        assert "refused run names are still held after 5 s: placement group stale-policy" in refused.stdout, \
            refused.stdout + refused.stderr[-2000:]
        assert "is this run already running" in refused.stdout
        claimer = subprocess.Popen([sys.executable, "-c", CLAIMER, "120"], cwd=ROOT, env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(8)
        assert claimer.poll() is None  # still waiting: the holder is alive
        os.kill(holder.pid, signal.SIGKILL)
        killed_at = time.time()
        out, err = claimer.communicate(timeout=120)
    finally:
        holder.kill()
    assert claimer.returncode == 0, err[-2000:]
    assert "waiting for placement group stale-policy" in out and "claimed at" in out, out
    assert float(out.rsplit("claimed at", 1)[1]) > killed_at  # it waited for the holder's death
