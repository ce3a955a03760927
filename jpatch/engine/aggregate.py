"""One meaning of "mean": how patched scores of many prompts become one number per patch.

The default aggregate, everywhere (sweep grid, bulk results, CLI, report), is the
paper's and TransformerLens's: normalize the mean over prompts,
    (mean_b s_pt[b] - mean_b s_*[b]) / (mean_b s_cl[b] - mean_b s_*[b])
for a "range" metric (likewise minus the corrupted mean for "baseline"). It is a
ratio of means, so one prompt whose clean and corrupted scores nearly coincide
cannot blow it up. Per-prompt normalized values stay available on request; prompts
with a tiny clean-corrupted gap are counted and warned about there.

Prompts are the last axis of `raw` ([..., prompts]); NaN marks a prompt a patch does not
apply to (a position past that prompt's end), and such prompts leave that patch's mean.
"""

import warnings

import numpy as np

SMALL_GAP = 0.1  # a prompt's |clean - corrupted| gap below this fraction of the median gap is flagged


def normalize(normalization, patched, clean, corrupted):
    """Compare raw scores with the two baselines (broadcasting): "none", "baseline" or "range"."""
    if normalization == "none":
        return patched
    if normalization == "baseline":
        return patched - corrupted
    return (patched - corrupted) / (clean - corrupted)


def normalized_mean(normalization, raw, clean, corrupted):
    """raw [..., B] patched scores, clean / corrupted [B] baselines -> [...] normalized mean over prompts.

    A patch's mean runs over the prompts where it is defined (not NaN), baselines included.
    """
    raw = np.asarray(raw, np.float64)
    defined = ~np.isnan(raw)
    count = defined.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = lambda a: np.where(defined, a, 0.0).sum(-1) / count
        out = normalize(normalization, mean(raw), mean(np.broadcast_to(clean, raw.shape)),
                        mean(np.broadcast_to(corrupted, raw.shape)))
    return np.where(count > 0, out, np.nan).astype(np.float32)


def small_gap_prompts(clean, corrupted):
    """Indices of prompts whose |clean - corrupted| gap is tiny next to the others' (median)."""
    gap = np.abs(np.asarray(clean, np.float64) - np.asarray(corrupted, np.float64))
    return np.flatnonzero(gap < SMALL_GAP * np.median(gap)) if gap.size else np.zeros(0, int)


def warn_small_gaps(normalization, clean, corrupted):
    """Warn, with their count, about prompts whose per-prompt normalized values are unstable."""
    small = small_gap_prompts(clean, corrupted) if normalization == "range" else ()
    if len(small):
        warnings.warn(
            f"{len(small)} prompt(s) (e.g. {small[:5].tolist()}) have a clean-corrupted gap under "
            f"{SMALL_GAP:g} x the median gap: their per-prompt normalized values are unstable; the default "
            "aggregate (normalize the mean over prompts) is not affected", stacklevel=3)


def per_prompt(normalization, raw, clean, corrupted, *, warn=True):
    """raw [..., B] -> [..., B] each prompt normalized by its own baselines (flags tiny gaps)."""
    if warn:
        warn_small_gaps(normalization, clean, corrupted)
    with np.errstate(invalid="ignore", divide="ignore"):
        return normalize(normalization, np.asarray(raw), clean, corrupted).astype(np.float32)


class SweepResult(np.ndarray):
    """A sweep's values (a NumPy array of the grid's shape) with its baselines attached.

    clean, corrupted: the overall baseline scores (means over prompts);
    clean_per_prompt, corrupted_per_prompt: [batch] baseline scores (None for a scalar metric);
    raw: [batch, *grid] patched scores before normalization (noise samples averaged; NaN past a
    prompt's end), so any other aggregate can be computed (None for a scalar metric);
    per_prompt: True when the array holds per-prompt normalized values [batch, *grid],
    False for the default aggregate (normalize the mean over prompts);
    axes: the grid's axis names; normalization: the metric's ("none", "baseline", "range").
    Arithmetic on it gives plain arrays: the attributes describe this array only.
    """

    ATTRS = ("clean", "corrupted", "clean_per_prompt", "corrupted_per_prompt", "raw", "per_prompt", "axes",
             "normalization")

    def __new__(cls, values, **attrs):
        obj = np.asarray(values).view(cls)
        for name in cls.ATTRS:
            setattr(obj, name, attrs.get(name))
        return obj

    def __array_finalize__(self, obj):
        for name in self.ATTRS:  # views and results of arithmetic do not inherit the baselines
            setattr(self, name, None)

    def __array_wrap__(self, array, context=None, return_scalar=False):
        out = np.asarray(array)
        return out[()] if return_scalar else out

    def __reduce__(self):  # pickle as a plain array: the class is a view with metadata
        return np.asarray(self).__reduce__()
