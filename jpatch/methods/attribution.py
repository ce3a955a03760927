"""Attribution patching: first-order estimates of what `jpatch.sweep` measures.

AtP (Nanda 2023) estimates the effect of patching a node n of the *base* run (the
corrupted run when denoising, the clean run when noising) with its value in the
*source* run as

    delta(n) = (n_source - n_base) . dM/dn  (gradient at the base run),

summed over the node's feature dimension. Every node of a site, at every layer and
prompt, comes from two forwards and one backward: the base run's forward adds a
zero perturbation at the site (all layers at once) and one `jax.vjp` gives the
gradient with respect to all of them. `attribute` returns the estimated metric in
the grid, shape and normalization `sweep` returns, so the two compare directly.

AtP* (Kramar et al. 2024) adds two fixes:
- the QK fix: a query or key changes nothing but the attention pattern, so the
  patched pattern is recomputed exactly (softmax of the patched scores) and only what
  follows the pattern is linearized: delta = sum (A' - A) . dM/dA;
- GradDrop: for each layer l the backward pass runs with the gradient through layer
  l's writes to the residual stream (attn_out, mlp_out) set to zero, and the node's
  score is (1/(L-1)) sum_l |delta_l(n)| (averaged over prompt pairs; the paper's eq. 11).
  This is a size for ranking nodes, never signed.
methods: "atp", "atp-qk" (the QK fix alone: signed, comparable with `sweep`),
"atp*" (QK fix and GradDrop: non-negative sizes).
"""

import functools
from typing import Union

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Float

from jpatch.model import sites
from jpatch.model.layers import causal_attention
from jpatch.engine import aggregate
from jpatch.engine.inputs import Run, as_run, check_direction, checked_inputs, prompt_lengths
from jpatch.engine.patching import EVERY, SWEEPS, read_clean_cache, stack_every
from jpatch.engine.readout import prepare_metric
from jpatch.engine.scores import DEFAULT_MEMORY_BUDGET, applies
from jpatch.engine.sweep import check_memory_budget, default_axes, finish, make_patches
from jpatch.engine.inputs import check_base
from jpatch.methods import attr_recipe
from jpatch.methods.attr_recipe import (  # noqa: F401  (TransformerLens's Attribution_Patching_Demo)
    AttrCaches, attr_patch_head_out, attr_patch_head_path, attr_patch_head_pattern, attr_patch_head_vector,
    attr_patch_layer_out, attr_patch_residual, attribution_cache, create_attention_attr, filter_not_qkv_input,
    get_cache_fwd_and_bwd, get_caches_fwd_and_bwd)
from jpatch.methods.perturb import perturbed_forward, row_chunks, take_rows
from jpatch.model.architecture import Cache
from jpatch.model.types import Grid, Mask, Tokens

METHODS = ("atp", "atp-qk", "atp*")



def estimate_dims(site):
    """Axes of a site's full-resolution estimate [layer, row, ...]; "row" is the prompt (x sample)."""
    if site == "attn.hook_pattern":
        return ("layer", "row", "head", "pos", "src")
    return ("layer", "row") + default_axes(site)[1:]


def _qk_fix(site, base, source, grad_pattern, key_mask, per_position, position_qk):
    """AtP*'s QK fix for one layer: sum (A' - A) . dM/dA with A' recomputed for the patched q or k.

    base/source: q, k [rows, T, H, d_head]; grad_pattern [rows, H, Tq, Tk]; position_qk(q, k): the q and k
    attention scores (the family's position encoding, e.g. rotary). Returns [rows, T, H] (by patched position) or
    [rows, 1, H] (all positions patched at once); for k, H is the key-value heads (each moves its query group).
    """
    def _pattern(q, k, key_mask):
        """The attention pattern [rows, H, Tq, Tk] of q, k [rows, T, H, d_head], as the model computes it."""
        got = {}

        def grab(name, pattern):
            got[name] = pattern
            return pattern

        q, k = position_qk(q, k)
        causal_attention(q, k, jnp.zeros_like(k), key_mask, grab)
        return got["attn.hook_pattern"]

    q, k = base["attn.hook_q"], base["attn.hook_k"]
    A = _pattern(q, k, key_mask)
    gain = lambda A_new: (A_new - A) * grad_pattern  # [rows, H, Tq, Tk]
    by_kv = lambda g: g.reshape(g.shape[:-1] + (k.shape[-2], -1)).sum(-1) if site == "attn.hook_k" else g
    if site == "attn.hook_q" or not per_position:
        # A query changes only its own pattern row, so every row's patch is one full recompute.
        new = _pattern(source["attn.hook_q"], k, key_mask) if site == "attn.hook_q" else _pattern(
            q, source["attn.hook_k"], key_mask)
        if site == "attn.hook_q" and per_position:
            return jnp.swapaxes(gain(new).sum(-1), 1, 2)  # [rows, Tq, H]
        return by_kv(gain(new).sum((-1, -2)))[:, None, :]  # [rows, 1, H or n_kv]
    T = k.shape[1]  # a key at position s changes column s of every row: one recompute per key position

    def one_key(s):
        k_new = jnp.where((jnp.arange(T) == s)[None, :, None, None], source["attn.hook_k"], k)
        return by_kv(gain(_pattern(q, k_new, key_mask)).sum((-1, -2)))  # [rows, n_kv]

    return jnp.moveaxis(jax.lax.map(one_key, jnp.arange(T)), 0, 1)  # [rows, Tk, n_kv]


