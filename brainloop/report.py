"""``brainloop report``: figures with uncertainty and one ``report.md`` for a run (and its eval).

Every number in the report is recomputed here from the Parquet data (``rollouts/*.parquet``, the
eval's ``samples.parquet`` and ``roi_timeseries.parquet``); loss and KL, which only the learner
knows, come from ``metrics.jsonl``. The numbers are also written to ``report_numbers.json``, with
two consistency checks: the per-step reward means against the driver's ``metrics.jsonl`` and the
recomputed eval statistics against the eval's ``roi_stats.parquet``.

Figures (PNG, in the output directory): ``training_curves.png``; with an eval also
``eval_roi_bars.png``, ``eval_summary.png`` (reward, hemispheres, global), ``eval_roi_timeseries.png``
and ``surface_base.png``, ``surface_trained.png``, ``surface_diff.png``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from brainloop import stats
from brainloop.evaluate import (
    MEASURES,
    MODELS,
    measure_stats,
    target_regions,
    text_change_stats,
    timeseries_summary,
    top_risers,
    voice_spread,
)
from brainloop.rois import ROI_NAMES, SUMMARY_NAMES

COLORS = {"base": "#6c757d", "trained": "#d9480f"}
TARGET_COLOR = "#1c7ed6"
TRAINING_WINDOW = 15  # steps in the first/last windows (at most half the run), as in summary.summarize


# ---------------------------------------------------------------------------- loading


def load_run(run_dir: Path) -> dict[str, Any]:
    """Rollouts (pandas), metrics records, the run's config (or None) and its reward spec."""
    import pandas as pd

    from brainloop.config import ConfigError, load_config
    from brainloop.reward_spec import RewardSpec

    # Read directly rather than through RunFiles, which creates folders: a report must not alter the run.
    parts = sorted((run_dir / "rollouts").glob("step_*.parquet"))
    if not parts:
        raise FileNotFoundError(f"{run_dir} holds no rollouts/step_*.parquet")
    rollouts = pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True)
    metrics_file = run_dir / "metrics.jsonl"
    metrics = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()] \
        if metrics_file.is_file() else []
    cfg = None
    if (run_dir / "config.yaml").is_file():
        try:
            cfg = load_config(run_dir / "config.yaml")
        except ConfigError as exc:
            print(f"[report] cannot read {run_dir / 'config.yaml'}: {exc}; using the default reward spec")
    spec = cfg.reward.spec if cfg is not None else RewardSpec()
    return {"rollouts": rollouts, "metrics": metrics, "cfg": cfg, "spec": spec}


# ---------------------------------------------------------------------------- numbers


