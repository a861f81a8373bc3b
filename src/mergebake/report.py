"""Pivot every cell's and baseline's lm-eval scores into a CSV, a Markdown report and plots.

Numbers are lm-eval metric values in the metric's own units (``acc``: fraction of
documents scored correct, 0-1). A ``Δ`` is a row's value minus its baseline's value for the
same base (``{size}-{variant}``), in the same units. ``mean Δ`` is the mean of a row's Δs
over the chosen metrics, each counted in its better direction (a lower-is-better metric's
Δ is negated, per lm-eval's ``higher_is_better``), so a positive mean Δ is always a gain.
The method ranking averages, per size, the ``mean Δ`` of every merged cell of a method
(over variants and adapter groups), best first.

Outputs are deterministic for equal inputs: no timestamps, stable row and column order,
PNGs written without the ``Software`` metadata entry.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import MergebakeError
from .config import BASE_ROW
from .evaluate import load_scores
from .outputs import atomic_file

KINDS = ("base", "adapter", "merge")
ID_COLUMNS = ["size", "variant", "kind", "name"]
CSV_NAME = "merge_eval_pivot.csv"
MD_NAME = "merge_eval_report.md"
SCORES_PNG = "merge_eval_scores.png"
RANKING_PNG = "method_ranking.png"
PENDING_EVAL = "pending eval"
PENDING_BASELINE = "pending baseline"
INCOMPLETE = "incomplete"
DELTA = "Δ "
MEAN_DELTA = "mean Δ"


def natural_key(text: str) -> tuple:
    """Sort key that orders embedded numbers numerically: ``1b < 4b < 12b``."""
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(text)))


def column_name(task: str, key: str) -> str:
    """Pivot column for lm-eval score ``key`` (``"<metric>,<filter>"``) of ``task``.

    ``("demo_eng", "acc,none")`` gives ``"demo_eng/acc"``; another filter is kept:
    ``("gsm8k", "exact_match,strict-match")`` gives ``"gsm8k/exact_match,strict-match"``.
    """
    metric, _, filt = key.partition(",")
    return f"{task}/{metric}" if filt in ("", "none") else f"{task}/{metric},{filt}"


def _parse_column(col: str) -> tuple[str, str]:
    """Inverse of :func:`column_name`: ``"task/metric[,filter]"`` to ``(task, key)``."""
    task, sep, rest = col.rpartition("/")
    if not sep or not task or not rest:
        raise MergebakeError(
            f"report: metric {col!r} must look like 'task/metric' or 'task/metric,filter' "
            "(e.g. 'demo_eng/acc'); fix the report metrics in the config"
        )
    return task, rest if "," in rest else f"{rest},none"


@dataclass
class _Eval:
    """One row's scores: ``{task: {key: value}}``, lower-is-better keys, top-level tasks."""

    scores: dict[str, dict[str, float]]
    lower_better: set[tuple[str, str]]
    top_level: list[str]


def read_eval(path: Path) -> _Eval:
    """Scores of one eval JSON, plus which tasks are top level and which metrics go down."""
    scores = load_scores(path)
    data = json.loads(Path(path).read_text())
    lower: set[tuple[str, str]] = set()
    for task, hib in (data.get("higher_is_better") or {}).items():
        for key in scores.get(task, {}) if isinstance(hib, dict) else ():
            if hib.get(key.partition(",")[0]) is False:
                lower.add((task, key))
    subtasks: dict[str, list[str]] = data.get("group_subtasks") or {}
    children = {c for kids in subtasks.values() for c in kids}
    roots = [t for t in subtasks if t not in children] or sorted(scores)

    def expand(name: str, depth: int = 0) -> list[str]:
        # A group without aggregate scores stands for its subtasks.
        if scores.get(name) or depth > 16:
            return [name] if scores.get(name) else []
        return [t for kid in subtasks.get(name, []) for t in expand(kid, depth + 1)]

    top = sorted({t for r in roots for t in expand(r)}, key=natural_key)
    return _Eval(scores, lower, top)


