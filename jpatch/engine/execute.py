"""The engine's compiled call (`run_layout`): every patch of a layout applied to the base run's
cached activations in one program, attention over the packed rows (`rows_attention`); and the
base and source runs' caches, computed in prompt chunks under the memory budget (`cached_run`).
The layout comes from `jpatch.engine.plan`.
"""

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jpatch.engine import plan
from jpatch.engine.plan import ALL
from jpatch.engine.readout import COLUMNS
from jpatch.model import sites
from jpatch.model.layers import expand_kv, in_window, soft_cap

class SlotPatches(NamedTuple):
    """The patches in a layout's slots (padding slots: an empty layer window)."""

    layer_lo: jax.Array  # [n]
    layer_hi: jax.Array  # [n]
    pos: jax.Array  # [n, B]
    head: jax.Array  # [n]
    src: jax.Array  # [n]


class BaseCache(NamedTuple):
    """What a patched run reads of the base run (stacks over layers, then prompts)."""

    resid_pre: jax.Array  # [L, B, T, d_model]
    k: jax.Array  # [L, B, T, H, d_head]: the keys attention scores against (model.KEY_SITE)
    v: jax.Array  # [L, B, T, H, d_head]
    final: jax.Array  # [B, T, d_model]: the last residual stream

    @classmethod
    def from_sites(cls, stacks, model):
        """From `cached_run(model, run, base_sites(model), ...)`'s stacks."""
        return cls(*(stacks[s] for s in base_sites(model)))


class MetricInputs(NamedTuple):
    read_pos: jax.Array  # [B, K] the logit positions the metric reads
    clean_logits: jax.Array  # the clean run's logits at those positions
    data: dict  # the metric's per-prompt arrays


