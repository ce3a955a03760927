"""TransformerLens's ActivationCache analysis helpers on a jpatch `Cache`: residual stream
stacks (accumulated, decomposed, per head), layer-norm scaling of a stack, direct logit
attribution and the logit lens. Each follows TransformerLens 3.9 on unprocessed weights
(no layer-norm folding): `apply_ln_to_stack` centres and divides by the cached scale only.

Call them as cache methods (`cache.accumulated_resid(...)`), as in TransformerLens.
"""

import jax.numpy as jnp
import numpy as np


def _pos(x, pos_slice, dim=-2):
    """TransformerLens's `Slice`: None (all), an int (drops the axis), a (start, stop[, step]) tuple,
    a slice or a list / array of positions."""
    if pos_slice is None:
        return x
    index = slice(*pos_slice) if isinstance(pos_slice, tuple) else pos_slice
    if not isinstance(index, (int, slice)):
        index = np.asarray(index)
    at = [slice(None)] * x.ndim
    at[dim] = index
    return x[tuple(at)]


def _layer(cache, layer):
    n = cache.n_layer
    layer = n if layer is None or layer == -1 else layer
    if not 0 <= layer <= n:
        raise ValueError(f"layer {layer} out of range [0, {n}] (n_layers means the unembedding)")
    return layer


def _model(cache):
    if cache.model is None:
        raise ValueError("this Cache has no model attached (it came from run_with_cache inside a transform, "
                         "or was built by hand); this helper needs the model's weights")
    return cache.model


def accumulated_resid(cache, layer=None, incl_mid=False, apply_ln=False, pos_slice=None, mlp_input=False,
                      return_labels=False):
    """The residual stream before each layer up to `layer` (and the final one when layer is
    None / -1 / n_layers): [components, batch, pos, d_model], labels "0_pre", ..., "final_post"."""
    layer = _layer(cache, layer)
    parts, labels = [], []
    for l in range(layer + 1):
        if l == cache.n_layer:
            parts.append(cache["resid_post", cache.n_layer - 1])
            labels.append("final_post")
            continue
        parts.append(cache["resid_pre", l])
        labels.append(f"{l}_pre")
        if (incl_mid and l < layer) or (mlp_input and l == layer):
            parts.append(cache["resid_mid", l])
            labels.append(f"{l}_mid")
    stack = jnp.stack([_pos(p, pos_slice) for p in parts])
    if apply_ln:
        stack = apply_ln_to_stack(cache, stack, layer, mlp_input=mlp_input, pos_slice=pos_slice,
                                  recompute_ln=layer == cache.n_layer)
    return (stack, labels) if return_labels else stack


def decompose_resid(cache, layer=None, mlp_input=False, mode="all", apply_ln=False, pos_slice=None,
                    incl_embeds=True, return_labels=False):
    """The input to `layer` as the embeddings plus each earlier attention and MLP output
    (mode "all", "attn" or "mlp"): [components, batch, pos, d_model]."""
    if mode not in ("all", "attn", "mlp"):
        raise ValueError(f"mode must be 'all', 'attn' or 'mlp', got {mode!r}")
    layer = _layer(cache, layer)
    parts, labels = [], []
    if incl_embeds:  # the position embedding for learned positions only, as TransformerLens
        with_pos = "hook_pos_embed" in cache.table
        parts += [cache["hook_embed"]] + ([cache["hook_pos_embed"]] if with_pos else [])
        labels += ["embed"] + ["pos_embed"] * with_pos
    for l in range(layer):
        if mode != "mlp":
            parts.append(cache["attn_out", l])
            labels.append(f"{l}_attn_out")
        if mode != "attn":
            parts.append(cache["mlp_out", l])
            labels.append(f"{l}_mlp_out")
    if mlp_input and mode != "mlp":
        parts.append(cache["attn_out", layer])
        labels.append(f"{layer}_attn_out")
    stack = jnp.stack([_pos(p, pos_slice) for p in parts])
    if apply_ln:
        stack = apply_ln_to_stack(cache, stack, layer, mlp_input=mlp_input, pos_slice=pos_slice)
    return (stack, labels) if return_labels else stack


def head_results(cache, layer):
    """Layer `layer`'s per-head outputs [batch, pos, head, d_model]: cached attn.hook_result or z @ W_O."""
    if "attn.hook_result" in cache.stacks:
        return cache["result", layer]
    return jnp.einsum("...hd,hdm->...hm", cache["z", layer], _model(cache).W_O[layer])


