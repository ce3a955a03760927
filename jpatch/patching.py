"""Activation-patching sweeps: `sweep` and TransformerLens-shaped `get_act_patch_*`.

`sweep(model, clean, corrupted, site, metric)` patches `site` at every layer x
position (x head) and returns the metric per patch, computed by the batched
engine (`jpatch.engine`) in one compiled call per chunk. The
`get_act_patch_<name>(model, corrupted_tokens, clean_cache, metric)` functions
take TransformerLens's arguments and return its shapes and numbers.
"""

import dataclasses
import itertools
import math
import warnings
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from jpatch import aggregate, engine, padding, sites
from jpatch.engine import ALL, Patches
from jpatch.metrics import callable_reads, from_callable, narrowed
from jpatch.model import Cache

DIRECTIONS = ("denoise", "noise")
DEFAULT_MEMORY_BUDGET = 4 << 30
MANY_GROUPS = 8  # more patch groups than this (a tiny memory budget) is warned about


@dataclasses.dataclass(frozen=True)
class Run:
    """One input to the model: tokens plus model overrides on its global sites
    (e.g. Gaussian noise on `hook_embed`). `samples` runs of the same `batch`
    prompts are stacked sample-major: tokens has samples x batch rows.
    attention_mask: [rows, pos] right-padding mask of a ragged batch (None: no padding)."""

    tokens: np.ndarray
    overrides: dict = dataclasses.field(default_factory=dict)
    samples: int = 1
    attention_mask: Optional[np.ndarray] = None

    @property
    def batch(self):
        return self.tokens.shape[0] // self.samples

    def tiled(self, samples):
        """The same run repeated to `samples` x batch rows."""
        if self.samples == samples:
            return self
        if self.samples != 1:
            raise ValueError(f"cannot pair a run of {self.samples} samples with one of {samples}")
        if set(self.overrides) - set(sites.GLOBAL_SITES):
            raise ValueError("only a run whose overrides are on global sites (e.g. hook_embed) can be tiled over samples")
        tile = lambda a: jnp.tile(a, (samples,) + (1,) * (a.ndim - 1))  # global sites: batch is axis 0
        overrides = {k: jax.tree_util.tree_map(tile, v) for k, v in self.overrides.items()}
        mask = None if self.attention_mask is None else np.tile(self.attention_mask, (samples, 1))
        return Run(np.tile(self.tokens, (samples, 1)), overrides, samples, mask)


def as_run(x, what):
    run = x if isinstance(x, Run) else None
    tokens = np.asarray(x.tokens if run else x)
    if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"{what} must be [batch, pos] token ids or a Run, got shape {tokens.shape} {tokens.dtype}")
    if 0 in tokens.shape:
        raise ValueError(f"{what} holds no tokens (shape {tokens.shape}): need at least one prompt of at least one token")
    return run or Run(tokens)


# name -> (site, axes of the result); TransformerLens 3.9's patching functions.
SWEEPS = {
    "resid_pre": ("hook_resid_pre", ("layer", "pos")),
    "resid_mid": ("hook_resid_mid", ("layer", "pos")),
    "attn_out": ("hook_attn_out", ("layer", "pos")),
    "mlp_out": ("hook_mlp_out", ("layer", "pos")),
    "attn_head_out_all_pos": ("attn.hook_z", ("layer", "head")),
    "attn_head_q_all_pos": ("attn.hook_q", ("layer", "head")),
    "attn_head_k_all_pos": ("attn.hook_k", ("layer", "head")),
    "attn_head_v_all_pos": ("attn.hook_v", ("layer", "head")),
    "attn_head_pattern_all_pos": ("attn.hook_pattern", ("layer", "head")),
    "attn_head_out_by_pos": ("attn.hook_z", ("layer", "pos", "head")),
    "attn_head_q_by_pos": ("attn.hook_q", ("layer", "pos", "head")),
    "attn_head_k_by_pos": ("attn.hook_k", ("layer", "pos", "head")),
    "attn_head_v_by_pos": ("attn.hook_v", ("layer", "pos", "head")),
    "attn_head_pattern_by_pos": ("attn.hook_pattern", ("layer", "head", "pos")),
    "attn_head_pattern_dest_src_pos": ("attn.hook_pattern", ("layer", "head", "pos", "src")),
}
WINDOW_SITES = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out")


