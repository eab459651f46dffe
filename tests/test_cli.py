"""The one CLI: `brainloop train` is the job entrypoint; user errors exit 2 with one line, no traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from brainloop.cli import main

REPO = Path(__file__).resolve().parents[1]


def test_train_is_the_job_entrypoint(capsys) -> None:
    assert main(["train", "--config", str(REPO / "configs" / "demo.yaml"), "--validate-only"]) == 0
    assert "valid (72 prompts" in capsys.readouterr().out
    assert main(["train", "--config", str(REPO / "configs" / "demo.yaml"), "--validate-only",
                 "--set", "run.stepz=3"]) == 2
    assert "stepz" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:  # argparse usage error: exit 2
        main(["train"])
    assert exc.value.code == 2


@pytest.mark.parametrize("argv", [["score", "a text", "--config", "no/such.yaml"],
                                  ["eval", "--config", "no/such.yaml", "--adapter", "x"]])
def test_user_errors_exit_2_without_traceback(argv: list[str], capsys) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "no/such.yaml" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_help_lists_every_subcommand_and_the_exit_codes(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for command in ("train", "summary", "score", "eval", "report"):
        assert command in out
    assert "2 usage or" in out
