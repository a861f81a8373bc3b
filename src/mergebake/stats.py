"""Uncertainty and retention: paired bootstrap intervals, "within noise" ties, oracle retention.

**Paired bootstrap.** Every row of the report is scored on the same documents, so a Δ
(row − baseline) is a statistic of per-document differences. One resample draws, for each
task, ``n`` of its ``n`` documents with replacement (the same draw for every row, so the
comparison stays paired and the rows' correlation is kept), and recomputes every score on
them; a 95% interval is the 2.5th and 97.5th percentiles of ``resamples`` such values
(Efron & Tibshirani, *An Introduction to the Bootstrap*, 1993, ch. 13, the percentile
interval; the paired design is that of Koehn, "Statistical significance tests for machine
translation evaluation", EMNLP 2004). The draws for a task come from
``numpy.random.default_rng([seed, crc32(task)])``: the same seed, task and document count
give the same draws whatever else is in the grid.

Scores here are lm-eval metrics whose aggregation is the mean over documents (``acc``,
``acc_norm``, ``exact_match``, ``f1``, ...), and group scores that average such tasks
(weighted by size, or not, as the group's ``aggregate_metric_list`` says). These are linear
in the per-document values, so a resampled Δ is the difference of the resampled scores and a
mean Δ the mean of resampled Δs: everything is computed from one ``(resamples,)`` vector per
row and score column.

**Within noise.** Methods whose mean-Δ interval overlaps the leader's are tied with it
("within noise"). Overlapping intervals is the conservative reading (two 95% intervals can
overlap while the paired difference is significant); it is the one a reader can check by
eye on the ranking plot.

**Retention.** For a task with base score ``b``, oracle score ``o`` (an adapter trained for
that task) and cell score ``c``: ``oracle − base (pp) = 100·(o − b)`` counted in the
metric's better direction, and ``retained = (c − b)/(o − b)``, the share of the oracle's own
gain the merge keeps (the "normalised score" of the model-merging literature, e.g. Ilharco
et al., "Editing models with task arithmetic", ICLR 2023, and Yadav et al., "TIES-Merging",
NeurIPS 2023). A task whose oracle gains less than ``min_gain`` pp is not usable: its ratio
divides by noise, so it is flagged and left out of averages.
"""

from __future__ import annotations

import gzip
import json
import math
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import MergebakeError
from .evaluate import SAMPLES_FORMAT, samples_path

DEFAULT_RESAMPLES = 1000
DEFAULT_MIN_GAIN_PP = 3.0
LEVEL = 0.95


# ----------------------------------------------------------------------------- samples


def load_samples(eval_json: Path) -> dict[str, Any]:
    """The per-document file written beside ``eval_json`` (see :func:`mergebake.evaluate.
    compact_samples` for its structure), parsed.

    Raises :class:`MergebakeError` naming the file when it is missing (eval JSONs written
    before per-document logging: re-run the eval step), unreadable, or of another format.
    """
    path = samples_path(Path(eval_json))
    try:
        data = json.loads(gzip.decompress(path.read_bytes()))
    except FileNotFoundError as e:
        raise MergebakeError(
            f"{path}: per-document samples not found beside {Path(eval_json).name}; the report "
            "needs them for its intervals: re-run the eval step (delete the eval JSON, or "
            "run snakemake with --forcerun eval_cell eval_baseline)"
        ) from e
    except (OSError, EOFError, ValueError) as e:
        raise MergebakeError(
            f"{path}: not a gzipped JSON samples file ({e}); re-run the eval step"
        ) from e
    if not isinstance(data, dict) or data.get("format") != SAMPLES_FORMAT:
        raise MergebakeError(
            f"{path}: format {data.get('format') if isinstance(data, dict) else None!r}, "
            f"expected {SAMPLES_FORMAT!r}; re-run the eval step"
        )
    return data


