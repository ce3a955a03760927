"""Interactive HTML views of results: heatmaps, circuit graphs, scatter plots, attention patterns.

A view is a list of panels (plain dicts of JSON and base64-packed arrays) drawn by the small
hand-written SVG script of `jpatch.files.html_script`: no plotting library, no network. `fragment`
gives a notebook output (the `_repr_html_` of results), `page` a whole self-contained HTML file
(`jpatch view`). The module reads only NumPy arrays and plain values, so every layer may call it.
"""

import base64
import html
import json
import uuid
import warnings
from pathlib import Path

import numpy as np

from jpatch.files import atomic
from jpatch.files.html_script import SCRIPT, STYLE

GENERATOR = "jpatch view"  # <meta name="generator">: marks a file `jpatch view` may replace
POSITION_AXES = ("pos", "src")


def pack(array, dtype="f4"):
    """An array as {"shape", "dtype", "b64"}: little-endian float32 ("f4") or uint8 ("u1")."""
    a = np.ascontiguousarray(np.asarray(array), "<f4" if dtype == "f4" else np.uint8)
    return {"shape": list(a.shape), "dtype": dtype, "b64": base64.b64encode(a.tobytes()).decode("ascii")}


def position_labels(tokens_per_prompt, n):
    """Labels of a position axis of length n over several prompts: the token where every prompt that
    reaches the position has the same one, else "pos i"."""
    labels = []
    for i in range(n):
        seen = {t[i] for t in tokens_per_prompt if i < len(t)}
        labels.append(seen.pop() if len(seen) == 1 else f"pos {i}")
    return labels


def position_variants(tokens_per_prompt, n, k=4):
    """For each position where the prompts' tokens differ: "varies: 'a', 'b', ... (m tokens)" (hover)."""
    out = []
    for i in range(n):
        seen = sorted({t[i] for t in tokens_per_prompt if i < len(t)})
        shown = ", ".join(repr(t) for t in seen[:k]) + (", ..." if len(seen) > k else "")
        out.append(f"tokens vary: {shown} ({len(seen)} distinct)" if len(seen) > 1 else "")
    return out


def heatmap(values, axes, *, name="", title="", note="", tokens=None, labels=None, hover=None, spread=None, count=None,
            centre=0.0, unit="",
            prompts=None, prompt_labels=None, prompt_tokens=None, grid_title=""):
    """A heatmap panel of `values` [*lead, rows, cols] (leading axes get pickers; 1-D becomes one row).

    tokens: labels of the position axes; labels: {axis: [label]} of others; hover: {axis: [text]} more
    lines for the tooltip (e.g. `position_variants`); spread / count: per cell (hover); centre: the colour scale's
    white; prompts [n, *grid] with prompt_labels [n] and prompt_tokens [n][len]: a prompt picker and
    that prompt's grid beside the main one."""
    values = np.asarray(values, np.float32)
    known = axes is not None and len(axes) == values.ndim
    axes = tuple(axes) if known else tuple(f"axis {i}" for i in range(values.ndim))
    if values.ndim == 1:
        values, axes = values[None], ("",) + axes
        spread, count = (None if a is None else np.asarray(a)[None] for a in (spread, count))
        prompts = None if prompts is None else np.asarray(prompts)[:, None]
    labels = {**{a: list(tokens) for a in axes if a in POSITION_AXES and tokens is not None}, **(labels or {})}
    panel = {"kind": "heatmap", "name": name, "title": title, "note": note, "axes": list(axes),
             "values": pack(values), "labels": labels, "hover": hover or {}, "centre": float(centre), "unit": unit,
             "grid_title": grid_title,
             "spread": None if spread is None else pack(spread), "count": None if count is None else pack(count)}
    if prompts is not None:
        panel["prompts"] = {"values": pack(prompts), "labels": [str(s) for s in prompt_labels],
                            "tokens": None if prompt_tokens is None else [list(t) for t in prompt_tokens]}
    return panel


def scatter(x, y, axes, *, name="", title="", note="", xlabel="exact", ylabel="estimate"):
    """Estimate (y) against exact (x), one point per grid entry (hover: its coordinates), with y = x."""
    x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
    return {"kind": "scatter", "name": name, "title": title, "note": note, "x": pack(x.ravel()), "y": pack(y.ravel()),
            "shape": list(x.shape), "axes": list(axes) if axes else [f"axis {i}" for i in range(x.ndim)],
            "xlabel": xlabel, "ylabel": ylabel}


def attention(patterns, tokens, labels, *, name="", title="", note=""):
    """Attention patterns [n_prompts, layer, head, dest, src] (probabilities, stored as 8 bits) of
    prompts with their `tokens` (pickers: prompt, layer, head)."""
    stored = np.rint(np.clip(np.nan_to_num(np.asarray(patterns, np.float32)), 0, 1) * 255)
    return {"kind": "attention", "name": name, "title": title, "note": note, "patterns": pack(stored, "u1"),
            "tokens": [list(t) for t in tokens], "labels": [str(s) for s in labels]}


def table(rows, *, name="", title="", note=""):
    return {"kind": "table", "name": name, "title": title, "note": note, "rows": [[str(c) for c in r] for r in rows]}


def graph_shape(writers):
    """(n_layer, n_head) of an edge graph from its writers ("embed", then each layer's heads and MLP)."""
    n_head = list(writers).index("m0") - 1
    return (len(writers) - 1) // (n_head + 1), n_head