def _delta(site, base, source, grads, key_mask, method, per_position, position_qk):
    """Full-resolution estimates [n_layer, rows, ...] (the layout of estimate_dims(site))."""
    if method != "atp" and site in ("attn.hook_q", "attn.hook_k"):
        fix = functools.partial(_qk_fix, site, key_mask=key_mask, per_position=per_position,
                                position_qk=position_qk)
        return jax.vmap(fix)(base, source, grads["attn.hook_pattern"])
    diff = (source[site] - base[site]).astype(jnp.float32) * grads[site].astype(jnp.float32)
    return diff if site == "attn.hook_pattern" else diff.sum(-1)


def _needs(site, method):
    """(sites perturbed for gradients, sites whose activations the estimate reads); a tuple of
    sites: their first-order estimates from one backward."""
    if not isinstance(site, str):
        return site, site
    if method != "atp" and site in ("attn.hook_q", "attn.hook_k"):
        return ("attn.hook_pattern",), ("attn.hook_q", "attn.hook_k")
    return (site,), (site,)


def _static(site, method, axes):
    """The compiled call's static settings; settings that change nothing share one compile."""
    if not isinstance(site, str):
        return {"method": "atp", "per_position": True}
    qk = site in ("attn.hook_q", "attn.hook_k") and method != "atp"
    return {"method": method if qk or method == "atp*" else "atp", "per_position": "pos" in axes if qk else True}


def _estimate(model, base_tokens, base_overrides, source_acts, clean_logits, read_pos, data, attention_mask, *,
              score, site, method, per_position):
    """Estimates (full resolution, with a leading GradDrop axis for "atp*"), the base run's
    per-row (or scalar) score and its logits. clean_logits None: the base run is the clean run."""
    cfg = model.config
    N, T = base_tokens.shape
    perturb, reads = _needs(site, method)
    eps = {s: jnp.zeros((cfg.n_layer,) + sites.activation_shape(cfg, s, N, T), model.dtype) for s in perturb}
    key_mask = None if attention_mask is None else attention_mask.astype(bool)
    positions = model.positions(base_tokens, attention_mask)
    position_qk = lambda q, k: model.position_qk(q, k, positions)

    def backward(keep):
        def f(eps):
            logits, acts = perturbed_forward(model, base_tokens, base_overrides, attention_mask, read_pos, eps,
                                             record=reads, keep=keep)
            anchor = jax.lax.stop_gradient(logits) if clean_logits is None else clean_logits
            s = score(logits, anchor, data)
            return s.sum(), (s, acts, logits)

        _, vjp, (s, acts, logits) = jax.vjp(f, eps, has_aux=True)
        grads = vjp(jnp.ones((), jnp.float32))[0]
        if not isinstance(site, str):
            return {n: _delta(n, acts, source_acts, grads, key_mask, "atp", True, position_qk) for n in site}, s, logits
        return _delta(site, acts, source_acts, grads, key_mask, method, per_position, position_qk), s, logits

    if method != "atp*":
        return backward(None)
    # GradDrop: layer l's residual writes get no gradient in backward pass l; the forward
    # does not depend on `keep`, so vmap batches only the backward passes.
    keeps = 1.0 - jnp.eye(cfg.n_layer, dtype=jnp.float32)
    return jax.vmap(backward, out_axes=(0, None, None))(keeps)


_estimate_from_cache = jax.jit(_estimate, static_argnames=("score", "site", "method", "per_position"))


