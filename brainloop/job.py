"""The job entrypoint: ``python -m brainloop.job --config F`` is what ``ray job submit`` runs.

Validates the config and the prompt file before any actor starts, connects to the Ray cluster
(``RAY_ADDRESS``, set by ``ray job submit``; a private local cluster otherwise), runs the loop and
prints a summary. Exit code 0 on success, 2 on a configuration error, 1 on a failure.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from brainloop.config import ConfigError, load_config, parse_override
from brainloop.prompts import PromptFileError, load_prompts, split


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="brainloop.job", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="run config YAML (configs/demo.yaml)")
    parser.add_argument("--run-dir", help="output folder (default: run.output_dir/run.name)")
    parser.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set run.steps=60 (repeatable)")
    parser.add_argument("--validate-only", action="store_true", help="check the config and prompts, then exit")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        overrides: dict = {}
        for item in args.set:
            from brainloop.config import _merge

            overrides = _merge(overrides, parse_override(item))
        cfg = load_config(args.config, overrides)
        prompts = load_prompts(cfg.prompts.file)
        split(prompts, "train")
    except (ConfigError, PromptFileError) as exc:
        print(f"[brainloop] configuration error: {exc}", file=sys.stderr)
        return 2
    if args.validate_only:
        print(f"[brainloop] {args.config}: valid ({len(prompts)} prompts)")
        return 0
    run_dir = Path(args.run_dir or Path(cfg.run.output_dir) / cfg.run.name).resolve()
    if run_dir.exists() and any(run_dir.glob("rollouts/*.parquet")) and not args.resume:
        print(f"[brainloop] {run_dir} already holds a run; pass --resume to continue it or choose another "
              "--run-dir", file=sys.stderr)
        return 2

    import ray

    from brainloop.driver import Loop

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    ray.init(address=os.environ.get("RAY_ADDRESS"), namespace=f"brainloop-{cfg.run.name}",
             log_to_driver=True, include_dashboard=False if not os.environ.get("RAY_ADDRESS") else None)
    loop = Loop(cfg, run_dir, resume=args.resume)
    try:
        summary = loop.run()
    finally:
        loop.close()
    print("[brainloop] summary " + json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
