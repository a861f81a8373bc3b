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
