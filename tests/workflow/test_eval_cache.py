"""Early cutoff (issue 14): an eval of byte-identical weights is restored from the eval
cache, not recomputed: after a merge reruns for a comment edited in its recipe, and after
``rm -rf results``. A grid of one cell and its three baselines, on a copy of the workflow
(its recipe is edited), starting from the demo run's base and adapters."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
from _workflow import ROOT, demo_config, env, snakemake, write_config

pytestmark = pytest.mark.workflow

BASE, CELL = "1b-std", "eng-nob__linear"
ROWS = {
    f"results/eval/{BASE}/{CELL}.json": f"logs/eval_cell/{BASE}/{CELL}.log",
    **{
        f"results/eval/{BASE}/{row}.json": f"logs/eval_baseline/{BASE}/{row}.log"
        for row in ("_base", "eng", "nob")
    },
}
WEIGHTS = f"results/merged/{BASE}/{CELL}/model.safetensors"
WORKFLOW = ("Snakefile", "rules", "recipes", "schemas", "report", "envs", "profiles")


def _config() -> dict:
    cfg = demo_config()
    cfg["bases"] = {BASE: cfg["bases"][BASE]}
    cfg["adapters"] = {BASE: cfg["adapters"][BASE]}
    cfg["grid"] = [
        {"sizes": ["1b"], "variants": ["std"], "groups": ["eng-nob"], "methods": ["linear"]}
    ]
    return cfg


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _samples(eval_json: Path) -> Path:
    return eval_json.with_name(eval_json.stem + ".samples.json.gz")


def _restored(wd: Path, eval_json: str, key: str) -> None:
    """The eval at ``eval_json`` was restored from the cache under ``key``, lm-eval not run:
    the JSON records the hit, the job log says it, and lm-eval logged nothing."""
    data = json.loads((wd / eval_json).read_text())
    assert data["mergebake"]["cache"]["status"] == "hit", eval_json
    assert data["mergebake"]["cache"]["key"] == key
    log = (wd / ROWS[eval_json]).read_text()
    assert re.search(
        rf"restored from the eval cache {key} \(stored \S+ by {re.escape(str(wd / eval_json))}\)",
        log,
    ), log
    assert "lm_eval" not in log and "loglikelihood" not in log, log


def _jobs(out: str) -> set[str]:
    """The rules of the jobs a Snakemake run started (from its output)."""
    return set(re.findall(r"^(?:local)?rule (\w+):$", out, re.M))


def test_evals_of_unchanged_weights_are_restored_not_recomputed(demo, tmp_path):
    wf = tmp_path / "workflow"
    wf.mkdir()
    for name in WORKFLOW:
        src = ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, wf / name)
    wd, cache = tmp_path / "wd", tmp_path / "cache"
    for kind in ("bases", "adapters"):  # the demo's, not generated again
        shutil.copytree(demo / "resources" / kind / BASE, wd / "resources" / kind / BASE)
    config = write_config(wd / "config.yaml", _config())
    environ = env() | {"MERGEBAKE_CACHE": str(cache)}

    def build() -> str:
        p = snakemake(
            wd, "--cores", "2", config=config, environ=environ, snakefile=wf / "Snakefile"
        )
        return p.stdout + p.stderr

    # A first build computes every eval and stores it.
    assert {"eval_cell", "eval_baseline", "bake", "merge"} <= _jobs(build())
    first = {e: json.loads((wd / e).read_text()) for e in ROWS}
    samples = {e: _samples(wd / e).read_bytes() for e in ROWS}
    keys = {e: d["mergebake"]["cache"]["key"] for e, d in first.items()}
    for e, d in first.items():
        assert d["mergebake"]["cache"] == {"status": "miss", "key": keys[e]}
        assert "Running loglikelihood requests" in (wd / ROWS[e]).read_text()
    assert sorted(p.name for p in cache.glob("eval/*/*")) == sorted(keys.values())
    weights = _sha(wd / WEIGHTS)

    # A comment edited in the recipe: the merge reruns, writes the same weights, and its
    # eval is restored; the baselines are not even scheduled.
    recipe = wf / "recipes" / "linear.yaml"
    recipe.write_text("# an edited comment\n" + recipe.read_text())
    ran = _jobs(build())
    assert {"merge", "eval_cell", "report"} <= ran
    assert not ran & {"bake", "normalise_base", "eval_baseline"}
    assert _sha(wd / WEIGHTS) == weights
    cell = f"results/eval/{BASE}/{CELL}.json"
    _restored(wd, cell, keys[cell])
    assert json.loads((wd / cell).read_text())["results"] == first[cell]["results"]
    assert (
        json.loads((wd / f"results/eval/{BASE}/_base.json").read_text())
        == (first[f"results/eval/{BASE}/_base.json"])
    )  # not rewritten

    # rm -rf results: the rebuild restores every eval of the grid.
    shutil.rmtree(wd / "results")
    build()
    for e in ROWS:
        _restored(wd, e, keys[e])
        data = json.loads((wd / e).read_text())
        assert data["results"] == first[e]["results"] and data["n-shot"] == first[e]["n-shot"]
        assert _samples(wd / e).read_bytes() == samples[e]
    assert (wd / "results/report/merge_eval_pivot.csv").is_file()
    assert sorted(p.name for p in cache.glob("eval/*/*")) == sorted(keys.values())  # no new entry
