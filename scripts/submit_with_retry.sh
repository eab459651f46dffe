#!/usr/bin/env bash
# `ray job submit` never retries a failed job. This wrapper resubmits with --resume-or-start (up to
# BRAINLOOP_MAX_SUBMITS times) so a driver killed at any point (kill -9, OOM, lost node) continues from
# the last complete checkpoint — or starts over when it died before the first one. A job that ended
# with exit code 2 (a usage or configuration error) is not resubmitted: it would fail the same way.
#   scripts/submit_with_retry.sh RUN_DIR -- python -m brainloop.job --config configs/demo.yaml [--set ...]
# Do not pass --resume yourself. RAY_ADDRESS: the job server (default http://127.0.0.1:8265);
# BRAINLOOP_RUNTIME_ENV_JSON: passed as --runtime-env-json. Arguments travel as an argument vector
# (ray quotes them with shlex.join); nothing here builds a shell string from them.
set -uo pipefail
RUN_DIR=$1; shift; [ "${1:-}" = "--" ] && shift
ADDRESS=${RAY_ADDRESS:-http://127.0.0.1:8265}
MAX=${BRAINLOOP_MAX_SUBMITS:-3}
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}
# Submission ids must be unique per cluster: a second use of this script for the same run gets new ones.
STAMP=$(date +%Y%m%d-%H%M%S)-$$
env_args=()
[ -n "${BRAINLOOP_RUNTIME_ENV_JSON:-}" ] && env_args=(--runtime-env-json "$BRAINLOOP_RUNTIME_ENV_JSON")
for attempt in $(seq 1 "$MAX"); do
  extra=()
  [ "$attempt" -gt 1 ] && extra=(--resume-or-start)
  sid="brainloop-$(basename "$RUN_DIR")-$STAMP-try$attempt"
  if ray job submit --address "$ADDRESS" --submission-id "$sid" "${env_args[@]}" -- \
      "$@" --run-dir "$RUN_DIR" "${extra[@]}"; then
    exit 0
  fi
  code=$(python - "$ADDRESS" "$sid" <<'PY' 2>/dev/null
import sys

from ray.job_submission import JobSubmissionClient

info = JobSubmissionClient(sys.argv[1]).get_job_info(sys.argv[2])
print("" if info.driver_exit_code is None else info.driver_exit_code)
PY
)
  if [ "$code" = 2 ]; then
    echo "[brainloop] attempt $attempt ended with a usage or configuration error (exit 2); not resubmitting" >&2
    exit 2
  fi
  echo "[brainloop] attempt $attempt failed (driver exit code ${code:-unknown}); resubmitting with --resume-or-start" >&2
done
exit 1
