"""The workflow's domain model (mergebake.workflow), tested directly: no Snakemake run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _workflow import ROOT, demo_config

from mergebake import report, resources
from mergebake.config import BASE_ROW, ConfigError, load_config
from mergebake.workflow import (
    LAYOUT,
    DemoSource,
    HubSource,
    PathSource,
    Plan,
    path,
    source_from_config,
)


def plan(cfg: dict | None = None) -> Plan:
    return Plan(load_config(cfg or demo_config()), ROOT)


def test_sources_are_typed_and_round_trip_to_the_config():
    hub = {"hub": {"repo": "org/x", "revision": "main", "subfolder": "a/b"}}
    assert source_from_config(hub) == HubSource("org/x", "main", "a/b")
    assert source_from_config(hub).to_config() == hub
    assert source_from_config({"hub": {"repo": "o/r", "revision": "v"}}).to_config() == {
        "hub": {"repo": "o/r", "revision": "v"}
    }
    assert source_from_config({"path": "/m"}) == PathSource("/m")
    demo = source_from_config({"demo": {"seed": 1, "arch": "text", "layers": 2}})
    assert isinstance(demo, DemoSource) and demo.kind == "demo"
    assert demo.spec == {"arch": "text", "layers": 2, "seed": 1}
    assert demo.expected_base is None and PathSource("/m").expected_base == "/m"
    with pytest.raises(ConfigError, match="key 'bases.x': expected exactly one of hub, path"):
        source_from_config({"hub": {}, "path": "p"}, "bases.x")


def test_one_base_row_name_everywhere():
    assert BASE_ROW == "_base"
    assert report.BASE_ROW is BASE_ROW
    assert path("text_base", base="1b-std") == "results/text/1b-std/_base"
    assert plan().baseline_rows()[0] == BASE_ROW


def test_demo_plan_names_and_layout():
    p = plan()
    assert len(p.cells) == 16 and len(p.bases) == 6
    assert p.bases_from("demo") == p.bases and p.bases_from("hub") == []
    assert p.adapters == {b: ["eng", "nob"] for b in p.bases}
    assert p.base_dir("4b-std") == "resources/bases/4b-std"
    assert p.merge_models({"base": "1b-std", "group": "eng-nob"}) == [
        "results/text/1b-std/eng",
        "results/text/1b-std/nob",
    ]
    assert p.recipe("ties") == str(ROOT / "recipes" / "ties.yaml")
    assert p.final_outputs()[:5] == [
        "results/report/merge_eval_pivot.csv",
        "results/report/merge_eval_report.md",
        "results/report/merge_eval_report.html",
        "results/report/merge_eval_scores.png",
        "results/report/method_ranking.png",
    ]
    assert p.final_outputs()[-1] == LAYOUT["hub_readme_receipt"] == "results/uploaded/README.json"
    assert len(p.final_outputs()) == 5 + 16 + 1


def test_report_rows_cover_cells_and_baselines_sorted():
    p = plan()
    rows = p.report_rows()
    assert len(rows) == 16 + 6 * 3
    assert rows == sorted(rows, key=lambda r: (r["base"], r["kind"], r["name"]))
    first = rows[0]
    assert first == {
        "base": "12b-open",
        "size": "12b",
        "variant": "open",
        "kind": "adapter",
        "name": "eng",
        "group": None,
        "method": None,
        "eval": "results/eval/12b-open/eng.json",
    }
    merge = [r for r in rows if r["kind"] == "merge"]
    assert {r["eval"] for r in merge} == {f"results/eval/{c.base}/{c.name}.json" for c in p.cells}
    assert json.loads(p.payload("report_rows")) == rows
    cfg = demo_config()
    cfg["eval"]["baselines"] = False
    assert {r["kind"] for r in plan(cfg).report_rows()} == {"merge"}


def test_card_spec_and_baseline_row():
    p = plan()
    wc = {"base": "4b-open", "group": "eng-nob", "method": "ties"}
    spec = p.card_spec(wc)
    assert spec["cell"] == {"size": "4b", "variant": "open", "group": "eng-nob", "method": "ties"}
    assert spec["base"] == {
        "name": "4b-open",
        "source": {"demo": {"arch": "multimodal", "layers": 3, "seed": 402}},
        "dir": None,
    }
    assert [a["name"] for a in spec["adapters"]] == ["eng", "nob"]
    assert spec["baseline"] == {"name": "_base", "eval": "results/eval/4b-open/_base.json"}
    assert json.loads(p.payload("cards/4b-open/eng-nob__ties")) == spec
    assert p.card_payload(wc) == "results/payloads/cards/4b-open/eng-nob__ties.json"
    evals = [f"results/eval/4b-open/{n}" for n in ("_base", "eng", "nob")]
    assert p.baseline_eval(wc) == [f"{e}.json" for e in evals] + [
        f"{e}.samples.json.gz" for e in ["results/eval/4b-open/eng-nob__ties", *evals]
    ]
    assert spec["uncertainty"]["adapters"] == {
        "eng": "results/eval/4b-open/eng.json",
        "nob": "results/eval/4b-open/nob.json",
    }
    cfg = demo_config()
    cfg["report"]["baseline"] = "nob"
    assert plan(cfg).baseline_row("1b-std") == "nob"
    cfg["eval"]["baselines"] = False
    assert plan(cfg).baseline_eval(wc) == []
    with pytest.raises(KeyError, match="no payload"):
        p.payload("nothing")


def test_hub_sources_pins_meta_and_card_dirs():
    cfg = demo_config()
    cfg["bases"]["1b-std"] = {"hub": {"repo": "org/base", "revision": "main"}}
    cfg["bases"]["1b-open"] = {"hub": {"repo": "org/base", "revision": "a" * 40}}
    cfg["adapters"]["1b-std"]["eng"] = {"hub": {"repo": "org/ad", "revision": "main"}}
    p = plan(cfg)
    assert p.pins == {
        "org--base@main": ("org/base", "main", "bases.1b-std.hub"),
        "org--ad@main": ("org/ad", "main", "adapters.1b-std.eng.hub"),
    }
    assert p.pin_file(p.base_sources["1b-open"]) is None
    assert p.expected_base("1b-std") == "org/base" and p.expected_base("4b-std") is None
    assert p.hub_meta()["base_models"] == ["org/base"]
    wc = {"base": "1b-std", "group": "eng-nob", "method": "linear"}
    assert p.hub_source_dirs(wc) == ["resources/bases/1b-std", "resources/adapters/1b-std/eng"]
    rows = p.hub_readme_rows()
    assert len(rows) == 16 and rows[0]["receipt"].startswith("results/uploaded/")


def test_local_sources_list_their_files(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    for name in ("model.safetensors", "config.json", "notes.txt"):
        (base / name).write_text("x")
    cfg = demo_config()
    cfg["bases"]["1b-std"] = {"path": str(base)}
    p = plan(cfg)
    inputs = p.bake_inputs({"base": "1b-std", "adapter": "eng"})
    assert inputs["base"] == str(base)
    assert inputs["adapter"] == "resources/adapters/1b-std/eng"
    assert inputs["files"] == [str(base / "config.json"), str(base / "model.safetensors")]
    assert p.base_inputs({"base": "1b-std"})["files"] == inputs["files"]
    assert p.base_inputs({"base": "1b-open"}) == {"base": "resources/bases/1b-open", "files": []}


def test_job_resources_follow_the_resource_model(tmp_path):
    p = plan()
    demo = resources.estimate("12b", {"demo": {}})
    wc = {"base": "12b-std", "group": "eng-nob", "method": "ties"}
    assert p.job_resources("merge", wc) == resources.job_resources(
        "merge", demo, factor=resources.method_factor("ties")
    )
    assert p.job_resources("bake", {"base": "1b-std", "adapter": "eng"}) == (
        resources.job_resources("bake", resources.estimate("1b", {"demo": {}}), model="bake_stream")
    )
    assert p.job_resources("report", {}) == resources.job_resources("report", None)
    assert (
        p.job_resources("merge", wc, attempt=2)["mem_mb"] > p.job_resources("merge", wc)["mem_mb"]
    )
    over = p.job_resources("merge", wc, overrides={"mem_per_gb": 4096})
    assert over == resources.job_resources(
        "merge", demo, factor=1.5, overrides={"mem_per_gb": 4096}
    )
    cfg = demo_config() | {"device": "cuda"}
    assert plan(cfg).gpu("merge") == 1 and plan(cfg).gpu("bake") == 0 and p.gpu("merge") == 0


def test_disk_needed_counts_only_missing_outputs(tmp_path):
    p = plan()
    each = resources.estimate("1b", {"demo": {}}).total
    per_base = 1 + 1 + 2 * 2  # fetched/generated base, normalised base, baked+text per adapter
    cells = len(p.cells) + 2  # an adapter-space cell also writes its bake (2 such cells)
    assert p.disk_needed(tmp_path) == each * (per_base * 6 + cells)
    (tmp_path / "results/merged/1b-std/eng-nob__ties").mkdir(parents=True)
    (tmp_path / "results/text/1b-std/_base").mkdir(parents=True)
    assert p.disk_needed(tmp_path) == each * (per_base * 6 + cells - 2)


def test_jobs_of_the_demo_grid():
    jobs = list(plan().jobs())
    counts: dict[str, int] = {}
    for rule, _ in jobs:
        counts[rule] = counts.get(rule, 0) + 1
    assert counts == {
        "demo_tasks": 1,
        "demo_base": 6,
        "demo_adapter": 12,
        "bake": 12,
        "normalise_baked": 12,
        "normalise_base": 6,
        "eval_baseline": 18,
        "merge": 14,
        "adapter_merge": 2,  # eng-nob__ties-adapter at 1b-std and 1b-open
        "bake_cell": 2,
        "normalise_cell": 2,
        "eval_cell": 16,
        "upload": 16,
        "report": 1,
        "hub_readme": 1,
        "payload": 4 + 16,
    }


def test_eval_inputs_list_the_task_files_the_tasks_read(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tasks = Path("mytasks")
    tasks.mkdir()
    (tasks / "a.yaml").write_text(
        "task: task_a\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: data/a.jsonl\n"
    )
    (tasks / "b.yaml").write_text("task: task_b\ndataset_path: json\n")
    Path("data").mkdir()
    Path("data/a.jsonl").write_text("{}\n")
    cfg = demo_config()
    cfg["eval"].update(demo_tasks=False, include_path="mytasks", tasks=[{"name": "task_a"}])
    p = plan(cfg)
    wc = {"base": "1b-std", "group": "eng-nob", "method": "ties"}
    assert p.task_inputs(wc) == [
        "results/payloads/eval_tasks.json",
        "data/a.jsonl",
        "mytasks/a.yaml",
    ]
    assert p.include_path() == "mytasks"
    assert plan().task_inputs(wc) == ["results/payloads/eval_tasks.json", "resources/demo/tasks"]
