"""normalise: multimodal Gemma-3 layouts -> text-only Gemma3ForCausalLM, values bit-identical."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from _models import load_model, make_gemma3_mm, make_gemma3_text, text_config
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mergebake import MergebakeError
from mergebake.checkpoint import INDEX_NAME, tensor_index
from mergebake.normalise import normalise

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@pytest.fixture(autouse=True)
def _own_layout_cache(tmp_path, monkeypatch):
    """Each test's layouts come from transformers, not from an entry another test stored in
    the run's shared cache (a hit would skip the code under test)."""
    monkeypatch.setenv("MERGEBAKE_CACHE", str(tmp_path / "mergebake-cache"))


@pytest.fixture(scope="module")
def mm(tmp_path_factory):
    """One tiny multimodal base per dtype (transformers 5.x layout, tied head)."""
    root = tmp_path_factory.mktemp("mm")
    return {k: make_gemma3_mm(root / k, dtype) for k, dtype in DTYPES.items()}


def text_keys() -> set[str]:
    """Tensor names a tied Gemma3ForCausalLM of the tiny config saves."""
    from transformers import Gemma3ForCausalLM

    with torch.device("meta"):
        model = Gemma3ForCausalLM(text_config())
    return set(model.state_dict()) - {"lm_head.weight"}


