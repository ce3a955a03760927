"""Edge attribution patching: EAP (Syed et al. 2023) and EAP-IG (Hanna et al. 2024).

The model as a graph: *writers* (the embeddings, each head's output z_h W_O[h], each
MLP's output) add into the residual stream; *readers* (each head's q, k and v input,
each MLP's input, the logits) read the sum of the earlier writers through a layer
norm. Patching one edge u -> v (v reads u's source-run write instead of its base-run
write) is estimated as

    score(u -> v) = (w_u,source - w_u,base) . dM/d(input of v)   (summed over positions),

so one forward and backward give every edge: the gradient at each reader's input is the
vjp of its own layer norm and projection (per head for q/k/v), taken from the gradient at
q/k/v or the MLP output. Writers' per-reader scores sum to node AtP of the writer.
EAP-IG replaces the base-run gradient by its mean over `steps` points on the straight
line from the base run towards the source run (alpha = k/steps, k = 0..steps-1), either
of the input embeddings ("eap-ig-inputs") or of one writer group at a time (the
embeddings, each layer's attention, each layer's MLP: "eap-ig-activations", 2L+1 groups).
With steps=1 both are EAP.

Hanna et al.'s reference code (hannamw/EAP-IG) scores (corrupted - clean) . gradient, where
jpatch scores (source - base) . gradient, `direction` picking the base run as in `attribute`
(denoising by default). With the same metric: its EAP (gradient at the clean run) equals
jpatch's direction="noise"; its EAP-IG-inputs with points corrupted + (k/steps)(clean -
corrupted) for k in range(0, steps) (its src/eap code) are jpatch's direction="denoise" points,
scores sign flipped, and for k in range(1, steps + 1) (its earlier code) direction="noise"'s,
scores equal. Its examples minimize a loss (minus the logit difference), which flips each sign
again. Its activations variant also cuts the gradient
through the interpolated group; here the group is shifted and every gradient path kept, which
is what makes steps=1 equal EAP.
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np

from jpatch.model import sites
from jpatch.engine import aggregate
from jpatch.model.sites import SPLIT_INPUT_SITES
from jpatch.engine.inputs import check_base
from jpatch.methods.perturb import perturbed_forward, row_chunks, take_rows
from jpatch.engine.inputs import check_baselines, check_direction, checked_inputs
from jpatch.engine.readout import prepare_metric
from jpatch.engine.scores import DEFAULT_MEMORY_BUDGET
from jpatch.engine.sweep import check_memory_budget

EDGE_METHODS = ("eap", "eap-ig-inputs", "eap-ig-activations")


def _stages(config):
    """Each writer's and reader's stage in the residual stream: a reader sees the writers of earlier
    stages. Layer l's heads write (and its q/k/v inputs read) at stage 2l + 1; its MLP writes at
    2l + 2 and reads at 2l + 2 in a sequential block (after the heads of its layer), at 2l + 1 in a
    parallel one (the family's `parallel_block`: beside them)."""
    L, H = config.n_layer, config.n_head
    mlp_reads = 1 if config.parallel_block else 2
    w_stage, r_stage = [0], []
    for l in range(L):
        w_stage += [2 * l + 1] * H + [2 * l + 2]
        r_stage += [2 * l + 1] * reader_layout(config)[1] + [2 * l + mlp_reads]
    return np.asarray(w_stage), np.asarray(r_stage + [2 * L + 1])


def reader_layout(config):
    """A layer's readers in the graph, in order: q of each query head, k and v of each key-value head
    (of each head without grouped-query attention), then the MLP. -> ({reader-input site: slice of
    the layer's readers}, the MLP's index, readers per layer)."""
    counts = (config.n_head, config.n_kv_head, config.n_kv_head)
    starts = np.cumsum((0,) + counts)
    cols = {site: slice(int(a), int(a) + n) for site, a, n in zip(SPLIT_INPUT_SITES, starts, counts)}
    return cols, int(starts[-1]), int(starts[-1]) + 1


def graph_names(config):
    """Writer and reader names (hannamw/EAP-IG's) and which edges exist ([n_writers, n_readers] bool).
    Under grouped-query attention the k and v readers are key-value heads, "a<l>.kv<g><k>": a query
    head's k / v input is its group's (`circuits.reader_indices` reads "a<l>.h<h><k>" so)."""
    L, H, G = config.n_layer, config.n_head, config.n_kv_head
    if getattr(config, "post_norms", False):  # a head's write is not its share of the residual stream
        raise ValueError(f"edge methods (edge_attribution, path_patch, ACDC, circuits) are not implemented for "
                         f"{config.sites.family}: its attention and MLP outputs are normalized before they "
                         "are added to the residual stream, so the heads' writes do not add up")
    kv = "h" if G == H else "kv"
    writers, readers = ["embed"], []
    for l in range(L):
        writers += [f"a{l}.h{h}" for h in range(H)] + [f"m{l}"]
        readers += ([f"a{l}.h{h}<q>" for h in range(H)] + [f"a{l}.{kv}{g}<{c}>" for c in "kv" for g in range(G)]
                    + [f"m{l}"])
    readers.append("logits")
    w_stage, r_stage = _stages(config)
    valid = w_stage[:, None] < r_stage[None, :]  # a reader sees earlier writers only
    return tuple(writers), tuple(readers), valid


def reader_bias(model):
    """[n_readers, d_model]: the attention output biases b_O each reader's input holds (those of the
    layers whose heads it sees); the same in every run, so edges never mix them."""
    r_stage = _stages(model.config)[1]
    head_stage = 2 * np.arange(model.config.n_layer) + 1
    sees = (head_stage[None, :] < r_stage[:, None]).astype(np.float32)  # [n_readers, L]
    return jnp.asarray(sees) @ model.b_O.astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class Edges(aggregate.ResultFields):
    """Edge scores [n_writers, n_readers] (or [n_writers, n_readers, pos] per position; a leading
    [batch] axis when per_prompt): the estimated change of the metric when the edge takes its source
    run's value, in the metric's normalized units (for a "range" metric, the change over
    clean - corrupted, each prompt's own gap when per_prompt). Edges that do not exist (a reader
    before its writer) are 0 and False in `valid`.

    The result contract's fields (`jpatch.engine.aggregate.RESULT_FIELDS`): `delta` is the same change
    in raw units (mean over prompts), `delta_per_prompt` per prompt (kept for per-edge totals; for
    per-position scores only with per_prompt=True, their size being batch x edges x pos), `patched` /
    `raw` the estimated patched scores (the base run's score plus the change)."""

    scores: np.ndarray
    writers: tuple
    readers: tuple
    valid: np.ndarray

    def totals(self):
        """Per-edge scores summed over positions [(batch,) n_writers, n_readers]."""
        return self.scores.sum(-1) if self.scores.ndim == 3 + bool(self.per_prompt) else self.scores

    def _aggregate_only(self, what):
        if self.per_prompt:
            raise ValueError(f"{what} ranks the edges of one aggregate; these scores are per prompt: rank "
                             "edge_attribution(..., per_prompt=False)")

    def top(self, k=10):
        """The k edges with the largest |score|: [(writer, reader, score), ...]."""
        self._aggregate_only("top")
        flat = np.where(self.valid, np.abs(self.totals()), -np.inf).ravel()
        k = min(int(k), int(self.valid.sum()))
        order = np.argsort(-flat, kind="stable")[:k]
        w, r = np.unravel_index(order, self.valid.shape)
        return [(self.writers[i], self.readers[j], float(self.totals()[i, j])) for i, j in zip(w, r)]

    def _repr_html_(self):
        """A notebook's view: the per-edge scores as a writer x reader heatmap (invalid edges blank;
        per prompt: the mean, a prompt picker and the spread) and the top 20 edges as a layered graph."""
        from jpatch.files import html_view

        scores = np.where(self.valid, self.totals(), np.nan)
        each = scores if self.per_prompt else None
        grid = np.nanmean(scores, 0) if self.per_prompt else scores  # per prompt: their plain mean
        panels = html_view.result_panels(grid, ("writer", "reader"), each=each, title=f"{self.method} edge scores "
                                         f"({self.direction}, normalization {self.normalization})")
        panels[0]["labels"] = {"writer": list(self.writers), "reader": list(self.readers)}
        if not self.per_prompt:
            panels.append(html_view.circuit(*html_view.graph_shape(self.writers), self.top(20), title="top 20 edges"))
        return html_view.fragment(panels)

    def to_json(self, path=None):
        """{"method", "direction", "normalization", "clean", "corrupted", "edges": [{"writer", "reader",
        "score", "delta"(, "by_pos")}]}; written to `path` if given."""
        self._aggregate_only("to_json")
        scores = self.totals()
        deltas = None if self.delta is None else (self.delta.sum(-1) if self.delta.ndim == 3 else self.delta)
        edges = []
        for i, j in zip(*np.nonzero(self.valid)):
            edge = {"writer": self.writers[i], "reader": self.readers[j], "score": float(scores[i, j])}
            if deltas is not None:
                edge["delta"] = float(deltas[i, j])
            if self.scores.ndim == 3:
                edge["by_pos"] = [float(x) for x in self.scores[i, j]]
            edges.append(edge)
        text = json.dumps({"method": self.method, "direction": self.direction, "normalization": self.normalization,
                           "clean": self.clean, "corrupted": self.corrupted, "edges": edges})
        if path is not None:
            with open(path, "w") as f:
                f.write(text)
        return text


def _reader_grads(grads):
    """Gradients at every reader's input [n_readers, rows, pos, d_model], in the graph's order (per
    layer: each head's q, k, v input, the MLP's input; then the logits' final residual), from the
    gradients at the reader-input sites."""
    per_head = jnp.concatenate([jnp.moveaxis(grads[s], 3, 1) for s in SPLIT_INPUT_SITES], axis=1)  # [L, 3H, n, t, d]
    per_layer = jnp.concatenate([per_head, grads["hook_mlp_in"][:, None]], axis=1)
    per_layer = per_layer.reshape((-1,) + per_layer.shape[2:])
    return jnp.concatenate([per_layer, grads["hook_resid_post"][-1][None]]).astype(jnp.float32)


def _writes(base, source):
    """Source - base writes [n_writers, rows, pos, d_model]: embeddings, each head's result, each MLP."""
    heads = jnp.moveaxis((source["attn.hook_result"] - base["attn.hook_result"]).astype(jnp.float32), 3, 1)
    mlp = (source["hook_mlp_out"] - base["hook_mlp_out"]).astype(jnp.float32)[:, None]
    per_layer = jnp.concatenate([heads, mlp], axis=1)
    embed = (source["hook_resid_pre"][0] - base["hook_resid_pre"][0]).astype(jnp.float32)[None]
    return jnp.concatenate([embed, per_layer.reshape((-1,) + per_layer.shape[2:])])


# Gradients are taken at the readers' inputs (and the last residual, the logits' reader); the
# writes shift the residual at hook_attn_out / hook_mlp_out (EAP-IG's interpolations).
_GRAD_SITES = SPLIT_INPUT_SITES + ("hook_mlp_in", "hook_resid_post", "hook_attn_out", "hook_mlp_out")
_RECORD = ("hook_resid_pre", "attn.hook_result", "hook_mlp_out", "hook_attn_out")


def _alphas(method, steps, n_layer):
    """[runs, 2L+1] interpolation coefficients of (embeddings, attn 0, mlp 0, ...); run 0 is the base run."""
    k = np.arange(steps) / steps
    groups = 2 * n_layer + 1
    if method == "eap":
        return np.zeros((1, groups))
    if method == "eap-ig-inputs":
        alphas = np.zeros((steps, groups))
        alphas[:, 0] = k
        return alphas
    alphas = np.zeros((groups, steps, groups))
    for g in range(groups):
        alphas[g, :, g] = k
    return alphas.reshape(groups * steps, groups)


@jax.jit
def _source_acts(model, tokens, overrides, read_pos):
    logits, cache = model.run_with_cache(tokens, names_filter=list(_RECORD), overrides=overrides, logits_at=read_pos)
    return logits, {s: cache.stacked(s) for s in _RECORD}


def _edge_scores(model, base_tokens, base_overrides, source_tokens, source_overrides, read_pos, data, alphas, *,
                 score, noise, per_position, per_row):
    cfg = model.config
    N, T = base_tokens.shape
    source_logits, source = _source_acts(model, source_tokens, source_overrides, read_pos)
    zeros = {s: jnp.zeros((cfg.n_layer,) + sites.activation_shape(cfg, s, N, T), model.dtype) for s in _GRAD_SITES}

    def run(alpha, shift):
        """One forward and backward with each group moved alpha of the way towards the source."""
        eps = dict(zeros)
        for site, a in (("hook_attn_out", alpha[1::2]), ("hook_mlp_out", alpha[2::2])):
            eps[site] = zeros[site] + (a[:, None, None, None] * shift[site]).astype(model.dtype)

        def f(eps):
            logits, acts = perturbed_forward(model, base_tokens, base_overrides, None, read_pos, eps, record=_RECORD,
                                             embed_shift=alpha[0] * shift["embed"])
            anchor = jax.lax.stop_gradient(logits) if noise else source_logits
            s = score(logits, anchor, data)
            return s.sum(), (s, acts, logits)

        _, vjp, (s, acts, logits) = jax.vjp(f, eps, has_aux=True)
        return _reader_grads(vjp(jnp.ones((), jnp.float32))[0]), s, acts, logits

    no_shift = {"embed": 0.0, "hook_attn_out": 0.0, "hook_mlp_out": 0.0}
    readers, base_score, base, base_logits = run(alphas[0], no_shift)  # run 0: the base run itself
    shift = {"embed": source["hook_resid_pre"][0] - base["hook_resid_pre"][0],
             "hook_attn_out": source["hook_attn_out"] - base["hook_attn_out"],
             "hook_mlp_out": source["hook_mlp_out"] - base["hook_mlp_out"]}
    if alphas.shape[0] > 1:
        readers = jax.lax.scan(lambda acc, a: (acc + run(a, shift)[0], None), readers, alphas[1:])[0]
    readers = readers / alphas.shape[0]
    writes = _writes(base, source)
    out = ("n" if per_row else "") + ("wrt" if per_position else "wr")
    scores = jnp.einsum(f"wntd,rntd->{out}", writes, readers)
    clean_logits, corrupted_logits = (base_logits, source_logits) if noise else (source_logits, base_logits)
    return scores, score(clean_logits, clean_logits, data), score(corrupted_logits, clean_logits, data)


_edge_scores_jit = jax.jit(_edge_scores, static_argnames=("score", "noise", "per_position", "per_row"))


def edge_attribution(model, clean, corrupted, metric, *, method="eap", steps=5, direction="denoise",
                     per_position=False, per_prompt=False, attention_mask=None, memory_budget=DEFAULT_MEMORY_BUDGET):
    """EAP / EAP-IG scores of every edge writer -> reader, as an `Edges`.

    clean, corrupted: [batch, pos] tokens or `Run`s (a Gaussian-noise run's samples are
    averaged); metric: a jpatch Metric or a callable (as in `sweep`). Scores are the
    estimated change of the metric when one edge takes its source-run value, averaged
    over prompts and divided by (clean - corrupted) for a "range" metric.
    method: "eap" (one backward pass), "eap-ig-inputs" (steps passes),
    "eap-ig-activations" (steps x (2 n_layer + 1) passes); per_position: [.., pos] scores;
    per_prompt: [batch, ...] scores, each prompt normalized by its own baselines (as in `sweep`).
    attention_mask: [batch, pos] for right-padded prompts of different lengths (as in `sweep`).
    memory_budget (bytes): prompts are split into chunks that fit it (a per-prompt metric only).
    """
    if method not in EDGE_METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(EDGE_METHODS)}")
    check_direction(direction)
    if int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps}")
    check_memory_budget(memory_budget)
    # Right padding needs no mask in the forward: real positions never attend to later pads, and
    # the metric reads each prompt's last real token, so pad positions get no gradient.
    clean, corrupted, mask = checked_inputs(model, clean, corrupted, attention_mask)
    S, B, T = corrupted.samples, clean.batch, clean.tokens.shape[1]
    metric = prepare_metric(metric, model.config.d_vocab, B, T, mask, S)
    clean_rows = clean.tiled(S)
    base, source = (corrupted, clean_rows) if direction == "denoise" else (clean_rows, corrupted)
    check_base(base)
    read_pos = metric.read_positions(S * B, T)
    rows = S * B
    data = metric.batch_data(rows)
    # The gradients at every reader's input dominate memory: n_readers x rows x pos x d_model floats.
    row_bytes = 4 * 3 * len(graph_names(model.config)[1]) * T * model.config.d_model
    alphas = jnp.asarray(_alphas(method, int(steps), model.config.n_layer), jnp.float32)
    chunks = row_chunks(model, metric, data, rows, T if read_pos is None else read_pos.shape[1], row_bytes,
                        memory_budget)
    # Each row's own scores: for per-prompt views (per position only when asked: rows x edges x pos).
    per_row = bool(per_prompt) or not per_position
    parts = [jax.device_get(_edge_scores_jit(
        model, jnp.asarray(base.tokens[sl]), take_rows(base.overrides, sl, rows), jnp.asarray(source.tokens[sl]),
        take_rows(source.overrides, sl, rows), None if read_pos is None else jnp.asarray(read_pos[sl]),
        take_rows(data, sl, rows), alphas, score=metric.score, noise=direction == "noise",
        per_position=per_position, per_row=per_row)) for sl in chunks]
    joined = lambda i: (np.concatenate([np.asarray(p[i], np.float64) for p in parts]) if len(parts) > 1
                        else np.asarray(parts[0][i], np.float64))
    clean_score, corrupted_score = joined(1), joined(2)
    scalar = clean_score.ndim == 0
    check_baselines(metric, clean_score, corrupted_score, rows, per_prompt=per_prompt and not scalar, samples=S)
    if per_prompt and scalar:
        raise ValueError(f"per_prompt=True needs a metric with one value per prompt; {metric.name!r} returns a scalar")
    by_prompt = lambda a: a.reshape((S, B) + a.shape[1:]).mean(0)  # noise samples averaged per prompt
    if per_row:
        change = joined(0)  # [rows, W, R(, pos)], or for a batch-level metric the rows' shares of its change
        change_per_prompt = None if scalar else by_prompt(change)
        change = change.sum(0) if scalar else change_per_prompt.mean(0)
    else:
        change = sum(np.asarray(p[0], np.float64) for p in parts)
        change, change_per_prompt = (change if scalar else change / rows), None
    if not np.isfinite(change).all():
        raise FloatingPointError(f"metric {metric.name!r} has a non-finite gradient: edge scores are undefined")
    writers, readers, valid = graph_names(model.config)
    keep = lambda a: None if a is None else np.where(valid[..., None] if per_position else valid, a, 0.0)
    change, change_per_prompt = keep(change), keep(change_per_prompt)
    if not scalar:
        clean_score, corrupted_score = by_prompt(clean_score), by_prompt(corrupted_score)
    scores = change_per_prompt if per_prompt else change
    if metric.normalize == "range":  # a change over the gap: each prompt's own, or the gap of the means
        gap = clean_score - corrupted_score if per_prompt else clean_score.mean() - corrupted_score.mean()
        scores = scores / np.reshape(gap, np.shape(gap) + (1,) * (scores.ndim - np.ndim(gap)))
    if scalar:
        views = aggregate.raw_views(direction, float(clean_score), float(corrupted_score), change=change)
    elif change_per_prompt is not None:
        views = aggregate.raw_views(direction, clean_score, corrupted_score, change=change_per_prompt)
    else:  # per-position scores without per-prompt ones: the mean change only
        views = aggregate.raw_views(direction, clean_score.mean(), corrupted_score.mean(), change=change)
    axes = ("writer", "reader") + (("pos",) if per_position else ())
    return Edges(scores, writers, readers, valid, method=method, direction=direction, normalization=metric.normalize,
                 axes=axes, per_prompt=bool(per_prompt), clean=float(np.mean(clean_score)), corrupted=float(np.mean(corrupted_score)),
                 clean_per_prompt=None if scalar else clean_score.astype(np.float32),
                 corrupted_per_prompt=None if scalar else corrupted_score.astype(np.float32), **views)
