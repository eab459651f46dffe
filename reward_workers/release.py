"""TRIBE v2 release files (``config.yaml`` + ``best.ckpt``): read safely, and the embedded default written as one.

An official release (``facebook/tribev2`` on the Hugging Face hub) is a directory with
``config.yaml`` — the whole experiment config, written by ``yaml.dump`` of the pydantic model, so it
carries Python tags for tuples, ``OrderedDict`` and ``PosixPath`` — and ``best.ckpt``, a Lightning
checkpoint whose ``state_dict`` names the encoder's parameters with a ``model.`` prefix and whose
``model_build_args`` hold ``feature_dims``, ``n_outputs`` and ``n_output_timesteps``
(``tribev2/demo_utils.py`` ``TribeModel.from_pretrained``, read, not copied).

Upstream reads the YAML with ``yaml.UnsafeLoader`` (any tag may run code). ``load_release_config``
accepts exactly those three kinds of tag and refuses every other one; ``load_checkpoint`` uses
``torch.load(weights_only=True)`` whose unpickler only builds tensors, containers and the globals
listed in ``CHECKPOINT_GLOBALS``.

Every feature setting of the pipeline comes from the config (``ReleaseSettings``), resolved the way
``tribev2.main.Data.model_post_init`` does: ``data.layers_to_use`` / ``n_layers_to_use``,
``data.layer_aggregation`` and ``data.frequency`` override the extractors' own values.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.yaml"
CHECKPOINT_NAME = "best.ckpt"
# Release format of the embedded default: bump when what it writes changes.
EMBEDDED_RELEASE_FORMAT = 1
# Globals the checkpoint unpickler may build beyond weights_only's own tensors/containers. Lightning
# checkpoints hold OrderedDict state dicts (already allowed); named explicitly so the list is visible.
CHECKPOINT_GLOBALS: tuple[Any, ...] = (collections.OrderedDict,)
# Defaults of the upstream classes for keys a config may leave out (neuralset 0.0.2 / tribev2).
W2V_BERT = "facebook/w2v-bert-2.0"


class ReleaseError(ValueError):
    """A release file is unsafe, malformed, or asks for something brainloop does not reproduce."""


# ---- config.yaml ---------------------------------------------------------------------------------------
class ReleaseYamlLoader(yaml.SafeLoader):
    """``SafeLoader`` plus the three Python tags upstream's config.yaml uses; any other tag is refused."""


def _tuple(loader: ReleaseYamlLoader, node: yaml.Node) -> tuple:
    return tuple(loader.construct_sequence(node, deep=True))


def _apply_args(loader: ReleaseYamlLoader, node: yaml.Node) -> list:
    """Arguments of an ``object/apply`` node: a plain sequence, or a mapping holding only ``args``."""
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    if isinstance(node, yaml.MappingNode):
        value = loader.construct_mapping(node, deep=True)
        if set(value) != {"args"}:
            raise yaml.constructor.ConstructorError(None, None, f"refused {node.tag} with {sorted(value)}",
                                                    node.start_mark)
        return list(value["args"])
    raise yaml.constructor.ConstructorError(None, None, f"refused {node.tag}", node.start_mark)


def _ordered_dict(loader: ReleaseYamlLoader, node: yaml.Node) -> dict:
    args = _apply_args(loader, node)
    if len(args) > 1:
        raise yaml.constructor.ConstructorError(None, None, "OrderedDict takes one argument", node.start_mark)
    return dict(args[0]) if args else {}  # a plain dict keeps the order


def _posix_path(loader: ReleaseYamlLoader, node: yaml.Node) -> str:
    parts = _apply_args(loader, node)
    if not all(isinstance(p, str) for p in parts):
        raise yaml.constructor.ConstructorError(None, None, "PosixPath parts must be strings", node.start_mark)
    return str(PurePosixPath(*parts))  # a string: nothing in brainloop follows the paths of the training run


ReleaseYamlLoader.add_constructor("tag:yaml.org,2002:python/tuple", _tuple)
ReleaseYamlLoader.add_constructor("tag:yaml.org,2002:python/object/apply:collections.OrderedDict", _ordered_dict)
for _module in ("pathlib", "pathlib._local"):  # Python 3.13 moved PosixPath to pathlib._local
    ReleaseYamlLoader.add_constructor(f"tag:yaml.org,2002:python/object/apply:{_module}.PosixPath", _posix_path)


def load_release_config(path: str | Path) -> dict[str, Any]:
    """The release's ``config.yaml`` as plain data; ``ReleaseError`` for any tag outside the three allowed."""
    text = Path(path).read_text()
    try:
        config = yaml.load(text, Loader=ReleaseYamlLoader)  # a SafeLoader subclass: no arbitrary tags
    except yaml.YAMLError as err:
        raise ReleaseError(f"{path}: refused or malformed release config: {err}") from err
    if not isinstance(config, dict):
        raise ReleaseError(f"{path}: expected a mapping at the top level")
    return config


