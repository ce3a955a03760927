"""ACDC (Conmy et al. 2023), batched: greedy edge pruning with every candidate of a step in one call.

Readers are visited in reverse topological order (the logits first). At each reader, its
incoming edges still in the graph are tried in turn: an edge is patched to its ablated value
(on top of the edges already removed) and removed for good when the cost (KL(clean || patched)
by default) rises by less than `threshold`. The result is the paper's sequential one, computed
speculatively: one vmapped call evaluates every remaining candidate of a reader removed alone
and removed together with all candidates before it; walking the candidates in order, these
are the sequential algorithm's own forwards for as long as the decisions so far were all
"keep" or all "remove". At the first mix, the rest are evaluated again from the new graph, so
a reader costs one call per switch between keeping and removing, not one per edge.
"""

import dataclasses
import re
import json
import warnings

import numpy as np

from jpatch.methods import metrics
from jpatch.methods.circuits import mask_scorer
from jpatch.methods.edges import Edges, graph_names
from jpatch.engine.scores import DEFAULT_MEMORY_BUDGET


@dataclasses.dataclass(frozen=True)
class Circuit:
    """keep [n_writers, n_readers]: the edges ACDC kept; scores: each tested edge's cost increase
    when it was tried (NaN where never tested); n_forwards: edge-patched forwards evaluated,
    n_calls: compiled calls they ran in, n_tested: edges decided (the sequential algorithm's
    forwards); noise: the float32 error of an edge's score, a difference of two costs: twice how far
    the all-kept graph's per-prompt scores are from the clean run's (zero in exact arithmetic). A
    tested edge whose score lies within `noise` of the threshold was kept or removed by rounding (warned)."""

    keep: np.ndarray
    scores: np.ndarray
    writers: tuple
    readers: tuple
    valid: np.ndarray
    threshold: float
    metric: str
    baseline: float
    n_forwards: int
    n_calls: int
    n_tested: int
    noise: float = 0.0

    def edges(self):
        """[(writer, reader, score), ...] of the kept edges."""
        return [(self.writers[i], self.readers[j], float(self.scores[i, j])) for i, j in zip(*np.nonzero(self.keep))]

    def to_json(self, path=None):
        data = {"method": "acdc", "threshold": self.threshold, "metric": self.metric,
                "cost_of_full_ablation": self.baseline, "n_edges": int(self.keep.sum()),
                "n_valid_edges": int(self.valid.sum()), "n_forwards": self.n_forwards, "n_calls": self.n_calls,
                "n_tested": self.n_tested, "float_noise": self.noise,
                "edges": [{"writer": w, "reader": r, "score": s} for w, r, s in self.edges()]}
        text = json.dumps(data, indent=1)
        if path is not None:
            with open(path, "w") as f:
                f.write(text)
        return text

    def _repr_html_(self):
        """A notebook's view: the circuit as a layered graph, edge width by score (hover: the edge)."""
        from jpatch.files import html_view

        return html_view.fragment([html_view.circuit(
            *html_view.graph_shape(self.writers), self.edges(), score_name=f"{self.metric} increase when removed",
            title=f"ACDC circuit: {int(self.keep.sum())} of {int(self.valid.sum())} edges, threshold {self.threshold:g}")])

    def plot(self, path=None, title=None):
        """The circuit as a layered graph (matplotlib): layers as rows (embeddings at the bottom,
        logits at the top), heads and the MLP as nodes, edge width by |score|, colour by the
        reader's input (q, k, v, MLP / logits). Saved to `path` if given; returns the figure."""
        import matplotlib.pyplot as plt

        n_layer = (len(self.writers) - 1) // (self.writers.index("m0"))
        n_head = self.writers.index("m0") - 1
        middle = (n_head - 1) / 2
        pos = {"embed": (middle, 0), "logits": (middle, 2 * n_layer + 1)}
        for l in range(n_layer):
            for h in range(n_head):
                pos[f"a{l}.h{h}"] = (h, 2 * l + 1)
            pos[f"m{l}"] = (n_head, 2 * l + 2)  # MLPs in a column of their own, right of the heads
        kv = {r.split("<")[0] for r in self.readers if ".kv" in r}  # grouped-query: a key-value head reads k / v
        group = n_head // max(1, len({n.split(".kv")[1] for n in kv}))
        for name in kv:  # drawn at the centre of its query group
            l, g = (int(x) for x in re.fullmatch(r"a(\d+)\.kv(\d+)", name).groups())
            pos[name] = (g * group + (group - 1) / 2, 2 * l + 1)
        fig, ax = plt.subplots(figsize=(max(5, 0.8 * n_head + 2), max(4, 0.7 * n_layer + 2)))
        colours = {"q": "tab:blue", "k": "tab:green", "v": "tab:orange"}
        edges = self.edges()
        finite = [abs(s) for _, _, s in edges if np.isfinite(s)]
        top = max(finite) if finite and max(finite) > 0 else 1.0
        used = set()
        for w, r, s in edges:
            node = r.split("<")[0]
            chan = r.split("<")[1][0] if "<" in r else None
            used.update((w, node))
            (x0, y0), (x1, y1) = pos[w], pos[node]
            width = 0.5 + 3.5 * (abs(s) / top if np.isfinite(s) else 0.0)
            ax.annotate("", (x1, y1), (x0, y0), arrowprops=dict(arrowstyle="-|>", lw=width, alpha=0.6,
                                                                color=colours.get(chan, "tab:gray"),
                                                                connectionstyle="arc3,rad=0.15"))
        for name, (x, y) in pos.items():
            on = name in used
            ax.scatter([x], [y], s=260, color="tab:red" if name.startswith("m") else "white", zorder=3,
                       edgecolors="black" if on else "lightgray", alpha=1.0 if on else 0.4)
            ax.text(x, y, name.split(".")[-1] if name.startswith("a") else name, ha="center", va="center",
                    fontsize=6, zorder=4, color="black" if on else "gray")
        ax.set_yticks([0] + [2 * l + 1.5 for l in range(n_layer)] + [2 * n_layer + 1])
        ax.set_yticklabels(["embed"] + [f"layer {l}" for l in range(n_layer)] + ["logits"])
        ax.set_xticks([])
        ax.set_xlim(-1, n_head + 1)
        handles = [plt.Line2D([], [], color=c, label=k) for k, c in colours.items()]
        handles.append(plt.Line2D([], [], color="tab:gray", label="MLP / logits"))
        ax.legend(handles=handles, loc="lower right", fontsize=7, title="reader input", title_fontsize=7)
        ax.set_title(title or f"ACDC circuit: {int(self.keep.sum())} of {int(self.valid.sum())} edges, "
                              f"threshold {self.threshold:g}", fontsize=9)
        fig.tight_layout()
        if path is not None:
            fig.savefig(path, dpi=120)
        return fig


