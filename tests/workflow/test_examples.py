"""The real-world example configs validate and plan their whole grid without the network."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from _workflow import ROOT, snakemake

from mergebake.config import expand_grid, load_config

EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_validates(path):
    cfg = load_config(path)
    assert len(expand_grid(cfg)) >= 1


def test_gemma3_example_plans_the_14_cell_grid_with_fetch_jobs(tmp_path: Path):
    cfg = ROOT / "examples" / "gemma3-eng-nob.yaml"
    cells = expand_grid(load_config(cfg))
    assert len(cells) == 14
    # HF_HUB_OFFLINE=1 (set by the helper): planning must not need the Hub.
    p = snakemake(tmp_path, "-n", "--cores", "1", config=cfg)
    stats = dict(re.findall(r"^(\w+)\s+(\d+)$", p.stdout, re.M))
    assert {k: int(v) for k, v in stats.items()} == {
        "pin": 7,
        "fetch_base": 6,
        "fetch_adapter": 12,
        "bake": 12,
        "normalise_base": 6,
        "normalise_baked": 12,
        "merge": 14,
        "eval_cell": 14,
        "eval_baseline": 18,
        "report": 1,
        "upload": 14,
        "hub_readme": 1,
        "payload": 4 + 14,  # report rows, README rows and meta, eval tasks; a card per cell
        "all": 1,
        "total": 136,
    }
    assert "mergebake fetch --repo google/gemma-3-12b-it --revision main" in p.stdout


def test_gemma4_e4b_ties3_example_plans_one_adapter_space_cell(tmp_path: Path):
    """Three r=64 LoRA adapters on google/gemma-4-E4B-it merged by PEFT (ties, density 0.2,
    weights 1.0 each), planned without the network; revisions are commit shas (no pins)."""
    cfg = ROOT / "examples" / "gemma4-e4b-ties3.yaml"
    config = load_config(cfg)
    assert [c.path_in_repo for c in expand_grid(config)] == ["e4b-it/three__ties3"]
    p = snakemake(tmp_path, "-n", "--cores", "1", "-p", config=cfg)
    stats = dict(re.findall(r"^(\w+)\s+(\d+)$", p.stdout, re.M))
    assert {k: int(v) for k, v in stats.items()} == {
        "fetch_base": 1,
        "fetch_adapter": 3,
        "bake": 3,  # the single-adapter baselines
        "normalise_base": 1,
        "normalise_baked": 3,
        "adapter_merge": 1,
        "bake_cell": 1,
        "normalise_cell": 1,
        "eval_cell": 1,
        "eval_baseline": 4,
        "report": 1,
        "upload": 1,
        "hub_readme": 1,
        "payload": 4 + 1,
        "all": 1,
        "total": 28,
    }
    assert (
        "mergebake adapter-merge --adapter chat=resources/adapters/e4b-it/chat --adapter "
        "code=resources/adapters/e4b-it/code --adapter math=resources/adapters/e4b-it/math "
        "--combination-type ties --weight chat=1.0 --weight code=1.0 --weight math=1.0 "
        "--density 0.2 --majority-sign-method total --seed 1234 --base resources/bases/e4b-it "
        "--out results/adapters/e4b-it/three__ties3"
    ) in p.stdout
    assert "mergebake pin" not in p.stdout
