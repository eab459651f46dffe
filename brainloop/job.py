"""The job entrypoint: ``python -m brainloop.job --config F`` is what ``ray job submit`` runs.

Everything that can be checked without Ray is checked before connecting to it: the config, the
``--set`` overrides, the prompt file (each prompt fits the model's context), the encoder weights
named, and the run folder (``--resume`` needs a complete checkpoint whose training-relevant config
matches). Then it connects to the Ray cluster (``RAY_ADDRESS``, set by ``ray job submit``) or, without
one, starts a private local cluster bound to 127.0.0.1 — never whatever cluster Ray last recorded on
the machine. Exit code 0 on success, 2 on a usage or configuration error (one line, no traceback),
1 on a failure of the run (one line naming the cause).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import sys
import time
from pathlib import Path

from brainloop.config import Config, ConfigError, load_config, merge_overrides, parse_override
from brainloop.prompts import Prompt, PromptFileError, load_prompts, split

# Named, not __name__: `python -m brainloop.job` runs this module as __main__, outside the configured loggers.
log = logging.getLogger("brainloop.job")

# The config keys a resumed run must share with its checkpoint: everything that decides what is
# sampled, how it is scored and how the adapter is updated. Placement (CPUs, GPUs, resources, threads),
# naming and logging may change between submissions. A prefix covers its whole section.
TRAINING_KEYS = (
    "run.steps", "run.seed",
    "policy.",
    "algo.",
    "learner.lr", "learner.weight_decay", "learner.warmup_steps", "learner.min_lr_ratio", "learner.grad_clip",
    "learner.kl_coef", "learner.micro_batch_size",
    "prompts.prompts_per_step", "prompts.file_sha256",
    "sampler.engine", "sampler.num_completions", "sampler.max_new_tokens", "sampler.temperature_start",
    "sampler.temperature_end", "sampler.top_p", "sampler.top_k",
    "reward.spec.", "reward.unspeakable_reward", "reward.pipeline.",
)
# Inside reward.pipeline: where it runs and benchmark-only settings do not change the reward.
NOT_TRAINING_KEYS = ("reward.pipeline.device", "reward.pipeline.torch_threads", "reward.pipeline.save_predictions",
                     "reward.pipeline.simulated_latency_s")
_KEY_PATH = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


class UsageError(Exception):
    """A mistake in the command, config or run folder: exit 2 with one line."""


class RunError(Exception):
    """The run cannot go on (cluster unreachable, failure budget, unwritable folder): exit 1 with one line."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="brainloop.job", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="run config YAML (configs/demo.yaml)")
    parser.add_argument("--run-dir", help="output folder (default: run.output_dir/run.name)")
    resume = parser.add_mutually_exclusive_group()
    resume.add_argument("--resume", action="store_true",
                        help="continue from the run folder's last complete checkpoint (an error if there is none)")
    resume.add_argument("--resume-or-start", action="store_true",
                        help="continue from the last complete checkpoint, or start over if there is none "
                             "(what scripts/submit_with_retry.sh passes on a resubmission)")
    parser.add_argument("--force-config", action="store_true",
                        help="resume even though training-relevant config differs from the checkpoint's "
                             "(recorded in RUN/config_changes.jsonl)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set run.steps=60 (repeatable)")
    parser.add_argument("--validate-only", action="store_true", help="check the config and prompts, then exit")
    return parser


# ---- logging ---------------------------------------------------------------------------------------------
# Library code logs through `logging`, one logger per module; the entrypoint decides how it looks. Progress
# lines keep the form `ray job logs` has always shown: "[brainloop] step 3/20 reward ...", with the level
# named only above INFO ("[brainloop] WARNING guard ...").
LOGGED_PACKAGES = ("brainloop", "actors", "learner", "reward_workers")