def stack_head_results(cache, layer=-1, return_labels=False, incl_remainder=False, pos_slice=None, apply_ln=False):
    """Every head's output before `layer`: [layer * n_heads (+1 remainder), batch, pos, d_model],
    labels "L0H0", ...; the remainder is resid_post[layer - 1] minus the heads' sum."""
    layer = _layer(cache, layer)
    labels = [f"L{l}H{h}" for l in range(layer) for h in range(cache["z", 0].shape[-2])]
    heads = [_pos(head_results(cache, l), pos_slice, dim=-3) for l in range(layer)]
    if heads:
        stack = jnp.moveaxis(jnp.concatenate(heads, axis=-2), -2, 0)
    else:
        stack = jnp.zeros((0, *_pos(cache["hook_embed"], pos_slice).shape), cache["hook_embed"].dtype)
    if incl_remainder:
        if layer == 0:
            raise ValueError("layer 0 has no heads before it and no resid_post to take a remainder of")
        remainder = _pos(cache["resid_post", layer - 1], pos_slice) - stack.sum(0)
        stack = jnp.concatenate([stack, remainder[None]])
        labels.append("remainder")
    if apply_ln:
        stack = apply_ln_to_stack(cache, stack, layer, pos_slice=pos_slice)
    return (stack, labels) if return_labels else stack


def apply_ln_to_stack(cache, residual_stack, layer=None, mlp_input=False, pos_slice=None, batch_slice=None,
                      has_batch_dim=True, recompute_ln=False):
    """Scale a stack of residual components [components, batch, pos, d_model] as the layer norm
    into `layer` (ln1, ln2 when mlp_input, ln_final for n_layers / None) scales the whole
    residual: centre each component and divide by the cached scale. recompute_ln (final layer
    only): apply the final layer norm, weights included, to each component on its own (logit lens)."""
    layer = _layer(cache, layer)
    if mlp_input and layer == cache.n_layer:
        raise ValueError("mlp_input applies to a layer's MLP; layer n_layers is the unembedding")
    stack = jnp.asarray(residual_stack)
    if has_batch_dim and batch_slice is not None:
        stack = _pos(stack, batch_slice, dim=1)
    if recompute_ln and layer == cache.n_layer:
        model = _model(cache)
        return model.ln_final(stack)
    if getattr(getattr(cache.model, "config", None), "normalization", "LN") == "LN":  # RMS norms do not centre
        stack = stack - stack.mean(-1, keepdims=True)
    name = "ln_final.hook_scale" if layer == cache.n_layer else f"blocks.{layer}.ln{2 if mlp_input else 1}.hook_scale"
    scale = _pos(cache[name], pos_slice)
    if batch_slice is not None and has_batch_dim:
        scale = _pos(scale, batch_slice, dim=0)
    return stack / scale


def logit_attrs(cache, residual_stack, tokens, incorrect_tokens=None, pos_slice=None, batch_slice=None,
                has_batch_dim=True):
    """Direct logit attribution: each component of `residual_stack`, scaled by the final layer
    norm's cached scale, dotted with the unembedding of `tokens` (minus that of `incorrect_tokens`):
    [components, *batch_and_pos]."""
    model = _model(cache)
    directions = model.tokens_to_residual_directions(tokens)
    if incorrect_tokens is not None:
        wrong = model.tokens_to_residual_directions(incorrect_tokens)
        if wrong.shape != directions.shape:
            raise ValueError(f"tokens and incorrect_tokens must have the same shape, got {directions.shape[:-1]} "
                             f"and {wrong.shape[:-1]}")
        directions = directions - wrong
    scaled = apply_ln_to_stack(cache, residual_stack, -1, pos_slice=pos_slice, batch_slice=batch_slice,
                               has_batch_dim=has_batch_dim)
    return (scaled * directions).sum(-1)


def logit_lens(cache, pos_slice=None, incl_mid=False, return_labels=False):
    """The logit lens: every layer's residual stream through the final layer norm and the
    unembedding, [layers + 1, batch, pos, d_vocab] (pos_slice picks positions first: memory)."""
    model = _model(cache)
    stack, labels = accumulated_resid(cache, None, incl_mid=incl_mid, apply_ln=True, pos_slice=pos_slice,
                                      return_labels=True)
    logits = (stack.astype(model.dtype) @ model.W_U).astype(jnp.float32) + model.b_U
    return (logits, labels) if return_labels else logits