@functools.partial(jax.jit, static_argnames=("score", "site", "method", "per_position", "noise"))
def _estimate_from_runs(model, base_tokens, base_overrides, source_tokens, source_overrides, read_pos, data,
                        attention_mask, *, score, site, method, per_position, noise):
    """The source forward, the base forward and backward, and both baselines in one compiled call."""
    source_logits, cache = model.run_with_cache(source_tokens, overrides=source_overrides,
                                                attention_mask=attention_mask, logits_at=read_pos)
    source_acts = {s: cache.stacked(s) for s in _needs(site, method)[1]}
    delta, base_score, base_logits = _estimate(
        model, base_tokens, base_overrides, source_acts, None if noise else source_logits, read_pos, data,
        attention_mask, score=score, site=site, method=method, per_position=per_position)
    clean_logits, corrupted_logits = (base_logits, source_logits) if noise else (source_logits, base_logits)
    return delta, base_score, score(clean_logits, clean_logits, data), score(corrupted_logits, clean_logits, data)


def to_grid(delta, site, axes):
    """Sum a full-resolution estimate [..., layer, row, ...] over the dimensions a patch
    covers at once (those not in `axes`) and order it as [..., *axes, row]."""
    names = estimate_dims(site)
    lead = delta.ndim - len(names)
    summed = tuple(lead + i for i, n in enumerate(names) if n not in axes and n != "row")
    delta = delta.sum(summed)
    kept = [n for n in names if n in axes or n == "row"]
    order = [kept.index(a) for a in tuple(axes) + ("row",)]
    return np.transpose(delta, tuple(range(lead)) + tuple(lead + i for i in order))


def attribute(model, clean: Union[Tokens, Run], corrupted: Union[Tokens, Run], site: str, metric, *, method="atp",
              direction="denoise", axes=None, per_prompt=False, attention_mask: Mask = None,
              memory_budget=DEFAULT_MEMORY_BUDGET) -> Grid:
    """The attribution-patching estimate of `sweep(model, clean, corrupted, site, metric, ...)`.

    Same arguments, grid axes, shape, normalization and aggregate as `jpatch.sweep` (a
    `SweepResult`: [*grid], the normalized mean over prompts, or [batch, *grid] per prompt),
    right-padded prompts with `attention_mask` included (NaN past a prompt's end).
    method: "atp" (first order), "atp-qk" (AtP*'s QK fix for q / k, exact through the
    softmax), "atp*" (QK fix and GradDrop: non-negative sizes (1/(L-1)) sum_l |delta_l| in
    the metric's units, for a "range" metric divided by |clean - corrupted|; `.delta` holds the sizes
    in raw units and there are no `.patched` scores).
    Every layer, prompt and noise sample comes from one compiled call (two forwards, one
    backward; "atp*": n_layer backward passes, vmapped), or one per chunk of prompts when
    they do not fit `memory_budget` (bytes; a metric that is one number for the whole
    batch is never split).
    """
    site = sites.canonical(site, model.config.n_layer)
    default_axes(site, model.sites)  # raises: the site has no layers to sweep in this family
    check_memory_budget(memory_budget)
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    check_direction(direction)
    clean, corrupted, mask = checked_inputs(model, clean, corrupted, attention_mask)
    axes = tuple(axes or default_axes(site, model.sites))
    S, B, T = corrupted.samples, clean.batch, clean.tokens.shape[1]
    cfg = model.config
    lengths = np.tile(prompt_lengths(mask, B, T), S)
    metric = prepare_metric(metric, cfg.d_vocab, B, T, mask, S)
    patches, shape = make_patches(cfg, site, axes, T, S * B)  # validates the axes
    base, source = (corrupted, clean.tiled(S)) if direction == "denoise" else (clean.tiled(S), corrupted)
    check_base(base)
    rows, data = S * B, metric.batch_data(S * B)
    read_pos = metric.read_positions(rows, T)
    mask = None if mask is None else jnp.asarray(np.tile(mask, (S, 1)).astype(np.int32))
    # Per prompt row: the activations the backward pass keeps (x n_layer for GradDrop's vmapped passes).
    row_bytes = 4 * cfg.n_layer * T * (2 * cfg.block_floats_per_row() + 4 * cfg.n_head * T) * (cfg.n_layer if method == "atp*" else 1)
    parts = [jax.device_get(_estimate_from_runs(
        model, jnp.asarray(base.tokens[sl]), take_rows(base.overrides, sl, rows), jnp.asarray(source.tokens[sl]),
        take_rows(source.overrides, sl, rows), None if read_pos is None else jnp.asarray(read_pos[sl]),
        take_rows(data, sl, rows), None if mask is None else mask[sl],
        score=metric.score, site=site, **_static(site, method, axes), noise=direction == "noise"))
        for sl in row_chunks(model, metric, data, rows, T if read_pos is None else read_pos.shape[1], row_bytes,
                             memory_budget)]
    row_axis = 2 if method == "atp*" else 1  # [(drop,) layer, row, ...]
    delta = np.concatenate([np.asarray(p[0], np.float64) for p in parts], axis=row_axis)
    base_score, clean_score, corrupted_score = (
        np.concatenate([np.asarray(p[i]) for p in parts]) if len(parts) > 1 else np.asarray(parts[0][i])
        for i in (1, 2, 3))
    if per_prompt and clean_score.ndim == 0:
        raise ValueError(f"per_prompt=True needs a metric with one value per prompt; {metric.name!r} returns a scalar")
    return _result(delta, base_score, clean_score, corrupted_score, metric, site, patches, axes, shape, lengths,
                   method=method, direction=direction, samples=S, per_prompt=per_prompt)


