"""The exact selection: mergekit's magnitude trimming without its full sort.

``sort_select`` models the platform's ``std::sort`` (libstdc++ introsort) and follows it
only into the ranges around the cut-offs; these tests hold the kept sets against
``torch.argsort``/``torch.sort`` themselves and the trimmed tensors against mergekit's
``sparsify``, bit for bit, on inputs that tie by the thousand at the cut-off.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from mergekit.sparsify import RescaleNorm, SparsificationMethod, sparsify

from mergebake import sort_select
from mergebake.merge_stream import exact_sparsify


def _tie_heavy(n: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if seed % 3 == 0:  # few distinct magnitudes: whole classes straddle the cut-off
        return (torch.randint(-4, 5, (n,), generator=g).float() * 0.125).to(dtype)
    return (torch.randn(n, generator=g) * 0.01).to(dtype)  # bf16: ~1000s of ties per value


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


@pytest.mark.skipif(sys.platform != "linux", reason="the model is of libstdc++'s std::sort")
def test_the_model_matches_this_platforms_sort():
    assert sort_select.platform_matches()


@pytest.mark.parametrize("n", [1, 2, 16, 17, 100, 4097, 250_000])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kept_sets_equal_torch_sorts(n, dtype, seed):
    x = _tie_heavy(n, dtype, seed)
    w = x.abs().float()
    desc = torch.argsort(w, descending=True)
    asc = torch.sort(w).indices
    for density in (0.01, 0.3, 0.5, 0.9):
        k = max(1, int(density * n))
        ref = torch.zeros(n, dtype=torch.bool)
        ref[desc[:k]] = True
        assert torch.equal(sort_select.magnitude_mask(x, 0, k, descending=True), ref)
        lo = max(0, n - k - int(0.05 * n))
        ref = torch.zeros(n, dtype=torch.bool)
        ref[asc[lo : lo + k]] = True
        assert torch.equal(sort_select.magnitude_mask(x, lo, lo + k, descending=False), ref)


def test_the_kept_set_is_not_a_stable_sorts():
    """The inputs above really tie at the cut-off, and a stable sort would keep other
    entries there: what is matched is the non-stable sort's own choice."""
    x = _tie_heavy(250_000, torch.bfloat16, 1)
    w = x.abs().float()
    k = len(w) // 2
    stable = torch.zeros(len(w), dtype=torch.bool)
    stable[torch.sort(w, descending=True, stable=True).indices[:k]] = True
    got = sort_select.magnitude_mask(x, 0, k, descending=True)
    assert int((got != stable).sum()) > 100


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rescale", [None, RescaleNorm.l1, RescaleNorm.l2])
def test_exact_sparsify_is_mergekits_bit_for_bit(dtype, rescale):
    x = _tie_heavy(64 * 300, dtype, 4).reshape(64, 300)
    for density in (0.2, 0.5, 1.0):
        for method, extra in (
            (SparsificationMethod.magnitude, {}),
            (SparsificationMethod.magnitude_outliers, {"gamma": 0.03}),
        ):
            ref = sparsify(x, density, method, rescale_norm=rescale, **extra)
            got = exact_sparsify(x, density, method, rescale_norm=rescale, **extra)
            assert got.dtype == ref.dtype and got.shape == ref.shape
            assert _bits(got) == _bits(ref), (method, density)


def test_nan_and_exhausted_depth_go_to_mergekits_sort():
    x = _tie_heavy(5000, torch.bfloat16, 0)
    x[17] = float("nan")
    assert sort_select.magnitude_mask(x, 0, 100, descending=True) is None
    ref = sparsify(x, 0.5, SparsificationMethod.magnitude)
    got = exact_sparsify(x, 0.5, SparsificationMethod.magnitude)
    assert _bits(got) == _bits(ref)
    with pytest.raises(sort_select.HeapFallback, match="ran out of introsort depth"):
        sort_select.introsort_select(np.ones(100, dtype=np.float32), [30], depth=1)


def test_ranges_away_from_the_cutoffs_are_left_unsorted():
    """O(n): only the ranges straddling a cut are followed to the end."""
    w = np.random.default_rng(0).permutation(100_000).astype(np.float32)
    order = sort_select.introsort_select(w, [50_000])
    assert set(order[:50_000].tolist()) == set(np.argsort(-w)[:50_000].tolist())
    assert not np.array_equal(order[:50_000], np.argsort(-w)[:50_000])
