"""mergekit's magnitude trimming without its full sort, keeping exactly the same entries.

mergekit's ``magnitude`` (TIES) keeps the first ``k`` indices of
``torch.argsort(|x|.float(), descending=True)`` and ``magnitude_outliers`` (breadcrumbs)
the indices ``[n_bot, n_bot + n)`` of ``torch.sort(|x|.float()).indices``
(``mergekit.sparsify``). bf16 task vectors tie by the thousand at the cut-off, and which of
the tied entries come first is decided by the sort's algorithm: on CPU, PyTorch sorts a
1-D tensor with ``std::sort`` over (value, index) pairs compared by value only
(``aten/src/ATen/native/cpu/SortingKernel.cpp``), which in libstdc++ is introsort:

- ``__introsort_loop``: while a range holds more than 16 elements, move the median of its
  elements ``first + 1``, ``first + (last - first) / 2`` and ``last - 1`` to ``first``
  (``__move_median_to_first``), Hoare-partition the rest around it
  (``__unguarded_partition``), recurse on the right part and loop on the left; after
  ``2 * floor(log2(n))`` levels a range is heap-sorted instead;
- ``__final_insertion_sort``: one insertion sort over the whole array, which moves no
  element across a partition boundary, so it sorts each final range of at most 16
  elements stably.

Only the set of indices in front of the cut-off matters, so :func:`introsort_select`
follows that algorithm into the ranges that straddle a cut-off and leaves every other
range unsorted: the same partitions, the same swaps, so the same entries on each side,
in O(n) expected work instead of O(n log n). Each partition is computed in a few
vectorised passes (the ``t``-th swap of Hoare's scheme exchanges the ``t``-th element from
the left that may not stay left with the ``t``-th from the right that may not stay right,
until the two meet).

This models libstdc++ (Linux builds of PyTorch). :func:`platform_matches` checks the
model against ``torch.argsort`` on tie-heavy probes once per process; where they differ
(another C++ library, another PyTorch), or a range would fall back to heap sort, or the
input holds NaN, the caller runs mergekit's own sort. ``tests/unit/test_sort_select.py``
holds the result against ``torch.argsort`` and mergekit's ``sparsify``.
"""

from __future__ import annotations

import bisect
import functools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

#: libstdc++'s ``_S_threshold``: ranges up to this size are left to the insertion sort.
THRESHOLD = 16


class HeapFallback(Exception):
    """A range ran out of introsort depth: libstdc++ heap-sorts it, which is not modelled."""


def _median_to_first(a: np.ndarray, idx: np.ndarray, r: int, x: int, y: int, z: int) -> None:
    """libstdc++ ``__move_median_to_first`` with ``comp(p, q) = p > q`` (descending)."""
    ax, ay, az = a[x], a[y], a[z]
    if ax > ay:
        if ay > az:
            m = y
        elif ax > az:
            m = z
        else:
            m = x
    elif ax > az:
        m = x
    elif ay > az:
        m = z
    else:
        m = y
    a[r], a[m] = a[m], a[r]
    idx[r], idx[m] = idx[m], idx[r]


