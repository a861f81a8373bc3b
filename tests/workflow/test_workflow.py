"""The main job end to end: the 16-cell demo grid (14 weight-space, 2 adapter-space) built
by `snakemake --cores 2`, and the exact set of jobs each kind of change schedules afterwards
(staleness)."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import pytest
from _workflow import demo_config, planned_jobs, snakemake, write_config
from safetensors import safe_open

pytestmark = pytest.mark.workflow

CELLS = sorted(
    [
        (f"{s}-{v}", f"eng-nob__{m}")
        for s in ("1b", "4b")
        for v in ("std", "open")
        for m in ("linear", "task_arithmetic", "ties")
    ]
    + [(f"12b-{v}", "eng-nob__ties") for v in ("std", "open")]
    + [(f"1b-{v}", "eng-nob__ties-adapter") for v in ("std", "open")]  # adapter space
)
ADAPTER_CELLS = [c for c in CELLS if c[1].endswith("__ties-adapter")]


@pytest.fixture
def copy_of(demo, tmp_path) -> Path:
    """A copy of the finished demo run (outputs, timestamps and .snakemake metadata)."""
    wd = tmp_path / "wd"
    shutil.copytree(demo, wd, symlinks=True)
    return wd


def test_demo_builds_16_verified_cells(demo):
    merged = sorted((p.parent.name, p.name) for p in (demo / "results/merged").glob("*/*"))
    assert merged == CELLS
    for base, cell in CELLS:
        d = demo / "results/merged" / base / cell
        prov = json.loads((d / "provenance.json").read_text())
        if (base, cell) in ADAPTER_CELLS:
            assert prov["step"] == "adapter-cell" and prov["params"]["space"] == "adapter"
            assert prov["params"]["combination_type"] == "ties"
            assert prov["params"]["adapter_merge"]["density"] == 0.5
            receipt = json.loads((demo / "results/uploaded" / base / f"{cell}.json").read_text())
            assert {"adapter/adapter_config.json", "adapter/adapter_model.safetensors"} <= set(
                receipt["files"]
            )
            assert set(receipt["files"]) >= {"config.json", "model.safetensors"}
            continue
        assert prov["step"] == "merge"
        assert prov["params"]["recipe"]["merge_method"] == cell.split("__")[1]
        assert prov["params"]["recipe"]["base_model"] == str(
            (demo / "results/text" / base / "_base").resolve()
        )
        assert (d / "recipe.yaml").is_file()
        cfg = json.loads((d / "config.json").read_text())
        assert cfg["architectures"] == ["Gemma3ForCausalLM"]
        with safe_open(str(next(d.glob("*.safetensors"))), "pt") as f:
            keys = set(f.keys())
        assert "model.embed_tokens.weight" in keys
        assert all(k.startswith(("model.", "lm_head.")) for k in keys)
        receipt = json.loads((demo / "results/uploaded" / base / f"{cell}.json").read_text())
        assert receipt["dry_run"] is True and receipt["path_in_repo"] == f"{base}/{cell}"
        assert set(receipt["files"]) >= {"config.json", "recipe.yaml", "provenance.json"}


def test_demo_report_shows_each_adapter_teaching_its_skill(demo):
    with open(demo / "results/report/merge_eval_pivot.csv") as fh:
        rows = list(csv.DictReader(fh))
    by = {(r["size"] + "-" + r["variant"], r["name"]): r for r in rows}
    assert {n for _, n in by} >= {"_base", "eng", "nob", "eng-nob__ties"}
    assert len([r for r in rows if r["kind"] == "merge"]) == 16
    assert {b for b, n in by if n == "eng-nob__ties-adapter"} == {"1b-std", "1b-open"}
    for base in {b for b, _ in CELLS}:
        for skill in ("eng", "nob"):
            col = f"demo_{skill}/acc"
            gain = float(by[(base, skill)][col]) - float(by[(base, "_base")][col])
            assert gain >= 0.10, f"{base}: {skill} adapter gains only {gain:.2f} on {col}"
    md = (demo / "results/report/merge_eval_report.md").read_text()
    assert "ties" in md and "linear" in md
    assert (demo / "results/report/merge_eval_scores.png").stat().st_size > 0
    # Intervals, retention and the heatmap (issue 13).
    assert re.search(r"\| [01]\.\d{3} ± 0\.\d{3} \|", md)
    assert re.search(r"\[[+-]\d\.\d{3}, [+-]\d\.\d{3}\]", md)
    assert "| variant | group | metric | oracle | oracle − base (pp) | usable |" in md
    assert "![Scores and Δ per row and metric](merge_eval_scores.png)" in md
    for base in ("1b-std", "4b-open", "12b-std"):
        cell = by[(base, "eng-nob__ties")]
        assert cell["oracle demo_eng/acc"] == "eng" and cell["oracle demo_nob/acc"] == "nob"
        assert float(cell["Δ demo_eng/acc lo"]) <= float(cell["Δ demo_eng/acc"])
        assert float(cell["Δ demo_eng/acc"]) <= float(cell["Δ demo_eng/acc hi"])
    for p in (demo / "results/eval").glob("*/*.json"):
        assert p.with_name(p.stem + ".samples.json.gz").is_file(), p


def test_second_run_schedules_nothing(copy_of):
    assert planned_jobs(copy_of) == set()


def _merge_jobs(cells):
    jobs = set()
    for base, cell in cells:
        jobs |= {
            ("merge", f"results/merged/{base}/{cell}"),
            ("eval_cell", f"results/eval/{base}/{cell}.json"),
            ("upload", f"results/uploaded/{base}/{cell}.json"),
        }
    return jobs


REPORT = {
    ("report", "results/report/merge_eval_pivot.csv"),
    ("hub_readme", "results/uploaded/README.json"),
}  # the repo README lists every cell


def test_changing_ties_density_reschedules_only_ties_cells(copy_of):
    cfg = demo_config()
    cfg["methods"]["ties"]["parameters"]["density"] = 0.7
    jobs = planned_jobs(copy_of, write_config(copy_of / "changed.yaml", cfg))
    ties = [c for c in CELLS if c[1].endswith("__ties")]
    assert jobs == _merge_jobs(ties) | REPORT


def _adapter_cell_jobs(cells):
    jobs = set()
    for base, cell in cells:
        jobs |= {
            ("adapter_merge", f"results/adapters/{base}/{cell}"),
            ("bake_cell", f"results/baked/{base}/{cell}"),
            ("normalise_cell", f"results/merged/{base}/{cell}"),
            ("eval_cell", f"results/eval/{base}/{cell}.json"),
            ("upload", f"results/uploaded/{base}/{cell}.json"),
        }
    return jobs


def test_adding_an_adapter_space_cell_schedules_only_its_chain(copy_of):
    cfg = demo_config()
    cfg["grid"].append(
        {"sizes": ["4b"], "variants": ["std"], "groups": ["eng-nob"], "methods": ["ties-adapter"]}
    )
    jobs = planned_jobs(copy_of, write_config(copy_of / "changed.yaml", cfg))
    cell = ("4b-std", "eng-nob__ties-adapter")
    assert jobs == _adapter_cell_jobs([cell]) | REPORT | {
        ("payload", "results/payloads/cards/4b-std/eng-nob__ties-adapter.json"),
        ("payload", "results/payloads/report_rows.json"),
        ("payload", "results/payloads/hub_readme_rows.json"),
    }


def test_changing_the_adapter_space_density_reschedules_only_its_chain(copy_of):
    cfg = demo_config()
    cfg["methods"]["ties-adapter"]["parameters"]["density"] = 0.7
    jobs = planned_jobs(copy_of, write_config(copy_of / "changed.yaml", cfg))
    assert jobs == _adapter_cell_jobs(ADAPTER_CELLS) | REPORT | {
        ("payload", f"results/payloads/cards/{b}/{c}.json") for b, c in ADAPTER_CELLS
    }


def test_changing_one_linear_weight_reschedules_only_linear_cells(copy_of):
    cfg = demo_config()
    cfg["methods"]["linear"]["parameters"]["weight"]["eng"] = 0.8
    jobs = planned_jobs(copy_of, write_config(copy_of / "changed.yaml", cfg))
    assert jobs == _merge_jobs([c for c in CELLS if c[1].endswith("__linear")]) | REPORT


def test_adding_a_base_schedules_only_its_cells(copy_of):
    cfg = demo_config()
    cfg["bases"]["27b-open"] = {"demo": {"arch": "multimodal", "layers": 2, "seed": 2702}}
    cfg["adapters"]["27b-open"] = {
        "eng": {"demo": {"skill": "eng", "seed": 271}},
        "nob": {"demo": {"skill": "nob", "seed": 272}},
    }
    cfg["grid"].append(
        {"sizes": ["27b"], "variants": ["open"], "groups": ["eng-nob"], "methods": ["ties"]}
    )
    jobs = planned_jobs(copy_of, write_config(copy_of / "changed.yaml", cfg))
    b = "27b-open"
    assert jobs == _merge_jobs([(b, "eng-nob__ties")]) | REPORT | {
        ("payload", f"results/payloads/cards/{b}/eng-nob__ties.json"),
        ("payload", "results/payloads/report_rows.json"),
        ("payload", "results/payloads/hub_readme_rows.json"),
        ("demo_base", f"resources/bases/{b}"),
        ("demo_adapter", f"resources/adapters/{b}/eng"),
        ("demo_adapter", f"resources/adapters/{b}/nob"),
        ("bake", f"results/baked/{b}/eng"),
        ("bake", f"results/baked/{b}/nob"),
        ("normalise_base", f"results/text/{b}/_base"),
        ("normalise_baked", f"results/text/{b}/eng"),
        ("normalise_baked", f"results/text/{b}/nob"),
        ("eval_baseline", f"results/eval/{b}/_base.json"),
        ("eval_baseline", f"results/eval/{b}/eng.json"),
        ("eval_baseline", f"results/eval/{b}/nob.json"),
    }


def test_changing_one_adapters_weights_reschedules_only_its_bakes(copy_of):
    """New weights for a local adapter (a retrained adapter written over the old one): only
    the bake that uses it, and what depends on that bake, run again."""
    from safetensors.torch import load_file, save_file

    local = copy_of / "local" / "nob"
    shutil.copytree(copy_of / "resources/adapters/4b-open/nob", local)
    cfg = demo_config()
    cfg["adapters"]["4b-open"]["nob"] = {"path": str(local)}
    config = write_config(copy_of / "local.yaml", cfg)
    snakemake(copy_of, "--cores", "2", config=config)  # rebuild with the local adapter
    assert planned_jobs(copy_of, config) == set()

    weights = local / "adapter_model.safetensors"
    tensors = load_file(weights)
    name = sorted(k for k in tensors if "lora_B" in k)[0]
    tensors[name] = tensors[name] * 1.5
    save_file(tensors, weights, metadata={"format": "pt"})
    b = "4b-open"
    assert planned_jobs(copy_of, config) == _merge_jobs(
        [c for c in CELLS if c[0] == b]
    ) | REPORT | {
        ("bake", f"results/baked/{b}/nob"),
        ("normalise_baked", f"results/text/{b}/nob"),
        ("eval_baseline", f"results/eval/{b}/nob.json"),
    }