def circuit(n_layer, n_head, edges, *, name="", title="", note="", score_name="score"):
    """A layered graph: embeddings at the bottom, the logits on top, a layer's heads on one row and
    its MLP on the next (as `Circuit.plot`); edges [(writer, reader, score)], width by |score|,
    colour by the reader's input (q, k, v; grey: MLP or logits)."""
    middle = (n_head - 1) / 2
    where = {"embed": (middle, 0), "logits": (middle, 2 * n_layer + 1)}
    for l in range(n_layer):
        where.update({f"a{l}.h{h}": (h, 2 * l + 1) for h in range(n_head)})
        where[f"m{l}"] = (n_head, 2 * l + 2)
    drawn = [{"writer": w, "reader": r, "node": r.split("<")[0], "chan": r.split("<")[1][0] if "<" in r else "",
              "score": float(s) if np.isfinite(s) else None} for w, r, s in edges]
    used = {e["writer"] for e in drawn} | {e["node"] for e in drawn}
    nodes = [{"name": n, "x": x, "y": y, "used": n in used, "mlp": n.startswith("m"),
              "label": n.split(".")[-1] if n.startswith("a") else n} for n, (x, y) in where.items()]
    rows = [[0, "embed"], [2 * n_layer + 1, "logits"]] + [[2 * l + 1, f"L{l} heads"] for l in range(n_layer)]
    rows += [[2 * l + 2, f"L{l} MLP"] for l in range(n_layer)]
    return {"kind": "circuit", "name": name, "title": title, "note": note, "nodes": nodes, "edges": drawn,
            "rows": rows, "width": n_head + 1, "height": 2 * n_layer + 2, "score_name": score_name}


def _data(panels):
    text = json.dumps({"panels": panels}, allow_nan=False, separators=(",", ":"))
    return text.replace("<", "\\u003c")  # nothing in the data can close the script element


def fragment(panels):
    """A notebook output: the panels, their data, the style and the script (rendered at once)."""
    return (f'<div class="jp-root" id="jp-{uuid.uuid4().hex}"><style>{STYLE}</style>'
            f'<script type="application/json" class="jp-data">{_data(panels)}</script>'
            f"<script>{SCRIPT}</script></div>")


def page(panels, title, header_rows=()):
    """A whole self-contained HTML document (everything inlined) showing `panels` under `title`."""
    head = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in header_rows)
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f'<meta name="generator" content="{GENERATOR}"><link rel="icon" href="data:,">'
            f"<title>{html.escape(title)}</title><style>body{{margin:16px 24px}}{STYLE}</style></head><body>"
            f'<div class="jp-root"><h2>{html.escape(title)}</h2>'
            + (f"<table class=\"jp-header\">{head}</table>" if head else "")
            + f'<script type="application/json" class="jp-data">{_data(panels)}</script></div>'
            f"<script>{SCRIPT}</script></body></html>\n")


class View:
    """Panels that a notebook displays (`_repr_html_`) and `save` writes as a self-contained page."""

    def __init__(self, panels, title="jpatch"):
        self.panels, self.title = panels, title

    def _repr_html_(self):
        return fragment(self.panels)

    def save(self, path):
        """Write the page to `path` atomically; replaces only a view jpatch wrote."""
        if Path(path).exists() and not is_view_file(path):
            raise FileExistsError(f"{path} exists and is not a view jpatch wrote; choose another name")
        text = page(self.panels, self.title).encode()
        return atomic.atomic_write(path, lambda f: f.write(text))


def is_view_file(path):
    """Whether `path` is an HTML file `jpatch view` wrote (its generator tag in the first bytes)."""
    try:
        with open(path, "rb") as f:
            return f'<meta name="generator" content="{GENERATOR}">'.encode() in f.read(400)
    except OSError:
        return False


def _json_safe(x):
    return None if x is None or not np.isfinite(x) else float(x)


def result_panels(values, axes, *, title="", each=None, centre=0.0, unit="", tokens=None):
    """A result grid's panel: `each` [batch, *grid] per-prompt values give the spread over prompts
    and a prompt picker (the notebook view of `SweepResult` and of edge scores)."""
    spread = count = None
    if each is not None:
        each = np.asarray(each, np.float32)
        with warnings.catch_warnings():  # an all-NaN cell (a position no prompt reaches) has no spread
            warnings.simplefilter("ignore", RuntimeWarning)
            spread, count = np.nanstd(each, axis=0), np.isfinite(each).sum(0)
    labels = None if each is None else [f"prompt {i}" for i in range(len(each))]
    return [heatmap(values, axes, title=title, tokens=tokens, spread=spread, count=count,
                    centre=_json_safe(centre) or 0.0,
                    unit=unit, prompts=each, prompt_labels=labels, grid_title="mean over prompts" if each is not None
                    else "")]


def agreement_panels(report, estimate, exact):
    """The agreement report of `jpatch.methods.agreement.compare_exact` as a table and a scatter plot."""
    number = lambda v: "n/a" if v is None or not np.isfinite(v) else f"{v:.4f}"  # JSON keeps NaN as null
    rows = [["components", report["components"]], ["Pearson", number(report["pearson"])],
            ["Spearman", number(report["spearman"])], ["sign agreement", number(report["sign_agreement"])]]
    rows += [[f"top-{k} recall", number(v)] for k, v in report["top_k_recall"].items()]
    title = f"{report['site']}: {report['method']} vs exact ({report['direction']})"
    panels = [table(rows, title=title)]
    if estimate is not None and exact is not None:
        panels.append(scatter(exact, estimate, report["axes"], xlabel="exact", ylabel=report["method"]))
    return panels
