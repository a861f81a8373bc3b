"""The stream bake engine: every output tensor bit-identical to PEFT, whatever the LoraConfig.

The reference is PEFT itself: ``PeftModel.from_pretrained(base).merge_and_unload()`` then
``save_pretrained``; the stream output's files are compared tensor by tensor with
``torch.equal`` (names, dtypes, values), and loaded with the base's class with no missing
or unexpected keys. Tiny real models (Llama untied, Qwen2 tied with q/k/v biases, Gemma-3
text, Gemma-3 multimodal, GPT-2 with Conv1D) in bf16, fp16 and fp32.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from _models import (
    load_model,
    make_gemma3_mm,
    make_gemma3_text,
    make_gpt2,
    make_llama,
    make_lora,
    make_qwen2,
    peft_merged,
)
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mergebake import MergebakeError
from mergebake import device as device_mod
from mergebake.bake import ENGINES, bake, bake_device

ARCHS = {
    "llama": make_llama,
    "qwen2": make_qwen2,
    "gemma3": make_gemma3_text,
    "gemma3-mm": make_gemma3_mm,
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
ATTN, MLP = ("q_proj", "k_proj", "v_proj", "o_proj"), ("gate_proj", "up_proj", "down_proj")
# LoraConfig variants of the parity matrix: with and without each option.
VARIANTS = {
    "plain": dict(target_modules=("q_proj", "v_proj")),
    # regex rank/alpha patterns, rsLoRA, all-linear (vision tower too), a saved module
    "rich": dict(
        target_modules="all-linear",
        use_rslora=True,
        r=4,
        alpha=6,
        rank_pattern={"v_proj": 6, r"layers\.1\.mlp\.down_proj": 2},
        alpha_pattern={r"layers\.1\..*": 3},
        modules_to_save=["norm"],
    ),
    # LoRA on the input embedding (tied to the head in Qwen2 and Gemma-3)
    "embedding": dict(target_modules=("embed_tokens", "o_proj", "up_proj"), r=3, alpha=5),
    # DoRA on linear layers and the embedding
    "dora": dict(target_modules=("embed_tokens", "q_proj", "down_proj"), use_dora=True),
}


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """Lazily built tiny bases, one per (architecture, dtype), shared by the module."""
    root = tmp_path_factory.mktemp("bases")
    cache: dict[tuple[str, str], Path] = {}

    def get(arch: str, dtype: str = "bf16", **kwargs) -> Path:
        key = (arch, dtype, *sorted(kwargs.items()))
        if key not in cache:
            name = "-".join(str(k) for k in key).replace("/", "")
            maker = {**ARCHS, "gpt2": make_gpt2}[arch]
            cache[key] = maker(root / name, DTYPES[dtype], **kwargs)
        return cache[key]

    return get


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def peft_reference(base: Path, adapter: Path, out: Path) -> dict[str, torch.Tensor]:
    """PEFT's merge_and_unload + save_pretrained, read back from its files."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_merged(base, adapter).save_pretrained(out)
    return tensors(out)


