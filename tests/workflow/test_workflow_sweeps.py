"""Sweep axes, per-block suites and exclusions in Snakemake: a small grid (1b-std; linear
scored on a block's own suite, ties swept over density) is built once; then the exact set
of jobs a dry run schedules is checked for each edit (Snakemake 9 checksums small inputs,
so the plans are read from the dry run's job list; see DESIGN.md)."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
from _workflow import demo_config, planned_jobs, snakemake, write_config

pytestmark = pytest.mark.workflow

B = "1b-std"


def sweep_config(densities=(0.3, 0.5), exclude=("1b-open/*",)) -> dict:
    cfg = demo_config()
    cfg["methods"]["ties"]["sweep"] = {"density": list(densities)}
    cfg["grid"] = [
        {
            "sizes": ["1b"],
            "variants": ["std", "open"],
            "groups": ["eng-nob"],
            "methods": ["linear"],
            "exclude": list(exclude),
            "eval": {"tasks": [{"name": "demo_eng"}]},
        },
        {"sizes": ["1b"], "variants": ["std"], "groups": ["eng-nob"], "methods": ["ties"]},
    ]
    return cfg


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    wd = tmp_path_factory.mktemp("sweeps")
    config = write_config(wd / "config.yaml", sweep_config())
    snakemake(wd, "--cores", "2", config=config)
    assert planned_jobs(wd, config) == set()
    return wd


def test_the_sweep_is_built_and_unscored_tasks_stay_empty(built):
    for d in (0.3, 0.5):
        assert (built / f"results/merged/{B}/eng-nob__ties.density-{d}/config.json").is_file()
    with open(built / "results/report/merge_eval_pivot.csv") as fh:
        rows = {r["name"]: r for r in csv.DictReader(fh)}
    nob = [c for c in next(iter(rows.values())) if c.startswith("demo_nob")][0]
    assert rows["eng-nob__linear"][nob] == ""  # its block scores demo_eng only
    assert not math.isnan(float(rows["eng-nob__ties.density-0.3"][nob]))
    assert not math.isnan(float(rows["nob"][nob]))  # baselines: the union of the tasks
    assert (built / "results/report/sweep_curves.png").is_file()
    assert "sweep_curves.png" in (built / "results/report/merge_eval_report.md").read_text()


REPORT = {
    ("report", "results/report/merge_eval_pivot.csv"),
    ("hub_readme", "results/uploaded/README.json"),
    ("payload", "results/payloads/report_rows.json"),
    ("payload", "results/payloads/hub_readme_rows.json"),
}


def test_adding_a_sweep_value_schedules_only_its_cell_and_the_report(built):
    config = write_config(built / "more.yaml", sweep_config(densities=(0.3, 0.5, 0.7)))
    cell = "eng-nob__ties.density-0.7"
    assert planned_jobs(built, config) == REPORT | {
        ("merge", f"results/merged/{B}/{cell}"),
        ("eval_cell", f"results/eval/{B}/{cell}.json"),
        ("upload", f"results/uploaded/{B}/{cell}.json"),
        ("payload", f"results/payloads/cards/{B}/{cell}.json"),
    }


def test_excluding_a_cell_schedules_only_the_report(built):
    cfg = sweep_config()
    cfg["grid"][1]["exclude"] = ["*/eng-nob__ties.density-0.5"]
    config = write_config(built / "fewer.yaml", cfg)
    assert planned_jobs(built, config) == REPORT