def _partition(a: np.ndarray, idx: np.ndarray, first: int, last: int) -> int:
    """libstdc++ ``__unguarded_partition_pivot`` on ``[first, last)``, in place; returns
    the cut (the first position of the right part)."""
    _median_to_first(a, idx, first, first + 1, first + (last - first) // 2, last - 1)
    pivot = a[first]
    # The left scan stops at a[i] <= pivot (not comp(a[i], pivot)), the right scan at
    # a[j] >= pivot; a[first] (the pivot) stops the right scan at the latest.
    left = np.flatnonzero(a[first + 1 : last] <= pivot)
    left += first + 1
    right = np.flatnonzero(a[first:last] >= pivot)  # ascending; the scan reads it backwards
    right += first
    nr = len(right)
    # Swap t exchanges left[t] and right[nr - 1 - t] while left[t] < right[nr - 1 - t]:
    # one side ascends and the other descends, so the swaps are a prefix (bisection).
    lo, hi = 0, min(len(left), nr)
    while lo < hi:
        mid = (lo + hi) // 2
        if left[mid] < right[nr - 1 - mid]:
            lo = mid + 1
        else:
            hi = mid
    swaps = lo
    cut = min(
        int(left[swaps]) if swaps < len(left) else last,
        int(right[nr - swaps]) if swaps else last,
    )
    if swaps:
        from_l = left[:swaps]
        from_r = right[nr - swaps :][::-1]
        for arr in (a, idx):
            moved = arr[from_l]
            arr[from_l] = arr[from_r]
            arr[from_r] = moved
    return cut


def introsort_select(
    values: np.ndarray, cuts: Sequence[int], *, depth: int | None = None, own: bool = False
) -> np.ndarray:
    """Indices of ``values`` in the order ``std::sort`` (libstdc++, descending, comparing
    values only) leaves them, exact across every position in ``cuts``.

    ``values``: 1-D float32 array without NaN (copied first unless ``own``: then it is
    permuted in place). Returns an int32 array ``order`` of the same length such that for
    every ``c`` in ``cuts`` the set ``order[:c]`` equals the set
    ``torch.argsort(torch.from_numpy(values), descending=True)[:c]`` (given
    :func:`platform_matches`). Ranges that straddle no cut are left in partition order.
    ``depth``: the introsort depth limit (default libstdc++'s ``2 * floor(log2(n))``).
    Raises :class:`HeapFallback` where libstdc++ would heap-sort a range that straddles
    a cut, ``ValueError`` for more than ``2**31 - 1`` values.
    """
    a = values if own else np.array(values, dtype=np.float32, copy=True)
    n = len(a)
    if n >= 2**31:
        raise ValueError(f"{n} values: introsort_select indexes with int32")
    idx = np.arange(n, dtype=np.int32)
    if n == 0:
        return idx
    wanted = sorted({c for c in cuts if 0 < c < n})
    depth0 = 2 * int(math.floor(math.log2(n))) if depth is None else depth
    stack = [(0, n, depth0)]
    while stack:
        first, last, depth = stack.pop()
        i = bisect.bisect_right(wanted, first)  # the first cut > first
        if i == len(wanted) or wanted[i] >= last:
            continue  # no cut strictly inside: this range's set is settled
        if last - first > THRESHOLD:
            if depth == 0:
                raise HeapFallback(f"range [{first}, {last}) ran out of introsort depth")
            cut = _partition(a, idx, first, last)
            stack.append((cut, last, depth - 1))
            stack.append((first, cut, depth - 1))
            continue
        # Final insertion sort of a small range: stable, descending.
        order = np.argsort(-a[first:last], kind="stable")
        a[first:last] = a[first:last][order]
        idx[first:last] = idx[first:last][order]
    return idx


def _argsort_model(w: np.ndarray, *, descending: bool) -> np.ndarray | None:
    """The full order of the model (every position a cut), or None on a heap fallback."""
    key = w if descending else -w
    try:
        return introsort_select(key, range(1, len(w)))
    except HeapFallback:
        return None


@functools.cache
def platform_matches() -> bool:
    """Whether :func:`introsort_select` reproduces this process's ``torch.argsort`` /
    ``torch.sort`` on CPU float32 (both directions), checked on tie-heavy probes of
    several sizes (a few milliseconds, once per process)."""
    gen = torch.Generator().manual_seed(20261130)
    for n, levels in ((17, 3), (300, 5), (2000, 40), (6000, 700), (4099, 2)):
        w = torch.randint(0, levels, (n,), generator=gen).float() * 0.25
        for descending in (True, False):
            got = _argsort_model(w.numpy(), descending=descending)
            ref = torch.sort(w, descending=descending).indices.numpy()
            if got is None or not np.array_equal(got, ref):
                return False
    return True


def magnitude_mask(tensor: torch.Tensor, lo: int, hi: int, *, descending: bool) -> Any:
    """Flat bool mask of the entries at positions ``[lo, hi)`` of mergekit's sort of
    ``|tensor|.float()`` (``descending``: ``torch.argsort(..., descending=True)`` as in
    ``magnitude``; ascending: ``torch.sort(...)`` as in ``magnitude_outliers``), or
    ``None`` where the model does not apply (NaN in the tensor, a heap-sort fallback, a
    platform whose sort differs): the caller then runs mergekit's own code. Shape
    ``(numel,)``, dtype bool. O(numel) expected time.
    """
    n = tensor.numel()
    lo, hi = max(lo, 0), min(hi, n)
    if not platform_matches():
        return None
    key = torch.empty(n, dtype=torch.float32)
    key.copy_(tensor.detach().reshape(-1)).abs_()  # mergekit's |x|.float(), exactly
    if not descending:
        key.neg_()  # ascending order of |x| = descending order of -|x|, ties alike
    if torch.isnan(key).any():
        return None
    try:
        order = introsort_select(key.numpy(), (lo, hi), own=True)
    except HeapFallback:
        return None
    mask = torch.zeros(n, dtype=torch.bool)
    if hi > lo:
        mask[torch.from_numpy(order[lo:hi])] = True
    return mask
