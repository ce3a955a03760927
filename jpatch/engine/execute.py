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
import os

import jax
import jax.numpy as jnp
import numpy as np

from jpatch.model import sites
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

    order: np.ndarray  # [n] the patch in each slot (sorted by stage), -1 for a padding slot
    stages: tuple  # ((first_layer, end_layer, n_patches_alive, n_rows_alive), ...)
    row_patch: np.ndarray  # [R] the slot of each row (slot 0: padding rows)
    row_pos: np.ndarray  # [R]
    dense_idx: np.ndarray  # [n, T] row of (patch, position), -1 where the position is not recomputed


def _starts(patches, n_layer, skip_layers, skip_positions, max_stages):
    """Each patch's first recomputed layer and position, its stage, and the stage boundaries."""
    n = len(patches)
    start_layer = patches.layer_lo if skip_layers else np.zeros(n, int)
    pos = patches.pos.reshape(n, -1)
    start_pos = np.where((pos == ALL).any(1), 0, pos.min(1)) if skip_positions else np.zeros(n, int)
    # Stage boundaries: the distinct start layers, thinned to at most max_stages.
    starts = np.unique(start_layer)
    if len(starts) > max_stages:
        starts = starts[np.linspace(0, len(starts) - 1, max_stages).round().astype(int)]
    stage_of = np.searchsorted(starts, start_layer, side="right") - 1
    return start_pos, stage_of, starts


def plan(patches, n_layer, pos_len, *, skip_layers=True, skip_positions=True, max_stages=12):
    """Pack the patches' recomputed positions into rows, grouped into layer stages."""
    return plan_groups(patches, n_layer, pos_len, 1, skip_layers=skip_layers, skip_positions=skip_positions,
                       max_stages=max_stages)[0][1]


def plan_groups(patches, n_layer, pos_len, groups, *, skip_layers=True, skip_positions=True, max_stages=12):
    """Split the patches into `groups` groups that share one static layout, so one
    compiled program runs them all: [(members, Layout)], members [n_slots] indexing
    `patches` with -1 for padding slots.

    Patches sorted by (stage, start position) are dealt out in turn, so every group
    holds nearly the same mix; each group is then padded per stage to the largest
    group's patch and row counts. Slot 0 of every group is a padding patch that is
    never patched; the padding rows belong to it (their values are never read).
    """
    n = len(patches)
    start_pos, stage_of, starts = _starts(patches, n_layer, skip_layers, skip_positions, max_stages)
    order = np.lexsort((np.arange(n), start_pos, stage_of))
    dealt = [order[g::groups] for g in range(groups)]
    n_stages = len(starts)
    count = lambda members: np.bincount(stage_of[members], minlength=n_stages)
    rows_of = lambda members: np.bincount(stage_of[members], weights=pos_len - start_pos[members],
                                          minlength=n_stages).astype(int)
    max_patches = np.max([count(m) for m in dealt], axis=0) if n else np.zeros(0, int)
    max_rows = np.max([rows_of(m) for m in dealt], axis=0) if n else np.zeros(0, int)
    ends = list(starts[1:]) + [n_layer]
    stages = tuple((int(first), int(end), int(1 + max_patches[: k + 1].sum()), int(max_rows[: k + 1].sum()))
                   for k, (first, end) in enumerate(zip(starts, ends)))
    out = []
    for members in dealt:
        slots, row_patch, row_pos = [-1], [], []
        for k in range(n_stages):
            in_stage = members[stage_of[members] == k]
            for i in in_stage:
                row_patch.append(np.full(pos_len - start_pos[i], len(slots)))
                row_pos.append(np.arange(start_pos[i], pos_len))
                slots.append(i)
            slots += [-1] * int(max_patches[k] - len(in_stage))
            pad = int(max_rows[k] - (pos_len - start_pos[in_stage]).sum())
            row_patch.append(np.zeros(pad, int))
            row_pos.append(np.full(pad, pos_len - 1))
        row_patch = np.concatenate(row_patch).astype(int)
        row_pos = np.concatenate(row_pos).astype(int)
        dense_idx = np.full((len(slots), pos_len), -1)
        real = row_patch > 0
        dense_idx[row_patch[real], row_pos[real]] = np.flatnonzero(real)
        out.append((np.array(slots), Layout(np.array(slots), stages, row_patch, row_pos, dense_idx)))
    return out


