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
step that mixes positions, and it too works on the rows (`rows_attention`): a row
scores the cached keys before its patch's start and its own patch's rows, so its
cost is rows x keys, not patches x positions x positions.
The prompt axis stays dense, so it is chunked and sharded freely.
"""

import dataclasses
import functools
import math
import os
from typing import NamedTuple

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


class Stage(NamedTuple):
    """The layers [first_layer, end_layer) run with the rows of the patches alive there."""

    first_layer: int
    end_layer: int
    n_patches: int  # patch slots alive (slot 0, the padding patch, included)
    n_rows: int  # rows alive: those of the alive patches and the padding rows
    span: int  # the most rows one alive patch recomputes (how far back its own keys reach)


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where each patch's rows live. The stages' ints shape the compiled program.

    A patch's rows are contiguous and hold consecutive positions, its start position first."""

    order: np.ndarray  # [n] the patch in each slot (sorted by stage), -1 for a padding slot
    stages: tuple  # (Stage, ...)
    row_patch: np.ndarray  # [R] the slot of each row (slot 0: padding rows)
    row_pos: np.ndarray  # [R] the row's position
    row_start: np.ndarray  # [R] the first recomputed position of the row's patch
    row_at: np.ndarray  # [n, T] row of (slot, position), -1 where the position is not recomputed

    def rows(self):
        """The arrays the compiled call reads."""
        return Rows(self.row_patch, self.row_pos, self.row_start, self.row_at)


class Rows(NamedTuple):
    """A Layout's row arrays, as `run_layout` takes them."""

    patch: jax.Array  # [R]
    pos: jax.Array  # [R]
    start: jax.Array  # [R]
    at: jax.Array  # [n, T]


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
    k: jax.Array  # [L, B, T, H, d_head]
    v: jax.Array  # [L, B, T, H, d_head]
    final: jax.Array  # [B, T, d_model]: the last residual stream

    @classmethod
    def from_sites(cls, stacks):
        """From `cached_sites(..., BASE_SITES, ...)`."""
        return cls(*(stacks[s] for s in BASE_SITES))


class MetricInputs(NamedTuple):
    read_pos: jax.Array  # [B, K] the logit positions the metric reads
    clean_logits: jax.Array  # the clean run's logits at those positions
    data: dict  # the metric's per-prompt arrays


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
    # the most rows one patch alive by each stage recomputes (a padding row: one)
    longest = [int((pos_len - start_pos[stage_of == k]).max(initial=1)) for k in range(n_stages)]
    span = np.maximum.accumulate(longest) if n_stages else []
    ends = list(starts[1:]) + [n_layer]
    stages = tuple(Stage(int(first), int(end), int(1 + max_patches[: k + 1].sum()), int(max_rows[: k + 1].sum()),
                         int(span[k]))
                   for k, (first, end) in enumerate(zip(starts, ends)))
    out = []
    for members in dealt:
        slots, row_patch, row_pos, row_start = [-1], [], [], []
        for k in range(n_stages):
            in_stage = members[stage_of[members] == k]
            for i in in_stage:
                row_patch.append(np.full(pos_len - start_pos[i], len(slots)))
                row_pos.append(np.arange(start_pos[i], pos_len))
                row_start.append(np.full(pos_len - start_pos[i], start_pos[i]))
                slots.append(i)
            slots += [-1] * int(max_patches[k] - len(in_stage))
            pad = int(max_rows[k] - (pos_len - start_pos[in_stage]).sum())
            row_patch.append(np.zeros(pad, int))
            row_pos.append(np.full(pad, pos_len - 1))
            row_start.append(np.full(pad, pos_len - 1))  # each padding row: a patch of its own
        row_patch, row_pos, row_start = (np.concatenate(a).astype(int) for a in (row_patch, row_pos, row_start))
        row_at = np.full((len(slots), pos_len), -1)
        real = row_patch > 0
        row_at[row_patch[real], row_pos[real]] = np.flatnonzero(real)
        out.append((np.array(slots), Layout(np.array(slots), stages, row_patch, row_pos, row_start, row_at)))
    return out


