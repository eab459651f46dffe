#!/usr/bin/env bash
# The README's main command as CI runs it: `scripts/demo.sh` with a 2-step override through the
# local head and `ray job submit`, then checks of what the run wrote. Stops the head it used.
#   bash scripts/ci_demo.sh [extra demo.sh arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
RUN_DIR=$PWD/runs/ci-demo-$(date +%Y%m%d-%H%M%S)
trap 'bash scripts/ray_local.sh stop || true' EXIT
BRAINLOOP_RUN_DIR=$RUN_DIR bash scripts/demo.sh --set run.steps=2 --set run.checkpoint_every=1 "$@"
. "${BRAINLOOP_VENV:-.venv}/bin/activate"
python - "$RUN_DIR" <<'PY'
import json
import sys
from pathlib import Path

import pyarrow.parquet as pq

run = Path(sys.argv[1])
rollouts = sorted((run / "rollouts").glob("*.parquet"))
steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
steps = [m for m in steps if "reward_mean" in m]
problems = []
if len(rollouts) != 2:
    problems.append(f"expected 2 rollout files, found {len(rollouts)}")
rows = sum(pq.read_metadata(p).num_rows for p in rollouts)
if rows != 2 * 2 * 4:  # steps x prompts_per_step x num_completions of configs/demo.yaml
    problems.append(f"expected 16 rollout rows, found {rows}")
if len(steps) != 2:
    problems.append(f"expected 2 steps in metrics.jsonl, found {len(steps)}")
if not (run / "final_adapter" / "adapter_model.safetensors").is_file():
    problems.append("no final_adapter/adapter_model.safetensors")
if not any((run / "checkpoints").glob("*")):
    problems.append("no checkpoint")
if problems:
    sys.exit("[ci] demo run incomplete: " + "; ".join(problems))
print(f"[ci] demo run ok: {len(rollouts)} rollout files, {rows} rows, {len(steps)} steps, final adapter, checkpoints")
PY
