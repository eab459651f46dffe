#!/usr/bin/env bash
# Start (or reuse) the local Ray head of the embedded default: token auth on, and every port it opens
# bound to 127.0.0.1 — GCS, raylet, object manager, dashboard, job server, dashboard agent, metrics,
# Ray client server and every worker's gRPC port (tests/test_faults_cluster.py lists them).
# `scripts/ray_local.sh stop` stops the Ray processes of THIS head only (plain `ray stop` would stop
# every Ray process on the machine).
#
# Why RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0: Ray 2.60 rewrites `--node-ip-address 127.0.0.1` to the
# machine's routable address (services.resolve_ip_for_localhost) and then binds its gRPC servers to
# 0.0.0.0. With this setting (Ray's single-machine mode) the node address stays 127.0.0.1, and Ray
# binds every server to it. A process that connects to this head with ray.init (not through the job
# server) needs the same setting, or it looks for the GCS at the routable address; jobs submitted with
# `ray job submit` inherit it. The price: `ray start --address` refuses to add a second node from a
# shell where it is 0: a multi-node head needs BRAINLOOP_RAY_LOOPBACK=0 (below).
# BRAINLOOP_RAY_LOOPBACK=0 starts a head that other nodes can join (`ray start --address`): Ray then
# binds the GCS, raylet and workers to all interfaces, and token authentication is the guard.
set -euo pipefail
cd "$(dirname "$0")/.."
. "${BRAINLOOP_VENV:-.venv}/bin/activate"
export RAY_AUTH_MODE=token
if [ "${BRAINLOOP_RAY_LOOPBACK:-1}" = 1 ]; then
  export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
fi
GCS_PORT=${BRAINLOOP_RAY_PORT:-6390}
DASHBOARD_PORT=${BRAINLOOP_DASHBOARD_PORT:-8265}
AGENT_PORT=${BRAINLOOP_AGENT_PORT:-52390}  # not Ray's default 52365: other local clusters may hold it
METRICS_PORT=${BRAINLOOP_METRICS_PORT:-8090}  # Prometheus endpoint of this node (ray metrics launch-prometheus)
CLIENT_PORT=${BRAINLOOP_CLIENT_PORT:-$((GCS_PORT + 13611))}  # Ray client server: 10001 collides between heads; outside worker ports 10002-19999
NUM_CPUS=${BRAINLOOP_RAY_CPUS:-4}  # logical CPUs: sampler 1, learner 1, two reward workers 1 each
case "${1:-start}" in
  start)
    ray get-auth-token --generate >/dev/null
    if ray status --address "127.0.0.1:$GCS_PORT" >/dev/null 2>&1; then
      echo "[ray] reusing the head at 127.0.0.1:$GCS_PORT"
    else
      # BRAINLOOP_RAY_HEAD marks every process of this head (inherited by raylet, agents and workers):
      # `stop` finds them by it.
      BRAINLOOP_RAY_HEAD=$GCS_PORT ray start --head --node-ip-address 127.0.0.1 --port "$GCS_PORT" \
        --num-cpus "$NUM_CPUS" ${BRAINLOOP_RAY_RESOURCES:+--resources "$BRAINLOOP_RAY_RESOURCES"} \
        --include-dashboard true --dashboard-host "${BRAINLOOP_DASHBOARD_HOST:-127.0.0.1}" \
        --dashboard-port "$DASHBOARD_PORT" --dashboard-agent-listen-port "$AGENT_PORT" \
        --metrics-export-port "$METRICS_PORT" --ray-client-server-port "$CLIENT_PORT" \
        --disable-usage-stats >/dev/null
      echo "[ray] head started: dashboard http://127.0.0.1:$DASHBOARD_PORT (token auth on, 127.0.0.1 only)"
    fi
    ;;
  stop)
    python - "$GCS_PORT" <<'PY'
import re
import sys

import psutil

port = sys.argv[1]
marker = f"BRAINLOOP_RAY_HEAD={port}".encode()
procs = [(p, " ".join(p.info["cmdline"] or [])) for p in psutil.process_iter(["pid", "cmdline"])]
# The head's processes: those started with its marker in their environment, and (for heads started
# before the marker existed) those naming the session folder of the GCS that holds the port.
gcs = re.compile(rf"--gcs_server_port={port}\b|--gcs[-_]address=[\d.]+:{port}\b")
client = re.compile(rf"ray\.util\.client\.server --address=[\d.]+:{port}\b")
sessions = {m.group(0) for _, cmd in procs if gcs.search(cmd)
            for m in [re.search(r"session_\d{4}-\d\d-\d\d_[\d-]+_\d+_\d+", cmd)] if m}


def has_marker(proc: psutil.Process) -> bool:
    try:
        with open(f"/proc/{proc.pid}/environ", "rb") as handle:
            return marker in handle.read().split(b"\0")
    except OSError:
        return False


mine = {p.pid: p for p, cmd in procs if has_marker(p) or any(s in cmd for s in sessions) or client.search(cmd)}
for proc in list(mine.values()):
    try:
        mine.update({c.pid: c for c in proc.children(recursive=True)})
    except psutil.NoSuchProcess:
        pass
for proc in mine.values():
    try:
        proc.kill()
    except psutil.NoSuchProcess:
        pass
psutil.wait_procs(list(mine.values()), timeout=10)
print(f"[ray] stopped {len(mine)} processes of the head on port {port} ({', '.join(sorted(sessions)) or 'none'})")
PY
    ;;
  *) echo "usage: $0 [start|stop]" >&2; exit 2 ;;
esac