def training_numbers(rollouts: Any, metrics: list[dict]) -> dict[str, Any]:
    """Per-step reward statistics from the rollouts, learner statistics from metrics.jsonl.

    The per-step sd is the population sd (ddof=0), the driver's ``reward_std``. The first/last
    windows are ``min(15, steps // 2)`` steps; their gain compares the completions of the two
    windows (bootstrap 95 % interval, permutation p-value; different prompts, so unstratified).
    """
    scored = rollouts[rollouts["reward"].notna()]
    steps = sorted(int(s) for s in rollouts["step"].unique())
    per_step: dict[str, list] = {k: [] for k in ("step", "n", "reward_mean", "reward_sd", "reward_se",
                                                 "reward_max", "running_best")}
    best = -math.inf
    for step in steps:
        r = scored.loc[scored["step"] == step, "reward"].to_numpy(np.float64)
        per_step["step"].append(step)
        per_step["n"].append(int(r.size))
        per_step["reward_mean"].append(float(r.mean()) if r.size else math.nan)
        per_step["reward_sd"].append(float(r.std()) if r.size else math.nan)
        per_step["reward_se"].append(stats.mean_se(r)[1] if r.size else math.nan)
        per_step["reward_max"].append(float(r.max()) if r.size else math.nan)
        if r.size:
            best = max(best, float(r.max()))
        per_step["running_best"].append(best if np.isfinite(best) else math.nan)
    w = min(TRAINING_WINDOW, max(1, len(steps) // 2))
    first = scored[scored["step"].isin(steps[:w])]["reward"].to_numpy(np.float64)
    last = scored[scored["step"].isin(steps[-w:])]["reward"].to_numpy(np.float64)
    out: dict[str, Any] = {"steps": len(steps), "window": w, "per_step": per_step,
                           "n_completions": len(rollouts), "n_scored": len(scored),
                           "status_counts": {str(k): int(v) for k, v in rollouts["status"].value_counts().items()},
                           "best_reward": best if np.isfinite(best) else math.nan}
    for name, x in (("first", first), ("last", last)):
        mean, se = stats.mean_se(x) if x.size else (math.nan, math.nan)
        out[name] = {"steps": steps[:w] if name == "first" else steps[-w:], "n": int(x.size), "mean": mean, "se": se}
    if first.size and last.size and len(steps) > 1:
        ci = stats.bootstrap_diff_ci(first, last)
        out["gain"] = {"diff": ci.diff, "ci_low": ci.low, "ci_high": ci.high,
                       "p_value": stats.permutation_pvalue(first, last)}
    else:
        out["gain"] = None
    learner = {m["step"]: m for m in metrics if "reward_mean" in m}
    for key in ("loss", "kl_per_token", "kl_per_sequence", "grad_norm", "lr", "mean_tokens"):
        out[key] = [float(learner[s][key]) if s in learner and key in learner[s] else math.nan for s in steps]
    diffs = [abs(learner[s]["reward_mean"] - m) for s, m in zip(steps, per_step["reward_mean"], strict=True)
             if s in learner and np.isfinite(m) and learner[s].get("reward_mean") is not None]
    out["metrics_reward_mean_max_abs_diff"] = max(diffs) if diffs else math.nan
    probes = [m["probe"] for m in metrics if "probe" in m]
    out["probe_sampler_vs_learner_max"] = max((p["sampler_vs_learner"] for p in probes), default=math.nan)
    return out


def eval_numbers(eval_dir: Path, targets: list[str]) -> tuple[dict[str, Any], Any, Any]:
    """Statistics recomputed from samples.parquet; returns (numbers, samples, stats table)."""
    import pandas as pd

    samples = pd.read_parquet(eval_dir / "samples.parquet")
    table = measure_stats(samples, targets)
    settings = json.loads((eval_dir / "settings.json").read_text()) if (eval_dir / "settings.json").is_file() else {}
    numbers: dict[str, Any] = {
        "dir": str(eval_dir), "settings": settings.get("sampling", {}), "prompt_ids": settings.get("prompt_ids", []),
        "adapter": settings.get("adapter"),
        "n_rows": {m: int((samples["model"] == m).sum()) for m in MODELS},
        "n_ok": {m: int(((samples["model"] == m) & (samples["status"] == "ok")).sum()) for m in MODELS},
        "measures": {r["measure"]: {k: _num(v) for k, v in r.items() if k != "measure"}
                     for r in table.to_dict("records")},
    }
    if "selectivity_global" in samples:  # evals made before the analysis columns existed lack them
        text_table = text_change_stats(samples)
        numbers["text_change"] = {r["measure"]: {k: _num(v) for k, v in r.items() if k != "measure"}
                                  for r in text_table.to_dict("records")}
        numbers["top_risers"] = [{k: _num(v) for k, v in p.items()} for p in top_risers(samples)]
        saved_text = eval_dir / "text_stats.parquet"
        if saved_text.is_file():
            old = pd.read_parquet(saved_text).set_index("measure")
            cols = ["base_mean", "trained_mean", "diff", "ci_low", "ci_high", "p_value", "p_holm"]
            new = text_table.set_index("measure").loc[old.index, cols]
            numbers["text_stats_file_max_abs_diff"] = float(np.nanmax(np.abs(new.to_numpy() - old[cols].to_numpy())))
    if (eval_dir / "voices.parquet").is_file():
        reward_diff = float(table.set_index("measure").loc["reward", "diff"])
        numbers["voice_spread"] = voice_spread(pd.read_parquet(eval_dir / "voices.parquet"), reward_diff)
    saved = eval_dir / "roi_stats.parquet"
    if saved.is_file():
        old = pd.read_parquet(saved).set_index("measure")
        cols = ["base_mean", "trained_mean", "diff", "ci_low", "ci_high", "p_value"]
        new = table.set_index("measure").loc[old.index, cols]
        numbers["roi_stats_file_max_abs_diff"] = float(np.nanmax(np.abs(new.to_numpy() - old[cols].to_numpy())))
    return numbers, samples, table


def _num(v: Any) -> Any:
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return float(v)
    return v


def _json_safe(x: Any) -> Any:
    """NaN/inf -> None so report_numbers.json is strict JSON."""
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return float(x) if np.isfinite(x) else None
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x


# ---------------------------------------------------------------------------- figures


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 11, "axes.titlesize": 12, "axes.labelsize": 11, "legend.fontsize": 10,
                         "axes.spines.top": False, "axes.spines.right": False})
    return plt


