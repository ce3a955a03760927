"""The engine's plan, in NumPy before anything is compiled: a sweep's `Patches`, their packed-row
`Layout` (stages by first patched layer, the (patch, position) rows each recomputes), patch
groups sharing one padded layout, and the memory a compiled call needs per prompt.

A patch replaces a site's activation (at a window of layers, one or all
positions, one or all heads) in the *base* run by the *source* run's value.
Only work that can change is done:
- a patch whose first patched layer is l starts from the cached resid_pre[l];
- under causal attention positions before the first patched position p never
  change, so only positions p..T-1 are recomputed (the earlier keys and values
  come from the cache);
- logits are computed only at the positions the metric reads, for the vocabulary ids it reads
  (`readout.on_columns`), and the last layer finishes only those rows (`execute.run_layout`).

Layout: the recomputed (patch, position) pairs of all patches are packed as
*rows* [batch, R, d_model], so the block matmuls are one dense matmul over every
row of every patch. Patches are sorted by start layer, so the rows alive at a
layer are a prefix of that list and the row set only grows. Each stage is a compiled
loop body, so stages are merged where recomputing a few more layers is cheaper than compiling
one more body (`cheap_row_layers`). Attention is the one step that mixes positions, and it
too works on the rows (`rows_attention`): a row scores the cached keys before its patch's
start and its own patch's recent rows, so its cost is rows x keys, not patches x
positions x positions.
The prompt axis stays dense, so it is chunked and sharded freely.
"""


import dataclasses
import os
from typing import NamedTuple

import jax
import numpy as np

ALL = -1  # "every position / head" in a patch's description
# Block-matmul FLOPs worth less than compiling one more stage: about 0.04 s on this project's
# 2-core CPU, where a stage of GPT-2 small compiles in about 0.5 s (a GPU computes far more in a
# stage's compile time, so there this errs toward keeping stages).
DEFAULT_STAGE_COMPILE_FLOPS = 1e10


def _stage_compile_flops():
    """JPATCH_STAGE_COMPILE_FLOPS if set (0 keeps every stage), else the default."""
    value = os.environ.get("JPATCH_STAGE_COMPILE_FLOPS")
    if value is None:
        return DEFAULT_STAGE_COMPILE_FLOPS
    try:
        flops = float(value)
    except ValueError:
        flops = -1.0
    if not 0 <= flops < float("inf"):
        raise ValueError(f"JPATCH_STAGE_COMPILE_FLOPS must be a number of FLOPs >= 0 (0 keeps every stage), got {value!r}")
    return flops


STAGE_COMPILE_FLOPS = _stage_compile_flops()


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


def cheap_row_layers(config, n_prompts):
    """Row-layers (per prompt) cheaper to recompute than one more stage is to compile:
    STAGE_COMPILE_FLOPS of block matmuls over n_prompts prompts (plan_groups' merge_below)."""
    return STAGE_COMPILE_FLOPS / (config.block_flops_per_row() * max(n_prompts, 1))


def _starts(patches, n_layer, pos_len, skip_layers, skip_positions, max_stages, merge_below):
    """Each patch's first recomputed layer and position, its stage, and the stage boundaries."""
    n = len(patches)
    start_layer = patches.layer_lo if skip_layers else np.zeros(n, int)
    pos = patches.pos.reshape(n, -1)
    start_pos = np.where((pos == ALL).any(1), 0, pos.min(1)) if skip_positions else np.zeros(n, int)
    # Stage boundaries: the distinct start layers, thinned to at most max_stages.
    starts = np.unique(start_layer)
    if len(starts) > max_stages:
        starts = starts[np.linspace(0, len(starts) - 1, max_stages).round().astype(int)]
    starts = _merge_cheap_stages(starts, start_layer, pos_len - start_pos, merge_below)
    stage_of = np.searchsorted(starts, start_layer, side="right") - 1
    return start_pos, stage_of, starts


def _merge_cheap_stages(starts, start_layer, rows, merge_below):
    """Drop stage boundaries, cheapest first, while dropping one makes the patches after it
    recompute fewer than `merge_below` extra row-layers (each stage is a compiled loop body)."""
    starts = list(starts)
    while len(starts) > 1:
        stage = np.searchsorted(starts, start_layer, side="right") - 1
        stage_rows = np.bincount(stage, weights=rows, minlength=len(starts))
        extra = stage_rows[1:] * np.diff(starts)  # boundary k + 1 dropped: stage k + 1 starts at stage k's layer
        k = int(np.argmin(extra))
        if extra[k] >= merge_below:
            break
        del starts[k + 1]
    return np.array(starts, int)