def _check_rows(rows: list[dict]) -> None:
    """Reject malformed or duplicate rows, naming the row."""
    seen: set[tuple[str, str]] = set()
    for i, row in enumerate(rows):
        missing = [k for k in ("base", "size", "variant", "kind", "name") if not row.get(k)]
        if missing:
            raise MergebakeError(f"report: row #{i} ({row!r}) lacks {missing}")
        if row["kind"] not in KINDS:
            raise MergebakeError(f"report: row #{i} has kind {row['kind']!r}; use one of {KINDS}")
        key = (row["base"], row["name"])
        if key in seen:
            raise MergebakeError(f"report: base {key[0]!r} has two rows named {key[1]!r}")
        seen.add(key)


def choose_columns(evals: dict[int, _Eval], metrics: list[str] | None) -> list[tuple[str, str]]:
    """``[(task, key)]`` for the pivot: ``metrics`` as given, or one default per task.

    The default metric of a task is ``acc,none`` where any row has it, else the first (in
    sorted order) non-stderr score key over all rows.
    """
    if metrics:
        out = [_parse_column(m) for m in metrics]
        if len(set(out)) != len(out):
            raise MergebakeError(f"report: metrics {metrics} name a column twice")
        return out
    keys: dict[str, set[str]] = {}
    for ev in evals.values():
        for task in ev.top_level:
            keys.setdefault(task, set()).update(ev.scores.get(task, {}))
    out = []
    for task in sorted(keys, key=natural_key):
        if keys[task]:
            out.append((task, "acc,none" if "acc,none" in keys[task] else sorted(keys[task])[0]))
    return out


def _baseline_name(baseline: str) -> str:
    return BASE_ROW if baseline in ("base", BASE_ROW) else baseline


def _pivot(rows: list[dict], baseline: str, metrics: list[str] | None):
    """Build the pivot DataFrame and a per-row status; see :func:`build_report`."""
    import pandas as pd

    evals: dict[int, _Eval] = {}
    for i, row in enumerate(rows):
        path = row.get("eval")
        if path is not None and Path(path).is_file():
            evals[i] = read_eval(Path(path))
    columns = choose_columns(evals, metrics)
    names = [column_name(t, k) for t, k in columns]
    lower = set().union(*(ev.lower_better for ev in evals.values())) if evals else set()
    sign = [(-1.0 if (t, k) in lower else 1.0) for t, k in columns]

    records = []
    for i, row in enumerate(rows):
        rec: dict[str, Any] = {c: row[c] for c in ID_COLUMNS}
        ev = evals.get(i)
        for (task, key), col in zip(columns, names, strict=True):
            rec[col] = ev.scores.get(task, {}).get(key, math.nan) if ev else math.nan
        rec["_base"] = row["base"]
        rec["_row"] = i
        rec["_group"] = row.get("group")
        rec["_method"] = row.get("method")
        records.append(rec)
    df = pd.DataFrame.from_records(
        records, columns=[*ID_COLUMNS, *names, "_base", "_row", "_group", "_method"]
    )
    ref_name = _baseline_name(baseline)
    ref_kind = "base" if ref_name == BASE_ROW else "adapter"
    refs = df[(df["name"] == ref_name) & (df["kind"] == ref_kind)].set_index("_base")

    status = []
    for _, rec in df.iterrows():
        if rec["_row"] not in evals:
            status.append(PENDING_EVAL)
        elif rec["_base"] not in refs.index or refs.loc[rec["_base"], "_row"] not in evals:
            status.append(PENDING_BASELINE)
        else:
            status.append("ok")
    df["_status"] = status

    ref_values = refs.reindex(df["_base"])[names].to_numpy() if names else None
    for j, col in enumerate(names):
        df[DELTA + col] = df[col].to_numpy() - ref_values[:, j]
    delta_cols = [DELTA + c for c in names]
    if names:
        signed = df[delta_cols].to_numpy() * sign
        df[MEAN_DELTA] = pd.DataFrame(signed).mean(axis=1, skipna=False).to_numpy()
    else:
        df[MEAN_DELTA] = math.nan
    df.loc[(df["_status"] == "ok") & df[MEAN_DELTA].isna(), "_status"] = INCOMPLETE

    kind_rank = {k: n for n, k in enumerate(KINDS)}
    df["_order"] = [
        (
            natural_key(r["size"]),
            natural_key(r["variant"]),
            kind_rank[r["kind"]],
            natural_key(r["name"]),
        )
        for _, r in df.iterrows()
    ]
    df = df.sort_values("_order", kind="stable").drop(columns="_order").reset_index(drop=True)
    return df, names, delta_cols


