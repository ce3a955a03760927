"""Circuits: the edge-level forward, exact path patching and circuit faithfulness.

The graph is `jpatch.edges`' (hannamw/EAP-IG's names): writers are the embeddings,
each head's output z_h W_O[h] and each MLP's output; readers are each head's q, k and
v input, each MLP's input and the final residual (the logits). The attention output
bias b_O is the same in every run, so it is added to every later reader unmasked.

`edge_forward` runs the model with every reader's input rebuilt from the writers:

    input_r = bias_r + sum_w valid[w, r] (m[w, r] own_w + (1 - m[w, r]) source_w),

own_w being the write recomputed in this run and source_w a fixed write (the corrupted
run's, or a mean). m is a float mask, so the forward is differentiable in it (its
gradient at m = 1 is minus EAP's noising score); m = 1 everywhere is the plain forward
of the run's tokens, m = 0 everywhere the source run's logits.
"""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np

from jpatch.methods.edges import graph_names, reader_bias, reader_layout
from jpatch.model.layers import causal_attention
from jpatch.model.sites import SPLIT_INPUT_SITES
from jpatch.engine import aggregate
from jpatch.engine.inputs import as_run, check_baselines, checked_inputs, rounding_equal
from jpatch.engine.readout import prepare_metric
from jpatch.engine.scores import DEFAULT_MEMORY_BUDGET

ABLATIONS = ("corrupted", "mean")


def writer_index(config, name):
    """Row of writer `name` ("embed", "a3.h2", "m3") in the [n_writers, n_readers] graph."""
    writers = graph_names(config)[0]
    if name not in writers:
        raise ValueError(f"unknown writer {name!r}; writers are 'embed', 'a<layer>.h<head>', 'm<layer>' "
                         f"(layers < {config.n_layer}, heads < {config.n_head})")
    return writers.index(name)


def reader_indices(config, name):
    """Columns of reader `name`: "logits", "m3", "a3.h2<q>" (or "a3.h2": its q, k and v inputs)."""
    readers, group = graph_names(config)[1], config.n_head // config.n_kv_head

    def resolve(n):  # a query head's k / v input is its group's key-value head's (grouped-query attention)
        m = re.fullmatch(r"a(\d+)\.h(\d+)<([kv])>", n)
        return f"a{m[1]}.kv{int(m[2]) // group}<{m[3]}>" if m and group > 1 else n

    if resolve(name) in readers:
        return [readers.index(resolve(name))]
    if f"{name}<q>" in readers:
        return [readers.index(resolve(f"{name}<{c}>")) for c in "qkv"]
    raise ValueError(f"unknown receiver {name!r}; receivers are 'logits', 'm<layer>', 'a<layer>.h<head>' "
                     f"(its q, k, v inputs) or 'a<layer>.h<head><q>' / '<k>' / '<v>'")


def run_writes(model, tokens):
    """A plain run's logits [B, T, V] and writes [n_writers, B, T, d] (heads without b_O)."""
    logits, cache = model.run_with_cache(tokens, names_filter=["hook_resid_pre", "attn.hook_result", "hook_mlp_out"])
    heads = jnp.moveaxis(cache.stacked("attn.hook_result"), 3, 1)  # [L, H, B, T, d]
    per_layer = jnp.concatenate([heads, cache.stacked("hook_mlp_out")[:, None]], axis=1)
    per_layer = per_layer.reshape((-1,) + per_layer.shape[2:])
    return logits, jnp.concatenate([cache.stacked("hook_resid_pre")[0][None], per_layer])


def layer_writes(writes, l, n_head):
    """Layer l's head writes [B, T, H, d] and MLP write [B, T, d] of a [n_writers, B, T, d] stack."""
    start = 1 + l * (n_head + 1)
    return jnp.moveaxis(jax.lax.dynamic_slice_in_dim(writes, start, n_head), 0, 2), writes[start + n_head]


