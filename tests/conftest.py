"""Fixtures shared by the test modules."""

from __future__ import annotations

import pytest
import ray


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(address="local", num_cpus=4, namespace="brainloop-tests", include_dashboard=False,
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1"}})
    yield
    ray.shutdown()
