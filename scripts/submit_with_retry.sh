#!/usr/bin/env bash
# `ray job submit` never retries a failed job. This wrapper resubmits with --resume (up to
# BRAINLOOP_MAX_SUBMITS times) so a driver or learner crash continues from the last checkpoint.
#   scripts/submit_with_retry.sh RUN_DIR -- python -m brainloop.job --config configs/demo.yaml
set -uo pipefail
RUN_DIR=$1; shift; [ "${1:-}" = "--" ] && shift
ADDRESS=${RAY_ADDRESS:-http://127.0.0.1:8265}
MAX=${BRAINLOOP_MAX_SUBMITS:-3}
for attempt in $(seq 1 "$MAX"); do
  extra=()
  [ "$attempt" -gt 1 ] && extra=(--resume)
  if RAY_AUTH_MODE=${RAY_AUTH_MODE:-token} ray job submit --address "$ADDRESS" \
      --submission-id "brainloop-$(basename "$RUN_DIR")-try$attempt" -- "$@" --run-dir "$RUN_DIR" "${extra[@]}"; then
    exit 0
  fi
  echo "[brainloop] attempt $attempt failed; resubmitting with --resume" >&2
done
exit 1