# ---- best.ckpt -----------------------------------------------------------------------------------------
def load_checkpoint(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(state_dict without the "model." prefix, model_build_args)`` of a release checkpoint."""
    import torch

    try:
        with torch.serialization.safe_globals(list(CHECKPOINT_GLOBALS)):
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # an UnpicklingError names the refused global
        raise ReleaseError(f"{path}: refused or unreadable checkpoint: {err}") from err
    if not isinstance(ckpt, Mapping) or "state_dict" not in ckpt or "model_build_args" not in ckpt:
        raise ReleaseError(f"{path}: not a TRIBE release checkpoint (needs 'state_dict' and 'model_build_args')")
    state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()}
    return state, dict(ckpt["model_build_args"])


# ---- settings ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ReleaseSettings:
    """Every feature setting the reward pipeline takes from a release config."""

    text_model: str
    text_layers: tuple[float, ...]
    text_cache_n_layers: int | None
    text_batch_size: int
    audio_model: str
    audio_layers: tuple[float, ...]
    audio_cache_n_layers: int | None  # recorded; upstream's audio path never sub-selects layers
    audio_norm: bool
    frequency: float  # Hz of the feature grids
    tr: float  # seconds per output step (1 / neuro.frequency)
    duration_trs: int  # output steps per segment (segments last duration_trs * tr seconds)
    features_to_use: tuple[str, ...]

    @property
    def segment_seconds(self) -> float:
        return self.duration_trs * self.tr


def _layers(value: Any) -> tuple[float, ...]:
    if isinstance(value, (int, float)):
        return (float(value),)
    if isinstance(value, (list, tuple)) and value:
        return tuple(float(v) for v in value)
    raise ReleaseError(f"layers must be a float or a list of floats, got {value!r}")


def release_settings(config: Mapping[str, Any]) -> ReleaseSettings:
    """Resolve the feature settings as ``Data.model_post_init`` does; refuse what brainloop does not implement."""
    data = config.get("data")
    if not isinstance(data, Mapping):
        raise ReleaseError("release config has no 'data' section")
    text, audio = data.get("text_feature") or {}, data.get("audio_feature") or {}
    features = tuple(data.get("features_to_use") or ())
    if "text" not in features or "audio" not in features:
        raise ReleaseError(f"data.features_to_use = {features}: brainloop needs text and audio")
    if data.get("layers_to_use") is not None and data.get("n_layers_to_use") is not None:
        raise ReleaseError("data.layers_to_use and data.n_layers_to_use are exclusive")
    override: tuple[float, ...] | None = None
    if data.get("layers_to_use") is not None:
        override = _layers(data["layers_to_use"])
    elif data.get("n_layers_to_use") is not None:
        import numpy as np

        override = tuple(float(x) for x in np.linspace(0, 1, int(data["n_layers_to_use"])))
    aggregation = data.get("layer_aggregation", "group_mean")
    frequency = data.get("frequency")
    checks = {
        "data.layer_aggregation": (aggregation, "group_mean"),
        "text_feature.token_aggregation": (text.get("token_aggregation", "mean"), "mean"),
        "text_feature.aggregation": (text.get("aggregation", "sum"), "sum"),
        "text_feature.contextualized": (text.get("contextualized", True), True),
        "text_feature.name": (text.get("name", "HuggingFaceText"), "HuggingFaceText"),
        "audio_feature.name": (audio.get("name", "Wav2VecBert"), "Wav2VecBert"),
        "audio_feature.layer_type": (audio.get("layer_type", "transformer"), "transformer"),
        "audio_feature.normalized": (audio.get("normalized", True), True),
    }
    for key, (got, want) in checks.items():
        if got != want:
            raise ReleaseError(f"{key} = {got!r}: brainloop reproduces only {want!r}")
    text_hz = float(frequency if frequency is not None else text.get("frequency", 2.0))
    audio_hz = float(frequency if frequency is not None else audio.get("frequency", text_hz))
    if text_hz != audio_hz or text_hz <= 0:
        raise ReleaseError(f"text and audio feature frequencies differ or are not positive: {text_hz}, {audio_hz}")
    neuro = data.get("neuro") or {}
    return ReleaseSettings(
        text_model=str(text.get("model_name") or "openai-community/gpt2"),
        text_layers=override or _layers(text.get("layers", 2 / 3)),
        text_cache_n_layers=None if text.get("cache_n_layers") is None else int(text["cache_n_layers"]),
        text_batch_size=int(text.get("batch_size", 32)),
        audio_model=str(audio.get("model_name") or W2V_BERT),
        audio_layers=override or _layers(audio.get("layers", 2 / 3)),
        audio_cache_n_layers=None if audio.get("cache_n_layers") is None else int(audio["cache_n_layers"]),
        audio_norm=bool(audio.get("norm_audio", True)),
        frequency=text_hz,
        tr=1.0 / float(neuro.get("frequency", 1.0)),
        duration_trs=int(data.get("duration_trs", 40)),
        features_to_use=features,
    )


def encoder_config(config: Mapping[str, Any], build_args: Mapping[str, Any]) -> dict[str, Any]:
    """The encoder config (``reward_workers.encoder`` format) of a release, as ``from_pretrained`` builds it."""
    bmc = config.get("brain_model_config")
    if not isinstance(bmc, Mapping):
        raise ReleaseError("release config has no 'brain_model_config'")
    for key in ("feature_dims", "n_outputs", "n_output_timesteps"):
        if key not in build_args:
            raise ReleaseError(f"checkpoint model_build_args lacks {key!r}")
    return {
        "brain_model_config": dict(bmc),
        "feature_dims": {str(k): v for k, v in dict(build_args["feature_dims"]).items()},
        "n_outputs": int(build_args["n_outputs"]),
        "n_output_timesteps": int(build_args["n_output_timesteps"]),
    }


# ---- locating, writing -----------------------------------------------------------------------------------
def resolve_release(release: str | Path) -> Path:
    """A local release directory, or a hub id (``facebook/tribev2``) downloaded with huggingface_hub."""
    path = Path(release).expanduser()
    if path.is_dir():
        return path
    text = str(release)
    if text.count("/") != 1 or text.startswith((".", "/")):
        raise FileNotFoundError(f"release {text!r} is neither a directory nor a hub id")
    from huggingface_hub import hf_hub_download

    try:
        config = hf_hub_download(text, CONFIG_NAME)
        hf_hub_download(text, CHECKPOINT_NAME)
    except Exception as err:  # offline, gated or missing: say which release
        raise RuntimeError(f"could not download TRIBE release {text!r} ({CONFIG_NAME}, {CHECKPOINT_NAME}): {err}. "
                           "Offline, point reward.pipeline.encoder.release at a local copy.") from err
    return Path(config).parent


def write_release(directory: Path, config: Mapping[str, Any], state_dict: Mapping[str, Any],
                  build_args: Mapping[str, Any]) -> None:
    """Write ``config.yaml`` (``yaml.dump``, Python tags as upstream) and ``best.ckpt`` (``model.`` prefix)."""
    import torch

    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / CONFIG_NAME, "w") as handle:
        yaml.dump(dict(config), handle, indent=4, default_flow_style=False, sort_keys=False)
    ckpt = {"state_dict": collections.OrderedDict((f"model.{k}", v) for k, v in state_dict.items()),
            "model_build_args": dict(build_args)}
    torch.save(ckpt, directory / CHECKPOINT_NAME)


def embedded_release_config(text_model: str, audio_model: str, brain_model_config: Mapping[str, Any],
                            text_cache_n_layers: int | None = 20) -> dict[str, Any]:
    """The release config of the embedded default, with the keys and types of upstream's ``base_config``."""
    return {
        "data": {
            "study": {"names": ("embedded",), "path": Path(".")},  # a tuple and a path, as upstream's file
            "neuro": {"name": "FmriExtractor", "frequency": 1, "offset": 5},
            "text_feature": {"name": "HuggingFaceText", "event_types": "Word", "model_name": text_model,
                             "aggregation": "sum", "frequency": 2.0, "contextualized": True,
                             "layers": [0.5, 0.75, 1.0], "cache_n_layers": text_cache_n_layers,
                             "layer_aggregation": "group_mean", "token_aggregation": "mean", "batch_size": 4},
            "audio_feature": {"name": "Wav2VecBert", "model_name": audio_model, "frequency": 2.0,
                              "layers": [0.5, 0.75, 1.0], "cache_n_layers": 20, "event_types": "Audio",
                              "aggregation": "sum", "layer_aggregation": "group_mean", "norm_audio": True},
            "frequency": 2.0,
            "duration_trs": 100,
            "layers_to_use": [0.5, 0.75, 1.0],
            "layer_aggregation": "group_mean",
            "features_to_use": ["text", "audio"],
            "batch_size": 8,
        },
        "brain_model_config": collections.OrderedDict(brain_model_config),
        "average_subjects": False,
    }


def build_embedded_release(root: Path, config: Mapping[str, Any], encoder_cfg: Mapping[str, Any],
                           seed: int) -> Path:
    """The embedded default's release under ``root``, written once (atomically) and reused.

    The directory name hashes everything it holds, so a changed setting gets its own release.
    """
    from reward_workers.encoder import build_fmri_encoder

    key = hashlib.sha256(json.dumps({"format": EMBEDDED_RELEASE_FORMAT, "config": config,
                                     "encoder": encoder_cfg, "seed": seed},
                                    sort_keys=True, default=str).encode()).hexdigest()[:16]
    final = root / f"embedded-{key}"
    if (final / CHECKPOINT_NAME).is_file() and (final / CONFIG_NAME).is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=root))
    try:
        model = build_fmri_encoder(encoder_cfg, seed=seed)
        build_args = {"feature_dims": {k: tuple(v) for k, v in encoder_cfg["feature_dims"].items()},
                      "n_outputs": encoder_cfg["n_outputs"], "n_output_timesteps": encoder_cfg["n_output_timesteps"]}
        write_release(tmp, config, model.state_dict(), build_args)
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared by several users' workers
        try:
            os.rename(tmp, final)  # atomic; another worker may have won the race
        except OSError:
            if not (final / CHECKPOINT_NAME).is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info("embedded TRIBE release at %s", final)
    return final


def settings_dict(settings: ReleaseSettings) -> dict[str, Any]:
    return asdict(settings)
