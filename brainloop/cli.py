"""``brainloop`` command line: score a text, summarise a run, scale and watch a running job's reward pool
(eval and report live in their modules)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _cmd_summary(args: argparse.Namespace) -> int:
    from brainloop.rollout_log import RunFiles
    from brainloop.summary import summarize

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


# ---- a running job's reward pool: `brainloop scale` / `brainloop status` ------------------------------
LOCAL_HEAD_PORT = 6390  # scripts/ray_local.sh (BRAINLOOP_RAY_PORT): the demo's head


class LiveError(Exception):
    """No running job to talk to (unreachable cluster, refused token, wrong run name): exit 2, one line."""


def _gcs_address(given: str | None) -> str:
    """--address, else RAY_ADDRESS when it names a GCS (an http:// one is the job server's), else the demo's head."""
    import os

    if given:
        return given
    env = os.environ.get("RAY_ADDRESS", "")
    if env and "://" not in env:
        return env
    return f"127.0.0.1:{os.environ.get('BRAINLOOP_RAY_PORT', LOCAL_HEAD_PORT)}"


def _connect(address: str) -> None:
    """Join the cluster as a short-lived driver. Token auth as Ray does it: RAY_AUTH_MODE, else token mode
    whenever a token exists (``ray get-auth-token --generate`` put it in ~/.ray/auth_token)."""
    import logging
    import os
    import re

    from brainloop.job import RunError, probe_gcs

    try:
        probe_gcs(address, attempts=1)  # one line at once instead of Ray's minutes of retries
    except RunError as exc:
        raise LiveError(str(exc).replace(" (RAY_ADDRESS)", "") + "; is the job's Ray head running? (--address)"
                        ) from None
    import ray
    from ray._private import ray_constants
    from ray._private.authentication.authentication_token_setup import maybe_enable_token_auth_if_token_available

    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)  # RAY_AUTH_MODE set wins
    host = re.sub(r":\d+$", "", address.strip()).strip("[]")
    if host in ("127.0.0.1", "localhost", "::1"):
        # A loopback-only head (scripts/ray_local.sh) has its raylet on 127.0.0.1, which Ray finds only in
        # its single-machine mode; a head other nodes can join has it on the machine's address.
        from ray._raylet import GcsClient

        try:
            nodes = GcsClient(address=address).get_all_node_info(timeout=10).values()
        except Exception as exc:
            raise LiveError(f"the Ray cluster at {address} refused us: {_first_line(exc)} (token auth: "
                            "RAY_AUTH_MODE=token and the token `ray get-auth-token` shows)") from None
        if any(n.node_manager_address == "127.0.0.1" for n in nodes):
            os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
            ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        ray.init(address=address, log_to_driver=False, logging_level=logging.ERROR, configure_logging=False)
    except Exception as exc:
        raise LiveError(f"cannot connect to the Ray cluster at {address}: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    return next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)[:300]


def _control(args: argparse.Namespace):
    from reward_workers.control import find_control, running_runs

    address = _gcs_address(args.address)
    _connect(address)
    found = find_control(args.run)
    if found is None:
        runs = running_runs()
        raise LiveError(f"no running job named {args.run!r} on the Ray cluster at {address} ("
                        + (f"running: {', '.join(runs)}" if runs else "no brainloop job is running there") + ")")
    return found[0], address


def _cmd_scale(args: argparse.Namespace) -> int:
    import time

    import ray

    control, _ = _control(args)
    request = ray.get(control.request.remote(args.reward_workers, source="brainloop scale"), timeout=30)
    note = ""
    if request["clamped"]:
        low, high = request["bounds"]
        note = f" (clamped from {args.reward_workers}: reward.autoscale keeps it within [{low}, {high}])"
    print(f"run {args.run}: reward pool target {request['target']}{note}")
    deadline = time.monotonic() + args.wait
    while time.monotonic() < deadline:  # the pool applies it at its next poll (about once a second while it scores)
        pool = ray.get(control.status.remote(), timeout=30)["pool"]
        if pool.get("applied_seq", 0) >= request["seq"]:
            print(f"applied: target {pool['target']}, alive {pool['alive']}, pending placement {pool['pending']}, "
                  f"starting {pool['starting']}, draining {pool['draining']}")
            return 0
        time.sleep(0.5)
    print(f"not applied yet after {args.wait:g} s: the driver applies it at its next poll of the pool "
          "(at the latest after its current step)")
    return 0


def _format_status(run: str, snapshot: dict) -> str:
    pool, now = snapshot.get("pool") or {}, snapshot["now"]
    if not pool:
        return f"run {run}: the reward pool has not published a status yet"
    progress = pool.get("progress") or {}
    lines = [f"run {run}"
             + (f": step {progress['step']}/{progress['steps']}, ETA {progress['eta_s']:.0f} s, "
                f"{progress['step_seconds']:.1f} s/step" if "step" in progress else ": no step finished yet")
             + f" (status {now - snapshot['published_at']:.1f} s old)"]
    a = pool.get("autoscale")
    scale = (f"autoscale [{a['min_workers']}, {a['max_workers']}], target queue per worker "
             f"{a['target_queue_per_worker']:g}, up after {a['up_after_s']:g} s, down after "
             f"{a['down_after_idle_s']:g} s idle") if a else "fixed size (brainloop scale changes it)"
    lines.append(f"reward pool: target {pool['target']}, alive {pool['alive']}, pending placement {pool['pending']}, "
                 f"starting {pool['starting']}, restarting {pool['restarting']}, draining {pool['draining']}; {scale}")
    lines.append(f"queue: {pool['waiting']} texts waiting ({pool['queued']} not yet sent), {pool['in_flight']} calls "
                 f"in flight, {pool['queue_per_worker']:.2f} waiting per worker; {pool['worker_seconds']:.0f} "
                 "worker-seconds so far")
    lines.append(f"{'worker':<20}{'state':<12}{'in flight':>10}{'texts':>8}{'texts/s':>9}{'busy':>7}  host")
    for w in pool["workers"]:
        rate = f"{w['texts_per_s']:.2f}" if w.get("texts_per_s") is not None else "-"
        busy = f"{w['utilisation']:.0%}" if w.get("utilisation") is not None else "-"
        lines.append(f"{w['name']:<20}{w['state']:<12}{w['in_flight']:>10}{w['texts']:>8}{rate:>9}{busy:>7}  "
                     f"{w.get('host') or '-'}")
    for d in pool.get("decisions", [])[-5:]:
        lines.append(f"  {now - d['time']:6.0f} s ago: {d['from']} -> {d['to']} workers: {d['reason']}")
    return "\n".join(lines)


def _cmd_status(args: argparse.Namespace) -> int:
    import ray

    control, _ = _control(args)
    snapshot = ray.get(control.status.remote(), timeout=30)
    print(json.dumps(snapshot, indent=1) if args.json else _format_status(args.run, snapshot))
    return 0


EXIT_CODES = "exit codes: 0 success, 1 failure (a run or a stage failed), 2 usage or configuration error"


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


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

    address_help = ("the job's Ray cluster (GCS host:port; default: RAY_ADDRESS unless it is an http:// job-server "
                    f"address, else the demo's head 127.0.0.1:{LOCAL_HEAD_PORT}; on a cluster's head: auto)")
    p = sub.add_parser("scale", help="set the reward-pool size of a running job (clamped to reward.autoscale's bounds)")
    p.add_argument("run", metavar="RUN_NAME", help="the job's run.name")
    p.add_argument("--reward-workers", type=_positive_int, required=True, metavar="N")
    p.add_argument("--address", default=None, help=address_help)
    p.add_argument("--wait", type=float, default=10.0, help="seconds to wait for the pool to apply it (default 10)")
    p.set_defaults(func=_cmd_scale)

    p = sub.add_parser("status", help="a running job's reward pool (size by state, queue, per-worker rates), step, ETA")
    p.add_argument("run", metavar="RUN_NAME", help="the job's run.name")
    p.add_argument("--address", default=None, help=address_help)
    p.add_argument("--json", action="store_true", help="the raw snapshot as JSON")
    p.set_defaults(func=_cmd_status)

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["train"]:  # every argument after it belongs to the job's own parser
        return _train(argv[1:])
    args = parser.parse_args(argv)
    from brainloop.config import ConfigError
    from brainloop.prompts import PromptFileError

    try:
        return args.func(args)
    except (ConfigError, PromptFileError, FileNotFoundError, LiveError) as exc:  # user errors: one line, no traceback
        print(f"brainloop {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
