"""The Gemma-4 demo bases: real Gemma4ForConditionalGeneration, 12B-style and E-style."""

from __future__ import annotations

import json

import pytest
from safetensors import safe_open

from mergebake import MergebakeError, demo
from mergebake.layouts import build_layout
from mergebake.normalise import normalise


@pytest.fixture(autouse=True)
def _own_layout_cache(tmp_path, monkeypatch):
    """Each test's layouts come from transformers, not from an entry another test stored in
    the run's shared cache (a hit would skip the code under test)."""
    monkeypatch.setenv("MERGEBAKE_CACHE", str(tmp_path / "mergebake-cache"))


@pytest.mark.parametrize("arch", ["gemma4", "gemma4-e"])
def test_gemma4_demo_base_is_deterministic_and_normalises(tmp_path, arch):
    demo.make_base(tmp_path / "a", arch=arch, num_layers=4, seed=3)
    demo.make_base(tmp_path / "b", arch=arch, num_layers=4, seed=3)
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    assert cfg["architectures"] == ["Gemma4ForConditionalGeneration"]
    assert demo._base_arch(tmp_path / "a") == arch
    layout = build_layout(tmp_path / "a")
    text = cfg["text_config"]
    if arch == "gemma4-e":
        assert text["num_kv_shared_layers"] == 2 and text["hidden_size_per_layer_input"] == 8
        assert "audio_config" in cfg and cfg["audio_config"]
        assert len(layout.ignored) == 6  # k_proj, v_proj, k_norm of layers 2 and 3
        with safe_open(tmp_path / "a" / "model.safetensors", "pt") as f:
            a = f.get_tensor("model.language_model.layers.3.self_attn.k_proj.weight")
            b = f.get_tensor("model.language_model.layers.1.self_attn.k_proj.weight")
        assert (a == b).all()  # a copy of the layer whose cache it reuses
    else:
        assert text["num_kv_shared_layers"] == 0 and not layout.ignored
    summary = normalise(tmp_path / "a", tmp_path / "text")
    assert summary["architecture"] == "Gemma4ForCausalLM"
    assert summary["ignored"] == len(layout.ignored)


def test_gemma3_demo_config_is_unchanged():
    """The Gemma-3 arches build exactly the configs they did before Gemma-4 arches came."""
    text = demo.base_config("text", 2).to_dict()
    assert text["architectures"] == ["Gemma3ForCausalLM"] and text["model_type"] == "gemma3_text"
    mm = demo.base_config("multimodal", 3)
    assert mm.architectures == ["Gemma3ForConditionalGeneration"]
    with pytest.raises(MergebakeError, match="gemma4-e"):
        demo.base_config("gemma5", 2)
