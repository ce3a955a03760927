"""Shape buckets: a sweep runs its prompts padded up to a few bucket sizes, so a session of
sweeps on prompts of many lengths and batch sizes reuses a few compiled programs.

Prompt length and batch are rounded up to `size(n)`: n itself up to 8, then 4 sizes per doubling
(10, 12, 14, 16, 20, 24, 28, 32, 40, ...), at most 1.25x n. Padding is exact: prompts are padded on
the right (causal attention: a real position never sees a later one) and the engine patches the
bucket's grid of positions; the patches at padded positions and the padded prompts (copies of the
last prompt) are dropped from the results, and a metric is scored on the real prompts only (a plain
callable never sees a padded prompt or position). The patch count follows: a by-position grid over
the bucket's positions. Off with `buckets=False` or the environment variable JPATCH_BUCKETS=0.
"""

import dataclasses
import os

import numpy as np

from jpatch.engine.inputs import Run

EXACT_BELOW = 8  # sizes up to this are their own bucket
STEPS = 4  # bucket sizes per doubling above it: each at most 1.25x the one before


def size(n):
    """The bucket of n: n up to EXACT_BELOW, else the least k * 2**e >= n with k in STEPS..2*STEPS-1."""
    n = int(n)
    if n <= EXACT_BELOW:
        return n
    step = 1 << ((n - 1).bit_length() - STEPS.bit_length())  # (2**(e-1), 2**e] in STEPS steps
    return -(-n // step) * step


def enabled(buckets=None):
    """Whether sweeps bucket shapes: `buckets` when given, else JPATCH_BUCKETS (unset or 1: on, 0: off)."""
    if buckets is not None:
        if not isinstance(buckets, bool):
            raise ValueError(f"buckets must be True, False or None (JPATCH_BUCKETS decides), got {buckets!r}")
        return buckets
    value = os.environ.get("JPATCH_BUCKETS", "1").strip()
    if value not in ("0", "1", ""):
        raise ValueError(f"JPATCH_BUCKETS must be 0 (off) or 1 (on), got {value!r}")
    return value != "0"


def shape(model, runs, batch, pos, buckets=None):
    """The (batch, pos) a sweep runs at: its buckets, or (batch, pos) itself when buckets are off
    or a run cannot be padded (overrides such as Gaussian noise, several noise samples)."""
    if not enabled(buckets) or any(r.overrides or r.samples != 1 for r in runs if r is not None):
        return batch, pos
    return size(batch), max(pos, min(size(pos), model.config.n_ctx))


def padded(model, runs, metric, batch, pos, buckets=None):
    """A sweep's runs and metric (bound to `batch` prompts of `pos` tokens) at their shape bucket:
    (bucket batch, bucket pos, runs, metric), all unchanged when the shape is its own bucket."""
    NB, TB = shape(model, runs, batch, pos, buckets)
    if (NB, TB) == (batch, pos):
        return NB, TB, runs, metric
    pad = pad_id(model)
    return NB, TB, tuple(pad_run(r, NB, TB, pad) for r in runs), pad_metric(metric, batch, NB, pos)


def pad_id(model):
    """A token id to pad prompts with that the model accepts: its pad id, else its last id."""
    pid = model.pad_id
    return pid if 0 <= pid < model.config.d_vocab else model.config.d_vocab - 1


def rows(a, n):
    """NumPy `a` with its first axis padded to n rows by repeating the last."""
    a = np.asarray(a)
    return a if a.shape[0] == n else np.concatenate([a, np.repeat(a[-1:], n - a.shape[0], axis=0)])


def pad_run(run, batch, pos, pad):
    """A Run (no overrides, one sample) padded to [batch, pos] tokens: `pad` on the right, the
    last prompt repeated below."""
    tokens = np.asarray(run.tokens)
    if tokens.shape == (batch, pos):
        return run
    wide = np.full((tokens.shape[0], pos), pad, tokens.dtype)
    wide[:, : tokens.shape[1]] = tokens
    return Run(rows(wide, batch))


def pad_metric(metric, real, batch, pos):
    """A metric bound to the `real` prompts (`readout.prepare_metric`) bound to `batch` rows: its read
    positions and data repeat the last prompt's; a callable reading every position reads the real
    prompts' `pos` positions (its logits keep their true shape)."""
    positions = metric.positions
    if isinstance(positions, str):
        positions = np.broadcast_to(np.arange(pos), (real, pos))
    data = {k: rows(v, batch) for k, v in metric.data.items()}
    return dataclasses.replace(metric, data=data, positions=rows(positions, batch))


def pad_stack(stack, axes, batch, pos):
    """A site's [layer, rows, ...] stack (`axes`: the site's axes after the layer) padded to `batch`
    rows (the last repeated) and `pos` positions (zeros) on every position axis."""
    stack = np.asarray(stack)
    widths = [(0, 0)] + [(0, pos - stack.shape[i + 1]) if a in POS_AXES else (0, 0) for i, a in enumerate(axes)]
    return rows(np.pad(stack, widths).swapaxes(0, 1), batch).swapaxes(0, 1)


POS_AXES = ("pos", "query", "key")


def cut_stack(stack, axes, batch, pos):
    """A site's [layer, rows, ...] stack cut back to the real `batch` prompts and `pos` positions."""
    index = (slice(None), slice(0, batch)) + tuple(slice(0, pos) if a in POS_AXES else slice(None) for a in axes[1:])
    return np.asarray(stack)[index]


def kept(run_shape, shape):
    """Indices, in the bucketed grid `run_shape` (C order), of the user's grid `shape`: on every
    axis the user's values are the first ones of the bucket's."""
    return np.arange(int(np.prod(run_shape))).reshape(run_shape)[tuple(slice(0, n) for n in shape)].ravel()


def kept_scores(raw, run_shape, shape, prompts):
    """The engine's raw scores [n, rows] (or [n]) of the bucketed grid cut to the user's grid and
    real prompts."""
    raw = np.asarray(raw)
    if tuple(run_shape) != tuple(shape):
        raw = raw[kept(run_shape, shape)]
    return raw if raw.ndim == 1 else raw[:, :prompts]
