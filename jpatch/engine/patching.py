"""TransformerLens's activation-patching functions, same arguments, shapes and numbers:
`get_act_patch_<name>(model, corrupted_tokens, clean_cache, metric)` patches the corrupted run
with clean values from `clean_cache` and returns the metric per patch, as a `SweepResult`.

metric: a jittable TransformerLens-style function of the logits (written with jnp) or a jpatch
Metric; a Metric is normalized with the cache's run as 1 and the tokens' run as 0 (the mean
over prompts normalized, as TransformerLens's notebooks do; for noising, pass the clean tokens
and the corrupted cache: 1 then means fully corrupted). attention_mask: [batch, pos] for
right-padded prompts of different lengths. Other keyword arguments (memory_budget, progress,
devices, ...) go to `jpatch.engine.scores.patch_scores`.
"""

from typing import Union

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Float

from jpatch.engine import buckets as bucketing
from jpatch.engine import plan
from jpatch.engine import execute as engine
from jpatch.engine.inputs import check_base, checked_inputs, prompt_lengths
from jpatch.engine.readout import prepare_metric
from jpatch.engine.scores import applies, with_exact_no_ops, patch_scores
from jpatch.engine.inputs import Run  # jpatch 0.1 had jpatch.patching.Run and .sweep
from jpatch.engine.sweep import baseline_scores, check_memory_budget, finish, make_patches, sweep  # noqa: F401 (jpatch.patching.sweep)
from jpatch.model.gpt2 import Cache
from jpatch.model.types import Tokens


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


def read_clean_cache(model, corrupted_tokens, clean_cache, metric, attention_mask=None, buckets=False):
    """The common start of TransformerLens-shaped functions: the corrupted Run, its padding mask,
    the metric bound to the batch, the positions it reads and the clean logits there, taken from
    the clean cache's last residual stream (no clean forward). buckets: as `sweep`'s (False: none);
    when on, the clean logits have the shape bucket's rows (the last prompt's repeated)."""
    _, corrupted, mask = checked_inputs(model, None, corrupted_tokens, attention_mask)
    N, T = corrupted.tokens.shape
    metric = prepare_metric(metric, model.config.d_vocab, N, T, mask)
    read = metric.read_positions(N, T)
    stack = clean_cache.stacked("hook_resid_post")
    if stack.shape[1:3] != (N, T):
        raise ValueError(f"clean_cache holds activations of {tuple(stack.shape[1:3])} tokens, "
                         f"corrupted_tokens are {(N, T)}: they must have the same [batch, pos] shape")
    # Read on the host and unembedded in one compiled call of the bucket's shape: a new prompt shape
    # compiles no eager slicing or layer-norm steps.
    final = np.asarray(stack)[-1]
    if read is not None:
        final = np.take_along_axis(final, np.asarray(read)[..., None], axis=1)
    rows = bucketing.shape(model, (corrupted,), N, T, buckets)[0]  # N when buckets are off
    clean_logits = _unembed(model, jnp.asarray(bucketing.rows(final, rows)))
    return corrupted, mask, metric, read, clean_logits


@jax.jit
def _unembed(model, x):
    return model.unembed(x)


