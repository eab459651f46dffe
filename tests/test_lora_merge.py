"""Merged LoRA weights (actors/lora_merge.py): hand cases, and PEFT's own merge as the oracle."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from actors import lora_merge

PACKED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}


def test_merged_weight_hand_case() -> None:
    weight = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    a = torch.tensor([[1.0, 2.0]])  # (r=1, in=2)
    b = torch.tensor([[3.0], [-1.0]])  # (out=2, r=1)
    # b @ a = [[3, 6], [-1, -2]]; scale 0.5
    assert torch.equal(lora_merge.merged_weight(weight, a, b, 0.5), torch.tensor([[2.5, 3.0], [-0.5, 0.0]]))
    assert torch.equal(weight, torch.eye(2))  # the base weight is not modified


def test_merged_weight_refuses_low_precision_and_bad_shapes() -> None:
    a, b = torch.ones(1, 2), torch.ones(2, 1)
    with pytest.raises(ValueError, match="float32"):
        lora_merge.merged_weight(torch.eye(2, dtype=torch.bfloat16), a, b, 1.0)
    with pytest.raises(ValueError, match="do not fit"):
        lora_merge.merged_weight(torch.eye(3), a, b, 1.0)


def test_engine_module_names() -> None:
    assert lora_merge.engine_module("layers.3.self_attn.k_proj", PACKED) == ("layers.3.self_attn.qkv_proj", 1)
    assert lora_merge.engine_module("layers.3.self_attn.o_proj", PACKED) == ("layers.3.self_attn.o_proj", 0)
    assert lora_merge.engine_module("layers.0.mlp.up_proj", PACKED) == ("layers.0.mlp.gate_up_proj", 1)
    assert lora_merge.engine_module("q_proj", PACKED) == ("qkv_proj", 0)
    layout = lora_merge.engine_modules(["l.q_proj", "l.v_proj", "l.o_proj"], PACKED)
    assert layout == {"l.qkv_proj": ["l.q_proj", "l.k_proj", "l.v_proj"], "l.o_proj": ["l.o_proj"]}


def test_packed_weights_hand_case() -> None:
    base = {"l.q_proj": torch.zeros(2, 2), "l.k_proj": torch.ones(1, 2), "l.v_proj": torch.full((1, 2), 2.0),
            "l.o_proj": torch.eye(2)}
    adapter = lora_merge.LoraAdapter({"l.v_proj": (torch.tensor([[1.0, 1.0]]), torch.tensor([[1.0]]))}, 2.0)
    layout = lora_merge.engine_modules(["l.v_proj", "l.o_proj"], PACKED)
    merged = lora_merge.packed_weights(base, adapter, layout)
    # q and k as they are, v = 2 + 2 * 1: stacked in the packed order
    assert torch.equal(merged["l.qkv_proj"], torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 1.0], [4.0, 4.0]]))
    assert torch.equal(merged["l.o_proj"], torch.eye(2))  # no factors for o_proj in this adapter
    assert torch.equal(lora_merge.packed_weights(base, None, layout)["l.qkv_proj"][3], torch.full((2,), 2.0))


def _tiny_peft(tmp_path: Path, **lora_kwargs) -> tuple[torch.nn.Module, Path]:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(init_lora_weights=False, **lora_kwargs))
    model.save_pretrained(str(tmp_path / "adapter"))
    return model, tmp_path / "adapter"


@pytest.mark.parametrize("rslora", [False, True])
def test_merge_equals_peft_merge_and_unload(tmp_path: Path, rslora: bool) -> None:
    """Every adapted weight, packed as vLLM packs it, equals PEFT's merge_and_unload (1e-6)."""
    targets = ["q_proj", "v_proj", "o_proj", "down_proj", "up_proj"]
    model, path = _tiny_peft(tmp_path, r=4, lora_alpha=8, target_modules=targets, use_rslora=rslora)
    base = {name.replace(".base_layer", "").removesuffix(".weight"): p.detach().clone()
            for name, p in model.get_base_model().named_parameters()
            if name.endswith(".weight") and "_proj" in name and "lora_" not in name}
    adapter = lora_merge.read_peft_adapter(path)
    assert adapter.scale == pytest.approx(8 / 2 if rslora else 8 / 4)
    assert len(adapter.factors) == 2 * len(targets) and "model.layers.1.mlp.down_proj" in adapter.factors
    layout = lora_merge.engine_modules(sorted(adapter.factors), PACKED)
    ours = lora_merge.packed_weights(base, adapter, layout)
    oracle = {name.removesuffix(".weight"): p.detach()
              for name, p in model.merge_and_unload().named_parameters() if name.endswith("proj.weight")}
    assert set(ours) == {f"model.layers.{i}.{m}" for i in range(2) for m in
                         ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.down_proj", "mlp.gate_up_proj")}
    for name, weight in ours.items():
        expected = torch.cat([oracle[part] for part in layout[name]])
        assert torch.allclose(weight, expected, rtol=1e-6, atol=1e-7), name
    changed = ours["model.layers.0.self_attn.qkv_proj"][:16] - base["model.layers.0.self_attn.q_proj"]
    assert changed.abs().max() > 1e-2  # the adapter really changes the weights (init_lora_weights=False)


def test_read_peft_adapter_refuses_what_a_merge_gets_wrong(tmp_path: Path) -> None:
    _, path = _tiny_peft(tmp_path, r=2, lora_alpha=2, target_modules=["q_proj"])
    config = json.loads((path / "adapter_config.json").read_text())
    for key, value in [("use_dora", True), ("rank_pattern", {"q_proj": 4}), ("bias", "all"),
                       ("modules_to_save", ["lm_head"])]:
        (path / "adapter_config.json").write_text(json.dumps({**config, key: value}))
        with pytest.raises(ValueError, match=key):
            lora_merge.read_peft_adapter(path)
    (path / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "IA3"}))
    with pytest.raises(ValueError, match="not a LoRA adapter"):
        lora_merge.read_peft_adapter(path)
