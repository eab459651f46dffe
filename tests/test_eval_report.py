"""Evaluation, report and dashboard: stats on hand cases, a real ``brainloop eval``, ``brainloop report``.

``eval`` runs for real through the CLI: the transformers engine on SmolLM2-135M-Instruct with a PEFT
adapter whose LoRA weights are random and non-zero (so it changes the policy), 2 held-out prompts
x 2 completions x 8 tokens per model, scored by the embedded reward pipeline. ``report`` runs on a
run directory written with the real ``RunFiles`` (Parquet schema, metrics.jsonl) plus that eval.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from brainloop import stats
from brainloop.cli import main as cli_main
from brainloop.config import dump_config, load_config
from brainloop.evaluate import MEASURES, MODELS, measure_column
from brainloop.metrics import BY_NAME
from brainloop.rois import ROI_NAMES, SUMMARY_NAMES
from brainloop.rollout_log import RunFiles

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "demo.yaml"
DASHBOARD = REPO / "monitoring" / "grafana_brainloop.json"

# ---------------------------------------------------------------------------- stats: hand cases


def test_mean_se_hand_cases() -> None:
    mean, se = stats.mean_se([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5
    assert se == pytest.approx(np.sqrt(5.0 / 3.0) / 2.0)  # sd (ddof=1) = sqrt(5/3), n = 4
    mean, se = stats.mean_se([5.0])
    assert mean == 5.0 and np.isnan(se)
    for bad in ([], [1.0, np.nan], [[1.0, 2.0]]):
        with pytest.raises(ValueError):
            stats.mean_se(bad)


def test_bootstrap_hand_cases() -> None:
    assert stats.bootstrap_diff_ci([1, 1, 1], [3, 3, 3]) == (2.0, 2.0, 2.0)
    # b = [0, 1]: resampled means are 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4; a is always 0.
    ci = stats.bootstrap_diff_ci([0, 0], [0, 1])
    assert ci.diff == 0.5 and ci.low == 0.0 and ci.high == 1.0
    # Same seed, same interval; another seed, another Monte Carlo draw.
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=50), rng.normal(0.5, 1.0, size=60)
    assert stats.bootstrap_diff_ci(a, b, seed=1) == stats.bootstrap_diff_ci(a, b, seed=1)
    assert stats.bootstrap_diff_ci(a, b, seed=1) != stats.bootstrap_diff_ci(a, b, seed=2)


def test_bootstrap_matches_normal_theory_on_large_samples() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.normal(0.0, 1.0, 400), rng.normal(0.3, 2.0, 400)
    ci = stats.bootstrap_diff_ci(a, b, n_boot=20000)
    se = np.sqrt(a.var(ddof=1) / a.size + b.var(ddof=1) / b.size)
    assert ci.diff == pytest.approx(b.mean() - a.mean())
    assert ci.low == pytest.approx(ci.diff - 1.96 * se, abs=0.1 * se)
    assert ci.high == pytest.approx(ci.diff + 1.96 * se, abs=0.1 * se)
    narrow = stats.bootstrap_diff_ci(a, b, n_boot=20000, level=0.5)
    assert ci.low < narrow.low < narrow.high < ci.high


def test_bootstrap_strata_keep_the_prompt_mix() -> None:
    # Two prompts with very different levels; within each, b is exactly a + 1.
    a, b, strata = [0, 0, 10, 10], [1, 1, 11, 11], ["x", "x", "y", "y"]
    assert stats.bootstrap_diff_ci(a, b, strata_a=strata, strata_b=strata) == (1.0, 1.0, 1.0)
    plain = stats.bootstrap_diff_ci(a, b)  # resampling mixes the prompts: a wide interval
    assert plain.diff == 1.0 and plain.high - plain.low > 5
    with pytest.raises(ValueError, match="only one of the two samples"):
        stats.bootstrap_diff_ci(a, b, strata_a=strata, strata_b=["x", "x", "z", "z"])
    with pytest.raises(ValueError):
        stats.bootstrap_diff_ci(a, b, level=1.0)


def test_permutation_hand_cases() -> None:
    # All labellings give |T| = 0 = |T_obs|: every permutation counts, p = 1.
    assert stats.permutation_pvalue([1, 1, 1], [1, 1, 1]) == 1.0
    assert stats.permutation_pvalue([1, 2], [2, 1]) == 1.0
    # 4 zeros vs 4 ones: 2 of the C(8,4) = 70 splits are as extreme, p -> 2/70 (Monte Carlo, 10^4 draws).
    assert stats.permutation_pvalue([0, 0, 0, 0], [1, 1, 1, 1]) == pytest.approx(2 / 70, abs=0.006)
    # Completely separated samples of 20: no permutation reaches |T_obs|, so p is the +1 floor.
    assert stats.permutation_pvalue(np.zeros(20), np.ones(20)) == 1 / 10001
    assert stats.permutation_pvalue(np.zeros(20), np.ones(20), n_perm=99) == 0.01
    # Unstratified, a = [0, 10], b = [1, 11]: 4 of the 6 splits have |T| >= 1.
    assert stats.permutation_pvalue([0, 10], [1, 11]) == pytest.approx(4 / 6, abs=0.015)
    # Stratified (x: 0 vs 1, y: 10 vs 11): swaps within strata give T in {1, 0, 0, -1}: p -> 1/2.
    assert stats.permutation_pvalue([0, 10], [1, 11], strata_a=["x", "y"], strata_b=["x", "y"]) == \
        pytest.approx(0.5, abs=0.015)
    assert stats.permutation_pvalue([0, 10], [1, 11], seed=5) == stats.permutation_pvalue([0, 10], [1, 11], seed=5)


def test_holm_hand_case() -> None:
    # Sorted: 0.01*3 = 0.03, 0.03*2 = 0.06, 0.04*1 = 0.04 -> monotone 0.03, 0.06, 0.06; NaN stays out.
    np.testing.assert_allclose(stats.holm([0.01, 0.04, 0.03, np.nan]), [0.03, 0.06, 0.06, np.nan])
    np.testing.assert_allclose(stats.holm([0.5, 0.9]), [1.0, 1.0])


# ---------------------------------------------------------------------------- dashboard


def _exprs(dashboard: dict) -> list[str]:
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def test_grafana_dashboard_queries_what_brainloop_exports() -> None:
    dash = json.loads(DASHBOARD.read_text())
    exprs = _exprs(dash)
    text = "\n".join(exprs)
    # Ray exports application metrics with the "ray_" prefix (checked live against Ray 2.60).
    for key in ("reward_mean", "reward_max", "kl_per_token", "kl_per_sequence", "loss", "grad_norm", "lr",
                "tokens_per_second", "queue_depth", "in_flight", "probe_sampler_vs_learner", "version",
                "staleness_max"):
        assert re.search(rf"\bray_brainloop_{key}\{{", text), key
    assert 'ray_brainloop_roi_.+' in text
    assert "ray_brainloop_reward_stage_seconds_bucket" in text and "by (le, stage)" in text
    names = set(re.findall(r"\b(ray_\w+|brainloop_\w+)", text))
    assert all(n.startswith("ray_brainloop_") for n in names), names
    # Only documented metrics (brainloop.metrics), each filtered by the role that reports it.
    for name, selector in re.findall(r"\bray_brainloop_(\w+)\{([^}]*)\}", text):
        base = re.sub(r"_(bucket|sum|count)$", "", name) if BY_NAME.get(name) is None else name
        assert base in BY_NAME, name
        role = re.search(r'role="([^"]*)"', selector)
        assert role is None or role.group(1) == BY_NAME[base].role, (name, selector)
    for e in exprs:
        assert e.count("(") == e.count(")") and e.count("{") == e.count("}"), e
        assert "$run" in e  # every query follows the run selector
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    cells = set()
    for p in dash["panels"]:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & mine, f"panel {p['title']!r} overlaps another"
        cells |= mine
    assert {v["name"] for v in dash["templating"]["list"]} == {"datasource", "run", "SessionName"}


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Prometheus) not installed")
def test_grafana_queries_parse_with_promtool(tmp_path: Path) -> None:
    import yaml

    exprs = [e.replace("$run", ".*").replace("$SessionName", ".*").replace("$__rate_interval", "1m")
             for e in _exprs(json.loads(DASHBOARD.read_text()))]
    rules = {"groups": [{"name": "dashboard", "rules": [{"record": f"brainloop:check{i}", "expr": e}
                                                        for i, e in enumerate(exprs)]}]}
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump(rules))
    done = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


# ---------------------------------------------------------------------------- eval, for real


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory) -> Path:
    """A real ``brainloop eval`` of a random non-zero LoRA adapter on SmolLM2 (transformers engine)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from brainloop.models import resolve_model

    root = tmp_path_factory.mktemp("evalrun")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(resolve_model("pkg:smollm2-135m-instruct"))
    # init_lora_weights=False keeps nn.Linear's random init for B too: the adapter is not a no-op.
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                  init_lora_weights=False))
    peft_model.save_pretrained(str(root / "final_adapter"))
    del peft_model, model
    rc = cli_main(["eval", "--config", str(CONFIG), "--adapter", str(root / "final_adapter"), "--n", "2",
                   "--max-prompts", "2", "--set", "sampler.engine=transformers", "--set", "sampler.max_new_tokens=8",
                   "--set", "sampler.cpu_threads=1", "--seed", "11", "--voices", "2"])
    assert rc == 0
    return root / "eval"  # the default output directory: RUN_DIR/eval


