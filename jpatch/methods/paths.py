"""Exact path patching (Wang et al. 2022) through the model's own blocks, on the edge graph of
`jpatch.circuits`: each sender's source write reaches only the receivers' inputs."""

import jax
import jax.numpy as jnp
import numpy as np

from jpatch.engine.inputs import check_baselines, check_direction
from jpatch.engine.readout import prepare_metric
from jpatch.engine.sweep import finish
from jpatch.methods.circuits import (float32_model, layer_writes, pair_tokens, reader_indices, run_writes,
                                     writer_index)
from jpatch.methods.edges import graph_names, reader_layout
from jpatch.model.layers import causal_attention
from jpatch.model.sites import SPLIT_INPUT_SITES


def _sender_onehots(config, senders):
    """([n_groups, n_writers] 0/1 sender sets, output shape)."""
    writers = graph_names(config)[0]
    if isinstance(senders, str) and senders == "heads":
        names = [[f"a{l}.h{h}"] for l in range(config.n_layer) for h in range(config.n_head)]
        shape = (config.n_layer, config.n_head)
    elif isinstance(senders, str):
        names, shape = [[senders]], ()
    else:
        names = [[s] if isinstance(s, str) else list(s) for s in senders]
        shape = (len(names),)
        if not names or any(not group for group in names):
            raise ValueError("senders must be 'heads', a writer name, or a non-empty list of writer names / groups")
    onehot = np.zeros((len(names), len(writers)), np.float32)
    for i, group in enumerate(names):
        for name in group:
            onehot[i, writer_index(config, name)] = 1.0
    return onehot, shape


def _receiver_flags(config, receivers):
    """Bool [n_readers]: which reader inputs take the path-patched value."""
    n_r = len(graph_names(config)[1])
    names = [receivers] if isinstance(receivers, str) else list(receivers)
    if not names:
        raise ValueError("receivers must name at least one reader")
    flags = np.zeros(n_r, bool)
    for name in names:
        flags[reader_indices(config, name)] = True
    return flags


def _path_forward(model, tokens, base, src_writes, sender, receive, read_pos, freeze_mlps):
    """Wang et al.'s two passes for one sender set, as one function of the base run, through the
    model's own blocks.

    base: the base run's residuals, MLP inputs and outputs and writes; sender [n_writers] 0/1.
    Pass 1 (heads frozen to the base run, MLPs recomputed unless frozen): the change d of
    the residual stream that the senders' source writes cause. Pass 2: the base tokens with
    each receiver's input replaced by (base input + d at that reader), everything else
    recomputed. Returns logits [B, K, V].
    """
    cfg = model.config
    L, H = cfg.n_layer, cfg.n_head
    cols_of, mlp_col, per = reader_layout(cfg)
    diff = (src_writes - base["writes"]) * sender[:, None, None, None]  # the senders' changed writes
    frozen = lambda q, k, v, **options: jnp.zeros_like(q)  # heads are frozen: attention is never read

    def pass1(delta, xs):
        l, block, mlp_in, mlp_out = xs
        base_heads, _ = layer_writes(base["writes"], l, H)
        diff_heads, diff_mlp = layer_writes(diff, l, H)
        at_pre = delta
        at_mlp = delta if cfg.parallel_block else delta + diff_heads.sum(2)
        got = {}

        def edit(name, act):
            if name == "attn.hook_result":
                return base_heads + diff_heads
            if name == "hook_mlp_in":  # the base run's own input plus the change: exact when it is 0
                return mlp_in + at_mlp
            if name == "hook_mlp_out":
                got["mlp"] = act
            return act

        edit.wants_result = True
        if freeze_mlps:
            change = jnp.zeros_like(delta)
        else:
            block(base["hook_resid_pre"][l] + delta, base["positions"], cfg, frozen, edit)
            change = got["mlp"] - mlp_out
        is_sender = sender[1 + l * (H + 1) + H]
        delta = delta + diff_heads.sum(2) + is_sender * diff_mlp + (1 - is_sender) * change
        return delta, (at_pre, at_mlp)

    delta, (at_pre, at_mlp) = jax.lax.scan(
        pass1, diff[0], (jnp.arange(L), model.blocks, base["hook_mlp_in"], base["hook_mlp_out"]))
    final = base["final"] + delta
    if not receive[:-1].any():  # only the logits receive: pass 2 is the unembedding
        if read_pos is not None:
            final = jnp.take_along_axis(final, read_pos[..., None], axis=1)
        return model.unembed(final)
    recv = jnp.asarray(receive[:L * per].reshape(L, per))
    fixed_pre = base["hook_resid_pre"] + at_pre  # [L, B, T, d]: the receivers' pass-1 inputs
    fixed_mlp = base["hook_mlp_in"] + at_mlp

    def pass2(x, xs):
        block, r, pre, mlp = xs

        def edit(name, act):
            if name in SPLIT_INPUT_SITES:  # [B, T, heads, d]
                return jnp.where(r[cols_of[name]][:, None], pre[:, :, None], act)
            if name == "hook_mlp_in":
                return jnp.where(r[mlp_col], mlp, act)
            return act

        edit.split_inputs = bool(np.asarray(receive[:L * per]).reshape(L, per)[:, :mlp_col].any())
        return block(x, model.positions(tokens), cfg, causal_attention, edit), None

    x, _ = jax.lax.scan(pass2, base["hook_resid_pre"][0], (model.blocks, recv, fixed_pre, fixed_mlp))
    x = jnp.where(receive[-1], final, x)
    if read_pos is not None:
        x = jnp.take_along_axis(x, read_pos[..., None], axis=1)
    return model.unembed(x)