def _ranking(df) -> dict[str, list[dict[str, Any]]]:
    """Per size, each method's mean of its merged cells' ``mean Δ``, best first.

    Cells without a ``mean Δ`` (pending) are left out of the mean; a method with none
    gets ``mean_delta: None`` and goes last. Ties are broken by method name.
    """
    out: dict[str, list[dict[str, Any]]] = {}
    merges = df[df["kind"] == "merge"]
    for size in sorted(merges["size"].unique(), key=natural_key):
        entries = []
        sub = merges[merges["size"] == size]
        for method in sorted(sub["_method"].fillna("").unique(), key=natural_key):
            cells = sub[sub["_method"].fillna("") == method]
            done = cells[MEAN_DELTA].dropna()
            entries.append(
                {
                    "method": method or None,
                    "mean_delta": float(done.mean()) if len(done) else None,
                    "cells": int(len(done)),
                    "pending": int(len(cells) - len(done)),
                    "variants": sorted(
                        cells.loc[cells[MEAN_DELTA].notna(), "variant"].unique(), key=natural_key
                    ),
                }
            )
        entries.sort(
            key=lambda e: (
                e["mean_delta"] is None,
                -(e["mean_delta"] or 0.0),
                natural_key(e["method"] or ""),
            )
        )
        for rank, e in enumerate(entries, 1):
            e["rank"] = rank if e["mean_delta"] is not None else None
        out[str(size)] = entries
    return out


# ----------------------------------------------------------------------------- formatting


