"""TransformerLens's Attribution_Patching_Demo, as jpatch functions with the notebook's names.

The demo's recipe: one forward and backward per run (`get_cache_fwd_and_bwd`: the activations
and the gradient of the metric at every hook point but the q / k / v inputs), then every
attribution read off three caches (clean, corrupted, the corrupted run's gradients):
attribution = corrupted_grad * (clean - corrupted), summed as each function says.

`get_caches_fwd_and_bwd` runs the clean and the corrupted prompts through ONE compiled forward and
backward, called once per run (stacking the runs in one batch would add the concatenation and a
split of every cached array to the program: more to compile, no faster warm); the metric is traced
once for the logit positions it reads, so only those are unembedded (the final norm's hook points
are then not cached). Every function below reads those caches, so the demo's attributions and its
`get_attr_patch_*_every` share that one forward and backward. Shapes and labels are the notebook's;
arrays are jax arrays.

As in the notebook, `attr_patch_head_path` scales each head's input gradient by the *gradient*
at ln1.hook_scale (`grad_cache["scale", layer, "ln1"]`), not by the forward scale.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from jpatch.engine.readout import is_user_callable, prepare_metric
from jpatch.model import backward, sites
from jpatch.model.architecture import Cache, record_sites
from jpatch.model.hooks import refuse_hooked


def filter_not_qkv_input(name):
    """The notebook's names_filter: every hook point but the q / k / v inputs."""
    return "_input" not in name


# Sites after the blocks: computed at the metric's read positions only, so not cached.
_FINAL = ("ln_final.", "unembed.")


class _Metric(eqx.Module):
    """The prepared metric as forward_backward's `value_of`: its data are arguments of the
    compiled program, its score part of the compile key."""

    score: object = eqx.field(static=True)  # the prepared metric's score: equal while it reads the same values
    data: dict

    def fn(self, logits):
        return self.score(logits, logits, self.data)


def _prepared(model, metric, batch, pos):
    """The metric bound to this batch and narrowed to the logit positions it reads (readout)."""
    prepared = prepare_metric(metric, model.config.d_vocab, batch, pos, None) if callable(metric) else None
    if prepared is None or not is_user_callable(prepared):
        raise TypeError("the attribution recipe takes metric(logits) -> scalar, a function of the logits as the "
                        f"demo's ioi_metric, got {type(metric).__name__}")
    k = pos if isinstance(prepared.positions, str) else np.shape(prepared.positions)[1]
    logits = jax.ShapeDtypeStruct((batch, k, model.config.d_vocab), jnp.float32)
    value = jax.eval_shape(_Metric(prepared.score, prepared.data).fn, logits).shape
    if value != ():
        raise ValueError(f"the metric must return a scalar (the demo's metric averages over prompts), got shape {value}")
    return prepared


def _run_caches(model, tokens_list, metric, names_filter):
    refuse_hooked(model, "the attribution recipe")
    pairs = [model.as_tokens(t, None) for t in tokens_list]
    if any(mask is not None for _, mask in pairs):
        raise ValueError("texts of different lengths (padded, with an attention_mask) are not supported by the "
                         "attribution recipe: the demo's metric reads position -1 of every prompt; pass prompts of "
                         "one length")
    tokens_list = [tokens for tokens, _ in pairs]
    shapes = {tuple(t.shape) for t in tokens_list}
    if len(shapes) != 1:
        raise ValueError(f"the runs' tokens must have one shape, got {sorted(shapes)}")
    for t in tokens_list:
        model.check_tokens(t)
    batch, pos = shapes.pop()
    prepared = _prepared(model, metric, batch, pos)
    n = model.config.n_layer
    record = frozenset(s for s in record_sites(names_filter, model.sites, n) if not s.startswith(_FINAL))
    read = None if isinstance(prepared.positions, str) else jnp.asarray(prepared.positions, jnp.int32)  # str: all
    keep = None
    if callable(names_filter):
        names = [sites.full_name(s, l) for s in record for l in (range(n) if s in sites.LAYER_AXES else [None])]
        keep = {name for name in names if names_filter(name)}
    value_of = _Metric(prepared.score, prepared.data)
    values, caches, grad_caches = [], [], []
    for tokens in tokens_list:
        value, _, stacks, grads = backward.forward_backward(model, tokens, None, read, record, value_of)
        values.append(value)  # read after both runs are dispatched
        caches.append(Cache(stacks, n, model, model.sites, keep=keep))
        grad_caches.append(Cache(grads, n, model, model.sites, keep=keep))
    return [float(v) for v in values], caches, grad_caches