def tl_sweep(name, model, corrupted_tokens, clean_cache, metric, *, attention_mask=None, **kwargs):
    """The `get_act_patch_<name>` sweep (`SWEEPS[name]`: its site and result axes)."""
    site, axes = SWEEPS[name]
    bucket = kwargs.pop("buckets", None)
    corrupted, mask, metric, read, clean_logits = read_clean_cache(model, corrupted_tokens, clean_cache, metric,
                                                                   attention_mask, buckets=bucket)
    N, T = corrupted.tokens.shape
    patches, shape = make_patches(model.config, site, axes, T, N)
    check_base(corrupted)
    if kwargs.get("memory_budget") is not None:
        check_memory_budget(kwargs["memory_budget"])
    budget = kwargs.get("memory_budget") or plan.default_memory_budget()
    source = clean_cache.stacked(site)
    site_axes = model.sites[site].axes
    # The corrupted run and the clean cache's site padded to their shape bucket (`buckets`).
    NB, TB, (base,), metric = bucketing.padded(model, (corrupted,), metric, N, T, bucket)
    run_patches, run_shape, padded = patches, shape, Cache({site: source}, model.config.n_layer, table=model.sites)
    if (NB, TB) != (N, T):
        run_patches, run_shape = make_patches(model.config, site, axes, TB, NB)
        read = metric.read_positions(NB, TB)
        padded = Cache({site: jnp.asarray(bucketing.pad_stack(source, site_axes, NB, TB))}, model.config.n_layer,
                       table=model.sites)
    # The corrupted run's one forward: the engine's base stacks, the patched site, the logits.
    base_stacks, corrupted_logits = engine.cached_run(model, base, engine.base_sites(model) + (site,), budget,
                                                      read=read)
    raw = patch_scores(model, base, padded, run_patches, metric, clean_logits, base_stacks=base_stacks, prompts=N,
                       **kwargs)
    raw = bucketing.kept_scores(raw, run_shape, shape, N)
    clean_score = baseline_scores(metric, clean_logits, clean_logits, N)
    corrupted_score = baseline_scores(metric, corrupted_logits, clean_logits, N)
    raw = with_exact_no_ops(raw, patches, bucketing.cut_stack(base_stacks[site], site_axes, N, T),
                            np.asarray(source), corrupted_score)
    defined = applies(patches, prompt_lengths(mask, N, T))
    return finish(raw, defined if raw.ndim > 1 else defined.all(1), metric, clean_score, corrupted_score,
                  axes, shape, direction="denoise")


def get_act_patch_resid_pre(model, corrupted_tokens: Union[Tokens, Run], clean_cache: Cache, metric,
                            **kwargs) -> Float[np.ndarray, "layer pos"]:
    """[layer, pos]: the residual stream before each block."""
    return tl_sweep("resid_pre", model, corrupted_tokens, clean_cache, metric, **kwargs)


def get_act_patch_resid_mid(model, corrupted_tokens: Union[Tokens, Run], clean_cache: Cache, metric,
                            **kwargs) -> Float[np.ndarray, "layer pos"]:
    """[layer, pos]: the residual stream between attention and MLP."""
    return tl_sweep("resid_mid", model, corrupted_tokens, clean_cache, metric, **kwargs)


def get_act_patch_attn_out(model, corrupted_tokens: Union[Tokens, Run], clean_cache: Cache, metric,
                           **kwargs) -> Float[np.ndarray, "layer pos"]:
    """[layer, pos]: each attention layer's output."""
    return tl_sweep("attn_out", model, corrupted_tokens, clean_cache, metric, **kwargs)


def get_act_patch_mlp_out(model, corrupted_tokens: Union[Tokens, Run], clean_cache: Cache, metric,
                          **kwargs) -> Float[np.ndarray, "layer pos"]:
    """[layer, pos]: each MLP's output."""
    return tl_sweep("mlp_out", model, corrupted_tokens, clean_cache, metric, **kwargs)


def get_act_patch_attn_head_out_all_pos(model, corrupted_tokens: Union[Tokens, Run], clean_cache: Cache, metric,
                                        **kwargs) -> Float[np.ndarray, "layer head"]:
    """[layer, head]: each head's output (z) at every position."""
    return tl_sweep("attn_head_out_all_pos", model, corrupted_tokens, clean_cache, metric, **kwargs)


def get_act_patch_attn_head_q_all_pos(model, corrupted_tokens: Union[Tokens, Run], clean_cache: Cache, metric,
                                      **kwargs) -> Float[np.ndarray, "layer head"]:
    """[layer, head]: each head's queries at every position."""
    return tl_sweep("attn_head_q_all_pos", model, corrupted_tokens, clean_cache, metric, **kwargs)


def get_act_patch_attn_head_k_all_pos(model, corrupted_tokens: Union[Tokens, Run], clean_cache: Cache, metric,
                                      **kwargs) -> Float[np.ndarray, "layer head"]:
    """[layer, head]: each head's keys at every position."""
    return tl_sweep("attn_head_k_all_pos", model, corrupted_tokens, clean_cache, metric, **kwargs)


def get_act_patch_attn_head_v_all_pos(model, corrupted_tokens: Union[Tokens, Run], clean_cache: Cache, metric,
                                      **kwargs) -> Float[np.ndarray, "layer head"]:
    """[layer, head]: each head's values at every position."""
    return tl_sweep("attn_head_v_all_pos", model, corrupted_tokens, clean_cache, metric, **kwargs)