def paired_runs(clean, corrupted):
    """The clean and corrupted inputs of a sweep as Runs, checked to pair up: one clean sample,
    the same [batch, pos] shape (the corrupted run may stack several noise samples)."""
    clean, corrupted = as_run(clean, "clean"), as_run(corrupted, "corrupted")
    if clean.samples != 1:
        raise ValueError("the clean run must have a single sample")
    if clean.tokens.shape[1:] != corrupted.tokens.shape[1:] or clean.batch != corrupted.batch:
        raise ValueError(f"clean tokens {clean.tokens.shape} and corrupted tokens {corrupted.tokens.shape} "
                         f"({corrupted.samples} sample(s)) must have the same [batch, pos] shape")
    return clean, corrupted


def default_axes(site):
    site = sites.canonical(site)
    if site in sites.HEAD_VECTOR_SITES:
        return ("layer", "pos", "head")
    if site == "attn.hook_pattern":
        return ("layer", "head", "pos")
    if site not in sites.SWEEP_SITES:
        why = "has no layers to sweep" if site not in sites.LAYER_SITES else "is not patched by the sweep engine"
        raise ValueError(f"site {site!r} {why}; sweepable: {', '.join(sites.SWEEP_SITES)}")
    return ("layer", "pos")


def _choose(values, limit, what):
    if values is None:
        return np.arange(limit)
    values = np.atleast_1d(np.asarray(values))
    if values.ndim != 1 or not np.issubdtype(values.dtype, np.integer):
        raise ValueError(f"{what} must be integers, got {values.tolist()}")
    bad = values[(values < 0) | (values >= limit)]
    if len(bad):
        raise ValueError(f"{what} {bad.tolist()} out of range [0, {limit})")
    return values