def read_all(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for info_file in sorted({i.file for i in tensor_index(folder).values()}):
        out.update(load_file(info_file))
    return out


@pytest.mark.parametrize("dtype", DTYPES)
def test_mm_gives_text_layout_with_same_values(mm, tmp_path, dtype):
    out = tmp_path / "text"
    summary = normalise(mm[dtype], out)

    tensors = read_all(out)
    assert set(tensors) == text_keys()
    assert summary == {
        "renamed": len(text_keys()),
        "dropped": 34,
        "kept": len(text_keys()),
        "ignored": 0,
        "adapted_dropped": 0,
        "linked": False,
        "architecture": "Gemma3ForCausalLM",
    }
    source = load_model(mm[dtype])
    lm = {f"model.{k}": v for k, v in source.model.language_model.state_dict().items()}
    for name, t in tensors.items():
        assert t.dtype == DTYPES[dtype], name
        assert torch.equal(t, lm[name]), name
    with safe_open(out / "model.safetensors", framework="pt") as fh:
        assert fh.metadata() == {"format": "pt"}


@pytest.mark.parametrize("dtype", DTYPES)
def test_mm_normalised_loads_and_gives_same_logits(mm, tmp_path, dtype):
    from transformers import Gemma3ForCausalLM

    out = tmp_path / "text"
    normalise(mm[dtype], out)
    text, info = Gemma3ForCausalLM.from_pretrained(out, dtype="auto", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not info["mismatched_keys"]
    assert next(text.parameters()).dtype == DTYPES[dtype]
    source = load_model(mm[dtype])
    ids = torch.tensor([[2, 5, 9, 17, 33, 40, 63, 4]])
    with torch.no_grad():
        want = source(input_ids=ids).logits.float()
        got = text(input_ids=ids).logits.float()
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4)


def test_config_is_text_config_with_json_types_kept(mm, tmp_path):
    out = tmp_path / "text"
    normalise(mm["bf16"], out)
    src = json.loads((mm["bf16"] / "config.json").read_text())
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["Gemma3ForCausalLM"]
    assert cfg["model_type"] == "gemma3_text"
    assert cfg["dtype"] == src["dtype"] == "bfloat16"
    assert cfg["tie_word_embeddings"] is True
    assert "vision_config" not in cfg and "text_config" not in cfg
    for key, value in src["text_config"].items():
        if key in ("architectures", "dtype"):
            continue
        assert type(cfg[key]) is type(value) and cfg[key] == value, key
    assert (out / "tokenizer.json").is_file() and (out / "chat_template.jinja").is_file()
    assert (out / "generation_config.json").is_file()
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["step"] == "normalise" and prov["params"]["renamed"] == len(text_keys())


def old_layout(src: Path, dst: Path) -> Path:
    """Rewrite a transformers 5.x multimodal checkpoint as transformers 4.52-4.57 wrote it."""
    dst.mkdir()
    tensors = load_file(src / "model.safetensors")
    renamed = {}
    for name, t in tensors.items():
        if name.startswith("language_model.model."):
            name = "model.language_model." + name.removeprefix("language_model.model.")
        else:
            name = "model." + name
        renamed[name] = t
    renamed["lm_head.weight"] = renamed["model.language_model.embed_tokens.weight"].clone()
    save_file(renamed, dst / "model.safetensors", metadata={"format": "pt"})
    for f in src.iterdir():
        if f.name != "model.safetensors":
            (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_old_model_language_model_layout_gives_same_output(mm, tmp_path):
    old = old_layout(mm["bf16"], tmp_path / "old")
    assert any(k.startswith("model.language_model.") for k in load_file(old / "model.safetensors"))
    normalise(mm["bf16"], tmp_path / "new_text")
    summary = normalise(old, tmp_path / "old_text")
    assert summary["dropped"] == 34 + 1  # vision + projector, and the tied lm_head copy
    a, b = read_all(tmp_path / "new_text"), read_all(tmp_path / "old_text")
    assert set(a) == set(b) == text_keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "new_text" / "config.json").read_text() == (
        tmp_path / "old_text" / "config.json"
    ).read_text()


def test_untied_sharded_mm_keeps_head_shards_and_index(tmp_path):
    src = make_gemma3_mm(tmp_path / "src", torch.float32, tie=False, max_shard_size="100KB")
    src_index = json.loads((src / INDEX_NAME).read_text())
    out = tmp_path / "text"
    normalise(src, out)

    index = json.loads((out / INDEX_NAME).read_text())
    assert set(index["weight_map"]) == text_keys() | {"lm_head.weight"}
    shards = sorted(set(index["weight_map"].values()))
    assert set(shards) <= set(src_index["weight_map"].values())
    assert sorted(p.name for p in out.glob("*.safetensors")) == shards
    sizes = {n: i.nbytes for n, i in tensor_index(out).items()}
    assert index["metadata"]["total_size"] == sum(sizes.values())
    for name, shard in index["weight_map"].items():
        with safe_open(out / shard, framework="pt") as fh:
            assert name in fh.keys()
            assert fh.metadata() == {"format": "pt"}
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False
    source = load_model(src)
    got = read_all(out)
    assert torch.equal(got["lm_head.weight"], source.lm_head.weight)


def test_text_only_source_is_hard_linked(tmp_path):
    src = make_gemma3_text(tmp_path / "src", torch.bfloat16)
    out = tmp_path / "text"
    summary = normalise(src, out)
    assert summary["linked"] is True and summary["renamed"] == summary["dropped"] == 0
    for name in (
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "generation_config.json",
    ):
        assert os.stat(out / name).st_ino == os.stat(src / name).st_ino, name
    assert (out / "provenance.json").stat().st_nlink == 1  # written, not linked


def test_text_only_sharded_source_links_index(tmp_path):
    src = make_gemma3_text(tmp_path / "src", torch.float32, max_shard_size="100KB")
    out = tmp_path / "text"
    assert normalise(src, out)["linked"] is True
    for f in [*src.glob("*.safetensors"), src / INDEX_NAME]:
        assert os.stat(out / f.name).st_ino == os.stat(f).st_ino


def test_unknown_multimodal_architecture_is_refused(mm, tmp_path):
    src = tmp_path / "llava"
    src.mkdir()
    for f in mm["fp32"].iterdir():
        os.link(f, src / f.name)
    cfg = json.loads((src / "config.json").read_text())
    cfg["architectures"] = ["LlavaForConditionalGeneration"]
    (src / "config.json").unlink()
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        MergebakeError, match=r"cannot build LlavaForConditionalGeneration.*not supported"
    ):
        normalise(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_stray_tensor_is_refused(mm, tmp_path):
    src = tmp_path / "odd"
    src.mkdir()
    for f in mm["fp32"].iterdir():
        if f.name != "model.safetensors":
            os.link(f, src / f.name)
    tensors = load_file(mm["fp32"] / "model.safetensors")
    tensors["audio_tower.weight"] = torch.zeros(2)
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(MergebakeError, match=r"audio_tower\.weight.*fit no rule"):
        normalise(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_source_is_refused(tmp_path):
    with pytest.raises(MergebakeError, match="config.json: missing"):
        normalise(tmp_path / "nope", tmp_path / "out")
