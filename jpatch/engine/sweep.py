"""`sweep(model, clean, corrupted, site, metric)`: patch `site` at every layer x position (x head)
and return the metric per patch, computed by the batched engine in one compiled call per
patch group and prompt chunk; the grid of patches (`make_patches`) and the raw scores turned
into a `SweepResult` (`finish`). TransformerLens's `get_act_patch_*` are in `jpatch.engine.patching`.
"""

import itertools
import math
from typing import Union

import numpy as np

from jpatch.engine import aggregate
from jpatch.engine import buckets as bucketing
from jpatch.engine import execute as engine
from jpatch.engine import plan
from jpatch.engine.plan import ALL, Patches
from jpatch.engine.inputs import Run, check_base, check_baselines, check_direction, checked_inputs, prompt_lengths
from jpatch.engine.readout import is_user_callable, prepare_metric
from jpatch.engine.scores import applies, patch_scores, with_exact_no_ops
from jpatch.model import families, sites
from jpatch.model.gpt2 import Cache
from jpatch.model.types import Grid, Mask, Tokens

WINDOW_SITES = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out")


def default_axes(site, table=None):
    """A sweep's axes for `site`: (layer, pos), (layer, pos, head) for per-head vectors, (layer, head,
    pos) for the pattern. table: the model family's `SiteTable`, whose sweepable sites are checked;
    None (before a model is loaded) checks the sites some family's engine sweeps."""
    site = sites.canonical(site)
    sweepable = table.sweep_sites if table is not None else families.SWEEP_SITES
    if table is not None and site not in table:
        raise ValueError(f"{table.family} has no hook point {site!r}; sweepable: {', '.join(sweepable)}")
    if site not in sweepable:
        why = "has no layers to sweep" if site not in sites.LAYER_AXES else "is not patched by the sweep engine"
        family = f" in {table.family}" if table is not None else ""
        raise ValueError(f"site {site!r} {why}{family}; sweepable: {', '.join(sweepable)}")
    axes = sites.LAYER_AXES[site]
    if axes == sites.SCORES:
        return ("layer", "head", "pos")
    return ("layer", "pos", "head") if "head" in axes or "kv_head" in axes else ("layer", "pos")


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
    own = default_axes(site, config.sites)  # refuses a site the engine does not patch
    valid = ("layer", "pos") + (("head", "src") if site == "attn.hook_pattern" else own[2:])
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
        "head": _choose(heads, sites.axis_size(config, "kv_head" if "kv_head" in config.sites[site].axes
                                                   else "head", 1, 1), "heads"),
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


def finish(raw, defined, metric, clean_score, corrupted_score, axes, shape, *, direction, method="patching",
           samples=1, per_prompt=False, check=True):
    """Raw patched scores -> the sweep's `SweepResult`.

    raw [n_patches, samples * batch] (or [n_patches] for a scalar metric), NaN where a patch does not
    apply to a prompt; defined: the same shape, where it applies; clean_score / corrupted_score: the
    baselines per row (or scalars). Noise samples are averaged per prompt first; then the default
    aggregate normalizes the mean over prompts, or per_prompt normalizes each prompt.
    direction, method: recorded in the result (the direction picks the base run of `delta`).
    check: raise FloatingPointError where a defined value is not finite.
    """
    baselines = (clean_score, corrupted_score, raw.shape[-1] if raw.ndim > 1 else 1)

    def _check(*args):
        if check:  # a non-finite patch first (it names the patch), then what the baselines refuse
            _check_finite(*args)
            check_baselines(metric, *baselines, per_prompt=per_prompt, samples=samples)

    info = dict(axes=tuple(axes), normalization=metric.normalize, direction=direction, method=method)
    if raw.ndim == 1:  # a scalar metric: already reduced over prompts and samples
        values = metric.normalized(raw, clean_score, corrupted_score).reshape(shape)
        _check(values.reshape(-1), defined, axes, shape)
        return aggregate.SweepResult(values, clean=float(clean_score), corrupted=float(corrupted_score),
                                     per_prompt=False, **info, **aggregate.raw_views(
                                         direction, float(clean_score), float(corrupted_score),
                                         raw=raw.reshape(shape)))
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
        per_prompt=bool(per_prompt), **info, **aggregate.raw_views(
            direction, clean_score, corrupted_score, raw=np.moveaxis(raw, -1, 0).reshape((-1,) + tuple(shape))))


def baseline_scores(metric, logits, clean_logits, prompts):
    """A metric's score of one run's logits [rows, ...] (rows past `prompts` pad a shape bucket) on the
    real prompts, as NumPy, in one compiled call (not an eager op per step of a callable)."""
    n, user = logits.shape[0], is_user_callable(metric)
    score = lambda rows: np.asarray(engine.score_logits(logits, clean_logits, metric.batch_data(n),
                                                        score=metric.score, rows=rows))
    out = score(prompts if user and n > prompts else None)
    if out.ndim == 0 and n > prompts and not user:  # a Metric reduced over the batch: the real prompts only
        out = score(prompts)
    return out if out.ndim == 0 else out[:prompts]


def check_memory_budget(memory_budget):
    """Refuse a memory budget that is not a positive number of bytes (0 would divide by zero)."""
    if (isinstance(memory_budget, bool) or not isinstance(memory_budget, (int, float, np.number))
            or not 0 < memory_budget < math.inf):
        raise ValueError(f"memory_budget must be a positive number of bytes (e.g. 4 << 30), got {memory_budget!r}")
    return memory_budget


