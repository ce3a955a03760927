"""Heatmaps of sweep results (matplotlib; importable in notebooks, returns the figure)."""

import os

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import TwoSlopeNorm

AXIS_LABELS = {"layer": "layer", "pos": "position", "head": "head", "src": "source position"}


def title_for(model=None, site=None, corruption=None, metric=None, direction=None, window=None):
    """'toy | hook_resid_pre | STR | logit_diff | denoise' from whichever parts are known."""
    parts = [model, site, corruption, metric, direction, f"window {window}" if window and window > 1 else None]
    return " | ".join(str(p) for p in parts if p)


def _values(result, site=None, axes=None):
    """An array or a saved `Result` (single sweep, or bulk: averaged over prompts) -> (values, axes)."""
    from jpatch.runs.results import Result

    if not isinstance(result, Result):
        return np.asarray(result, dtype=float), axes
    site = result.only(site)
    saved = result.axes(site)
    values = result[site]
    if result.kind == "bulk":
        values, saved = result.mean(site), saved and saved[1:]
    axes = tuple(axes or saved or ())
    if len(axes) != values.ndim:
        raise ValueError(f"{site!r} has shape {values.shape}; name its {values.ndim} axes (got {axes or 'none'})")
    return np.asarray(values, dtype=float), axes


def heatmap(values, *, rows="layer", cols="pos", col_labels=None, row_labels=None, title=None, ax=None,
            cmap="RdBu_r", colorbar_label="metric", site=None):
    """A [rows, cols] heatmap with a diverging colour map centred at 0.

    values: a 2-D array, or a saved `Result` (its `site`, its own axes as rows and cols).
    col_labels: e.g. the prompt's tokens for a position axis.
    """
    from jpatch.runs.results import Result

    if isinstance(values, Result):
        values, axes = _values(values, site)
        if len(axes) != 2:
            raise ValueError(f"heatmap draws 2-D results, got axes {axes}")
        rows, cols = axes
    values = np.asarray(values, dtype=float)
    if values.ndim != 2:
        raise ValueError(f"heatmap needs a 2-D array, got shape {values.shape}")
    if ax is None:
        width = max(4.0, 0.45 * values.shape[1] + 2.5)
        height = max(3.0, 0.3 * values.shape[0] + 1.5)
        fig, ax = plt.subplots(figsize=(width, height))
    else:
        fig = ax.figure
    finite = values[np.isfinite(values)]
    limit = float(np.abs(finite).max()) if finite.size else 1.0
    limit = limit or 1.0
    image = ax.imshow(values, cmap=cmap, norm=TwoSlopeNorm(0.0, -limit, limit), aspect="auto",
                      interpolation="nearest")
    ax.set_xlabel(AXIS_LABELS.get(cols, cols))
    ax.set_ylabel(AXIS_LABELS.get(rows, rows))
    ax.set_xticks(range(values.shape[1]))
    ax.set_yticks(range(values.shape[0]))
    if col_labels is not None:
        if len(col_labels) != values.shape[1]:
            raise ValueError(f"{len(col_labels)} column labels for {values.shape[1]} columns")
        ax.set_xticklabels([repr(label)[1:-1] if isinstance(label, str) else label for label in col_labels],
                           rotation=60, ha="right", fontsize=8)
    if row_labels is not None:
        ax.set_yticklabels(row_labels)
    if title:
        ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, label=colorbar_label)
    fig.tight_layout()
    return fig


def plot_sweep(result, axes=None, *, site=None, tokens=None, title=None, metric_name=None):
    """Heatmap of a 2-D sweep result over its axes (e.g. ("layer", "pos") with the prompt's
    tokens as column labels, or ("layer", "head")).

    result: an array with its `axes`, or a saved `Result` (single, or bulk: the mean over
    prompts), whose saved axes, title and metric name are used unless given.
    """
    from jpatch.runs.results import Result

    values, axes = _values(result, site, axes)
    if len(axes) != 2:
        raise ValueError(f"plot_sweep draws 2-D results, got axes {axes}")
    if isinstance(result, Result):
        s, name = result.settings, result.only(site)
        title = title or title_for(s.get("model"), s.get("site") or name, str(s.get("corruption", "")).upper() or None, s.get("metric"),
                                   s.get("direction"), s.get("window"))
        metric_name = metric_name or s.get("metric")
        clean = result.clean_value(name)
        if s.get("direction") == "noise" and clean is not None:  # show the effect, not ~clean everywhere
            values = values - clean
            metric_name = f"{metric_name or 'metric'}: patched - clean"
    col_labels = tokens if axes[1] == "pos" and tokens is not None else None
    return heatmap(values, rows=axes[0], cols=axes[1], col_labels=col_labels, title=title,
                   colorbar_label=metric_name or "metric")


def save(fig, path):
    """Write a figure and close it (no half-written file: written beside, then renamed)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.png"
    fig.savefig(tmp, dpi=130)
    plt.close(fig)
    os.replace(tmp, path)