def test_eval_outputs(evaluated: Path) -> None:
    from brainloop import rois

    samples = pd.read_parquet(evaluated / "samples.parquet")
    settings = json.loads((evaluated / "settings.json").read_text())
    held_out = [json.loads(line)["id"] for line in (REPO / "configs" / "prompts.jsonl").read_text().splitlines()
                if line.strip() and json.loads(line).get("split") == "held_out"][:2]
    assert settings["prompt_ids"] == held_out
    assert settings["sampling"] == {"n": 2, "temperature": 1.0, "top_p": 1.0, "top_k": 0, "max_new_tokens": 8,
                                    "seed": 11, "engine": "transformers"}
    assert len(samples) == 2 * 2 * 2
    assert list(samples.groupby("model").size()) == [4, 4]
    assert set(samples.loc[samples["model"] == "base", "adapter_version"]) == {0}
    assert set(samples.loc[samples["model"] == "trained", "adapter_version"]) == {1}
    for col, value in (("temperature", 1.0), ("top_p", 1.0), ("top_k", 0), ("max_new_tokens", 8)):
        assert (samples[col] == value).all(), col
    assert samples["num_tokens"].between(1, 8).all()
    base = samples[samples["model"] == "base"].reset_index(drop=True)
    trained = samples[samples["model"] == "trained"].reset_index(drop=True)
    # Paired by design: the same prompt and per-sample seed; the adapter changes what is sampled.
    assert list(base["sample_seed"]) == list(trained["sample_seed"]) and base["sample_seed"].nunique() == 4
    assert list(base["prompt_id"]) == list(trained["prompt_id"])
    assert (base["completion"] != trained["completion"]).any()

    ok = samples[samples["status"] == "ok"]
    assert len(ok) >= 6, samples[["status", "error"]]
    map_sum = {m: np.zeros(rois.N_VERTICES) for m in MODELS}
    for row in ok.itertuples():
        prediction = np.load(evaluated / row.prediction_file)
        assert prediction.shape == (row.n_trs, rois.N_VERTICES)
        courses = rois.roi_means(prediction)
        for name in (*ROI_NAMES, *SUMMARY_NAMES):  # the recorded ROI means are the saved prediction's
            assert getattr(row, f"roi_{name}") == pytest.approx(float(courses[name].mean()), abs=1e-6)
        assert row.reward == pytest.approx(float(courses["broca"].mean()), abs=1e-6)  # demo spec: mean Broca
        map_sum[row.model] += prediction.mean(axis=0)
    for m in MODELS:
        saved = np.load(evaluated / f"mean_map_{m}.npy")
        n = int((ok["model"] == m).sum())
        assert saved.shape == (rois.N_VERTICES,)
        np.testing.assert_allclose(saved, map_sum[m] / n, rtol=1e-5, atol=1e-6)
        ts = np.load(evaluated / f"mean_timeseries_{m}.npz")
        assert list(ts["measures"]) == list(MEASURES)
        assert ts["mean"].shape == ts["se"].shape == ts["count"].shape
        assert ts["mean"].shape[1] == ok.loc[ok["model"] == m, "n_trs"].max()
        assert ts["count"][:, 0].tolist() == [n] * len(MEASURES)  # every completion has TR 0

    table = pd.read_parquet(evaluated / "roi_stats.parquet").set_index("measure")
    assert list(table.index) == list(MEASURES)
    assert bool(table.loc["broca", "is_target"]) and not bool(table.loc["v1", "is_target"])
    for measure in ("reward", "broca", "v1", "global"):
        col = measure_column(measure)
        a = ok.loc[ok["model"] == "base", col].to_numpy()
        b = ok.loc[ok["model"] == "trained", col].to_numpy()
        r = table.loc[measure]
        assert r["base_mean"] == pytest.approx(a.mean()) and r["trained_mean"] == pytest.approx(b.mean())
        assert r["diff"] == pytest.approx(b.mean() - a.mean())
        assert r["ci_low"] <= r["diff"] <= r["ci_high"]
        assert 1 / 10001 <= r["p_value"] <= 1.0 and r["p_holm"] >= r["p_value"] - 1e-12


