"""Parts that more than one model family is built from: layer norm through its hook points,
activation functions, causal attention and rotary position embeddings.

Every function reports its activations through `edit(site, act) -> act` (the seam where
overrides, caching and the patching engine act); `no_edit` is the plain forward's.
"""

import math

import equinox as eqx
import jax
import jax.numpy as jnp

from jpatch.model import sites

ACTIVATIONS = {
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,  # SwiGLU's gate (Llama)
}


def no_edit(site, act):
    return act


def normalize(x, eps):
    """Layer norm without its affine part, computed in float32."""
    x = x.astype(jnp.float32)
    x = x - x.mean(-1, keepdims=True)
    return x * jax.lax.rsqrt((x * x).mean(-1, keepdims=True) + eps)


def normalize_hooked(x, eps, edit, name):
    """`normalize` through TransformerLens's hook points <name>.hook_scale [..., 1] and <name>.hook_normalized."""
    x = x.astype(jnp.float32)
    x = x - x.mean(-1, keepdims=True)
    scale = edit(f"{name}.hook_scale", jnp.sqrt((x * x).mean(-1, keepdims=True) + eps))
    return edit(f"{name}.hook_normalized", x / scale)


class LayerNorm(eqx.Module):
    weight: jax.Array
    bias: jax.Array

    def __call__(self, x, eps, edit=no_edit, name="ln"):
        return (normalize_hooked(x, eps, edit, name) * self.weight + self.bias).astype(x.dtype)


def rms_hooked(x, eps, edit, name):
    """RMS norm without its weight, in float32, through <name>.hook_scale [..., 1] and
    <name>.hook_normalized (TransformerLens's RMSNorm)."""
    x = x.astype(jnp.float32)
    scale = edit(f"{name}.hook_scale", jnp.sqrt((x * x).mean(-1, keepdims=True) + eps))
    return edit(f"{name}.hook_normalized", x / scale)


class RMSNorm(eqx.Module):
    weight: jax.Array

    def __call__(self, x, eps, edit=no_edit, name="ln"):
        return (rms_hooked(x, eps, edit, name) * self.weight).astype(x.dtype)


def split_inputs(x, n_head, edit):
    """The residual each head's q, k and v read, when `edit.split_inputs` asks for them (edge and
    path patching): a copy of x [..., d] per head, for each of q, k and v, through
    hook_q_input / hook_k_input / hook_v_input [..., n_head, d], which such an edit replaces
    (n_head: one count, or (query, key, value) heads under grouped-query attention, where the
    k and v inputs are per key-value head, as TransformerLens's).
    None otherwise: q, k and v all read x (one norm, one projection)."""
    if not getattr(edit, "split_inputs", False):
        return None
    counts = (n_head,) * 3 if isinstance(n_head, int) else n_head
    copies = lambda n: jnp.broadcast_to(x[..., None, :], x.shape[:-1] + (n, x.shape[-1]))
    return tuple(edit(name, copies(n)) for name, n in zip(sites.SPLIT_INPUT_SITES, counts))


def attention_inputs(x, ln, attn, n_head, eps, edit):
    """A block's start: x through hook_resid_pre, its first norm `ln` (hook points ln1.*) and
    `attn`'s q, k, v projections (hook_q / hook_k / hook_v), from each head's own input when `edit`
    splits them (`split_inputs`, n_head as there): (x, q, k, v)."""
    x = edit("hook_resid_pre", x)
    split = split_inputs(x, n_head, edit)
    if split is None:
        q, k, v = attn.qkv(ln(x, eps, edit, "ln1"))
    else:
        q, k, v = attn.qkv_per_head(*(ln(t, eps, edit, "ln1") for t in split))
    return x, edit("attn.hook_q", q), edit("attn.hook_k", k), edit("attn.hook_v", v)


class HeadProjections(eqx.Module):
    """The q, k, v and output projections of a family's `Attention`, whose fields are w_q, w_k, w_v
    [d_model, heads, d_head], b_q, b_k, b_v [heads, d_head] and w_o [n_head, d_head, d_model]
    (heads: n_head, or n_kv_head for k and v under grouped-query attention)."""

    def qkv(self, x):
        """x [..., d] -> q, k, v each [..., heads, d_head]."""
        project = lambda w, b: jnp.einsum("...d,dhe->...he", x, w) + b
        return project(self.w_q, self.b_q), project(self.w_k, self.b_k), project(self.w_v, self.b_v)

    def qkv_per_head(self, xq, xk, xv):
        """Each head's own inputs [..., heads, d] -> q, k, v each [..., heads, d_head]."""
        project = lambda x, w, b: jnp.einsum("...hd,dhe->...he", x, w) + b
        return project(xq, self.w_q, self.b_q), project(xk, self.w_k, self.b_k), project(xv, self.w_v, self.b_v)

    def out(self, z, edit=no_edit):
        """z [..., n_head, d_head] -> [..., d] without an output bias; per-head attn.hook_result
        [..., n_head, d] when `edit` wants it."""
        if not getattr(edit, "wants_result", False):
            return jnp.einsum("...he,hed->...d", z, self.w_o)
        return edit("attn.hook_result", jnp.einsum("...he,hed->...hd", z, self.w_o)).sum(-2)