@dataclass(frozen=True)
class Column:
    """Per-document values of one score column of one row.

    ``strata``: one ``(task, digest, values)`` per leaf task, ``values`` a float64 array of
    shape ``(n_task,)`` in document-id order; ``weights``: the weight of each stratum's
    mean in the score (its size, or 1 for an unweighted group mean).
    """

    strata: tuple[tuple[str, str, np.ndarray], ...]
    weights: tuple[float, ...]

    @property
    def value(self) -> float:
        """The score itself: the weighted mean of the strata's means."""
        w = np.asarray(self.weights)
        return float(np.dot(w, [v.mean() for _, _, v in self.strata]) / w.sum())


def column(samples: dict[str, Any], eval_json: Path, task: str, key: str) -> Column:
    """The :class:`Column` of score ``key`` (``"<metric>,<filter>"``) of ``task``.

    A group's column pools its leaf tasks as lm-eval aggregates them (by size when its
    ``aggregate_metric_list`` says ``weight_by_size``, else each task's mean counts once).
    Raises :class:`MergebakeError` naming the samples file when the task, or ``key`` for
    it, has no per-document values, or when the metric does not aggregate by the mean (no
    bootstrap for corpus-level metrics such as perplexities or BLEU yet).
    """
    path = samples_path(Path(eval_json))
    tasks = samples.get("tasks") or {}
    group = (samples.get("groups") or {}).get(task)
    leaves = [task] if task in tasks or group is None else group["tasks"]
    metric = key.partition(",")[0]
    strata, weights = [], []
    for leaf in leaves:
        entry = tasks.get(leaf)
        if entry is None:
            raise MergebakeError(
                f"{path}: no samples logged for task {leaf!r}"
                + (f" (of group {task!r})" if leaf != task else "")
                + "; re-run the eval step"
            )
        values = entry["values"].get(key)
        if values is None:
            agg = entry.get("aggregation", {}).get(metric)
            why = (
                f"it aggregates by {agg!r}, not by the mean over documents, and has no "
                "bootstrap here; leave it out of report.metrics"
                if agg not in (None, "mean")
                else "re-run the eval step"
            )
            raise MergebakeError(
                f"{path}: no per-document values of {key!r} for task {leaf!r}; {why}"
            )
        arr = np.asarray(values, dtype=np.float64)
        strata.append((leaf, entry["docs_sha256"], arr))
        by_size = leaf == task or group["weight_by_size"].get(metric, True)
        weights.append(float(len(arr)) if by_size else 1.0)
    return Column(tuple(strata), tuple(weights))


def check_paired(a: Column, b: Column, a_name: str, b_name: str) -> None:
    """Raise :class:`MergebakeError` unless ``a`` and ``b`` were scored on the same documents."""
    sa = [(t, d, len(v)) for t, d, v in a.strata]
    sb = [(t, d, len(v)) for t, d, v in b.strata]
    if sa != sb:
        raise MergebakeError(
            f"{a_name} and {b_name} were not scored on the same documents "
            f"({[(t, n) for t, _, n in sa]} vs {[(t, n) for t, _, n in sb]}, or their "
            "document hashes differ); a paired Δ needs both on the same data: re-run both "
            "evals with the same eval.limit and task files"
        )


# ----------------------------------------------------------------------------- bootstrap


def resample_counts(task: str, n: int, resamples: int, seed: int) -> np.ndarray:
    """How often each of ``n`` documents is drawn in each resample: int64 ``(resamples, n)``.

    Row ``b`` counts the draws ``numpy.random.default_rng([seed, crc32(task)]).integers(0,
    n, size=(resamples, n))[b]``; each row sums to ``n``.
    """
    if n <= 0:
        raise MergebakeError(f"bootstrap: task {task!r} has no documents")
    rng = np.random.default_rng([seed, zlib.crc32(task.encode("utf-8"))])
    idx = rng.integers(0, n, size=(resamples, n))
    flat = (np.arange(resamples)[:, None] * n + idx).ravel()
    return np.bincount(flat, minlength=resamples * n).reshape(resamples, n)