class ProgressFormatter(logging.Formatter):
    """``[brainloop] message``, ``[brainloop] WARNING message`` above INFO (tracebacks appended as usual)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        level = "" if record.levelno <= logging.INFO else f"{record.levelname} "
        return f"[brainloop] {level}{record.message}"


class StdoutHandler(logging.StreamHandler):
    """Writes to ``sys.stdout`` as it is when a record is logged (Ray's job runner and pytest replace it),
    as the progress prints did, so the lines interleave with the job's own output."""

    def __init__(self) -> None:
        super().__init__(sys.stdout)

    @property
    def stream(self):  # type: ignore[override]
        return sys.stdout

    @stream.setter
    def stream(self, _value) -> None:
        pass


def configure_logging(level: int = logging.INFO) -> None:
    """Route the packages' loggers to stdout in the progress format; idempotent (``main`` may run again in
    one process). Records still propagate, so a host application's own handlers see them too."""
    for name in LOGGED_PACKAGES:
        logger = logging.getLogger(name)
        if not any(isinstance(h, StdoutHandler) for h in logger.handlers):
            handler = StdoutHandler()
            handler.setFormatter(ProgressFormatter())
            logger.addHandler(handler)
        if logger.level == logging.NOTSET:
            logger.setLevel(level)


# ---- checks before Ray ----------------------------------------------------------------------------------
def load_checked_config(path: str, overrides: list[str]) -> tuple[Config, list[Prompt]]:
    merged: dict = {}
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if "=" in item and not _KEY_PATH.match(key):
            raise ConfigError(f"--set {item!r}: {key!r} is not a dotted key such as run.steps")
        merged = merge_overrides(merged, parse_override(item))
    cfg = load_config(path, merged)
    prompts = load_prompts(cfg.prompts.file)
    split(prompts, "train")
    enc = cfg.reward.pipeline.encoder
    for what, value in (("config", enc.config), ("weights", enc.weights)):
        if value and "://" not in value and not Path(value).exists():
            raise ConfigError(f"reward.pipeline.encoder.{what}: {value} does not exist")
    # A release is a directory or a hub id ("facebook/tribev2"); a path-looking one must exist here.
    if enc.release and enc.release.startswith(("/", ".", "~")) and not Path(enc.release).expanduser().is_dir():
        raise ConfigError(f"reward.pipeline.encoder.release: {enc.release} is not a directory")
    return cfg, prompts


def check_prompt_lengths(cfg: Config, prompts: list[Prompt]) -> str:
    """Every prompt, chat-formatted, plus ``max_new_tokens`` must fit ``sampler.max_model_len``.

    Needs only the policy's tokenizer. A model that is not on this machine (a hub id on a cluster)
    cannot be checked here; the sampler then refuses such a prompt at its step. Returns a note."""
    from brainloop.models import resolve_model

    try:
        source = resolve_model(cfg.policy.model)
        if not Path(source).is_dir():
            return f"prompt lengths not checked here: {cfg.policy.model} is not on this machine"
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as exc:
        return f"prompt lengths not checked here: tokenizer of {cfg.policy.model} unavailable ({exc})"
    budget = cfg.sampler.max_model_len - cfg.sampler.max_new_tokens
    for prompt in prompts:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt.text}], add_generation_prompt=True,
                                             tokenize=False)
        n = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        if n > budget:
            raise ConfigError(
                f"{cfg.prompts.file}: prompt {prompt.id!r} is {n} tokens; with sampler.max_new_tokens "
                f"{cfg.sampler.max_new_tokens} it exceeds sampler.max_model_len {cfg.sampler.max_model_len}")
    return f"all {len(prompts)} prompts fit in {budget} tokens"


def training_view(cfg_dict: dict, prompts_sha256: str | None) -> dict[str, object]:
    """The training-relevant keys of a config, flattened to dotted names."""
    flat: dict[str, object] = {}

    def walk(prefix: str, node: object) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(f"{prefix}{key}.", value)
        else:
            flat[prefix[:-1]] = node

    walk("", cfg_dict)
    if prompts_sha256 is not None:
        flat["prompts.file_sha256"] = prompts_sha256
    return {k: v for k, v in flat.items()
            if any(k == p or (p.endswith(".") and k.startswith(p)) for p in TRAINING_KEYS)
            and not any(k == n or k.startswith(n + ".") for n in NOT_TRAINING_KEYS)}


def config_differences(old: dict[str, object], new: dict[str, object]) -> dict[str, tuple[object, object]]:
    return {k: (old.get(k, "<unset>"), new.get(k, "<unset>")) for k in sorted(set(old) | set(new))
            if old.get(k, "<unset>") != new.get(k, "<unset>")}


def file_sha256(path: str | Path) -> str | None:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None


def check_run_dir(cfg: Config, run_dir: Path, args: argparse.Namespace) -> bool:
    """Decide whether to resume; raise ``UsageError`` on a run folder that does not fit the command.

    Returns True when the run continues from a checkpoint."""
    import yaml

    from brainloop.checkpoint import checkpoint_config, latest_checkpoint

    if run_dir.exists() and not run_dir.is_dir():
        raise UsageError(f"--run-dir {run_dir} exists and is not a folder")
    wants_resume = args.resume or args.resume_or_start
    has_rows = any(run_dir.glob("rollouts/*.parquet"))
    if not wants_resume:
        if has_rows:
            raise UsageError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --run-dir")
        return False
    ckpt = latest_checkpoint(run_dir / "checkpoints")
    if ckpt is None:
        if args.resume:
            raise UsageError(f"--resume: {run_dir} has no complete checkpoint to continue from"
                             + (" (its rollouts would be lost)" if has_rows else "")
                             + "; pass --resume-or-start to start the run over")
        log.info("%s: no complete checkpoint; starting the run over", run_dir)
        return False
    saved = checkpoint_config(ckpt)
    if saved is None and (run_dir / "config.yaml").is_file():  # checkpoints from before configs were kept
        saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    if saved is None:
        raise UsageError(f"--resume: {ckpt} records no config to compare with; pass --force-config to resume anyway")
    old_sha = saved.get("prompts", {}).pop("file_sha256", None)
    new_sha = file_sha256(cfg.prompts.file)
    diff = config_differences(training_view(saved, old_sha if old_sha else None),
                              training_view(cfg.model_dump(mode="json"), new_sha if old_sha else None))
    if diff:
        listing = ", ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in ((k, *v) for k, v in diff.items()))
        if not args.force_config:
            raise UsageError(f"--resume: the config differs from {ckpt.name}'s in training-relevant keys ({listing}); "
                             "pass --force-config to resume with the new values")
        record = {"time": time.time(), "checkpoint": ckpt.name, "forced": True,
                  "changed": {k: {"checkpoint": a, "now": b} for k, (a, b) in diff.items()}}
        with open(run_dir / "config_changes.jsonl", "a") as handle:
            handle.write(json.dumps(record, default=str) + "\n")
        log.info("--force-config: resuming %s with changed %s", ckpt.name, listing)
    return True


