"""Library code logs through `logging`; the job entrypoint formats progress lines as `ray job logs` shows them."""

from __future__ import annotations

import ast
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from brainloop.job import LOGGED_PACKAGES, StdoutHandler, configure_logging

REPO = Path(__file__).resolve().parents[1]
# Commands whose printed output is what the user asked for (a table, a report path, the job's outcome line).
USER_OUTPUT = {"brainloop/cli.py", "brainloop/job.py", "brainloop/evaluate.py", "brainloop/report.py"}


@pytest.fixture
def job_logging() -> Iterator[None]:
    configure_logging()
    configure_logging()  # idempotent: still one handler per package
    yield
    for name in LOGGED_PACKAGES:
        logger = logging.getLogger(name)
        for handler in [h for h in logger.handlers if isinstance(h, StdoutHandler)]:
            logger.removeHandler(handler)
        logger.setLevel(logging.NOTSET)


def test_progress_lines_keep_their_form(job_logging: None, capsys: pytest.CaptureFixture[str]) -> None:
    logging.getLogger("brainloop.driver").info("step %d/%d reward %.5f", 3, 20, 0.125)
    logging.getLogger("brainloop.driver").warning("guard %s breached", "length_ratio")
    logging.getLogger("reward_workers.pool").warning("reward worker %d is gone", 1)
    logging.getLogger("brainloop.driver").debug("not shown at INFO")
    assert capsys.readouterr().out.splitlines() == [
        "[brainloop] step 3/20 reward 0.12500", "[brainloop] WARNING guard length_ratio breached",
        "[brainloop] WARNING reward worker 1 is gone"]


def test_library_code_does_not_print() -> None:
    """The core, the roles and the driver log; only commands print their user-facing output."""
    found = []
    for root in LOGGED_PACKAGES:
        for path in sorted((REPO / root).rglob("*.py")):
            rel = path.relative_to(REPO).as_posix()
            if rel in USER_OUTPUT:
                continue
            found += [f"{rel}:{node.lineno}" for node in ast.walk(ast.parse(path.read_text()))
                      if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print"]
    assert not found, found