def rows_attention(q, k, v, k_cached, v_cached, row_pos, row_start, span, edit_pattern, window=None, softcap=None):
    """Causal attention of the packed rows q [B, R, H, d_head], k, v [B, R, H or n_kv, d_head]
    (grouped-query attention: each key-value head repeated for its query heads) of several patches.

    A row at position p of a patch whose first recomputed position is s attends to the
    base run's cached keys/values [B, T, H, d_head] at positions < s (unchanged by the
    patch) and to its own patch's rows at positions s..p: the rows at most p - s < span
    before it. Rows go `window` at a time (see `plan.attention_steps`): a window's own keys
    are its rows and the span - 1 rows before them, so a row scores T + window + span - 1
    keys, not patches x T x T. `per_step` windows run at once, the steps one after another,
    so the scores in memory stay bounded at any length. One softmax spans both parts.
    edit_pattern(pattern, rows, key_pos, valid) edits each part of the pattern [B, H, r, K]
    of the rows `rows` [r]: key_pos [r, K] the keys' positions, valid where a key is seen.
    window: a sliding window (`layers.in_window`): a row sees only the keys, cached or its own,
    less than `window` positions before it. softcap: scores soft-capped (`layers.soft_cap`).
    """
    B, R, H, d_head = q.shape
    k, v, k_cached, v_cached = (expand_kv(q, a) for a in (k, v, k_cached, v_cached))
    T = k_cached.shape[1]
    W, per_step = plan.attention_steps(R, T, span, H)
    E, S = span - 1, W * per_step  # own keys reach E rows back; S rows per step
    n_steps = -(-R // S)
    pad = lambda a, front: jnp.pad(a, ((0, 0), (front, n_steps * S - R)) + ((0, 0),) * (a.ndim - 2))
    q, k, v = pad(q, 0), pad(k, E), pad(v, E)  # k, v: global row r at index r + E
    row_pos, row_start = (jnp.pad(a, (0, n_steps * S - R), constant_values=T - 1) for a in (row_pos, row_start))
    # Heads before rows, so every matmul's batch axes lead (no transposed score copies).
    heads_first = lambda a: jnp.moveaxis(a, -2, 1)  # [B, ..., H, d] -> [B, H, ..., d]
    k_cached, v_cached = heads_first(k_cached), heads_first(v_cached)
    matmul = functools.partial(jnp.matmul, preferred_element_type=jnp.float32)
    t = lambda a: jnp.swapaxes(a, -1, -2)
    scale, fill = 1 / math.sqrt(d_head), jnp.finfo(jnp.float32).min
    # Window-local geometry: row offset o in its window, key m of the window's W + E own keys.
    offset = jnp.arange(S) % W
    back = offset[:, None] + E - jnp.arange(W + E)  # [S, W + E] rows from the row back to key m
    windows = (jnp.arange(per_step) * W)[:, None] + jnp.arange(W + E)  # [per_step, W + E] in the step's keys

    def step(first):  # the rows first .. first + S - 1
        rows = first + jnp.arange(S)
        pos, start = row_pos[rows], row_start[rows]
        q_s = heads_first(jax.lax.dynamic_slice_in_dim(q, first, S, axis=1))  # [B, H, S, d]
        own_k, own_v = (heads_first(jax.lax.dynamic_slice_in_dim(a, first, S + E, axis=1)[:, windows])
                        for a in (k, v))  # [B, H, per_step, W + E, d]
        cached_pos, own_pos = jnp.broadcast_to(jnp.arange(T), (S, T)), pos[:, None] - back
        cached_valid, own_valid = cached_pos < start[:, None], (back >= 0) & (own_pos >= start[:, None])
        cached_valid &= in_window(pos[:, None], cached_pos, window)
        own_valid &= in_window(pos[:, None], own_pos, window)
        cached = jnp.where(cached_valid, soft_cap(matmul(q_s, t(k_cached)) * scale, softcap), fill)  # [B, H, S, T]
        own = matmul(q_s.reshape(B, H, per_step, W, d_head), t(own_k)).reshape(B, H, S, W + E)
        own = jnp.where(own_valid, soft_cap(own * scale, softcap), fill)
        top = jnp.maximum(cached.max(-1, keepdims=True), own.max(-1, keepdims=True))
        cached, own = jnp.exp(cached - top), jnp.exp(own - top)
        total = cached.sum(-1, keepdims=True) + own.sum(-1, keepdims=True)
        rows = jnp.minimum(rows, R - 1)  # step padding rows read the last row's patch (discarded)
        cached = edit_pattern((cached / total).astype(q.dtype), rows, cached_pos, cached_valid)
        own = edit_pattern((own / total).astype(q.dtype), rows, own_pos, own_valid)
        z_own = matmul(own.reshape(B, H, per_step, W, W + E), own_v).reshape(B, H, S, d_head)
        return matmul(cached, v_cached) + z_own  # [B, H, S, d]

    # [n_steps, B, H, S, d]; a single step without the loop (a smaller program to compile)
    z = step(0)[None] if n_steps == 1 else jax.lax.map(step, jnp.arange(n_steps) * S)
    z = jnp.moveaxis(z, 0, 2).reshape(B, H, n_steps * S, d_head)[:, :, :R]
    return jnp.swapaxes(z, 1, 2).astype(q.dtype)


def _mask_at(layer, lo, hi):
    return (lo <= layer) & (layer < hi)


def _matches(chosen, index):
    return (chosen == ALL) | (chosen == index)


@functools.partial(jax.jit, static_argnames=("site", "stages", "read_all"))
def run_layout(model, base, source, slots, rows, metric_inputs, *, site, stages, read_all):
    """Patched runs of every patch for a chunk of prompts: the final residual [B, n, K, d] at the K
    positions the metric reads (`score_rows` scores them).

    base: BaseCache of the base run; source: the patched site's stack [L, B, ...] from the
    source run; slots: SlotPatches, the patch in each of the layout's n slots; rows: the
    layout's Rows; metric_inputs: MetricInputs, only its read positions used (the rest None, so the
    program does not depend on the metric's data). Static: the patched site,
    the layout's stages, and read_all (the metric reads every position).
    """
    cfg = model.config
    B, T = base.final.shape[:2]
    prompt = jnp.arange(B)[:, None]
    has_heads = model.sites.has_heads(site)
    # The final residual is read at K positions of each patch: [B, n, K] rows (-1: not recomputed,
    # the base run's). Where those are few, the last layer computes attention output and MLP for
    # them only (its keys and values still come from every row).
    read = jnp.broadcast_to(jnp.arange(T), (B, T)) if read_all else metric_inputs.read_pos  # [B, K]
    read_row = jnp.moveaxis(rows.at[:, read], 0, 1)  # [B, n, K]
    last_rows = jnp.maximum(read_row, 0).reshape(B, -1) if 2 * read_row[0].size <= stages[-1].n_rows else None
    x = jnp.zeros((B, 0, cfg.d_model), jnp.float32)  # the residual stream is float32 (see GPT2._forward)
    for stage in stages:
        new_pos = rows.pos[x.shape[1] : stage.n_rows]
        x = jnp.concatenate([x, base.resid_pre[stage.first_layer][:, new_pos]], axis=1)
        # the rows and patches alive in this stage
        row_patch, row_pos, row_start = (a[: stage.n_rows] for a in (rows.patch, rows.pos, rows.start))
        patch = jax.tree_util.tree_map(lambda a: a[: stage.n_patches], slots)

        def layer(x, per_layer, row_patch=row_patch, row_pos=row_pos, row_start=row_start, patch=patch,
                  span=stage.span, kept=None):
            block, j, k_cached, v_cached, source_j = per_layer
            patched = _mask_at(j, patch.layer_lo, patch.layer_hi)[row_patch]  # [R]: the row's patch patches layer j
            at_row = _matches(patch.pos[row_patch].T, row_pos)  # [B, R]: ... and the row's position
            # per row of each prompt: patched here, its position, its patch's head
            all_rows = (patched[None, :] & at_row, jnp.broadcast_to(row_pos, at_row.shape),
                        jnp.broadcast_to(patch.head[row_patch], at_row.shape))
            kept_rows = None if kept is None else tuple(jnp.take_along_axis(a, kept, axis=1) for a in all_rows)

            def edit(name, act):
                if name != site or name == "attn.hook_pattern":
                    return act
                # sites after attention in a layer that keeps only `kept` rows have those rows
                row_on, pos, head = all_rows if kept is None or act.shape[1] == len(row_pos) else kept_rows
                value = source_j[prompt, pos]  # [B, R, ...]
                if has_heads:  # query heads, or key-value heads (k, v under grouped-query attention)
                    heads = _matches(head[..., None], jnp.arange(act.shape[-2]))
                    row_on = (row_on[..., None] & heads)[..., None]  # [B, R, H, 1]
                else:
                    row_on = row_on[..., None]
                return jnp.where(row_on, value, act)

            def edit_pattern(pattern, rows, key_pos, valid):  # [B, H, r, K] of rows [r]; key_pos, valid [r, K]
                if site != "attn.hook_pattern":
                    return pattern
                on = ((patched[rows][None, :] & at_row[:, rows])[:, None, :, None]
                      & _matches(patch.head[row_patch[rows]][:, None], jnp.arange(cfg.n_head)[:, None, None])
                      & _matches(patch.src[row_patch[rows]][:, None], key_pos) & valid)
                value = source_j[:, :, row_pos[rows][:, None], jnp.clip(key_pos, 0, T - 1)]  # [B, H, r, K]
                return jnp.where(on, value, pattern)

            attend = lambda q, k, v, **options: rows_attention(q, k, v, k_cached, v_cached, row_pos, row_start,
                                                               span, edit_pattern, **options)
            return block(x, row_pos, cfg, attend, edit, rows=kept), None

        # every layer of the stage in one loop body, but the last layer that keeps only the read rows
        end = stage.end_layer - (last_rows is not None and stage.end_layer == cfg.n_layer)
        per_layer = lambda lo, hi: (jax.tree_util.tree_map(lambda a: a[lo:hi], model.blocks), jnp.arange(lo, hi),
                                    base.k[lo:hi], base.v[lo:hi], source[lo:hi])
        if end > stage.first_layer:
            x, _ = jax.lax.scan(layer, x, per_layer(stage.first_layer, end))
        if end < stage.end_layer:
            x, _ = layer(x, jax.tree_util.tree_map(lambda a: a[0], per_layer(end, end + 1)), kept=last_rows)

    # The final residual at the read positions: a patch's own row where it was
    # recomputed, else the base run's (positions before the patch never change).
    own = x if last_rows is not None else jnp.take_along_axis(x, jnp.maximum(read_row, 0).reshape(B, -1, 1), axis=1)
    cached = jnp.take_along_axis(base.final, read[..., None], axis=1)[:, None]  # [B, 1, K, d]
    return jnp.where((read_row >= 0)[..., None], own.reshape(read_row.shape + (-1,)), cached)  # [B, n, K, d]


def _first(tree, rows):
    return tree if rows is None else jax.tree_util.tree_map(lambda a: a[:rows], tree)


@functools.partial(jax.jit, static_argnames=("score", "rows", "n_slots"))
def score_rows(model, resid, metric_inputs, *, score, rows=None, first_slot=0, n_slots=None):
    """`run_layout`'s final residuals [B, n, K, d] of n patches -> raw scores [n, B] (or [n]), in a
    program of their own: the patching program is the same for any metric and for a bucket's real
    prompts. rows: score only the first `rows` prompts (a padded batch's real ones), None: all.
    n_slots: score only the patches first_slot .. first_slot + n_slots (None: all).
    A metric fed only some vocabulary ids (`readout.on_columns`) gets the logits at those."""
    resid, inputs = _first((resid, metric_inputs), rows)
    if n_slots is not None:
        resid = jax.lax.dynamic_slice_in_dim(resid, first_slot, n_slots, axis=1)
    columns = inputs.data.get(COLUMNS)
    logits = model.unembed(resid, columns=None if columns is None else columns[0])
    return jax.vmap(lambda lg: score(lg, inputs.clean_logits, inputs.data), in_axes=1)(logits)


@functools.partial(jax.jit, static_argnames=("score", "rows"))
def score_logits(logits, clean_logits, data, *, score, rows=None):
    """A metric's score of one run's logits (a sweep's baselines) as one compiled call, on the first
    `rows` prompts (None: all)."""
    logits, clean_logits, data = _first((logits, clean_logits, data), rows)
    return score(logits, clean_logits, data)


# What a patched run reads of the base run (BaseCache's fields), with the keys as GPT-2 names them.
BASE_SITES = ("hook_resid_pre", "attn.hook_k", "attn.hook_v", "final")


def base_sites(model):
    """BASE_SITES with the keys attention scores against in `model`'s family (rotated, for rotary ones)."""
    return tuple(model.KEY_SITE if s == "attn.hook_k" else s for s in BASE_SITES)


def _batch_rows(overrides, table, n, rows):
    """The prompts `rows` of a run's overrides: a leaf is sliced where it has the batch
    axis (right-aligned against its site's activation), left whole where it broadcasts."""
    out = {}
    for site, ov in overrides.items():
        from_end = len(table[site].axes)  # distance of the batch axis from the last axis

        def take(a):
            axis = a.ndim - from_end
            if axis < 0 or a.shape[axis] == 1:
                return a
            if a.shape[axis] != n:
                raise ValueError(f"override for {site!r} has {a.shape[axis]} prompts on its batch axis, the run has {n}")
            return jax.lax.slice_in_dim(a, rows.start, rows.stop, axis=axis)

        out[site] = jax.tree_util.tree_map(take, ov)
    return out


@functools.partial(jax.jit, static_argnames=("keep", "logits"))
def _cache_chunk(model, tokens, overrides, read, keep, logits):
    # Only the kept stacks (and the logits when asked) leave the program: XLA drops the rest.
    out, cache = model.run_with_cache(tokens, overrides=overrides, logits_at=read)
    kept = {s: cache.stacks["hook_resid_post"][-1] if s == "final" else cache.stacks[s] for s in keep}
    return (kept, out) if logits else (kept, None)


def cached_run(model, run, keep, memory_budget, *, read="none"):
    """One forward of `run` (a Run: tokens and overrides) giving the stacks `keep` ([L, B, ...]
    per site; "final": the last residual [B, T, d]) and, unless read is "none", its logits at
    `read` ([B, K] positions, None: every position). Computed in prompt chunks that fit
    `memory_budget`, all of one shape (the last overlaps the one before), so it compiles once."""
    cfg = model.config
    tokens, keep, logits = jnp.asarray(run.tokens), tuple(dict.fromkeys(keep)), not isinstance(read, str)
    read = None if not logits or read is None else jnp.asarray(read)
    N, T = tokens.shape
    itemsize = 4  # activations are float32 whatever the weights' dtype
    # one prompt's forward: a layer's activations plus float32 scores and pattern, the kept stacks, the logits
    per_prompt = T * (cfg.block_floats_per_row() + 3 * cfg.d_model) * itemsize + 3 * cfg.n_head * T * T * 4
    per_prompt += sum(cfg.n_layer * math.prod(sites.activation_shape(cfg, s, 1, T)) for s in keep if s != "final") * itemsize
    per_prompt += logits * (T if read is None else read.shape[1]) * cfg.d_vocab * 4
    chunk = int(max(1, min(N, memory_budget // max(per_prompt, 1))))
    if chunk == N:
        return _cache_chunk(model, tokens, run.overrides, read, keep, logits)
    parts, outs = {s: [] for s in keep}, []
    for c in range(math.ceil(N / chunk)):
        start = min(c * chunk, N - chunk)  # the last chunk overlaps the one before: one shape
        rows = slice(start, start + chunk)
        part, out = _cache_chunk(model, tokens[rows], _batch_rows(run.overrides, model.sites, N, rows),
                                 None if read is None else read[rows], keep, logits)
        for s, a in part.items():
            parts[s].append(a[c * chunk - start:] if s == "final" else a[:, c * chunk - start:])
        outs.append(None if out is None else out[c * chunk - start:])
    stacks = {s: jnp.concatenate(p, axis=0 if s == "final" else 1) for s, p in parts.items()}
    return stacks, jnp.concatenate(outs) if logits else None