def plot_training(tr: dict[str, Any], rollouts: Any, path: Path, spec_text: str) -> Path:
    plt = _plt()
    ps = tr["per_step"]
    steps = np.array(ps["step"])
    fig, axes = plt.subplots(2, 2, figsize=(13, 8.5))
    ax = axes[0, 0]
    scored = rollouts[rollouts["reward"].notna()]
    jitter = np.random.default_rng(0).uniform(-0.15, 0.15, len(scored))
    ax.scatter(scored["step"].to_numpy() + jitter, scored["reward"], s=9, color="#adb5bd", alpha=0.7,
               label="completions", zorder=1)
    mean, sd = np.array(ps["reward_mean"]), np.array(ps["reward_sd"])
    ax.fill_between(steps, mean - sd, mean + sd, color=COLORS["trained"], alpha=0.2, label="± 1 sd", zorder=2)
    ax.plot(steps, mean, "o-", color=COLORS["trained"], ms=4, label="mean reward", zorder=3)
    ax.step(steps, ps["running_best"], where="post", color="#2b8a3e", label="running best", zorder=3)
    ax.set(title=f"reward {spec_text} per step", xlabel="step", ylabel="reward (predicted BOLD, a.u.)")
    ax.legend(loc="best")
    panels = [(axes[0, 1], "loss", "loss", "loss (advantage-weighted CE + KL term)"),
              (axes[1, 0], "kl_per_token", "KL per token (nats)", "KL(π‖π_base) per token"),
              (axes[1, 1], "kl_per_sequence", "KL per sequence (nats)", "KL(π‖π_base) per sequence")]
    for ax, key, ylabel, title in panels:
        values = np.array(tr[key], dtype=float)
        ax.plot(steps, values, "o-", ms=4, color="#495057")
        ax.set(title=title, xlabel="step", ylabel=ylabel)
        if not np.isfinite(values).any():
            ax.text(0.5, 0.5, "not recorded", transform=ax.transAxes, ha="center", va="center", color="#868e96")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        if len(steps) < 30:
            ax.set_xticks(steps)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _highlight_ticks(ax, names: list[str], targets: list[str]) -> None:
    for label, name in zip(ax.get_xticklabels(), names, strict=True):
        if name in targets:
            label.set_color(TARGET_COLOR)
            label.set_fontweight("bold")


