"""``brainloop`` command line: score a text, summarise a run (eval and report live in their modules)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _cmd_summary(args: argparse.Namespace) -> int:
    from brainloop.driver import summarize
    from brainloop.rollout_log import RunFiles

    run = Path(args.run_dir)
    steps = [m for m in RunFiles(run).read_metrics() if "reward_mean" in m]
    if not steps:
        print(f"no steps recorded in {run}", file=sys.stderr)
        return 1
    s = summarize(steps)
    lines = [
        f"run directory      {run}",
        f"steps              {s['steps']}",
        f"reward first {s['window']:>2}    {s['reward_first']:.5f} ± {s['reward_first_se']:.5f} (mean ± s.e.)",
        f"reward last {s['window']:>2}     {s['reward_last']:.5f} ± {s['reward_last_se']:.5f}",
        f"gain               {s['reward_gain']:+.5f} ({s['reward_gain_z']:.2f} standard errors)",
        f"best reward        {s['best_reward']:.5f}",
        f"KL last step       {s['kl_per_token_last']:.4f} nats/token, {s['kl_per_sequence_last']:.3f} nats/sequence",
        f"mean tokens        {s['mean_tokens_first']:.1f} -> {s['mean_tokens_last']:.1f}",
        f"distinct-2         {s['distinct_2_first']:.3f} -> {s['distinct_2_last']:.3f}",
        f"seconds per step   {s['seconds_per_step']:.1f} (median)",
        f"final adapter      {run / 'final_adapter'}",
    ]
    if args.dashboard:
        lines.append(f"dashboard          {args.dashboard}")
    print("\n".join(lines))
    return 0


def _cmd_score(args: argparse.Namespace) -> int:
    from brainloop.config import load_config
    from brainloop.rois import ROI_NAMES, SUMMARY_NAMES
    from reward_workers.pipeline import build_pipeline

    text = Path(args.file).read_text() if args.file else args.text
    if text is None:
        print("give a text or --file", file=sys.stderr)
        return 2
    cfg = load_config(args.config)
    pipeline = build_pipeline(cfg.reward.pipeline.model_dump(), cfg.reward.spec, use_cache=False)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = pipeline.score(text, prediction_dir=str(out))
    if not result.ok:
        print(f"{result.status}: {result.error}", file=sys.stderr)
        return 1
    print(f"reward ({cfg.reward.spec.describe()}): {result.reward:.6f}")
    if not result.encoder_trained:
        print("NOTE: untrained embedded encoder (seeded random weights): numbers test the machinery, not the brain")
    # Fidelity to TRIBE v2 (README): what split the sentences of the word contexts, where the model came from.
    upstream = " (as upstream)" if result.splitter == "en_core_web_lg" else " (upstream: en_core_web_lg)"
    release = "an official TRIBE v2 release" if result.official_release else "not an official TRIBE v2 release"
    print(f"fidelity: sentence splitter {result.splitter or '?'}{upstream}; encoder: {release}; "
          f"words with a context {result.n_words_kept}/{result.n_words}")
    print(f"{'region':<22}{'mean':>12}")
    for name in (*ROI_NAMES, *SUMMARY_NAMES):
        print(f"{name:<22}{result.roi[name]:>12.6f}")
    print("timings: " + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in result.timings.items()))
    if result.prediction_path:
        import numpy as np

        from brainloop.plots import surface_figure

        prediction = np.load(result.prediction_path)
        png = out / "surface.png"
        surface_figure(prediction.mean(axis=0), png, title=f"predicted response (time mean): {text[:60]!r}")
        print(f"prediction {result.prediction_path} ({prediction.shape[0]} TRs); surface map {png}")
    if args.json:
        Path(args.json).write_text(json.dumps(result.__dict__, indent=1))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from brainloop.config import load_config, merge_overrides, parse_override
    from brainloop.evaluate import run_eval

    overrides: dict = {}
    for item in args.set or []:  # e.g. --set sampler.engine=transformers
        overrides = merge_overrides(overrides, parse_override(item))
    cfg = load_config(args.config, overrides)
    run_eval(cfg, args.adapter, out_dir=args.out, n=args.n, prompt_split=args.prompts, max_prompts=args.max_prompts,
             seed=args.seed, temperature=args.temperature, config_path=str(Path(args.config).resolve()),
             voices=args.voices)
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from brainloop.report import build_report

    numbers = build_report(args.run_dir, eval_dir=args.eval, out_dir=args.out)
    print(f"report {numbers['report_md']}")
    return 0


EXIT_CODES = "exit codes: 0 success, 1 failure (a run or a stage failed), 2 usage or configuration error"


def _train(job_args: list[str]) -> int:
    from brainloop.job import main as job_main

    return job_main(job_args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="brainloop", description="RL fine-tuning against TRIBE v2's predicted cortical response.",
        epilog=EXIT_CODES)
    sub = parser.add_subparsers(dest="command", required=True)

    # `brainloop train` is `python -m brainloop.job` (what `ray job submit` runs): same arguments, exit codes.
    p = sub.add_parser("train", add_help=False, epilog=EXIT_CODES,
                       help="run training (as python -m brainloop.job): --config F [--set k=v] [--resume]; "
                            "`brainloop train --help` lists every option")
    p.set_defaults(func=lambda _args: _train([]))

    p = sub.add_parser("summary", help="print a run's summary")
    p.add_argument("run_dir")
    p.add_argument("--dashboard", default=None)
    p.set_defaults(func=_cmd_summary)

    p = sub.add_parser("score", help="predicted cortical response of a text: ROI table and surface map")
    p.add_argument("text", nargs="?")
    p.add_argument("--file")
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--out", default="brainloop-score")
    p.add_argument("--json", help="also write the result as JSON here")
    p.set_defaults(func=_cmd_score)

    p = sub.add_parser("eval", help="base model vs trained adapter on held-out prompts, with CIs and p-values")
    p.add_argument("--config", required=True)
    p.add_argument("--adapter", required=True, help="PEFT adapter directory, e.g. RUN_DIR/final_adapter")
    p.add_argument("--n", type=int, default=16, help="completions per prompt per model")
    p.add_argument("--out", default=None, help="output directory (default: the adapter's RUN_DIR/eval)")
    p.add_argument("--prompts", default="held_out", choices=["held_out", "train"])
    p.add_argument("--max-prompts", type=int, default=None)
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: the config's run.seed)")
    p.add_argument("--temperature", type=float, default=None, help="default: the config's sampler.temperature_end")
    p.add_argument("--voices", type=int, default=1, metavar="K",
                   help="also score each completion under K speech variants (espeak voices/rates; gTTS accents) "
                        "and report the reward's voice-to-voice spread next to the gain (default 1: off)")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="config override (repeatable)")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("report", help="figures and report.md of a run (and its eval)")
    p.add_argument("run_dir")
    p.add_argument("--eval", default=None, help="eval directory (default: RUN_DIR/eval when present)")
    p.add_argument("--out", default=None, help="output directory (default: RUN_DIR/report)")
    p.set_defaults(func=_cmd_report)

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["train"]:  # every argument after it belongs to the job's own parser
        return _train(argv[1:])
    args = parser.parse_args(argv)
    from brainloop.config import ConfigError
    from brainloop.prompts import PromptFileError

    try:
        return args.func(args)
    except (ConfigError, PromptFileError, FileNotFoundError) as exc:  # user errors: one line, no traceback
        print(f"brainloop {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
