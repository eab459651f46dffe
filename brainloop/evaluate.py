"""``brainloop eval``: the base model against a trained adapter on held-out prompts, with uncertainty.

Both models sample ``n`` completions per prompt from one sampler (the engine named in the config:
base = adapter version 0, trained = the adapter loaded as version 1) with identical sampling
settings *and* identical per-sample seeds, so sample j of prompt i of both models shares its random
stream and differs only by the adapter. Every completion is scored by the real reward pipeline,
which also saves its (T, 20484) prediction. Per measure (the reward, 20 regions, hemispheres,
global) the difference trained - base gets a percentile bootstrap 95 % interval and a permutation
p-value, both stratified by prompt (see ``brainloop.stats``).

It runs in-process, without Ray: generation first, then the sampler is closed (on a GPU, vLLM holds
its memory fraction until then), then the reward pipeline is built and scores sequentially. The
model libraries are imported inside the functions, so importing this module stays cheap.

Outputs under ``--out`` (default ``RUN_DIR/eval`` for ``RUN_DIR/final_adapter``):
``settings.json`` (sampling settings, seed, adapter, spec), ``samples.parquet`` (one row per
completion, ``model`` column), ``roi_stats.parquet`` (one row per measure), ``roi_timeseries.parquet``
(per completion, per measure, per TR), ``mean_map_{model}.npy`` (time-mean prediction averaged over
completions, (20484,)), ``mean_timeseries_{model}.npz`` (mean/se/count per measure and TR), and
``predictions/*.npy``.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from brainloop import stats
from brainloop.analysis import ANALYSIS_COLUMNS, DEFAULT_CONTROL_REGIONS, nll_per_token, sample_measures
from brainloop.rois import N_VERTICES, ROI_NAMES, SUMMARY_NAMES

MODELS = ("base", "trained")
MEASURES: tuple[str, ...] = ("reward", *ROI_NAMES, *SUMMARY_NAMES)
N_BOOT = 10000
N_PERM = 10000
STATS_SEED = 0


def measure_column(measure: str) -> str:
    """Column of ``samples.parquet`` (and of the rollouts) holding a measure."""
    if measure == "reward" or measure in ANALYSIS_COLUMNS:
        return measure
    return f"roi_{measure}"


EVAL_SCHEMA = pa.schema(
    [
        ("model", pa.string()),  # "base" | "trained"
        ("adapter_version", pa.int32()),  # 0 = base model, 1 = the evaluated adapter
        ("prompt_index", pa.int32()),
        ("prompt_id", pa.string()),
        ("prompt", pa.string()),
        ("sample_index", pa.int32()),
        ("sample_seed", pa.int64()),  # the per-sample seed; equal for base and trained
        ("completion", pa.string()),
        ("num_tokens", pa.int32()),
        ("finish_reason", pa.string()),
        ("temperature", pa.float32()),
        ("top_p", pa.float32()),
        ("top_k", pa.int32()),
        ("max_new_tokens", pa.int32()),
        ("status", pa.string()),  # ok | unspeakable | failed
        ("error", pa.string()),
        ("reward", pa.float64()),
        *[(measure_column(m), pa.float64()) for m in MEASURES if m != "reward"],
        ("n_words", pa.int32()),
        ("n_trs", pa.int32()),
        ("audio_seconds", pa.float32()),
        ("encoder_trained", pa.bool_()),
        ("official_release", pa.bool_()),
        ("splitter", pa.string()),
        ("n_words_kept", pa.int32()),
        ("prediction_file", pa.string()),  # relative to the eval directory
        ("timings_json", pa.string()),
        *[(col, pa.float64()) for col in ANALYSIS_COLUMNS],  # brainloop.analysis: selectivity, speech, text
    ]
)

# Speech variants for ``--voices K`` (variant 0 is the config's own voice, the main scoring): espeak
# voices and rates here, gTTS accents (top-level domains) on a cluster.
SPEECH_VARIANTS: dict[str, tuple[dict[str, Any], ...]] = {
    "espeak": ({}, {"rate": 140}, {"voice": "en-gb-x-rp"}, {"rate": 210}, {"voice": "en-029"},
               {"voice": "en-gb-scotland"}),
    "gtts": ({}, {"tld": "co.uk"}, {"tld": "com.au"}, {"tld": "co.in"}, {"tld": "ca"}, {"tld": "ie"}),
    "piper": ({}, {"length_scale": 0.8}, {"length_scale": 1.25}),
}

# What changed in the text (brainloop report): measures compared base vs trained, one Holm family.
TEXT_CHANGE_MEASURES: tuple[str, ...] = (
    "reward", "selectivity_global", "selectivity_control", "base_nll_per_token", "words_per_second",
    "sentence_length", "punctuation_rate", "type_token_ratio",
)


@dataclass(frozen=True)
class SamplingSettings:
    """What both models are sampled with; recorded in settings.json and on every row."""

    n: int
    temperature: float
    top_p: float
    top_k: int
    max_new_tokens: int
    seed: int
    engine: str


def target_regions(spec: Any) -> list[str]:
    """Regions a reward spec is about (weighted specs: those with non-zero weight)."""
    return spec.target_regions()


def default_out_dir(adapter: str | Path) -> Path:
    """``RUN_DIR/eval`` for ``RUN_DIR/final_adapter`` (where ``brainloop report`` looks first)."""
    return Path(adapter).resolve().parent / "eval"


# ---------------------------------------------------------------------------- generation


def generate_both(cfg: Any, adapter: Path, prompts: list[str], settings: SamplingSettings) -> dict[str, Any]:
    """Completions of the base model and of the adapter: model -> [prompt][sample] Completion.

    Also ``"base_nll"``: (model, prompt index, sample index) -> the base model's NLL per token of that
    completion, scored by the same sampler under version 0 (one prefill per completion, no sampling).
    """
    from actors.sampler import Sampler, read_lora_rank

    rank = read_lora_rank(adapter)
    sampler = Sampler(
        cfg.policy.model, engine=settings.engine, max_lora_rank=max(8, rank, cfg.policy.lora.r),
        max_loaded_adapters=1, max_model_len=cfg.sampler.max_model_len, seed=settings.seed,
        dtype=cfg.policy.dtype, cpu_threads=cfg.sampler.cpu_threads,
        gpu_memory_utilization=cfg.sampler.gpu_memory_utilization, cpu_lora_ops=cfg.sampler.cpu_lora_ops,
    )
    try:
        sampler.load_adapter(1, str(adapter))
        out = {}
        for model, version in (("base", 0), ("trained", 1)):
            t0 = time.time()
            out[model] = sampler.generate(
                prompts, n=settings.n, max_new_tokens=settings.max_new_tokens, temperature=settings.temperature,
                top_p=settings.top_p, top_k=settings.top_k, seed=settings.seed, version=version)
            print(f"[eval] {model}: {len(prompts)} prompts x {settings.n} completions in {time.time() - t0:.1f}s",
                  flush=True)
        t0 = time.time()
        out["base_nll"] = {
            (model, i, c.sample_index): nll_per_token(sampler.score(prompts[i], c.token_ids, version=0))
            for model in MODELS for i, group in enumerate(out[model]) for c in group}
        print(f"[eval] base-model NLL of {len(out['base_nll'])} completions in {time.time() - t0:.1f}s", flush=True)
        return out
    finally:
        sampler.close()


# ---------------------------------------------------------------------------- scoring


def score_rows(pipeline: Any, rows: list[dict], out_dir: Path, targets: list[str] | None = None,
               controls: tuple[str, ...] | list[str] = DEFAULT_CONTROL_REGIONS) -> dict[str, Any]:
    """Score every row in place; return per-model map sums and per-completion ROI time courses.

    Each row also gets the analysis columns (``brainloop.analysis``): selectivity against the whole
    cortex and ``controls``, speech rate, removed-token fraction, text statistics, and its
    ``base_nll_per_token`` when the row carries one.

    Returns {"map_sum": {model: (20484,)}, "map_n": {model: int}, "courses": [(model, key, {measure: (T,)})]}.
    """
    from brainloop import rois

    masks = rois.roi_masks()
    pred_dir = out_dir / "predictions"
    map_sum = {m: np.zeros(N_VERTICES, dtype=np.float64) for m in MODELS}
    map_n = dict.fromkeys(MODELS, 0)
    courses: list[tuple[str, str, dict[str, np.ndarray]]] = []
    t0 = time.time()
    for k, row in enumerate(rows):
        result = pipeline.score(row["completion"], prediction_dir=str(pred_dir))
        row.update(status=result.status, error=result.error, reward=result.reward if result.ok else None,
                   n_words=result.n_words, n_trs=result.n_trs, audio_seconds=result.audio_seconds,
                   encoder_trained=result.encoder_trained, timings_json=json.dumps(result.timings),
                   official_release=result.official_release, splitter=result.splitter,
                   n_words_kept=result.n_words_kept)
        for name in (*ROI_NAMES, *SUMMARY_NAMES):
            row[f"roi_{name}"] = result.roi.get(name) if result.ok else None
        row.update(sample_measures(
            row["completion"], result.roi, scored=result.ok, n_words=result.n_words,
            audio_seconds=result.audio_seconds, removed_fraction=getattr(result, "removed_token_fraction", None),
            targets=targets or target_regions(pipeline.spec), controls=controls,
            base_nll=row.get("base_nll_per_token")))
        row["prediction_file"] = None
        if result.ok and result.prediction_path:
            path = Path(result.prediction_path)
            row["prediction_file"] = str(path.relative_to(out_dir))
            prediction = np.load(path).astype(np.float64)
            map_sum[row["model"]] += prediction.mean(axis=0)
            map_n[row["model"]] += 1
            per_roi = rois.roi_means(prediction, masks)
            per_roi["reward"] = _reward_course(pipeline.spec, per_roi)
            courses.append((row["model"], sample_key(row), per_roi))
        if (k + 1) % 25 == 0 or k + 1 == len(rows):
            print(f"[eval] scored {k + 1}/{len(rows)} ({time.time() - t0:.1f}s)", flush=True)
    return {"map_sum": map_sum, "map_n": map_n, "courses": courses}


def _reward_course(spec: Any, courses: dict[str, np.ndarray]) -> np.ndarray:
    """The reward as a time course (the spec applied TR by TR, without its time window)."""
    from brainloop.reward_spec import scalar_reward

    n_tr = len(next(iter(courses.values())))
    window_free = spec.model_copy(update={"tr_window": None})
    return np.array([scalar_reward(window_free, {k: v[t : t + 1] for k, v in courses.items()})
                     for t in range(n_tr)])


def sample_key(row: dict) -> str:
    return f"{row['model']}/{row['prompt_index']}/{row['sample_index']}"


# ---------------------------------------------------------------------------- statistics


def compare_models(samples: Any, measures: tuple[str, ...] | list[str], targets: list[str] | tuple[str, ...] = (),
                   holm_family: tuple[str, ...] | list[str] | None = None, n_boot: int = N_BOOT,
                   n_perm: int = N_PERM, seed: int = STATS_SEED) -> Any:
    """One row per measure: per-model mean ± se, trained - base with bootstrap CI and p-values.

    ``samples`` is the ``samples.parquet`` table (pandas). Only "ok" rows with a finite value enter;
    the comparison is stratified by prompt. ``p_holm`` adjusts the p-values of the measures in
    ``holm_family`` (default: all) for multiple comparisons; the others keep their own p.
    """
    import pandas as pd

    ok = samples[samples["status"] == "ok"]
    records = []
    for measure in measures:
        col = measure_column(measure)
        rec: dict[str, Any] = {"measure": measure, "is_target": measure in targets or measure == "reward"}
        parts = {}
        for model in MODELS:
            sub = ok[(ok["model"] == model) & ok[col].notna() & np.isfinite(ok[col].astype(np.float64))]
            parts[model] = (sub[col].to_numpy(np.float64), sub["prompt_id"].to_numpy())
            rec[f"n_{model}"] = len(sub)
            rec[f"{model}_mean"], rec[f"{model}_se"] = stats.mean_se(parts[model][0]) if len(sub) else (np.nan,) * 2
        (a, sa), (b, sb) = parts["base"], parts["trained"]
        common = sorted(set(sa.tolist()) & set(sb.tolist()))
        if common:
            # Prompts where one model produced nothing scoreable cannot be compared within stratum.
            keep_a, keep_b = np.isin(sa, common), np.isin(sb, common)
            ci = stats.bootstrap_diff_ci(a[keep_a], b[keep_b], n_boot=n_boot, seed=seed,
                                         strata_a=sa[keep_a], strata_b=sb[keep_b])
            p = stats.permutation_pvalue(a[keep_a], b[keep_b], n_perm=n_perm, seed=seed,
                                         strata_a=sa[keep_a], strata_b=sb[keep_b])
            rec.update(diff=ci.diff, ci_low=ci.low, ci_high=ci.high, p_value=p, n_prompts=len(common))
            if a[keep_a].mean() != 0:
                pc = stats.bootstrap_percent_change_ci(a[keep_a], b[keep_b], n_boot=n_boot, seed=seed,
                                                       strata_a=sa[keep_a], strata_b=sb[keep_b])
                rec.update(pct_change=pc.diff, pct_ci_low=pc.low, pct_ci_high=pc.high)
        else:
            rec.update(diff=np.nan, ci_low=np.nan, ci_high=np.nan, p_value=np.nan, n_prompts=0)
        records.append(rec)
    table = pd.DataFrame.from_records(records)
    for col in ("pct_change", "pct_ci_low", "pct_ci_high"):
        if col not in table:
            table[col] = np.nan
    family = table["measure"].isin(list(measures) if holm_family is None else list(holm_family))
    table["p_holm"] = table["p_value"]
    table.loc[family, "p_holm"] = stats.holm(table.loc[family, "p_value"].to_numpy())
    return table


def measure_stats(samples: Any, targets: list[str] | tuple[str, ...] = (), n_boot: int = N_BOOT,
                  n_perm: int = N_PERM, seed: int = STATS_SEED) -> Any:
    """The reward, 20 regions and 3 summaries (``MEASURES``); Holm over the 23 regions and summaries
    (the reward's p is the pre-specified primary test and is not adjusted)."""
    return compare_models(samples, MEASURES, targets, holm_family=[m for m in MEASURES if m != "reward"],
                          n_boot=n_boot, n_perm=n_perm, seed=seed)


def text_change_stats(samples: Any, n_boot: int = N_BOOT, n_perm: int = N_PERM, seed: int = STATS_SEED) -> Any:
    """What changed in the text: ``TEXT_CHANGE_MEASURES``, Holm-corrected across that set."""
    present = [m for m in TEXT_CHANGE_MEASURES if measure_column(m) in samples]
    return compare_models(samples, present, ("reward",), holm_family=present, n_boot=n_boot, n_perm=n_perm, seed=seed)


def top_risers(samples: Any, k: int = 5) -> list[dict[str, Any]]:
    """The k completions whose reward rose most over the base model's completion with the same seed.

    Sample j of prompt i shares its per-sample seed in both models, so the pair differs only by the
    adapter; pairs where either side was not scored are skipped.
    """
    ok = samples[(samples["status"] == "ok") & samples["reward"].notna()]
    base = ok[ok["model"] == "base"].set_index(["prompt_id", "sample_index"])
    trained = ok[ok["model"] == "trained"].set_index(["prompt_id", "sample_index"])
    common = base.index.intersection(trained.index)
    pairs = []
    for key in common:
        b, t = base.loc[key], trained.loc[key]
        pairs.append({"prompt_id": key[0], "sample_index": int(key[1]), "prompt": t["prompt"],
                      "reward_base": float(b["reward"]), "reward_trained": float(t["reward"]),
                      "rise": float(t["reward"] - b["reward"]),
                      **{f"{m}_{side}": float(r[m]) for side, r in (("base", b), ("trained", t))
                         for m in ("selectivity_global", "base_nll_per_token", "words_per_second") if m in r},
                      "completion_base": b["completion"], "completion_trained": t["completion"]})
    pairs.sort(key=lambda p: p["rise"], reverse=True)
    return pairs[:k]


# ---------------------------------------------------------------------------- speech robustness


def score_voice_variants(pipeline: Any, rows: list[dict], n_voices: int) -> list[dict]:
    """Score every scored row under ``n_voices`` speech variants; variant 0 is the main scoring.

    Returns one record per (row, variant): model, prompt_id, sample_index, variant (its options as
    JSON), status, reward. Variants come from ``SPEECH_VARIANTS`` of the pipeline's TTS backend.
    """
    backend = pipeline.cfg.get("tts", "espeak") if hasattr(pipeline, "cfg") else "espeak"
    variants = SPEECH_VARIANTS.get(backend, ({},))
    if not 1 <= n_voices <= len(variants):
        raise ValueError(f"--voices must be between 1 and {len(variants)} for TTS backend {backend!r}")
    out = []
    t0 = time.time()
    for row in rows:
        if row["status"] != "ok":
            continue
        for v, options in enumerate(variants[:n_voices]):
            result = None if v == 0 else pipeline.score(row["completion"], tts_options=options)
            status = row["status"] if result is None else result.status
            reward = row["reward"] if result is None else (result.reward if result.ok else None)
            out.append({"model": row["model"], "prompt_id": row["prompt_id"], "sample_index": row["sample_index"],
                        "variant": v, "options": json.dumps(options, sort_keys=True), "status": status,
                        "reward": reward})
    print(f"[eval] {n_voices} speech variants of {len({(r['model'], r['prompt_id'], r['sample_index']) for r in out})}"
          f" completions in {time.time() - t0:.1f}s", flush=True)
    return out


def voice_spread(voices: Any, reward_diff: float) -> dict[str, Any]:
    """Per-text sd of the reward across speech variants, next to the base-vs-trained difference.

    ``flagged`` is True when |trained - base| is smaller than the median per-text spread: the gain
    is then within what changing the voice alone does to a text's reward.
    """
    ok = voices[(voices["status"] == "ok") & voices["reward"].notna()]
    per_text = ok.groupby(["model", "prompt_id", "sample_index"])["reward"].agg(["std", "count"])
    per_text = per_text[per_text["count"] >= 2]
    spread = per_text["std"].to_numpy(np.float64)
    median = float(np.median(spread)) if spread.size else float("nan")
    return {"n_texts": int(spread.size), "n_variants": int(voices["variant"].nunique()),
            "median_sd": median, "mean_sd": float(spread.mean()) if spread.size else float("nan"),
            "reward_diff": float(reward_diff), "flagged": bool(np.isfinite(median) and abs(reward_diff) < median)}


def timeseries_table(courses: list[tuple[str, str, dict[str, np.ndarray]]]) -> pa.Table:
    """Long format: model, sample, measure, tr, value (every completion's ROI time courses)."""
    cols: dict[str, list] = {"model": [], "sample": [], "measure": [], "tr": [], "value": []}
    for model, key, per_roi in courses:
        for measure in MEASURES:
            course = np.asarray(per_roi[measure], dtype=np.float64)
            cols["model"] += [model] * course.size
            cols["sample"] += [key] * course.size
            cols["measure"] += [measure] * course.size
            cols["tr"] += list(range(course.size))
            cols["value"] += course.tolist()
    return pa.table({"model": pa.array(cols["model"], pa.string()), "sample": pa.array(cols["sample"], pa.string()),
                     "measure": pa.array(cols["measure"], pa.string()), "tr": pa.array(cols["tr"], pa.int32()),
                     "value": pa.array(cols["value"], pa.float64())})


def timeseries_summary(long: Any, model: str) -> dict[str, np.ndarray]:
    """Mean, se and count per measure and TR across completions, aligned at speech onset (TR 0).

    Completions have different lengths; TR t averages the completions that reach it. se is NaN
    where fewer than two completions do. Arrays are (n_measures, max_T) in ``MEASURES`` order.
    """
    sub = long[long["model"] == model]
    n_tr = int(sub["tr"].max()) + 1 if len(sub) else 0
    mean = np.full((len(MEASURES), n_tr), np.nan)
    se = np.full((len(MEASURES), n_tr), np.nan)
    count = np.zeros((len(MEASURES), n_tr), dtype=np.int64)
    if n_tr:
        grouped = sub.groupby(["measure", "tr"])["value"].agg(["mean", "std", "count"])
        for i, measure in enumerate(MEASURES):
            if measure not in grouped.index.get_level_values(0):
                continue
            g = grouped.loc[measure]
            trs = g.index.to_numpy()
            mean[i, trs] = g["mean"].to_numpy()
            count[i, trs] = g["count"].to_numpy()
            with np.errstate(invalid="ignore", divide="ignore"):
                se[i, trs] = np.where(g["count"] > 1, g["std"].to_numpy() / np.sqrt(g["count"].to_numpy()), np.nan)
    return {"measures": np.array(MEASURES), "mean": mean, "se": se, "count": count}


def format_table(table: Any, targets: list[str] | tuple[str, ...] = ()) -> str:
    """The terminal table: one line per measure, target regions starred."""
    head = (f"{'measure':<20}{'base mean':>11}{'± se':>9}{'trained mean':>14}{'± se':>9}"
            f"{'diff':>11}{'95% CI':>24}{'p':>8}{'p_holm':>8}")
    lines = [head, "-" * len(head)]
    for r in table.itertuples():
        star = "*" if r.measure in targets else " "
        ci = f"[{r.ci_low:+.5f}, {r.ci_high:+.5f}]"
        lines.append(f"{star}{r.measure:<19}{r.base_mean:>11.5f}{r.base_se:>9.5f}{r.trained_mean:>14.5f}"
                     f"{r.trained_se:>9.5f}{r.diff:>+11.5f}{ci:>24}{r.p_value:>8.4f}{r.p_holm:>8.4f}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- the command


def run_eval(cfg: Any, adapter: str | Path, out_dir: str | Path | None = None, n: int = 16,
             prompt_split: str = "held_out", max_prompts: int | None = None, seed: int | None = None,
             temperature: float | None = None, config_path: str | None = None, voices: int = 1) -> dict[str, Any]:
    """Sample, score, compare; write the outputs listed in the module docstring. Returns settings.json.

    ``voices`` > 1 also scores every completion under that many speech variants (``voices.parquet``)
    and reports the reward's voice-to-voice spread next to the base-vs-trained difference.
    """
    import pandas as pd

    from actors.sampler import sample_seed
    from brainloop.prompts import load_prompts, split
    from reward_workers.pipeline import build_pipeline

    adapter = Path(adapter).resolve()
    if not (adapter / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{adapter} is not a PEFT adapter directory (no adapter_config.json)")
    if n < 2:
        raise ValueError("n must be >= 2: standard errors and intervals need two completions per prompt")
    if voices < 1:
        raise ValueError(f"voices must be >= 1, got {voices}")
    out = Path(out_dir) if out_dir is not None else default_out_dir(adapter)
    out.mkdir(parents=True, exist_ok=True)
    prompts = split(load_prompts(cfg.prompts.file), prompt_split)
    if max_prompts is not None:
        prompts = prompts[:max_prompts]
    settings = SamplingSettings(
        n=n, temperature=cfg.sampler.temperature_end if temperature is None else temperature,
        top_p=cfg.sampler.top_p, top_k=cfg.sampler.top_k, max_new_tokens=cfg.sampler.max_new_tokens,
        seed=cfg.run.seed if seed is None else seed, engine=cfg.sampler.engine)
    t_start = time.time()
    completions = generate_both(cfg, adapter, [p.text for p in prompts], settings)
    t_generated = time.time()

    rows: list[dict] = []
    for model in MODELS:
        for i, group in enumerate(completions[model]):
            for c in group:
                rows.append({
                    "model": model, "adapter_version": c.adapter_version, "prompt_index": i,
                    "prompt_id": prompts[i].id, "prompt": prompts[i].text, "sample_index": c.sample_index,
                    "sample_seed": sample_seed(settings.seed, i, c.sample_index, n), "completion": c.text,
                    "num_tokens": len(c.token_ids), "finish_reason": c.finish_reason,
                    "temperature": settings.temperature, "top_p": settings.top_p, "top_k": settings.top_k,
                    "max_new_tokens": settings.max_new_tokens,
                    "base_nll_per_token": completions["base_nll"][(model, i, c.sample_index)],
                })
    # No reward cache: the predictions must land in this directory, and held-out completions are new text.
    pipeline = build_pipeline(cfg.reward.pipeline.model_dump(), cfg.reward.spec, use_cache=False)
    targets = target_regions(cfg.reward.spec)
    controls = tuple(cfg.guards.control_regions)
    scored = score_rows(pipeline, rows, out, targets, controls)
    t_scored = time.time()

    pq.write_table(pa.Table.from_pylist(rows, schema=EVAL_SCHEMA), out / "samples.parquet")
    samples = pd.read_parquet(out / "samples.parquet")
    table = measure_stats(samples, targets)
    text_table = text_change_stats(samples)
    pq.write_table(pa.Table.from_pandas(text_table, preserve_index=False), out / "text_stats.parquet")
    reward_diff = float(table.set_index("measure").loc["reward", "diff"])
    spread = None
    if voices > 1:
        voice_rows = score_voice_variants(pipeline, rows, voices)
        pq.write_table(pa.Table.from_pylist(voice_rows), out / "voices.parquet")
        spread = voice_spread(pd.read_parquet(out / "voices.parquet"), reward_diff)
    t_voices = time.time()
    pq.write_table(pa.Table.from_pandas(table, preserve_index=False), out / "roi_stats.parquet")
    long = timeseries_table(scored["courses"])
    pq.write_table(long, out / "roi_timeseries.parquet")
    long_df = long.to_pandas()
    for model in MODELS:
        count = scored["map_n"][model]
        mean_map = scored["map_sum"][model] / count if count else np.full(N_VERTICES, np.nan)
        np.save(out / f"mean_map_{model}.npy", mean_map.astype(np.float32))
        np.savez(out / f"mean_timeseries_{model}.npz", **timeseries_summary(long_df, model))

    info = {
        "config": config_path, "adapter": str(adapter), "prompt_split": prompt_split,
        "prompt_ids": [p.id for p in prompts], "sampling": asdict(settings), "policy_model": cfg.policy.model,
        "reward_spec": cfg.reward.spec.model_dump(mode="json"), "reward_spec_text": cfg.reward.spec.describe(),
        "target_regions": targets, "encoder_trained": bool(samples["encoder_trained"].fillna(False).any()),
        "n_rows": len(rows), "n_ok": {m: int(((samples["model"] == m) & (samples["status"] == "ok")).sum())
                                      for m in MODELS},
        "maps_averaged_over": scored["map_n"],
        "stats": {"n_boot": N_BOOT, "n_perm": N_PERM, "seed": STATS_SEED, "level": 0.95,
                  "strata": "prompt_id", "difference": "trained - base"},
        "control_regions": list(controls), "voices": voices, "voice_spread": spread,
        "seconds": {"generate": t_generated - t_start, "score": t_scored - t_generated,
                    "voices": t_voices - t_scored, "total": time.time() - t_start},
        "created_at": time.time(),
    }
    (out / "settings.json").write_text(json.dumps(info, indent=1))
    print(f"[eval] reward spec {info['reward_spec_text']}; sampling {asdict(settings)}")
    print(f"[eval] completions scored: base {info['n_ok']['base']}/{len(rows) // 2}, "
          f"trained {info['n_ok']['trained']}/{len(rows) // 2}")
    if not info["encoder_trained"]:
        print("[eval] NOTE: untrained embedded encoder (seeded random weights): the machinery, not the brain")
    print(format_table(table, targets))
    print("[eval] what changed in the text (trained - base; Holm across these measures):")
    print(format_table(text_table, ("reward",)))
    if spread is not None:
        verdict = ("SMALLER than the voice-to-voice spread: not distinguishable from a change of voice"
                   if spread["flagged"] else "larger than the voice-to-voice spread")
        print(f"[eval] speech robustness: reward sd across {spread['n_variants']} speech variants per text, median "
              f"{spread['median_sd']:.5f} over {spread['n_texts']} texts; |trained - base| = "
              f"{abs(reward_diff):.5f} is {verdict}")
    print(f"[eval] wrote {out}")
    return info