def sweep(model, clean: Union[Tokens, Run], corrupted: Union[Tokens, Run], site: str, metric, *, direction="denoise",
          window=1, layers=None, positions=None, heads=None, prompt_positions=None, axes=None, per_prompt=False,
          attention_mask: Mask = None, memory_budget=None, progress=True, skip_layers=True, skip_positions=True,
          devices=None, check_finite=True, buckets=None) -> Grid:
    """Patch `site` at every layer x position (x head) and measure `metric`.

    clean, corrupted: [batch, pos] tokens or `Run`s (`jpatch.corrupt` makes them;
    a Gaussian-noise run carries several noise samples, averaged per prompt).
    attention_mask: [batch, pos], 1 on real tokens, for prompts of different lengths padded on
    the right (`jpatch.pad`); each prompt is patched and scored as if swept alone, and position
    axes are NaN past each prompt's end.
    direction: "denoise" runs the corrupted input with clean values patched in,
    "noise" the clean input with corrupted values.
    window: patch w consecutive layers centred on each layer (ROME's sliding window).
    Returns a `SweepResult` (a NumPy array with the result contract's metadata and raw views:
    baselines, `.patched`, `.delta`, see `aggregate.RESULT_FIELDS`) of shape [*grid]: the metric normalized over the mean of the prompts (the paper's and
    TransformerLens's aggregate), or [batch, *grid] each prompt normalized alone when per_prompt.
    The grid axes default to (layer, pos), (layer, pos, head) for q/k/v/z, (layer, head, pos)
    for the pattern; choose `axes` e.g. ("layer", "head").
    check_finite: raise FloatingPointError naming the first patch whose value is not finite
    (False returns NaN there, e.g. for bulk runs that report undefined prompts themselves).
    buckets: pad the prompts to a shape bucket so that other shapes reuse compiled programs, with the
    same results (`jpatch.engine.buckets`); None: on unless JPATCH_BUCKETS=0.
    """
    site = sites.canonical(site, model.config.n_layer)
    if memory_budget is not None:
        check_memory_budget(memory_budget)
    check_direction(direction)
    clean, corrupted, mask = checked_inputs(model, clean, corrupted, attention_mask)
    axes = tuple(axes or default_axes(site, model.sites))
    S, B, T = corrupted.samples, clean.batch, clean.tokens.shape[1]
    lengths = prompt_lengths(mask, B, T)
    metric = prepare_metric(metric, model.config.d_vocab, B, T, mask, S)
    if prompt_positions is not None:
        prompt_positions = np.asarray(prompt_positions)
        if mask is not None and prompt_positions.shape == (B,) and (prompt_positions >= lengths).any():
            b = int(np.argmax(prompt_positions >= lengths))
            raise ValueError(f"prompt_positions: position {int(prompt_positions[b])} of prompt {b} is padding "
                             f"(the prompt has {int(lengths[b])} real tokens)")
        prompt_positions = np.tile(prompt_positions, S) if prompt_positions.shape == (B,) else prompt_positions
    patches, shape = make_patches(model.config, site, axes, T, S * B, window=window, layers=layers,
                                  positions=positions, heads=heads, prompt_positions=prompt_positions)
    base, source = (corrupted, clean.tiled(S)) if direction == "denoise" else (clean.tiled(S), corrupted)
    check_base(base)
    memory_budget = plan.default_memory_budget() if memory_budget is None else memory_budget
    # The runs padded to their shape bucket (`buckets`), the grid over the bucket's positions.
    NB, TB, (base, source), metric = bucketing.padded(model, (base, source), metric, S * B, T, buckets)
    if (NB, TB) != (S * B, T):
        pp = None if prompt_positions is None else bucketing.rows(prompt_positions, NB)
        run_patches, run_shape = make_patches(model.config, site, axes, TB, NB, window=window, layers=layers,
                                              positions=positions, heads=heads, prompt_positions=pp)
    else:
        run_patches, run_shape = patches, shape
    # One forward per run: the base run's stacks the engine starts from (and its patched site, for the
    # exact no-ops), the source's patched site only (not every site, e.g. the [L, B, H, T, T] pattern),
    # and both runs' logits at the positions the metric reads.
    read = metric.read_positions(NB, TB)
    base_stacks, base_logits = engine.cached_run(model, base, engine.base_sites(model) + (site,), memory_budget,
                                                 read=read)
    source_stacks, source_logits = engine.cached_run(model, source, (site,), memory_budget, read=read)
    source_cache = Cache(source_stacks, model.config.n_layer, table=model.sites)
    clean_logits, corrupted_logits = ((source_logits, base_logits) if direction == "denoise"
                                      else (base_logits, source_logits))
    clean_score, corrupted_score = (baseline_scores(metric, logits, clean_logits, S * B)
                                    for logits in (clean_logits, corrupted_logits))
    if per_prompt and clean_score.ndim == 0:
        raise ValueError(f"per_prompt=True needs a metric with one value per prompt; {metric.name!r} returns a scalar")
    raw = patch_scores(model, base, source_cache, run_patches, metric, clean_logits, memory_budget=memory_budget,
                       skip_layers=skip_layers, skip_positions=skip_positions, progress=progress, devices=devices,
                       base_stacks=base_stacks, prompts=S * B)
    raw = bucketing.kept_scores(raw, run_shape, shape, S * B)
    axes_of = model.sites[site].axes
    raw = with_exact_no_ops(raw, patches, bucketing.cut_stack(base_stacks[site], axes_of, S * B, T),
                            bucketing.cut_stack(source_cache.stacked(site), axes_of, S * B, T),
                            corrupted_score if direction == "denoise" else clean_score)
    defined = applies(patches, np.tile(lengths, S))
    return finish(raw, defined if raw.ndim > 1 else defined.all(1), metric, clean_score, corrupted_score, axes,
                  shape, direction=direction, samples=S, per_prompt=per_prompt, check=check_finite)