def bytes_per_prompt(config, layout, n_read, vocab_read, itemsize=4):
    """A rough peak-memory estimate of one prompt's share of a call: activations of
    `itemsize` bytes (float32: the residual stream is float32 whatever the weights' dtype),
    attention scores in float32. Attention costs the rows alive times the keys each row
    scores: every position of the cached keys, and span own keys (see `rows_attention`)."""
    last = layout.stages[-1] if layout.stages else Stage(0, 0, 0, 0, 1)  # the stage with the most rows
    rows, span = last.n_rows, last.span
    n = len(layout.order)
    T = layout.row_at.shape[1]
    d, H = config.d_model, config.n_head
    per_row = 3 * d + config.d_mlp + 4 * d
    before = 2 * (rows + span) * d * itemsize  # own keys and values of each block's previous block
    scores = 2 * rows * H * (T + span) * 4  # scores and pattern
    final = n * n_read * d * itemsize + n * n_read * vocab_read * 4
    return 2 * (rows * per_row * itemsize + before + scores + final)


def rows_attention(q, k, v, k_cached, v_cached, row_pos, row_start, span, edit_pattern):
    """Causal attention of the packed rows q, k, v [B, R, H, d_head] of several patches.

    A row at position p of a patch whose first recomputed position is s attends to the
    base run's cached keys/values [B, T, H, d_head] at positions < s (unchanged by the
    patch) and to its own patch's rows at positions s..p: the rows at most p - s < span
    before it. In blocks of `span` rows, the row at offset a of a block finds those at the
    block's offsets <= a and at the block before's offsets > a, so one [span, span] score
    block per block of rows holds them all. Scores: rows x (T + span), not patches x T x T.
    One softmax spans both parts. edit_pattern(pattern, key_pos, valid) edits each part of
    the pattern [B, H, R, K]: key_pos [R, K] the keys' positions, valid where a key is seen.
    """
    B, R, H, d_head = q.shape
    T = k_cached.shape[1]
    C = span
    n_blocks = -(-R // C)
    # Heads before rows, so every matmul's batch axes lead (no transposed score copies).
    q, k, v, k_cached, v_cached = (jnp.swapaxes(a, 1, 2) for a in (q, k, v, k_cached, v_cached))
    blocks = lambda a: jnp.pad(a, ((0, 0), (0, 0), (0, n_blocks * C - a.shape[2]), (0, 0))).reshape(
        B, H, n_blocks, C, a.shape[-1])
    before = lambda a: jnp.pad(a, ((0, 0), (0, 0), (1, 0), (0, 0), (0, 0)))[:, :, :-1]  # each block's previous block
    same_block = jnp.arange(C)[:, None] >= jnp.arange(C)  # [C, C]: own key (a, b) in a's block, else the one before
    unblock = lambda a: a.reshape(B, H, n_blocks * C, -1)[:, :, :R]
    offset = jnp.arange(R) % C
    back = offset[:, None] - jnp.arange(C) + C * (jnp.arange(C) > offset[:, None])  # [R, C] rows back to the key
    cached_pos, own_pos = jnp.broadcast_to(jnp.arange(T), (R, T)), row_pos[:, None] - back
    cached_valid, own_valid = cached_pos < row_start[:, None], own_pos >= row_start[:, None]

    # Scores, softmax and the weighted sums accumulate in float32 whatever the weights' dtype.
    matmul = functools.partial(jnp.matmul, preferred_element_type=jnp.float32)
    t = lambda a: jnp.swapaxes(a, -1, -2)
    q_blocks, k_blocks, v_blocks = blocks(q), blocks(k), blocks(v)
    scale, fill = 1 / math.sqrt(d_head), jnp.finfo(jnp.float32).min
    cached = jnp.where(cached_valid, matmul(q, t(k_cached)) * scale, fill)  # [B, H, R, T]
    own = jnp.where(same_block, matmul(q_blocks, t(k_blocks)), matmul(q_blocks, t(before(k_blocks))))
    own = jnp.where(own_valid, unblock(own) * scale, fill)  # [B, H, R, C]
    top = jnp.maximum(cached.max(-1, keepdims=True), own.max(-1, keepdims=True))
    cached, own = jnp.exp(cached - top), jnp.exp(own - top)
    total = cached.sum(-1, keepdims=True) + own.sum(-1, keepdims=True)
    cached = edit_pattern((cached / total).astype(q.dtype), cached_pos, cached_valid)
    own = blocks(edit_pattern((own / total).astype(q.dtype), own_pos, own_valid))  # [B, H, n_blocks, C, C]
    z_own = matmul(jnp.where(same_block, own, 0), v_blocks) + matmul(jnp.where(same_block, 0, own), before(v_blocks))
    z = matmul(cached, v_cached) + unblock(z_own)  # [B, H, R, d_head]
    return jnp.swapaxes(z, 1, 2).astype(q.dtype)


def _mask_at(layer, lo, hi):
    return (lo <= layer) & (layer < hi)


def _matches(chosen, index):
    return (chosen == ALL) | (chosen == index)


@functools.partial(jax.jit, static_argnames=("score", "site", "stages", "read_all"))
def run_layout(model, base, source, slots, rows, metric_inputs, *, score, site, stages, read_all):
    """Patched runs of every patch for a chunk of prompts: raw metric scores [n, B] (or [n]).

    base: BaseCache of the base run; source: the patched site's stack [L, B, ...] from the
    source run; slots: SlotPatches, the patch in each of the layout's n slots; rows: the
    layout's Rows; metric_inputs: MetricInputs. Static: score(logits, clean_logits, data),
    the patched site, the layout's stages, and read_all (the metric reads every position).
    """
    cfg = model.config
    B, T = base.final.shape[:2]
    prompt = jnp.arange(B)[:, None]
    x = jnp.zeros((B, 0, cfg.d_model), jnp.float32)  # the residual stream is float32 (see GPT2._forward)
    for stage in stages:
        new_pos = rows.pos[x.shape[1] : stage.n_rows]
        x = jnp.concatenate([x, base.resid_pre[stage.first_layer][:, new_pos]], axis=1)
        # the rows and patches alive in this stage
        row_patch, row_pos, row_start = (a[: stage.n_rows] for a in (rows.patch, rows.pos, rows.start))
        patch = jax.tree_util.tree_map(lambda a: a[: stage.n_patches], slots)

        def layer(x, per_layer, row_patch=row_patch, row_pos=row_pos, row_start=row_start, patch=patch,
                  span=stage.span):
            block, j, k_cached, v_cached, source_j = per_layer
            patched = _mask_at(j, patch.layer_lo, patch.layer_hi)[row_patch]  # [R]: the row's patch patches layer j
            at_row = _matches(patch.pos[row_patch].T, row_pos)  # [B, R]: ... and the row's position

            def edit(name, act):
                if name != site or name == "attn.hook_pattern":
                    return act
                row_on = patched[None, :] & at_row  # [B, R]
                value = source_j[prompt, row_pos[None, :]]  # [B, R, ...]
                if site in sites.HEAD_VECTOR_SITES:
                    heads = _matches(patch.head[row_patch][None, :, None], jnp.arange(cfg.n_head))
                    row_on = (row_on[..., None] & heads)[..., None]  # [B, R, H, 1]
                else:
                    row_on = row_on[..., None]
                return jnp.where(row_on, value, act)

            def edit_pattern(pattern, key_pos, valid):  # [B, H, R, K], key_pos and valid [R, K]
                if site != "attn.hook_pattern":
                    return pattern
                on = ((patched[None, :] & at_row)[:, None, :, None]
                      & _matches(patch.head[row_patch][:, None], jnp.arange(cfg.n_head)[:, None, None])
                      & _matches(patch.src[row_patch][:, None], key_pos) & valid)
                value = source_j[:, :, row_pos[:, None], jnp.clip(key_pos, 0, T - 1)]  # [B, H, R, K]
                return jnp.where(on, value, pattern)

            attend = lambda q, k, v: rows_attention(q, k, v, k_cached, v_cached, row_pos, row_start, span,
                                                    edit_pattern)
            return block(x, cfg, attend, edit), None

        blocks = jax.tree_util.tree_map(lambda a: a[stage.first_layer : stage.end_layer], model.blocks)
        layers = slice(stage.first_layer, stage.end_layer)
        xs = (blocks, jnp.arange(stage.first_layer, stage.end_layer), base.k[layers], base.v[layers], source[layers])
        x, _ = jax.lax.scan(layer, x, xs)

    # The final residual at the read positions: a patch's own row where it was
    # recomputed, else the base run's (positions before the patch never change).
    read = jnp.broadcast_to(jnp.arange(T), (B, T)) if read_all else metric_inputs.read_pos  # [B, K]
    row = jnp.moveaxis(rows.at[:, read], 0, 1)  # [B, n, K]
    own = jnp.take_along_axis(x, jnp.maximum(row, 0).reshape(B, -1, 1), axis=1).reshape(row.shape + (-1,))
    cached = jnp.take_along_axis(base.final, read[..., None], axis=1)[:, None]  # [B, 1, K, d]
    resid = jnp.where((row >= 0)[..., None], own, cached)  # [B, n, K, d]
    logits = model.unembed(resid)
    return jax.vmap(lambda lg: score(lg, metric_inputs.clean_logits, metric_inputs.data), in_axes=1)(logits)


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
