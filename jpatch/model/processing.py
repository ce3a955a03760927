"""TransformerLens's weight processing, for notebooks that read weights and the residual stream.

TransformerLens's `from_pretrained` folds the layer norms' weights and biases into the weights that
read them, centres every weight that writes to the residual stream and the unembedding, and folds
the value biases into the output bias. The model computes the same log-probabilities (the logits
move by one constant per position when the unembedding is centred), but direct logit attribution,
the logit lens, `b_U`, the residual stream's values and hook_v / hook_z differ, and a notebook's
figures were computed on processed weights. `process_weights` gives the same processed model; jpatch
keeps weights unprocessed by default because centring the embedding changes its spread, and with it
the scale of the paper's Gaussian-noise corruption (3 x the embedding's standard deviation).

Every step is computed in float32 from TransformerLens-shaped weights (`model.W_Q`, ...) and written
back with the family's `with_tl_weights`; the math is in each function's docstring.
"""

import jax.numpy as jnp

STEPS = ("fold_ln", "center_writing_weights", "center_unembed", "fold_value_biases")
_TL_NAMES = ("W_E", "W_Q", "W_K", "W_V", "b_Q", "b_K", "b_V", "W_O", "b_O", "W_in", "b_in", "W_out", "b_out", "W_U",
             "b_U")


def tl_weights(model):
    """The model's weights in TransformerLens's shapes (float32), its layer norms as (weight, bias)."""
    w = {name: jnp.asarray(getattr(model, name), jnp.float32) for name in _TL_NAMES}
    w["W_pos"] = None if getattr(model, "W_pos", None) is None else jnp.asarray(model.W_pos, jnp.float32)
    for name, norm in model.layer_norms().items():
        w[name] = (jnp.asarray(norm.weight, jnp.float32), jnp.asarray(norm.bias, jnp.float32))
    return w


def _centred(x, axis):
    return x - x.mean(axis, keepdims=True)


def fold_ln(w):
    """LN(x) W + b = normalized(x) (diag(g) W) + (beta W + b): every reader's weights take the norm's
    gain g and its bias beta; each weight is then centred over d_model (a normalized input has mean
    0, so this changes nothing), and the norms keep unit gain and zero bias."""
    w = dict(w)
    (g1, b1), (g2, b2), (gf, bf) = w["ln1"], w["ln2"], w["ln_final"]
    for name in ("Q", "K", "V"):
        W = w[f"W_{name}"]  # [L, H, d, d_head]
        w[f"b_{name}"] = w[f"b_{name}"] + jnp.einsum("lhde,ld->lhe", W, b1)
        w[f"W_{name}"] = _centred(W * g1[:, None, :, None], 2)
    w["b_in"] = w["b_in"] + jnp.einsum("ldm,ld->lm", w["W_in"], b2)
    w["W_in"] = _centred(w["W_in"] * g2[:, :, None], 1)
    w["b_U"] = w["b_U"] + bf @ w["W_U"]
    w["W_U"] = _centred(w["W_U"] * gf[:, None], 0)
    for name in ("ln1", "ln2", "ln_final"):
        weight = w[name][0]
        w[name] = (jnp.ones_like(weight), jnp.zeros_like(weight))
    return w


def center_writing_weights(w):
    """Every write to the residual stream (embeddings, each head's W_O and b_O, each MLP's W_out and
    b_out) loses its mean over d_model: every reader normalizes first, so only the stream changes."""
    w = dict(w)
    for name in ("W_E", "W_pos", "W_O", "b_O", "W_out", "b_out"):
        if w[name] is not None:
            w[name] = _centred(w[name], -1)
    return w


def center_unembed(w):
    """W_U and b_U lose their mean over the vocabulary: the logits move by one constant per position."""
    return {**w, "W_U": _centred(w["W_U"], -1), "b_U": _centred(w["b_U"], -1)}


def fold_value_biases(w):
    """A head's pattern sums to 1, so its value bias adds the constant b_V W_O to the layer's output:
    b_O += sum_h b_V[h] W_O[h], and b_V = 0."""
    b_O = w["b_O"] + jnp.einsum("lhe,lhed->ld", w["b_V"], w["W_O"])
    return {**w, "b_O": b_O, "b_V": jnp.zeros_like(w["b_V"])}


def check_steps(chosen):
    """Refuse a processing setting that is not True or False (e.g. the string "False")."""
    for name, value in chosen.items():
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be True or False, got {value!r}")


_STEP_FUNCTIONS = {"fold_ln": fold_ln, "center_writing_weights": center_writing_weights,
                   "center_unembed": center_unembed, "fold_value_biases": fold_value_biases}


def process_weights(model, *, fold_ln=False, center_writing_weights=False, center_unembed=False,
                    fold_value_biases=False):
    """The model with TransformerLens's weight processing (its `from_pretrained` defaults: all True),
    in TransformerLens's order; all False returns the model itself. The result is for analysis in
    memory: `jpatch.save` keeps unprocessed weights only."""
    chosen = dict(fold_ln=fold_ln, center_writing_weights=center_writing_weights, center_unembed=center_unembed,
                  fold_value_biases=fold_value_biases)
    check_steps(chosen)
    if not any(chosen.values()):
        return model
    if not hasattr(model, "with_tl_weights"):
        raise ValueError(f"weight processing is not available for the {model.config.family!r} family")
    w = tl_weights(model)
    for name in STEPS:
        if chosen[name]:
            w = _STEP_FUNCTIONS[name](w)
    w = {k: None if v is None else (tuple(t.astype(model.dtype) for t in v) if isinstance(v, tuple)
                                    else v.astype(model.dtype)) for k, v in w.items()}
    return model.with_tl_weights(w)


def is_processed(model):
    """Whether the model went through `process_weights` (only processing sets an unembedding bias)."""
    return getattr(model, "b_u", None) is not None