def make_patches(config, site, axes, n_pos, n_prompts, *, window=1, layers=None, positions=None, heads=None,
                 prompt_positions=None):
    """The grid of patches of a sweep, in C order over `axes`, and the grid's shape.

    positions: None (every position) or a list, the same for every prompt;
    prompt_positions: one position per prompt ([n_prompts], e.g. the last subject
    token), giving a "pos" axis of length 1.
    """
    default_axes(site)  # refuses a site the engine does not patch
    valid = ("layer", "pos") + {"attn.hook_pattern": ("head", "src")}.get(
        site, ("head",) if site in sites.HEAD_VECTOR_SITES else ())
    for a in axes:
        if a not in ("layer", "pos", "head", "src"):
            raise ValueError(f"unknown axis {a!r}; valid: layer, pos, head, src")
        if a not in valid:
            raise ValueError(f"site {site!r} has no {a} axis; its axes: {', '.join(valid)}")
    if len(set(axes)) != len(axes) or "layer" not in axes:
        raise ValueError(f"a sweep needs a layer axis and no repeated axis, got axes {tuple(axes)}")
    if window < 1 or int(window) != window:
        raise ValueError(f"window must be an integer >= 1, got {window}")
    if window > 1 and site not in WINDOW_SITES:
        raise ValueError(f"a sliding window applies to {', '.join(WINDOW_SITES)}, not {site!r}")
    values = {
        "layer": _choose(layers, config.n_layer, "layers"),
        "pos": np.zeros(1, int) if prompt_positions is not None else _choose(positions, n_pos, "positions"),
        "head": _choose(heads, config.n_head, "heads"),
        "src": np.arange(n_pos),
    }
    for name, chosen in (("pos", positions), ("head", heads)):
        if chosen is not None and name not in axes:
            raise ValueError(f"sweep over {axes} has no {name} axis to choose")
    grid = np.array(list(itertools.product(*(values[a] for a in axes))), dtype=int).reshape(-1, len(axes))
    col = lambda a: grid[:, axes.index(a)] if a in axes else np.full(len(grid), ALL)
    layer = col("layer")
    lo = np.maximum(layer - window // 2, 0)
    hi = np.minimum(layer - window // 2 + window, config.n_layer)
    pos = np.broadcast_to(col("pos")[:, None], (len(grid), n_prompts))
    if prompt_positions is not None:
        if "pos" not in axes or positions is not None:
            raise ValueError("prompt_positions needs a 'pos' axis and no `positions`")
        prompt_positions = np.asarray(prompt_positions)
        if prompt_positions.shape != (n_prompts,):
            raise ValueError(f"prompt_positions must have one position per prompt ({n_prompts}), got {prompt_positions.shape}")
        _choose(prompt_positions, n_pos, "prompt_positions")
        pos = np.broadcast_to(prompt_positions, (len(grid), n_prompts))
    patches = Patches(site, lo, hi, pos, col("head"), col("src"))
    return patches, tuple(len(values[a]) for a in axes)


def _sharding(mesh, ndim, axis):
    spec = [None] * ndim
    spec[axis] = "batch"
    return NamedSharding(mesh, PartitionSpec(*spec))


def checked_metric(metric, d_vocab):
    """`metric` as a Metric, its token ids checked against the vocabulary."""
    metric = from_callable(metric)
    for key in ("answer", "contrast"):
        ids = np.asarray(metric.data.get(key, []))
        if ids.size and ids.max() >= d_vocab:
            raise ValueError(f"metric {metric.name!r}: {key} token id {int(ids.max())} is outside the vocabulary "
                             f"[0, {d_vocab})")
    return metric


def patch_scores(model, base, source_cache, patches, metric, clean_logits, *, memory_budget=None,
                 skip_layers=True, skip_positions=True, progress=True, devices=None):
    """Raw metric scores [n_patches, rows] (or [n_patches] for a scalar metric) of
    every patch applied to the `base` Run with values from `source_cache`.
    memory_budget: bytes per compiled call (None: from the device's free memory)."""
    cfg = model.config
    N, T = base.tokens.shape
    # Each patched run starts from the base run's cache and recomputes the later layers
    # without the base run's per-layer overrides: only the embeddings may be overridden.
    late = sorted(set(base.overrides) - {"hook_embed", "hook_pos_embed"})
    if late:
        raise ValueError(
            f"the base run (the corrupted run when denoising, the clean run when noising) overrides "
            f"{', '.join(late)}; a base run may only override hook_embed / hook_pos_embed. Use such a run "
            "(e.g. a zero / mean ablation) as the source of patched values: direction='noise'"
        )
    memory_budget = engine.default_memory_budget() if memory_budget is None else memory_budget
    metric = checked_metric(metric, model.config.d_vocab)
    # A callable on full logits is fed only the positions it reads (found by probing it).
    full_logits = isinstance(metric.positions, str)  # "all": a callable written against full logits
    metric = narrowed(metric, (N, T, cfg.d_vocab))
    read_pos = metric.read_positions(N, T)
    read_all = read_pos is None
    read_pos = np.zeros((N, 1), int) if read_all else read_pos
    if full_logits and not read_all:  # the clean logits a narrowed callable sees
        clean_logits = jnp.take_along_axis(jnp.asarray(clean_logits), jnp.asarray(read_pos)[..., None], axis=1)
    data = metric.batch_data(N)
    source = source_cache.stacked(patches.site)
    if source.shape[1] != N:
        raise ValueError(f"the source activations cover {source.shape[1]} prompts, the base run has {N}")
    base_arrays = engine.cached_sites(model, base.tokens, base.overrides, engine.BASE_SITES, memory_budget)

    n_read = T if read_all else read_pos.shape[1]
    score_shape = jax.eval_shape(
        lambda lg: metric.score(lg, clean_logits, data), jax.ShapeDtypeStruct((N, n_read, cfg.d_vocab), jnp.float32)
    ).shape
    if score_shape not in ((), (N,)):
        raise ValueError(f"metric {metric.name!r} must return a scalar or one value per prompt ({N}), got shape {score_shape}")
    scalar = score_shape == ()
    # A scalar metric, or any user callable (written for the whole batch), sees every prompt at once.
    whole = scalar or full_logits

    devices = list(devices or jax.local_devices())
    mesh = Mesh(np.array(devices), ("batch",))
    # Patch groups split a sweep too big for one prompt; prompt chunks split the rest. Every
    # group has one static layout, so the sweep compiles one program whatever its size.
    plan = lambda g: engine.plan_groups(patches, cfg.n_layer, T, g, skip_layers=skip_layers,
                                        skip_positions=skip_positions)
    need = lambda layout: engine.bytes_per_prompt(cfg, layout, n_read, cfg.d_vocab) * (N if whole else 1)
    groups = 1
    planned = plan(groups)
    while need(planned[0][1]) > memory_budget and groups < len(patches):
        groups = min(len(patches), max(groups + 1, math.ceil(groups * need(planned[0][1]) / memory_budget)))
        planned = plan(groups)
    if groups > MANY_GROUPS:
        warnings.warn(f"memory_budget={memory_budget} bytes splits this sweep into {groups} patch groups, run one "
                      f"after another (slow); {need(plan(1)[0][1])} bytes would run it in one", RuntimeWarning,
                      stacklevel=3)
    per_prompt = need(planned[0][1]) // (N if whole else 1)
    chunk = N if whole else max(1, min(N, memory_budget // per_prompt))
    if not whole and len(devices) > 1:
        chunk = math.ceil(chunk / len(devices)) * len(devices)
    n_chunks = math.ceil(N / chunk)
    pad = n_chunks * chunk - N
    if whole and len(devices) > 1 and N % len(devices):
        mesh = Mesh(np.array(devices[:1]), ("batch",))  # a whole-batch metric needs the batch together

    def padded(a, axis):
        if not pad:
            return a
        widths = [(0, 0)] * a.ndim
        widths[axis] = (0, pad)
        return jnp.pad(a, widths, mode="edge")

    base_arrays = {k: padded(v, 0 if k == "final" else 1) for k, v in base_arrays.items()}
    source = padded(source, 1)
    read_pos, clean_logits = padded(jnp.asarray(read_pos), 0), padded(clean_logits, 0)
    data = jax.tree_util.tree_map(lambda a: padded(a, 0), data)
    pos_all = np.asarray(patches.pos).reshape(len(patches), -1)
    pos_all = padded(jnp.asarray(np.broadcast_to(pos_all, (len(patches), N))), 1)

    out = np.zeros((len(patches),) if scalar else (len(patches), N + pad), np.float32)
    bar = tqdm(total=len(patches) * N, disable=not progress, desc=f"patching {patches.site}", unit=" runs")
    for slots, lay in planned:
        real = slots >= 0
        take = lambda a, fill: jnp.asarray(np.where(real, np.asarray(a)[np.maximum(slots, 0)], fill))
        # padding slots are never patched (an empty layer window)
        slot_patches = engine.SlotPatches(layer_lo=take(patches.layer_lo, 0), layer_hi=take(patches.layer_hi, 0),
                                          pos=None, head=take(patches.head, 0), src=take(patches.src, 0))
        pos_slots = jnp.where(jnp.asarray(real)[:, None], pos_all[np.maximum(slots, 0)], 0)
        for c in range(n_chunks):
            rows = slice(c * chunk, (c + 1) * chunk)
            put = lambda a, axis: jax.device_put(a[(slice(None),) * axis + (rows,)], _sharding(mesh, a.ndim, axis))
            scores = engine.run_layout(
                model,
                engine.BaseCache.from_sites({k: put(v, 0 if k == "final" else 1) for k, v in base_arrays.items()}),
                put(source, 1),
                slot_patches._replace(pos=put(pos_slots, 1)),
                jax.tree_util.tree_map(jnp.asarray, lay.rows()),
                engine.MetricInputs(put(read_pos, 0), put(clean_logits, 0),
                                    jax.tree_util.tree_map(lambda a: put(a, 0), data)),
                score=metric.score,
                site=patches.site,
                stages=lay.stages,
                read_all=read_all,
            )
            scores = np.asarray(scores)[real]
            if scalar:
                out[slots[real]] = scores
            else:
                out[slots[real], rows] = scores
            bar.update(int(real.sum()) * (min(rows.stop, N) - rows.start))
    bar.close()
    return out if scalar else out[:, :N]


def read_logits(model, run, metric):
    """Logits of a run at the positions `metric` reads ([rows, K, vocab])."""
    N, T = run.tokens.shape
    positions = from_callable(metric).read_positions(N, T)
    return model(run.tokens, overrides=run.overrides, logits_at=positions)


def batch_mask(attention_mask, *runs, pad_id=padding.PAD_ID):
    """The [batch, pos] right-padding mask of a sweep's prompts, or None when the batch is not padded.

    It is `attention_mask`, or the one the runs carry (they must agree). Without any, a batch whose
    rows end in pad ids (<|endoftext|>, the vocabulary's last id) in some rows only is refused: it looks padded.
    """
    B, T = runs[0].batch, runs[0].tokens.shape[1]
    given = [("attention_mask", attention_mask)] + [(f"the {w} run's attention_mask", r.attention_mask)
                                                      for w, r in zip(("clean", "corrupted"), runs)]
    given = [(w, np.asarray(m)[:B].astype(bool)) for w, m in given if m is not None]
    if not given:
        for what, run in zip(("clean tokens", "corrupted tokens"), runs):
            padding.refuse_hidden_padding(run.tokens, what, pad_id)
        return None
    for what, m in given[1:]:
        if m.shape != given[0][1].shape or (m != given[0][1]).any():
            raise ValueError(f"{what} differs from {given[0][0]}: the clean and corrupted prompts must have the same "
                             "real lengths")
    padding.lengths_of(given[0][1], (B, T), given[0][0])
    return given[0][1]


def _prompt_lengths(mask, batch, pos):
    return np.full(batch, pos) if mask is None else mask.sum(1)


def applies(patches, lengths):
    """[n_patches, rows] whether each patch lies within each prompt (its position and key position)."""
    pos = patches.pos.reshape(len(patches), -1)
    within = (pos == ALL) | (pos < lengths[None, :])
    src = patches.src[:, None]
    return within & ((src == ALL) | (src < lengths[None, :]))


def no_op_patches(patches, base_stack, source_stack):
    """[n_patches, rows]: True where every value a patch writes equals the base run's own value.

    Such a patched run *is* the base run, so its score is the base run's score exactly (not
    a float32 recomputation of it): a patch that changes nothing measures exactly 0.
    base_stack, source_stack: the site's [n_layer, rows, ...] activations of the two runs.
    """
    diff = np.asarray(base_stack != source_stack)
    if patches.site == "attn.hook_pattern":  # [L, N, H, Tq, Tk]
        diff = np.moveaxis(diff, 2, -1)  # [L, N, Tq, Tk, H]
    elif patches.site in sites.HEAD_VECTOR_SITES:  # [L, N, T, H, d_head]
        diff = diff.any(-1)[:, :, :, None]  # [L, N, T, 1(src), H]
    else:  # [L, N, T, d]
        diff = diff.any(-1)[:, :, :, None, None]  # [L, N, T, 1, 1]
    # Any difference in layers [lo, hi): prefix counts over the layer axis.
    counts = np.concatenate([np.zeros_like(diff[:1], int), np.cumsum(diff, 0)])
    n, rows = len(patches), diff.shape[1]
    pos = patches.pos.reshape(n, -1)
    out = np.zeros((n, rows), bool)
    for i in range(n):
        changed = counts[patches.layer_hi[i]] - counts[patches.layer_lo[i]]  # [N, T, S, H]
        if patches.head[i] != ALL and changed.shape[-1] > 1:
            changed = changed[..., patches.head[i] : patches.head[i] + 1]
        if patches.src[i] != ALL:
            changed = changed[:, :, patches.src[i] : patches.src[i] + 1]
        changed = changed.reshape(rows, changed.shape[1], -1).any(-1)  # [N, T]
        at = changed.any(1) if (pos[i] == ALL).any() else changed[np.arange(rows), np.broadcast_to(pos[i], rows)]
        out[i] = ~at
    return out


def _check_finite(values, defined, axes, shape):
    bad = np.argwhere(defined & ~np.isfinite(values))
    if len(bad):
        raise FloatingPointError(
            f"the metric is not finite for {len(np.unique(bad[:, 0]))} patch(es), first at "
            f"{_describe(axes, shape, bad[0, 0])}; "
            "check the metric (e.g. a normalized metric whose clean and corrupted baselines are equal)"
        )


def _describe(axes, shape, flat_index):
    coords = np.unravel_index(flat_index, shape)
    return ", ".join(f"{a} {int(c)}" for a, c in zip(axes, coords))


def finish(raw, defined, metric, clean_score, corrupted_score, axes, shape, *, samples=1, per_prompt=False,
           check=True):
    """Raw patched scores -> the sweep's `SweepResult`.

    raw [n_patches, samples * batch] (or [n_patches] for a scalar metric), NaN where a patch does not
    apply to a prompt; defined: the same shape, where it applies; clean_score / corrupted_score: the
    baselines per row (or scalars). Noise samples are averaged per prompt first; then the default
    aggregate normalizes the mean over prompts, or per_prompt normalizes each prompt.
    check: raise FloatingPointError where a defined value is not finite.
    """
    _check = _check_finite if check else (lambda *args: None)
    info = dict(axes=tuple(axes), normalization=metric.normalize)
    if raw.ndim == 1:  # a scalar metric: already reduced over prompts and samples
        values = metric.compare(raw, clean_score, corrupted_score).reshape(shape)
        _check(values.reshape(-1), defined, axes, shape)
        return aggregate.SweepResult(values, clean=float(clean_score), corrupted=float(corrupted_score),
                                     per_prompt=False, **info)
    by_prompt = lambda a: np.asarray(a, np.float64).reshape(a.shape[:-1] + (samples, -1)).mean(-2)
    raw, clean_score, corrupted_score = by_prompt(raw), by_prompt(clean_score), by_prompt(corrupted_score)
    defined = defined.reshape(defined.shape[0], samples, -1)[:, 0]
    raw = np.where(defined, raw, np.nan)
    if per_prompt:
        values = aggregate.per_prompt(metric.normalize, raw, clean_score, corrupted_score)
        _check(values, defined, axes, shape)
        values = np.moveaxis(values, -1, 0).reshape((-1,) + tuple(shape))
    else:
        values = aggregate.normalized_mean(metric.normalize, raw, clean_score, corrupted_score)
        _check(values, defined.any(-1), axes, shape)
        values = values.reshape(shape)
    return aggregate.SweepResult(
        values, clean=float(clean_score.mean()), corrupted=float(corrupted_score.mean()),
        clean_per_prompt=clean_score.astype(np.float32), corrupted_per_prompt=corrupted_score.astype(np.float32),
        raw=np.moveaxis(raw, -1, 0).reshape((-1,) + tuple(shape)).astype(np.float32), per_prompt=bool(per_prompt),
        **info)


def prepare_metric(metric, d_vocab, batch, pos, mask, samples=1):
    """The metric checked and bound to this batch: its data and read positions (each prompt's
    last real token unless told otherwise) tiled over `samples` noise samples."""
    metric = checked_metric(metric, d_vocab)
    lengths = _prompt_lengths(mask, batch, pos)
    if isinstance(metric.positions, str) and mask is not None and (lengths < pos).any():
        # A plain callable on a padded batch: allowed only where it provably reads no padding.
        reads = callable_reads(metric.score.fn, (batch, pos, d_vocab)) if hasattr(metric.score, "fn") else None
        padded = np.arange(pos) >= lengths[:, None]
        if reads is None or (reads & padded).any():
            where = "every position" if reads is None else f"position {int(np.argmax((reads & padded).any(0)))}"
            raise ValueError(
                f"metric {metric.name!r} reads the logits at {where}, which is padding for some prompts of this "
                "batch. Use a jpatch Metric (jpatch.metrics.logit_diff, probability, kl, ...), which reads each "
                "prompt's last real token, or sweep prompts of one length without attention_mask"
            )
    read = metric.read_positions(batch, pos, None if mask is None else lengths)
    tile = lambda a: np.tile(np.asarray(a), (samples,) + (1,) * (np.ndim(a) - 1))
    data = {k: tile(v) for k, v in metric.batch_data(batch).items()}
    return dataclasses.replace(metric, data=data, positions="all" if read is None else tile(read))


def check_memory_budget(memory_budget):
    """Refuse a memory budget that is not a positive number of bytes (0 would divide by zero)."""
    if (isinstance(memory_budget, bool) or not isinstance(memory_budget, (int, float, np.number))
            or not 0 < memory_budget < math.inf):
        raise ValueError(f"memory_budget must be a positive number of bytes (e.g. 4 << 30), got {memory_budget!r}")
    return memory_budget


def sweep_site(name, n_layer):
    """The site a sweep patches: "resid_pre" / "hook_resid_pre" / "blocks.3.hook_resid_pre" are
    accepted as names, but one layer's full name is refused (a sweep runs over layers; choose
    them with `layers=`) rather than silently sweeping every layer."""
    if isinstance(name, str) and name.startswith("blocks."):
        site, layer = sites.parse(name, n_layer)
        raise ValueError(f"{name!r} names one layer; a sweep patches a site over layers: pass the site "
                         f"{site!r} (add layers=[{layer}] to patch that layer only)")
    return sites.canonical(name)


def sweep(model, clean, corrupted, site, metric, *, direction="denoise", window=1, layers=None, positions=None,
          heads=None, prompt_positions=None, axes=None, per_prompt=False, attention_mask=None, memory_budget=None,
          progress=True, skip_layers=True, skip_positions=True, devices=None, check_finite=True):
    """Patch `site` at every layer x position (x head) and measure `metric`.

    clean, corrupted: [batch, pos] tokens or `Run`s (`jpatch.corrupt` makes them;
    a Gaussian-noise run carries several noise samples, averaged per prompt).
    attention_mask: [batch, pos], 1 on real tokens, for prompts of different lengths padded on
    the right (`jpatch.pad`); each prompt is patched and scored as if swept alone, and position
    axes are NaN past each prompt's end.
    direction: "denoise" runs the corrupted input with clean values patched in,
    "noise" the clean input with corrupted values.
    window: patch w consecutive layers centred on each layer (ROME's sliding window).
    Returns a `SweepResult` (a NumPy array with the clean and corrupted baselines attached) of
    shape [*grid]: the metric normalized over the mean of the prompts (the paper's and
    TransformerLens's aggregate), or [batch, *grid] each prompt normalized alone when per_prompt.
    The grid axes default to (layer, pos), (layer, pos, head) for q/k/v/z, (layer, head, pos)
    for the pattern; choose `axes` e.g. ("layer", "head").
    check_finite: raise FloatingPointError naming the first patch whose value is not finite
    (False returns NaN there, e.g. for bulk runs that report undefined prompts themselves).
    """
    site = sweep_site(site, model.config.n_layer)
    if memory_budget is not None:
        check_memory_budget(memory_budget)
    if direction not in DIRECTIONS:
        raise ValueError(f"unknown direction {direction!r}; valid: {', '.join(DIRECTIONS)}")
    clean, corrupted = paired_runs(clean, corrupted)
    axes = tuple(axes or default_axes(site))
    S, B, T = corrupted.samples, clean.batch, clean.tokens.shape[1]
    mask = batch_mask(attention_mask, clean, corrupted, pad_id=model.config.d_vocab - 1)
    lengths = _prompt_lengths(mask, B, T)
    metric = prepare_metric(metric, model.config.d_vocab, B, T, mask, S)
    clean_rows = clean.tiled(S)

    clean_logits = read_logits(model, clean_rows, metric)
    corrupted_logits = read_logits(model, corrupted, metric)
    base, source = (corrupted, clean_rows) if direction == "denoise" else (clean_rows, corrupted)
    memory_budget = engine.default_memory_budget() if memory_budget is None else memory_budget
    # Only the patched site of the source run is kept (not every site, e.g. the [L, B, H, T, T] pattern).
    source_cache = Cache(engine.cached_sites(model, source.tokens, source.overrides, (site,), memory_budget),
                         model.config.n_layer)
    if prompt_positions is not None:
        prompt_positions = np.asarray(prompt_positions)
        if mask is not None and prompt_positions.shape == (B,) and (prompt_positions >= lengths).any():
            b = int(np.argmax(prompt_positions >= lengths))
            raise ValueError(f"prompt_positions: position {int(prompt_positions[b])} of prompt {b} is padding "
                             f"(the prompt has {int(lengths[b])} real tokens)")
        prompt_positions = np.tile(prompt_positions, S) if prompt_positions.shape == (B,) else prompt_positions
    patches, shape = make_patches(model.config, site, axes, T, S * B, window=window, layers=layers,
                                  positions=positions, heads=heads, prompt_positions=prompt_positions)
    baseline = lambda logits: np.asarray(metric.score(logits, clean_logits, metric.batch_data(S * B)))
    clean_score, corrupted_score = baseline(clean_logits), baseline(corrupted_logits)
    if per_prompt and clean_score.ndim == 0:
        raise ValueError(f"per_prompt=True needs a metric with one value per prompt; {metric.name!r} returns a scalar")
    raw = patch_scores(model, base, source_cache, patches, metric, clean_logits, memory_budget=memory_budget,
                       skip_layers=skip_layers, skip_positions=skip_positions, progress=progress, devices=devices)
    if raw.ndim > 1:
        base_site = engine.cached_sites(model, base.tokens, base.overrides, (site,), memory_budget)[site]
        no_op = no_op_patches(patches, base_site, source_cache.stacked(site))
        raw = np.where(no_op, corrupted_score if direction == "denoise" else clean_score, raw)
    defined = applies(patches, np.tile(lengths, S))
    return finish(raw, defined if raw.ndim > 1 else defined.all(1), metric, clean_score, corrupted_score, axes,
                  shape, samples=S, per_prompt=per_prompt, check=check_finite)


# --- TransformerLens-shaped functions -------------------------------------------------


def _tl_patch(name):
    site, axes = SWEEPS[name]

    def get_act_patch(model, corrupted_tokens, clean_cache, metric, *, attention_mask=None, **kwargs):
        corrupted = as_run(corrupted_tokens, "corrupted_tokens")
        N, T = corrupted.tokens.shape
        mask = batch_mask(attention_mask, corrupted, pad_id=model.config.d_vocab - 1)
        metric = prepare_metric(metric, model.config.d_vocab, N, T, mask)
        # The clean logits at the read positions come from the clean cache's last residual stream.
        read = metric.read_positions(N, T)
        final = clean_cache.stacked("hook_resid_post")[-1]
        if final.shape[:2] != (N, T):
            raise ValueError(f"clean_cache holds activations of {tuple(final.shape[:2])} tokens, "
                             f"corrupted_tokens are {(N, T)}: they must have the same [batch, pos] shape")
        if read is not None:
            final = jnp.take_along_axis(final, jnp.asarray(read)[..., None], axis=1)
        clean_logits = model.unembed(final)
        patches, shape = make_patches(model.config, site, axes, T, N)
        raw = patch_scores(model, corrupted, clean_cache, patches, metric, clean_logits, **kwargs)
        data = metric.batch_data(N)
        corrupted_logits = model(corrupted.tokens, overrides=corrupted.overrides, logits_at=read)
        clean_score = np.asarray(metric.score(clean_logits, clean_logits, data))
        corrupted_score = np.asarray(metric.score(corrupted_logits, clean_logits, data))
        if raw.ndim > 1:
            budget = kwargs.get("memory_budget") or engine.default_memory_budget()
            base_site = engine.cached_sites(model, corrupted.tokens, corrupted.overrides, (site,), budget)[site]
            no_op = no_op_patches(patches, base_site, clean_cache.stacked(site))
            raw = np.where(no_op, corrupted_score, raw)
        defined = applies(patches, _prompt_lengths(mask, N, T))
        return finish(raw, defined if raw.ndim > 1 else defined.all(1), metric, clean_score, corrupted_score,
                      axes, shape)

    get_act_patch.__name__ = f"get_act_patch_{name}"
    get_act_patch.__doc__ = (
        f"TransformerLens's `get_act_patch_{name}`: patch {site} over {axes} of the corrupted run "
        f"with clean values; returns the metric per patch, shape {tuple(axes)}.\n\n"
        "metric: a jittable TransformerLens-style function of the logits (written with jnp) or a\n"
        "jpatch Metric; a Metric is normalized with the cache's run as 1 and the tokens' run as 0\n"
        "(the mean over prompts normalized, as TransformerLens's notebooks do; for noising, pass the\n"
        "clean tokens and the corrupted cache: 1 then means fully corrupted).\n"
        "attention_mask: [batch, pos] for right-padded prompts of different lengths.\n"
        "Returns a `SweepResult` (an array with the baselines attached).\n"
        "Keyword arguments (memory_budget, progress, devices, ...) go to `patch_scores`."
    )
    return get_act_patch


for _name in SWEEPS:
    globals()[f"get_act_patch_{_name}"] = _tl_patch(_name)


# TransformerLens's combined sweeps: the parts each stacks, in its order.
HEAD_PARTS = ("out", "q", "k", "v", "pattern")
EVERY = {
    "block_every": ("resid_pre", "attn_out", "mlp_out"),
    "attn_head_all_pos_every": tuple(f"attn_head_{n}_all_pos" for n in HEAD_PARTS),
    "attn_head_by_pos_every": tuple(f"attn_head_{n}_by_pos" for n in HEAD_PARTS),
}


def stack_every(get, every, *args, **kwargs):
    """The parts of the combined sweep `every` (get(name) -> that part's function) stacked;
    by position, the pattern's [layer, head, pos] is moved to the others' [layer, pos, head]."""
    parts = [get(name)(*args, **kwargs) for name in EVERY[every]]
    if every == "attn_head_by_pos_every":
        parts[-1] = np.swapaxes(parts[-1], 1, 2)
    return np.stack(parts)


def _act_patch(name):
    return globals()[f"get_act_patch_{name}"]


def get_act_patch_block_every(model, corrupted_tokens, clean_cache, metric, **kwargs):
    """[3, layer, pos]: resid_pre, attn_out, mlp_out."""
    return stack_every(_act_patch, "block_every", model, corrupted_tokens, clean_cache, metric, **kwargs)


def get_act_patch_attn_head_all_pos_every(model, corrupted_tokens, clean_cache, metric, **kwargs):
    """[5, layer, head]: output (z), q, k, v, pattern."""
    return stack_every(_act_patch, "attn_head_all_pos_every", model, corrupted_tokens, clean_cache, metric, **kwargs)


def get_act_patch_attn_head_by_pos_every(model, corrupted_tokens, clean_cache, metric, **kwargs):
    """[5, layer, pos, head]: output (z), q, k, v, pattern (pattern moved to [layer, pos, head])."""
    return stack_every(_act_patch, "attn_head_by_pos_every", model, corrupted_tokens, clean_cache, metric, **kwargs)
