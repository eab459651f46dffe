"""The plain-torch FmriEncoder against the official TRIBE v2 code's outputs (shared fixture) and by hand."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from reward_workers.encoder import (
    EncoderConfigError,
    EncoderLoadError,
    apply_rotary,
    build_fmri_encoder,
    embedded_encoder_config,
    load_fmri_encoder,
    predict_segments,
    resolve_config,
    rotary_angles,
    rotary_inv_freq,
    rotate_half,
    scale_norm,
)

SHARED = Path(os.environ.get("BRAINLOOP_SHARED") or Path(__file__).parents[2] / "shared")
FIXTURE = SHARED / "fixtures" / "tribe_encoder_parity"
CONFIG = FIXTURE / "config.json"
WEIGHTS = FIXTURE / "state_dict.safetensors"
ATOL = 1e-5


@pytest.fixture(scope="module")
def fixture_model():
    return load_fmri_encoder(CONFIG, WEIGHTS)


@pytest.fixture(scope="module")
def fixture_inputs() -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v) for k, v in np.load(FIXTURE / "inputs.npz").items()}


@pytest.fixture(scope="module")
def fixture_outputs():
    return dict(np.load(FIXTURE / "outputs.npz"))


# --- parity with the official code ------------------------------------------------------------------------


def test_all_modalities_pooled_and_vertex_mean(fixture_model, fixture_inputs, fixture_outputs):
    with torch.no_grad():
        out = fixture_model(fixture_inputs).numpy()
    assert out.shape == (1, 20484, 20)
    vi = fixture_outputs["vertex_index"]
    np.testing.assert_allclose(out[:, vi], fixture_outputs["all_modalities"], rtol=0, atol=ATOL)
    np.testing.assert_allclose(out.mean(axis=(0, 2)), fixture_outputs["all_modalities_vertex_mean"], rtol=0,
                               atol=ATOL)


def test_text_only_zero_fills_after_projector(fixture_model, fixture_inputs, fixture_outputs):
    with torch.no_grad():
        out = fixture_model({"text": fixture_inputs["text"]}).numpy()
        zero_inputs = fixture_model({"text": fixture_inputs["text"],
                                     "audio": torch.zeros_like(fixture_inputs["audio"]),
                                     "video": torch.zeros_like(fixture_inputs["video"])}).numpy()
    vi = fixture_outputs["vertex_index"]
    np.testing.assert_allclose(out[:, vi], fixture_outputs["text_only"], rtol=0, atol=ATOL)
    # Zero *inputs* still pass through the projector bias: a different function, which the fixture tells apart.
    assert np.abs(zero_inputs[:, vi] - fixture_outputs["text_only"]).max() > 2 * ATOL
    with torch.no_grad():
        agg = fixture_model._aggregate({"text": fixture_inputs["text"]})  # (B, T, 3 x 32) in text|audio|video order
        agg_zero_in = fixture_model._aggregate({"text": fixture_inputs["text"],
                                                "audio": torch.zeros_like(fixture_inputs["audio"])})
    assert torch.count_nonzero(agg[..., 32:]) == 0
    torch.testing.assert_close(agg_zero_in[0, :, 32:64], fixture_model.projectors["audio"].bias.expand(40, 32))


def test_unpooled(fixture_model, fixture_inputs, fixture_outputs):
    with torch.no_grad():
        out = fixture_model(fixture_inputs, pool_outputs=False).numpy()
    assert out.shape == (1, 20484, 40)
    np.testing.assert_allclose(out[:, fixture_outputs["vertex_index"]], fixture_outputs["all_modalities_unpooled"],
                               rtol=0, atol=ATOL)
    # 40 -> 20 adaptive average pooling is the mean of consecutive pairs.
    pooled = fixture_model(fixture_inputs).detach().numpy()
    np.testing.assert_allclose(pooled, out.reshape(1, 20484, 20, 2).mean(-1), rtol=0, atol=1e-6)


def test_lightning_checkpoint_loads_like_safetensors(tmp_path, fixture_model, fixture_inputs):
    state = load_file(str(WEIGHTS))
    cfg = json.loads(CONFIG.read_text())
    build_args = {"feature_dims": {k: tuple(v) for k, v in cfg["feature_dims"].items()},
                  "n_outputs": cfg["n_outputs"], "n_output_timesteps": cfg["n_output_timesteps"]}
    ckpt = tmp_path / "best.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in state.items()}, "model_build_args": build_args,
                "epoch": 3}, ckpt)
    model = load_fmri_encoder(cfg, ckpt)
    with torch.no_grad():
        torch.testing.assert_close(model(fixture_inputs), fixture_model(fixture_inputs), rtol=0, atol=0)
    # A checkpoint built with another modality order would concatenate differently: refused.
    swapped = dict(reversed(list(build_args["feature_dims"].items())))
    torch.save({"state_dict": {f"model.{k}": v for k, v in state.items()},
                "model_build_args": {**build_args, "feature_dims": swapped}}, ckpt)
    with pytest.raises(EncoderLoadError, match="feature_dims"):
        load_fmri_encoder(cfg, ckpt)


# --- strict loading ---------------------------------------------------------------------------------------


def test_strict_load_rejects_missing_key(tmp_path):
    state = load_file(str(WEIGHTS))
    del state["encoder.layers.1.1.ff.2.bias"]
    path = tmp_path / "missing.safetensors"
    save_file(state, str(path))
    with pytest.raises(EncoderLoadError, match=r"missing key\(s\): \['encoder.layers.1.1.ff.2.bias'\]"):
        load_fmri_encoder(CONFIG, path)


def test_strict_load_rejects_wrong_shape_and_unexpected_key(tmp_path):
    state = load_file(str(WEIGHTS))
    state["low_rank_head.weight"] = torch.zeros(17, 96)
    state["encoder.extra.weight"] = torch.zeros(2)
    path = tmp_path / "bad.safetensors"
    save_file(state, str(path))
    with pytest.raises(EncoderLoadError) as err:
        load_fmri_encoder(CONFIG, path)
    msg = str(err.value)
    assert "low_rank_head.weight: checkpoint (17, 96) vs model (16, 96)" in msg
    assert "unexpected key(s): ['encoder.extra.weight']" in msg


def test_missing_weights_file_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.safetensors"):
        load_fmri_encoder(CONFIG, tmp_path / "nope.safetensors")


# --- full-size architecture -------------------------------------------------------------------------------


def test_full_size_layout_and_parameter_count():
    ref = json.loads((FIXTURE / "full_default_shapes.json").read_text())
    model = build_fmri_encoder(ref, device="meta")  # shapes only
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert shapes == ref["state_dict_shapes"]
    # The reference count covers the whole state dict: 177,205,397 parameters + the 36-entry rotary buffer
    # (dim_head 144 -> rotary dim 72 -> 36 inverse frequencies).
    assert sum(v.numel() for v in model.state_dict().values()) == ref["n_params"] == 177_205_433
    assert sum(p.numel() for p in model.parameters()) == 177_205_433 - 36
    assert model.encoder.rotary_pos_emb.inv_freq.shape == (36,)


def test_resolved_encoder_kwargs_are_cross_checked():
    cfg = json.loads(CONFIG.read_text())
    spec = resolve_config(cfg)
    assert (spec.hidden, spec.depth, spec.heads, spec.rotary_dim, spec.n_subjects) == (96, 2, 3, 32, 0)
    cfg["resolved_encoder_kwargs"]["ff_mult"] = 2
    with pytest.raises(EncoderConfigError, match="ff_mult"):
        resolve_config(cfg)


def test_config_errors_are_clear():
    cfg = json.loads(CONFIG.read_text())
    cfg["brain_model_config"]["hiden"] = 12
    with pytest.raises(EncoderConfigError, match="hiden"):
        resolve_config(cfg)
    with pytest.raises(EncoderConfigError, match="dim_head"):
        embedded_encoder_config({"text": (2, 576)}, hidden=96, heads=4)


def test_forward_input_errors(fixture_model, fixture_inputs):
    with pytest.raises(ValueError, match="unknown modality"):
        fixture_model({"txt": fixture_inputs["text"]})
    with pytest.raises(ValueError, match=r"features\['audio'\] has shape"):
        fixture_model({"text": fixture_inputs["text"], "audio": fixture_inputs["audio"][..., :39]})
    with pytest.raises(ValueError, match="max_seq_len"):
        fixture_model({"text": torch.zeros(1, 2, 32, 1025)})


# Output of x-transformers 1.27.20's Encoder(dim=64, depth=2, heads=2, attn_dim_head=32, ScaleNorm, rotary,
# scale_residual, ff_mult 4) on the weights/input drawn below, computed once with the real library. The
# parity fixture's weights are too small to tell apart rotary pairing or GELU variants; these are not.
XT_GOLDEN_FIRST4 = [
    [-0.008242, 0.345224, 1.340968, 0.567411],
    [0.608638, 0.136747, 1.987413, 1.027952],
    [1.066173, 1.199381, 2.173862, 1.43286],
    [0.571392, -0.058632, 1.586933, 1.439401],
    [0.483758, -0.774892, 1.279663, 0.773902],
    [1.129346, 0.168269, 1.254593, 0.780425],
]
XT_GOLDEN_SUM, XT_GOLDEN_ABS_SUM = 364.3256, 483.4929


def test_transformer_matches_x_transformers_golden():
    cfg = embedded_encoder_config({"a": (1, 8)}, hidden=64, depth=2, heads=2, low_rank_head=None)
    stack = build_fmri_encoder(cfg).encoder
    gen = torch.Generator().manual_seed(0)
    state = stack.state_dict()
    for key in sorted(state):  # same draw order as when the golden values were made
        if key.endswith("inv_freq"):
            continue
        shape = state[key].shape
        state[key] = (1.0 + 0.5 * torch.randn(shape, generator=gen) if len(shape) == 1
                      else torch.randn(shape, generator=gen) / shape[-1] ** 0.5)
    stack.load_state_dict(state, strict=True)
    x = torch.randn(1, 6, 64, generator=gen)
    with torch.no_grad():
        y = stack(x)
    torch.testing.assert_close(y[0, :, :4], torch.tensor(XT_GOLDEN_FIRST4), rtol=0, atol=2e-5)
    assert y.sum().item() == pytest.approx(XT_GOLDEN_SUM, abs=1e-3)
    assert y.abs().sum().item() == pytest.approx(XT_GOLDEN_ABS_SUM, abs=1e-3)


# --- pure math on hand-computed cases ---------------------------------------------------------------------


def test_scale_norm_hand_case():
    # ||(3, 4)|| = 5, sqrt(dim) = sqrt(2): (3, 4) / 5 * sqrt(2) * g
    out = scale_norm(torch.tensor([3.0, 4.0]), torch.tensor([2.0]))
    torch.testing.assert_close(out, torch.tensor([0.6, 0.8]) * math.sqrt(2) * 2)


def test_rotary_hand_cases():
    torch.testing.assert_close(rotate_half(torch.tensor([1.0, 2.0, 3.0, 4.0])), torch.tensor([-3.0, -4.0, 1.0, 2.0]))
    # rotary dim 4 -> inv_freq (1, 10000 ** -0.5)
    torch.testing.assert_close(rotary_inv_freq(4), torch.tensor([1.0, 0.01]))
    angles = rotary_angles(3, torch.tensor([1.0]))  # pos * 1, repeated: (3, 2)
    torch.testing.assert_close(angles, torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]]))
    # Position p rotates the pair (x0, x1) by angle p; channels past the rotary dim pass through.
    x = torch.tensor([1.0, 0.0, 5.0]).expand(3, 3)
    out = apply_rotary(x, angles)
    expected = torch.tensor([[1.0, 0.0, 5.0], [math.cos(1), math.sin(1), 5.0], [math.cos(2), math.sin(2), 5.0]])
    torch.testing.assert_close(out, expected)


# --- embedded default and long inputs ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_encoder():
    cfg = embedded_encoder_config({"text": (2, 576), "audio": (2, 32)}, hidden=64, depth=1, heads=2,
                                  low_rank_head=8)
    return load_fmri_encoder(cfg, None, seed=0)


def test_seeded_random_init_is_deterministic_and_leaves_global_rng(small_encoder):
    cfg = embedded_encoder_config({"text": (2, 576), "audio": (2, 32)}, hidden=64, depth=1, heads=2,
                                  low_rank_head=8)
    state = torch.random.get_rng_state()
    again = load_fmri_encoder(cfg, None, seed=0)
    other = load_fmri_encoder(cfg, None, seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)
    for key, value in small_encoder.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), key
    assert not torch.equal(small_encoder.predictor.weights, other.predictor.weights)


def test_predict_segments_250s(small_encoder):
    gen = torch.Generator().manual_seed(0)
    feats = {"text": torch.randn(2, 576, 500, generator=gen), "audio": torch.randn(2, 32, 500, generator=gen)}
    pred = predict_segments(small_encoder, feats)
    assert pred.shape == (250, 20484) and pred.dtype == np.float32
    with torch.no_grad():
        first = small_encoder({k: v[None, ..., :200] for k, v in feats.items()})[0].T.numpy()
        # Last segment: 100 real steps + 100 zero steps, of which the first 50 outputs are kept.
        last = small_encoder({k: torch.nn.functional.pad(v[None, ..., 400:], (0, 100)) for k, v in feats.items()})
    np.testing.assert_allclose(pred[:100], first, rtol=0, atol=1e-5)
    np.testing.assert_allclose(pred[200:], last[0].T.numpy()[:50], rtol=0, atol=1e-5)
    # Odd lengths round up to the TR that contains the last step; text alone zero-fills audio.
    assert predict_segments(small_encoder, {"text": feats["text"][..., :401]}).shape == (201, 20484)


def test_predict_segments_rejects_mismatched_segment(small_encoder):
    with pytest.raises(ValueError, match="pools to 100"):
        predict_segments(small_encoder, {"text": torch.zeros(2, 576, 10)}, segment_seconds=50.0)
