"""Key layouts of other transformers versions, tensors a class ignores, hand-written rules.

transformers 4.x cannot be installed beside 5.23, so the older layouts are made by renaming
the keys of checkpoints and adapters saved by 5.23, exactly as those versions named them:

- bases saved by transformers 4.52-4.57 (Gemma-3 and Mistral3 VLMs): ``model.language_model.*``,
  ``lm_head.*``, ``model.vision_tower.*``, ``model.multi_modal_projector.*`` (5.x and 4.50/4.51
  write ``language_model.model.*``, ``language_model.lm_head.*``, ``vision_tower.*``,
  ``multi_modal_projector.*``);
- adapters trained with 4.50/4.51 name modules as those versions built the model:
  ``language_model.model.layers.*`` (Gemma-3, Mistral3) and ``model.layers.*`` /
  ``visual.*`` (Qwen2.5-VL, 4.49-4.51); 4.52 onward name them ``model.language_model.*`` as 5.x.

The judge is PEFT 0.21's own ``merge_and_unload`` of the same pair, and the bake of the
5.x-named adapter (the same weights under their current names).
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from _models import WRAPPED_FAMILIES, make_family, make_lora, peft_merged
from safetensors.torch import load_file, save_file

from mergebake import MergebakeError, layouts
from mergebake.bake import bake
from mergebake.layouts import TEXT_CAUSAL_LM, build_layout
from mergebake.normalise import normalise

LLAVA_452 = (  # transformers 5.x / 4.50 disk name -> 4.52-4.57 disk name
    ("language_model.model.", "model.language_model."),
    ("language_model.lm_head.", "lm_head."),
    ("vision_tower.", "model.vision_tower."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
)
ADAPTER_450 = {  # runtime (4.52+ / 5.x) module prefix -> what 4.50/4.51 called it
    "gemma3-mm": (
        ("model.language_model.", "language_model.model."),
        ("model.vision_tower.", "vision_tower."),
        ("model.multi_modal_projector.", "multi_modal_projector."),
        ("lm_head.", "language_model.lm_head."),
    ),
    "mistral3": (
        ("model.language_model.", "language_model.model."),
        ("model.vision_tower.", "vision_tower."),
        ("model.multi_modal_projector.", "multi_modal_projector."),
        ("lm_head.", "language_model.lm_head."),
    ),
    "qwen2_5-vl": (("model.language_model.", "model."), ("model.visual.", "visual.")),
}
PEFT = "base_model.model."


@pytest.fixture(autouse=True)
def _own_layout_cache(tmp_path, monkeypatch):
    """Each test's layouts come from transformers, not from an entry another test stored in
    the run's shared cache (a hit would skip the code under test)."""
    monkeypatch.setenv("MERGEBAKE_CACHE", str(tmp_path / "mergebake-cache"))


def _rename(name: str, rules) -> str:
    for old, new in rules:
        if name.startswith(old):
            return new + name[len(old) :]
    return name


def _copy_with(src: Path, dst: Path, weights: str, rename) -> Path:
    shutil.copytree(src, dst)
    tensors = load_file(src / weights)
    save_file({rename(k): v for k, v in tensors.items()}, dst / weights, metadata={"format": "pt"})
    return dst


def base_452(src: Path, dst: Path) -> Path:
    """``src`` (a 5.x-saved Gemma-3/Mistral3 VLM) as transformers 4.52-4.57 saved it."""
    return _copy_with(src, dst, "model.safetensors", lambda k: _rename(k, LLAVA_452))


def adapter_450(src: Path, dst: Path, family: str) -> Path:
    """``src`` (an adapter saved by 5.x) with module names as transformers 4.50/4.51 had them."""
    rules = ADAPTER_450[family]
    out = _copy_with(
        src,
        dst,
        "adapter_model.safetensors",
        lambda k: PEFT + _rename(k.removeprefix(PEFT), rules),
    )
    assert (
        load_file(out / "adapter_model.safetensors").keys()
        != load_file(src / "adapter_model.safetensors").keys()
    )
    return out


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    cache: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in cache:
            cache[family] = make_family(root / family, family)
        return cache[family]

    return get