def assert_like_peft(base: Path, adapter: Path, tmp: Path, **bake_kwargs) -> dict:
    """Bake with the stream engine; every tensor equals PEFT's; the output loads cleanly."""
    out = tmp / "stream"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        summary = bake(base, adapter, out, engine="stream", **bake_kwargs)
    want = peft_reference(base, adapter, tmp / "peft")
    got = tensors(out)
    assert sorted(got) == sorted(want)
    for name, t in want.items():
        assert got[name].dtype == t.dtype, name
        assert torch.equal(got[name], t), f"{name} differs from PEFT"
    cls = type(load_model(base))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, info = cls.from_pretrained(out, dtype="auto", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    summary["_model"] = model
    return summary


def changed(base: Path, out: Path) -> set[str]:
    before, after = tensors(base), tensors(out)
    return {k for k in after if k not in before or not torch.equal(before[k], after[k])}


def lora_kwargs(variant: str, arch: str) -> dict:
    kw = dict(VARIANTS[variant])
    if arch == "llama" and variant == "embedding":
        kw["target_modules"] = (*kw["target_modules"], "lm_head")  # untied head
    return kw


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("arch", ARCHS)
def test_stream_bit_identical_to_peft(bases, tmp_path, arch, dtype, variant):
    base = bases(arch, dtype)
    adapter = make_lora(base, tmp_path / "lora", **lora_kwargs(variant, arch))
    summary = assert_like_peft(base, adapter, tmp_path)
    assert summary["engine"] == "stream" and summary["device"] == "cpu"
    assert summary["shards_written"] == 1 and summary["tensors_added"] == 0
    touched = changed(base, tmp_path / "stream")
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    targets = cfg["target_modules"]
    expect = {
        "plain": lambda k: k.endswith(("q_proj.weight", "v_proj.weight")),
        # all-linear (SigLIP's too); modules_to_save "norm" matches every *norm (PEFT)
        "rich": lambda k: k.endswith(
            tuple(f"{m}.weight" for m in ATTN + MLP)
            + ("fc1.weight", "fc2.weight", "out_proj.weight", "norm.weight", "norm.bias")
        ),
        "embedding": lambda k: k.endswith(
            ("embed_tokens.weight", "o_proj.weight", "up_proj.weight", "lm_head.weight")
        ),
        "dora": lambda k: k.endswith(("embed_tokens.weight", "q_proj.weight", "down_proj.weight")),
    }[variant]
    assert touched and all(expect(k) for k in touched), sorted(k for k in touched if not expect(k))
    assert summary["lora_ops"] == summary["modules_changed"], targets
    if variant == "rich":  # modules_to_save=["norm"]: the final norm is the adapter's copy
        assert any(k.endswith("model.norm.weight") for k in touched)
    # the output is the base's layout: same shard files, same header metadata, same config
    assert sorted(p.name for p in (tmp_path / "stream").glob("*.safetensors")) == sorted(
        p.name for p in base.glob("*.safetensors")
    )
    with (
        safe_open(base / "model.safetensors", "pt") as a,
        safe_open(tmp_path / "stream" / "model.safetensors", "pt") as b,
    ):
        assert a.metadata() == b.metadata() and list(a.keys()) == list(b.keys())
    assert (tmp_path / "stream" / "config.json").read_bytes() == (base / "config.json").read_bytes()


def test_rank_and_alpha_patterns_decide_scale(bases, tmp_path):
    """rank_pattern gives v_proj rank 6; alpha_pattern gives layer 1 alpha 3 (regex keys)."""
    from mergebake.lora import module_scale

    cfg = {
        "r": 4,
        "lora_alpha": 6,
        "use_rslora": True,
        "rank_pattern": {"v_proj": 6},
        "alpha_pattern": {r"layers\.1\..*": 3},
    }
    assert module_scale(cfg, "model.layers.0.self_attn.v_proj") == (6, 6, 6 / 6**0.5)
    assert module_scale(cfg, "model.layers.1.self_attn.q_proj") == (4, 3, 3 / 2)
    assert module_scale({**cfg, "use_rslora": False}, "model.layers.0.mlp.up_proj")[2] == 1.5
    base = bases("llama")
    adapter = make_lora(base, tmp_path / "lora", **VARIANTS["rich"])
    shapes = {k: v.shape for k, v in load_file(adapter / "adapter_model.safetensors").items()}
    assert shapes["base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight"][0] == 6
    assert shapes["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"][0] == 2


def test_lora_bias_and_trained_base_biases(bases, tmp_path):
    """lora_bias adds lora_B.bias * scale to the base bias; bias='all' saves base biases."""
    base = bases("qwen2")
    adapter = make_lora(
        base, tmp_path / "a" / "lora", target_modules=("q_proj", "k_proj"), lora_bias=True
    )
    assert_like_peft(base, adapter, tmp_path / "a")
    assert any(k.endswith("q_proj.bias") for k in changed(base, tmp_path / "a" / "stream"))
    adapter = make_lora(
        base, tmp_path / "b" / "lora", target_modules=("q_proj", "o_proj"), bias="all"
    )
    assert_like_peft(base, adapter, tmp_path / "b")


def test_lora_bias_without_base_bias_is_refused_like_peft(bases, tmp_path):
    base = bases("llama")
    adapter = make_lora(base, tmp_path / "lora", target_modules=("q_proj",), lora_bias=True)
    with pytest.raises(RuntimeError, match="lora_bias=True"):  # PEFT cannot merge it either
        peft_merged(base, adapter)
    with pytest.raises(
        MergebakeError,
        match=r"q_proj: lora_bias is set but the base layer "
        r"has no bias",
    ):
        bake(base, adapter, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_conv1d_fan_in_fan_out_dora_and_bias(bases, tmp_path, dtype):
    """GPT-2's Conv1D stores W as [in, out]: PEFT forces fan_in_fan_out=True there."""
    base = bases("gpt2", dtype)
    a = make_lora(
        base, tmp_path / "a" / "lora", target_modules=("c_attn", "c_fc", "c_proj"), lora_bias=True
    )  # fan_in_fan_out left False: PEFT flips it, so do we
    assert_like_peft(base, a, tmp_path / "a")
    d = make_lora(
        base,
        tmp_path / "d" / "lora",
        target_modules=("c_attn", "wte", "lm_head"),
        use_dora=True,
        fan_in_fan_out=True,
    )
    assert_like_peft(base, d, tmp_path / "d")


def test_linear_ignores_fan_in_fan_out_like_peft(bases, tmp_path):
    base = bases("llama")
    adapter = make_lora(base, tmp_path / "lora", target_modules=("q_proj",), fan_in_fan_out=True)
    assert_like_peft(base, adapter, tmp_path)


@pytest.mark.parametrize("arch", ["gemma3", "gemma3-mm", "qwen2"])
def test_tied_head_lora_lands_in_the_shared_embedding(bases, tmp_path, arch):
    """LoRA on the tied lm_head and on the embedding both change the one shared tensor,
    embedding first (PEFT's module order); the output stays tied."""
    base = bases(arch)
    adapter = make_lora(
        base, tmp_path / "lora", target_modules=("q_proj", "embed_tokens", "lm_head")
    )
    summary = assert_like_peft(base, adapter, tmp_path)
    assert summary["tensors_added"] == 0
    assert not any("lm_head" in k for k in tensors(tmp_path / "stream"))


def test_untied_multimodal_head_in_the_wrapped_layout(bases, tmp_path):
    """transformers 5 stores an untied Gemma-3 head as language_model.lm_head.weight; the
    adapter calls it lm_head (the loaded model's name)."""
    base = bases("gemma3-mm", tie=False)
    assert "language_model.lm_head.weight" in tensors(base)
    adapter = make_lora(
        base, tmp_path / "lora", target_modules=("q_proj", "lm_head"), use_dora=True
    )
    assert_like_peft(base, adapter, tmp_path)
    assert "language_model.lm_head.weight" in changed(base, tmp_path / "stream")


@pytest.mark.parametrize(
    "arch,saved",
    [
        ("gemma3", ["lm_head"]),
        ("gemma3-mm", ["lm_head"]),
        ("gemma3", ["embed_tokens"]),
        ("qwen2", ["embed_tokens", "lm_head"]),
    ],
)
def test_modules_to_save_on_a_tied_head_unties_it_like_peft(bases, tmp_path, arch, saved):
    """A saved copy of the tied head (or its embedding) is a new tensor in PEFT: the output
    gets lm_head.weight and tie_word_embeddings: false, and loads with the saved values."""
    base = bases(arch)
    adapter = make_lora(base, tmp_path / "lora", target_modules=("q_proj",), modules_to_save=saved)
    summary = assert_like_peft(base, adapter, tmp_path)
    assert summary["tensors_added"] == 1 and summary["config_changed"] == {
        "tie_word_embeddings": False
    }
    config = json.loads((tmp_path / "stream" / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    peft_config = json.loads((tmp_path / "peft" / "config.json").read_text())
    assert peft_config["tie_word_embeddings"] is False
    head = tensors(tmp_path / "stream")["lm_head.weight"]
    assert torch.equal(summary["_model"].lm_head.weight, head)  # loaded untied, as saved
    if saved == ["lm_head"]:
        lora = load_file(tmp_path / "lora" / "adapter_model.safetensors")
        assert torch.equal(head, lora["base_model.model.lm_head.weight"])


def test_modules_to_save_with_ensure_weight_tying_stays_tied(bases, tmp_path):
    base = bases("gemma3")
    adapter = make_lora(
        base,
        tmp_path / "lora",
        target_modules=("q_proj",),
        modules_to_save=["embed_tokens"],
        ensure_weight_tying=True,
    )
    summary = assert_like_peft(base, adapter, tmp_path)
    assert summary["tensors_added"] == 0 and "config_changed" not in summary


def test_target_regex_and_layers_to_transform(bases, tmp_path):
    base = bases("gemma3")
    a = make_lora(
        base, tmp_path / "a" / "lora", target_modules=r".*layers\.1\.(self_attn|mlp)\.(q|up)_proj"
    )
    assert_like_peft(base, a, tmp_path / "a")
    assert sorted(changed(base, tmp_path / "a" / "stream")) == [
        "model.layers.1.mlp.up_proj.weight",
        "model.layers.1.self_attn.q_proj.weight",
    ]
    b = make_lora(
        base, tmp_path / "b" / "lora", target_modules=("q_proj", "v_proj"), layers_to_transform=[1]
    )
    assert_like_peft(base, b, tmp_path / "b")
    assert all(".layers.1." in k for k in changed(base, tmp_path / "b" / "stream"))


def test_bf16_adapter_file_is_held_in_fp32_like_peft(bases, tmp_path):
    """An adapter saved in bf16 is loaded into fp32 LoRA weights (autocast_adapter_dtype)."""
    base = bases("gemma3")
    adapter = make_lora(
        base, tmp_path / "lora", target_modules=("q_proj", "embed_tokens"), use_dora=True
    )
    f = adapter / "adapter_model.safetensors"
    save_file(
        {k: v.to(torch.bfloat16) for k, v in load_file(f).items()}, f, metadata={"format": "pt"}
    )
    assert_like_peft(base, adapter, tmp_path)


def test_sharded_base_gives_sharded_output(bases, tmp_path):
    """Shards keep their names and metadata, untouched ones are linked, the index is kept."""
    base = bases("gemma3", max_shard_size="40KB")
    shards = sorted(p.name for p in base.glob("*.safetensors"))
    assert len(shards) > 3
    adapter = make_lora(
        base, tmp_path / "lora", target_modules=("q_proj",), layers_to_transform=[0]
    )
    summary = assert_like_peft(base, adapter, tmp_path)
    out = tmp_path / "stream"
    assert sorted(p.name for p in out.glob("*.safetensors")) == shards
    assert summary["shards_linked"] >= 1 and summary["shards_written"] >= 1
    linked = [s for s in shards if os.path.samefile(base / s, out / s)]
    assert len(linked) == summary["shards_linked"]
    index = "model.safetensors.index.json"
    assert (out / index).read_bytes() == (base / index).read_bytes()
    for s in shards:
        with safe_open(base / s, "pt") as a, safe_open(out / s, "pt") as b:
            assert a.metadata() == b.metadata() and list(a.keys()) == list(b.keys())


def test_sharded_untied_head_is_added_to_the_index(bases, tmp_path):
    base = bases("gemma3", max_shard_size="40KB")
    adapter = make_lora(
        base, tmp_path / "lora", target_modules=("q_proj",), modules_to_save=["lm_head"]
    )
    assert_like_peft(base, adapter, tmp_path)
    index = json.loads((tmp_path / "stream" / "model.safetensors.index.json").read_text())
    shard = index["weight_map"]["lm_head.weight"]
    assert shard == index["weight_map"]["model.embed_tokens.weight"]
    with safe_open(tmp_path / "stream" / shard, "pt") as fh:
        assert "lm_head.weight" in fh.keys()
    total = sum(t.numel() * t.element_size() for t in tensors(tmp_path / "stream").values())
    assert index["metadata"]["total_size"] == total


@pytest.mark.parametrize(
    "option,value,named",
    [
        ("init_lora_weights", "pissa", "init_lora_weights='pissa'"),
        ("trainable_token_indices", [3, 5], "trainable_token_indices=[3, 5]"),
    ],
)
def test_refuses_options_it_does_not_reproduce(bases, tmp_path, option, value, named):
    base = bases("gemma3")
    adapter = make_lora(base, tmp_path / "lora", target_modules=("q_proj",), **{option: value})
    out = tmp_path / "out"
    with pytest.raises(
        MergebakeError,
        match=rf"adapter_config\.json: {re.escape(named)} is not "
        r"supported "
        r"by the stream engine.*bake\.engine: peft",
    ):
        bake(base, adapter, out)
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_refuses_rank_that_disagrees_with_the_config(bases, tmp_path):
    base = bases("gemma3")
    adapter = make_lora(base, tmp_path / "lora", target_modules=("q_proj",))
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["rank_pattern"] = {"q_proj": 8}
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        MergebakeError,
        match=r"q_proj: lora_A has rank 4 but "
        r"adapter_config\.json gives r=8",
    ):
        bake(base, adapter, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_stream_output_is_byte_identical_on_rebuild(bases, tmp_path):
    base = bases("gemma3-mm")
    adapter = make_lora(base, tmp_path / "lora", target_modules="all-linear")
    for name in ("a", "b"):
        bake(base, adapter, tmp_path / name)
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (
        tmp_path / "b" / "model.safetensors"
    ).read_bytes()


def test_bake_device_choices(monkeypatch):
    monkeypatch.setattr(
        device_mod, "cuda_problem", lambda index=0: "torch.cuda.is_available() is False"
    )
    assert bake_device("cpu") == "cpu" and bake_device(None) == "cpu"
    assert bake_device("auto") == "cpu"  # no CUDA at all: quietly the CPU
    with pytest.raises(MergebakeError, match=r"bake device 'tpu'"):
        bake_device("tpu")
    monkeypatch.setattr(device_mod, "cuda_problem", lambda index=0: None)
    assert bake_device("cuda:1") == "cuda:1" and bake_device("auto") == "cuda"


def test_cuda_not_usable_falls_back_to_cpu_with_a_warning(bases, tmp_path, monkeypatch):
    problem = "RuntimeError: CUDA error: CUDA-capable device(s) is/are busy or unavailable"
    monkeypatch.setattr(device_mod, "cuda_problem", lambda index=0: problem)
    base = bases("gemma3")
    adapter = make_lora(base, tmp_path / "lora", target_modules=("q_proj", "v_proj"))
    with pytest.warns(
        RuntimeWarning,
        match=r"bake device 'cuda': CUDA is not usable "
        r"\(RuntimeError: CUDA error: .*busy.*\); baking "
        r"on the CPU instead",
    ):
        summary = bake(base, adapter, tmp_path / "gpu", device="cuda")
    assert summary["device"] == "cpu"
    bake(base, adapter, tmp_path / "cpu")
    assert tensors(tmp_path / "gpu").keys() == tensors(tmp_path / "cpu").keys()
    assert all(
        torch.equal(tensors(tmp_path / "gpu")[k], v) for k, v in tensors(tmp_path / "cpu").items()
    )


def test_engines_registry_and_peft_engine_agree_on_an_untied_head(bases, tmp_path):
    """The peft engine keeps PEFT's tie_word_embeddings: false (not the base's config)."""
    assert set(ENGINES) == {"stream", "peft"}
    base = bases("gemma3")
    adapter = make_lora(
        base, tmp_path / "lora", target_modules=("q_proj",), modules_to_save=["lm_head"]
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = bake(base, adapter, tmp_path / "s", engine="stream")
        p = bake(base, adapter, tmp_path / "p", engine="peft")
    assert s["config_changed"] == p["config_changed"] == {"tie_word_embeddings": False}
    got, want = tensors(tmp_path / "s"), tensors(tmp_path / "p")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_pipeline_error_leaves_nothing(bases, tmp_path, monkeypatch):
    """A failure while writing removes the temporary folder (atomic output)."""
    import mergebake.stream as stream

    base = bases("gemma3")
    adapter = make_lora(base, tmp_path / "lora", target_modules=("q_proj",))

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(stream, "pwrite_all", broken)
    with pytest.raises(OSError, match="disk full"):
        bake(base, adapter, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))
    shutil.rmtree(tmp_path / "lora")


def test_device_path_and_worker_layouts_give_the_same_bytes(bases, tmp_path, monkeypatch):
    """The accelerator code path (tensors moved to the device and back, no scratch buffer),
    run here on ``cpu:0``, and every worker layout write the same bytes as the default."""
    import mergebake.stream as stream
    from mergebake.bake import preflight

    assert stream.worker_count(2, []) == (2, 1) and stream.worker_count(16, []) == (4, 4)
    base = bases("gemma3-mm", "fp16")
    adapter = make_lora(
        base,
        tmp_path / "lora",
        target_modules=("q_proj", "embed_tokens", "up_proj"),
        use_rslora=True,
    )
    plan = preflight(base, adapter)
    runs = {
        "cpu": ("cpu", None),
        "device": ("cpu:0", None),
        "one-worker": ("cpu", 1),
        "four-workers": ("cpu", 4),
    }
    for name, (device, workers) in runs.items():
        if workers:
            monkeypatch.setattr(stream, "worker_count", lambda threads, jobs, w=workers: (w, 1))
        (tmp_path / name).mkdir()
        stream.run_stream(stream.plan_stream(base, adapter, plan), tmp_path / name, device=device)
    want = (tmp_path / "cpu" / "model.safetensors").read_bytes()
    for name in runs:
        assert (tmp_path / name / "model.safetensors").read_bytes() == want, name


def test_a_delta_that_overflows_is_refused_before_it_is_written(tmp_path):
    """fp16 base + a huge LoRA delta gives Inf: the stream engine refuses it, nothing left."""
    from _models import make_gemma3_text, make_lora
    from safetensors.torch import load_file, save_file

    from mergebake import MergebakeError
    from mergebake.bake import bake

    base = make_gemma3_text(tmp_path / "base", dtype=torch.float16)
    adapter = make_lora(base, tmp_path / "adapter")
    f = adapter / "adapter_model.safetensors"
    t = load_file(f)
    for k in t:
        if "lora_B" in k:
            t[k] = t[k] * 1e6
    save_file(t, f, metadata={"format": "pt"})
    with pytest.raises(MergebakeError, match="NaN/Inf after adding the LoRA delta"):
        bake(base, adapter, tmp_path / "out", engine="stream")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))


# ---------------------------------------------------------------------------------------
# row blocks: the plain-LoRA linear delta computed a block of rows of B @ A at a time


def test_row_blocks_geometry():
    """Blocks start at multiples of ROW_ALIGN (16) rows, hold about block_bytes of fp32,
    and a last block under 16 rows joins the one before."""
    from mergebake.stream import ROW_ALIGN, row_blocks

    assert ROW_ALIGN == 16
    assert row_blocks(64, 64, 16 * 64 * 4) == [(0, 16), (16, 32), (32, 48), (48, 64)]
    assert row_blocks(128, 64, 48 * 64 * 4) == [(0, 48), (48, 96), (96, 128)]
    assert row_blocks(101, 64, 16 * 64 * 4) == [
        (0, 16),
        (16, 32),
        (32, 48),
        (48, 64),
        (64, 80),
        (80, 101),
    ]
    assert row_blocks(333, 200, 50 * 200 * 4) == [
        (0, 48),
        (48, 96),
        (96, 144),
        (144, 192),
        (192, 240),
        (240, 288),
        (288, 333),
    ]
    assert row_blocks(3, 64, 4) == [(0, 3)]  # fewer rows than a block: one block
    assert row_blocks(17, 10**6, 1) == [(0, 17)]  # 16-row blocks at least; the 1-row tail joins
    # the default: 2 MiB of fp32, 336 rows of 1536 (a gate_proj of the bench), 96 left
    assert row_blocks(6144, 1536) == [(i, i + 336) for i in range(0, 6048, 336)] + [(6048, 6144)]


def _peft_linear_merge(weight, a, b, r: int, alpha: int, rslora: bool, fan: bool):
    """PEFT's own ``Linear.merge`` (``nn.Linear``, or transformers' ``Conv1D`` with
    fan_in_fan_out) of fp32 ``lora_A`` ``a`` and ``lora_B`` ``b`` into ``weight``, as
    ``PeftModel.from_pretrained`` leaves them (adapter held in fp32). Returns (merged
    weight, PEFT's scaling)."""
    from peft import LoraConfig
    from peft.tuners.lora.layer import Linear as LoraLinear
    from transformers.pytorch_utils import Conv1D

    out_f, in_f = b.shape[0], a.shape[1]
    base = Conv1D(out_f, in_f) if fan else torch.nn.Linear(in_f, out_f, bias=False)
    base.weight.data = weight.clone()
    cfg = LoraConfig(r=r, lora_alpha=alpha, use_rslora=rslora, fan_in_fan_out=fan)
    layer = LoraLinear(base, "default", cfg, r=r, lora_alpha=alpha, use_rslora=rslora)
    layer.lora_A["default"].weight.data = a.clone()
    layer.lora_B["default"].weight.data = b.clone()
    layer.merge()
    return base.weight.data, layer.scaling["default"]


def test_row_block_products_equal_peft_on_many_shapes():
    """For ranks 1…256, odd row counts, widths and block sizes that do not divide them
    (incl. a last block joined to the one before), fan_in_fan_out or not, bf16/fp16/fp32:
    apply_op with RowBlocks gives PEFT's merged weight bit for bit, both the first time a
    shape is met (probed) and after (the recorded verdict). On this machine's BLAS the
    aligned row blocks agree for every multi-block shape, so the row-block path is what
    is compared here."""
    from mergebake.stream import LoraOp, RowBlocks, Scratch, apply_op

    g = torch.Generator().manual_seed(0)
    verdicts: dict[tuple, bool] = {}
    cases = 0
    for r in (1, 8, 16, 64, 128, 256):
        for rows, cols in ((1, 33), (3, 40), (17, 96), (101, 64), (333, 200), (1000, 72)):
            for block_rows in (16, 50):
                for fan in (False, True):
                    dtypes = ("bf16", "fp16", "fp32") if r in (8, 64) else ("bf16",)
                    for dtype in dtypes:
                        a = torch.randn(r, cols, generator=g) * 0.1
                        b = torch.randn(rows, r, generator=g) * 0.1
                        shape = (cols, rows) if fan else (rows, cols)
                        w = (torch.randn(shape, generator=g) * 0.05).to(DTYPES[dtype])
                        want, scale = _peft_linear_merge(w, a, b, r, 2 * r + 1, r == 64, fan)
                        op = LoraOp("m", "linear", scale, "a", "b", fan_in_fan_out=fan)
                        blocks, scratch = RowBlocks(block_rows * cols * 4), Scratch()
                        for turn in ("probe", "recorded"):
                            got = apply_op(w.clone(), op, {"a": a, "b": b}, scratch, blocks)
                            assert got.dtype == want.dtype and torch.equal(got, want), (
                                r,
                                rows,
                                cols,
                                block_rows,
                                fan,
                                dtype,
                                turn,
                            )
                            cases += 1
                        verdicts.update(blocks.verdicts)
                        agreed = all(blocks.verdicts.values())  # one block: no probe, True
                        assert (blocks.blocked_ops, blocks.full_ops) == (
                            (2, 0) if agreed else (0, 2)
                        )
    assert cases == 2 * 6 * 2 * 2 * (4 * 1 + 2 * 3)
    # one verdict per multi-block product shape (rows 1, 3 and 17 are one block)
    assert len(verdicts) == 6 * 3 * 2 and all(verdicts.values()), [
        k for k, v in verdicts.items() if not v
    ]


def _spy_row_blocks(monkeypatch, block_bytes: int) -> list:
    """Make every bake use row blocks of ``block_bytes``; return the RowBlocks it made."""
    import mergebake.stream as stream

    made = []

    class Spy(stream.RowBlocks):
        def __init__(self) -> None:
            super().__init__(block_bytes)
            made.append(self)

    monkeypatch.setattr(stream, "RowBlocks", Spy)
    return made


@pytest.mark.parametrize("block_rows", [16, 48])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_row_blocks_bit_identical_to_peft(bases, tmp_path, monkeypatch, arch, dtype, block_rows):
    """Several row blocks per tensor (16 or 48 rows of the 64-wide layers, so 64-, 128-,
    192- and 256-row products end in a shorter block), all-linear with rank patterns and
    rsLoRA, Conv1D (fan_in_fan_out) for GPT-2: every tensor equals PEFT's, and the second
    tensor was computed by row blocks."""
    made = _spy_row_blocks(monkeypatch, block_rows * 64 * 4)
    base = bases(arch, dtype)
    targets = "all-linear" if arch == "llama" else ("c_attn", "c_fc", "c_proj")
    adapter = make_lora(
        base,
        tmp_path / "lora",
        target_modules=targets,
        r=8,
        alpha=12,
        use_rslora=True,
        rank_pattern={"v_proj": 5, "c_fc": 16},
    )
    assert_like_peft(base, adapter, tmp_path)
    (blocks,) = made
    # (shapes probed, ops from the full product, ops by row blocks): Llama's q/o (64 rows),
    # k (32), v (32, r=5), gate/up (128) and down (64 of 128 columns; 16-row blocks) are 5
    # shapes, 14 ops; k and v are one 48-row block (no probe). GPT-2's c_attn (192 rows),
    # c_fc (256, r=16) and the two c_proj (64 of 64 and of 256 columns) are 4 shapes, 8 ops.
    want = {
        ("llama", 16): (5, 0, 14),
        ("llama", 48): (3, 0, 14),
        ("gpt2", 16): (4, 0, 8),
        ("gpt2", 48): (4, 0, 8),
    }[arch, block_rows]
    assert all(blocks.verdicts.values()), blocks.verdicts
    assert (len(blocks.verdicts), blocks.full_ops, blocks.blocked_ops) == want


def test_row_blocks_that_differ_fall_back_to_the_full_product(bases, tmp_path, monkeypatch):
    """Where a row block's product is not bit-identical to the full one (simulated: every
    block product off by 1e-3), the probe of each shape finds it out and every tensor is
    baked from the full product: the output still equals PEFT's."""
    import mergebake.stream as stream

    made = _spy_row_blocks(monkeypatch, 16 * 64 * 4)
    product = stream._rows_product
    monkeypatch.setattr(stream, "_rows_product", lambda b, a, out: product(b, a, out).add_(1e-3))
    base = bases("llama", "bf16")
    adapter = make_lora(base, tmp_path / "lora", target_modules="all-linear")
    assert_like_peft(base, adapter, tmp_path)
    (blocks,) = made
    assert blocks.verdicts and not any(blocks.verdicts.values())
    assert blocks.blocked_ops == 0 and blocks.full_ops == 2 * 7  # 2 layers of 7 linear


def test_probe_verdicts_are_the_blas_own(bases, tmp_path, monkeypatch):
    """With blocks of 1–16 rows allowed (ROW_ALIGN 1), the probe's verdict on each shape is
    what this BLAS really does with other values (here MKL computes 1–3-row blocks of a
    rank >= 2 product differently from the full product), and a bake with 1-row blocks,
    where each shape falls back as its probe says, still equals PEFT's bit for bit."""
    import mergebake.stream as stream

    monkeypatch.setattr(stream, "ROW_ALIGN", 1)
    g = torch.Generator().manual_seed(7)
    for r in (1, 2, 8, 64):
        for rows_per in (1, 2, 3, 4, 16):
            blocks = stream.RowBlocks(rows_per * 64 * 4)
            a, b = torch.randn(r, 64, generator=g), torch.randn(256, r, generator=g)
            full = b @ a
            truth = all(
                torch.equal(b[i:j] @ a, full[i:j])
                for i, j in stream.row_blocks(256, 64, blocks.block_bytes)
            )
            assert blocks.agree(256, 64, r, stream.Scratch()) == truth, (r, rows_per)
    made = _spy_row_blocks(monkeypatch, 64 * 4)  # 1 row of the 64-wide layers
    base = bases("llama", "bf16")
    adapter = make_lora(base, tmp_path / "lora", target_modules="all-linear")
    assert_like_peft(base, adapter, tmp_path)
    (blocks,) = made
    # r=4 products, ops per (rows, cols): q/o, k/v, gate/up: 4 each (2 layers), down: 2
    ops = {(64, 64): 4, (32, 64): 4, (128, 64): 4, (64, 128): 2}
    verdicts = {k[:2]: v for k, v in blocks.verdicts.items()}
    assert sorted(verdicts) == sorted(ops)
    assert blocks.full_ops == sum(n for shape, n in ops.items() if not verdicts[shape])
    assert blocks.blocked_ops == sum(n for shape, n in ops.items() if verdicts[shape])


def test_written_shards_are_hashed_while_written_not_read_again(bases, tmp_path, monkeypatch):
    """The provenance sha256 of each shard the stream engine writes comes from the hash that
    followed its writes (outputs.FollowingHash), equal to the file's; linked shards take
    the base's; no written shard is read again to hash it."""
    import hashlib

    from mergebake import outputs

    base = bases("gemma3", max_shard_size="40KB")
    adapter = make_lora(base, tmp_path / "lora", target_modules=("q_proj", "down_proj"))
    hashed = []
    sha256_file = outputs.sha256_file
    monkeypatch.setattr(outputs, "sha256_file", lambda p: hashed.append(Path(p)) or sha256_file(p))
    monkeypatch.setattr(outputs, "_HASHED", {})  # no hash memo left by an earlier bake
    out = tmp_path / "out"
    summary = bake(base, adapter, out, engine="stream")
    assert summary["shards_written"] >= 2
    record = json.loads((out / "provenance.json").read_text())["outputs"]
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    for name in shards:
        assert record[name]["sha256"] == hashlib.sha256((out / name).read_bytes()).hexdigest()
    written = [s for s in shards if not os.path.samefile(base / s, out / s)]
    assert len(written) == summary["shards_written"]
    assert not [p for p in hashed if p.name in written and base not in p.parents], hashed
    assert any(p.name in written for p in hashed)  # the base's own shards, as inputs