def edge_forward(model, tokens, mask, source, read_pos=None):
    """Logits [B, K, V] (all positions when read_pos is None) of `tokens` with each edge w -> r
    mixing m[w, r] of this run's write and 1 - m[w, r] of `source`'s write.

    mask [n_writers, n_readers] float (1: this run, 0: source); source [n_writers, B or 1, T, d]
    (e.g. `run_writes` of the corrupted tokens). Pure and jittable; vmap it over masks. The
    model's own blocks run it: every reader's input (hook_q_input / hook_k_input / hook_v_input
    per head, hook_mlp_in) is replaced by its mix of the writes so far.
    """
    cfg = model.config
    L, H, d = cfg.n_layer, cfg.n_head, cfg.d_model
    valid = jnp.asarray(graph_names(cfg)[2])
    mask = jnp.asarray(mask, jnp.float32)
    own, src = jnp.where(valid, mask, 0.0), jnp.where(valid, 1.0 - mask, 0.0)
    cols_of, mlp_col, per = reader_layout(cfg)  # readers per layer: q, k, v of each head, then the MLP
    by_layer = lambda m: jnp.moveaxis(m[:, :L * per].reshape(-1, L, per), 1, 0)  # [L, W, per]
    bias = reader_bias(model)  # [n_readers, d]
    source = jnp.asarray(source, jnp.float32)
    mix = lambda w_own, w_src, buf: (jnp.einsum("wr,wbtd->rbtd", w_own, buf)
                                     + jnp.einsum("wr,wbtd->rbtd", w_src, source))
    B, T = tokens.shape
    positions = model.positions(tokens)
    buf = jnp.zeros((len(valid), B, T, d), jnp.float32).at[0].set(model.embed(tokens, positions).astype(jnp.float32))

    def layer(buf, xs):
        l, block, m_own, m_src, b = xs
        start, got = 1 + l * (H + 1), {}

        def edit(name, act):
            if name in SPLIT_INPUT_SITES:  # [B, T, heads, d]: each head's mix for this input
                cols = cols_of[name]
                return jnp.moveaxis(mix(m_own[:, cols], m_src[:, cols], buf) + b[cols, None, None], 0, 2)
            if name == "attn.hook_result":
                got["buf"] = jax.lax.dynamic_update_slice_in_dim(buf, jnp.moveaxis(act, 2, 0), start, 0)
            elif name == "hook_mlp_in":
                return mix(m_own[:, mlp_col:], m_src[:, mlp_col:], got["buf"])[0] + b[mlp_col]
            elif name == "hook_mlp_out":
                got["mlp"] = act
            return act

        edit.split_inputs = edit.wants_result = True
        block(jnp.zeros((B, T, d), jnp.float32), positions, cfg, causal_attention, edit)
        return jax.lax.dynamic_update_slice_in_dim(got["buf"], got["mlp"][None].astype(jnp.float32), start + H, 0), None

    blocks = float32_model(model).blocks
    xs = (jnp.arange(L), blocks, by_layer(own), by_layer(src), bias[:L * per].reshape(L, per, d))
    buf, _ = jax.lax.scan(layer, buf, xs)
    final = mix(own[:, -1:], src[:, -1:], buf)[0] + bias[-1]
    if read_pos is not None:
        final = jnp.take_along_axis(final, jnp.asarray(read_pos)[..., None], axis=1)
    return model.unembed(final.astype(model.dtype))


def _plain_tokens(x, what):
    run = as_run(x, what)
    if run.overrides or run.samples != 1 or run.attention_mask is not None:
        raise ValueError(f"{what}: circuits take plain [batch, pos] tokens of equal length (no overrides, noise "
                         "samples or padding); pass the token array")
    return jnp.asarray(run.tokens)


def float32_model(model):
    """Circuits mix and subtract writes: a bfloat16 model is run in float32 (its weights exactly)."""
    return model if model.dtype == jnp.float32 else model.astype(jnp.float32)


def pair_tokens(model, clean, corrupted):
    """The circuit methods' inputs through every method's one check (`checked_inputs`), as plain tokens."""
    clean, corrupted = _plain_tokens(clean, "clean"), _plain_tokens(corrupted, "corrupted")
    if clean.shape != corrupted.shape:
        raise ValueError(f"clean tokens {clean.shape} and corrupted tokens {corrupted.shape} must have the same shape")
    checked_inputs(model, np.asarray(clean), np.asarray(corrupted))  # no mask: a batch that looks padded is refused
    return clean, corrupted