def _path_scores(model, base_tokens, source_tokens, senders, read_pos, data, *, score, receive, clean_is_base,
                 freeze_mlps):
    base_logits, base_writes = run_writes(model, base_tokens)
    source_logits, src_writes = run_writes(model, source_tokens)
    _, cache = model.run_with_cache(base_tokens, names_filter=["hook_resid_pre", "hook_mlp_in", "hook_mlp_out",
                                                                "hook_resid_post"])
    base = {"writes": base_writes, "final": cache.stacked("hook_resid_post")[-1],
            "positions": model.positions(base_tokens),
            **{s: cache.stacked(s) for s in ("hook_resid_pre", "hook_mlp_in", "hook_mlp_out")}}
    at = (lambda lg: lg) if read_pos is None else (lambda lg: jnp.take_along_axis(lg, read_pos[..., None], 1))
    base_logits, source_logits = at(base_logits), at(source_logits)
    clean_logits = base_logits if clean_is_base else source_logits
    corrupted_logits = source_logits if clean_is_base else base_logits

    receive = np.asarray(receive)
    if not receive[:-1].any() and read_pos is not None:
        # Only the logits receive and every head is frozen: pass 1 is position-wise (MLPs only), so
        # it runs at the positions the metric reads alone.
        pick = lambda a, axis: jnp.take_along_axis(
            a, jnp.expand_dims(read_pos, tuple(range(axis - 1)) + (-1,)), axis=axis)
        base = {"writes": pick(base["writes"], 2), "final": pick(base["final"], 1), "positions": read_pos,
                **{s: pick(base[s], 2) for s in ("hook_resid_pre", "hook_mlp_in", "hook_mlp_out")}}
        src_writes, read_pos = pick(src_writes, 2), None

    def one(sender):
        logits = _path_forward(model, base_tokens, base, src_writes, sender, receive, read_pos, freeze_mlps)
        return score(logits, clean_logits, data)

    # Senders run vmapped in batches (lax.map's batch_size) so every head's two passes share one call.
    return (jax.lax.map(one, senders, batch_size=min(len(senders), 48)), score(clean_logits, clean_logits, data),
            score(corrupted_logits, clean_logits, data))


_path_scores_jit = jax.jit(_path_scores, static_argnames=("score", "receive", "clean_is_base", "freeze_mlps"))


def path_patch(model, clean, corrupted, senders, receivers, metric, *, direction="noise", freeze_mlps=False,
               per_prompt=False):
    """Exact path patching (Wang et al. 2022): the effect of each sender through `receivers` only.

    direction "noise": the clean run, with the senders' corrupted outputs reaching only the
    receivers (every other head frozen to its clean value; MLPs recomputed, or frozen with
    freeze_mlps); "denoise": the same with clean and corrupted swapped (the metric's reference
    stays the clean run). senders: "heads" (every head, one compiled call -> [layer, head]), a
    writer name ("a9.h6", "m3", "embed") or a list of names or groups of names patched together
    (-> [n]). receivers: "logits", "m<l>" (an MLP's input), "a<l>.h<h>" (a head's q, k and v
    inputs), "a<l>.h<h><q>" (one of them), or a list of these. Returns a `SweepResult`: the metric
    normalized like `sweep` (mean over prompts, or [batch, ...] each prompt alone when per_prompt;
    for "range" 1 = clean, 0 = corrupted), with the same metadata and views (`.delta`: patched minus
    the base run, the clean run when noising).
    A bfloat16 model runs in float32. TransformerLens 4.3's `get_act_patch_direct_path*` is a
    different, linearized quantity (one head's write added to one later head's input).
    """
    check_direction(direction)
    model = float32_model(model)
    clean, corrupted = pair_tokens(model, clean, corrupted)
    cfg = model.config
    onehots, shape = _sender_onehots(cfg, senders)
    receive = _receiver_flags(cfg, receivers)
    B, T = clean.shape
    # A plain callable keyed by its structure, its captured arrays as data (a new closure reuses the
    # compile), narrowed to the logit positions it reads: both passes then run at those positions only.
    metric = prepare_metric(metric, cfg.d_vocab, B, T, None)
    read_pos = metric.read_positions(B, T)
    base, source = (clean, corrupted) if direction == "noise" else (corrupted, clean)
    raw, clean_score, corrupted_score = jax.device_get(_path_scores_jit(
        model, base, source, jnp.asarray(onehots), None if read_pos is None else jnp.asarray(read_pos),
        metric.batch_data(B), score=metric.score, receive=tuple(bool(r) for r in receive),
        clean_is_base=direction == "noise", freeze_mlps=bool(freeze_mlps)))
    raw, clean_score, corrupted_score = (np.asarray(a, np.float64) for a in (raw, clean_score, corrupted_score))
    check_baselines(metric, clean_score, corrupted_score, B)
    if per_prompt and clean_score.ndim == 0:
        raise ValueError(f"per_prompt=True needs a metric with one value per prompt; {metric.name!r} returns a scalar")
    axes = ("layer", "head") if shape == (cfg.n_layer, cfg.n_head) else ("sender",)
    return finish(raw, np.ones(raw.shape, bool), metric, clean_score, corrupted_score, axes, shape,
                  direction=direction, method="path_patching", per_prompt=per_prompt)
