"""Real local Ray heads for the tests that need one started the way the demo starts it
(``scripts/ray_local.sh``: token auth, its own ports), and stopped by those ports — never ``ray stop``,
which would stop every Ray process on the machine (other test modules' clusters included)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def head_env(ports: Mapping[str, str], **extra: str) -> dict[str, str]:
    """This process's environment for a head on ``ports`` (``BRAINLOOP_RAY_PORT`` etc.): no inherited
    RAY_ADDRESS (it would point at another cluster) nor single-machine mode (ray_local.sh sets it for
    loopback heads, and a multi-node head must not have it), token auth, offline hub."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    env.update(ports, RAY_AUTH_MODE="token", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", **extra)
    return env


@contextmanager
def local_head(env: Mapping[str, str]) -> Iterator[dict[str, str]]:
    """A head started by ``scripts/ray_local.sh start`` with ``env``; stopped on exit, also when the test
    fails (``ray_local.sh stop`` stops the processes of this head's port only, joined nodes included)."""
    env = dict(env)
    subprocess.run(["bash", "scripts/ray_local.sh", "start"], cwd=ROOT, env=env, check=True, timeout=180)
    try:
        yield env
    finally:
        subprocess.run(["bash", "scripts/ray_local.sh", "stop"], cwd=ROOT, env=env, timeout=120)