def test_eval_analysis_columns_and_voices(evaluated: Path) -> None:
    """Selectivity, speech and text columns recomputed by hand from each row; base NLL from the base model;
    ``--voices 2`` scored every completion under a second espeak variant."""
    import torch
    from transformers import AutoModelForCausalLM

    from brainloop import analysis
    from brainloop.models import resolve_model

    samples = pd.read_parquet(evaluated / "samples.parquet")
    ok = samples[samples["status"] == "ok"]
    for row in ok.itertuples():
        assert row.target_response == pytest.approx(row.roi_broca)
        assert row.selectivity_global == pytest.approx(row.roi_broca - row.roi_global)
        assert row.selectivity_control == pytest.approx(row.roi_broca - (row.roi_v1 + row.roi_lateral_occipital) / 2)
        assert row.words_per_second == pytest.approx(row.n_words / row.audio_seconds, rel=1e-5)
        assert 0.0 <= row.removed_token_fraction <= 1.0
        text = analysis.text_statistics(row.completion)
        assert (row.sentence_length, row.type_token_ratio) == pytest.approx(
            (text["sentence_length"], text["type_token_ratio"]), nan_ok=True)
        assert row.splitter in ("sentencizer", "en_core_web_lg") and row.n_words_kept >= 1
    # The base model's NLL per token of a completion, recomputed with transformers on the chat-formatted prompt.
    path = resolve_model("pkg:smollm2-135m-instruct")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    row = samples[samples["model"] == "trained"].iloc[0]
    prompt_ids = tok.apply_chat_template([{"role": "user", "content": row["prompt"]}], add_generation_prompt=True,
                                         tokenize=True, return_dict=False)
    completion_ids = tok(row["completion"], add_special_tokens=False)["input_ids"]
    ids = torch.tensor([list(prompt_ids) + completion_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, len(prompt_ids) - 1 : -1].double(), -1)
    nll = -logp.gather(1, ids[0, len(prompt_ids):, None]).mean().item()
    # Re-tokenising the decoded text may differ from the sampled ids by a token; a loose check of the same quantity.
    assert row["base_nll_per_token"] == pytest.approx(nll, rel=0.15)
    assert samples["base_nll_per_token"].notna().all()

    voices = pd.read_parquet(evaluated / "voices.parquet")
    assert sorted(voices["variant"].unique()) == [0, 1]
    assert len(voices) == 2 * len(ok)
    main = voices[voices["variant"] == 0].merge(ok, on=["model", "prompt_id", "sample_index"])
    np.testing.assert_allclose(main["reward_x"], main["reward_y"])  # variant 0 is the main scoring
    other = voices[voices["variant"] == 1]
    assert (other["status"] == "ok").all() and json.loads(other["options"].iloc[0]) == {"rate": 140}
    assert not np.allclose(main["reward_x"].to_numpy(), other.sort_values(["model", "prompt_id", "sample_index"])
                           ["reward"].to_numpy())  # a slower voice really changes the prediction
    settings = json.loads((evaluated / "settings.json").read_text())
    spread = settings["voice_spread"]
    assert spread["n_variants"] == 2 and spread["n_texts"] == len(ok)
    per_text = voices.groupby(["model", "prompt_id", "sample_index"])["reward"].std()
    assert spread["median_sd"] == pytest.approx(float(np.median(per_text)))
    assert spread["flagged"] == (abs(spread["reward_diff"]) < spread["median_sd"])


