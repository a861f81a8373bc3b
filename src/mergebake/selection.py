"""Checkpoint selection: pick one of an adapter's checkpoints from their baseline scores.

An adapter with ``checkpoints:`` and ``select: {metric, mode}`` is scored once per
checkpoint (base + that checkpoint, a baseline row ``<adapter>@<step>``); the
``select_checkpoint`` job (a Snakemake ``checkpoint``) reads those scores and writes the
choice, which groups use as ``<adapter>@best``.

The rule: the checkpoint with the highest (``mode: max``) or lowest (``mode: min``) value
of ``metric`` wins; equal values go to the earliest checkpoint (smallest step), so the
choice never depends on file order. A checkpoint whose eval lacks the metric is an error.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from . import MergebakeError
from .evaluate import load_scores
from .outputs import atomic_file


def metric_key(metric: str) -> tuple[str, str]:
    """``"task/metric[,filter]"`` as ``(task, "<metric>,<filter>")`` (filter ``none`` when
    absent), the key lm-eval's scores use."""
    task, sep, rest = metric.rpartition("/")
    if not sep or not task or not rest:
        raise MergebakeError(f"select metric {metric!r} must look like 'task/metric'")
    return task, rest if "," in rest else f"{rest},none"


def choose(values: Mapping[int, float], mode: str) -> int:
    """The step whose value is best for ``mode`` (``max``/``min``); ties go to the smallest
    step. Raises :class:`MergebakeError` for an empty mapping, a NaN or an unknown mode."""
    if mode not in ("max", "min"):
        raise MergebakeError(f"select mode {mode!r}: use max or min")
    if not values:
        raise MergebakeError("select: no checkpoint scores to choose from")
    if any(v != v for v in values.values()):
        raise MergebakeError(f"select: a score is NaN ({dict(values)})")
    sign = -1.0 if mode == "max" else 1.0
    return min(values, key=lambda step: (sign * values[step], step))


def select_checkpoint(
    scores: Mapping[int, str | Path], metric: str, mode: str = "max"
) -> dict[str, Any]:
    """Pick a checkpoint from eval JSONs (``{step: path}``, as
    :func:`mergebake.evaluate.load_scores` reads them) by ``metric`` (``task/metric``,
    lm-eval units, e.g. ``acc`` as a fraction) and ``mode``.

    Returns ``{"choice": step, "metric", "mode", "scores": {step (str): value}}`` (steps
    ascending). Raises :class:`MergebakeError` naming the file whose eval lacks the metric.
    """
    task, key = metric_key(metric)
    values: dict[int, float] = {}
    for step, f in sorted(scores.items()):
        got = load_scores(Path(f)).get(task, {})
        if key not in got:
            raise MergebakeError(
                f"{f}: no score {metric!r} (task {task!r} has {sorted(got) or 'no scores'}); "
                "fix the adapter's select.metric"
            )
        values[int(step)] = float(got[key])
    return dict(
        choice=choose(values, mode),
        metric=metric,
        mode=mode,
        scores={str(s): v for s, v in values.items()},
    )


def cli_select(scores: list[str], metric: str, mode: str, out: str | Path) -> dict[str, Any]:
    """``mergebake select-checkpoint``: ``scores`` as ``STEP=EVAL_JSON``; writes the
    selection JSON to ``out`` atomically and returns it."""
    parsed: dict[int, str] = {}
    for s in scores:
        step, sep, f = s.partition("=")
        if not sep or not step.isdigit():
            raise MergebakeError(f"--score {s!r}: expected STEP=EVAL_JSON")
        parsed[int(step)] = f
    result = select_checkpoint(parsed, metric, mode)
    with atomic_file(out) as fh:
        fh.write(json.dumps(result, sort_keys=True, indent=1) + "\n")
    print(json.dumps(result, sort_keys=True))
    return result
