"""A 1,000-cell grid: planned by Snakemake, and its report and repo README built from
generated eval JSONs and upload receipts (no checkpoint is built). Before the payload
files, the report's and README's rows went on the command line (186 KiB at 1,000 cells),
past the kernel's 128 KiB limit for one argument."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
from _grid import big_config
from _workflow import ROOT, snakemake, write_config

from mergebake.config import load_config
from mergebake.evaluate import compact_samples, samples_path, write_samples
from mergebake.workflow import Plan

pytestmark = pytest.mark.workflow


def _tiny_checkpoint(folder: Path) -> str:
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    save_file({"model.embed_tokens.weight": torch.zeros(4, 2)}, folder / "model.safetensors")
    (folder / "config.json").write_text('{"architectures": ["Gemma3ForCausalLM"]}\n')
    return str(folder)


def _eval_json(path: Path, value: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "results": {
            "demo_eng": {"alias": "demo_eng", "acc,none": value, "acc_stderr,none": 0.01},
            "demo_nob": {"alias": "demo_nob", "acc,none": 1 - value, "acc_stderr,none": 0.01},
        },
        "higher_is_better": {"demo_eng": {"acc": True}, "demo_nob": {"acc": True}},
        "n-shot": {"demo_eng": 0, "demo_nob": 0},
    }
    path.write_text(json.dumps(data))
    # per-document values (100 documents of 0/1) that average to the scores, as lm-eval
    # logs them: the report's paired bootstrap reads them
    logged = {
        task: [
            {"doc_id": d, "filter": "none", "doc_hash": f"h{d}", "metrics": ["acc"],
             "acc": float(d < round(v * 100))}
            for d in range(100)
        ]
        for task, v in (("demo_eng", value), ("demo_nob", 1 - value))
    }  # fmt: skip
    write_samples(samples_path(path), compact_samples(logged, {}))


def test_1000_cells_plan_and_build_their_report_and_readme(tmp_path):
    base = _tiny_checkpoint(tmp_path / "local-base")
    cfg = big_config(10, 10, 10, base_path=base)
    write_config(tmp_path / "config.yaml", cfg)
    plan = Plan(load_config(cfg), ROOT)
    assert len(plan.cells) == 1000

    p = snakemake(tmp_path, "-n", "--cores", "1")
    stats = {k: int(v) for k, v in re.findall(r"^(\w+)\s+(\d+)$", p.stdout, re.M)}
    assert {k: stats[k] for k in ("merge", "eval_cell", "upload", "report", "hub_readme")} == {
        "merge": 1000,
        "eval_cell": 1000,
        "upload": 1000,
        "report": 1,
        "hub_readme": 1,
    }
    assert stats["eval_baseline"] == 300 and stats["payload"] == 1000 + 4

    rows = plan.report_rows()
    for i, row in enumerate(rows):
        _eval_json(tmp_path / row["eval"], (i % 97) / 100)
    for r in plan.hub_readme_rows():
        receipt = tmp_path / r["receipt"]
        receipt.parent.mkdir(parents=True, exist_ok=True)
        receipt.write_text(
            json.dumps({"repo": None, "path_in_repo": r["path_in_repo"], "dry_run": True})
        )
    targets = ["results/report/merge_eval_pivot.csv", "results/uploaded/README.json"]
    run = snakemake(
        tmp_path, "--cores", "2", "--allowed-rules", "report", "hub_readme", "payload", "--",
        *targets,
    )  # fmt: skip
    ran = set(re.findall(r"^(?:local)?rule (\w+):", run.stdout + run.stderr, re.M))
    assert ran == {"payload", "report", "hub_readme"}

    with open(tmp_path / "results/report/merge_eval_pivot.csv") as fh:
        pivot = list(csv.DictReader(fh))
    merged = {(r["size"] + "-" + r["variant"], r["name"]) for r in pivot if r["kind"] == "merge"}
    assert merged == {(c.base, c.name) for c in plan.cells}
    assert len(pivot) == len(rows) == 1300
    readme = (tmp_path / "results/cards/README.md").read_text()
    assert all(f"[{c.path_in_repo}](" in readme for c in plan.cells)
    receipt = json.loads((tmp_path / "results/uploaded/README.json").read_text())
    assert receipt["dry_run"] is True