def expand_kv(q, k):
    """Keys or values [..., K, n_kv, d] repeated to q's [..., n_head] heads: grouped-query
    attention's query head h reads key-value head h // (n_head / n_kv) (torch.repeat_interleave)."""
    n_head, n_kv = q.shape[-2], k.shape[-2]
    return k if n_kv == n_head else jnp.repeat(k, n_head // n_kv, axis=-2)


def in_window(query_pos, key_pos, window):
    """Which keys a query sees: causal, and within a sliding `window` of positions (None: all)."""
    seen = key_pos <= query_pos
    return seen if window is None else seen & (query_pos - key_pos < window)


def take_rows(a, rows):
    """a [batch, R, ...] at the rows `rows` [batch, r] of each prompt (None: a unchanged)."""
    return a if rows is None else jnp.take_along_axis(a, rows.reshape(rows.shape + (1,) * (a.ndim - 2)), axis=1)


def unembedding(x, w, bias, columns=None):
    """x [..., d] @ w [d, vocab] (+ bias) as float32 logits, or only at the vocabulary ids `columns`."""
    if columns is not None:
        w, bias = jnp.take(w, columns, axis=1), None if bias is None else jnp.take(bias, columns)
    logits = jnp.matmul(x, w, preferred_element_type=jnp.float32)
    return logits if bias is None else logits + bias.astype(jnp.float32)


def soft_cap(scores, cap):
    """cap * tanh(scores / cap) (Gemma 2's attention and final logits); None: unchanged."""
    return scores if cap is None else jnp.tanh(scores / cap) * cap


def causal_attention(q, k, v, key_mask=None, edit=no_edit, window=None, softcap=None):
    """q [..., T, H, d_head], k, v [..., T, H or n_kv, d_head] -> z [..., T, H, d_head]; key_mask
    [..., T] marks real tokens; window: a sliding window (a query sees the `window` positions up
    to its own), None for full causal attention; softcap: scores soft-capped (`soft_cap`).

    q and k are the ones attention scores (for a rotary family: after rotation)."""
    T = q.shape[-3]
    k, v = expand_kv(q, k), expand_kv(q, v)
    # Scores, softmax and the pattern-weighted sum accumulate in float32 even for bfloat16 weights.
    scores = jnp.einsum("...qhd,...khd->...hqk", q, k, preferred_element_type=jnp.float32) / math.sqrt(q.shape[-1])
    scores = soft_cap(scores, softcap)
    allowed = in_window(jnp.arange(T)[:, None], jnp.arange(T), window)
    if key_mask is not None:
        allowed = allowed & key_mask[..., None, None, :].astype(bool)
    scores = edit("attn.hook_attn_scores", jnp.where(allowed, scores, -jnp.inf))  # -inf as TransformerLens
    # A finite fill keeps fully masked rows (left padding) finite instead of NaN.
    scores = jnp.where(allowed, scores, jnp.finfo(jnp.float32).min)
    pattern = edit("attn.hook_pattern", jax.nn.softmax(scores, axis=-1))
    z = jnp.einsum("...hqk,...khd->...qhd", pattern, v, preferred_element_type=jnp.float32)
    return z.astype(q.dtype)


def rotary_frequencies(rotary_dim, base, llama3=None):
    """Rotary angles per position [rotary_dim // 2] in float32, as Hugging Face computes them.
    llama3: Llama 3.1's rope_scaling (factor, low_freq_factor, high_freq_factor,
    original_max_position_embeddings): long wavelengths slowed by `factor`, short ones kept, the
    band between interpolated (transformers' _compute_llama3_parameters)."""
    inv_freq = 1.0 / (base ** (jnp.arange(0, rotary_dim, 2, dtype=jnp.float32) / rotary_dim))
    if llama3 is None:
        return inv_freq
    factor, low, high, old_context = llama3
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_context / high) & ~(wavelen > old_context / low)
    return jnp.where(medium, smoothed, scaled)


def rotate(x, positions, rotary_dim, base, llama3=None):
    """Rotary position embedding of the first `rotary_dim` dims of each head, the two halves of
    those dims paired (GPT-NeoX's and Llama's layout, not interleaved): x [..., T, H, d_head],
    positions broadcastable to x's [..., T]. Angles in float32, as Hugging Face computes them
    (llama3: see `rotary_frequencies`)."""
    half = rotary_dim // 2
    inv_freq = rotary_frequencies(rotary_dim, base, llama3)  # [half]
    angles = jnp.asarray(positions, jnp.float32)[..., None, None] * inv_freq  # [..., T, 1, half]
    cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
    x1, x2, rest = x[..., :half], x[..., half:rotary_dim], x[..., rotary_dim:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], axis=-1)