def _fmt(x: float, *, signed: bool = False) -> str:
    """A score to 3 decimals (``+``/``-`` always shown on Δs; no ``-0.000``)."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    x = round(float(x), 3) + 0.0
    return f"{x:+.3f}" if signed else f"{x:.3f}"


def md_table(header: list[str], rows: list[list[str]], align: list[str]) -> list[str]:
    """A GitHub Markdown table; ``align`` is ``"l"`` or ``"r"`` per column."""

    def esc(s: str) -> str:
        return str(s).replace("|", "\\|")

    sep = [":---" if a == "l" else "---:" for a in align]
    lines = ["| " + " | ".join(esc(h) for h in header) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]
    return lines


def _markdown(df, names, delta_cols, ranking, baseline: str) -> str:
    ref = _baseline_name(baseline)
    ref_desc = (
        "the base model (`_base` row) of each base"
        if ref == BASE_ROW
        else f"the single-adapter `{ref}` row of each base"
    )
    out = [
        "# Merge evaluation report",
        "",
        f"Baseline: {ref_desc}. Scores are lm-eval metric values in each metric's own "
        "units (acc: fraction correct, 0-1). Δ = row − baseline of the same base, same "
        "units. mean Δ averages a row's Δs over the metrics (lower-is-better metrics "
        "negated, so positive is a gain). `–`: no value.",
        "",
        "## Method ranking",
        "",
        "Per size: each merge method's mean Δ over its cells (all variants and adapter "
        "groups, all metrics), best first.",
        "",
    ]
    rank_rows = []
    for size, entries in ranking.items():
        for e in entries:
            rank_rows.append(
                [
                    size,
                    str(e["rank"]) if e["rank"] is not None else "–",
                    e["method"] or "–",
                    _fmt(e["mean_delta"], signed=True)
                    if e["mean_delta"] is not None
                    else "pending",
                    str(e["cells"]),
                    ", ".join(e["variants"]) or "–",
                ]
            )
    if rank_rows:
        out += md_table(
            ["size", "rank", "method", "mean Δ", "cells", "variants"],
            rank_rows,
            ["l", "r", "l", "r", "r", "l"],
        )
    else:
        out.append("No merged cells.")
    out.append("")

    header = ["variant", "kind", "name", *names, *delta_cols, MEAN_DELTA, "note"]
    align = ["l", "l", "l", *["r"] * (len(names) + len(delta_cols) + 1), "l"]

    def row_cells(r) -> list[str]:
        is_ref = r["name"] == ref and r["kind"] == ("base" if ref == BASE_ROW else "adapter")
        name = f"**{r['name']}**" if is_ref else r["name"]
        note = "" if r["_status"] == "ok" else r["_status"]
        if is_ref and not note:
            note = "baseline"
        return [
            r["variant"],
            r["kind"],
            name,
            *[_fmt(r[c]) for c in names],
            *[_fmt(r[c], signed=True) for c in delta_cols],
            _fmt(r[MEAN_DELTA], signed=True),
            note,
        ]

    for size in sorted(df["size"].unique(), key=natural_key):
        out += [f"## {size}", ""]
        out += md_table(header, [row_cells(r) for _, r in df[df["size"] == size].iterrows()], align)
        out.append("")

    out += ["## Baseline rows", ""]
    base_rows = df[df["kind"] != "merge"]
    if len(base_rows):
        out += md_table(
            ["size", *header],
            [[r["size"], *row_cells(r)] for _, r in base_rows.iterrows()],
            ["l", *align],
        )
    else:
        out.append("None.")
    out.append("")

    pending = df[df["_status"] != "ok"]
    out += ["## Pending", ""]
    if len(pending):
        for _, r in pending.iterrows():
            why = {
                PENDING_EVAL: "no eval results yet",
                PENDING_BASELINE: f"baseline `{ref}` of {r['_base']} has no eval results",
                INCOMPLETE: "a metric is missing from the row or its baseline",
            }[r["_status"]]
            out.append(f"- {r['_base']} `{r['name']}`: {r['_status']} ({why})")
    else:
        out.append("None.")
    out.append("")
    return "\n".join(out)


# ----------------------------------------------------------------------------- plots


def _save_png(fig, path: Path) -> None:
    with atomic_file(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=100, metadata={"Software": None})


def _plot_scores(df, names, path: Path) -> None:
    """Grouped bars: one group per row (cell or baseline), one bar per task metric."""
    import matplotlib
    import numpy as np
    from matplotlib.figure import Figure

    labels = [f"{r['size']}-{r['variant']}\n{r['name']}" for _, r in df.iterrows()]
    with matplotlib.rc_context({"svg.hashsalt": "mergebake", "path.simplify": True}):
        fig = Figure(figsize=(max(6.0, 0.6 * len(labels) * max(1, len(names)) ** 0.5 + 2), 4.5))
        ax = fig.add_subplot()
        x = np.arange(len(labels))
        width = 0.8 / max(1, len(names))
        for j, col in enumerate(names):
            ax.bar(
                x + (j - (len(names) - 1) / 2) * width,
                df[col].fillna(0).to_numpy(),
                width,
                label=col,
            )
        for xi, status in zip(x, df["_status"], strict=True):
            if status == PENDING_EVAL:
                ax.text(xi, 0.0, "pending eval", rotation=90, ha="center", va="bottom", fontsize=7)
        ax.set_xticks(x, labels, rotation=90, fontsize=7)
        ax.set_ylabel("score (metric units)")
        ax.set_title("lm-eval scores per cell and baseline")
        if names:
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        fig.tight_layout()
        _save_png(fig, path)


def _plot_ranking(ranking, path: Path) -> None:
    """Grouped bars: one group per size, one bar per method's mean Δ."""
    import matplotlib
    import numpy as np
    from matplotlib.figure import Figure

    sizes = list(ranking)
    methods = sorted({e["method"] or "" for es in ranking.values() for e in es}, key=natural_key)
    with matplotlib.rc_context({"svg.hashsalt": "mergebake"}):
        fig = Figure(figsize=(max(5.0, 1.5 * len(sizes) + 3), 4.0))
        ax = fig.add_subplot()
        x = np.arange(len(sizes))
        width = 0.8 / max(1, len(methods))
        for j, method in enumerate(methods):
            vals, pending = [], []
            for size in sizes:
                e = next((e for e in ranking[size] if (e["method"] or "") == method), None)
                done = e is not None and e["mean_delta"] is not None
                vals.append(e["mean_delta"] if done else 0.0)
                pending.append(e is not None and not done)
            xs = x + (j - (len(methods) - 1) / 2) * width
            ax.bar(xs, vals, width, label=method or "?")
            for xi, p in zip(xs, pending, strict=True):
                if p:
                    ax.text(xi, 0.0, "pending", rotation=90, ha="center", va="bottom", fontsize=7)
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.set_xticks(x, sizes)
        ax.set_ylabel("mean Δ vs baseline (metric units)")
        ax.set_title("Merge methods: mean Δ per size")
        if methods:
            ax.legend(fontsize=8)
        fig.tight_layout()
        _save_png(fig, path)


