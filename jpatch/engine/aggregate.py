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

import dataclasses
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


# --- the result contract ---------------------------------------------------------------
#
# Every method's result (sweep, attribute and its atp*, edge_attribution, path_patch,
# faithfulness) carries the same metadata and the same raw views, named as below, so that a
# result can be read without knowing which method made it.
RESULT_FIELDS = (
    "method",                # "patching", "atp", "atp-qk", "atp*", "eap", ..., "path_patching", "faithfulness"
    "direction",             # "denoise": the corrupted run is the base, clean values go in; "noise": the reverse
    "normalization",         # the metric's: "none", "baseline" (minus corrupted), "range" (0 = corrupted, 1 = clean)
    "axes",                  # the grid's axis names (a per-prompt result has a leading prompt axis)
    "per_prompt",            # True when the normalized values are per prompt [batch, *grid]
    "clean", "corrupted",    # the baselines: the metric on the clean and the corrupted run (means over prompts)
    "clean_per_prompt", "corrupted_per_prompt",  # [batch] (None for a metric that is one number per batch)
    "raw",                   # [batch, *grid] patched scores per prompt (estimated by attribution; NaN where a patch
                             # does not apply; None for a batch-level metric and for atp*'s sizes)
    "patched",               # [*grid] patched scores, the mean over prompts (None for atp*'s sizes)
    "delta",                 # [*grid] patched minus the base run, raw units, mean over prompts (atp*: sizes)
    "delta_per_prompt",      # [batch, *grid] the same per prompt (None for a batch-level metric)
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ResultFields:
    """The contract's fields, for the results that are not arrays (`Edges`, `Faithfulness`)."""

    method: str = None
    direction: str = None
    normalization: str = None
    axes: tuple = None
    per_prompt: bool = False
    clean: float = None
    corrupted: float = None
    clean_per_prompt: np.ndarray = None
    corrupted_per_prompt: np.ndarray = None
    raw: np.ndarray = None
    patched: np.ndarray = None
    delta: np.ndarray = None
    delta_per_prompt: np.ndarray = None


assert tuple(f.name for f in dataclasses.fields(ResultFields)) == RESULT_FIELDS


def base_of(direction, clean, corrupted):
    """The base run's score(s): what a patch starts from (corrupted when denoising, clean when noising)."""
    return corrupted if direction == "denoise" else clean


def _mean_over_prompts(per_prompt):
    """[batch, *grid] -> [*grid]: the mean over the prompts where a value is defined (not NaN)."""
    defined = ~np.isnan(per_prompt)
    count = defined.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(defined, per_prompt, 0.0).sum(0) / count
    return np.where(count > 0, mean, np.nan)


def raw_views(direction, clean, corrupted, *, raw=None, change=None):
    """The raw views of the contract (`raw`, `patched`, `delta`, `delta_per_prompt`) from either the
    patched scores or their changes from the base run, and the baselines.

    raw / change: [batch, *grid] with clean, corrupted [batch] (a per-prompt metric), or [*grid] with
    scalar baselines (a metric that is one number for the whole batch). Means run over the prompts
    where a value is defined (not NaN), as the normalized grid's do.
    """
    base = np.asarray(base_of(direction, clean, corrupted), np.float64)
    f32 = lambda a: None if a is None else np.asarray(a, np.float32)
    if base.ndim == 0:
        raw = base + np.asarray(change, np.float64) if raw is None else np.asarray(raw, np.float64)
        return dict(raw=None, patched=f32(raw), delta=f32(raw - base), delta_per_prompt=None)
    other = (np.asarray(raw if raw is not None else change, np.float64))
    base = base.reshape((-1,) + (1,) * (other.ndim - 1))
    raw, change = (other, other - base) if raw is not None else (base + other, other)
    return dict(raw=f32(raw), patched=f32(_mean_over_prompts(raw)), delta=f32(_mean_over_prompts(change)),
                delta_per_prompt=f32(change))


def sizes_views(sizes_result):
    """atp*'s views from the `SweepResult` of base + sizes: its changes are the sizes (non-negative,
    not signed changes), so there are no patched scores."""
    return dict(raw=None, patched=None, delta=sizes_result.delta, delta_per_prompt=sizes_result.delta_per_prompt)


class SweepResult(np.ndarray):
    """A result's normalized values (a NumPy array of the grid's shape) with the result contract's
    metadata and raw views attached (`RESULT_FIELDS`): method, direction, normalization, axes,
    per_prompt, the clean and corrupted baselines (means and per prompt), raw (patched scores per
    prompt), patched (their mean), delta and delta_per_prompt (patched minus the base run).

    The values are the metric normalized over the mean of the prompts (the paper's and
    TransformerLens's aggregate) or, when per_prompt, [batch, *grid] each prompt normalized alone.
    Arithmetic on it gives plain arrays: the attributes describe this array only.
    """

    ATTRS = RESULT_FIELDS

    def __new__(cls, values, **attrs):
        unknown = set(attrs) - set(cls.ATTRS)
        if unknown:
            raise TypeError(f"unknown result fields {sorted(unknown)}")
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

    def metadata(self):
        """The contract's fields as a dict (arrays included)."""
        return {name: getattr(self, name) for name in self.ATTRS}

    def _repr_html_(self):
        return self.show()._repr_html_()

    def show(self, tokens=None):
        """An interactive heatmap (white: the base run's value), hover giving the value and its spread
        over prompts, and a prompt picker: a `jpatch.files.html_view.View`, which a notebook displays
        and `.save("x.html")` writes. tokens: labels of the position axes (e.g. model.to_str_tokens(prompt))."""
        from jpatch.files import html_view

        grid, each = np.asarray(self), None
        if self.raw is not None and self.clean_per_prompt is not None and self.normalization is not None:
            shape = (-1,) + (1,) * (self.raw.ndim - 1)  # the baselines along the prompt axis
            each = per_prompt(self.normalization, self.raw, np.reshape(self.clean_per_prompt, shape),
                              np.reshape(self.corrupted_per_prompt, shape), warn=False)
            grid = normalized_mean(self.normalization, np.moveaxis(self.raw, 0, -1), self.clean_per_prompt,
                                   self.corrupted_per_prompt) if self.per_prompt else grid
        centre = None if self.normalization is None or self.clean is None else normalize(
            self.normalization, base_of(self.direction, self.clean, self.corrupted), self.clean, self.corrupted)
        title = f"{self.method or 'result'} ({self.direction or '?'}, normalization {self.normalization or '?'})"
        return html_view.View(html_view.result_panels(grid, self.axes, title=title, each=each, centre=centre,
                                                      tokens=tokens))
