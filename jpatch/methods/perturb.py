"""Forward passes with perturbations, shared by attribution patching (attribution) and edge
attribution (edges): a forward whose recorded activations can be nudged by `eps` (their
gradients are the attribution), GradDrop's gradient scaling, and prompt-row chunking."""

import jax
import jax.numpy as jnp
import numpy as np

from jpatch.model.architecture import request_flags
from jpatch.model.layers import causal_attention

WRITES = ("hook_attn_out", "hook_mlp_out")  # a layer's writes to the residual stream (GradDrop)


@jax.custom_vjp
def _scale_grad(x, scale):
    """The identity whose backward pass multiplies the gradient by `scale` (GradDrop)."""
    return x


_scale_grad.defvjp(lambda x, scale: (x, scale), lambda scale, ct: (ct * scale.astype(ct.dtype), jnp.zeros_like(scale)))


def perturbed_forward(model, tokens, overrides, attention_mask, read_pos, eps, record=(), keep=None,
                      embed_shift=None):
    """The base run with `eps[site]` ([n_layer, *activation]) added at each site in `eps`
    (and `embed_shift` [rows, pos, d_model] added to the embeddings).

    The same embedding, blocks, attention and unembedding as the model's forward (through the
    `edit` callback), so d logits / d eps is the gradient with respect to the
    activations. keep [n_layer]: gradient scale of each layer's residual writes
    (GradDrop). Returns logits at `read_pos` ([rows, K, vocab]; all positions when
    None) and the activations of the sites in `record` ([n_layer, ...] each).
    """
    cfg = model.config
    key_mask = None if attention_mask is None else attention_mask.astype(bool)
    positions = model.positions(tokens, attention_mask)
    override = lambda site, act: act if overrides.get(site) is None else overrides[site](act, site)

    def step(x, per_layer):
        block, layer_eps, layer_keep = per_layer
        acts = {}

        def edit(name, act):
            if name in layer_eps:
                act = act + layer_eps[name].astype(act.dtype)
            if name in record:
                acts[name] = act
            if keep is not None and name in WRITES:
                act = _scale_grad(act, layer_keep)
            return act

        request_flags(edit, {*record, *layer_eps})
        attend = lambda q, k, v, **options: causal_attention(q, k, v, key_mask, edit, **options)
        return block(x, positions, cfg, attend, edit), acts

    x = model.embed(tokens, positions, override)
    x = x if embed_shift is None else x + embed_shift
    keep_xs = jnp.ones(cfg.n_layer) if keep is None else keep
    x, acts = jax.lax.scan(step, x.astype(model.dtype), (model.blocks, eps, keep_xs))
    if read_pos is not None:
        x = jnp.take_along_axis(x, read_pos[..., None], axis=1)
    return model.unembed(x), acts


def take_rows(tree, rows_slice, rows):
    """The rows `rows_slice` of every array in `tree` whose leading axis has `rows` entries."""
    return jax.tree_util.tree_map(lambda a: a[rows_slice] if np.ndim(a) and np.shape(a)[0] == rows else a, tree)


def row_chunks(model, metric, data, rows, n_read, row_bytes, memory_budget):
    """Slices of prompt rows that fit `memory_budget`; one slice for a metric that is a
    single number for the whole batch (it cannot be split)."""
    per_row = jax.eval_shape(lambda lg: metric.score(lg, lg, data), jax.ShapeDtypeStruct(
        (rows, n_read, model.config.d_vocab), jnp.float32)).shape == (rows,)
    chunk = max(1, min(rows, int(memory_budget // row_bytes))) if per_row else rows
    return [slice(start, start + chunk) for start in range(0, rows, chunk)]
