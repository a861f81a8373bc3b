"""Workflow-level guarantees: no token in any output, provenance in every output folder,
preflight stops bad runs before any job, and --keep-going still builds the good cells."""

from __future__ import annotations

import json
import os

import pytest
from _workflow import FAKE_TOKEN, demo_config, env, snakemake, write_config

pytestmark = pytest.mark.workflow


def test_the_token_is_written_nowhere(demo):
    """The demo ran with HF_TOKEN set to a known fake token: grep every file it wrote."""
    hits = []
    for p in demo.rglob("*"):
        if p.is_file() and FAKE_TOKEN.encode() in p.read_bytes():
            hits.append(str(p.relative_to(demo)))
    assert hits == []


def test_every_output_folder_has_provenance(demo):
    folders = [
        *demo.glob("resources/bases/*"),
        *demo.glob("resources/adapters/*/*"),
        demo / "resources/demo/tasks",
        *demo.glob("results/baked/*/*"),
        *demo.glob("results/text/*/*"),
        *demo.glob("results/merged/*/*"),
        *demo.glob("results/adapters/*/*"),
    ]
    # + the 2 adapter-space cells: their bakes (results/baked), merged adapters, cells
    assert len(folders) == 6 + 12 + 1 + 12 + 2 + 18 + 16 + 2
    for f in folders:
        prov = json.loads((f / "provenance.json").read_text())
        assert {"step", "inputs", "params", "command", "packages", "seed"} <= set(prov), f
        assert prov["packages"]["torch"] and prov["packages"]["mergebake"]
    seeds = {
        json.loads((f / "provenance.json").read_text())["seed"]
        for f in demo.glob("results/merged/*/*")
    }
    assert seeds == {1234}


def small_grid() -> dict:
    cfg = demo_config()
    cfg["grid"] = [
        {"sizes": ["1b"], "variants": ["std", "open"], "groups": ["eng-nob"], "methods": ["linear"]}
    ]
    cfg["eval"]["baselines"] = False
    return cfg


def test_upload_enabled_without_token_stops_before_any_job(tmp_path):
    cfg = small_grid()
    cfg["hub"]["enabled"] = True
    e = {k: v for k, v in env().items() if k != "HF_TOKEN"}
    e["HF_HOME"] = str(tmp_path / "hf-home")  # no cached login either
    p = snakemake(
        tmp_path,
        "--cores",
        "1",
        config=write_config(tmp_path / "c.yaml", cfg),
        check=False,
        environ=e,
    )
    assert p.returncode != 0
    assert "config key 'hub.enabled' is true but no Hugging Face token was found" in (
        p.stdout + p.stderr
    )
    assert not (tmp_path / "resources").exists() and not (tmp_path / "results").exists()


def test_missing_local_adapter_is_named_even_in_a_dry_run(tmp_path):
    cfg = small_grid()
    cfg["adapters"]["1b-open"]["nob"] = {"path": str(tmp_path / "nowhere")}
    p = snakemake(
        tmp_path, "-n", "--cores", "1", config=write_config(tmp_path / "c.yaml", cfg), check=False
    )
    assert p.returncode != 0
    assert f"key 'adapters.1b-open.nob.path': {tmp_path / 'nowhere'} does not exist" in (
        p.stdout + p.stderr
    )


def test_keep_going_builds_the_other_cells(tmp_path):
    """A local adapter with NaN for 1b-open: its bake fails naming the file; with
    --keep-going the 1b-std cell is still merged, scored and receipted."""
    from safetensors.torch import load_file, save_file

    from mergebake.demo import make_base, train_adapter

    make_base(tmp_path / "b", arch="text", num_layers=2, seed=102)
    bad = tmp_path / "bad-eng"
    train_adapter(tmp_path / "b", bad, skill="eng", seed=1, steps=2)
    f = bad / "adapter_model.safetensors"
    t = load_file(f)
    k = sorted(t)[0]
    t[k][0, 0] = float("inf")
    save_file(t, f, metadata={"format": "pt"})
    cfg = small_grid()
    cfg["adapters"]["1b-open"]["eng"] = {"path": str(bad)}
    wd = tmp_path / "wd"
    wd.mkdir()
    p = snakemake(
        wd, "--cores", "2", "--keep-going", config=write_config(wd / "c.yaml", cfg), check=False
    )
    assert p.returncode != 0
    assert (wd / "results/uploaded/1b-std/eng-nob__linear.json").is_file()
    assert (wd / "results/eval/1b-std/eng-nob__linear.json").is_file()
    assert not (wd / "results/merged/1b-open/eng-nob__linear").exists()
    assert not (wd / "results/baked/1b-open/eng").exists()
    assert not list((wd / "results/baked/1b-open").glob(".eng.tmp-*"))
    log = (wd / "logs/bake/1b-open/eng.log").read_text()
    assert f"{f}: NaN/Inf in adapter tensor(s) ['{k}']" in log
    assert os.environ.get("HF_TOKEN") != FAKE_TOKEN  # the fake token never leaks into pytest
