"""report: pivot CSV, Δ values, baseline choice, method ranking, pending rows, determinism."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from mergebake import MergebakeError
from mergebake.evaluate import compact_samples, samples_path, write_samples
from mergebake.report import build_report

N_DOCS = 20


def per_doc(value: float, n: int = N_DOCS) -> list[float]:
    """Per-document values averaging ``value``: 0/1 for a fraction on the n-document grid,
    else ``value`` on every document."""
    k = round(value * n)
    if 0 <= value <= 1 and abs(k / n - value) < 1e-12:
        return [1.0] * k + [0.0] * (n - k)
    return [value] * n


def write_samples_for(path: Path, scores: dict[str, dict[str, float]]) -> None:
    """The per-document samples file of an eval JSON, in lm-eval's log_samples shape."""
    logged = {}
    for task, metrics in scores.items():
        entries = []
        for d in range(N_DOCS):
            by_filter: dict[str, dict] = {}
            for key, value in metrics.items():
                metric, _, filt = key.partition(",")
                e = by_filter.setdefault(
                    filt, {"doc_id": d, "filter": filt, "doc_hash": f"h{d}", "metrics": []}
                )
                e["metrics"].append(metric)
                e[metric] = per_doc(value)[d]
            entries.extend(by_filter.values())
        logged[task] = entries
    write_samples(samples_path(path), compact_samples(logged, {}))