def plot_roi_bars(table: Any, names: list[str], targets: list[str], path: Path, title: str) -> Path:
    """Top: per-model means with 95 % intervals (±1.96 se); bottom: trained - base, bootstrap 95 % CI."""
    plt = _plt()
    t = table.set_index("measure").loc[names]
    x = np.arange(len(names))
    width = 0.38
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(7, 0.75 * len(names) + 2), 8.5), sharex=True)
    for k, model in enumerate(MODELS):
        top.bar(x + (k - 0.5) * width, t[f"{model}_mean"], width, yerr=1.96 * t[f"{model}_se"].fillna(0),
                capsize=3, color=COLORS[model], label=model, error_kw={"elinewidth": 1})
    top.set(ylabel="mean predicted BOLD (a.u.)", title=title)
    top.axhline(0, color="black", lw=0.8)
    top.legend(title="model (bars ± 95% CI of the mean)", loc="best")
    err = np.vstack([t["diff"] - t["ci_low"], t["ci_high"] - t["diff"]])
    significant = (t["p_value"] < 0.05).to_numpy()
    colors = np.where(significant, COLORS["trained"], "#868e96")
    bottom.bar(x, t["diff"], 0.6, yerr=err, capsize=3, color=colors, error_kw={"elinewidth": 1})
    bottom.axhline(0, color="black", lw=0.8)
    bottom.set(ylabel="trained − base (a.u.)", title="difference with bootstrap 95% CI (orange: permutation p < 0.05)")
    for ax in (top, bottom):
        for i, name in enumerate(names):
            if name in targets:
                ax.axvspan(i - 0.5, i + 0.5, color=TARGET_COLOR, alpha=0.12, lw=0)
        ax.grid(axis="y", alpha=0.3)
    bottom.set_xticks(x, names, rotation=45, ha="right")
    _highlight_ticks(bottom, names, targets)
    bottom.set_xlabel("region (blue: reward target)" if names[0] != "reward" else "measure (blue: the reward)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_timeseries(summaries: dict[str, dict[str, np.ndarray]], targets: list[str], path: Path) -> Path:
    """The 20 regions' mean time courses ± se across completions, aligned at speech onset."""
    plt = _plt()
    fig, axes = plt.subplots(4, 5, figsize=(18, 12.5), sharex=True)
    index = {m: i for i, m in enumerate(MEASURES)}
    for ax, name in zip(axes.flat, ROI_NAMES, strict=True):
        for model in MODELS:
            s = summaries[model]
            mean, se = s["mean"][index[name]], s["se"][index[name]]
            trs = np.arange(mean.size)
            ax.plot(trs, mean, color=COLORS[model], lw=1.6, label=model)
            ax.fill_between(trs, mean - np.nan_to_num(se), mean + np.nan_to_num(se), color=COLORS[model], alpha=0.2)
        ax.axhline(0, color="black", lw=0.6)
        ax.set_title(name + ("  (target)" if name in targets else ""),
                     color=TARGET_COLOR if name in targets else "black",
                     fontweight="bold" if name in targets else "normal")
        if name in targets:
            for spine in ax.spines.values():
                spine.set_visible(True)
                spine.set_color(TARGET_COLOR)
                spine.set_linewidth(2)
        ax.grid(alpha=0.3)
    from matplotlib.ticker import MaxNLocator

    for ax in axes[-1]:
        ax.set_xlabel("TR (1 s) from speech onset")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in axes[:, 0]:
        ax.set_ylabel("predicted BOLD (a.u.)")
    axes[0, 0].legend(loc="best", title="mean ± se")
    fig.suptitle("region time courses, mean ± se across completions (TR t averages the completions that reach it)",
                 fontsize=13)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------- markdown


def _fmt(x: Any, digits: int = 5) -> str:
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "–"
    return f"{x:.{digits}f}"


def _fmt_p(p: Any) -> str:
    if p is None or not np.isfinite(p):
        return "–"
    return f"{p:.4f}" if p >= 1e-4 else f"{p:.1e}"


def _code_block(text: str) -> str:
    body = text.strip() or "(empty)"
    fence = "````" if "```" in body else "```"
    return f"{fence}text\n{body}\n{fence}"


def _measures_table(table: Any, names: list[str], targets: list[str]) -> list[str]:
    lines = ["| measure | base mean ± se | trained mean ± se | trained − base [95% CI] | p | p (Holm) |",
             "|---|---:|---:|---:|---:|---:|"]
    t = table.set_index("measure")
    for name in names:
        r = t.loc[name]
        label = f"**{name}** (target)" if name in targets else name
        lines.append(f"| {label} | {_fmt(r.base_mean)} ± {_fmt(r.base_se)} | {_fmt(r.trained_mean)} ± "
                     f"{_fmt(r.trained_se)} | {r['diff']:+.5f} [{r.ci_low:+.5f}, {r.ci_high:+.5f}] | "
                     f"{_fmt_p(r.p_value)} | {_fmt_p(r.p_holm)} |")
    return lines


def _examples(samples: Any, k: int = 3) -> list[str]:
    """Sample 0 of the first k prompts from both models: same prompt, same per-sample seed."""
    lines: list[str] = []
    for pid in list(dict.fromkeys(samples["prompt_id"]))[:k]:
        rows = samples[(samples["prompt_id"] == pid)].sort_values("sample_index")
        base = rows[rows["model"] == "base"].head(1)
        trained = rows[rows["model"] == "trained"].head(1)
        if base.empty or trained.empty:
            continue
        lines += [f"**Prompt `{pid}`:** {rows.iloc[0]['prompt']}", ""]
        for model, r in (("base", base.iloc[0]), ("trained", trained.iloc[0])):
            reward = f"reward {r['reward']:.5f}" if r["status"] == "ok" else r["status"]
            lines += [f"*{model}* (sample {r['sample_index']}, seed {r['sample_seed']}, {r['num_tokens']} tokens, "
                      f"{reward}):", "", _code_block(r["completion"]), ""]
    return lines


_TEXT_MEASURE_LABELS = {
    "reward": "target reward", "selectivity_global": "selectivity: target − whole cortex",
    "selectivity_control": "selectivity: target − control regions", "base_nll_per_token":
    "base-model NLL per token (nats)", "words_per_second": "words per second (speech)",
    "sentence_length": "sentence length (words)", "punctuation_rate": "punctuation marks per word",
    "type_token_ratio": "type-token ratio",
}


def _text_change_section(ev: dict[str, Any]) -> list[str]:
    """Base vs trained on the held-out prompts: what changed in the text, and was the gain selective?"""
    change = ev.get("text_change")
    if not change:
        return []
    lines = ["## What changed in the text", "",
             "Base vs trained completions on the held-out prompts (same prompts, same per-sample seeds). Each "
             "difference has a percentile bootstrap 95% CI and a permutation p, stratified by prompt, Holm-"
             "corrected across the measures of this table. Selectivity is the target response minus the whole "
             "cortex mean, and minus the control regions (a gain that is not selective raises everything); the "
             "base-model NLL per token says how natural the base model finds the text.", ""]
    r = change.get("reward", {})
    if r.get("pct_change") is not None and math.isfinite(r.get("pct_change", math.nan)):
        lines += [f"**Target reward: {r['pct_change']:+.1f} % from base** (bootstrap 95% CI "
                  f"[{r['pct_ci_low']:+.1f} %, {r['pct_ci_high']:+.1f} %]) — the figure the published experiment "
                  "reported as its headline.", ""]
    lines += ["| measure | base mean ± se | trained mean ± se | trained − base [95% CI] | p | p (Holm) |",
              "|---|---:|---:|---:|---:|---:|"]
    for name, m in change.items():
        lines.append(f"| {_TEXT_MEASURE_LABELS.get(name, name)} | {_fmt(m['base_mean'])} ± {_fmt(m['base_se'])} | "
                     f"{_fmt(m['trained_mean'])} ± {_fmt(m['trained_se'])} | {_fmt_signed(m['diff'])} "
                     f"[{_fmt_signed(m['ci_low'])}, {_fmt_signed(m['ci_high'])}] | {_fmt_p(m['p_value'])} | "
                     f"{_fmt_p(m['p_holm'])} |")
    lines.append("")
    spread = ev.get("voice_spread")
    if spread:
        verdict = ("**smaller** than the median voice-to-voice spread: the gain is not distinguishable from a "
                   "change of voice" if spread["flagged"] else "larger than the median voice-to-voice spread")
        lines += [f"Speech robustness: each completion scored under {spread['n_variants']} speech variants; the "
                  f"reward's sd across variants per text has median {_fmt(spread['median_sd'])} "
                  f"({spread['n_texts']} texts). |trained − base| = {_fmt(abs(spread['reward_diff']))} is {verdict}.",
                  ""]
    risers = ev.get("top_risers") or []
    if risers:
        lines += ["### The completions whose reward rose most", "",
                  "Trained completion vs the base model's completion with the same prompt and seed.", ""]
        for p in risers:
            lines += [f"**`{p['prompt_id']}` sample {p['sample_index']}**: reward {p['reward_base']:.5f} → "
                      f"{p['reward_trained']:.5f} ({p['rise']:+.5f}); selectivity (global) "
                      f"{_fmt(p.get('selectivity_global_base'))} → {_fmt(p.get('selectivity_global_trained'))}; "
                      f"base NLL/token {_fmt(p.get('base_nll_per_token_base'), 3)} → "
                      f"{_fmt(p.get('base_nll_per_token_trained'), 3)}; words/s "
                      f"{_fmt(p.get('words_per_second_base'), 2)} → {_fmt(p.get('words_per_second_trained'), 2)}",
                      "", f"*base:* {p['completion_base'].strip()[:600]}", "",
                      f"*trained:* {p['completion_trained'].strip()[:600]}", ""]
    return lines


def _fmt_signed(x: Any, digits: int = 5) -> str:
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "–"
    return f"{x:+.{digits}f}"


def write_markdown(path: Path, run_dir: Path, loaded: dict[str, Any], tr: dict[str, Any],
                   ev: dict[str, Any] | None, table: Any, samples: Any, figures: dict[str, str]) -> Path:
    cfg, spec = loaded["cfg"], loaded["spec"]
    targets = target_regions(spec)
    untrained = not bool(loaded["rollouts"]["encoder_trained"].fillna(False).any())
    name = cfg.run.name if cfg is not None else run_dir.name
    lines = [f"# brainloop report: run `{name}`", ""]
    if untrained:
        lines += ["> **Untrained encoder.** This run's reward came from the embedded TRIBE architecture with "
                  "seeded random weights: the numbers below test the machinery (sampling, rewards, updates, "
                  "adapter sync), not the human brain.", ""]
    lines += [f"Run directory `{run_dir}`. Reward: `{spec.describe()}` (target region(s): {', '.join(targets)}).", ""]
    if cfg is not None:
        lines += ["| setting | value |", "|---|---|",
                  f"| policy | `{cfg.policy.model}`, LoRA r={cfg.policy.lora.r} α={cfg.policy.lora.alpha:g} on "
                  f"{', '.join(cfg.policy.lora.target_modules)} |",
                  f"| sampling (training) | {cfg.prompts.prompts_per_step} prompts × {cfg.sampler.num_completions} "
                  f"completions × ≤{cfg.sampler.max_new_tokens} tokens, temperature {cfg.sampler.temperature_start:g}"
                  f" → {cfg.sampler.temperature_end:g}, top-p {cfg.sampler.top_p:g}, top-k {cfg.sampler.top_k} |",
                  f"| learner | lr {cfg.learner.lr:g}, KL coefficient {cfg.learner.kl_coef:g}, grad clip "
                  f"{cfg.learner.grad_clip:g}, max staleness {cfg.algo.max_staleness} |",
                  f"| seed | {cfg.run.seed} |", ""]
    lines += ["## Training", ""]
    first, last, gain = tr["first"], tr["last"], tr["gain"]
    lines += ["| quantity | value |", "|---|---|",
              f"| steps | {tr['steps']} ({tr['n_completions']} completions, {tr['n_scored']} scored; status "
              f"{', '.join(f'{k} {v}' for k, v in tr['status_counts'].items())}) |",
              f"| mean reward, first {tr['window']} step(s) | {_fmt(first['mean'])} ± {_fmt(first['se'])} "
              f"(n = {first['n']} completions, mean ± se) |",
              f"| mean reward, last {tr['window']} step(s) | {_fmt(last['mean'])} ± {_fmt(last['se'])} "
              f"(n = {last['n']}) |"]
    if gain is not None:
        lines.append(f"| gain, last − first | {gain['diff']:+.5f} [{gain['ci_low']:+.5f}, {gain['ci_high']:+.5f}] "
                     f"(bootstrap 95% CI), permutation p = {_fmt_p(gain['p_value'])} |")
    lines += [f"| best single reward | {_fmt(tr['best_reward'])} |",
              f"| KL last step | {_fmt(tr['kl_per_token'][-1], 4)} nats/token, "
              f"{_fmt(tr['kl_per_sequence'][-1], 3)} nats/sequence |",
              f"| loss last step | {_fmt(tr['loss'][-1], 4)} |", "",
              f"![training curves]({figures['training_curves']})", "",
              "Mean reward per step ± 1 sd (population sd over the step's scored completions; grey dots are the "
              "completions), running best, loss and the exact KL to the base model (the policy with its adapter "
              "disabled) per token and per sequence.", ""]
    if ev is None:
        lines += ["## Evaluation", "", "No evaluation found. Run `brainloop eval --config CONFIG --adapter "
                  f"{run_dir / 'final_adapter'}` and then this report again.", ""]
    else:
        s = ev["settings"]
        lines += ["## Evaluation on held-out prompts: base model vs trained adapter", "",
                  f"{len(ev['prompt_ids'])} prompts ({', '.join(ev['prompt_ids'])}) × {s.get('n')} completions per "
                  f"model, identical sampling for both: temperature {s.get('temperature')}, top-p {s.get('top_p')}, "
                  f"top-k {s.get('top_k')}, ≤{s.get('max_new_tokens')} new tokens, seed {s.get('seed')} (sample j of "
                  f"prompt i uses the same per-sample seed in both models), engine `{s.get('engine')}`. Scored: base "
                  f"{ev['n_ok']['base']}/{ev['n_rows']['base']}, trained {ev['n_ok']['trained']}/"
                  f"{ev['n_rows']['trained']}.", "",
                  "Differences are trained − base of per-completion means, with a percentile bootstrap 95% CI "
                  "(10,000 resamples) and a two-sided permutation p-value (10,000 permutations, +1 corrected), "
                  "both stratified by prompt. The reward is the pre-specified primary test; the region p-values are "
                  "also given Holm-adjusted over the 23 region/summary measures.", ""]
        lines += [*_measures_table(table, ["reward", *ROI_NAMES], targets), ""]
        lines += [f"![ROI bars]({figures['eval_roi_bars']})", "", "### Hemispheres and whole cortex", ""]
        lines += [*_measures_table(table, ["reward", *SUMMARY_NAMES], targets), ""]
        lines += [f"![hemispheres]({figures['eval_summary']})", "", "### Region time courses", "",
                  f"![time courses]({figures['eval_roi_timeseries']})", "", "### Cortical maps", "",
                  "Time-mean predicted response averaged over each model's completions (inflated fsaverage5; "
                  "left/right hemisphere, lateral and medial views), then trained − base.", "",
                  f"![base]({figures['surface_base']})", "", f"![trained]({figures['surface_trained']})", "",
                  f"![difference]({figures['surface_diff']})", "", "## Example completions", "",
                  "Sample 0 of the first prompts, both models with the same per-sample seed.", ""]
        lines += _examples(samples)
        lines += _text_change_section(ev)
    checks = [f"per-step reward means agree with the driver's `metrics.jsonl` within "
              f"{tr['metrics_reward_mean_max_abs_diff']:.1e} (max abs difference)"]
    if ev is not None and "roi_stats_file_max_abs_diff" in ev:
        checks.append(f"eval statistics agree with `roi_stats.parquet` within {ev['roi_stats_file_max_abs_diff']:.1e}")
    if ev is not None and "text_stats_file_max_abs_diff" in ev:
        checks.append(f"text-change statistics agree with `text_stats.parquet` within "
                      f"{ev['text_stats_file_max_abs_diff']:.1e}")
    lines += ["## Reproducibility", "", "Every number above is recomputed from the Parquet files and saved in "
              "`report_numbers.json`; " + "; ".join(checks) + ".", ""]
    path.write_text("\n".join(lines))
    return path


# ---------------------------------------------------------------------------- the command


def build_report(run_dir: str | Path, eval_dir: str | Path | None = None, out_dir: str | Path | None = None) -> dict:
    """Write figures, report.md and report_numbers.json; return the numbers (with ``report_md``)."""
    from brainloop.plots import surface_figure

    run_dir = Path(run_dir).resolve()
    out = Path(out_dir) if out_dir is not None else run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    if eval_dir is None and (run_dir / "eval" / "samples.parquet").is_file():
        eval_dir = run_dir / "eval"
    loaded = load_run(run_dir)
    spec = loaded["spec"]
    targets = target_regions(spec)
    tr = training_numbers(loaded["rollouts"], loaded["metrics"])
    figures = {"training_curves": plot_training(tr, loaded["rollouts"], out / "training_curves.png",
                                                spec.describe()).name}
    ev = table = samples = None
    if eval_dir is not None:
        eval_dir = Path(eval_dir).resolve()
        ev, samples, table = eval_numbers(eval_dir, targets)
        figures["eval_roi_bars"] = plot_roi_bars(
            table, list(ROI_NAMES), targets, out / "eval_roi_bars.png",
            "held-out prompts: region means, base vs trained").name
        figures["eval_summary"] = plot_roi_bars(
            table, ["reward", *SUMMARY_NAMES], ["reward"], out / "eval_summary.png",
            f"reward {spec.describe()}, hemispheres and whole cortex").name
        import pandas as pd

        long = pd.read_parquet(eval_dir / "roi_timeseries.parquet")
        summaries = {m: timeseries_summary(long, m) for m in MODELS}
        figures["eval_roi_timeseries"] = plot_timeseries(summaries, targets, out / "eval_roi_timeseries.png").name
        ev["timeseries"] = {m: {"n_trs": int(summaries[m]["mean"].shape[1]),
                                "mean": {name: summaries[m]["mean"][i].tolist() for i, name in enumerate(MEASURES)},
                                "se": {name: summaries[m]["se"][i].tolist() for i, name in enumerate(MEASURES)},
                                "count": {name: summaries[m]["count"][i].tolist() for i, name in enumerate(MEASURES)}}
                            for m in MODELS}
        maps = {m: np.load(eval_dir / f"mean_map_{m}.npy").astype(np.float64) for m in MODELS}
        shared = float(np.nanmax(np.abs(np.concatenate([maps["base"], maps["trained"]]))))
        n_ok = ev["n_ok"]
        for m in MODELS:
            figures[f"surface_{m}"] = surface_figure(
                maps[m], out / f"surface_{m}.png", vmax=shared,
                title=f"{m}: mean predicted response (time mean over TRs, {n_ok[m]} completions)").name
        diff = maps["trained"] - maps["base"]
        figures["surface_diff"] = surface_figure(diff, out / "surface_diff.png",
                                                 title="trained − base: mean predicted response").name
        ev["maps"] = {"vmax_shared": shared, "diff_abs_max": float(np.nanmax(np.abs(diff))),
                      **{f"{m}_mean_over_vertices": float(np.nanmean(maps[m])) for m in MODELS}}
    report_md = write_markdown(out / "report.md", run_dir, loaded, tr, ev, table, samples, figures)
    numbers = {"run_dir": str(run_dir), "reward_spec": spec.describe(), "target_regions": targets,
               "encoder_trained": bool(loaded["rollouts"]["encoder_trained"].fillna(False).any()),
               "training": tr, "eval": ev, "figures": figures, "report_md": str(report_md)}
    (out / "report_numbers.json").write_text(json.dumps(_json_safe(numbers), indent=1, allow_nan=False))
    return numbers