def plan_layout(patches, n_layer, pos_len, *, skip_layers=True, skip_positions=True, max_stages=12, merge_below=0):
    """Pack the patches' recomputed positions into rows, grouped into layer stages."""
    return plan_groups(patches, n_layer, pos_len, 1, skip_layers=skip_layers, skip_positions=skip_positions,
                       max_stages=max_stages, merge_below=merge_below)[0][1]


def plan_groups(patches, n_layer, pos_len, groups, *, skip_layers=True, skip_positions=True, max_stages=12,
                merge_below=0):
    """Split the patches into `groups` groups that share one static layout, so one
    compiled program runs them all: [(members, Layout)], members [n_slots] indexing
    `patches` with -1 for padding slots.

    Patches sorted by (stage, start position) are dealt out in turn, so every group
    holds nearly the same mix; each group is then padded per stage to the largest
    group's patch and row counts. Slot 0 of every group is a padding patch that is
    never patched; the padding rows belong to it (their values are never read).
    Stages are merged where that recomputes fewer than `merge_below` extra row-layers per
    prompt (`cheap_row_layers(config, n_prompts)`: cheaper than compiling the stage).
    """
    n = len(patches)
    start_pos, stage_of, starts = _starts(patches, n_layer, pos_len, skip_layers, skip_positions, max_stages,
                                          merge_below)
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


OWN_WINDOW = 64  # rows per attention window: a row scores T + window + span - 1 keys
SCORE_ELEMENTS = 1 << 24  # attention scores of one prompt in one step (64 MB of float32)


def attention_steps(n_rows, n_keys, span, n_head):
    """How `rows_attention` walks n_rows rows over n_keys cached keys: (window, per_step),
    windows of `window` rows whose own keys are their rows and the span - 1 rows before,
    `per_step` windows per step so that a step's scores stay under SCORE_ELEMENTS."""
    window = max(1, min(span, OWN_WINDOW))
    keys = n_keys + window + span - 1
    per_step = max(1, SCORE_ELEMENTS // (window * n_head * keys))
    return window, int(min(per_step, -(-n_rows // window)))


def bytes_per_prompt(config, layout, n_read, vocab_read, itemsize=4):
    """A rough peak-memory estimate of one prompt's share of a call: activations of
    `itemsize` bytes (float32: the residual stream is float32 whatever the weights' dtype),
    attention scores in float32. Attention holds one step's scores (`attention_steps`)."""
    last = layout.stages[-1] if layout.stages else Stage(0, 0, 0, 0, 1)  # the stage with the most rows
    rows, span = last.n_rows, last.span
    n = len(layout.order)
    T = layout.row_at.shape[1]
    d, H = config.d_model, config.n_head
    per_row = config.block_floats_per_row()
    window, per_step = attention_steps(rows, T, span, H)
    step_rows = window * per_step
    kv = H * config.d_head  # keys / values as attention reads them (grouped-query: repeated for every query head)
    own_keys = 2 * (rows + span + per_step * (window + span)) * kv * itemsize  # padded keys/values, a step's windows
    own_keys += 2 * T * kv * itemsize * (config.n_kv_head != H)  # the cached keys / values repeated
    scores = 3 * step_rows * H * (T + window + span) * 4  # scores, pattern and their exponentials
    final = n * n_read * d * itemsize + n * n_read * vocab_read * 4
    return 2 * (rows * per_row * itemsize + own_keys + scores + final)


def default_memory_budget(device=None, fraction=0.25):
    """A quarter of the memory free on `device` (default: the first local device):
    `memory_stats()` on an accelerator, available RAM (/proc/meminfo) on CPU, rounded down to a
    power of two (so between an eighth and a quarter). Free memory moves between calls; rounded,
    a session's calls of one shape plan the same chunks and reuse their compiled programs."""
    device = device or jax.local_devices()[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and "bytes_limit" in stats:
        free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
    else:
        free = _available_ram()
    return 1 << max(int(free * fraction).bit_length() - 1, 26)  # at least 64 MiB


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
