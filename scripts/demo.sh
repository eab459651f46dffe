#!/usr/bin/env bash
# The main job on the embedded default, from a fresh clone: set-up, a local Ray head (token auth,
# dashboard on 127.0.0.1:8265), `ray job submit` of configs/demo.yaml, logs followed, summary printed.
#   bash scripts/demo.sh                      # 20 steps
#   bash scripts/demo.sh --set run.steps=60   # the longer learning run quoted in the README
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. "${BRAINLOOP_VENV:-.venv}/bin/activate"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 RAY_AUTH_MODE=token
if [ -z "${NILEARN_DATA:-}" ] && [ -d ../shared/nilearn_data ]; then
  export NILEARN_DATA=$(cd ../shared/nilearn_data && pwd)  # offline copy of the Destrieux atlas
fi
CONFIG=$(realpath "${BRAINLOOP_CONFIG:-configs/demo.yaml}")
RUN_DIR=$(realpath -m "${BRAINLOOP_RUN_DIR:-runs/demo-$(date +%Y%m%d-%H%M%S)}")  # absolute: the job runs elsewhere
# runs/ is git-ignored, so a fresh clone has none: create the run's parent before anything writes there.
mkdir -p "$(dirname "$RUN_DIR")"
python -m brainloop.job --config "$CONFIG" --validate-only "$@"
bash scripts/ray_local.sh start
DASHBOARD=http://127.0.0.1:${BRAINLOOP_DASHBOARD_PORT:-8265}
ENV_JSON=$(python -c "import json, os; print(json.dumps({'env_vars': {k: os.environ[k] for k in
  ('HF_HUB_OFFLINE', 'TRANSFORMERS_OFFLINE', 'NILEARN_DATA', 'BRAINLOOP_CACHE') if k in os.environ}}))")
JOB_ID="brainloop-$(basename "$RUN_DIR")"
# The job agent registers a few seconds after the head starts: retry the submission itself (never
# the job: `ray job submit` does not retry a failed job, see scripts/submit_with_retry.sh).
for try in 1 2 3 4 5 6 7 8 9 10; do
  if ray job submit --no-wait --address "$DASHBOARD" --submission-id "$JOB_ID" --runtime-env-json "$ENV_JSON" -- \
      python -m brainloop.job --config "$CONFIG" --run-dir "$RUN_DIR" "$@" >/dev/null 2>"$RUN_DIR.submit.err"; then
    break
  fi
  [ "$try" = 10 ] && { cat "$RUN_DIR.submit.err" >&2; exit 1; }
  sleep 3
done
rm -f "$RUN_DIR.submit.err"
echo "[brainloop] submitted $JOB_ID; dashboard $DASHBOARD (Jobs, Actors, Metrics views)"
ray job logs --address "$DASHBOARD" --follow "$JOB_ID"
STATUS=$(python -c "import sys; from ray.job_submission import JobSubmissionClient as C
print(C(sys.argv[1]).get_job_status(sys.argv[2]).value)" "$DASHBOARD" "$JOB_ID")
if [ "$STATUS" != "SUCCEEDED" ]; then
  echo "[brainloop] job $JOB_ID ended: ${STATUS:-unknown}" >&2
  exit 1
fi
python -m brainloop.cli summary "$RUN_DIR" --dashboard "$DASHBOARD"