def get_cache_fwd_and_bwd(model, tokens, metric, names_filter=filter_not_qkv_input):
    """The notebook's get_cache_fwd_and_bwd: (metric value, cache, grad_cache) of one forward and
    backward, the gradients those of `metric(logits)` (a scalar) at every cached hook point."""
    values, caches, grads = _run_caches(model, [tokens], metric, names_filter)
    return values[0], caches[0], grads[0]


class AttrCaches(tuple):
    """(clean_value, clean_cache, clean_grad_cache, corrupted_value, corrupted_cache,
    corrupted_grad_cache), also by those names."""

    __slots__ = ()
    _fields = ("clean_value", "clean_cache", "clean_grad_cache", "corrupted_value", "corrupted_cache",
               "corrupted_grad_cache")

    def __getattr__(self, name):
        if name in self._fields:
            return self[self._fields.index(name)]
        raise AttributeError(name)


def get_caches_fwd_and_bwd(model, clean_tokens, corrupted_tokens, metric, names_filter=filter_not_qkv_input):
    """get_cache_fwd_and_bwd of the clean and of the corrupted tokens (one compiled forward and
    backward, called for each): an `AttrCaches` (clean_value, clean_cache, clean_grad_cache,
    corrupted_value, corrupted_cache, corrupted_grad_cache)."""
    values, caches, grads = _run_caches(model, [clean_tokens, corrupted_tokens], metric, names_filter)
    return AttrCaches((values[0], caches[0], grads[0], values[1], caches[1], grads[1]))


# --- the notebook's functions on the caches ---------------------------------------------------


def head_names(cache, suffixes=("",)):
    """"L{layer}H{head}{suffix}" in (layer, head, suffix) order: the notebook's HEAD_NAMES (and
    HEAD_NAMES_QKV with suffixes "QKV")."""
    cfg = cache.model.config
    return [f"L{l}H{h}{s}" for l in range(cfg.n_layer) for h in range(cfg.n_head) for s in suffixes]


def _attr(clean, corrupted, grad):
    return grad * (clean - corrupted)


@eqx.filter_jit
def create_attention_attr(clean_cache, clean_grad_cache):
    """[batch, layer, head, dest, src]: pattern x its gradient."""
    return jnp.moveaxis(clean_cache.stacked("pattern") * clean_grad_cache.stacked("pattern"), 0, 1)


@eqx.filter_jit
def attr_patch_residual(clean_cache, corrupted_cache, corrupted_grad_cache):
    """([component, pos], labels): the accumulated residual stream (with resid_mid)."""
    clean, labels = clean_cache.accumulated_resid(-1, incl_mid=True, return_labels=True)
    stacks = [c.accumulated_resid(-1, incl_mid=True) for c in (corrupted_cache, corrupted_grad_cache)]
    return _attr(clean, *stacks).sum((1, 3)), labels


@eqx.filter_jit
def attr_patch_layer_out(clean_cache, corrupted_cache, corrupted_grad_cache):
    """([component, pos], labels): embeddings and each layer's attention and MLP outputs."""
    clean, labels = clean_cache.decompose_resid(-1, return_labels=True)
    stacks = [c.decompose_resid(-1) for c in (corrupted_cache, corrupted_grad_cache)]
    return _attr(clean, *stacks).sum((1, 3)), labels


@eqx.filter_jit
def attr_patch_head_out(clean_cache, corrupted_cache, corrupted_grad_cache):
    """([layer * head, pos], HEAD_NAMES): each head's output (attn.hook_result)."""
    stacks = [c.stack_head_results(-1) for c in (clean_cache, corrupted_cache, corrupted_grad_cache)]
    return _attr(*stacks).sum((1, 3)), head_names(clean_cache)


def _heads_first(stack):
    """[layer, batch, ..., head, x] (q / k / v / z) -> [layer * head, batch, ..., x]."""
    stack = jnp.moveaxis(stack, -2, 1)
    return stack.reshape((-1,) + stack.shape[2:])


def attr_patch_head_vector(clean_cache, corrupted_cache, corrupted_grad_cache, activation_name):
    """([layer * head, pos], HEAD_NAMES): a head's q, k, v or z ("q" / "k" / "v" / "z")."""
    if activation_name not in ("q", "k", "v", "z"):
        raise ValueError(f"activation_name must be 'q', 'k', 'v' or 'z', got {activation_name!r}")
    stacks = [c.stacked(activation_name) for c in (clean_cache, corrupted_cache, corrupted_grad_cache)]
    return _head_vector_attr(*stacks), head_names(clean_cache)


@eqx.filter_jit
def _head_vector_attr(clean, corrupted, grad):
    """Keyed by the stacks' shapes, not the name: q, k, v and z of equal shapes share one compile."""
    return _attr(*map(_heads_first, (clean, corrupted, grad))).sum((1, 3))