LM = (
    r"model\.language_model\.layers\.\d+\.(self_attn|mlp)\."
    r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
)


@pytest.mark.parametrize("base_layout", ["5.x", "4.52-4.57"])
@pytest.mark.parametrize("family", ["gemma3-mm", "mistral3", "qwen2_5-vl"])
def test_adapters_of_every_transformers_version_bake_like_peft(made, tmp_path, family, base_layout):
    """An adapter named as 4.50/4.51 named modules bakes exactly as the same weights named
    as 5.x name them (which equals PEFT's merge on every tensor); where PEFT 0.21 itself
    loads the old names (Gemma-3's and Mistral3's language model), it equals PEFT's merge
    of the old-named adapter too; where PEFT leaves some at zero (Gemma-3's vision tower,
    all of a Qwen2.5-VL 4.49-4.51 adapter: transformers has no model_type mapping PEFT
    looks up), the peft engine refuses rather than bake a silent no-op."""
    if base_layout == "4.52-4.57" and family == "qwen2_5-vl":
        pytest.skip("4.52-4.57 saved Qwen2.5-VL in the layout 5.x writes (model.*, visual.*)")
    base = made(family)
    if base_layout == "4.52-4.57":
        base = base_452(base, tmp_path / "base452")
        assert any(k.startswith("model.language_model.") for k in tensors(base))
    runtime = build_layout(base).runtime
    before = tensors(base)
    for kind, targets in (("all", "all-linear"), ("lm", LM)):
        new = make_lora(base, tmp_path / kind / "new", target_modules=targets, seed=3)
        old = adapter_450(new, tmp_path / kind / "old", family)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            bake(base, new, tmp_path / kind / "bake-new")
            bake(base, old, tmp_path / kind / "bake-old")
            want_new = peft_merged(base, new).state_dict()
            want_old = peft_merged(base, old).state_dict()
        got_old, got_new = (
            tensors(tmp_path / kind / "bake-old"),
            tensors(tmp_path / kind / "bake-new"),
        )
        assert got_old.keys() == got_new.keys() == before.keys()
        changed = {k for k in got_old if not torch.equal(got_old[k], before[k])}
        assert changed and any(".layers." in k for k in changed)
        for k in got_old:
            assert torch.equal(got_old[k], got_new[k]), k  # old names mean the new ones
            assert torch.equal(got_new[k], want_new[runtime[k]]), k  # PEFT, current names
        peft_loads_all = family != "qwen2_5-vl" and kind == "lm"
        if peft_loads_all:
            assert all(torch.equal(got_old[k], want_old[runtime[k]]) for k in got_old)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                bake(base, old, tmp_path / kind / "peft-old", engine="peft")
            peft_old = tensors(tmp_path / kind / "peft-old")
            assert all(torch.equal(got_old[k], peft_old[k]) for k in peft_old)
        else:
            assert any(not torch.equal(got_old[k], want_old[runtime[k]]) for k in got_old)
            with (
                warnings.catch_warnings(),
                pytest.raises(MergebakeError, match="PEFT did not load"),
            ):
                warnings.simplefilter("ignore")
                bake(base, old, tmp_path / kind / "peft-old", engine="peft")


