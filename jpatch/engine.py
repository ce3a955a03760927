"""The batched patching engine: every patch of a sweep in one compiled call per chunk.

A patch replaces a site's activation (at a window of layers, one or all
positions, one or all heads) in the *base* run by the *source* run's value.
Only work that can change is done:
- a patch whose first patched layer is l starts from the cached resid_pre[l];
- under causal attention positions before the first patched position p never
  change, so only positions p..T-1 are recomputed (the earlier keys and values
  come from the cache);
- logits are computed only at the positions the metric reads.

Layout: the recomputed (patch, position) pairs of all patches are packed as
*rows* [batch, R, d_model], so the block matmuls are one dense matmul over every
row of every patch. Patches are sorted by start layer, so the rows alive at a
layer are a prefix of that list and the row set only grows. Attention is the one
step that mixes positions: rows are scattered into a dense [batch, patch, pos]
layout over the cached keys and values, attended, and gathered back.
The prompt axis stays dense, so it is chunked and sharded freely.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jpatch import sites

ALL = -1  # "every position / head" in a patch's description


@dataclasses.dataclass(frozen=True)
class Patches:
    """n patches of one site. Arrays are NumPy; ALL (-1) means every position/head.

    layer_lo, layer_hi [n]: patched layers [lo, hi) (a window of one or more layers)
    pos [n, batch] or [n]: patched position (query position for the pattern)
    head [n]: patched head; src [n]: patched key position (pattern only)
    """

    site: str
    layer_lo: np.ndarray
    layer_hi: np.ndarray
    pos: np.ndarray
    head: np.ndarray
    src: np.ndarray

    def __len__(self):
        return len(self.layer_lo)

    def take(self, index):
        return dataclasses.replace(
            self, **{f: getattr(self, f)[index] for f in ("layer_lo", "layer_hi", "pos", "head", "src")}
        )


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where each patch's rows live. Static ints shape the compiled program."""

    order: np.ndarray  # patches sorted by start layer
    stages: tuple  # ((first_layer, end_layer, n_patches_alive, n_rows_alive), ...)
    row_patch: np.ndarray  # [R] index into the sorted patches
    row_pos: np.ndarray  # [R]
    dense_idx: np.ndarray  # [n, T] row of (patch, position), -1 where the position is not recomputed


def plan(patches, n_layer, pos_len, *, skip_layers=True, skip_positions=True, max_stages=12):
    """Pack the patches' recomputed positions into rows, grouped into layer stages."""
    n = len(patches)
    start_layer = patches.layer_lo if skip_layers else np.zeros(n, int)
    pos = patches.pos.reshape(n, -1)
    start_pos = np.where((pos == ALL).any(1), 0, pos.min(1)) if skip_positions else np.zeros(n, int)
    # Stage boundaries: the distinct start layers, thinned to at most max_stages.
    starts = np.unique(start_layer)
    if len(starts) > max_stages:
        starts = starts[np.linspace(0, len(starts) - 1, max_stages).round().astype(int)]
    stage_of = np.searchsorted(starts, start_layer, side="right") - 1
    order = np.lexsort((np.arange(n), stage_of))
    counts = pos_len - start_pos[order]
    row_patch = np.repeat(np.arange(n), counts)
    row_pos = np.concatenate([np.arange(start_pos[i], pos_len) for i in order]) if n else np.zeros(0, int)
    dense_idx = np.full((n, pos_len), -1)
    dense_idx[row_patch, row_pos] = np.arange(len(row_patch))
    ends = list(starts[1:]) + [n_layer]
    stages = []
    for k, (first, end) in enumerate(zip(starts, ends)):
        alive = int((stage_of <= k).sum())
        stages.append((int(first), int(end), alive, int(counts[:alive].sum())))
    return Layout(order, tuple(stages), row_patch, row_pos, dense_idx)


def bytes_per_prompt(config, layout, n_read, vocab_read):
    """A rough peak-memory estimate (float32) of one prompt's share of a call."""
    rows = max((s[3] for s in layout.stages), default=0)
    n = len(layout.order)
    T = int(layout.row_pos.max()) + 1 if len(layout.row_pos) else 1
    d, H = config.d_model, config.n_head
    per_row = 3 * d + config.d_mlp + 4 * d
    dense = n * T * (4 * d + 2 * H * T)
    final = n * T * d + n * n_read * vocab_read
    return 4 * 2 * (rows * per_row + dense + final)


def dense_attention(q, k, v, edit):
    """Causal attention on [..., H, T, d_head] (batched matmuls, no transposes inside)."""
    T = q.shape[-2]
    scores = jnp.matmul(q, jnp.swapaxes(k, -1, -2)).astype(jnp.float32) / math.sqrt(q.shape[-1])
    scores = jnp.where(jnp.tril(jnp.ones((T, T), bool)), scores, jnp.finfo(jnp.float32).min)
    pattern = edit("attn.hook_pattern", jax.nn.softmax(scores, axis=-1).astype(q.dtype))
    return jnp.matmul(pattern, v)