# ---------------------------------------------------------------------------- report


def make_run(root: Path, steps: int = 4, prompts: int = 2, n: int = 3) -> Path:
    """A run directory as the driver writes it (real RunFiles, real schema), one failed sample."""
    rng = np.random.default_rng(0)
    files = RunFiles(root)
    (root / "config.yaml").write_text(dump_config(load_config(CONFIG)))
    for step in range(steps):
        rows = []
        for pi in range(prompts):
            for j in range(n):
                failed = (step, pi, j) == (1, 0, 0)
                roi = {name: float(rng.normal(0.01 * step, 0.02)) for name in (*ROI_NAMES, *SUMMARY_NAMES)}
                row = {"step": step, "prompt_index": pi, "sample_index": j, "prompt_id": f"p{pi:03d}",
                       "prompt": f"prompt {pi}", "completion": f"completion {step} {pi} {j}", "num_tokens": 10 + j,
                       "finish_reason": "length", "adapter_version": step, "learner_version": step,
                       "temperature": 1.0, "status": "failed" if failed else "ok",
                       "error": "RuntimeError: boom" if failed else None, "reward": None if failed else roi["broca"],
                       "advantage": None if failed else 0.0, "used_in_update": not failed, "n_words": 3, "n_trs": 3,
                       "audio_seconds": 2.0, "reward_worker": "reward-worker-0", "reward_attempts": 1,
                       "cache_hit": False, "encoder_trained": False, "timings_json": "{}", "sampled_at": 1.0,
                       "scored_at": 2.0, "updated_at": 3.0}
                row.update({f"roi_{k}": None if failed else v for k, v in roi.items()})
                rows.append(row)
        files.write_rollouts(step, rows)
        rewards = np.array([r["reward"] for r in rows if r["reward"] is not None])
        files.append_metrics({"step": step, "reward_mean": float(rewards.mean()), "reward_std": float(rewards.std()),
                              "reward_max": float(rewards.max()), "mean_tokens": 11.0, "loss": 0.5 - 0.1 * step,
                              "kl_per_token": 0.01 * step, "kl_per_sequence": 0.1 * step, "grad_norm": 1.0,
                              "lr": 1e-3, "version": step + 1})
        files.append_metrics({"probe": {"version": step + 1, "sampler_vs_learner": 1e-3, "adapter_vs_base": 0.1,
                                        "sampler_vs_base": 0.1}, "step": step})
    return root


