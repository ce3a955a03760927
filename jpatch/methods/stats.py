"""Small statistics for comparing patching results (reports, attribution agreement)."""

import numpy as np


def pearson(a, b):
    """Pearson correlation of two arrays (nan if either is constant)."""
    a, b = a - a.mean(), b - b.mean()
    denom = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denom) if denom > 0 else float("nan")


def ranks(x):
    """Ranks (1..n), ties averaged."""
    x = np.asarray(x, float).ravel()
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(1, len(x) + 1)
    for value in np.unique(x):
        tie = x == value
        if tie.sum() > 1:
            ranks[tie] = ranks[tie].mean()
    return ranks


def spearman(a, b):
    """Spearman rank correlation of two equally shaped arrays (nan if either is constant)."""
    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def top_k(values, k, *, by="abs"):
    """Flat indices of the k largest entries (by |value|, by value, or by -value), largest first."""
    flat = np.asarray(values, float).ravel()
    key = {"abs": np.abs(flat), "max": flat, "min": -flat}[by]
    return [int(i) for i in np.argsort(-key, kind="stable")[:k]]


def peak(curve):
    """(peak layer, peak value, width): width = the contiguous run of layers around the
    peak whose value is at least half the peak value (0 when the peak is not positive)."""
    curve = np.asarray(curve, float)
    at = int(np.argmax(curve))
    top = float(curve[at])
    if top <= 0:
        return at, top, 0
    lo = hi = at
    while lo > 0 and curve[lo - 1] >= top / 2:
        lo -= 1
    while hi < len(curve) - 1 and curve[hi + 1] >= top / 2:
        hi += 1
    return at, top, hi - lo + 1
