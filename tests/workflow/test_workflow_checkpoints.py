"""The checkpoint axis in Snakemake: a small grid (1b-std from a local folder; ``eng``
trained once with checkpoints at steps 10, 30 and 60, read from a local path with a
``{checkpoint}`` placeholder; ``nob`` a demo adapter; ``eng-nob: [eng@best, nob]`` merged
linearly) is built once. Then: adding a checkpoint schedules only its bake, normalisation
and eval, the selection and what a pending selection may change (the merge using
``eng@best`` and what follows it); a rescore that keeps the choice reruns no merge; one
that changes it reruns the merge with the newly chosen checkpoint. Dry-run plans are read
from the job list (Snakemake 9 checksums small inputs; see DESIGN.md)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from _workflow import BIN, demo_config, env, planned_jobs, snakemake, write_config

pytestmark = pytest.mark.workflow

B = "1b-std"
CELL = "eng-nob__linear"
MERGED = f"results/merged/{B}/{CELL}"
SELECTION = f"results/selection/{B}/eng.json"


def ck_config(wd: Path, steps=(10, 30)) -> dict:
    cfg = demo_config()
    cfg["bases"] = {B: {"path": str(wd / "base")}}
    cfg["adapters"] = {
        B: {
            "eng": {
                "path": str(wd / "runs/eng/checkpoint-{checkpoint}"),
                "checkpoints": list(steps),
                "select": {"metric": "demo_eng/acc", "mode": "max"},
            },
            "nob": {"demo": {"skill": "nob", "seed": 12}},
        }
    }
    cfg["groups"] = {"eng-nob": ["eng@best", "nob"]}
    cfg["methods"] = {"linear": {"parameters": {"weight": {"eng": 0.5, "nob": 0.5}}}}
    cfg["grid"] = [
        {"sizes": ["1b"], "variants": ["std"], "groups": ["eng-nob"], "methods": ["linear"]}
    ]
    return cfg


def _mergebake(*args: str) -> None:
    subprocess.run([str(BIN / "mergebake"), *args], check=True, env=env(), capture_output=True)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    wd = tmp_path_factory.mktemp("checkpoints")
    _mergebake(
        "demo-base", "--out", str(wd / "base"), "--arch", "text", "--layers", "2", "--seed", "101"
    )
    _mergebake(
        "demo-adapter", "--base", str(wd / "base"), "--out", str(wd / "runs/eng"),
        "--skill", "eng", "--seed", "11", "--checkpoints", "10,30,60", "--threads", "1",
    )  # fmt: skip
    config = write_config(wd / "config.yaml", ck_config(wd))
    snakemake(wd, "--cores", "2", config=config)
    assert planned_jobs(wd, config) == set()
    return wd


def _selection(wd: Path) -> dict:
    return json.loads((wd / SELECTION).read_text())


def _merged_from(wd: Path) -> str:
    """The eng folder the merged cell was made from (its provenance's inputs)."""
    prov = (wd / MERGED / "provenance.json").read_text()
    return next(s for s in ("eng@10", "eng@30", "eng@60") if f"text/{B}/{s}" in prov)


def test_each_checkpoint_is_scored_and_the_best_is_merged(built):
    sel = _selection(built)
    assert sel["metric"] == "demo_eng/acc" and sel["mode"] == "max"
    assert set(sel["scores"]) == {"10", "30"}
    best = max(sel["scores"].values())
    assert sel["choice"] == min(int(s) for s, v in sel["scores"].items() if v == best)
    assert _merged_from(built) == f"eng@{sel['choice']}"
    md = (built / "results/report/merge_eval_report.md").read_text()
    assert "## Checkpoints" in md and f"**{sel['choice']}**" in md
    assert (built / "results/report/checkpoint_curves.png").is_file()


def test_adding_a_checkpoint_schedules_its_jobs_the_selection_and_the_merges_of_best(built):
    config = write_config(built / "more.yaml", ck_config(built, steps=(10, 30, 60)))
    assert planned_jobs(built, config) == {
        ("bake", f"results/baked/{B}/eng@60"),
        ("normalise_baked", f"results/text/{B}/eng@60"),
        ("eval_baseline", f"results/eval/{B}/eng@60.json"),
        ("select_checkpoint", SELECTION),
        # pending selection: Snakemake plans what @best feeds; it reruns only on a new choice
        ("merge", MERGED),
        ("eval_cell", f"results/eval/{B}/{CELL}.json"),
        ("upload", f"results/uploaded/{B}/{CELL}.json"),
        # the card lists eng@60 among the oracle candidates; the report has its row
        ("payload", f"results/payloads/cards/{B}/{CELL}.json"),
        ("payload", "results/payloads/report_rows.json"),
        ("report", "results/report/merge_eval_pivot.csv"),
        ("hub_readme", "results/uploaded/README.json"),
    }


def _rescore(wd: Path, step: int, acc: float) -> None:
    f = wd / f"results/eval/{B}/eng@{step}.json"
    data = json.loads(f.read_text())
    data["results"]["demo_eng"]["acc,none"] = acc
    f.write_text(json.dumps(data))


def _run_until_merged(wd: Path) -> str:
    p = snakemake(wd, "--cores", "1", MERGED, SELECTION)
    return p.stdout + p.stderr


def test_a_rescore_that_keeps_the_choice_reruns_no_merge(built):
    sel = _selection(built)
    other = next(int(s) for s in sel["scores"] if int(s) != sel["choice"])
    stamp = (built / MERGED / "provenance.json").stat().st_mtime_ns
    _rescore(built, other, sel["scores"][str(sel["choice"])] - 0.25)
    log = _run_until_merged(built)
    assert "select_checkpoint" in log  # the selection read the new score ...
    assert _selection(built)["scores"][str(other)] != sel["scores"][str(other)]
    assert _selection(built)["choice"] == sel["choice"]
    assert "rule merge:" not in log  # ... kept its choice, so no merge reran
    assert (built / MERGED / "provenance.json").stat().st_mtime_ns == stamp


def test_a_rescore_that_changes_the_choice_reruns_the_merge_with_it(built):
    sel = _selection(built)
    other = next(int(s) for s in sel["scores"] if int(s) != sel["choice"])
    _rescore(built, other, 1.5)  # above any accuracy
    log = _run_until_merged(built)
    assert _selection(built)["choice"] == other
    assert "rule merge:" in log
    assert _merged_from(built) == f"eng@{other}"