def _result(delta, base_score, clean_score, corrupted_score, metric, site, patches, axes, shape, lengths, *,
            method, direction, samples=1, per_prompt=False):
    """Estimated changes -> estimated patched scores -> `patching.finish`, the sweep's own
    aggregate (prompts where a patch does not apply, past a prompt's end, are left out).

    atp*: GradDrop sizes (1/(L-1)) sum_l |delta_l|, reported as |finish(base + size) -
    finish(base)|: the size in the sweep's normalized units; its `delta` views hold the sizes."""
    grid = to_grid(delta, site, axes)  # [(drop,) *shape, rows]
    grid = grid.reshape(grid.shape[: grid.ndim - len(shape) - 1] + (len(patches), -1))
    scalar = np.ndim(clean_score) == 0
    if scalar:  # one number for the whole batch: the rows' changes add up
        grid = grid.sum(-1)
    magnitude = method == "atp*"
    if magnitude:
        grid = np.abs(grid).sum(0) / max(grid.shape[0] - 1, 1)
    defined = applies(patches, lengths)
    defined = defined.all(1) if scalar else defined
    score = lambda change: finish(base_score + change, defined, metric, clean_score, corrupted_score, axes, shape,
                                  direction=direction, method=method, samples=samples, per_prompt=per_prompt)
    if not magnitude:
        return score(grid)
    sizes = score(grid)
    values = np.abs(sizes - score(np.zeros_like(grid)))
    return aggregate.SweepResult(values, **{**sizes.metadata(), **aggregate.sizes_views(sizes)})


# --- TransformerLens-shaped functions -------------------------------------------------


# The `*_every` functions' sites: with "atp", one compiled forward and backward gives them all.
EVERY_SITES = tuple(dict.fromkeys(SWEEPS[name][0] for names in EVERY.values() for name in names))


def tl_attribution(name, model, corrupted_tokens, clean_cache, metric, *, method="atp", attention_mask=None):
    """The attribution estimate of `jpatch.patching.get_act_patch_<name>` (method as in `attribute`);
    name: a tuple of names gives a list of estimates, from one forward and backward with "atp"."""
    if not isinstance(name, str):
        if method != "atp":
            return [tl_attribution(n, model, corrupted_tokens, clean_cache, metric, method=method,
                                   attention_mask=attention_mask) for n in name]
        site, axes = EVERY_SITES, None
    else:
        site, axes = SWEEPS[name]
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    corrupted = as_run(corrupted_tokens, "corrupted_tokens")
    check_base(corrupted)  # refused before any computation
    corrupted, mask, metric, read, clean_logits = read_clean_cache(model, corrupted, clean_cache, metric,
                                                                   attention_mask)
    N, T = corrupted.tokens.shape
    data = metric.batch_data(N)
    source = {s: clean_cache.stacked(s) for s in _needs(site, method)[1]}
    delta, base_score, base_logits = jax.device_get(_estimate_from_cache(
        model, jnp.asarray(corrupted.tokens), corrupted.overrides, source, clean_logits,
        None if read is None else jnp.asarray(read), data, None if mask is None else jnp.asarray(mask, jnp.int32),
        score=metric.score, site=site, **_static(site, method, axes)))
    clean_score = np.asarray(metric.score(clean_logits, clean_logits, data))
    corrupted_score = np.asarray(metric.score(base_logits, clean_logits, data))

    def result(name, delta):
        site, axes = SWEEPS[name]
        patches, shape = make_patches(model.config, site, axes, T, N)
        # A callable metric (normalize "none") is TransformerLens's: its raw value, averaged over prompts.
        return _result(np.asarray(delta, np.float64), np.asarray(base_score), clean_score, corrupted_score, metric,
                       site, patches, axes, shape, prompt_lengths(mask, N, T), method=method, direction="denoise")

    return result(name, delta) if isinstance(name, str) else [result(n, delta[SWEEPS[n][0]]) for n in name]