FIGURES = ["training_curves.png", "eval_roi_bars.png", "eval_summary.png", "eval_roi_timeseries.png",
           "surface_base.png", "surface_trained.png", "surface_diff.png"]


def test_report_numbers_are_the_parquet_data(evaluated: Path, tmp_path: Path) -> None:
    from brainloop.report import build_report

    run = make_run(tmp_path / "run")
    numbers = build_report(run, eval_dir=evaluated)
    out = run / "report"
    for name in FIGURES:
        assert (out / name).stat().st_size > 20_000, name  # a real figure, not an empty canvas
    md = (out / "report.md").read_text()
    for name in FIGURES:
        assert f"]({name})" in md
    assert "**broca** (target)" in md and "Untrained encoder" in md and "```text" in md
    saved = json.loads((out / "report_numbers.json").read_text())  # strict JSON (NaN written as null)
    assert saved["target_regions"] == ["broca"] and saved["figures"] == numbers["figures"]

    # Training: recomputed here from the Parquet rows.
    rollouts = pd.read_parquet(run / "rollouts")
    scored = rollouts[rollouts["reward"].notna()]
    per_step = saved["training"]["per_step"]
    assert per_step["step"] == [0, 1, 2, 3] and per_step["n"] == [6, 5, 6, 6]
    for i, step in enumerate(per_step["step"]):
        r = scored.loc[scored["step"] == step, "reward"].to_numpy()
        assert per_step["reward_mean"][i] == pytest.approx(r.mean(), abs=1e-12)
        assert per_step["reward_sd"][i] == pytest.approx(r.std(), abs=1e-12)
        assert per_step["running_best"][i] == pytest.approx(scored.loc[scored["step"] <= step, "reward"].max())
    tr = saved["training"]
    assert tr["status_counts"] == {"ok": 23, "failed": 1} and tr["window"] == 2
    first = scored.loc[scored["step"] <= 1, "reward"].to_numpy()
    last = scored.loc[scored["step"] >= 2, "reward"].to_numpy()
    assert tr["first"]["mean"] == pytest.approx(first.mean()) and tr["last"]["mean"] == pytest.approx(last.mean())
    assert tr["gain"]["diff"] == pytest.approx(last.mean() - first.mean())
    assert tr["gain"]["p_value"] == stats.permutation_pvalue(first, last)
    assert tr["kl_per_token"] == pytest.approx([0.0, 0.01, 0.02, 0.03])
    assert tr["metrics_reward_mean_max_abs_diff"] < 1e-12
    assert f"{last.mean() - first.mean():+.5f}" in md

    # Evaluation: recomputed here from samples.parquet with the stats functions.
    samples = pd.read_parquet(evaluated / "samples.parquet")
    ok = samples[samples["status"] == "ok"]
    ev = saved["eval"]
    assert ev["n_ok"] == {m: int((ok["model"] == m).sum()) for m in MODELS}
    assert ev["roi_stats_file_max_abs_diff"] < 1e-12
    for measure in MEASURES:
        col = measure_column(measure)
        a, b = (ok[ok["model"] == m] for m in MODELS)
        ci = stats.bootstrap_diff_ci(a[col], b[col], strata_a=a["prompt_id"], strata_b=b["prompt_id"])
        p = stats.permutation_pvalue(a[col], b[col], strata_a=a["prompt_id"], strata_b=b["prompt_id"])
        got = ev["measures"][measure]
        assert got["base_mean"] == pytest.approx(a[col].mean(), abs=1e-12)
        assert got["trained_mean"] == pytest.approx(b[col].mean(), abs=1e-12)
        assert (got["diff"], got["ci_low"], got["ci_high"], got["p_value"]) == pytest.approx((*ci, p), abs=1e-12)
        assert f"{got['diff']:+.5f} [{got['ci_low']:+.5f}, {got['ci_high']:+.5f}]" in md
    # What changed in the text: recomputed here, Holm across the set, percent change of the reward.
    measures = list(ev["text_change"])
    assert measures == ["reward", "selectivity_global", "selectivity_control", "base_nll_per_token",
                        "words_per_second", "sentence_length", "punctuation_rate", "type_token_ratio"]
    a, b = (ok[ok["model"] == m] for m in MODELS)
    pvals = []
    for measure in measures:
        keep_a, keep_b = a[np.isfinite(a[measure].astype(float))], b[np.isfinite(b[measure].astype(float))]
        p = stats.permutation_pvalue(keep_a[measure], keep_b[measure], strata_a=keep_a["prompt_id"],
                                     strata_b=keep_b["prompt_id"])
        assert ev["text_change"][measure]["p_value"] == pytest.approx(p, abs=1e-12)
        assert ev["text_change"][measure]["diff"] == pytest.approx(keep_b[measure].mean() - keep_a[measure].mean())
        pvals.append(p)
    np.testing.assert_allclose([ev["text_change"][m]["p_holm"] for m in measures], stats.holm(pvals), atol=1e-12)
    pc = stats.bootstrap_percent_change_ci(a["reward"], b["reward"], strata_a=a["prompt_id"], strata_b=b["prompt_id"])
    got = ev["text_change"]["reward"]
    assert (got["pct_change"], got["pct_ci_low"], got["pct_ci_high"]) == pytest.approx(tuple(pc), abs=1e-9)
    assert ev["text_stats_file_max_abs_diff"] < 1e-12
    assert "## What changed in the text" in md and f"{got['pct_change']:+.1f} % from base" in md
    risers = ev["top_risers"]
    assert 1 <= len(risers) <= 5 and [r["rise"] for r in risers] == sorted((r["rise"] for r in risers), reverse=True)
    top = risers[0]
    pair = ok[(ok["prompt_id"] == top["prompt_id"]) & (ok["sample_index"] == top["sample_index"])].set_index("model")
    assert top["rise"] == pytest.approx(pair.loc["trained", "reward"] - pair.loc["base", "reward"])
    assert ev["voice_spread"]["n_variants"] == 2 and "Speech robustness" in md

    long = pd.read_parquet(evaluated / "roi_timeseries.parquet")
    broca = long[(long["model"] == "trained") & (long["measure"] == "broca")]
    expected = broca.groupby("tr")["value"].mean().to_numpy()
    np.testing.assert_allclose(ev["timeseries"]["trained"]["mean"]["broca"], expected, atol=1e-12)


def test_report_without_eval_via_cli(tmp_path: Path, capsys) -> None:
    run = make_run(tmp_path / "run", steps=3)
    assert cli_main(["report", str(run), "--out", str(tmp_path / "rep")]) == 0
    assert "report.md" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "rep").glob("*.png")) == ["training_curves.png"]
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "No evaluation found" in md and "brainloop eval" in md
    saved = json.loads((tmp_path / "rep" / "report_numbers.json").read_text())
    assert saved["eval"] is None and saved["training"]["steps"] == 3
    assert not (run / "report").exists()  # --out honoured; the run directory is not written to