class Bootstrap:
    """Paired bootstrap replicates of scores, sharing each task's document draws.

    ``resamples`` (int >= 1), ``seed`` (int), ``level`` (the interval's coverage, 0-1).
    """

    def __init__(self, resamples: int = DEFAULT_RESAMPLES, seed: int = 1234, level: float = LEVEL):
        if isinstance(resamples, bool) or not isinstance(resamples, int) or resamples < 1:
            raise MergebakeError(
                f"report.bootstrap: {resamples!r} resamples; use an integer >= 1 (e.g. 1000)"
            )
        self.resamples, self.seed, self.level = resamples, seed, level
        self._counts: dict[tuple[str, int], np.ndarray] = {}

    def counts(self, task: str, n: int) -> np.ndarray:
        """:func:`resample_counts` as float64, cached per ``(task, n)``."""
        key = (task, n)
        if key not in self._counts:
            self._counts[key] = resample_counts(task, n, self.resamples, self.seed).astype(
                np.float64
            )
        return self._counts[key]

    def replicates(self, col: Column) -> np.ndarray:
        """The score of ``col`` on every resample: float64 ``(resamples,)``."""
        w = np.asarray(col.weights)
        out = np.zeros(self.resamples)
        for (task, _, values), wi in zip(col.strata, w, strict=True):
            out += wi * (self.counts(task, len(values)) @ values) / len(values)
        return out / w.sum()

    def interval(self, replicates: np.ndarray) -> tuple[float, float]:
        """The percentile interval of ``replicates`` at ``level``: ``(lo, hi)``."""
        return interval(replicates, self.level)


