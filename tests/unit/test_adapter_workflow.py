"""Adapter-space cells in the workflow (issue 12): config checks naming the key, PEFT's
refusals before any job, the plan's jobs and commands, the upload of the merged adapter,
the CLI, and the last step (normalise + verify) on a tiny model."""

from __future__ import annotations

import json
import re
import shlex

import pytest
import torch
from _models import make_gemma3_text, make_lora
from _workflow import ROOT, demo_config
from safetensors.torch import load_file

from mergebake.adapter_merge import merge_adapters
from mergebake.bake import bake
from mergebake.cli import build_parser
from mergebake.commands import command_line
from mergebake.config import ConfigError, load_config
from mergebake.methods import adapter_markdown_table
from mergebake.normalise import normalise
from mergebake.preflight import check_adapter_cells
from mergebake.upload import upload_cell
from mergebake.workflow import Plan


def _cfg(**method) -> dict:
    cfg = demo_config()
    cfg["methods"]["ties-adapter"] = method
    return cfg


@pytest.mark.parametrize(
    "method, message",
    [
        (
            {"space": "adapter", "combination_type": "tie", "parameters": {}},
            "key 'methods.ties-adapter.combination_type': 'tie' is not one of",
        ),
        (
            {"space": "adapter", "combination_type": "ties", "parameters": {"svd_rank": 4}},
            "key 'methods.ties-adapter.parameters.svd_rank': combination_type 'ties' does not "
            "use 'svd_rank'",
        ),
        (
            {"space": "adapter", "combination_type": "ties", "parameters": {"density": 1.5}},
            "methods.ties-adapter.parameters.density",
        ),
        (
            {"space": "adapter", "combination_type": "ties", "parameters": {}},
            "key 'methods.ties-adapter.parameters.density' is required by combination_type 'ties'",
        ),
        (
            {"space": "adapter", "parameters": {}},
            "key 'methods.ties-adapter.combination_type' is required with space: adapter",
        ),
        (
            {"space": "adapter", "combination_type": "linear", "recipe": "linear"},
            "key 'methods.ties-adapter.recipe': an adapter-space method has no mergekit recipe",
        ),
        (
            {"combination_type": "ties", "parameters": {"density": 0.5}},
            "key 'methods.ties-adapter.combination_type' is a PEFT option of adapter-space",
        ),
        (
            {"space": "adapter", "combination_type": "linear", "parameters": {"density": 0.5}},
            "combination_type 'linear' does not use 'density'",
        ),
        (
            {
                "space": "adapter",
                "combination_type": "cat",
                "parameters": {"weight": {"eng": 1.0}},
            },
            "key 'methods.ties-adapter.parameters.weight': no value for adapter(s) ['nob']",
        ),
        (
            {
                "space": "adapter",
                "combination_type": "ties",
                "parameters": {"density": 0.5, "majority_sign_method": "most"},
            },
            "methods.ties-adapter.parameters.majority_sign_method",
        ),
    ],
)
def test_bad_adapter_space_methods_are_refused_naming_the_key(method, message):
    with pytest.raises(ConfigError) as e:
        load_config(_cfg(**method))
    assert message in str(e.value)


def test_demo_adapter_cell_plan_and_commands():
    p = Plan(load_config(ROOT / "config.yaml"))
    wc = {"base": "1b-std", "group": "eng-nob", "method": "ties-adapter"}
    assert p.is_adapter_cell("ties-adapter") and not p.is_adapter_cell("ties")
    assert p.methods_of_space("adapter") == ["ties-adapter"]
    assert shlex.split(command_line(p, "adapter_merge", wc)) == [
        *["mergebake", "adapter-merge"],
        *["--adapter", "eng=resources/adapters/1b-std/eng"],
        *["--adapter", "nob=resources/adapters/1b-std/nob"],
        *["--combination-type", "ties", "--weight", "eng=1.0", "--weight", "nob=1.0"],
        *["--density", "0.5", "--majority-sign-method", "total", "--seed", "1234"],
        *["--base", "resources/bases/1b-std"],
        *["--out", "results/adapters/1b-std/eng-nob__ties-adapter"],
    ]
    assert shlex.split(command_line(p, "bake_cell", wc))[:8] == [
        *["mergebake", "bake", "--base", "resources/bases/1b-std"],
        *["--adapter", "results/adapters/1b-std/eng-nob__ties-adapter"],
        *["--out", "results/baked/1b-std/eng-nob__ties-adapter"],
    ]
    assert shlex.split(command_line(p, "normalise_cell", wc)) == [
        *["mergebake", "adapter-cell"],
        *["--baked", "results/baked/1b-std/eng-nob__ties-adapter"],
        *["--base", "results/text/1b-std/_base"],
        *["--adapter", "results/adapters/1b-std/eng-nob__ties-adapter"],
        *["--out", "results/merged/1b-std/eng-nob__ties-adapter"],
    ]
    up = shlex.split(command_line(p, "upload", wc))
    assert up[-2:] == ["--adapter-dir", "results/adapters/1b-std/eng-nob__ties-adapter"]
    weight_cell = dict(wc, method="ties")
    assert "--adapter-dir" not in command_line(p, "upload", weight_cell)
    assert "adapter_space" not in p.card_spec(weight_cell)  # other cells' cards unchanged
    assert p.card_spec(wc)["adapter_space"] == {
        "subfolder": "adapter",
        "combination_type": "ties",
        "weights": {"eng": 1.0, "nob": 1.0},
        "density": 0.5,
        "majority_sign_method": "total",
    }
    assert p.cell_adapter(wc) == ["results/adapters/1b-std/eng-nob__ties-adapter"]
    assert p.job_resources("bake_cell", wc) == p.job_resources(
        "bake", {"base": "1b-std", "adapter": "eng"}
    )


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    base = make_gemma3_text(d / "base", seed=3)
    eng = make_lora(base, d / "eng", r=4, seed=11)
    nob = make_lora(base, d / "nob", r=4, seed=12)
    wide = make_lora(base, d / "wide", r=8, seed=13)
    return dict(dir=d, base=base, eng=eng, nob=nob, wide=wide)


