"""Pivot every cell's and baseline's lm-eval scores into a CSV, a Markdown report and plots.

Numbers are lm-eval metric values in the metric's own units (``acc``: fraction of
documents scored correct, 0-1). A ``Δ`` is a row's value minus its baseline's value for the
same base (``{size}-{variant}``), in the same units. ``mean Δ`` is the mean of a row's Δs
over the chosen metrics, each counted in its better direction (a lower-is-better metric's
Δ is negated, per lm-eval's ``higher_is_better``), so a positive mean Δ is always a gain.
The method ranking averages, per size, the ``mean Δ`` of every merged cell of a method
(over variants and adapter groups), best first.

Uncertainty (:mod:`mergebake.stats`): every value, Δ, mean Δ and ranking mean carries a 95%
paired-bootstrap interval over the documents, from the per-document values the eval step
logs beside each eval JSON; methods whose interval overlaps the leader's are "within noise".
Retention: for each merged cell and task, the oracle is a single-adapter row (``oracle``, or
by default the adapter of the cell's group that scores best on the task), ``oracle − base
(pp)`` its gain over the ``_base`` row and ``retained = (cell − base)/(oracle − base)``; a
task whose oracle gains less than ``min_gain`` pp is flagged not usable and left out of the
``mean retained`` averages.

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

import numpy as np

from . import MergebakeError, plots, stats
from .config import BASE_ROW
from .evaluate import load_scores
from .outputs import atomic_file

KINDS = ("base", "adapter", "merge")
ID_COLUMNS = ["size", "variant", "kind", "name"]
CSV_NAME = "merge_eval_pivot.csv"
MD_NAME = "merge_eval_report.md"
HTML_NAME = "merge_eval_report.html"
SCORES_PNG = "merge_eval_scores.png"
RANKING_PNG = "method_ranking.png"
#: Written only for a grid with a sweep (:func:`mergebake.plots.plot_sweep`).
SWEEP_PNG = "sweep_curves.png"
#: Written only for a grid with an adapter's checkpoints (rows with ``checkpoint``).
CHECKPOINT_PNG = "checkpoint_curves.png"
PENDING_EVAL = "pending eval"
PENDING_BASELINE = "pending baseline"
INCOMPLETE = "incomplete"
DELTA = "Δ "
MEAN_DELTA = "mean Δ"
LO, HI = " lo", " hi"
ORACLE = "oracle "
GAIN = "oracle − base (pp) "
USABLE = "usable "
RETAINED = "retained "
MEAN_RETAINED = "mean retained"


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


def _replicates(
    rows: list[dict], evals: dict[int, _Eval], columns: list[tuple[str, str]], boot
) -> dict[tuple[int, int], tuple[stats.Column, np.ndarray]]:
    """``{(row index, column index): (Column, bootstrap replicates)}`` of every scored cell.

    Raises :class:`MergebakeError` naming the samples file when a scored task has no
    per-document values, or when they do not reproduce the eval JSON's score.
    """
    out = {}
    for i, ev in evals.items():
        path = Path(rows[i]["eval"])
        samples = None
        for j, (task, key) in enumerate(columns):
            value = ev.scores.get(task, {}).get(key)
            if value is None:
                continue
            if samples is None:
                samples = stats.load_samples(path)
            col = stats.column(samples, path, task, key)
            if not math.isclose(col.value, value, rel_tol=1e-6, abs_tol=1e-9):
                raise MergebakeError(
                    f"{path}: {task} {key} is {value!r} but its per-document samples average "
                    f"{col.value!r}; the samples file is stale or from another run: re-run "
                    "the eval step"
                )
            out[(i, j)] = (col, boot.replicates(col))
    return out


def _pivot(
    rows: list[dict],
    baseline: str,
    metrics: list[str] | None,
    boot: stats.Bootstrap | None = None,
):
    """Build the pivot DataFrame and a per-row status; see :func:`build_report`.

    Also returns the columns as ``(task, key)``, their signs (-1: lower is better) and, per
    row index, the bootstrap replicates of its ``mean Δ`` (``(resamples,)`` arrays).
    """
    import pandas as pd

    boot = boot or stats.Bootstrap()
    evals: dict[int, _Eval] = {}
    for i, row in enumerate(rows):
        path = row.get("eval")
        if path is not None and Path(path).is_file():
            evals[i] = read_eval(Path(path))
    columns = choose_columns(evals, metrics)
    names = [column_name(t, k) for t, k in columns]
    lower = set().union(*(ev.lower_better for ev in evals.values())) if evals else set()
    sign = [(-1.0 if (t, k) in lower else 1.0) for t, k in columns]
    reps = _replicates(rows, evals, columns, boot)

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

    # Intervals: the value's own, the paired Δ's against the baseline row, the mean Δ's.
    ref_row = {b: int(refs.loc[b, "_row"]) for b in refs.index}
    bounds: dict[str, list[float]] = {}
    mean_reps: dict[int, np.ndarray] = {}
    for _, rec in df.iterrows():
        i = int(rec["_row"])
        r = ref_row.get(rec["_base"])
        signed_reps = []
        for j, col in enumerate(names):
            lo = hi = dlo = dhi = math.nan
            if (i, j) in reps:
                lo, hi = boot.interval(reps[(i, j)][1])
                if r is not None and (r, j) in reps:
                    stats.check_paired(
                        reps[(i, j)][0], reps[(r, j)][0], str(rows[i]["eval"]), str(rows[r]["eval"])
                    )
                    d = reps[(i, j)][1] - reps[(r, j)][1]
                    dlo, dhi = boot.interval(d)
                    signed_reps.append(sign[j] * d)
            for name, v in ((col + LO, lo), (col + HI, hi), (DELTA + col + LO, dlo)):
                bounds.setdefault(name, []).append(v)
            bounds.setdefault(DELTA + col + HI, []).append(dhi)
        lo = hi = math.nan
        if names and len(signed_reps) == len(names) and not math.isnan(rec[MEAN_DELTA]):
            mean_reps[i] = np.mean(signed_reps, axis=0)
            lo, hi = boot.interval(mean_reps[i])
        bounds.setdefault(MEAN_DELTA + LO, []).append(lo)
        bounds.setdefault(MEAN_DELTA + HI, []).append(hi)
    for name, vals in bounds.items():
        df[name] = vals

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
    return df, names, delta_cols, columns, sign, mean_reps


def _retention(
    df,
    rows: list[dict],
    columns: list[tuple[str, str]],
    sign: list[float],
    oracle: dict[str, str] | None,
    min_gain: float,
) -> list[dict[str, Any]]:
    """Add the retention columns to ``df`` (in place); return the oracle of each
    (base, group, task) as ``[{"base", "group", "task", "oracle", "columns": [{"column",
    "gain_pp", "usable"}]}]``.

    Per merged cell and column: ``oracle <col>`` (the oracle row's name), ``oracle − base
    (pp) <col>``, ``usable <col>`` (True/False; None without both scores), ``retained
    <col>``; ``mean retained`` averages ``retained`` over the usable columns (NaN when
    none). Other rows get empty retention columns. The base is the ``_base`` row of the
    cell's base, whatever the report's baseline.
    """
    oracle = oracle or {}
    names = [column_name(t, k) for t, k in columns]
    tasks = list(dict.fromkeys(t for t, _ in columns))
    unknown = sorted(set(oracle) - set(tasks))
    if unknown:
        raise MergebakeError(
            f"report.oracle: task(s) {unknown} are not among the report's tasks {tasks}; "
            "map only reported tasks to their oracle row"
        )
    index = {(r["_base"], r["name"], r["kind"]): k for k, r in df.iterrows()}
    new: dict[str, list] = {}
    for c in names:
        for prefix in (ORACLE, GAIN, USABLE, RETAINED):
            new[prefix + c] = [None if prefix in (ORACLE, USABLE) else math.nan] * len(df)
    new[MEAN_RETAINED] = [math.nan] * len(df)
    oracles: dict[tuple[str, str, str], dict[str, Any]] = {}
    adapters_of: dict[str, list[str]] = {}
    for _, r in df[df["kind"] == "adapter"].iterrows():
        adapters_of.setdefault(r["_base"], []).append(r["name"])
    for k, r in df.iterrows():
        if r["kind"] != "merge":
            continue
        base_k = index.get((r["_base"], BASE_ROW, "base"))
        members = rows[int(r["_row"])].get("adapters") or adapters_of.get(r["_base"], [])
        kept: list[float] = []
        for task in tasks:
            cols = [j for j, (t, _) in enumerate(columns) if t == task]
            first = names[cols[0]]
            if task in oracle:
                name = oracle[task]
                if (r["_base"], name, "adapter") not in index:
                    raise MergebakeError(
                        f"report.oracle.{task}: {name!r} is not a single-adapter row of base "
                        f"{r['_base']!r} (its adapter rows: {adapters_of.get(r['_base'], [])});"
                        " name an adapter of every base, and keep eval.baselines on"
                    )
            else:
                name = stats.choose_oracle(
                    {
                        a: df.loc[index[(r["_base"], a, "adapter")], first]
                        if (r["_base"], a, "adapter") in index
                        else None
                        for a in members
                    },
                    lower_is_better=sign[cols[0]] < 0,
                )
            o_k = index.get((r["_base"], name, "adapter")) if name else None
            entry = oracles.setdefault(
                (r["_base"], r["_group"] or "", task),
                {"base": r["_base"], "group": r["_group"], "task": task, "oracle": name,
                 "columns": []},
            )  # fmt: skip
            for j in cols:
                c = names[j]
                b = df.loc[base_k, c] if base_k is not None else math.nan
                o = df.loc[o_k, c] if o_k is not None else math.nan
                gain = float(stats.oracle_gain_pp(b, o, lower_is_better=sign[j] < 0))
                ok = None if math.isnan(gain) else stats.usable(gain, min_gain)
                ret = stats.retained(r[c], b, o)
                new[ORACLE + c][k] = name
                new[GAIN + c][k] = gain
                new[USABLE + c][k] = ok
                new[RETAINED + c][k] = ret
                if ok and not math.isnan(ret):
                    kept.append(ret)
                if len(entry["columns"]) < len(cols):
                    entry["columns"].append({"column": c, "gain_pp": gain, "usable": ok})
        new[MEAN_RETAINED][k] = float(np.mean(kept)) if kept else math.nan
    for name, vals in new.items():
        df[name] = vals
    return list(oracles.values())


def _ranking(df, mean_reps: dict[int, np.ndarray] | None = None, boot=None):
    """Per size, each method's mean of its merged cells' ``mean Δ``, best first.

    Cells without a ``mean Δ`` (pending) are left out of the mean; a method with none
    gets ``mean_delta: None`` and goes last. Ties are broken by method name. ``lo``/``hi``
    bound the 95% paired-bootstrap interval of that mean (the cells' replicates averaged
    per resample), ``standing`` is ``leader``/``tied``/``behind`` (see
    :func:`mergebake.stats.mark_ties`) and ``mean_retained`` the mean of the cells' ``mean
    retained`` (None when none has one).
    """
    mean_reps = mean_reps or {}
    out: dict[str, list[dict[str, Any]]] = {}
    merges = df[df["kind"] == "merge"]
    for size in sorted(merges["size"].unique(), key=natural_key):
        entries = []
        sub = merges[merges["size"] == size]
        for method in sorted(sub["_method"].fillna("").unique(), key=natural_key):
            cells = sub[sub["_method"].fillna("") == method]
            done = cells[MEAN_DELTA].dropna()
            cell_reps = [mean_reps[int(i)] for i in cells["_row"] if int(i) in mean_reps]
            lo = hi = None
            if len(done) and len(cell_reps) == len(done) and boot is not None:
                lo, hi = boot.interval(np.mean(cell_reps, axis=0))
            kept = cells[MEAN_RETAINED].dropna() if MEAN_RETAINED in cells else []
            entries.append(
                {
                    "method": method or None,
                    "mean_delta": float(done.mean()) if len(done) else None,
                    "lo": lo,
                    "hi": hi,
                    "mean_retained": float(np.mean(kept)) if len(kept) else None,
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
        marks = stats.mark_ties(
            [{"mean": e["mean_delta"], "lo": e["lo"], "hi": e["hi"]} for e in entries]
        )
        for e, m in zip(entries, marks, strict=True):
            e["standing"] = m
        out[str(size)] = entries
    return out


# ----------------------------------------------------------------------------- formatting


def _nan(x: Any) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def _fmt(x: float, *, signed: bool = False) -> str:
    """A score to 3 decimals (``+``/``-`` always shown on Δs; no ``-0.000``)."""
    if _nan(x):
        return "–"
    x = round(float(x), 3) + 0.0
    return f"{x:+.3f}" if signed else f"{x:.3f}"


def _pm(x: float, lo: float, hi: float) -> str:
    """``0.700 ± 0.090``: the value and half the width of its interval."""
    if _nan(x) or _nan(lo) or _nan(hi):
        return _fmt(x)
    return f"{_fmt(x)} ± {round((hi - lo) / 2, 3) + 0.0:.3f}"


def _ci(x: float, lo: float, hi: float) -> str:
    """``+0.200 [+0.100, +0.300]``: a Δ and its interval."""
    if _nan(x) or _nan(lo) or _nan(hi):
        return _fmt(x, signed=True)
    return f"{_fmt(x, signed=True)} [{_fmt(lo, signed=True)}, {_fmt(hi, signed=True)}]"


def _pct(x: float) -> str:
    return "–" if _nan(x) else f"{round(100 * float(x)) + 0:d}%"


def md_table(header: list[str], rows: list[list[str]], align: list[str]) -> list[str]:
    """A GitHub Markdown table; ``align`` is ``"l"`` or ``"r"`` per column."""

    def esc(s: str) -> str:
        return str(s).replace("|", "\\|")

    sep = [":---" if a == "l" else "---:" for a in align]
    lines = ["| " + " | ".join(esc(h) for h in header) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]
    return lines


def _markdown(df, names, delta_cols, ranking, oracles, baseline: str, opts: dict) -> str:
    ref = _baseline_name(baseline)
    ref_desc = (
        "the base model (`_base` row) of each base"
        if ref == BASE_ROW
        else f"the single-adapter `{ref}` row of each base"
    )
    min_gain = opts["min_gain"]
    out = [
        "# Merge evaluation report",
        "",
        f"Baseline: {ref_desc}. Scores are lm-eval metric values in each metric's own "
        "units (acc: fraction correct, 0-1). Δ = row − baseline of the same base, same "
        "units. mean Δ averages a row's Δs over the metrics (lower-is-better metrics "
        "negated, so positive is a gain). `–`: no value.",
        "",
        f"Uncertainty: 95% paired-bootstrap intervals over the documents ({opts['resamples']} "
        f"resamples, seed {opts['seed']}; every row is resampled on the same documents). "
        "`0.700 ± 0.090` is a score and half the width of its interval; "
        "`+0.200 [+0.100, +0.300]` a Δ (or mean Δ) and its interval. A Δ whose interval "
        "includes 0 is not distinguishable from the baseline.",
        "",
        "Retention: for each merged cell and task, the oracle is the single-adapter row "
        + (
            "configured in `report.oracle`, else the adapter of the cell's group that scores "
            "best on that task"
            if opts.get("oracle")
            else "of the cell's group that scores best on that task (`report.oracle` sets it)"
        )
        + ". `oracle − base (pp)` is its gain over the base model in percentage points, "
        "`retained` = (cell − base)/(oracle − base): 100% keeps all of the oracle's gain, "
        f"0% none. Tasks whose oracle gains less than {min_gain:g} pp (`report.min_gain`) "
        "are not usable (marked †) and are left out of every `mean retained`.",
        "",
        "## Method ranking",
        "",
        "Per size: each merge method's mean Δ over its cells (all variants and adapter "
        "groups, all metrics), best first, with its 95% interval; methods whose interval "
        "overlaps the leader's are within noise of it.",
        "",
    ]
    rank_rows = []
    for size, entries in ranking.items():
        for e in entries:
            pending = e["mean_delta"] is None
            rank_rows.append(
                [
                    size,
                    str(e["rank"]) if e["rank"] is not None else "–",
                    e["method"] or "–",
                    "pending" if pending else _ci(e["mean_delta"], e["lo"], e["hi"]),
                    {"leader": "leader", "tied": "within noise", "behind": "behind"}.get(
                        e["standing"] or "", "–"
                    ),
                    _pct(e["mean_retained"]),
                    str(e["cells"]),
                    ", ".join(e["variants"]) or "–",
                ]
            )
    if rank_rows:
        out += md_table(
            ["size", "rank", "method", "mean Δ [95% CI]", "standing", "mean retained", "cells",
             "variants"],
            rank_rows,
            ["l", "r", "l", "r", "l", "r", "r", "l"],
        )  # fmt: skip
        out.append("")
        for size, entries in ranking.items():
            sentence = stats.ranking_sentence(
                size,
                [
                    {"method": e["method"], "mean": e["mean_delta"], "lo": e["lo"], "hi": e["hi"]}
                    for e in entries
                ],
            )
            out += [f"- {sentence}"]
        out += ["", f"![Method ranking with 95% intervals]({RANKING_PNG})"]
    else:
        out.append("No merged cells.")
    out += [
        "",
        "## Heatmap",
        "",
        "Every row × metric: the score, in brackets its Δ against the baseline; colour is "
        "the Δ (blue gain, red loss, white 0).",
        "",
        f"![Scores and Δ per row and metric]({SCORES_PNG})",
        "",
    ]

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
            *[_pm(r[c], r[c + LO], r[c + HI]) for c in names],
            *[_ci(r[c], r[c + LO], r[c + HI]) for c in delta_cols],
            _ci(r[MEAN_DELTA], r[MEAN_DELTA + LO], r[MEAN_DELTA + HI]),
            note,
        ]

    def retention_cells(r) -> list[str]:
        cells = []
        for c in names:
            v = _pct(r[RETAINED + c])
            ok = r[USABLE + c]
            cells.append(v + ("†" if not _nan(ok) and not bool(ok) else ""))
        return [r["variant"], r["name"], *cells, _pct(r[MEAN_RETAINED])]

    for size in sorted(df["size"].unique(), key=natural_key):
        sub = df[df["size"] == size]
        out += [f"## {size}", ""]
        out += md_table(header, [row_cells(r) for _, r in sub.iterrows()], align)
        out.append("")
        merges = sub[sub["kind"] == "merge"]
        if len(merges) and names:
            out += [f"### {size}: retention", ""]
            out += md_table(
                ["variant", "name", *[RETAINED + c for c in names], MEAN_RETAINED],
                [retention_cells(r) for _, r in merges.iterrows()],
                ["l", "l", *["r"] * (len(names) + 1)],
            )
            out.append("")
            size_bases = set(sub["_base"])
            orows = []
            for o in oracles:
                if o["base"] not in size_bases:
                    continue
                for c in o["columns"]:
                    orows.append(
                        [
                            o["base"].partition("-")[2] or o["base"],
                            o["group"] or "–",
                            c["column"],
                            f"`{o['oracle']}`" if o["oracle"] else "–",
                            "–" if _nan(c["gain_pp"]) else f"{c['gain_pp'] + 0.0:+.1f}",
                            {True: "yes", False: "no †", None: "–"}[c["usable"]],
                        ]
                    )
            orows.sort(key=lambda x: tuple(natural_key(v) for v in x[:3]))
            out += md_table(
                ["variant", "group", "metric", "oracle", "oracle − base (pp)", "usable"],
                orows,
                ["l", "l", "l", "l", "r", "l"],
            )
            out.append("")
    unusable = sorted(
        {(o["base"], c["column"]) for o in oracles for c in o["columns"] if c["usable"] is False},
        key=lambda x: (natural_key(x[0]), x[1]),
    )
    if unusable:
        listed = "; ".join(f"{c} at {b}" for b, c in unusable)
        out += [
            f"† Not usable for retention (oracle − base below {min_gain:g} pp): {listed}. "
            "Their `retained` is shown but left out of every `mean retained` (rows and "
            "ranking); the Δ columns and mean Δ still count them.",
            "",
        ]

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


def _html(markdown: str, images: dict[str, bytes]) -> str:
    """The Markdown report as one self-contained HTML page (images inlined as data URIs),
    rendered with markdown-it-py (CommonMark plus tables)."""
    import base64

    from markdown_it import MarkdownIt

    body = MarkdownIt("commonmark").enable("table").render(markdown)
    for name, data in images.items():
        uri = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
        body = body.replace(f'src="{name}"', f'src="{uri}"')
    style = (
        "body{font-family:sans-serif;max-width:80em;margin:1em auto;padding:0 1em}"
        "table{border-collapse:collapse;margin:0.5em 0;font-size:0.9em}"
        "th,td{border:1px solid #ccc;padding:2px 6px}th{background:#f3f3f3}"
        "img{max-width:100%}"
    )
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>Merge evaluation report</title>\n<style>{style}</style>\n</head>\n"
        f"<body>\n{body}</body>\n</html>\n"
    )


# ----------------------------------------------------------------------------- entry point


def build_report(
    rows: list[dict],
    out_dir: Path,
    *,
    baseline: str = "base",
    metrics: list[str] | None = None,
    oracle: dict[str, str] | None = None,
    min_gain: float = stats.DEFAULT_MIN_GAIN_PP,
    resamples: int = stats.DEFAULT_RESAMPLES,
    seed: int = 1234,
) -> dict:
    """Write the pivot CSV, the Markdown and HTML report and two plots for ``rows``.

    Each row: ``{"base": "1b-std", "size": "1b", "variant": "std", "kind": "base" |
    "adapter" | "merge", "name": "_base" | "<adapter>" | "<group>__<method>", "group",
    "method", "eval": Path}``, optionally ``"adapters"`` (a merge row's group members, the
    candidates for its default oracles). A row whose eval file does not exist is kept as
    ``pending eval``; a row whose baseline is absent or unevaluated as ``pending baseline``
    (its Δs are empty). Every eval file needs its per-document samples beside it
    (:func:`mergebake.evaluate.samples_path`).

    ``baseline``: ``"base"`` compares every row with the ``_base`` row of its base;
    an adapter name compares with that adapter's single-adapter row. ``metrics``: pivot
    columns as ``"task/metric"`` or ``"task/metric,filter"``; by default one per top-level
    task (``acc,none`` where present, else its first score key). ``oracle``: ``{task:
    adapter row name}`` (``report.oracle``); ``min_gain``: percentage points
    (``report.min_gain``); ``resamples`` and ``seed``: the bootstrap's
    (``report.bootstrap``, the config's ``seed``).

    Files (each written atomically): ``merge_eval_pivot.csv`` (columns ``size, variant,
    kind, name``, one per metric, ``Δ <metric>`` per metric, ``mean Δ``, then the bounds
    ``<metric> lo|hi``, ``Δ <metric> lo|hi``, ``mean Δ lo|hi``, and per metric ``oracle``,
    ``oracle − base (pp)``, ``usable``, ``retained``, then ``mean retained``; empty = no
    value), ``merge_eval_report.md``, ``merge_eval_report.html`` (the same, one page with
    the images inlined), ``merge_eval_scores.png`` (Δ heatmap) and ``method_ranking.png``
    (ranking with interval bars); text files are UTF-8.

    Returns ``{"baseline", "metrics": [column names], "ranking": {size: [{"method",
    "mean_delta", "lo", "hi", "mean_retained", "rank", "standing", "cells", "pending",
    "variants"}, ...]}, "pending": [{"base", "name", "status"}, ...]}``. Raises
    :class:`MergebakeError` on malformed rows, a malformed ``metrics`` entry, an unreadable
    eval file, a missing or mismatched samples file, rows scored on different documents,
    or an ``oracle`` entry naming an unknown task or a row that does not exist.
    """
    _check_rows(rows)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    boot = stats.Bootstrap(resamples, seed)
    df, names, delta_cols, columns, sign, mean_reps = _pivot(rows, baseline, metrics, boot)
    oracles = _retention(df, rows, columns, sign, oracle, min_gain)
    ranking = _ranking(df, mean_reps, boot)

    bounds = [c + s for c in names for s in (LO, HI)] + [
        c + s for c in delta_cols for s in (LO, HI)
    ]
    retention = [p + c for c in names for p in (ORACLE, GAIN, USABLE, RETAINED)]
    csv_df = df[
        [*ID_COLUMNS, *names, *delta_cols, MEAN_DELTA, *bounds, MEAN_DELTA + LO,
         MEAN_DELTA + HI, *retention, MEAN_RETAINED]
    ]  # fmt: skip
    # Bytes, so the "Δ" in headers is UTF-8 whatever the locale's default encoding is.
    with atomic_file(out_dir / CSV_NAME, "wb") as fh:
        fh.write(csv_df.to_csv(index=False, lineterminator="\n").encode("utf-8"))
    opts = {"min_gain": min_gain, "resamples": resamples, "seed": seed, "oracle": oracle}
    md = _markdown(df, names, delta_cols, ranking, oracles, baseline, opts)
    pngs = [SCORES_PNG, RANKING_PNG]
    curves = _sweep_curves(df, rows)
    if curves:  # only for a grid with a sweep: other grids' outputs stay as they were
        plots.plot_sweep(
            curves, out_dir / SWEEP_PNG, title="Sweeps: mean Δ against the swept value"
        )
        pngs.append(SWEEP_PNG)
        md += f"\n## Sweeps\n\n![mean Δ against each swept value]({SWEEP_PNG})\n"
    ckpt_curves, selections = _checkpoint_curves(df, rows)
    if ckpt_curves:  # only for a grid with checkpoints: other grids' outputs stay as they were
        plots.plot_sweep(
            ckpt_curves,
            out_dir / CHECKPOINT_PNG,
            title="Checkpoints: mean Δ against the training step (ring: selected)",
        )
        pngs.append(CHECKPOINT_PNG)
        md += _selection_markdown(selections)
    with atomic_file(out_dir / MD_NAME, "wb") as fh:
        fh.write(md.encode("utf-8"))
    _plot_heatmap(df, names, delta_cols, baseline, out_dir / SCORES_PNG)
    plots.plot_ranking(
        {
            size: [
                {"method": e["method"] or "?", "mean": e["mean_delta"], "lo": e["lo"],
                 "hi": e["hi"], "standing": e["standing"]}
                for e in entries
            ]
            for size, entries in ranking.items()
        },
        out_dir / RANKING_PNG,
        title="Merge methods: mean Δ per size, 95% paired-bootstrap intervals",
    )  # fmt: skip
    images = {n: (out_dir / n).read_bytes() for n in pngs}
    with atomic_file(out_dir / HTML_NAME, "wb") as fh:
        fh.write(_html(md, images).encode("utf-8"))

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


def _sweep_curves(df, rows: list[dict]) -> list[dict]:
    """Curves for :func:`mergebake.plots.plot_sweep`: per base, group, method and swept
    parameter (a row's ``sweep``: ``{"method", "parameters"}``) with one scalar number
    varying, mean Δ against the value, the other swept values fixed."""
    lines: dict[tuple, list[tuple[float, float]]] = {}
    for _, r in df.iterrows():
        sweep = rows[int(r["_row"])].get("sweep")
        if not sweep:
            continue
        params = sweep["parameters"]
        for p, v in params.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            rest = tuple(sorted((k, str(x)) for k, x in params.items() if k != p))
            key = (p, r["_base"], r["_group"], sweep["method"], rest)
            lines.setdefault(key, []).append((float(v), float(r[MEAN_DELTA])))
    curves = []
    for (p, base, group, method, rest), pts in lines.items():
        if len(pts) < 2:
            continue
        pts.sort()
        label = f"{base} {group}__{method}" + "".join(f" {k}={x}" for k, x in rest)
        curves.append(
            {"label": label, "parameter": p, "x": [x for x, _ in pts], "y": [y for _, y in pts]}
        )
    return curves


def _checkpoint_curves(df, rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """Curves for :func:`mergebake.plots.plot_sweep` of each adapter's checkpoint rows (a
    row's ``checkpoint``: ``{"adapter", "step", "selection"}``): mean Δ against the step,
    the selected step marked; and the selections read (``{"base", "adapter", ...the
    selection JSON}``; a selection not yet written is left out)."""
    lines: dict[tuple[str, str], list[tuple[int, float]]] = {}
    files: dict[tuple[str, str], str | None] = {}
    for _, r in df.iterrows():
        ck = rows[int(r["_row"])].get("checkpoint")
        if not ck:
            continue
        key = (r["_base"], ck["adapter"])
        lines.setdefault(key, []).append((int(ck["step"]), float(r[MEAN_DELTA])))
        files[key] = ck.get("selection")
    curves, selections = [], []
    for (base, adapter), pts in lines.items():
        pts.sort()
        f = files[(base, adapter)]
        sel = json.loads(Path(f).read_text()) if f and Path(f).is_file() else None
        if sel is not None:
            selections.append({"base": base, "adapter": adapter, **sel})
        choice = sel["choice"] if sel else None
        curves.append(
            {
                "label": f"{base} {adapter}",
                "parameter": "checkpoint (training step)",
                "x": [float(x) for x, _ in pts],
                "y": [y for _, y in pts],
                "marked": [x == choice for x, _ in pts],
            }
        )
    return curves, selections


def _selection_markdown(selections: list[dict]) -> str:
    """The report's checkpoint section: the curve and, per selection, its metric, mode,
    each checkpoint's score and the choice."""
    md = (
        "\n## Checkpoints\n\n"
        f"![mean Δ against each adapter's checkpoint]({CHECKPOINT_PNG})\n\n"
        "Selection: the checkpoint with the best value of the metric (max or min); equal "
        "values go to the earliest checkpoint.\n"
    )
    if selections:
        rows = [
            [
                s["base"],
                s["adapter"],
                s["metric"],
                s["mode"],
                ", ".join(f"{k}: {_fmt(v)}" for k, v in s["scores"].items()),
                f"**{s['choice']}**",
            ]
            for s in selections
        ]
        header = ["base", "adapter", "metric", "mode", "scores (step: value)", "selected"]
        md += "\n" + "\n".join(md_table(header, rows, ["l"] * 6)) + "\n"
    return md


def _plot_heatmap(df, names, delta_cols, baseline: str, path: Path) -> None:
    """Rows grouped by base (size, then variant); the baseline rows themselves left out."""
    ref = _baseline_name(baseline)
    keep = df[~((df["name"] == ref) & (df["kind"] == ("base" if ref == BASE_ROW else "adapter")))]
    labels = [
        (
            f"{r['size']}-{r['variant']}",
            r["name"] if r["kind"] != "adapter" else f"{r['name']} (adapter)",
        )
        for _, r in keep.iterrows()
    ]
    plots.plot_heatmap(
        labels,
        names,
        keep[names].to_numpy(dtype=float).tolist() if names else [[] for _ in labels],
        keep[delta_cols].to_numpy(dtype=float).tolist() if names else [[] for _ in labels],
        path,
        title=f"Score (Δ vs {'base' if ref == BASE_ROW else ref}) per row and metric",
    )