# ---- Ray ------------------------------------------------------------------------------------------------
def logical_cpus(cfg: Config) -> int:
    """CPUs a private cluster must advertise so every actor of the config can be placed (logical, not cores)."""
    # An autoscaled pool may grow to max_workers: room for all of them, or the extra ones stay pending.
    workers = max(cfg.reward.num_workers, cfg.reward.autoscale.max_workers if cfg.reward.autoscale else 0)
    need = cfg.sampler.num_cpus + cfg.learner.num_cpus + workers * cfg.reward.num_cpus_per_worker
    return max(os.cpu_count() or 1, int(-(-need // 1)))


def probe_gcs(address: str, attempts: int = 5, wait_s: float = 2.0) -> None:
    """Fail fast, in one line, when a ``host:port`` GCS address does not answer: ``ray.init`` would retry
    for many minutes, logging a warning every few seconds."""
    import socket

    match = re.fullmatch(r"([\w.\-]+|\[[0-9a-fA-F:]+\]):(\d+)", address.strip())
    if match is None:  # "auto", "ray://...", anything else: left to Ray
        return
    host, port = match.group(1).strip("[]"), int(match.group(2))
    for attempt in range(attempts):
        try:
            with socket.create_connection((host, port), timeout=5):
                return
        except OSError as exc:
            if attempt == attempts - 1:
                raise RunError(f"cannot reach the Ray cluster at {address} (RAY_ADDRESS): {exc.strerror or exc}"
                               ) from None
            time.sleep(wait_s)


def connect_ray(cfg: Config) -> str:
    """Connect to ``RAY_ADDRESS`` (``ray job submit`` sets it) or start a private cluster on 127.0.0.1."""
    import ray

    namespace = f"brainloop-{cfg.run.name}"
    address = os.environ.get("RAY_ADDRESS")
    if address:
        probe_gcs(address)
    try:
        if address:
            ray.init(address=address, namespace=namespace, log_to_driver=True)
            return f"Ray cluster at {address}"
        # address="local" always starts a new cluster; address=None would attach to the last cluster Ray
        # recorded on this machine (possibly stopped, possibly someone else's). Bound to 127.0.0.1 when
        # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 was set before Ray was imported (main does; see ray_local.sh).
        ray.init(address="local", namespace=namespace, log_to_driver=True, include_dashboard=False,
                 num_cpus=logical_cpus(cfg), _node_ip_address="127.0.0.1")
        return f"a private local Ray cluster ({ray.get_runtime_context().gcs_address})"
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = f"the Ray cluster at {address}" if address else "a private local Ray cluster"
        raise RunError(f"cannot connect to {where}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
                       ) from None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging()
    try:
        cfg, prompts = load_checked_config(args.config, args.set)
        note = check_prompt_lengths(cfg, prompts)
        if args.validate_only:
            print(f"[brainloop] {args.config}: valid ({len(prompts)} prompts; {note})")
            return 0
        run_dir = Path(args.run_dir or Path(cfg.run.output_dir) / cfg.run.name).resolve()
        resume = check_run_dir(cfg, run_dir, args)
    except (ConfigError, PromptFileError) as exc:
        print(f"[brainloop] configuration error: {exc}", file=sys.stderr)
        return 2
    except UsageError as exc:
        print(f"[brainloop] error: {exc}", file=sys.stderr)
        return 2

    if not os.environ.get("RAY_ADDRESS"):
        # A private cluster on one machine: Ray keeps 127.0.0.1 as the node address and binds its servers
        # to it only in this mode (read when Ray is imported, so before the import below).
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    from brainloop.driver import Loop, RunFailure

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    loop = None
    try:
        where = connect_ray(cfg)
        log.info("connected to %s; run folder %s%s", where, run_dir, " (resuming)" if resume else "")
        loop = Loop(cfg, run_dir, resume=resume)
        summary = loop.run()
    except (RunError, RunFailure) as exc:
        print(f"[brainloop] run failed: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        if loop is not None:
            try:
                loop.close()
            except Exception as exc:  # never mask the run's own outcome with a clean-up problem
                print(f"[brainloop] clean-up: {type(exc).__name__}: {exc}", file=sys.stderr)
    print("[brainloop] summary " + json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