def _order(candidates, r, order):
    """Writers to try at reader r: the latest writer first, or the weakest EAP score first."""
    if order is None:
        return sorted(candidates, reverse=True)
    size = np.abs(order.totals()[:, r])
    return sorted(candidates, key=lambda w: (size[w], -w))


def acdc(model, clean, corrupted, *, threshold, metric="kl", ablation="corrupted", order=None,
         memory_budget=DEFAULT_MEMORY_BUDGET):
    """Prune the edge graph greedily (ACDC) and return the kept `Circuit`.

    clean, corrupted: [batch, pos] tokens. threshold: remove an edge when the cost rises by less.
    metric: "kl" (KL(clean || patched) at the last position, ACDC's default) or a jpatch Metric,
    whose cost is minus its mean raw score (so a lower logit difference costs more). ablation:
    removed edges take the corrupted run's write or the clean run's mean over prompts.
    order: None (at each reader, the latest writer first, as ACDC) or an `Edges` (e.g.
    `edge_attribution`'s EAP scores): the edges with the smallest |score| are tried first.
    """
    if not np.isfinite(threshold) and threshold != np.inf:
        raise ValueError(f"threshold must be a number, got {threshold!r}")
    if order is not None and not isinstance(order, Edges):
        raise ValueError("order must be None or an Edges (e.g. jpatch.edge_attribution(...))")
    name = metric if isinstance(metric, str) else getattr(metric, "name", "custom")
    if isinstance(metric, str):
        if metric != "kl":
            raise ValueError(f"unknown metric {metric!r}: pass 'kl' or a jpatch Metric")
        metric = metrics.kl()
    score = mask_scorer(model, clean, corrupted, metric, ablation=ablation, memory_budget=memory_budget)
    cost = lambda masks: -score(masks).reshape(len(masks), -1).mean(-1)
    writers, readers, valid = graph_names(model.config)
    if order is not None and order.totals().shape != valid.shape:
        raise ValueError(f"order's scores {order.totals().shape} do not match this model's graph {valid.shape}")
    mask = valid.astype(np.float32)
    scores = np.full(valid.shape, np.nan)
    raw = score(np.stack([mask, np.zeros_like(mask)]))
    noise = 2 * float(np.max(np.abs(raw[0] - score.clean)))  # each of a score's two costs is off by up to half
    current, baseline = -raw.reshape(2, -1).mean(-1)
    n_forwards, n_calls, n_tested = 2, 1, 0
    for r in reversed(range(len(readers))):
        pending = _order([int(w) for w in np.flatnonzero(mask[:, r])], r, order)
        while pending:
            # Speculate both ways: each candidate removed alone (exact while every earlier one was
            # kept) and the candidates removed cumulatively (exact while every earlier one was removed).
            n = len(pending)
            trials = np.repeat(mask[None], 2 * n - 1, 0)
            trials[np.arange(n), pending, r] = 0.0
            for i in range(1, n):
                trials[n + i - 1, pending[:i + 1], r] = 0.0
            costs = cost(trials)
            n_forwards, n_calls = n_forwards + len(trials), n_calls + 1
            alone, together = costs[:n], np.concatenate([costs[:1], costs[n:]])
            kept_all = removed_all = True
            done = 0
            for i, w in enumerate(pending):
                if not (kept_all or removed_all):
                    break
                new = alone[i] if kept_all else together[i]
                n_tested, done = n_tested + 1, i + 1
                scores[w, r] = new - current
                if new - current < threshold:
                    mask[w, r], current, kept_all = 0.0, new, False
                else:
                    removed_all = False
            pending = pending[done:]
    circuit = Circuit(mask.astype(bool), scores, writers, readers, valid, float(threshold), name, float(baseline),
                      n_forwards, n_calls, n_tested, noise)
    _warn_near_threshold(circuit)
    return circuit


def _warn_near_threshold(circuit):
    """Warn when an edge's keep/remove decision was within float32 noise of the threshold."""
    near = np.argwhere(np.abs(circuit.scores - circuit.threshold) <= circuit.noise)  # NaN (untested): False
    if len(near):
        w, r = near[np.argmin(np.abs(circuit.scores[tuple(near.T)] - circuit.threshold))]
        warnings.warn(
            f"ACDC: {len(near)} edge decision(s) fell within float32 noise ({circuit.noise:.1e}) of the threshold "
            f"{circuit.threshold:g}, e.g. {circuit.writers[w]} -> {circuit.readers[r]} at {circuit.scores[w, r]:.3e}: "
            "rounding, not the model, decided them; move the threshold further than the noise from those scores "
            "(Circuit.scores) for a circuit that does not depend on it", RuntimeWarning, stacklevel=3)
