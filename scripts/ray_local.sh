#!/usr/bin/env bash
# Start (or reuse) the local Ray head of the embedded default: token auth on, dashboard and job
# server bound to 127.0.0.1 only. `scripts/ray_local.sh stop` stops the Ray processes of THIS
# head only (plain `ray stop` would stop every Ray process on the machine).
set -euo pipefail
cd "$(dirname "$0")/.."
. "${BRAINLOOP_VENV:-.venv}/bin/activate"
export RAY_AUTH_MODE=token
GCS_PORT=${BRAINLOOP_RAY_PORT:-6390}
DASHBOARD_PORT=${BRAINLOOP_DASHBOARD_PORT:-8265}
AGENT_PORT=${BRAINLOOP_AGENT_PORT:-52390}  # not Ray's default 52365: other local clusters may hold it
METRICS_PORT=${BRAINLOOP_METRICS_PORT:-8090}  # Prometheus endpoint of this node (ray metrics launch-prometheus)
NUM_CPUS=${BRAINLOOP_RAY_CPUS:-4}  # logical CPUs: sampler 1, learner 1, two reward workers 1 each
case "${1:-start}" in
  start)
    ray get-auth-token --generate >/dev/null
    if ray status --address "127.0.0.1:$GCS_PORT" >/dev/null 2>&1; then
      echo "[ray] reusing the head at 127.0.0.1:$GCS_PORT"
    else
      ray start --head --node-ip-address 127.0.0.1 --port "$GCS_PORT" --num-cpus "$NUM_CPUS" \
        --include-dashboard true --dashboard-host "${BRAINLOOP_DASHBOARD_HOST:-127.0.0.1}" --dashboard-port "$DASHBOARD_PORT" \
        --dashboard-agent-listen-port "$AGENT_PORT" --metrics-export-port "$METRICS_PORT" \
        --disable-usage-stats >/dev/null
      echo "[ray] head started: dashboard http://127.0.0.1:$DASHBOARD_PORT (token auth on)"
    fi
    ;;
  stop)
    python - "$GCS_PORT" <<'PY'
import re, sys, psutil
port = sys.argv[1]
procs = [(p, " ".join(p.info["cmdline"] or [])) for p in psutil.process_iter(["pid", "cmdline"])]
# The head's processes all name its session folder: find it through the process holding the GCS port.
sessions = {m.group(0) for _, cmd in procs if f":{port}" in cmd or f"={port}" in cmd
            for m in [re.search(r"session_\d{4}-\d\d-\d\d_[\d-]+_\d+_\d+", cmd)] if m}
mine = [p for p, cmd in procs if any(s in cmd for s in sessions)]
for proc in mine:
    try:
        proc.kill()
    except psutil.NoSuchProcess:
        pass
print(f"[ray] stopped {len(mine)} processes of the head on port {port} ({', '.join(sorted(sessions)) or 'none'})")
PY
    ;;
  *) echo "usage: $0 [start|stop]" >&2; exit 2 ;;
esac
