"""The offline Gemma-4 demo (examples/demo-gemma4.yaml) runs end to end: a 12B-style base
and an E-series base (per-layer embeddings, kv-shared layers, audio tower) are generated,
two adapters trained on each, baked, normalised to Gemma4ForCausalLM, merged, verified and
scored; each single-adapter row beats its base by at least 10 points on its own skill."""

from __future__ import annotations

import csv
import json

import yaml
from _workflow import ROOT, snakemake, write_config

SKILL_TASK = {"eng": "demo_eng", "nob": "demo_nob"}


def test_gemma4_demo_runs_and_its_adapters_teach_their_skill(tmp_path):
    cfg = yaml.safe_load((ROOT / "examples" / "demo-gemma4.yaml").read_text())
    write_config(tmp_path / "config.yaml", cfg)
    snakemake(tmp_path, "--cores", "2")

    with open(tmp_path / "results/report/merge_eval_pivot.csv") as fh:
        rows = list(csv.DictReader(fh))
    col = {t: next(c for c in rows[0] if c.startswith(f"{t}/acc")) for t in SKILL_TASK.values()}
    score = {(r["size"] + "-" + r["variant"], r["name"]): r for r in rows}
    for base in cfg["bases"]:
        for adapter, task in SKILL_TASK.items():
            gain = float(score[(base, adapter)][col[task]]) - float(
                score[(base, "_base")][col[task]]
            )
            assert gain >= 0.10, (base, adapter, gain)
        for method in cfg["methods"]:
            assert (base, f"eng-nob__{method}") in score
    # the E-series base carries the redundant k/v of its kv-shared layers; normalisation
    # left them out of the text model and said so
    prov = json.loads((tmp_path / "results/text/e4b-std/_base/provenance.json").read_text())
    assert prov["params"]["ignored"] > 0
    merged = json.loads((tmp_path / "results/merged/e4b-std/eng-nob__ties/config.json").read_text())
    assert merged["architectures"] == ["Gemma4ForCausalLM"]