def get_act_patch_attn_head_pattern_all_pos(model, corrupted_tokens: Union[Tokens, Run], clean_cache: Cache, metric,
                                            **kwargs) -> Float[np.ndarray, "layer head"]:
    """[layer, head]: each head's attention pattern, whole."""
    return tl_sweep("attn_head_pattern_all_pos", model, corrupted_tokens, clean_cache, metric, **kwargs)


def get_act_patch_attn_head_out_by_pos(model, corrupted_tokens: Union[Tokens, Run], clean_cache: Cache, metric,
                                       **kwargs) -> Float[np.ndarray, "layer pos head"]:
    """[layer, pos, head]: each head's output (z) at one position."""
    return tl_sweep("attn_head_out_by_pos", model, corrupted_tokens, clean_cache, metric, **kwargs)


def get_act_patch_attn_head_q_by_pos(model, corrupted_tokens: Union[Tokens, Run], clean_cache: Cache, metric,
                                     **kwargs) -> Float[np.ndarray, "layer pos head"]:
    """[layer, pos, head]: each head's queries at one position."""
    return tl_sweep("attn_head_q_by_pos", model, corrupted_tokens, clean_cache, metric, **kwargs)


def get_act_patch_attn_head_k_by_pos(model, corrupted_tokens: Union[Tokens, Run], clean_cache: Cache, metric,
                                     **kwargs) -> Float[np.ndarray, "layer pos head"]:
    """[layer, pos, head]: each head's keys at one position."""
    return tl_sweep("attn_head_k_by_pos", model, corrupted_tokens, clean_cache, metric, **kwargs)


def get_act_patch_attn_head_v_by_pos(model, corrupted_tokens: Union[Tokens, Run], clean_cache: Cache, metric,
                                     **kwargs) -> Float[np.ndarray, "layer pos head"]:
    """[layer, pos, head]: each head's values at one position."""
    return tl_sweep("attn_head_v_by_pos", model, corrupted_tokens, clean_cache, metric, **kwargs)


def get_act_patch_attn_head_pattern_by_pos(model, corrupted_tokens: Union[Tokens, Run], clean_cache: Cache, metric,
                                           **kwargs) -> Float[np.ndarray, "layer head pos"]:
    """[layer, head, pos]: each head's attention pattern row of one query position."""
    return tl_sweep("attn_head_pattern_by_pos", model, corrupted_tokens, clean_cache, metric, **kwargs)


def get_act_patch_attn_head_pattern_dest_src_pos(model, corrupted_tokens: Union[Tokens, Run], clean_cache: Cache, metric,
                                                 **kwargs) -> Float[np.ndarray, "layer head pos pos"]:
    """[layer, head, pos, src]: one entry of each head's attention pattern."""
    return tl_sweep("attn_head_pattern_dest_src_pos", model, corrupted_tokens, clean_cache, metric, **kwargs)


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
    return lambda *args, **kwargs: tl_sweep(name, *args, **kwargs)


def get_act_patch_block_every(model, corrupted_tokens: Union[Tokens, Run], clean_cache: Cache, metric,
                              **kwargs) -> Float[np.ndarray, "3 layer pos"]:
    """[3, layer, pos]: resid_pre, attn_out, mlp_out."""
    return stack_every(_act_patch, "block_every", model, corrupted_tokens, clean_cache, metric, **kwargs)


def get_act_patch_attn_head_all_pos_every(model, corrupted_tokens: Union[Tokens, Run], clean_cache: Cache, metric,
                                          **kwargs) -> Float[np.ndarray, "5 layer head"]:
    """[5, layer, head]: output (z), q, k, v, pattern."""
    return stack_every(_act_patch, "attn_head_all_pos_every", model, corrupted_tokens, clean_cache, metric, **kwargs)


def get_act_patch_attn_head_by_pos_every(model, corrupted_tokens: Union[Tokens, Run], clean_cache: Cache, metric,
                                         **kwargs) -> Float[np.ndarray, "5 layer pos head"]:
    """[5, layer, pos, head]: output (z), q, k, v, pattern (pattern moved to [layer, pos, head])."""
    return stack_every(_act_patch, "attn_head_by_pos_every", model, corrupted_tokens, clean_cache, metric, **kwargs)
