"""bake: both engines bit-identical to PEFT's merge_and_unload; preflight refusals.

The stream engine's full parity matrix (architectures, dtypes, LoraConfig options) is in
test_bake_stream.py; here each test runs the default engine (``stream``) unless it
says otherwise, so the preflight refusals are checked on the path users take.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from _models import load_model, make_gemma3_mm, make_gemma3_text, make_lora, peft_merged
from safetensors.torch import load_file, save_file

from mergebake import MergebakeError
from mergebake.bake import ENGINES, bake, preflight

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MAKERS = {"text": make_gemma3_text, "mm": make_gemma3_mm}
ADAPTER_FILE = "adapter_model.safetensors"


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """(base, adapter) for every kind (text, mm) and dtype (fp32, bf16)."""
    root = tmp_path_factory.mktemp("pairs")
    out = {}
    for kind, make in MAKERS.items():
        for d, dtype in DTYPES.items():
            base = make(root / f"{kind}-{d}", dtype)
            out[kind, d] = base, make_lora(base, root / f"{kind}-{d}-lora")
    return out


@pytest.fixture
def pair(pairs):
    return pairs["text", "fp32"]


def tamper_adapter(adapter: Path, dst: Path, edit) -> Path:
    """Copy ``adapter`` to ``dst`` and rewrite its tensors with ``edit(dict) -> None``."""
    shutil.copytree(adapter, dst)
    tensors = load_file(dst / ADAPTER_FILE)
    edit(tensors)
    save_file(tensors, dst / ADAPTER_FILE, metadata={"format": "pt"})
    return dst


def assert_no_output(out: Path) -> None:
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.tmp-*"))


@pytest.mark.parametrize("engine", ["stream", "peft"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", MAKERS)
def test_bake_equals_peft_merge_and_unload(pairs, tmp_path, kind, dtype, engine):
    base, adapter = pairs[kind, dtype]
    out = tmp_path / "baked"
    summary = bake(base, adapter, out, engine=engine)

    n_modules = 4 if kind == "text" else 6  # q/v in 2 text layers (+ q/v of the vision layer)
    assert summary["engine"] == engine and summary["modules_changed"] == n_modules
    assert summary["adapter_tensors"] == 2 * n_modules and summary["seconds"] > 0

    want = peft_merged(base, adapter).state_dict()
    cls = type(load_model(base))
    got, info = cls.from_pretrained(out, dtype="auto", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    got = got.state_dict()
    assert set(got) == set(want)
    for name in want:
        assert got[name].dtype == DTYPES[dtype], name
        assert torch.equal(got[name], want[name]), name
    before = load_model(base).state_dict()
    changed = [k for k in want if not torch.equal(before[k], want[k])]
    assert len(changed) == n_modules and all(("q_proj" in k or "v_proj" in k) for k in changed)

    # same files and layout as the base: only the values of the targeted weights differ
    assert (out / "config.json").read_bytes() == (base / "config.json").read_bytes()
    for f in (
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "generation_config.json",
    ):
        assert (out / f).read_bytes() == (base / f).read_bytes(), f
    assert set(load_file(out / "model.safetensors")) == set(load_file(base / "model.safetensors"))


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("kind", MAKERS)
def test_embedding_and_tied_head_targets_bake_like_peft(tmp_path, kind):
    """LoRA on embed_tokens and on the tied lm_head both land in the one shared tensor."""
    base = MAKERS[kind](tmp_path / "base", torch.bfloat16)
    adapter = make_lora(
        base, tmp_path / "lora", target_modules=("q_proj", "embed_tokens", "lm_head")
    )
    plan = preflight(base, adapter)
    embed = f"{'language_model.' if kind == 'mm' else ''}model.embed_tokens.weight"
    assert plan.modules["lm_head"] == embed  # tied: the head's weight is the embedding
    assert set(plan.replaced) == {
        "lm_head.weight",
        next(k for k in plan.modules if k.endswith("embed_tokens")) + ".weight",
    }
    bake(base, adapter, tmp_path / "baked")
    want = peft_merged(base, adapter).state_dict()
    got = load_model(tmp_path / "baked").state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert not torch.equal(load_model(base).state_dict()["lm_head.weight"], got["lm_head.weight"])


def test_bake_is_fp32_delta_rounded_once(pairs, tmp_path):
    """PEFT's default merge is bf16(fp32(W) + scale * fp32(B @ A)): the streaming engine's spec."""
    base, adapter = pairs["text", "bf16"]
    bake(base, adapter, tmp_path / "baked")
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    scale = cfg["lora_alpha"] / cfg["r"]
    lora = load_file(adapter / ADAPTER_FILE)
    w0 = load_file(base / "model.safetensors")
    w1 = load_file(tmp_path / "baked" / "model.safetensors")
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    a, b = lora[f"{prefix}.lora_A.weight"], lora[f"{prefix}.lora_B.weight"]
    assert a.dtype == b.dtype == torch.float32  # PEFT autocasts adapter weights to fp32
    name = "model.layers.0.self_attn.q_proj.weight"
    expected = (w0[name].float() + (b @ a) * scale).to(torch.bfloat16)
    assert torch.equal(w1[name], expected)


def test_provenance_records_inputs_and_lora(pair, tmp_path):
    base, adapter = pair
    bake(base, adapter, tmp_path / "baked")
    prov = json.loads((tmp_path / "baked" / "provenance.json").read_text())
    assert prov["step"] == "bake"
    assert set(prov["inputs"]) == {"base", "adapter"}
    assert len(prov["inputs"]["adapter"]["files"][ADAPTER_FILE]) == 64
    assert "model.safetensors" in prov["inputs"]["base"]["files"]
    lora = prov["params"]["lora"]
    assert prov["params"]["engine"] == "stream" and prov["params"]["device"] == "cpu"
    assert lora["r"] == 4 and lora["lora_alpha"] == 8
    assert lora["target_modules"] == ["q_proj", "v_proj"]


def test_preflight_maps_multimodal_adapter_keys_to_disk_names(pairs):
    base, adapter = pairs["mm", "fp32"]
    plan = preflight(base, adapter)
    assert plan.modules["model.language_model.layers.0.self_attn.q_proj"] == (
        "language_model.model.layers.0.self_attn.q_proj.weight"
    )
    assert plan.modules["model.vision_tower.encoder.layers.0.self_attn.v_proj"] == (
        "vision_tower.encoder.layers.0.self_attn.v_proj.weight"
    )


def test_refuses_adapter_with_nan(pair, tmp_path):
    base, adapter = pair

    def edit(t):
        t["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"][0, 0] = float("nan")

    bad = tamper_adapter(adapter, tmp_path / "nan", edit)
    out = tmp_path / "baked"
    with pytest.raises(
        MergebakeError,
        match=r"adapter_model\.safetensors: NaN/Inf in adapter "
        r"tensor\(s\) \['base_model\.model\.model\.layers\.1"
        r"\.self_attn\.v_proj\.lora_B\.weight'\]",
    ):
        bake(base, bad, out)
    assert_no_output(out)


def test_refuses_adapter_with_incompatible_shapes(pair, tmp_path):
    base, adapter = pair
    key = "base_model.model.model.layers.0.self_attn.q_proj"

    def edit(t):  # as if trained on a base with hidden size 96
        t[f"{key}.lora_A.weight"] = torch.randn(4, 96)
        t[f"{key}.lora_B.weight"] = torch.randn(96, 4)

    bad = tamper_adapter(adapter, tmp_path / "shape", edit)
    out = tmp_path / "baked"
    match = (
        r"LoRA shapes do not fit the base .*another base\? model\.layers\.0\.self_attn"
        r"\.q_proj: lora_A \[4, 96\] / lora_B \[96, 4\] do not fit the base weight \[64, 64\]"
    )
    with pytest.raises(MergebakeError, match=match):
        bake(base, bad, out)
    assert_no_output(out)


def test_refuses_adapter_targeting_missing_module(pair, tmp_path):
    base, adapter = pair

    def edit(t):
        for part in ("lora_A", "lora_B"):
            t[f"base_model.model.model.layers.7.self_attn.q_proj.{part}.weight"] = t.pop(
                f"base_model.model.model.layers.1.self_attn.q_proj.{part}.weight"
            )

    bad = tamper_adapter(adapter, tmp_path / "missing", edit)
    out = tmp_path / "baked"
    with pytest.raises(
        MergebakeError,
        match=r"targets module\(s\) \['model\.layers\.7\.self_attn"
        r"\.q_proj'\] \(1 in all\) whose weight the base",
    ):
        bake(base, bad, out)
    assert_no_output(out)


def test_refuses_text_adapter_on_multimodal_base(pairs, tmp_path):
    """Another base layout: PEFT would silently load nothing and bake a no-op."""
    base, _ = pairs["mm", "fp32"]
    _, adapter = pairs["text", "fp32"]
    out = tmp_path / "baked"
    with pytest.raises(
        MergebakeError,
        match=r"targets module\(s\) \['model\.layers\.0\.self_attn"
        r"\.q_proj'.*\(4 in all\)",
    ):
        bake(base, adapter, out)
    assert_no_output(out)


def test_refuses_target_module_the_base_lacks(pair, tmp_path):
    base, adapter = pair
    bad = tmp_path / "cfg"
    shutil.copytree(adapter, bad)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    cfg["target_modules"] = ["q_proj", "v_proj", "c_attn"]
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        MergebakeError,
        match=r"adapter_config\.json: target_modules \['c_attn'\] "
        r"match no module",
    ):
        bake(base, bad, tmp_path / "baked")
    assert_no_output(tmp_path / "baked")


def test_refuses_pickle_only_base(pair, tmp_path):
    base, adapter = pair
    pickled = tmp_path / "pickled"
    shutil.copytree(base, pickled)
    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    out = tmp_path / "baked"
    with pytest.raises(
        MergebakeError,
        match=r"pickled: only pickle weights "
        r"\['pytorch_model\.bin'\].*safetensors only",
    ):
        bake(pickled, adapter, out)
    assert_no_output(out)


def test_refuses_pickle_only_adapter_unless_allowed(pair, tmp_path):
    base, adapter = pair
    pickled = tmp_path / "pickled"
    shutil.copytree(adapter, pickled)
    torch.save(load_file(pickled / ADAPTER_FILE), pickled / "adapter_model.bin")
    (pickled / ADAPTER_FILE).unlink()
    with pytest.raises(
        MergebakeError,
        match=r"only pickle adapter weights "
        r"\['adapter_model\.bin'\]",
    ):
        bake(base, pickled, tmp_path / "baked")
    assert_no_output(tmp_path / "baked")
    plan = preflight(base, pickled, allow_pickle=True)
    assert plan.weights.name == "adapter_model.bin" and len(plan.modules) == 4


def test_refuses_missing_or_broken_adapter_config(pair, tmp_path):
    base, adapter = pair
    bad = tmp_path / "noconf"
    shutil.copytree(adapter, bad)
    (bad / "adapter_config.json").unlink()
    with pytest.raises(MergebakeError, match=r"noconf/adapter_config\.json: missing"):
        bake(base, bad, tmp_path / "baked")
    (bad / "adapter_config.json").write_text("{not json")
    with pytest.raises(MergebakeError, match=r"noconf/adapter_config\.json: not valid JSON"):
        bake(base, bad, tmp_path / "baked")
    assert_no_output(tmp_path / "baked")


def test_refuses_missing_inputs(pair, tmp_path):
    base, adapter = pair
    with pytest.raises(MergebakeError, match=r"nope: base folder does not exist"):
        bake(tmp_path / "nope", adapter, tmp_path / "baked")
    with pytest.raises(MergebakeError, match=r"nope: adapter folder does not exist"):
        bake(base, tmp_path / "nope", tmp_path / "baked")
    assert_no_output(tmp_path / "baked")


def test_expected_base_mismatch_warns_or_fails(pair, tmp_path):
    base, adapter = pair
    recorded = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert preflight(base, adapter, expected_base=recorded, strict_base_match=True)
    assert preflight(base, adapter, expected_base=Path(recorded).name, strict_base_match=True)
    with pytest.warns(
        UserWarning,
        match=r"base_model_name_or_path is .* expects base "
        r"'google/gemma-3-1b-pt'",
    ):
        preflight(base, adapter, expected_base="google/gemma-3-1b-pt")
    with pytest.raises(MergebakeError, match=r"strict_base_match is on"):
        bake(
            base,
            adapter,
            tmp_path / "baked",
            expected_base="google/gemma-3-1b-pt",
            strict_base_match=True,
        )
    assert_no_output(tmp_path / "baked")


def test_unknown_engine(pair, tmp_path):
    base, adapter = pair
    assert {"peft", "stream"} <= set(ENGINES)
    with pytest.raises(
        MergebakeError,
        match=r"bake engine 'fast' is unknown; choose one of "
        r"\['peft', 'stream'\]",
    ):
        bake(base, adapter, tmp_path / "baked", engine="fast")
    assert_no_output(tmp_path / "baked")


def test_bake_output_is_verified_before_it_counts(tmp_path, monkeypatch):
    """An engine that drops a tensor (as mergekit can) fails verification; nothing is left."""
    from _models import make_gemma3_text, make_lora
    from safetensors.torch import load_file, save_file

    import mergebake.bake as bake_mod
    from mergebake.verify import VerificationError

    base = make_gemma3_text(tmp_path / "base", dtype=torch.bfloat16)
    adapter = make_lora(base, tmp_path / "adapter")
    real = bake_mod.ENGINES["stream"]

    def lossy(*args, **kwargs):
        write = real(*args, **kwargs)

        def drop(tmp):
            extra = write(tmp)
            f = tmp / "model.safetensors"
            t = load_file(f)
            t.pop("model.layers.1.self_attn.q_proj.weight")
            save_file(t, f, metadata={"format": "pt"})
            return extra

        return drop

    monkeypatch.setitem(bake_mod.ENGINES, "stream", lossy)
    out = tmp_path / "out"
    with pytest.raises(VerificationError) as e:
        bake_mod.bake(base, adapter, out)
    assert str(e.value).startswith(f"{out}: failed verification against {base}")
    assert "tensor model.layers.1.self_attn.q_proj.weight: missing (the reference has it)" in str(
        e.value
    )
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))
