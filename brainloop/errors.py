"""Errors that end a run with one clear line (exit code 1 from ``brainloop.job``), not a traceback.

They live apart from the driver so that the reward pool, which the driver imports lazily, can raise
them too.
"""

from __future__ import annotations

import re


class RunFailure(RuntimeError):
    """The run cannot go on; the message names the cause."""


class FailureBudgetExceeded(RunFailure):
    """More completions failed to score than ``reward.max_failed_fraction`` allows (per step or per run)."""


class RewardPoolStalled(RunFailure):
    """Texts waited longer than their deadline while no reward worker was healthy."""


class RunFolderError(RunFailure):
    """The run folder cannot be written (unwritable, full disk); the last complete checkpoint is intact."""


class AdapterPushError(RunFailure):
    """The sampler failed to load an adapter version the learner produced."""


_EXC_LINE = re.compile(r"^\s*([A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt))(?::\s*(.*))?$")


def short_cause(exc: BaseException, limit: int = 300) -> str:
    """One line for an exception, including one that wraps a remote traceback (Ray's errors): the last
    ``SomeError: message`` line of the text, which is the original cause."""
    text = str(exc)
    causes = [m for line in text.splitlines() if (m := _EXC_LINE.match(line))]
    if causes:
        name, message = causes[-1].group(1), causes[-1].group(2) or ""
        line = f"{name.rsplit('.', 1)[-1]}: {message}".rstrip(": ")
    else:
        line = next((s.strip() for s in text.splitlines() if s.strip()), "") or type(exc).__name__
        line = f"{type(exc).__name__}: {line}" if not line.startswith(type(exc).__name__) else line
    return line[:limit]


class GuardStop(RunFailure):
    """A reward-hacking guard breached with ``guards.action: stop``; a checkpoint of that step was written."""