def test_kv_shared_tensors_pass_both_engines_and_normalise_drops_them(made, tmp_path):
    base = made("gemma4-e")
    layout = build_layout(base)
    assert sorted(layout.ignored) == sorted(
        f"model.language_model.layers.{i}.self_attn.{p}.weight"
        for i in (2, 3)
        for p in ("k_proj", "v_proj", "k_norm")
    )
    adapter = make_lora(base, tmp_path / "lora", target_modules="all-linear")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stream = bake(base, adapter, tmp_path / "stream")
        peft = bake(base, adapter, tmp_path / "peft", engine="peft")  # no false failure
    assert stream["engine"] == "stream" and peft["engine"] == "peft"
    s, p, b = tensors(tmp_path / "stream"), tensors(tmp_path / "peft"), tensors(base)
    assert set(s) - set(p) == layout.ignored  # save_pretrained drops them, stream copies them
    assert all(torch.equal(s[k], b[k]) for k in layout.ignored)
    assert all(torch.equal(s[k], p[k]) for k in p)
    texts = {}
    for name in ("stream", "peft"):
        summary = normalise(tmp_path / name, tmp_path / f"text-{name}")
        texts[name] = tensors(tmp_path / f"text-{name}")
        assert summary["ignored"] == (6 if name == "stream" else 0)
    assert texts["stream"].keys() == texts["peft"].keys()
    assert all(torch.equal(texts["stream"][k], texts["peft"][k]) for k in texts["peft"])
    assert not any(".layers.2.self_attn.k_proj" in k for k in texts["stream"])


def test_each_text_causal_lm_rule_is_used_by_a_tested_family(made):
    used = set()
    for family in WRAPPED_FAMILIES:
        if family.startswith("qwen"):
            config = json.loads((made(family) / "config.json").read_text())
            used.add(config["text_config"]["model_type"])
    assert set(TEXT_CAUSAL_LM) == used


def test_without_its_rule_a_family_is_refused_by_name(made, monkeypatch, tmp_path):
    base = made("qwen3-vl")
    monkeypatch.delitem(layouts.TEXT_CAUSAL_LM, "qwen3_vl_text")
    with pytest.raises(
        MergebakeError,
        match=r"Qwen3VLForConditionalGeneration.*not supported.*no causal LM for its text "
        r"model type 'qwen3_vl_text'.*TEXT_CAUSAL_LM",
    ):
        normalise(base, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_layout_is_derived_from_transformers_conversion_mapping(made):
    """Gemma-3's names come from transformers' llava mapping, not from a table here."""
    layout = build_layout(made("gemma3-mm"))
    name = "language_model.model.layers.0.self_attn.q_proj.weight"
    assert layout.runtime[name] == "model.language_model.layers.0.self_attn.q_proj.weight"
    assert layout.text[name] == "model.layers.0.self_attn.q_proj.weight"
    assert layout.tied == {"lm_head.weight": "language_model.model.embed_tokens.weight"}
    assert layout.adapter_param(name) == layout.runtime[name]  # a 4.50/4.51 adapter's name
    assert all(n.startswith(("vision_tower.", "multi_modal_projector.")) for n in layout.towers)


def test_a_text_model_transformers_lacks_is_baked_under_its_own_names(tmp_path):
    """Custom-code text models (no class in transformers): names are taken as they are."""
    from _models import make_llama

    base = make_llama(tmp_path / "base")
    adapter = make_lora(base, tmp_path / "lora", target_modules=("q_proj",))
    cfg = json.loads((base / "config.json").read_text())
    cfg["architectures"] = ["MyCustomForCausalLM"]
    (base / "config.json").write_text(json.dumps(cfg))
    layout = build_layout(base)
    assert dict(layout.runtime) == {n: n for n in tensors(base)} and not layout.tied
    bake(base, adapter, tmp_path / "out")
    changed = {
        k for k, v in tensors(tmp_path / "out").items() if not torch.equal(v, tensors(base)[k])
    }
    assert changed == {f"model.layers.{i}.self_attn.q_proj.weight" for i in (0, 1)}
    vlm = tmp_path / "vlm"
    shutil.copytree(base, vlm)
    (vlm / "config.json").write_text(json.dumps({**cfg, "vision_config": {}}))
    with pytest.raises(MergebakeError, match="MyCustomForCausalLM.*is not in transformers"):
        build_layout(vlm)
