"""verify: every kind of defect is reported, with its exact message, in one error."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from _models import make_gemma3_mm, make_lora
from safetensors.torch import load_file, save_file

from mergebake import MergebakeError
from mergebake.bake import bake
from mergebake.normalise import normalise
from mergebake.verify import (
    VerificationError,
    diff_json,
    find_problems,
    verify_after_merge,
    verify_checkpoint,
)

UP = "model.layers.1.mlp.up_proj.weight"
Q = "model.layers.0.self_attn.q_proj.weight"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A normalised (text-only, fp32) tiny Gemma-3 base."""
    root = tmp_path_factory.mktemp("ref")
    make_gemma3_mm(root / "mm", torch.float32)
    normalise(root / "mm", root / "text")
    return root / "text"


def candidate(reference: Path, dst: Path, edit=None, config_edit=None) -> Path:
    """A real copy of ``reference`` with its tensors and/or config edited in place."""
    shutil.copytree(reference, dst)
    if edit is not None:
        tensors = load_file(dst / "model.safetensors")
        edit(tensors)
        (dst / "model.safetensors").unlink()
        save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    if config_edit is not None:
        cfg = json.loads((dst / "config.json").read_text())
        config_edit(cfg)
        (dst / "config.json").unlink()
        (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    return dst


def test_good_copy_passes(reference, tmp_path):
    def bump(cfg):
        cfg["transformers_version"] = "9.9.9"

    good = candidate(reference, tmp_path / "good", config_edit=bump)
    assert find_problems(good, reference) == []
    verify_checkpoint(good, reference)


def test_dropped_tensor(reference, tmp_path):
    bad = candidate(reference, tmp_path / "bad", edit=lambda t: t.pop(UP))
    assert find_problems(bad, reference) == [
        f"tensor {UP}: missing (the reference has it)",
        f"load: missing key {UP}",
    ]


def test_unexpected_tensor(reference, tmp_path):
    def add(t):
        t["model.extra.weight"] = torch.zeros(3)

    bad = candidate(reference, tmp_path / "bad", edit=add)
    assert find_problems(bad, reference) == [
        "tensor model.extra.weight: unexpected (not in the reference)",
        "load: unexpected key model.extra.weight",
    ]


def test_changed_shape(reference, tmp_path):
    def reshape(t):
        t[UP] = torch.zeros(96, 64)

    bad = candidate(reference, tmp_path / "bad", edit=reshape)
    assert find_problems(bad, reference) == [
        f"tensor {UP}: shape [96, 64], reference [128, 64]",
        f"load: shape mismatch {UP}",
    ]


def test_changed_dtype(reference, tmp_path):
    def half(t):
        t[Q] = t[Q].to(torch.bfloat16)

    bad = candidate(reference, tmp_path / "bad", edit=half)
    assert find_problems(bad, reference) == [f"tensor {Q}: dtype BF16, reference F32"]


def test_bool_becomes_int_in_config(reference, tmp_path):
    def to_int(cfg):
        assert cfg["use_cache"] is True
        cfg["use_cache"] = 1

    bad = candidate(reference, tmp_path / "bad", config_edit=to_int)
    strict = (
        "StrictDataclassFieldValidationError: Validation error for field 'use_cache': "
        "TypeError: Field 'use_cache' expected bool, got int (value: 1)"
    )
    # transformers 5 refuses the config outright: the JSON type is not cosmetic
    assert find_problems(bad, reference) == [
        "config.json use_cache: 1 (int), reference true (bool)",
        f"load: AutoModelForCausalLM.from_pretrained failed: {strict}",
        f"tokenizer: AutoTokenizer.from_pretrained failed: {strict}",
    ]
    assert (
        find_problems(
            bad, reference, allowed_config_keys=["use_cache"], load=False, check_tokenizer=False
        )
        == []
    )


def test_nan_injected(reference, tmp_path):
    def poison(t):
        t[Q][3, 5] = float("nan")
        t[UP][0, 0] = float("inf")

    bad = candidate(reference, tmp_path / "bad", edit=poison)
    assert find_problems(bad, reference) == [
        f"tensor {Q}: 1 NaN/Inf value(s) of 4096",
        f"tensor {UP}: 1 NaN/Inf value(s) of 8192",
    ]


def test_missing_tokenizer_file(reference, tmp_path):
    bad = candidate(reference, tmp_path / "bad")
    (bad / "tokenizer.json").unlink()
    problems = find_problems(bad, reference)
    assert problems[0] == "tokenizer: tokenizer.json missing (the reference has it)"
    assert problems[1].startswith("tokenizer: AutoTokenizer.from_pretrained failed")
    assert find_problems(bad, reference, check_tokenizer=False) == []


def test_every_defect_in_one_error_and_removal(reference, tmp_path):
    def edit(t):
        t.pop(UP)
        t[Q][0, 0] = float("nan")
        t["model.norm.weight"] = t["model.norm.weight"].to(torch.float16)

    def config_edit(cfg):
        cfg["use_cache"] = 1
        cfg["rope_parameters"]["sliding_attention"]["rope_theta"] = 10000
        cfg["layer_types"][1] = "full_attention"

    bad = candidate(reference, tmp_path / "bad", edit=edit, config_edit=config_edit)
    with pytest.raises(VerificationError) as info:
        verify_checkpoint(bad, reference, load=False, check_tokenizer=False)
    err = info.value
    assert isinstance(err, MergebakeError)
    assert err.problems == [
        f"tensor {UP}: missing (the reference has it)",
        "tensor model.norm.weight: dtype F16, reference F32",
        'config.json layer_types[1]: "full_attention" (string), reference "sliding_attention" '
        "(string)",
        "config.json rope_parameters.sliding_attention.rope_theta: 10000 (int), reference "
        "10000.0 (float)",
        "config.json use_cache: 1 (int), reference true (bool)",
        f"tensor {Q}: 1 NaN/Inf value(s) of 4096",
    ]
    assert str(err).startswith(f"{bad}: failed verification against {reference} (6 problem(s)):")
    assert all(f"  - {p}" in str(err) for p in err.problems)
    assert bad.exists()  # the caller decides; the default keeps it

    with pytest.raises(VerificationError):
        verify_checkpoint(bad, reference, load=False, check_tokenizer=False, remove_on_failure=True)
    assert not bad.exists()


def test_missing_candidate(reference, tmp_path):
    with pytest.raises(VerificationError, match=r"nope: does not exist"):
        verify_checkpoint(tmp_path / "nope", reference)


def test_diff_json_is_type_strict():
    assert diff_json({"a": True}, {"a": 1}) == ["config.json a: true (bool), reference 1 (int)"]
    assert diff_json({"a": 1.0}, {"a": 1}) == ["config.json a: 1.0 (float), reference 1 (int)"]
    assert diff_json({"a": 0}, {"a": False}) == ["config.json a: 0 (int), reference false (bool)"]
    assert diff_json({"a": None}, {"a": 0}) == ["config.json a: null (null), reference 0 (int)"]
    assert diff_json({"a": [1, 2]}, {"a": [1]}) == [
        "config.json a: [1, 2] (array), reference [1] (array)"
    ]
    assert diff_json({"t": {"dtype": "bfloat16"}}, {"t": {"dtype": "float32"}}, ["t.dtype"]) == []
    assert diff_json({"t": {"x": 1}, "b": 2}, {"t": {"x": 2}}, ["t"]) == [
        "config.json b: unexpected 2 (int)"
    ]
    assert diff_json({"t": {"transformers_version": "1"}}, {"t": {}}) == []


def test_mergekit_merge_of_normalised_checkpoints_verifies(tmp_path):
    """The pipeline in small: bake, normalise both, mergekit ties, verify against the base."""
    pytest.importorskip("mergekit")
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    base = make_gemma3_mm(tmp_path / "base", torch.bfloat16)
    adapter = make_lora(base, tmp_path / "lora")
    bake(base, adapter, tmp_path / "baked")
    normalise(base, tmp_path / "text_base")
    normalise(tmp_path / "baked", tmp_path / "text_baked")
    recipe = MergeConfiguration.model_validate(
        {
            "merge_method": "ties",
            "base_model": str(tmp_path / "text_base"),
            "models": [
                {
                    "model": str(tmp_path / "text_baked"),
                    "parameters": {"weight": 1.0, "density": 0.5},
                }
            ],
            "dtype": "bfloat16",
        }
    )
    merged = tmp_path / "merged"
    run_merge(
        recipe, str(merged), options=MergeOptions(write_model_card=False, quiet=True, random_seed=0)
    )
    verify_after_merge(merged, tmp_path / "text_base")
    assert merged.exists()


def test_tokenizer_is_required_only_where_the_reference_has_one(tmp_path):
    from mergebake.verify import tokenizer_problems

    ref, cand = tmp_path / "ref", tmp_path / "cand"
    ref.mkdir()
    cand.mkdir()
    assert tokenizer_problems(cand, ref) == []
    (ref / "tokenizer.json").write_text("{}")
    assert tokenizer_problems(cand, ref) == [
        "tokenizer: tokenizer.json missing (the reference has it)"
    ]