def _local_cfg(tiny, combination_type="ties", nob="nob"):
    cfg = demo_config()
    cfg["bases"] = {"1b-std": {"path": str(tiny["base"])}}
    cfg["adapters"] = {"1b-std": {"eng": {"path": str(tiny["eng"])}}}
    cfg["adapters"]["1b-std"]["nob"] = {"path": str(tiny[nob])}
    cfg["methods"] = {
        "ties-adapter": {
            "space": "adapter",
            "combination_type": combination_type,
            "parameters": {"density": 0.5} if "ties" in combination_type else {},
        }
    }
    cfg["grid"] = [
        {"sizes": ["1b"], "variants": ["std"], "groups": ["eng-nob"], "methods": ["ties-adapter"]}
    ]
    cfg["eval"]["baselines"] = False
    return load_config(cfg)


def test_peft_refusals_of_local_adapters_are_config_errors_before_any_job(tiny):
    assert check_adapter_cells(_local_cfg(tiny)) == ["1b-std/eng-nob__ties-adapter"]
    with pytest.raises(ConfigError) as e:
        check_adapter_cells(_local_cfg(tiny, nob="wide"))
    msg = str(e.value)
    assert msg.startswith(
        "key 'methods.ties-adapter' (cell 1b-std/eng-nob__ties-adapter): PEFT cannot merge"
    )
    assert re.search(r"rank", msg), msg
    # cat and the SVD types take unequal ranks, as PEFT does
    assert check_adapter_cells(_local_cfg(tiny, "cat", nob="wide"))
    # adapters not on disk yet (fetched, generated) are left to the adapter_merge job
    assert check_adapter_cells(load_config(ROOT / "config.yaml"), tiny["dir"]) == []


def test_adapter_cell_is_the_normalised_bake_verified_with_adapter_provenance(tiny, tmp_path):
    from mergebake.adapter_cell import finish_adapter_cell

    adapters = {"eng": tiny["eng"], "nob": tiny["nob"]}
    merged = tmp_path / "adapter"
    merge_adapters(
        adapters, merged, combination_type="ties", density=0.5, seed=1, base=tiny["base"]
    )
    bake(tiny["base"], merged, tmp_path / "baked", engine="stream")
    normalise(tiny["base"], tmp_path / "text_base")
    out = tmp_path / "cell"
    res = finish_adapter_cell(tmp_path / "baked", tmp_path / "text_base", merged, out)
    assert res["space"] == "adapter" and res["combination_type"] == "ties"
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["step"] == "adapter-cell" and prov["params"]["space"] == "adapter"
    assert prov["params"]["adapter_merge"]["density"] == 0.5
    assert set(prov["inputs"]) == {"adapter", "baked", "base"}
    got, want = (
        load_file(out / "model.safetensors"),
        load_file(tmp_path / "baked" / "model.safetensors"),
    )
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    changed = [
        k for k in got if not torch.equal(got[k], load_file(tiny["base"] / "model.safetensors")[k])
    ]
    assert changed  # the merged adapter really changed the base
    assert not list(tmp_path.glob(".cell.tmp-*"))


def test_upload_sends_the_merged_adapter_beside_the_model(tmp_path):
    cell, adapter = tmp_path / "cell", tmp_path / "adapter"
    cell.mkdir()
    adapter.mkdir()
    (cell / "config.json").write_text("{}")
    (adapter / "adapter_config.json").write_text('{"r": 4}')
    (adapter / "adapter_model.safetensors").write_bytes(b"a" * 7)
    rec = upload_cell(
        cell, tmp_path / "r.json", repo="org/x", path_in_repo="1b-std/g__m",
        subfolders={"adapter": adapter},
    )  # fmt: skip
    assert sorted(rec["files"]) == [
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "config.json",
    ]
    assert rec["files"]["adapter/adapter_model.safetensors"]["bytes"] == 7
    with pytest.raises(Exception, match="not found"):
        upload_cell(
            cell, tmp_path / "r2.json", repo="org/x", path_in_repo="p",
            subfolders={"adapter": tmp_path / "missing"},
        )  # fmt: skip


def test_cli_registers_adapter_merge_and_adapter_cell():
    p = build_parser()
    a = p.parse_args(
        ["adapter-merge", "--adapter", "a=/x", "--out", "/o", "--combination-type", "ties",
         "--density", "0.2", "--no-svd-full-matrices"]
    )  # fmt: skip
    assert a.combination_type == "ties" and a.density == 0.2 and a.svd_full_matrices is False
    a = p.parse_args(
        ["adapter-cell", "--baked", "b", "--base", "t", "--adapter", "a", "--out", "o"]
    )
    assert a.func.__name__ == "cmd_adapter_cell"
    a = p.parse_args(
        ["upload", "--cell", "c", "--receipt", "r", "--repo", "", "--path-in-repo", "p",
         "--adapter-dir", "ad"]
    )  # fmt: skip
    assert str(a.adapter_dir) == "ad"


def test_readme_lists_the_adapter_space_methods():
    assert adapter_markdown_table() in (ROOT / "README.md").read_text()
