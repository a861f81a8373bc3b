"""The catalogue of broken inputs. Each case asserts a non-zero exit of the `mergebake`
command (status 2), an error that names the file or config key at fault, and that no
output (nor a temporary folder) is left behind. The workflow-level cases (preflight,
--keep-going) are in test_bad_inputs_workflow.py."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from _models import make_gemma3_text, make_lora
from safetensors.torch import load_file, save_file

from mergebake.cli import main

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    d = tmp_path_factory.mktemp("good")
    base = make_gemma3_text(d / "base", dtype=torch.bfloat16)
    adapter = make_lora(base, d / "adapter")
    return base, adapter


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def run(capsys, *argv) -> str:
    """Run `mergebake ARGV`; assert it failed with status 2; return its stderr."""
    status = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert status == 2, err
    return err


def nothing_left(folder: Path) -> None:
    assert not folder.exists()
    assert not list(folder.parent.glob(f".{folder.name}.tmp-*"))


def bake(capsys, base, adapter, out, *extra):
    err = run(capsys, "bake", "--base", base, "--adapter", adapter, "--out", out, *extra)
    nothing_left(out)
    return err


# ---- checkpoints and adapters ------------------------------------------------------


def test_truncated_safetensors_shard(good, tmp_path, capsys):
    base = copy(good[0], tmp_path / "base")
    shard = base / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1000])
    err = bake(capsys, base, good[1], tmp_path / "out")
    assert f"{shard}: tensor" in err and "truncated?" in err


def test_shard_missing_from_index(good, tmp_path, capsys):
    base = copy(good[0], tmp_path / "base")
    (base / "model.safetensors.index.json").write_text(
        json.dumps(
            {
                "metadata": {},
                "weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors"},
            }
        )
    )
    (base / "model.safetensors").rename(base / "model-00002-of-00002.safetensors")
    err = bake(capsys, base, good[1], tmp_path / "out")
    assert f"{base / 'model.safetensors.index.json'}: lists shard(s)" in err
    assert "model-00001-of-00002.safetensors" in err


def test_adapter_for_another_base_shape_mismatch(good, tmp_path, capsys):
    from _models import text_config
    from transformers import Gemma3ForCausalLM

    cfg = text_config()
    cfg.hidden_size, cfg.intermediate_size = 96, 160
    other = tmp_path / "other"
    Gemma3ForCausalLM(cfg).save_pretrained(other)
    shutil.copy(good[0] / "tokenizer.json", other)
    adapter = make_lora(other, tmp_path / "adapter")
    err = bake(capsys, good[0], adapter, tmp_path / "out")
    assert str(adapter) in err and "shape" in err


def test_adapter_base_model_name_mismatch_strict(good, tmp_path, capsys):
    adapter = copy(good[1], tmp_path / "adapter")
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "google/gemma-3-1b-it"
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    err = bake(
        capsys,
        good[0],
        adapter,
        tmp_path / "out",
        "--expected-base",
        "google/gemma-3-1b-pt",
        "--strict-base-match",
    )
    assert (
        f"{adapter / 'adapter_config.json'}: base_model_name_or_path is 'google/gemma-3-1b-it'"
        in err
    )


def test_adapter_with_nan(good, tmp_path, capsys):
    adapter = copy(good[1], tmp_path / "adapter")
    f = adapter / "adapter_model.safetensors"
    t = load_file(f)
    k = sorted(t)[0]
    t[k][0, 0] = float("nan")
    save_file(t, f, metadata={"format": "pt"})
    err = bake(capsys, good[0], adapter, tmp_path / "out")
    assert f"{f}: NaN/Inf in adapter tensor(s) ['{k}']" in err


def test_adapter_targeting_missing_module(good, tmp_path, capsys):
    adapter = copy(good[1], tmp_path / "adapter")
    f = adapter / "adapter_model.safetensors"
    t = load_file(f)
    k = next(k for k in sorted(t) if "lora_A" in k)
    t[k.replace("layers.0", "layers.7")] = t[k].clone()
    save_file(t, f, metadata={"format": "pt"})
    err = bake(capsys, good[0], adapter, tmp_path / "out")
    assert str(adapter) in err and "layers.7" in err


def test_pickle_only_base(good, tmp_path, capsys):
    base = copy(good[0], tmp_path / "base")
    torch.save(load_file(base / "model.safetensors"), base / "pytorch_model.bin")
    (base / "model.safetensors").unlink()
    err = bake(capsys, base, good[1], tmp_path / "out")
    assert f"{base}:" in err and "pytorch_model.bin" in err and "safetensors" in err


def test_pickle_only_adapter_without_allow_pickle(good, tmp_path, capsys):
    adapter = copy(good[1], tmp_path / "adapter")
    torch.save(load_file(adapter / "adapter_model.safetensors"), adapter / "adapter_model.bin")
    (adapter / "adapter_model.safetensors").unlink()
    err = bake(capsys, good[0], adapter, tmp_path / "out")
    assert str(adapter) in err and "allow_pickle" in err


def test_vocabulary_size_mismatch_between_bake_inputs(good, tmp_path, capsys):
    """An adapter trained with a resized vocabulary (embedding LoRA over 72 tokens) does not
    fit a base of 64."""
    from _models import text_config
    from transformers import Gemma3ForCausalLM

    cfg = text_config()
    cfg.vocab_size = 72
    other = tmp_path / "other"
    Gemma3ForCausalLM(cfg).save_pretrained(other)
    adapter = make_lora(other, tmp_path / "adapter", target_modules=("embed_tokens", "q_proj"))
    err = bake(capsys, good[0], adapter, tmp_path / "out")
    assert str(adapter) in err and "embed_tokens" in err


def test_missing_adapter_config(good, tmp_path, capsys):
    adapter = copy(good[1], tmp_path / "adapter")
    (adapter / "adapter_config.json").unlink()
    err = bake(capsys, good[0], adapter, tmp_path / "out")
    assert str(adapter / "adapter_config.json") in err


def test_base_config_not_json(good, tmp_path, capsys):
    base = copy(good[0], tmp_path / "base")
    (base / "config.json").write_text("{not json")
    err = bake(capsys, base, good[1], tmp_path / "out")
    assert f"{base / 'config.json'}: not valid JSON" in err


def test_missing_base_folder(good, tmp_path, capsys):
    err = bake(capsys, tmp_path / "nope", good[1], tmp_path / "out")
    assert f"{tmp_path / 'nope'}:" in err and "does not exist" in err


def test_disk_full_during_a_write(good, tmp_path, capsys):
    small = tmp_path / "small"
    small.mkdir()
    if (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(small)], capture_output=True
        ).returncode
        != 0
    ):
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        err = run(capsys, "normalise", "--src", good[0], "--out", small / "text")
        assert f"{small / 'text'}: no space left on device" in err
        assert list(small.iterdir()) == []
    finally:
        subprocess.run(["umount", str(small)], check=True)


# ---- config, recipes, tasks ----------------------------------------------------------


DEMO = yaml.safe_load((ROOT / "config.yaml").read_text())


def validate(capsys, tmp_path, config) -> str:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    err = run(capsys, "validate", path)
    assert err.startswith(f"mergebake validate: error: {path}: ")
    return err


def with_(path: str, value):
    cfg = json.loads(json.dumps(DEMO))
    *keys, last = path.split(".")
    node = cfg
    for k in keys:
        node = node[int(k)] if isinstance(node, list) else node.setdefault(k, {})
    node[last] = value
    return cfg


@pytest.mark.parametrize(
    "config, key",
    [
        (
            with_("grid.0.methods", ["linear", "bogus"]),
            "key 'grid[0].methods': unknown method 'bogus'",
        ),
        (
            with_("methods.ties.parameters.density", 1.2),
            "key 'methods.ties.parameters.density': 1.2 is outside (0, 1]",
        ),
        (
            with_("methods.linear.parameters.weight", {"eng": 1, "nob": 1, "deu": 1}),
            "key 'methods.linear.parameters.weight.deu'",
        ),
        (
            with_("grid.1.sizes", ["1b"]),
            "key 'grid[1]': cell 1b-std/eng-nob__ties is already in grid[0]",
        ),
        (with_("groups", {"a/b": ["eng"]}), "key 'groups'"),
        (with_("groups", {"..": ["eng"]}), "key 'groups'"),
        (with_("grid.1.sizes", ["27b"]), "key 'grid[1]': base '27b-std'"),
        (with_("bake.engine", "fast"), "key 'bake.engine'"),
    ],
    ids=[
        "unknown-method",
        "density-out-of-range",
        "weight-for-adapter-not-in-group",
        "duplicate-cell",
        "name-with-slash",
        "name-dotdot",
        "missing-base",
        "unknown-engine",
    ],
)
def test_bad_config(capsys, tmp_path, config, key):
    assert key in validate(capsys, tmp_path, config)


def test_recipe_with_unknown_placeholder(good, tmp_path, capsys):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(
        "merge_method: linear\nbase_model: ${base_model}\nmodels:\n"
        "  - model: ${model}\n    parameters:\n      weight: ${wieght}\n"
    )
    err = run(
        capsys,
        "merge",
        "--recipe",
        recipe,
        "--base",
        good[0],
        "--model",
        f"eng={good[0]}",
        "--out",
        tmp_path / "out",
    )
    assert f"{recipe}: unknown placeholder ${{wieght}}" in err
    nothing_left(tmp_path / "out")


def test_unknown_lm_eval_task(good, tmp_path, capsys):
    tasks = json.dumps([{"name": "norquad_nonexistent", "num_fewshot": 0}])
    err = run(
        capsys,
        "eval",
        "--model",
        good[0],
        "--out",
        tmp_path / "e.json",
        "--tasks",
        tasks,
        "--include-path",
        tmp_path,
    )
    assert "norquad_nonexistent" in err
    assert not (tmp_path / "e.json").exists()


def test_config_that_disagrees_with_the_weights(good, tmp_path, capsys):
    """config.json says 3 layers, the weights hold 2: normalise's verification lists the
    missing keys and writes nothing."""
    base = copy(good[0], tmp_path / "base")
    cfg = json.loads((base / "config.json").read_text())
    cfg["num_hidden_layers"] = 3
    cfg["layer_types"] = cfg["layer_types"] + ["full_attention"]
    (base / "config.json").write_text(json.dumps(cfg))
    err = run(capsys, "normalise", "--src", base, "--out", tmp_path / "text")
    assert f"{tmp_path / 'text'}: failed verification against {base}" in err
    assert "load: missing key model.layers.2.mlp.down_proj.weight" in err
    nothing_left(tmp_path / "text")