@eqx.filter_jit
def attr_patch_head_pattern(clean_cache, corrupted_cache, corrupted_grad_cache):
    """([layer * head, dest, src], HEAD_NAMES): each head's attention pattern."""
    stacks = [c.stacked("pattern") for c in (clean_cache, corrupted_cache, corrupted_grad_cache)]
    attr = _attr(*stacks).sum(1)  # [layer, head, dest, src]
    return attr.reshape((-1,) + attr.shape[2:]), head_names(clean_cache)


def _vector_grad_inputs(grad_cache):
    """[qkv, layer, batch, pos, head, d_model]: each head's q / k / v gradient through W_Q / W_K /
    W_V, times the gradient at ln1.hook_scale (the notebook's get_full_vector_grad_input)."""
    model = grad_cache.model
    if model.config.n_kv_head != model.config.n_head:
        raise ValueError("attr_patch_head_path needs one key / value head per head (no grouped-query attention)")
    scale = grad_cache.stacked("ln1.hook_scale")[..., 0]  # [layer, batch, pos]
    parts = [jnp.einsum("lbphd,lbp,lhmd->lbphm", grad_cache.stacked(name), scale, w)
             for name, w in (("q", model.W_Q), ("k", model.W_K), ("v", model.W_V))]
    return jnp.stack(parts)


@eqx.filter_jit
def attr_patch_head_path(clean_cache, corrupted_cache, corrupted_grad_cache):
    """([layer_end * head_end * qkv, layer_start * head_start, pos], end_labels, start_labels): the
    path from each head's output to each later head's q / k / v input (zero for an end head not
    after the start head's layer)."""
    L, H = clean_cache.n_layer, clean_cache.model.config.n_head
    grad_in = _vector_grad_inputs(corrupted_grad_cache)
    diff = clean_cache.stack_head_results(-1) - corrupted_cache.stack_head_results(-1)  # [(l h), b, p, m]
    diff = jnp.moveaxis(diff.reshape((L, H) + diff.shape[1:]), 1, 3)  # [layer, batch, pos, head, d_model]
    path = jnp.einsum("qlbphm,sbpgm->qlhsgp", grad_in, diff)
    later = jnp.arange(L)[None, :, None, None, None, None] > jnp.arange(L)[None, None, None, :, None, None]
    path = jnp.where(later, path, 0.0)
    path = jnp.transpose(path, (1, 2, 0, 3, 4, 5)).reshape(L * H * 3, L * H, -1)
    return path, head_names(clean_cache, "QKV"), head_names(clean_cache)


def attribution_cache(clean_cache, corrupted_cache, corrupted_grad_cache):
    """The notebook's attr_cache: corrupted_grad * (clean - corrupted) at every hook point the
    three caches share, as a cache."""
    shared = [s for s in corrupted_grad_cache.stacks if s in clean_cache.stacks and s in corrupted_cache.stacks]
    stacks = _attr_stacks(*[{s: c.stacks[s] for s in shared} for c in (clean_cache, corrupted_cache,
                                                                         corrupted_grad_cache)])
    return Cache(stacks, clean_cache.n_layer, clean_cache.model, clean_cache.table, keep=clean_cache.keep)


@eqx.filter_jit
def _attr_stacks(clean, corrupted, grad):
    return {s: _attr(clean[s], corrupted[s], grad[s]) for s in clean}


HEAD_PARTS = ("z", "q", "k", "v")  # then the pattern: the notebook's Output, Query, Key, Value, Pattern


@eqx.filter_jit
def block_every(attr_cache):
    """[3, layer, pos]: resid_pre, attn_out, mlp_out (the notebook's get_attr_patch_block_every)."""
    return jnp.stack([attr_cache.stacked(s).sum((1, 3)) for s in ("resid_pre", "attn_out", "mlp_out")])


@eqx.filter_jit
def attn_head_all_pos_every(attr_cache):
    """[5, layer, head]: output (z), q, k, v, pattern."""
    parts = [attr_cache.stacked(s).sum((1, 2, 4)) for s in HEAD_PARTS]
    return jnp.stack(parts + [attr_cache.stacked("pattern").sum((1, 3, 4))])


@eqx.filter_jit
def attn_head_by_pos_every(attr_cache):
    """[5, layer, pos, head]: output (z), q, k, v, pattern (by destination position)."""
    parts = [attr_cache.stacked(s).sum((1, 4)) for s in HEAD_PARTS]
    return jnp.stack(parts + [jnp.swapaxes(attr_cache.stacked("pattern").sum((1, 4)), 1, 2)])