def write_eval(
    path: Path,
    scores: dict[str, dict[str, float]],
    *,
    higher_is_better: dict[str, dict[str, bool]] | None = None,
    group_subtasks: dict[str, list[str]] | None = None,
) -> Path:
    """An eval JSON in lm-eval's structure: scores plus alias and stderr entries."""
    results = {}
    for task, metrics in scores.items():
        entry: dict = {"alias": task}
        for key, value in metrics.items():
            metric, _, filt = key.partition(",")
            entry[key] = value
            entry[f"{metric}_stderr,{filt}"] = 0.01
        results[task] = entry
    data = {
        "results": results,
        "group_subtasks": group_subtasks or {t: [] for t in scores},
        "n-shot": {t: 0 for t in scores},
        "versions": {t: 1.0 for t in scores},
        "configs": {t: {"task": t} for t in scores},
        "higher_is_better": higher_is_better
        or {t: {k.partition(",")[0]: True for k in m} for t, m in scores.items()},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    write_samples_for(path, scores)
    return path


def row(tmp: Path, base: str, kind: str, name: str, scores=None, **kw) -> dict:
    size, variant = base.split("-")
    group, _, method = name.partition("__") if kind == "merge" else (None, "", None)
    path = tmp / "eval" / base / f"{name}.json"
    if scores is not None:
        write_eval(path, scores, **kw)
    return {
        "base": base,
        "size": size,
        "variant": variant,
        "kind": kind,
        "name": name,
        "group": group,
        "method": method,
        "eval": path,
    }


def s(eng: float, nob: float) -> dict:
    return {
        "demo_eng": {"acc,none": eng, "acc_norm,none": 0.5},
        "demo_nob": {"acc,none": nob, "acc_norm,none": 0.5},
    }


@pytest.fixture
def grid(tmp_path):
    """1b-std, 1b-open, 4b-std: base, two adapters, merges; 4b-std's base not evaluated."""
    rows = [
        row(tmp_path, "1b-std", "base", "_base", s(0.50, 0.40)),
        row(tmp_path, "1b-std", "adapter", "eng", s(0.80, 0.40)),
        row(tmp_path, "1b-std", "adapter", "nob", s(0.50, 0.70)),
        row(tmp_path, "1b-std", "merge", "eng-nob__linear", s(0.70, 0.60)),
        row(tmp_path, "1b-std", "merge", "eng-nob__ties", s(0.75, 0.65)),
        row(tmp_path, "1b-open", "merge", "eng-nob__ties", s(0.60, 0.50)),
        row(tmp_path, "1b-open", "merge", "eng-nob__linear", s(0.65, 0.45)),
        row(tmp_path, "1b-open", "base", "_base", s(0.45, 0.45)),
        row(tmp_path, "4b-std", "base", "_base", None),  # eval pending
        row(tmp_path, "4b-std", "merge", "eng-nob__ties", s(0.9, 0.9)),
    ]
    return rows


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def by_name(records, base, name):
    size, variant = base.split("-")
    (rec,) = [r for r in records if (r["size"], r["variant"], r["name"]) == (size, variant, name)]
    return rec


def test_csv_columns_and_deltas_vs_base(grid, tmp_path):
    out = tmp_path / "report"
    result = build_report(grid, out)
    header = (out / "merge_eval_pivot.csv").read_text(encoding="utf-8").splitlines()[0]
    # The columns before intervals and retention were added, in their old order ...
    assert header.split(",")[:9] == [
        "size",
        "variant",
        "kind",
        "name",
        "demo_eng/acc",
        "demo_nob/acc",
        "Δ demo_eng/acc",
        "Δ demo_nob/acc",
        "mean Δ",
    ]
    # ... then the interval bounds and the retention columns.
    assert header.split(",")[9:] == [
        "demo_eng/acc lo",
        "demo_eng/acc hi",
        "demo_nob/acc lo",
        "demo_nob/acc hi",
        "Δ demo_eng/acc lo",
        "Δ demo_eng/acc hi",
        "Δ demo_nob/acc lo",
        "Δ demo_nob/acc hi",
        "mean Δ lo",
        "mean Δ hi",
        "oracle demo_eng/acc",
        "oracle − base (pp) demo_eng/acc",
        "usable demo_eng/acc",
        "retained demo_eng/acc",
        "oracle demo_nob/acc",
        "oracle − base (pp) demo_nob/acc",
        "usable demo_nob/acc",
        "retained demo_nob/acc",
        "mean retained",
    ]
    assert result["metrics"] == ["demo_eng/acc", "demo_nob/acc"]
    recs = read_csv(out / "merge_eval_pivot.csv")
    # Rows: size naturally ordered, then variant, then base < adapter < merge, then name.
    assert [(r["size"], r["variant"], r["name"]) for r in recs] == [
        ("1b", "open", "_base"),
        ("1b", "open", "eng-nob__linear"),
        ("1b", "open", "eng-nob__ties"),
        ("1b", "std", "_base"),
        ("1b", "std", "eng"),
        ("1b", "std", "nob"),
        ("1b", "std", "eng-nob__linear"),
        ("1b", "std", "eng-nob__ties"),
        ("4b", "std", "_base"),
        ("4b", "std", "eng-nob__ties"),
    ]
    lin = by_name(recs, "1b-std", "eng-nob__linear")
    assert float(lin["demo_eng/acc"]) == 0.70
    assert float(lin["Δ demo_eng/acc"]) == pytest.approx(0.20, abs=1e-12)
    assert float(lin["Δ demo_nob/acc"]) == pytest.approx(0.20, abs=1e-12)
    assert float(lin["mean Δ"]) == pytest.approx(0.20, abs=1e-12)
    ties_open = by_name(recs, "1b-open", "eng-nob__ties")
    assert float(ties_open["Δ demo_eng/acc"]) == pytest.approx(0.15, abs=1e-12)
    assert float(ties_open["Δ demo_nob/acc"]) == pytest.approx(0.05, abs=1e-12)
    assert float(ties_open["mean Δ"]) == pytest.approx(0.10, abs=1e-12)
    base = by_name(recs, "1b-std", "_base")
    assert float(base["Δ demo_eng/acc"]) == 0.0 and float(base["mean Δ"]) == 0.0
    eng = by_name(recs, "1b-std", "eng")
    assert float(eng["mean Δ"]) == pytest.approx(0.15, abs=1e-12)


def test_ranking_order_and_values(grid, tmp_path):
    result = build_report(grid, tmp_path / "report")
    r1b = result["ranking"]["1b"]
    # ties: 1b-std (0.25+0.25)/2 = 0.25, 1b-open 0.10 -> 0.175
    # linear: 1b-std 0.20, 1b-open (0.20+0.00)/2 = 0.10 -> 0.15
    assert [e["method"] for e in r1b] == ["ties", "linear"]
    assert r1b[0]["mean_delta"] == pytest.approx(0.175, abs=1e-12)
    assert r1b[1]["mean_delta"] == pytest.approx(0.15, abs=1e-12)
    assert [e["rank"] for e in r1b] == [1, 2]
    assert [e["cells"] for e in r1b] == [2, 2]
    assert r1b[0]["variants"] == ["open", "std"]
    # 4b: the only ties cell has no evaluated baseline.
    assert result["ranking"]["4b"] == [
        {
            "method": "ties",
            "mean_delta": None,
            "lo": None,
            "hi": None,
            "mean_retained": None,
            "rank": None,
            "standing": None,
            "cells": 0,
            "pending": 1,
            "variants": [],
        }
    ]


def test_pending_baseline_rows(grid, tmp_path):
    out = tmp_path / "report"
    result = build_report(grid, out)
    assert result["pending"] == [
        {"base": "4b-std", "name": "_base", "status": "pending eval"},
        {"base": "4b-std", "name": "eng-nob__ties", "status": "pending baseline"},
    ]
    rec = by_name(read_csv(out / "merge_eval_pivot.csv"), "4b-std", "eng-nob__ties")
    assert rec["demo_eng/acc"] == "0.9"
    assert rec["Δ demo_eng/acc"] == "" and rec["mean Δ"] == ""
    md = (out / "merge_eval_report.md").read_text(encoding="utf-8")
    assert "4b-std `eng-nob__ties`: pending baseline" in md
    assert "| 4b | – | ties | pending | – | – | 0 | – |" in md


def test_missing_baseline_row(grid, tmp_path):
    rows = [r for r in grid if not (r["base"] == "1b-open" and r["name"] == "_base")]
    result = build_report(rows, tmp_path / "report")
    statuses = {(p["base"], p["name"]): p["status"] for p in result["pending"]}
    assert statuses[("1b-open", "eng-nob__ties")] == "pending baseline"
    assert statuses[("1b-open", "eng-nob__linear")] == "pending baseline"
    # Only 1b-std cells count now.
    r1b = {e["method"]: e["mean_delta"] for e in result["ranking"]["1b"]}
    assert r1b["ties"] == pytest.approx(0.25, abs=1e-12)
    assert r1b["linear"] == pytest.approx(0.20, abs=1e-12)


def test_adapter_baseline(grid, tmp_path):
    out = tmp_path / "report"
    result = build_report(grid, out, baseline="eng")
    recs = read_csv(out / "merge_eval_pivot.csv")
    ties = by_name(recs, "1b-std", "eng-nob__ties")
    assert float(ties["Δ demo_eng/acc"]) == pytest.approx(-0.05, abs=1e-12)
    assert float(ties["Δ demo_nob/acc"]) == pytest.approx(0.25, abs=1e-12)
    assert float(ties["mean Δ"]) == pytest.approx(0.10, abs=1e-12)
    base = by_name(recs, "1b-std", "_base")
    assert float(base["Δ demo_eng/acc"]) == pytest.approx(-0.30, abs=1e-12)
    # 1b-open has no eng adapter row: its cells wait for that baseline.
    assert by_name(recs, "1b-open", "eng-nob__ties")["mean Δ"] == ""
    r1b = result["ranking"]["1b"]
    assert [(e["method"], e["cells"]) for e in r1b] == [("ties", 1), ("linear", 1)]
    assert r1b[0]["mean_delta"] == pytest.approx(0.10, abs=1e-12)
    assert r1b[1]["mean_delta"] == pytest.approx(0.05, abs=1e-12)
    md = (out / "merge_eval_report.md").read_text(encoding="utf-8")
    assert "single-adapter `eng` row" in md
    assert "| std | adapter | **eng** |" in md


def test_chosen_metrics_and_lower_is_better(tmp_path):
    hib = {"t": {"acc": True, "ppl": False}}
    rows = [
        row(
            tmp_path,
            "1b-std",
            "base",
            "_base",
            {"t": {"acc,none": 0.5, "ppl,none": 10.0}},
            higher_is_better=hib,
        ),
        row(
            tmp_path,
            "1b-std",
            "merge",
            "g__ties",
            {"t": {"acc,none": 0.6, "ppl,none": 8.0}},
            higher_is_better=hib,
        ),
    ]
    out = tmp_path / "report"
    result = build_report(rows, out, metrics=["t/acc", "t/ppl,none"])
    assert result["metrics"] == ["t/acc", "t/ppl"]
    rec = by_name(read_csv(out / "merge_eval_pivot.csv"), "1b-std", "g__ties")
    assert float(rec["Δ t/ppl"]) == pytest.approx(-2.0)
    # mean Δ counts the perplexity drop as a gain: (0.1 + 2.0) / 2
    assert float(rec["mean Δ"]) == pytest.approx(1.05)
    with pytest.raises(MergebakeError, match="task/metric"):
        build_report(rows, out, metrics=["acc"])


def test_default_metric_without_acc_and_group_subtasks(tmp_path):
    scores = {
        "grp": {"f1,none": 0.3},
        "grp_a": {"f1,none": 0.2},
        "grp_b": {"f1,none": 0.4},
        "solo": {"exact_match,strict-match": 0.1, "exact_match,flexible": 0.2},
    }
    sub = {"grp": ["grp_a", "grp_b"], "solo": []}
    rows = [row(tmp_path, "1b-std", "base", "_base", scores, group_subtasks=sub)]
    result = build_report(rows, tmp_path / "report")
    # Subtasks of a scored group are folded into it; first sorted key when there is no acc.
    assert result["metrics"] == ["grp/f1", "solo/exact_match,flexible"]


def test_deterministic_outputs(grid, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    build_report(grid, a)
    build_report(list(reversed(grid)), b)
    for name in (
        "merge_eval_pivot.csv",
        "merge_eval_report.md",
        "merge_eval_report.html",
        "merge_eval_scores.png",
        "method_ranking.png",
    ):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "merge_eval_scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in a.iterdir()) == sorted(
        [
            "merge_eval_pivot.csv",
            "merge_eval_report.html",
            "merge_eval_report.md",
            "merge_eval_scores.png",
            "method_ranking.png",
        ]
    )


def test_markdown_signs_and_sections(grid, tmp_path):
    out = tmp_path / "report"
    build_report(grid, out)
    md = (out / "merge_eval_report.md").read_text(encoding="utf-8")
    assert md.index("## Method ranking") < md.index("## 1b") < md.index("## 4b")
    assert "## Baseline rows" in md
    # Intervals are the seeded bootstrap's (checked against stats in test_delta_intervals).
    assert "| 1b | 1 | ties | +0.175 [+0.088, +0.275] | leader | 83% | 2 | open, std |" in md
    assert (
        "| 1b | 2 | linear | +0.150 [+0.063, +0.250] | within noise | 67% | 2 | open, std |" in md
    )
    assert "- 1b: `ties` has the highest mean Δ, +0.175 (95% CI +0.088 to +0.275), but both " in md
    assert (
        "| std | merge | eng-nob__linear | 0.700 ± 0.200 | 0.600 ± 0.200 | "
        "+0.200 [+0.050, +0.400] | +0.200 [+0.050, +0.400] | +0.200 [+0.075, +0.325] |  |"
    ) in md
    assert (
        "| std | base | **_base** | 0.500 ± 0.201 | 0.400 ± 0.200 | +0.000 [+0.000, +0.000] | "
        "+0.000 [+0.000, +0.000] | +0.000 [+0.000, +0.000] | baseline |"
    ) in md
    assert "| std | eng-nob__linear | 67% | 67% | 67% |" in md
    assert "| std | eng-nob | demo_eng/acc | `eng` | +30.0 | yes |" in md
    assert "![Scores and Δ per row and metric](merge_eval_scores.png)" in md


def test_bad_rows(grid, tmp_path):
    with pytest.raises(MergebakeError, match="two rows"):
        build_report([*grid, grid[0]], tmp_path / "r")
    with pytest.raises(MergebakeError, match="kind"):
        build_report([{**grid[0], "kind": "cell"}], tmp_path / "r")
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(MergebakeError, match="bad.json"):
        build_report([{**grid[0], "eval": bad}], tmp_path / "r")


def test_delta_intervals_are_the_paired_bootstrap(grid, tmp_path):
    """The CSV's Δ bounds equal a paired bootstrap recomputed from the same draws."""
    import numpy as np

    from mergebake import stats

    out = tmp_path / "report"
    build_report(grid, out, resamples=300, seed=5)
    rec = by_name(read_csv(out / "merge_eval_pivot.csv"), "1b-std", "eng-nob__linear")
    cell, base = np.array(per_doc(0.70)), np.array(per_doc(0.50))
    counts = stats.resample_counts("demo_eng", N_DOCS, 300, 5)
    lo, hi = np.quantile(counts @ (cell - base) / N_DOCS, [0.025, 0.975])
    assert float(rec["Δ demo_eng/acc lo"]) == pytest.approx(lo, abs=1e-12)
    assert float(rec["Δ demo_eng/acc hi"]) == pytest.approx(hi, abs=1e-12)
    v_lo, v_hi = np.quantile(counts @ cell / N_DOCS, [0.025, 0.975])
    assert float(rec["demo_eng/acc lo"]) == pytest.approx(v_lo, abs=1e-12)
    assert float(rec["demo_eng/acc hi"]) == pytest.approx(v_hi, abs=1e-12)


def test_retention_columns_and_unusable_tasks(tmp_path):
    """An oracle gaining 1 pp is flagged and left out of mean retained; 30 pp is kept."""
    rows = [
        row(tmp_path, "1b-std", "base", "_base", s(0.50, 0.40)),
        row(tmp_path, "1b-std", "adapter", "eng", s(0.80, 0.41)),
        row(tmp_path, "1b-std", "adapter", "nob", s(0.50, 0.40)),
        row(tmp_path, "1b-std", "merge", "eng-nob__ties", s(0.65, 0.40)),
    ]
    # 0.41 is not on the 20-document grid, so per_doc gives every document 0.41.
    out = tmp_path / "report"
    result = build_report(rows, out)
    rec = by_name(read_csv(out / "merge_eval_pivot.csv"), "1b-std", "eng-nob__ties")
    assert rec["oracle demo_eng/acc"] == "eng"
    assert float(rec["oracle − base (pp) demo_eng/acc"]) == pytest.approx(30.0)
    assert rec["usable demo_eng/acc"] == "True"
    assert float(rec["retained demo_eng/acc"]) == pytest.approx(0.5)
    # demo_nob: the best adapter (eng, 0.41) gains 1 pp over the base: not usable.
    assert rec["oracle demo_nob/acc"] == "eng"
    assert float(rec["oracle − base (pp) demo_nob/acc"]) == pytest.approx(1.0)
    assert rec["usable demo_nob/acc"] == "False"
    assert float(rec["retained demo_nob/acc"]) == pytest.approx(0.0)
    assert float(rec["mean retained"]) == pytest.approx(0.5)  # demo_nob left out
    assert result["ranking"]["1b"][0]["mean_retained"] == pytest.approx(0.5)
    md = (out / "merge_eval_report.md").read_text(encoding="utf-8")
    assert "| std | eng-nob__ties | 50% | 0%† | 50% |" in md
    assert "† Not usable for retention (oracle − base below 3 pp): demo_nob/acc at 1b-std." in md
    # A configured oracle overrides the default; min_gain moves the threshold.
    build_report(rows, out, oracle={"demo_nob": "nob"}, min_gain=0.5)
    rec = by_name(read_csv(out / "merge_eval_pivot.csv"), "1b-std", "eng-nob__ties")
    assert rec["oracle demo_nob/acc"] == "nob"
    assert rec["usable demo_nob/acc"] == "False"  # nob gains 0 pp
    assert rec["usable demo_eng/acc"] == "True"


def test_bad_oracle_and_missing_samples(grid, tmp_path):
    with pytest.raises(MergebakeError, match=r"report\.oracle\.demo_eng: 'deu' is not"):
        build_report(grid, tmp_path / "r", oracle={"demo_eng": "deu"})
    with pytest.raises(MergebakeError, match=r"report\.oracle: task\(s\) \['nope'\]"):
        build_report(grid, tmp_path / "r", oracle={"nope": "eng"})
    samples_path(grid[3]["eval"]).unlink()
    with pytest.raises(MergebakeError, match=r"eng-nob__linear\.samples\.json\.gz"):
        build_report(grid, tmp_path / "r")


def test_check_oracle_config():
    """The config-time check: every base must have the oracle adapter; baselines on."""
    import yaml
    from _workflow import ROOT

    from mergebake.config import check_oracle_config, load_config

    cfg = load_config(yaml.safe_load((ROOT / "config.yaml").read_text()), workflow_dir=ROOT)
    assert cfg["report"]["oracle"] == {} and cfg["report"]["min_gain"] == 3.0
    assert cfg["report"]["bootstrap"] == 1000
    cfg["report"]["oracle"] = {"demo_eng": "eng"}
    check_oracle_config(cfg)
    cfg["report"]["oracle"] = {"demo_eng": "deu"}
    with pytest.raises(
        MergebakeError, match=r"key 'report\.oracle\.demo_eng': 'deu' is not an adapter"
    ):
        check_oracle_config(cfg)
    cfg["report"]["oracle"] = {"demo_eng": "eng"}
    cfg["eval"]["baselines"] = False
    with pytest.raises(MergebakeError, match="eval.baselines"):
        check_oracle_config(cfg)
