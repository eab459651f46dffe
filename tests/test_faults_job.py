"""The job entrypoint refuses bad input and unfit run folders with one line and exit code 2, before it
connects to Ray; without RAY_ADDRESS it starts a private cluster instead of attaching to another.

Everything here is real: the job's ``main``, the demo config, the SmolLM2 tokenizer, checkpoints
written by ``save_checkpoint``. Only the cluster test starts Ray (a private one, in a subprocess).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
import yaml

from brainloop.checkpoint import save_checkpoint
from brainloop.config import dump_config, load_config
from brainloop.job import UsageError
from brainloop.job import main as job_main

ROOT = Path(__file__).parents[1]
DEMO = ROOT / "configs" / "demo.yaml"


RAY_INIT_CALLS: list[dict] = []  # ray.init calls of the running test (the session's own cluster may be up)


@pytest.fixture(autouse=True)
def record_ray_init(monkeypatch):
    """Record the job's ray.init calls instead of asking ray.is_initialized(): another module's test
    cluster may be connected in this process, and that says nothing about what the job did."""
    RAY_INIT_CALLS.clear()
    real_init = ray.init

    def init(*args, **kwargs):
        RAY_INIT_CALLS.append(kwargs)
        return real_init(*args, **kwargs)

    monkeypatch.setattr(ray, "init", init)


def run_job(capsys, *args: str) -> tuple[int, str]:
    code = job_main(["--config", str(DEMO), *args])
    err = capsys.readouterr().err
    assert not RAY_INIT_CALLS, "the job connected to Ray before its checks"
    assert "Traceback" not in err
    return code, err


def make_checkpointed_run(run_dir: Path, overrides: dict | None = None) -> Path:
    """A run folder as a run of the demo config leaves it: config.yaml, a rollout file, a checkpoint."""
    cfg = load_config(DEMO, overrides)
    (run_dir / "rollouts").mkdir(parents=True)
    (run_dir / "rollouts" / "step_000000.parquet").write_bytes(b"rows")
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    config = cfg.model_dump(mode="json")
    config["prompts"]["file_sha256"] = __import__("hashlib").sha256(Path(cfg.prompts.file).read_bytes()).hexdigest()
    (run_dir / "checkpoints").mkdir()
    return save_checkpoint(run_dir / "checkpoints", 0, b"state", {"adapter_config.json": b"{}"}, {"step": 0},
                           config=config)


def test_resume_without_a_complete_checkpoint_is_refused(tmp_path, capsys):
    run_dir = tmp_path / "run"
    (run_dir / "rollouts").mkdir(parents=True)
    (run_dir / "rollouts" / "step_000000.parquet").write_bytes(b"rows")
    (run_dir / "checkpoints" / ".tmp-step_000001").mkdir(parents=True)  # a checkpoint that never completed
    code, err = run_job(capsys, "--run-dir", str(run_dir), "--resume")
    assert code == 2
    assert "has no complete checkpoint" in err and "--resume-or-start" in err and "would be lost" in err
    assert (run_dir / "rollouts" / "step_000000.parquet").exists()  # nothing deleted
    # Without --resume the folder is not overwritten either.
    code, err = run_job(capsys, "--run-dir", str(run_dir))
    assert code == 2 and "already holds a run" in err


def test_resume_or_start_starts_over_without_a_checkpoint(tmp_path):
    from brainloop.job import build_parser, check_run_dir

    run_dir = tmp_path / "run"
    args = build_parser().parse_args(["--config", str(DEMO), "--resume-or-start"])
    assert check_run_dir(load_config(DEMO), run_dir, args) is False
    make_checkpointed_run(run_dir)
    assert check_run_dir(load_config(DEMO), run_dir, args) is True


def test_resume_with_changed_training_config_lists_the_keys(tmp_path, capsys):
    run_dir = tmp_path / "run"
    make_checkpointed_run(run_dir)
    code, err = run_job(capsys, "--run-dir", str(run_dir), "--resume", "--set", "learner.lr=0.5",
                        "--set", "run.steps=99", "--set", "reward.spec.rois=[wernicke]",
                        "--set", "learner.num_cpus=2", "--set", "run.checkpoint_every=1")
    assert code == 2
    assert "learner.lr: 0.001 -> 0.5" in err and "run.steps: 20 -> 99" in err
    assert "reward.spec.rois: ['broca'] -> ['wernicke']" in err and "--force-config" in err
    # Placement and bookkeeping may change on a resume: not listed.
    assert "num_cpus" not in err and "checkpoint_every" not in err
    # Unchanged training config: accepted (placement changes only).
    from brainloop.job import build_parser, check_run_dir

    args = build_parser().parse_args(["--config", str(DEMO), "--resume"])
    assert check_run_dir(load_config(DEMO, {"learner": {"num_cpus": 2}}), run_dir, args) is True
    # A different prompt file (same path, new content) is a training change too.
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(Path(load_config(DEMO).prompts.file).read_text().replace("a", "e", 1))
    with pytest.raises(UsageError, match=r"prompts\.file_sha256"):
        check_run_dir(load_config(DEMO, {"prompts": {"file": str(prompts)}}), run_dir, args)


def test_force_config_resumes_and_records_the_change(tmp_path):
    from brainloop.job import build_parser, check_run_dir

    run_dir = tmp_path / "run"
    make_checkpointed_run(run_dir)
    args = build_parser().parse_args(["--config", str(DEMO), "--resume", "--force-config"])
    assert check_run_dir(load_config(DEMO, {"algo": {"importance_cap": 3.0}}), run_dir, args) is True
    [record] = [json.loads(line) for line in (run_dir / "config_changes.jsonl").read_text().splitlines()]
    assert record["forced"] and record["checkpoint"] == "step_000000"
    assert record["changed"] == {"algo.importance_cap": {"checkpoint": 2.0, "now": 3.0}}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "run.stepz=3"], "run.stepz: Extra inputs are not permitted"),
        (["--set", "run..steps=3"], "is not a dotted key"),
        (["--set", "=3"], "is not a dotted key"),
        (["--set", "run.steps"], "is not of the form section.key=value"),
        (["--set", "run.steps=many"], "run.steps: Input should be a valid integer"),
        (["--set", "reward.spec.rois=[brocas]"], "unknown region"),
        (["--set", "reward.pipeline.encoder={kind: official, config: /nope/c.json, weights: /nope/w.ckpt}"],
         "reward.pipeline.encoder.config: /nope/c.json does not exist"),
        (["--set", "reward.pipeline.encoder={kind: official, release: /nope/tribev2}"],
         "reward.pipeline.encoder.release: /nope/tribev2 is not a directory"),
        (["--set", "sampler.max_model_len=64", "--set", "sampler.max_new_tokens=48"],
         "exceeds sampler.max_model_len 64"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, message, capsys):
    code, err = run_job(capsys, *args)
    assert code == 2, err
    assert message in err
    assert len(err.strip().splitlines()) == 1


def test_bad_yaml_and_broken_prompt_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("run: {steps: 3\n")
    assert job_main(["--config", str(bad)]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    raw = yaml.safe_load(DEMO.read_text())
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"id": "a", "text": "Tell me a story."}\n{"id": "b", "text": "broken\n'
                       '{"id": "c", "text": "   "}\n')
    raw["prompts"]["file"] = str(prompts)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    assert job_main(["--config", str(cfg)]) == 2
    assert "p.jsonl:2: not valid JSON" in capsys.readouterr().err
    prompts.write_text('{"id": "a", "text": "Tell me a story."}\n{"id": "c", "text": "   "}\n')
    assert job_main(["--config", str(cfg)]) == 2
    assert "p.jsonl:2: needs a non-empty string field 'text'" in capsys.readouterr().err


def test_without_ray_address_the_job_starts_a_private_loopback_cluster(tmp_path):
    """A head is running on this machine (the one ray_local.sh starts, recorded as Ray's current cluster
    when it started, or anyone's): `python -m brainloop.job` without RAY_ADDRESS must not attach to it
    or to a stale record of it, but start its own cluster on 127.0.0.1."""
    script = (
        "import os, sys\n"
        "os.environ.pop('RAY_ADDRESS', None)\n"
        "os.environ['RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER'] = '0'\n"
        "import ray\n"
        "from brainloop.config import load_config\n"
        "from brainloop.job import connect_ray\n"
        "where = connect_ray(load_config(sys.argv[1]))\n"
        "ctx = ray.get_runtime_context()\n"
        "print(where, ctx.gcs_address, ray.cluster_resources().get('CPU'), ray._private.worker._global_node"
        ".session_name, flush=True)\n"
        "ray.shutdown()\n"
    )
    record = Path("/tmp/ray/ray_current_cluster")
    recorded = record.read_text().strip() if record.is_file() else None
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = subprocess.run([sys.executable, "-c", script, str(DEMO)], env=env, capture_output=True, text=True,
                         timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    where, gcs, cpus, _session = out.stdout.strip().splitlines()[-1].rsplit(" ", 3)
    assert where.startswith("a private local Ray cluster (127.0.0.1:")
    assert gcs.startswith("127.0.0.1:") and gcs != recorded
    assert float(cpus) >= 4  # sampler + learner + two reward workers fit, even on a 2-core machine


def test_unreachable_cluster_is_one_line_and_exit_1(tmp_path, capsys, monkeypatch):
    """RAY_ADDRESS pointing nowhere: one line within seconds, not minutes of ray.init retries and a traceback."""
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:9")  # the discard port: nothing listens
    start = time.monotonic()
    code = job_main(["--config", str(DEMO), "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert err.strip() == "[brainloop] run failed: cannot reach the Ray cluster at 127.0.0.1:9 (RAY_ADDRESS): " \
                          "Connection refused"
    assert time.monotonic() - start < 60 and not RAY_INIT_CALLS  # refused before ray.init