def get_attr_patch_resid_pre(model, corrupted_tokens: Union[Tokens, Run], clean_cache: Cache, metric,
                             **kwargs) -> Float[np.ndarray, "layer pos"]:
    """The estimate of `get_act_patch_resid_pre`: [layer, pos]."""
    return tl_attribution("resid_pre", model, corrupted_tokens, clean_cache, metric, **kwargs)

def get_attr_patch_resid_mid(model, corrupted_tokens: Union[Tokens, Run], clean_cache: Cache, metric,
                             **kwargs) -> Float[np.ndarray, "layer pos"]:
    """The estimate of `get_act_patch_resid_mid`: [layer, pos]."""
    return tl_attribution("resid_mid", model, corrupted_tokens, clean_cache, metric, **kwargs)

def get_attr_patch_attn_out(model, corrupted_tokens: Union[Tokens, Run], clean_cache: Cache, metric,
                            **kwargs) -> Float[np.ndarray, "layer pos"]:
    """The estimate of `get_act_patch_attn_out`: [layer, pos]."""
    return tl_attribution("attn_out", model, corrupted_tokens, clean_cache, metric, **kwargs)

def get_attr_patch_mlp_out(model, corrupted_tokens: Union[Tokens, Run], clean_cache: Cache, metric,
                           **kwargs) -> Float[np.ndarray, "layer pos"]:
    """The estimate of `get_act_patch_mlp_out`: [layer, pos]."""
    return tl_attribution("mlp_out", model, corrupted_tokens, clean_cache, metric, **kwargs)

def get_attr_patch_attn_head_out_all_pos(model, corrupted_tokens: Union[Tokens, Run], clean_cache: Cache, metric,
                                         **kwargs) -> Float[np.ndarray, "layer head"]:
    """The estimate of `get_act_patch_attn_head_out_all_pos`: [layer, head]."""
    return tl_attribution("attn_head_out_all_pos", model, corrupted_tokens, clean_cache, metric, **kwargs)

def get_attr_patch_attn_head_q_all_pos(model, corrupted_tokens: Union[Tokens, Run], clean_cache: Cache, metric,
                                       **kwargs) -> Float[np.ndarray, "layer head"]:
    """The estimate of `get_act_patch_attn_head_q_all_pos`: [layer, head]."""
    return tl_attribution("attn_head_q_all_pos", model, corrupted_tokens, clean_cache, metric, **kwargs)

def get_attr_patch_attn_head_k_all_pos(model, corrupted_tokens: Union[Tokens, Run], clean_cache: Cache, metric,
                                       **kwargs) -> Float[np.ndarray, "layer head"]:
    """The estimate of `get_act_patch_attn_head_k_all_pos`: [layer, head]."""
    return tl_attribution("attn_head_k_all_pos", model, corrupted_tokens, clean_cache, metric, **kwargs)

def get_attr_patch_attn_head_v_all_pos(model, corrupted_tokens: Union[Tokens, Run], clean_cache: Cache, metric,
                                       **kwargs) -> Float[np.ndarray, "layer head"]:
    """The estimate of `get_act_patch_attn_head_v_all_pos`: [layer, head]."""
    return tl_attribution("attn_head_v_all_pos", model, corrupted_tokens, clean_cache, metric, **kwargs)

def get_attr_patch_attn_head_pattern_all_pos(model, corrupted_tokens: Union[Tokens, Run], clean_cache: Cache, metric,
                                             **kwargs) -> Float[np.ndarray, "layer head"]:
    """The estimate of `get_act_patch_attn_head_pattern_all_pos`: [layer, head]."""
    return tl_attribution("attn_head_pattern_all_pos", model, corrupted_tokens, clean_cache, metric, **kwargs)

