"""examples/demo-sweeps.yaml runs offline end to end: a TIES density sweep sharing its
bakes, a checkpoint axis whose best checkpoint (eng@best) the merges use, a block with its
own task, an exclusion; the report draws the density and checkpoint curves and says which
checkpoint was selected."""

from __future__ import annotations

import csv
import json

import pytest
import yaml
from _workflow import ROOT, planned_jobs, snakemake, write_config

pytestmark = pytest.mark.workflow


def test_the_sweep_demo_builds_its_curves_and_selects_a_checkpoint(tmp_path):
    cfg = yaml.safe_load((ROOT / "examples" / "demo-sweeps.yaml").read_text())
    config = write_config(tmp_path / "config.yaml", cfg)
    snakemake(tmp_path, "--cores", "2", config=config)
    assert planned_jobs(tmp_path, config) == set()

    report = tmp_path / "results/report"
    for png in ("sweep_curves.png", "checkpoint_curves.png"):
        assert (report / png).stat().st_size > 10_000
    md = (report / "merge_eval_report.md").read_text()
    assert "## Sweeps" in md and "## Checkpoints" in md

    with open(report / "merge_eval_pivot.csv") as fh:
        rows = list(csv.DictReader(fh))
    eng = next(c for c in rows[0] if c.startswith("demo_eng/acc"))
    for base in ("1b-std", "4b-std"):
        sel = json.loads((tmp_path / f"results/selection/{base}/eng.json").read_text())
        scores = {int(k): v for k, v in sel["scores"].items()}
        assert sorted(scores) == [1, 2, 60]
        best = max(scores.values())
        # the rule: the highest score, ties to the earliest step
        assert sel["choice"] == min(s for s, v in scores.items() if v == best)
        # the curve is real: one training step is not yet the learnt skill
        assert scores[1] < best
        by_name = {r["name"]: r for r in rows if r["size"] + "-" + r["variant"] == base}
        assert float(by_name[f"eng@{sel['choice']}"][eng]) == best
        swept = sorted(n for n in by_name if n.startswith("eng-nob__ties.density-"))
        assert len(swept) == 5