def bytes_per_prompt(config, layout, n_read, vocab_read, itemsize=4):
    """A rough peak-memory estimate of one prompt's share of a call: activations of
    `itemsize` bytes (float32: the residual stream is float32 whatever the weights' dtype),
    attention scores in float32."""
    rows = max((s[3] for s in layout.stages), default=0)
    n = len(layout.order)
    T = layout.dense_idx.shape[1]
    d, H = config.d_model, config.n_head
    per_row = 3 * d + config.d_mlp + 4 * d
    dense = n * T * 4 * d * itemsize + n * T * 2 * H * T * 4
    final = n * T * d * itemsize + n * n_read * vocab_read * 4
    return 2 * (rows * per_row * itemsize + dense + final)


def dense_attention(q, k, v, edit):
    """Causal attention on [..., H, T, d_head] (batched matmuls, no transposes inside)."""
    T = q.shape[-2]
    # Scores, softmax and the weighted sum accumulate in float32 whatever the weights' dtype.
    scores = jnp.matmul(q, jnp.swapaxes(k, -1, -2), preferred_element_type=jnp.float32) / math.sqrt(q.shape[-1])
    scores = jnp.where(jnp.tril(jnp.ones((T, T), bool)), scores, jnp.finfo(jnp.float32).min)
    pattern = edit("attn.hook_pattern", jax.nn.softmax(scores, axis=-1).astype(q.dtype))
    return jnp.matmul(pattern, v, preferred_element_type=jnp.float32).astype(q.dtype)


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
    x = jnp.zeros((B, 0, cfg.d_model), jnp.float32)  # the residual stream is float32 (see GPT2._forward)
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


BASE_SITES = ("hook_resid_pre", "attn.hook_k", "attn.hook_v", "final")  # what a patched run reads of the base run


def _batch_rows(overrides, n, rows):
    """The prompts `rows` of a run's overrides: a leaf is sliced where it has the batch
    axis (right-aligned against its site's activation), left whole where it broadcasts."""
    out = {}
    for site, ov in overrides.items():
        # distance of the batch axis from the last axis, with the layer axis of per-layer sites
        from_end = {"attn.hook_pattern": 4, **{s: 4 for s in sites.HEAD_VECTOR_SITES}}.get(site, 3)

        def take(a):
            axis = a.ndim - from_end
            if axis < 0 or a.shape[axis] == 1:
                return a
            if a.shape[axis] != n:
                raise ValueError(f"override for {site!r} has {a.shape[axis]} prompts on its batch axis, the run has {n}")
            return jax.lax.slice_in_dim(a, rows.start, rows.stop, axis=axis)

        out[site] = jax.tree_util.tree_map(take, ov)
    return out


@functools.partial(jax.jit, static_argnames=("keep",))
def _cache_chunk(model, tokens, overrides, keep):
    # Only the kept stacks leave the program: XLA drops the rest of the cache and the logits.
    _, cache = model.run_with_cache(tokens, overrides=overrides)
    return {s: cache.stacks["hook_resid_post"][-1] if s == "final" else cache.stacks[s] for s in keep}


def cached_sites(model, tokens, overrides, keep, memory_budget):
    """The stacks `keep` ([L, B, ...] per site; "final": the last residual [B, T, d]) of a
    run, computed in prompt chunks that fit `memory_budget`, all of one shape (the last
    overlaps the one before), so the forward compiles once."""
    cfg = model.config
    N, T = tokens.shape
    itemsize = 4  # activations are float32 whatever the weights' dtype
    # one prompt's forward: a layer's activations plus float32 scores and pattern, and the kept stacks
    per_prompt = T * (10 * cfg.d_model + cfg.d_mlp) * itemsize + 3 * cfg.n_head * T * T * 4
    per_prompt += sum(cfg.n_layer * math.prod(sites.activation_shape(cfg, s, 1, T)) for s in keep if s != "final") * itemsize
    chunk = int(max(1, min(N, memory_budget // max(per_prompt, 1))))
    if chunk == N:
        return _cache_chunk(model, tokens, overrides, tuple(keep))
    parts = {s: [] for s in keep}
    for c in range(math.ceil(N / chunk)):
        start = min(c * chunk, N - chunk)  # the last chunk overlaps the one before: one shape
        rows = slice(start, start + chunk)
        part = _cache_chunk(model, jnp.asarray(tokens)[rows], _batch_rows(overrides, N, rows), tuple(keep))
        for s, a in part.items():
            parts[s].append(a[c * chunk - start:] if s == "final" else a[:, c * chunk - start:])
    return {s: jnp.concatenate(p, axis=0 if s == "final" else 1) for s, p in parts.items()}


def default_memory_budget(device=None, fraction=0.25):
    """A quarter of the memory free on `device` (default: the first local device):
    `memory_stats()` on an accelerator, available RAM (/proc/meminfo) on CPU."""
    device = device or jax.local_devices()[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and "bytes_limit" in stats:
        free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
    else:
        free = _available_ram()
    return int(max(free * fraction, 64 << 20))


def _available_ram():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 4 << 30
