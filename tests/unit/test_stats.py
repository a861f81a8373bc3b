"""stats: the paired bootstrap against hand computations, "within noise" ties, retention."""

from __future__ import annotations

import gzip
import json
import math
import zlib

import numpy as np
import pytest

from mergebake import MergebakeError, stats
from mergebake.evaluate import SAMPLES_FORMAT, compact_samples, samples_path, write_samples


def col(task: str, values, digest: str = "d") -> stats.Column:
    arr = np.asarray(values, dtype=np.float64)
    return stats.Column(((task, digest, arr),), (float(len(arr)),))


def hand_quantile(xs: list[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default), by hand."""
    xs = sorted(xs)
    pos = q * (len(xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (pos - lo) * (xs[hi] - xs[lo])


def test_paired_bootstrap_equals_hand_computation():
    """Δ replicates and interval on fixed samples, recomputed draw by draw in plain Python."""
    cell = [1, 0, 1, 1, 0, 1, 1, 0]
    base = [0, 0, 1, 0, 0, 1, 0, 0]
    boot = stats.Bootstrap(resamples=7, seed=3)
    delta = boot.replicates(col("t", cell)) - boot.replicates(col("t", base))
    # The same draws, by hand: resample b takes documents idx[b] (with replacement).
    idx = np.random.default_rng([3, zlib.crc32(b"t")]).integers(0, 8, size=(7, 8))
    by_hand = [sum(cell[i] - base[i] for i in row) / 8 for row in idx.tolist()]
    assert delta.tolist() == pytest.approx(by_hand, abs=1e-12)
    lo, hi = boot.interval(delta)
    assert lo == pytest.approx(hand_quantile(by_hand, 0.025), abs=1e-12)
    assert hi == pytest.approx(hand_quantile(by_hand, 0.975), abs=1e-12)
    # Seeded: the same call gives the same numbers; another seed other draws.
    again = stats.Bootstrap(resamples=7, seed=3)
    assert (again.replicates(col("t", cell)) == boot.replicates(col("t", cell))).all()
    other = stats.Bootstrap(resamples=7, seed=4).replicates(col("t", cell))
    assert not (other == boot.replicates(col("t", cell))).all()


def test_bootstrap_on_two_documents_follows_the_exact_distribution():
    """d = [0, 1]: a resample's mean is 0, 1/2 or 1 with probabilities 1/4, 1/2, 1/4."""
    boot = stats.Bootstrap(resamples=20000, seed=1)
    reps = boot.replicates(col("t", [0, 1]))
    assert set(np.unique(reps).tolist()) == {0.0, 0.5, 1.0}
    freq = {v: float(np.mean(reps == v)) for v in (0.0, 0.5, 1.0)}
    assert freq[0.0] == pytest.approx(0.25, abs=0.01)
    assert freq[0.5] == pytest.approx(0.50, abs=0.01)
    assert boot.interval(reps) == (0.0, 1.0)
    # One document: no spread at all.
    one = stats.Bootstrap(resamples=50, seed=1).replicates(col("u", [0.7]))
    assert stats.interval(one) == (pytest.approx(0.7), pytest.approx(0.7))


def test_bootstrap_agrees_with_scipy_paired_percentile():
    """Same statistic as scipy.stats.bootstrap(paired=True, method='percentile')."""
    from scipy.stats import bootstrap

    rng = np.random.default_rng(0)
    x = (rng.random(200) < 0.6).astype(float)
    y = (rng.random(200) < 0.5).astype(float)
    b = stats.Bootstrap(resamples=20000, seed=9)
    lo, hi = b.interval(b.replicates(col("t", x)) - b.replicates(col("t", y)))
    ref = bootstrap(
        (x, y),
        lambda a, c, axis=-1: np.mean(a - c, axis=axis),
        paired=True,
        vectorized=True,
        n_resamples=20000,
        method="percentile",
        random_state=np.random.default_rng(5),
    ).confidence_interval
    # Two independent Monte-Carlo runs: bounds agree to well under one document (1/200).
    assert lo == pytest.approx(ref.low, abs=0.004)
    assert hi == pytest.approx(ref.high, abs=0.004)


def test_group_column_pools_its_tasks(tmp_path):
    """A size-weighted group score is the pooled mean; its replicates pool the strata."""
    samples = {
        "format": SAMPLES_FORMAT,
        "tasks": {
            "a": {"doc_ids": [0, 1], "docs_sha256": "x", "values": {"acc,none": [1, 1]}},
            "b": {
                "doc_ids": [0, 1, 2, 3],
                "docs_sha256": "y",
                "values": {"acc,none": [0, 0, 0, 1]},
            },
        },
        "groups": {"g": {"tasks": ["a", "b"], "weight_by_size": {"acc": True}}},
    }
    c = stats.column(samples, tmp_path / "e.json", "g", "acc,none")
    assert c.value == pytest.approx(3 / 6)
    samples["groups"]["g"]["weight_by_size"] = {"acc": False}
    c = stats.column(samples, tmp_path / "e.json", "g", "acc,none")
    assert c.value == pytest.approx((1.0 + 0.25) / 2)
    b = stats.Bootstrap(resamples=5, seed=0)
    ca, cb = b.counts("a", 2), b.counts("b", 4)
    by_hand = [(ca[i] @ [1, 1] / 2 + cb[i] @ [0, 0, 0, 1] / 4) / 2 for i in range(5)]
    assert b.replicates(c).tolist() == pytest.approx(by_hand)


def test_samples_errors_name_the_file(tmp_path):
    ev = tmp_path / "cell.json"
    with pytest.raises(MergebakeError, match=r"cell\.samples\.json\.gz.*re-run the eval"):
        stats.load_samples(ev)
    write_samples(samples_path(ev), compact_samples({}, {}))
    data = stats.load_samples(ev)
    with pytest.raises(
        MergebakeError, match=r"cell\.samples\.json\.gz: no samples logged for task 't'"
    ):
        stats.column(data, ev, "t", "acc,none")
    data["tasks"]["t"] = {
        "doc_ids": [0],
        "docs_sha256": "x",
        "values": {},
        "aggregation": {"bleu": "bleu"},
    }
    with pytest.raises(MergebakeError, match="aggregates by 'bleu'"):
        stats.column(data, ev, "t", "bleu,none")
    samples_path(ev).write_bytes(gzip.compress(json.dumps({"format": "other"}).encode()))
    with pytest.raises(MergebakeError, match="format"):
        stats.load_samples(ev)


def test_check_paired():
    stats.check_paired(col("t", [1, 0]), col("t", [0, 0]), "a", "b")
    with pytest.raises(MergebakeError, match="same documents"):
        stats.check_paired(col("t", [1, 0]), col("t", [0, 0, 1]), "a.json", "b.json")
    with pytest.raises(MergebakeError, match="a.json and b.json"):
        stats.check_paired(col("t", [1, 0], "d1"), col("t", [0, 0], "d2"), "a.json", "b.json")


# ----------------------------------------------------------------------------- within noise


def test_within_noise_overlapping_intervals_are_tied():
    entries = [
        {"method": "ties", "mean": 0.050, "lo": 0.020, "hi": 0.080},
        {"method": "task_arithmetic", "mean": 0.0495, "lo": 0.019, "hi": 0.079},
        {"method": "linear", "mean": 0.030, "lo": 0.000, "hi": 0.021},  # touches 0.020? no
    ]
    assert stats.mark_ties(entries) == ["leader", "tied", "tied"]
    text = stats.ranking_sentence("4b", entries)
    assert "all 3 methods are within noise" in text
    assert "largely interchangeable at 4b" in text
    assert "lies above zero" in text


def test_within_noise_separated_intervals_are_behind():
    entries = [
        {"method": "ties", "mean": 0.20, "lo": 0.15, "hi": 0.25},
        {"method": "linear", "mean": 0.17, "lo": 0.12, "hi": 0.22},
        {"method": "task_arithmetic", "mean": 0.02, "lo": -0.03, "hi": 0.07},
        {"method": "dare", "mean": None, "lo": None, "hi": None},
    ]
    assert stats.mark_ties(entries) == ["leader", "tied", "behind", None]
    text = stats.ranking_sentence("1b", entries)
    assert text.startswith("1b: `ties` leads with mean Δ +0.200 (95% CI +0.150 to +0.250).")
    assert "`linear` is within noise of it" in text
    assert "`task_arithmetic` is behind beyond noise" in text
    alone = stats.ranking_sentence("1b", [entries[0], entries[2]])
    assert "the lead is beyond noise" in alone
    zero = [{"method": "ties", "mean": 0.01, "lo": -0.02, "hi": 0.04}]
    assert "not distinguishable from the baseline" in stats.ranking_sentence("12b", zero)
    # The leader is found by mean, whatever the order given.
    assert stats.mark_ties(list(reversed(entries[:3]))) == ["behind", "tied", "leader"]


# ----------------------------------------------------------------------------- retention


def test_retention_and_usable_flags_on_published_numbers():
    """A table in the style of a published cross-model adapter study (scores in %):
    a task whose oracle gains 0.669 pp over the base is not usable; 8.667 pp is."""
    table = {
        # task: (base, oracle, merged cell)
        "nrk_quiz": (45.000, 45.669, 45.400),
        "norquad": (30.000, 38.667, 35.000),
    }
    rows = {}
    for task, (b, o, c) in table.items():
        gain = stats.oracle_gain_pp(b / 100, o / 100)
        rows[task] = (gain, stats.usable(gain, 3.0), stats.retained(c / 100, b / 100, o / 100))
    assert rows["nrk_quiz"][0] == pytest.approx(0.669, abs=1e-9)
    assert rows["nrk_quiz"][1] is False
    assert rows["norquad"][0] == pytest.approx(8.667, abs=1e-9)
    assert rows["norquad"][1] is True
    assert rows["norquad"][2] == pytest.approx(5.0 / 8.667)
    assert rows["nrk_quiz"][2] == pytest.approx(0.4 / 0.669)
    # Lower-is-better: the gain counts a drop; the ratio's sign cancels.
    assert stats.oracle_gain_pp(10.0, 8.0, lower_is_better=True) == pytest.approx(200.0)
    assert stats.retained(9.0, 10.0, 8.0) == pytest.approx(0.5)
    assert math.isnan(stats.retained(0.5, 0.4, 0.4))
    assert not stats.usable(math.nan)
    assert stats.usable(3.0, 3.0)


def test_choose_oracle():
    assert stats.choose_oracle({"eng": 0.8, "nob": 0.5}) == "eng"
    assert stats.choose_oracle({"eng": 0.5, "nob": 0.5}) == "eng"  # equal: group order
    assert stats.choose_oracle({"eng": 10.0, "nob": 8.0}, lower_is_better=True) == "nob"
    assert stats.choose_oracle({"eng": None, "nob": 0.1}) == "nob"
    assert stats.choose_oracle({"eng": None}) is None
