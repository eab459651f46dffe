"""Bad input is caught before any actor starts, with the offending field or line named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from brainloop.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from brainloop.config import ConfigError, load_config, parse_override
from brainloop.job import main as job_main
from brainloop.prompts import PromptFileError, load_prompts, prompts_for_step, split

ROOT = Path(__file__).parents[1]
DEMO = ROOT / "configs" / "demo.yaml"


def test_shipped_configs_validate():
    demo = load_config(DEMO)
    assert demo.sampler.engine == "vllm" and demo.reward.num_workers == 2
    assert Path(demo.prompts.file).is_file()
    ref = load_config(ROOT / "configs" / "reference_qwen3b_broca.yaml")
    assert ref.policy.model == "Qwen/Qwen2.5-3B-Instruct"
    assert (ref.policy.lora.r, ref.policy.lora.alpha, ref.policy.lora.dropout) == (32, 64, 0.05)
    assert ref.policy.lora.target_modules == ["q_proj", "v_proj", "o_proj", "down_proj"]
    assert (ref.sampler.num_completions, ref.sampler.max_new_tokens) == (4, 200)
    assert (ref.sampler.temperature_start, ref.sampler.temperature_end) == (1.0, 0.6)
    assert (ref.learner.lr, ref.learner.weight_decay, ref.learner.warmup_steps) == (5e-5, 0.01, 5)
    assert (ref.learner.min_lr_ratio, ref.learner.grad_clip, ref.learner.kl_coef) == (0.05, 0.5, 0.1)
    assert ref.run.steps == 200 and ref.reward.spec.rois == ["broca"]
    assert ref.reward.pipeline.encoder.kind == "official" and ref.reward.pipeline.tts == "gtts"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"sampler": {"engnie": "vllm"}}, "sampler.engnie: Extra inputs"),
        ({"sampler": {"engine": "tgi"}}, "sampler.engine"),
        ({"sampler": {"num_completions": 1}}, "sampler.num_completions"),
        ({"learner": {"lr": -1}}, "learner.lr"),
        ({"reward": {"spec": {"rois": ["brocas"]}}}, "unknown region"),
        ({"reward": {"num_workers": 0}}, "reward.num_workers"),
        ({"algo": {"max_staleness": 2}}, "max_loaded_adapters must be at least"),
        ({"reward": {"pipeline": {"encoder": {"kind": "official"}}}}, "needs both 'config' and 'weights'"),
    ],
)
def test_bad_config_values_name_the_field(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(DEMO, override)


def test_bad_config_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("run: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)


def test_override_parsing():
    assert parse_override("run.steps=60") == {"run": {"steps": 60}}
    assert parse_override("reward.spec.rois=[broca, wernicke]") == {"reward": {"spec": {"rois": ["broca", "wernicke"]}}}
    with pytest.raises(ConfigError):
        parse_override("run.steps")


def test_prompt_file_errors_name_the_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"id": "a", "text": "fine"}\n{"id": "b", "text": \n')
    with pytest.raises(PromptFileError, match=r"p\.jsonl:2: not valid JSON"):
        load_prompts(path)
    path.write_text('{"id": "a", "text": ""}\n')
    with pytest.raises(PromptFileError, match=":1: needs a non-empty string field 'text'"):
        load_prompts(path)
    path.write_text('{"id": "a", "text": "x"}\n{"id": "a", "text": "y"}\n')
    with pytest.raises(PromptFileError, match="duplicate prompt id"):
        load_prompts(path)
    path.write_text('{"id": "a", "text": "x", "split": "test"}\n')
    with pytest.raises(PromptFileError, match="split must be"):
        load_prompts(path)
    path.write_text("\n\n")
    with pytest.raises(PromptFileError, match="holds no prompts"):
        load_prompts(path)


def test_job_refuses_bad_config_before_starting(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    raw = yaml.safe_load(DEMO.read_text())
    raw["prompts"]["file"] = str(tmp_path / "missing.jsonl")
    cfg.write_text(yaml.safe_dump(raw))
    assert job_main(["--config", str(cfg)]) == 2
    assert "configuration error" in capsys.readouterr().err
    assert job_main(["--config", str(DEMO), "--validate-only"]) == 0


def test_shipped_prompt_set():
    prompts = load_prompts(ROOT / "configs" / "prompts.jsonl")
    assert len(prompts) >= 64 and len({p.text for p in prompts}) == len(prompts)
    train, held = split(prompts, "train"), split(prompts, "held_out")
    assert len(held) >= 8 and not {p.id for p in train} & {p.id for p in held}
    # A step's prompts are a function of (seed, step): a resumed run draws the same ones.
    assert prompts_for_step(train, 5, 2, 0) == prompts_for_step(train, 5, 2, 0)
    assert prompts_for_step(train, 5, 2, 0) != prompts_for_step(train, 6, 2, 0)


def test_checkpoints_are_atomic(tmp_path):
    root = tmp_path / "ckpt"
    root.mkdir()
    save_checkpoint(root, 1, b"state-1", {"adapter_config.json": b"{}"}, {"step": 1})
    # A crash while writing step 3 leaves a temporary folder: never used.
    half = root / ".tmp-step_000003"
    half.mkdir()
    (half / "learner_state.pt").write_bytes(b"partial")
    # A folder with the final name but no COMPLETE marker is not used either.
    (root / "step_000002").mkdir()
    assert latest_checkpoint(root).name == "step_000001"
    state, adapter, driver = load_checkpoint(latest_checkpoint(root))
    assert state == b"state-1" and adapter == {"adapter_config.json": b"{}"} and driver == {"step": 1}
    for step in (3, 4, 5, 6):
        save_checkpoint(root, step, b"s", {}, {"step": step}, keep=3)
    assert [p.name for p in sorted(root.glob("step_*")) if (p / "COMPLETE").exists()] == [
        "step_000004", "step_000005", "step_000006"]


def test_ray_cluster_yaml_passes_rays_own_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())
    config = prepare_config(raw)
    validate_config(config)
    types = config["available_node_types"]
    assert types["reward_l40s"]["max_workers"] > types["reward_l40s"]["min_workers"]  # autoscaling reward pool
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start and "RAY_AUTH_MODE=token" in head_start
    assert "RAY_AUTH_MODE=token" in " ".join(config["docker"]["run_options"])
    # The reference config places reward workers on the autoscaling node type's custom resource.
    ref = load_config(ROOT / "configs" / "reference_qwen3b_broca.yaml")
    assert set(ref.reward.resources) <= set(types["reward_l40s"]["resources"])
    assert set(ref.sampler.resources) <= set(types["policy_gpu"]["resources"])
    json.dumps(config)  # serialisable as the launcher needs