def get_attr_patch_attn_head_out_by_pos(model, corrupted_tokens: Union[Tokens, Run], clean_cache: Cache, metric,
                                        **kwargs) -> Float[np.ndarray, "layer pos head"]:
    """The estimate of `get_act_patch_attn_head_out_by_pos`: [layer, pos, head]."""
    return tl_attribution("attn_head_out_by_pos", model, corrupted_tokens, clean_cache, metric, **kwargs)

def get_attr_patch_attn_head_q_by_pos(model, corrupted_tokens: Union[Tokens, Run], clean_cache: Cache, metric,
                                      **kwargs) -> Float[np.ndarray, "layer pos head"]:
    """The estimate of `get_act_patch_attn_head_q_by_pos`: [layer, pos, head]."""
    return tl_attribution("attn_head_q_by_pos", model, corrupted_tokens, clean_cache, metric, **kwargs)

def get_attr_patch_attn_head_k_by_pos(model, corrupted_tokens: Union[Tokens, Run], clean_cache: Cache, metric,
                                      **kwargs) -> Float[np.ndarray, "layer pos head"]:
    """The estimate of `get_act_patch_attn_head_k_by_pos`: [layer, pos, head]."""
    return tl_attribution("attn_head_k_by_pos", model, corrupted_tokens, clean_cache, metric, **kwargs)

def get_attr_patch_attn_head_v_by_pos(model, corrupted_tokens: Union[Tokens, Run], clean_cache: Cache, metric,
                                      **kwargs) -> Float[np.ndarray, "layer pos head"]:
    """The estimate of `get_act_patch_attn_head_v_by_pos`: [layer, pos, head]."""
    return tl_attribution("attn_head_v_by_pos", model, corrupted_tokens, clean_cache, metric, **kwargs)

def get_attr_patch_attn_head_pattern_by_pos(model, corrupted_tokens: Union[Tokens, Run], clean_cache: Cache, metric,
                                            **kwargs) -> Float[np.ndarray, "layer head pos"]:
    """The estimate of `get_act_patch_attn_head_pattern_by_pos`: [layer, head, pos]."""
    return tl_attribution("attn_head_pattern_by_pos", model, corrupted_tokens, clean_cache, metric, **kwargs)

def get_attr_patch_attn_head_pattern_dest_src_pos(model, corrupted_tokens: Union[Tokens, Run], clean_cache: Cache, metric,
                                                  **kwargs) -> Float[np.ndarray, "layer head pos pos"]:
    """The estimate of `get_act_patch_attn_head_pattern_dest_src_pos`: [layer, head, pos, src]."""
    return tl_attribution("attn_head_pattern_dest_src_pos", model, corrupted_tokens, clean_cache, metric, **kwargs)


def _every(every, notebook, model, corrupted_tokens=None, clean_cache=None, metric=None, **kwargs):
    """A `*_every` estimate, every part from one forward and backward ("atp"); of an attribution cache
    alone (`attribution_cache`), the Attribution_Patching_Demo's function: raw sums of grad * diff."""
    if isinstance(model, Cache) and corrupted_tokens is None:
        return notebook(model)
    parts = dict(zip(EVERY[every], tl_attribution(EVERY[every], model, corrupted_tokens, clean_cache, metric,
                                                  **kwargs)))
    return stack_every(lambda name: lambda *args, **kw: parts[name], every)


def get_attr_patch_block_every(model, corrupted_tokens=None, clean_cache=None, metric=None, **kwargs):
    """[3, layer, pos]: resid_pre, attn_out, mlp_out (or the demo's, of an attribution cache)."""
    return _every("block_every", attr_recipe.block_every, model, corrupted_tokens, clean_cache, metric, **kwargs)


def get_attr_patch_attn_head_all_pos_every(model, corrupted_tokens=None, clean_cache=None, metric=None, **kwargs):
    """[5, layer, head]: output (z), q, k, v, pattern (or the demo's, of an attribution cache)."""
    return _every("attn_head_all_pos_every", attr_recipe.attn_head_all_pos_every, model, corrupted_tokens,
                  clean_cache, metric, **kwargs)


def get_attr_patch_attn_head_by_pos_every(model, corrupted_tokens=None, clean_cache=None, metric=None, **kwargs):
    """[5, layer, pos, head]: output (z), q, k, v, pattern (pattern moved to [layer, pos, head]); or the
    demo's, of an attribution cache."""
    return _every("attn_head_by_pos_every", attr_recipe.attn_head_by_pos_every, model, corrupted_tokens,
                  clean_cache, metric, **kwargs)
