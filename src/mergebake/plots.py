"""The report's pictures: a Δ heatmap of every row × score column, and the method ranking
with interval bars. Matplotlib (object API, no pyplot state), PNG at 100 dpi, sized so that
labels never overlap at the default size; written without the ``Software`` metadata entry,
so equal inputs give equal bytes.

Sweep curves (:func:`plot_sweep`: a method parameter's values against mean Δ, one line per
base, group and method) are drawn when the grid has a sweep. Checkpoint curves (an
adapter's training steps, with the selected point marked) are still to come: the same
function with ``marked`` points.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .outputs import atomic_file

#: The diverging colour map of Δs: red for a loss, blue for a gain, white at 0.
CMAP = "RdBu"


def _save_png(fig, path: Path) -> None:
    with atomic_file(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=100, metadata={"Software": None})


def _nan(x: Any) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def plot_heatmap(
    labels: list[tuple[str, str]],
    columns: list[str],
    values: list[list[float]],
    deltas: list[list[float]],
    path: Path,
    *,
    title: str,
) -> None:
    """Heatmap of rows × score columns, coloured by Δ, each cell printing value and Δ.

    ``labels``: ``[(group label, row label)]`` per row, rows of one group (e.g. ``1b-std``)
    adjacent; a line separates groups and the group label is printed once. ``values`` and
    ``deltas``: ``[row][column]`` floats in metric units (NaN: no value; the cell is grey
    and prints "–"). The colour scale is symmetric around 0 (white) at the largest |Δ|.
    """
    import matplotlib
    import numpy as np
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.figure import Figure

    n_rows, n_cols = len(labels), len(columns)
    if n_rows == 0 or n_cols == 0:
        fig = Figure(figsize=(4.0, 1.0))
        fig.text(0.5, 0.5, f"{title}: no rows to show", ha="center", va="center")
        _save_png(fig, path)
        return
    d = np.array(deltas, dtype=float).reshape(n_rows, n_cols)
    finite = np.abs(d[np.isfinite(d)])
    vmax = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
    with matplotlib.rc_context({"font.size": 9}):
        fig = Figure(figsize=(3.2 + 1.35 * max(1, n_cols), 1.4 + 0.32 * max(1, n_rows)))
        ax = fig.add_subplot()
        cmap = matplotlib.colormaps[CMAP].with_extremes(bad="#dddddd")
        im = ax.imshow(
            np.ma.masked_invalid(d),
            cmap=cmap,
            norm=TwoSlopeNorm(vcenter=0.0, vmin=-vmax, vmax=vmax),
            aspect="auto",
            interpolation="nearest",
        )
        for i in range(n_rows):
            for j in range(n_cols):
                v, dv = values[i][j], d[i, j]
                if _nan(v):
                    text = "–"
                elif math.isnan(dv):
                    text = f"{v:.3f}"
                else:
                    text = f"{v:.3f} ({dv + 0.0:+.3f})"
                dark = not math.isnan(dv) and abs(dv) > 0.6 * vmax
                ax.text(
                    j, i, text, ha="center", va="center", fontsize=8,
                    color="white" if dark else "black",
                )  # fmt: skip
        ax.set_xticks(range(n_cols), columns)
        ax.xaxis.tick_top()
        ax.set_yticks(range(n_rows), [r for _, r in labels])
        # One label per group, left of the row labels, and a line between groups.
        starts = [i for i in range(n_rows) if i == 0 or labels[i][0] != labels[i - 1][0]]
        for k, s in enumerate(starts):
            end = starts[k + 1] if k + 1 < len(starts) else n_rows
            if s > 0:
                ax.axhline(s - 0.5, color="black", linewidth=1.2)
            ax.annotate(
                labels[s][0],
                xy=(0, 1 - (s + end) / 2 / n_rows),
                xycoords="axes fraction",
                xytext=(-(5.6 * max(len(r) for _, r in labels) + 14), 0),
                textcoords="offset points",
                ha="right",
                va="center",
                fontweight="bold",
            )
        ax.tick_params(length=0)
        cbar = fig.colorbar(im, ax=ax, fraction=0.05, pad=0.02)
        cbar.set_label("Δ vs baseline (metric units)")
        ax.set_title(title, pad=24, fontsize=10)
        fig.tight_layout()
        _save_png(fig, path)


def plot_ranking(sizes: dict[str, list[dict[str, Any]]], path: Path, *, title: str) -> None:
    """Method ranking per size: each method's mean Δ as a dot with its interval as a bar.

    ``sizes``: ``{size: [{"method", "mean", "lo", "hi", "standing"}, ...]}`` best first
    (``standing`` from :func:`mergebake.stats.mark_ties`; ``mean`` None when pending). One
    panel row per size; the leader's interval is shaded so overlaps ("within noise") show.
    """
    import matplotlib
    from matplotlib.figure import Figure

    rows = [(size, e) for size, es in sizes.items() for e in es]
    with matplotlib.rc_context({"font.size": 9}):
        fig = Figure(figsize=(7.0, 1.3 + 0.38 * max(1, len(rows)) + 0.25 * len(sizes)))
        ax = fig.add_subplot()
        y = 0
        ticks, tick_labels = [], []
        colours = {"leader": "#1f4e99", "tied": "#5b8fd6", "behind": "#a0a0a0"}
        for k, (size, entries) in enumerate(sizes.items()):
            top = y
            lead = next((e for e in entries if e.get("standing") == "leader"), None)
            for e in entries:
                ticks.append(y)
                tick_labels.append(f"{size}  {e['method']}")
                if e.get("mean") is None:
                    ax.text(0, y, "pending", va="center", ha="left", fontsize=8, style="italic")
                else:
                    c = colours.get(e.get("standing") or "", "black")
                    if not (_nan(e.get("lo")) or _nan(e.get("hi"))):
                        ax.plot([e["lo"], e["hi"]], [y, y], color=c, linewidth=3)
                    ax.plot([e["mean"]], [y], "o", color=c, markersize=7)
                    word = {"tied": "  within noise", "behind": "  behind"}.get(
                        e.get("standing") or "", "  leader" if len(entries) > 1 else ""
                    )
                    ax.annotate(
                        f"{e['mean'] + 0.0:+.3f}{word}",
                        xy=(e["hi"] if not _nan(e.get("hi")) else e["mean"], y),
                        xytext=(6, 0),
                        textcoords="offset points",
                        va="center",
                        fontsize=8,
                    )
                y += 1
            if lead is not None and not (_nan(lead.get("lo")) or _nan(lead.get("hi"))):
                ax.axvspan(lead["lo"], lead["hi"], ymin=0, ymax=1, alpha=0)  # keeps x range
                ax.fill_betweenx(
                    [top - 0.45, y - 0.55], lead["lo"], lead["hi"], color="#1f4e99", alpha=0.1
                )
            if k + 1 < len(sizes):
                ax.axhline(y - 0.5 + 0.25, color="#cccccc", linewidth=0.8)
            y += 0.5
        ax.axvline(0.0, color="black", linewidth=0.8)
        ax.set_yticks(ticks, tick_labels)
        ax.set_ylim(y - 0.5, -0.7)
        ax.set_xlabel("mean Δ vs baseline (metric units); bars: 95% paired-bootstrap interval")
        ax.set_title(title, fontsize=10)
        left, right = ax.get_xlim()
        ax.set_xlim(left, right + 0.35 * (right - left))  # room for the value labels
        fig.tight_layout()
        _save_png(fig, path)


def plot_sweep(curves: list[dict[str, Any]], path: Path, *, title: str) -> None:
    """One panel per swept parameter: each curve's y against the parameter's values.

    ``curves``: ``[{"label", "parameter", "x": [float], "y": [float], "marked": [bool]?}]``
    (x ascending; y in metric units, NaN where not scored; a marked point, e.g. a selected
    checkpoint, is drawn as a ring). Panels in order of first appearance.
    """
    import matplotlib
    from matplotlib.figure import Figure

    params = list(dict.fromkeys(c["parameter"] for c in curves))
    with matplotlib.rc_context({"font.size": 9}):
        fig = Figure(figsize=(6.0, 1.2 + 3.0 * max(1, len(params))))
        if not params:
            fig.text(0.5, 0.5, f"{title}: no sweep in the grid", ha="center", va="center")
        for k, param in enumerate(params):
            ax = fig.add_subplot(len(params), 1, k + 1)
            for c in (c for c in curves if c["parameter"] == param):
                ax.plot(c["x"], c["y"], "o-", label=c["label"], markersize=4)
                for x, y, m in zip(c["x"], c["y"], c.get("marked") or [], strict=False):
                    if m and not _nan(y):
                        ax.plot([x], [y], "o", mfc="none", mec="black", markersize=11)
            ax.axhline(0.0, color="#888888", linewidth=0.8)
            ax.set_xlabel(param)
            ax.set_ylabel("mean Δ")
            ax.legend(fontsize=7, loc="best")
            if k == 0:
                ax.set_title(title)
        fig.tight_layout()
        _save_png(fig, path)