def _mask_at(layer, lo, hi):
    return (lo <= layer) & (layer < hi)


def _matches(chosen, index):
    return (chosen == ALL) | (chosen == index)


@functools.partial(jax.jit, static_argnames=("score", "site", "stages", "n_read_all"))
def run_layout(model, base, source, meta, row_patch, row_pos, dense_idx, read_pos, clean_logits, data, *, score, site, stages, n_read_all):
    """Patched runs of every patch for a chunk of prompts.

    base: dict of the base run's cache stacks ("hook_resid_pre", "attn.hook_k",
    "attn.hook_v" [L, B, ...], "final" [B, T, d]); source: the site's stack
    [L, B, ...]; meta: per (sorted) patch arrays layer_lo, layer_hi, head, src [n]
    and pos [n, B]; data: the metric's per-prompt arrays. Returns raw metric scores [n, B].
    """
    cfg = model.config
    B, T = base["final"].shape[:2]
    bidx = jnp.arange(B)[:, None]
    x = jnp.zeros((B, 0, cfg.d_model), model.dtype)
    for first, end, alive, rows in stages:
        new_pos = row_pos[x.shape[1] : rows]
        x = jnp.concatenate([x, base["hook_resid_pre"][first][:, new_pos]], axis=1)
        rp, rq = row_patch[:rows], row_pos[:rows]  # the rows alive in this stage
        m = {k: v[:alive] for k, v in meta.items()}

        def layer(x, per_layer, rp=rp, rq=rq, m=m, alive=alive):
            block, j, k_base, v_base, src_j = per_layer
            on = _mask_at(j, m["layer_lo"], m["layer_hi"])  # [n]

            def edit(name, act):
                if name != site or name == "attn.hook_pattern":
                    return act
                row_on = on[rp][None, :] & _matches(m["pos"][rp].T, rq[None, :])  # [B, R]
                value = src_j[bidx, rq[None, :]]  # [B, R, ...]
                if site in sites.HEAD_VECTOR_SITES:
                    heads = _matches(m["head"][rp][None, :, None], jnp.arange(cfg.n_head))
                    row_on = (row_on[..., None] & heads)[..., None]  # [B, R, H, 1]
                else:
                    row_on = row_on[..., None]
                return jnp.where(row_on, value, act)

            def pattern_edit(name, pattern):  # [B, n, H, Tq, Tk]
                if site != "attn.hook_pattern":
                    return pattern
                sel = (
                    on[None, :, None, None, None]
                    & _matches(m["head"][None, :, None, None, None], jnp.arange(cfg.n_head)[:, None, None])
                    & _matches(m["pos"].T[:, :, None, None, None], jnp.arange(T)[:, None])
                    & _matches(m["src"][None, :, None, None, None], jnp.arange(T))
                )
                return jnp.where(sel, src_j[:, None], pattern)

            def attend(q, k, v):
                # Dense per-patch [B, n, H, T, d_head]: own rows where recomputed, cached keys/values before.
                idx = dense_idx[:alive]
                own = (idx >= 0)[None, :, :, None, None]
                dense = lambda rows_act, base_act: jnp.swapaxes(
                    jnp.where(own, rows_act[:, jnp.maximum(idx, 0)], base_act[:, None]), 2, 3
                )
                z = dense_attention(dense(q, jnp.zeros_like(k_base)), dense(k, k_base), dense(v, v_base), pattern_edit)
                return jnp.swapaxes(z, 2, 3)[:, rp, rq]

            return block(x, cfg, attend, edit), None

        blocks = jax.tree_util.tree_map(lambda a: a[first:end], model.blocks)
        xs = (
            blocks,
            jnp.arange(first, end),
            base["attn.hook_k"][first:end],
            base["attn.hook_v"][first:end],
            source[first:end],
        )
        x, _ = jax.lax.scan(layer, x, xs)

    # The final residual at the read positions: a patch's own row where it was
    # recomputed, else the base run's (positions before the patch never change).
    read = jnp.broadcast_to(jnp.arange(T), (B, T)) if n_read_all else read_pos  # [B, K]
    idx = jnp.moveaxis(dense_idx[:, read], 0, 1)  # [B, n, K]
    own = jnp.take_along_axis(x, jnp.maximum(idx, 0).reshape(B, -1, 1), axis=1).reshape(idx.shape + (-1,))
    cached = jnp.take_along_axis(base["final"], read[..., None], axis=1)[:, None]  # [B, 1, K, d]
    resid = jnp.where((idx >= 0)[..., None], own, cached)  # [B, n, K, d]
    logits = model.unembed(resid)
    return jax.vmap(lambda lg: score(lg, clean_logits, data), in_axes=1)(logits)  # [n, B] (or [n])


def base_stacks(cache):
    """What the engine needs from the base run's cache."""
    return {
        "hook_resid_pre": cache.stacked("hook_resid_pre"),
        "attn.hook_k": cache.stacked("attn.hook_k"),
        "attn.hook_v": cache.stacked("attn.hook_v"),
        "final": cache.stacked("hook_resid_post")[-1],
    }