def interval(replicates: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """``(lo, hi)``: the ``(1-level)/2`` and ``(1+level)/2`` quantiles of ``replicates``
    (numpy's default linear interpolation); ``(nan, nan)`` when any replicate is NaN."""
    r = np.asarray(replicates, dtype=np.float64)
    if r.size == 0 or np.isnan(r).any():
        return (math.nan, math.nan)
    lo, hi = np.quantile(r, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


# ----------------------------------------------------------------------------- within noise


def mark_ties(entries: list[dict[str, Any]]) -> list[str | None]:
    """For each ``{"mean", "lo", "hi"}`` (means may be None), its standing.

    ``"leader"`` for the highest mean (first one on equal means), ``"tied"`` where its
    interval overlaps the leader's (closed intervals: touching counts), ``"behind"``
    where it lies wholly below, ``None`` without a mean. Entries with a mean but no
    interval (NaN bounds) count as tied: nothing shows them apart.
    """
    scored = [i for i, e in enumerate(entries) if e.get("mean") is not None]
    out: list[str | None] = [None] * len(entries)
    if not scored:
        return out
    lead = max(scored, key=lambda i: (entries[i]["mean"], -i))
    out[lead] = "leader"
    llo = entries[lead].get("lo")
    for i in scored:
        if i == lead:
            continue
        hi = entries[i].get("hi")
        known = hi is not None and llo is not None and not (math.isnan(hi) or math.isnan(llo))
        out[i] = "behind" if known and hi < llo else "tied"
    return out


def _ci(e: dict[str, Any]) -> str:
    lo, hi = e.get("lo"), e.get("hi")
    if lo is None or hi is None or math.isnan(lo) or math.isnan(hi):
        return f"{e['mean']:+.3f}"
    return f"{e['mean']:+.3f} (95% CI {lo:+.3f} to {hi:+.3f})"


def _names(items: list[str]) -> str:
    items = [f"`{x}`" for x in items]
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def ranking_sentence(size: str, entries: list[dict[str, Any]]) -> str:
    """One paragraph that reads a size's method ranking as an expert would.

    ``entries``: ``{"method", "mean", "lo", "hi"}`` best first, as ranked. Says which
    method leads, which are within noise of it (intervals overlap) and which are behind,
    and whether the leader's gain is distinguishable from zero.
    """
    marks = mark_ties(entries)
    scored = [(e, m) for e, m in zip(entries, marks, strict=True) if m is not None]
    if not scored:
        return f"{size}: no method has a mean Δ yet."
    leader = next(e for e, m in scored if m == "leader")
    tied = [e for e, m in scored if m == "tied"]
    behind = [e for e, m in scored if m == "behind"]
    lo, hi = leader.get("lo"), leader.get("hi")
    if lo is None or hi is None or math.isnan(lo) or math.isnan(hi):
        sign = ""
    elif lo > 0:
        sign = " Its interval lies above zero: a real gain over the baseline."
    elif hi < 0:
        sign = " Its interval lies below zero: a real loss against the baseline."
    else:
        sign = " Its interval includes zero: not distinguishable from the baseline."
    if len(scored) == 1:
        return f"{size}: only `{leader['method']}` has a mean Δ, {_ci(leader)}.{sign}"
    if not behind:
        return (
            f"{size}: `{leader['method']}` has the highest mean Δ, {_ci(leader)}, but "
            + ("both" if len(scored) == 2 else f"all {len(scored)}")
            + " methods are within noise of each other (their intervals overlap the "
            f"leader's); method choice is largely interchangeable at {size}.{sign}"
        )
    text = f"{size}: `{leader['method']}` leads with mean Δ {_ci(leader)}."
    if tied:
        verb = "is" if len(tied) == 1 else "are"
        text += (
            f" {_names([e['method'] for e in tied])} {verb} within noise of it (intervals "
            "overlap): the data do not separate them."
        )
    else:
        text += " No other method's interval overlaps its: the lead is beyond noise."
    verb = "is" if len(behind) == 1 else "are"
    text += f" {_names([e['method'] for e in behind])} {verb} behind beyond noise."
    return text + sign


# ----------------------------------------------------------------------------- retention


def oracle_gain_pp(base: float, oracle: float, *, lower_is_better: bool = False) -> float:
    """``100·(oracle − base)`` in the metric's better direction (percentage points when the
    metric is a fraction; NaN when either is missing)."""
    if base is None or oracle is None:
        return math.nan
    return 100.0 * (base - oracle if lower_is_better else oracle - base)


def retained(cell: float, base: float, oracle: float) -> float:
    """``(cell − base)/(oracle − base)``: 1 keeps all of the oracle's gain, 0 none, < 0 is
    worse than the base; NaN when the oracle equals the base or a value is missing. The
    direction of the metric cancels out."""
    if cell is None or base is None or oracle is None:
        return math.nan
    if any(isinstance(x, float) and math.isnan(x) for x in (cell, base, oracle)):
        return math.nan
    if oracle == base:
        return math.nan
    return (cell - base) / (oracle - base)


def usable(gain_pp: float, min_gain_pp: float = DEFAULT_MIN_GAIN_PP) -> bool:
    """Whether a task's oracle gains enough over the base for a retention ratio to mean
    something: ``gain_pp >= min_gain_pp`` (False for NaN)."""
    return bool(not math.isnan(gain_pp) and gain_pp >= min_gain_pp)


def choose_oracle(
    candidates: dict[str, float | None], *, lower_is_better: bool = False
) -> str | None:
    """The default oracle of a task among a group's adapters: the one scoring best on it.

    ``candidates``: ``{adapter: score on the task's first reported metric, or None}`` in
    group order; equal scores go to the earlier adapter. None when no candidate is scored.
    """
    best, best_val = None, None
    for name, v in candidates.items():
        if v is None or (isinstance(v, float) and math.isnan(v)):
            continue
        key = -v if lower_is_better else v
        if best_val is None or key > best_val:
            best, best_val = name, key
    return best
