"""Raw metric scores of every patch: the engine's compiled call (`jpatch.engine.execute`) driven
over patch groups and prompt chunks under a memory budget, sharded over devices; and which
patches apply to which prompts (`applies`) or change nothing (`no_op_patches`)."""

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from jpatch.engine import execute as engine
from jpatch.engine.inputs import check_base
from jpatch.engine.plan import ALL, bytes_per_prompt, cheap_row_layers, default_memory_budget, plan_groups
from jpatch.engine.readout import checked_metric, is_user_callable, narrowed, on_columns

DEFAULT_MEMORY_BUDGET = 4 << 30
MANY_GROUPS = 8  # more patch groups than this (a tiny memory budget) is warned about


def _sharding(mesh, ndim, axis):
    spec = [None] * ndim
    spec[axis] = "batch"
    return NamedSharding(mesh, PartitionSpec(*spec))


def patch_scores(model, base, source_cache, patches, metric, clean_logits, *, memory_budget=None,
                 skip_layers=True, skip_positions=True, progress=True, devices=None, base_stacks=None, prompts=None):
    """Raw metric scores [n_patches, rows] (or [n_patches] for a scalar metric) of
    every patch applied to the `base` Run with values from `source_cache`.
    memory_budget: bytes per compiled call (None: from the device's free memory).
    base_stacks: the base run's `execute.base_sites` stacks when the caller has them (its one
    cached forward, `execute.cached_run`); None computes them.
    prompts: how many of the base run's prompts are real (the rest pad a shape bucket, see
    `jpatch.engine.buckets`): a metric on the whole batch scores only those; None: all."""
    cfg = model.config
    N, T = base.tokens.shape
    prompts = N if prompts is None else prompts
    check_base(base)
    memory_budget = default_memory_budget() if memory_budget is None else memory_budget
    metric = checked_metric(metric, model.config.d_vocab)
    # A callable on full logits is fed only the positions it reads (found by probing it), unless
    # prepare_metric narrowed it already.
    unread = narrowed(metric, (N, T, cfg.d_vocab))
    read_pos = unread.read_positions(N, T)
    if unread is not metric:  # the clean logits a newly narrowed callable sees
        clean_logits = jnp.take_along_axis(jnp.asarray(clean_logits), jnp.asarray(read_pos)[..., None], axis=1)
    metric = unread
    read_all = read_pos is None
    read_pos = np.zeros((N, 1), int) if read_all else read_pos
    data = metric.batch_data(N)
    source = source_cache.stacked(patches.site)
    if source.shape[1] != N:
        raise ValueError(f"the source activations cover {source.shape[1]} prompts, the base run has {N}")
    if base_stacks is None:
        base_stacks = engine.cached_run(model, base, engine.base_sites(model), memory_budget)[0]
    base_arrays = {k: base_stacks[k] for k in engine.base_sites(model)}

    n_read = T if read_all else read_pos.shape[1]
    seen = prompts if is_user_callable(metric) else N  # a callable never sees a padding prompt
    score_shape = jax.eval_shape(
        lambda lg, cl, d: metric.score(lg, cl, d), jax.ShapeDtypeStruct((seen, n_read, cfg.d_vocab), jnp.float32),
        *jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct((seen,) + a.shape[1:], a.dtype), (clean_logits, data))
    ).shape
    if score_shape not in ((), (seen,)):
        raise ValueError(f"metric {metric.name!r} must return a scalar or one value per prompt ({seen}), got shape "
                         f"{score_shape}")
    scalar = score_shape == ()
    # Only the logits of the vocabulary ids the metric reads are computed (logit differences: two).
    metric, columns = on_columns(metric, cfg.d_vocab)
    if columns is not None:
        clean_logits = jnp.take(jnp.asarray(clean_logits), jnp.asarray(columns), axis=-1)
        data = metric.batch_data(N)
    # the logits' width per patch and prompt: a callable sees its ids spread back to the vocabulary
    vocab = cfg.d_vocab if columns is None or is_user_callable(metric) else len(columns)
    # A scalar metric, or any user callable (written for the whole batch), is scored on every (real)
    # prompt at once; the patched runs still go in prompt chunks: their final residuals are kept
    # and scored together after the last chunk (`score_whole`).
    whole = scalar or is_user_callable(metric)

    devices = list(devices or jax.local_devices())
    mesh = Mesh(np.array(devices), ("batch",))
    # Patch groups split a sweep too big for one prompt; prompt chunks split the rest. Every
    # group has one static layout, so the sweep compiles one program whatever its size.
    plan = lambda g: plan_groups(patches, cfg.n_layer, T, g, skip_layers=skip_layers,
                                 skip_positions=skip_positions, merge_below=cheap_row_layers(cfg, N))
    # A whole-batch metric's logits are made in `score_whole`'s patch chunks, not in the patching call.
    # It keeps every prompt's final residuals of a group until then (`stored`).
    stored = lambda layout: N * len(layout.order) * n_read * cfg.d_model * 4 if whole else 0
    per_prompt = lambda layout: bytes_per_prompt(cfg, layout, n_read, 0 if whole else vocab)
    need = lambda layout: per_prompt(layout) + stored(layout)  # one prompt's call
    groups = 1
    planned = plan(groups)
    while need(planned[0][1]) > memory_budget and groups < len(patches):
        groups = min(len(patches), max(groups + 1, math.ceil(groups * need(planned[0][1]) / memory_budget)))
        planned = plan(groups)
    if groups > MANY_GROUPS:
        warnings.warn(f"memory_budget={memory_budget} bytes splits this sweep into {groups} patch groups, run one "
                      f"after another (slow); {need(plan(1)[0][1])} bytes would run it in one", RuntimeWarning,
                      stacklevel=3)
    chunk = max(1, min(N, (memory_budget - stored(planned[0][1])) // per_prompt(planned[0][1])))
    if len(devices) > 1:
        chunk = math.ceil(chunk / len(devices)) * len(devices)
    n_chunks = math.ceil(N / chunk)
    # The same number of chunks, as even as they go: 8 prompts at 5 a chunk run as 4 + 4, not
    # 5 + 5 with two padding prompts computed for nothing.
    chunk = math.ceil(N / n_chunks)
    if len(devices) > 1:
        chunk = math.ceil(chunk / len(devices)) * len(devices)
    pad = n_chunks * chunk - N

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
    score_inputs = lambda put: engine.MetricInputs(None, put(clean_logits, 0),
                                                   jax.tree_util.tree_map(lambda a: put(a, 0), data))

    out = np.zeros((len(patches),) if scalar else (len(patches), N + pad), np.float32)
    bar = tqdm(total=len(patches) * N, disable=not progress, desc=f"patching {patches.site}", unit=" runs")
    for slots, lay in planned:
        real = slots >= 0
        take = lambda a, fill: jnp.asarray(np.where(real, np.asarray(a)[np.maximum(slots, 0)], fill))
        # padding slots are never patched (an empty layer window)
        slot_patches = engine.SlotPatches(layer_lo=take(patches.layer_lo, 0), layer_hi=take(patches.layer_hi, 0),
                                          pos=None, head=take(patches.head, 0), src=take(patches.src, 0))
        pos_slots = jnp.where(jnp.asarray(real)[:, None], pos_all[np.maximum(slots, 0)], 0)
        finals = []
        for c in range(n_chunks):
            rows = slice(c * chunk, (c + 1) * chunk)
            put = lambda a, axis: jax.device_put(a[(slice(None),) * axis + (rows,)], _sharding(mesh, a.ndim, axis))
            resid = engine.run_layout(
                model,
                engine.BaseCache.from_sites({k: put(v, 0 if k == "final" else 1) for k, v in base_arrays.items()}, model),
                put(source, 1),
                slot_patches._replace(pos=put(pos_slots, 1)),
                jax.tree_util.tree_map(jnp.asarray, lay.rows()),
                engine.MetricInputs(put(read_pos, 0), None, None),
                site=patches.site,
                stages=lay.stages,
                read_all=read_all,
            )
            if whole:
                finals.append(resid)
            else:
                scores = np.asarray(engine.score_rows(model, resid, score_inputs(put), score=metric.score))[real]
                out[slots[real], rows] = scores
            bar.update(int(real.sum()) * (min(rows.stop, N) - rows.start))
        if whole:
            put = lambda a, axis: jax.device_put(a, _sharding(mesh, a.ndim, axis))
            resid = finals[0] if n_chunks == 1 else jnp.concatenate(finals, axis=0)
            scores = score_whole(model, resid, score_inputs(put), metric.score, prompts, memory_budget, vocab)[real]
            if scalar:
                out[slots[real]] = scores
            else:
                out[slots[real], :prompts] = scores  # the real prompts
    bar.close()
    return out if scalar else out[:, :N]


def applies(patches, lengths):
    """[n_patches, rows] whether each patch lies within each prompt (its position and key position)."""
    pos = patches.pos.reshape(len(patches), -1)
    within = (pos == ALL) | (pos < lengths[None, :])
    src = patches.src[:, None]
    return within & ((src == ALL) | (src < lengths[None, :]))


def score_whole(model, resid, inputs, score, prompts, memory_budget, vocab=None):
    """A whole-batch metric's raw scores [n] (or [n, prompts]) of one patch group, from every prompt's
    final residuals [rows, n, K, d] (rows past `prompts` pad), in patch chunks whose logits (`vocab`
    wide, None: the model's vocabulary) fit the memory budget; the chunks have one size (the last
    overlaps the one before), so one program."""
    n_rows, n, K = resid.shape[:3]
    # A callable fed its read logits sees them spread back to its [batch, pos, vocab] shape
    # (`readout.narrowed`'s "slot"): that array, and its temporaries like it, per patch.
    seen = inputs.data["slot"].shape[1] if "slot" in inputs.data else K
    per_patch = 3 * prompts * seen * (vocab or model.config.d_vocab) * 4
    size = max(1, min(n, memory_budget // per_patch))
    rows = prompts if prompts < n_rows else None
    out = []
    for start in range(0, n, size):
        first = min(start, n - size)
        got = engine.score_rows(model, resid, inputs, score=score, rows=rows, first_slot=first,
                                n_slots=None if size == n else size)
        out.append(np.asarray(got)[start - first :])
    return np.concatenate(out)


def with_exact_no_ops(raw, patches, base_stack, source_stack, base_score):
    """`raw` [n_patches, rows] (or [n_patches] for a batch-level metric) with the base run's exact
    score wherever a patch writes only the base run's own values (`no_op_patches`), so a patch that
    changes nothing measures exactly 0; a batch-level metric's patch is one when it is in every prompt."""
    no_op = no_op_patches(patches, base_stack, source_stack)
    return np.where(no_op if raw.ndim > 1 else no_op.all(1), base_score, raw)


def no_op_patches(patches, base_stack, source_stack):
    """[n_patches, rows]: True where every value a patch writes equals the base run's own value.

    Such a patched run *is* the base run, so its score is the base run's score exactly (not
    a float32 recomputation of it): a patch that changes nothing measures exactly 0.
    base_stack, source_stack: the site's [n_layer, rows, ...] activations of the two runs.
    """
    diff = np.asarray(base_stack != source_stack)
    if patches.site == "attn.hook_pattern":  # [L, N, H, Tq, Tk]
        diff = np.moveaxis(diff, 2, -1)  # [L, N, Tq, Tk, H]
    elif base_stack.ndim == 5:  # per-head vectors [L, N, T, H, d_head]
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