# ----------------------------------------------------------------------------- entry point


def build_report(
    rows: list[dict],
    out_dir: Path,
    *,
    baseline: str = "base",
    metrics: list[str] | None = None,
) -> dict:
    """Write the pivot CSV, the Markdown report and two plots for ``rows`` into ``out_dir``.

    Each row: ``{"base": "1b-std", "size": "1b", "variant": "std", "kind": "base" |
    "adapter" | "merge", "name": "_base" | "<adapter>" | "<group>__<method>", "group",
    "method", "eval": Path}``. A row whose eval file does not exist is kept as
    ``pending eval``; a row whose baseline is absent or unevaluated as
    ``pending baseline`` (its Δs are empty).

    ``baseline``: ``"base"`` compares every row with the ``_base`` row of its base;
    an adapter name compares with that adapter's single-adapter row. ``metrics``: pivot
    columns as ``"task/metric"`` or ``"task/metric,filter"``; by default one per top-level
    task (``acc,none`` where present, else its first score key).

    Files (each written atomically): ``merge_eval_pivot.csv`` (columns ``size, variant,
    kind, name``, one per metric, ``Δ <metric>`` per metric, ``mean Δ``; empty = no value),
    ``merge_eval_report.md``, ``merge_eval_scores.png`` and ``method_ranking.png``;
    text files are UTF-8.

    Returns ``{"baseline", "metrics": [column names], "ranking": {size: [{"method",
    "mean_delta", "rank", "cells", "pending", "variants"}, ...]}, "pending": [{"base",
    "name", "status"}, ...]}``. Raises :class:`MergebakeError` on malformed rows, a
    malformed ``metrics`` entry, or an unreadable eval file.
    """
    _check_rows(rows)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    df, names, delta_cols = _pivot(rows, baseline, metrics)
    ranking = _ranking(df)

    csv_df = df[[*ID_COLUMNS, *names, *delta_cols, MEAN_DELTA]]
    # Bytes, so the "Δ" in headers is UTF-8 whatever the locale's default encoding is.
    with atomic_file(out_dir / CSV_NAME, "wb") as fh:
        fh.write(csv_df.to_csv(index=False, lineterminator="\n").encode("utf-8"))
    with atomic_file(out_dir / MD_NAME, "wb") as fh:
        fh.write(_markdown(df, names, delta_cols, ranking, baseline).encode("utf-8"))
    _plot_scores(df, names, out_dir / SCORES_PNG)
    _plot_ranking(ranking, out_dir / RANKING_PNG)

    result = {
        "baseline": baseline,
        "metrics": names,
        "ranking": ranking,
        "pending": [
            {"base": r["_base"], "name": r["name"], "status": r["_status"]}
            for _, r in df.iterrows()
            if r["_status"] != "ok"
        ],
    }
    return result
