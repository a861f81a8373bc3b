"""Every family mergebake supports, end to end on tiny real checkpoints (transformers 5.x).

For each wrapped (vision-language) family and each family's text-only causal LM:
- the stream bake equals PEFT's ``merge_and_unload`` on every tensor (``torch.equal``), for
  an all-linear adapter (towers included) and a language-model-only one;
- the normalised checkpoint loads with ``AutoModelForCausalLM`` with no missing or
  unexpected keys, and its logits on fixed token ids equal the wrapped model's exactly;
- a TIES merge of the two normalised bakes over the normalised base passes verification.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import pytest
import torch
from _models import FAMILIES, WRAPPED_FAMILIES, load_model, make_family, make_lora, peft_merged
from safetensors.torch import load_file

from mergebake.bake import bake
from mergebake.config import RECIPES_DIR
from mergebake.layouts import build_layout
from mergebake.merge import merge_cell
from mergebake.normalise import normalise

LINEAR = r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
IDS = torch.tensor([[2, 5, 9, 17, 33, 40, 63, 4]])  # no image/audio token ids among them


@pytest.fixture(autouse=True, scope="module")
def _own_layout_cache(tmp_path_factory):
    """This module's layouts come from transformers, not from an entry another module
    stored in the run's shared cache (a hit would skip the code under test)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MERGEBAKE_CACHE", str(tmp_path_factory.mktemp("mergebake-cache")))
        yield


def lm_only(family: str) -> str:
    """PEFT target regex over the language model's linear layers only (runtime names)."""
    prefix = r"model\.language_model" if family in WRAPPED_FAMILIES else "model"
    return rf"{prefix}\.layers\.\d+\.(self_attn|mlp)\.{LINEAR}"


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    """One family's base, its two adapters, their stream bakes and the PEFT references."""
    name = request.param
    root = tmp_path_factory.mktemp(name)
    base = make_family(root / "base", name)
    out = {"name": name, "root": root, "base": base, "bakes": {}, "peft": {}}
    adapters = {
        "all": make_lora(base, root / "all", target_modules="all-linear", seed=1),
        "lm": make_lora(base, root / "lm", target_modules=lm_only(name), seed=2),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for key, adapter in adapters.items():
            out["bakes"][key] = root / f"bake-{key}"
            out["summary_" + key] = bake(base, adapter, out["bakes"][key])
            merged = peft_merged(base, adapter)
            merged.save_pretrained(root / f"peft-{key}")
            out["peft"][key] = root / f"peft-{key}"
    return out


@pytest.mark.parametrize("adapter", ["all", "lm"])
def test_stream_bake_equals_peft_on_every_tensor(family, adapter):
    got, want = tensors(family["bakes"][adapter]), tensors(family["peft"][adapter])
    base = tensors(family["base"])
    ignored = set(base) - set(want)  # what the class ignores on load: save_pretrained drops it
    assert set(got) == set(want) | ignored
    assert all(torch.equal(got[k], base[k]) for k in ignored)
    for k, t in want.items():
        assert got[k].dtype == t.dtype and torch.equal(got[k], t), k
    changed = {k for k in want if not torch.equal(want[k], base[k])}
    assert changed, "the adapter changed nothing"
    if adapter == "lm":  # only the language model's layers
        layout = build_layout(family["base"])
        assert all(layout.text[k] is not None and ".layers." in k for k in changed)


def test_normalised_loads_and_gives_the_wrapped_logits(family, tmp_path):
    from transformers import AutoModelForCausalLM

    for key in ("base", "all", "lm"):
        src = family["base"] if key == "base" else family["bakes"][key]
        out = tmp_path / key
        summary = normalise(src, out)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            text, info = AutoModelForCausalLM.from_pretrained(
                out, dtype="auto", output_loading_info=True
            )
            wrapped = load_model(src)
        assert not info["missing_keys"] and not info["unexpected_keys"], info
        assert not info["mismatched_keys"]
        with torch.no_grad():
            want = wrapped(input_ids=IDS).logits
            got = text(input_ids=IDS).logits
        assert got.dtype == want.dtype == torch.bfloat16
        assert torch.equal(got, want), (key, (got.float() - want.float()).abs().max())
        assert summary["linked"] is (
            family["name"] not in WRAPPED_FAMILIES and summary["ignored"] == 0
        )
        family[f"text_{key}"] = out
    merged = tmp_path / "ties"
    merge_cell(
        RECIPES_DIR / "ties.yaml",
        base=family["text_base"],
        models={"all": family["text_all"], "lm": family["text_lm"]},
        parameters={"density": 0.5},
        out=merged,
        seed=7,
        device="cpu",
    )  # verified against the normalised base inside merge_cell
    a, b = tensors(merged), tensors(family["text_base"])
    assert set(a) == set(b) and any(not torch.equal(a[k], b[k]) for k in a)


def test_tower_tensors_an_adapter_changed_are_counted_when_dropped(family, tmp_path, caplog):
    if family["name"] not in WRAPPED_FAMILIES:
        pytest.skip("no towers")
    base, baked = tensors(family["base"]), tensors(family["bakes"]["all"])
    changed = {k for k in baked if not torch.equal(baked[k], base[k])}
    text_names = {
        k
        for k in json.loads((family["bakes"]["all"] / "provenance.json").read_text())["params"][
            "adapted_tensors"
        ]
    }
    assert text_names == changed
    with caplog.at_level(logging.WARNING, logger="mergebake.normalise"):
        summary = normalise(family["bakes"]["all"], tmp_path / "text")
    kept = set(tensors(tmp_path / "text"))
    layout = build_layout(family["base"])
    lm_changed = sum(1 for k in changed if layout.text[k] is not None)
    assert summary["adapted_dropped"] == len(changed) - lm_changed > 0
    assert f"{summary['adapted_dropped']} adapted tensor(s) dropped" in caplog.text
    assert len(kept) == summary["kept"]