def _source(model, clean, corrupted, ablation):
    """The writes edges outside a circuit take: the corrupted run's, or the clean run's mean over prompts."""
    if ablation not in ABLATIONS:
        raise ValueError(f"unknown ablation {ablation!r}; valid: {', '.join(ABLATIONS)}")
    if ablation == "corrupted":
        return run_writes(model, corrupted)[1]
    return run_writes(model, clean)[1].mean(1, keepdims=True)


def _scores_under_masks(model, tokens, masks, source, read_pos, clean_logits, data, *, score):
    """Raw metric scores [n_masks, B] (or [n_masks]) of `edge_forward` under each mask."""
    return jax.vmap(lambda m: score(edge_forward(model, tokens, m, source, read_pos), clean_logits, data))(masks)


_scores_under_masks_jit = jax.jit(_scores_under_masks, static_argnames=("score",))


def mask_scorer(model, clean, corrupted, metric, *, ablation="corrupted", memory_budget=DEFAULT_MEMORY_BUDGET):
    """A function masks [n_masks, n_writers, n_readers] -> raw metric scores [n_masks, batch] (or
    [n_masks] for a batch-level metric) of the clean tokens with each edge mask (1 = the clean
    run's write, 0 = the ablated one), the clean run's logits as the metric's reference. The
    ablated writes are computed once; masks run in vmapped chunks that fit `memory_budget` (bytes).
    A bfloat16 model runs in float32."""
    model = float32_model(model)
    clean, corrupted = pair_tokens(model, clean, corrupted)
    # A plain callable keyed by its structure, its captured arrays as data (a new closure reuses the
    # compile), narrowed to the logit positions it reads: only those are unembedded.
    metric = prepare_metric(metric, model.config.d_vocab, *clean.shape, None)
    read_pos = metric.read_positions(*clean.shape)
    read_pos = None if read_pos is None else jnp.asarray(read_pos)
    clean_logits = model(clean, logits_at=read_pos)
    source = _source(model, clean, corrupted, ablation)
    data = metric.batch_data(clean.shape[0])
    writers, readers, _ = graph_names(model.config)
    n_w, n_r = len(writers), len(readers)
    # Each mask's forward holds every writer's output and a layer's mixed reader inputs.
    per_mask = 4 * 3 * (n_w + n_r // model.config.n_layer) * clean.size * model.config.d_model
    chunk = max(1, int(memory_budget // per_mask))

    def scores(masks):
        masks = jnp.asarray(masks, jnp.float32)
        if masks.ndim != 3 or masks.shape[1:] != (n_w, n_r):
            raise ValueError(f"masks must be [n_masks, {n_w} writers, {n_r} readers], got {tuple(masks.shape)}")
        parts = []
        for i in range(0, len(masks), chunk):
            part = masks[i:i + chunk]
            # Padded (with copies of the last mask) to a power of two: few sizes, few compiles.
            size = min(chunk, 1 << (len(part) - 1).bit_length())
            padded = jnp.concatenate([part, jnp.repeat(part[-1:], size - len(part), 0)])
            out = _scores_under_masks_jit(model, clean, padded, source, read_pos, clean_logits, data,
                                          score=metric.score)
            parts.append(np.asarray(jax.device_get(out), np.float64)[:len(part)])
        return np.concatenate(parts)

    # The clean run's own score ([batch] or scalar): what the all-kept mask gives in exact arithmetic.
    scores.clean = np.asarray(metric.score(clean_logits, clean_logits, data), np.float64)
    check_baselines(metric, scores.clean, None, clean.shape[0])  # raw scores: no gap to normalize by
    return scores


def edge_scores(model, clean, corrupted, masks, metric, *, ablation="corrupted", memory_budget=DEFAULT_MEMORY_BUDGET):
    """Raw metric scores of the clean tokens under each edge mask (see `mask_scorer`)."""
    return mask_scorer(model, clean, corrupted, metric, ablation=ablation, memory_budget=memory_budget)(masks)


# --- circuits and faithfulness ---------------------------------------------------------


def circuit_mask(config, circuit):
    """The [n_writers, n_readers] bool mask of a circuit: edges (writer, reader) pairs, where a
    reader "a1.h2" stands for its q, k and v inputs, or nodes (writer names: every edge out of
    them, e.g. {"embed", "a0.h1", "m0"}), or a bool mask itself."""
    writers, readers, valid = graph_names(config)
    if isinstance(circuit, np.ndarray) or hasattr(circuit, "shape"):
        mask = np.asarray(circuit, bool)
        if mask.shape != valid.shape:
            raise ValueError(f"a circuit mask must be [{len(writers)} writers, {len(readers)} readers], "
                             f"got {mask.shape}")
        return mask & valid
    mask = np.zeros(valid.shape, bool)
    for item in circuit:
        if isinstance(item, str):
            mask[writer_index(config, item)] = True
            continue
        if len(item) != 2:
            raise ValueError(f"a circuit holds writer names (nodes) or (writer, reader) edges, got {item!r}")
        w = writer_index(config, item[0])
        for r in reader_indices(config, item[1]):
            if not valid[w, r]:
                raise ValueError(f"edge {item[0]} -> {readers[r]} does not exist: the reader comes first")
            mask[w, r] = True
    return mask & valid  # a node keeps only the edges that exist


@dataclasses.dataclass(frozen=True)
class Faithfulness(aggregate.ResultFields):
    """faithfulness = (circuit - empty) / (full - empty): the fraction of the metric the circuit
    recovers. circuit, full, empty: the metric's raw score (mean over prompts) with every edge
    outside the circuit ablated, no edge ablated (the clean run) and every edge ablated.

    The result contract's fields (`jpatch.engine.aggregate.RESULT_FIELDS`): ablating edges of the
    clean run is noising, so the base run is the full graph (`clean`), `corrupted` is the fully
    ablated graph (the corrupted run's score with ablation "corrupted"), `patched` / `raw` the
    circuit's score (mean / per prompt) and `delta` the circuit's minus the full graph's."""

    faithfulness: float
    circuit: float
    full: float
    empty: float
    n_edges: int
    ablation: str


def faithfulness(model, clean, corrupted, circuit, metric, *, ablation="corrupted"):
    """How much of the metric a circuit (edges or nodes, see `circuit_mask`) recovers when every
    edge outside it takes the corrupted run's write ("corrupted") or the clean run's mean over
    prompts at each position ("mean"). Returns a `Faithfulness` with its baselines."""
    cfg = model.config
    keep = circuit_mask(cfg, circuit)
    valid = graph_names(cfg)[2]
    masks = np.stack([keep, valid, np.zeros_like(valid)]).astype(np.float32)
    raw = edge_scores(model, clean, corrupted, masks, metric, ablation=ablation)
    circ, full, empty = (float(r.mean()) for r in raw)
    if rounding_equal(full, empty):
        raise ValueError(f"the full graph and the fully ablated one score the same ({full:g}): faithfulness is "
                         "undefined (e.g. mean ablation over a single prompt)")
    per_prompt = raw.ndim == 2  # a metric with one value per prompt
    views = aggregate.raw_views("noise", raw[1], raw[2], raw=raw[0])
    return Faithfulness((circ - empty) / (full - empty), circ, full, empty, int(keep.sum()), ablation,
                        method="faithfulness", direction="noise", normalization="range", axes=(), clean=full,
                        corrupted=empty,
                        clean_per_prompt=raw[1].astype(np.float32) if per_prompt else None,
                        corrupted_per_prompt=raw[2].astype(np.float32) if per_prompt else None,
                        **{**views, "patched": float(views["patched"]), "delta": float(views["delta"])})


# jpatch.circuits.path_patch and .acdc: paths.py and acdc.py build on this module.
from jpatch.methods.paths import path_patch  # noqa: E402,F401
from jpatch.methods.acdc import Circuit, acdc  # noqa: E402,F401  (jpatch.circuits.acdc; acdc.py builds on this module)
