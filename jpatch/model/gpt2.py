"""GPT-2 as a pure function of (params, tokens, overrides): a family on `jpatch.model.architecture`.

Weights follow the Hugging Face GPT-2 layout (Conv1D weights are [in, out],
the unembedding is tied to `wte`); blocks are stacked along a leading layer
axis and run with `jax.lax.scan`. An override is data, not a hook: for a site
it gives a mask of the entries to replace and the values to put there, so
`jax.vmap` over a stack of overrides runs many patched forwards in one call.
"""

import dataclasses
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp

from jpatch.model import sites, views
from jpatch.model.architecture import Cache, Config, Transformer, editor, override_from_cache, record_sites  # noqa: F401
from jpatch.model.interventions import Override  # noqa: F401  (re-exported: jpatch.model.Override)
from jpatch.model.layers import (ACTIVATIONS, LayerNorm, causal_attention, no_edit, normalize,  # noqa: F401
                                 normalize_hooked, split_inputs, take_rows, unembedding)

# Every hook point of TransformerLens's GPT-2, and the ones the engine sweeps.
SITES = sites.SiteTable(
    "GPT-2", sites.ALL_SITES + sites.READER_INPUT_SITES,
    sweep=("hook_resid_pre", "attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_pattern", "attn.hook_z",
           "hook_attn_out", "hook_resid_mid", "hook_mlp_out", "hook_resid_post"),
    on_request=("attn.hook_result",) + sites.READER_INPUT_SITES)


@dataclasses.dataclass(frozen=True)
class GPT2Config(Config):
    n_layer: int = 12
    n_head: int = 12
    d_model: int = 768
    d_mlp: int = 3072
    n_ctx: int = 1024
    d_vocab: int = 50257
    layer_norm_eps: float = 1e-5
    activation: str = "gelu_new"
    sites: ClassVar[object] = SITES  # the family's hook points
    parallel_block: ClassVar[bool] = False  # the MLP reads the attention's output (residual graph)
    family: ClassVar[str] = "gpt2"  # the registry's name (jpatch.model.families)


class Attention(eqx.Module):
    c_attn_w: jax.Array  # [d_model, 3 * d_model]: q, k, v, heads contiguous within each
    c_attn_b: jax.Array
    c_proj_w: jax.Array  # [d_model, d_model]
    c_proj_b: jax.Array

    def qkv(self, x, n_head):
        """x [..., d] -> q, k, v each [..., n_head, d_head]."""
        qkv = x @ self.c_attn_w + self.c_attn_b
        q, k, v = jnp.split(qkv, 3, axis=-1)
        split = lambda t: t.reshape(*t.shape[:-1], n_head, -1)
        return split(q), split(k), split(v)

    def qkv_per_head(self, xq, xk, xv):
        """Each head's own inputs [..., n_head, d] -> q, k, v each [..., n_head, d_head]."""
        H = xq.shape[-2]
        w = self.c_attn_w.reshape(self.c_attn_w.shape[0], 3, H, -1)
        b = self.c_attn_b.reshape(3, H, -1)
        return tuple(jnp.einsum("...hd,dhe->...he", x, w[:, i]) + b[i] for i, x in enumerate((xq, xk, xv)))

    def out(self, z, edit=no_edit):
        """z [..., n_head, d_head] -> [..., d]; per-head attn.hook_result [..., n_head, d] when `edit` wants it."""
        if not getattr(edit, "wants_result", False):
            return z.reshape(*z.shape[:-2], -1) @ self.c_proj_w + self.c_proj_b
        w = self.c_proj_w.reshape(z.shape[-2], z.shape[-1], -1)  # [n_head, d_head, d]
        result = edit("attn.hook_result", jnp.einsum("...hd,hdm->...hm", z, w))
        return result.sum(-2) + self.c_proj_b


class MLP(eqx.Module):
    c_fc_w: jax.Array  # [d_model, d_mlp]
    c_fc_b: jax.Array
    c_proj_w: jax.Array  # [d_mlp, d_model]
    c_proj_b: jax.Array

    def __call__(self, x, activation, edit=no_edit):
        pre = edit("mlp.hook_pre", x @ self.c_fc_w + self.c_fc_b)
        return edit("mlp.hook_post", ACTIVATIONS[activation](pre)) @ self.c_proj_w + self.c_proj_b


class Block(eqx.Module):
    ln_1: LayerNorm
    attn: Attention
    ln_2: LayerNorm
    mlp: MLP

    def __call__(self, x, positions, config, attend, edit=no_edit, rows=None):
        """One block on rows x [..., d] at `positions` (broadcastable to x's [...]; GPT-2's
        positions enter through the embedding, so its block does not read them); only the
        rows `rows` after attention (`layers.take_rows`).

        attend(q, k, v) -> z mixes positions (and applies the pattern edit);
        edit(site, activation) -> activation is where overrides and caching happen.
        Both are supplied by the caller, so the same block runs a plain forward
        and the patching engine's packed rows.
        """
        eps = config.layer_norm_eps
        x = edit("hook_resid_pre", x)
        split = split_inputs(x, config.n_head, edit)
        if split is None:
            q, k, v = self.attn.qkv(self.ln_1(x, eps, edit, "ln1"), config.n_head)
        else:
            q, k, v = self.attn.qkv_per_head(*(self.ln_1(t, eps, edit, "ln1") for t in split))
        q, k, v = edit("attn.hook_q", q), edit("attn.hook_k", k), edit("attn.hook_v", v)
        z = edit("attn.hook_z", attend(q, k, v))
        x, z = take_rows(x, rows), take_rows(z, rows)
        x = edit("hook_resid_mid", x + edit("hook_attn_out", self.attn.out(z, edit)))
        mlp_in = edit("hook_mlp_in", x)
        mlp_out = edit("hook_mlp_out", self.mlp(self.ln_2(mlp_in, eps, edit, "ln2"), config.activation, edit))
        return edit("hook_resid_post", x + mlp_out)

    __getitem__ = views.layer_view  # model.blocks[l]: TransformerLens's block l (weights, hook points)


class GPT2(Transformer):
    config: GPT2Config = eqx.field(static=True)
    wte: jax.Array  # [d_vocab, d_model], also the unembedding
    wpe: jax.Array  # [n_ctx, d_model]
    blocks: Block  # every leaf has a leading [n_layer] axis
    ln_f: LayerNorm
    # Set only by `jpatch.process_weights` (TransformerLens's processing unties and shifts the unembedding).
    w_u: jax.Array = None  # [d_model, d_vocab]; None: tied to wte
    b_u: jax.Array = None  # [d_vocab]; None: GPT-2 has none

    @classmethod
    def init(cls, config, *, key, std=0.02, dtype=jnp.float32):
        """Random weights as GPT-2 initialises them (normal(0, std) weights, zero biases)."""
        L, d, m = config.n_layer, config.d_model, config.d_mlp
        keys = iter(jax.random.split(key, 8))
        normal = lambda *shape: std * jax.random.normal(next(keys), shape, dtype)
        zeros = lambda *shape: jnp.zeros(shape, dtype)
        ones = lambda *shape: jnp.ones(shape, dtype)
        blocks = Block(
            ln_1=LayerNorm(ones(L, d), zeros(L, d)),
            attn=Attention(normal(L, d, 3 * d), zeros(L, 3 * d), normal(L, d, d), zeros(L, d)),
            ln_2=LayerNorm(ones(L, d), zeros(L, d)),
            mlp=MLP(normal(L, d, m), zeros(L, m), normal(L, m, d), zeros(L, d)),
        )
        return cls(config, normal(config.d_vocab, d), normal(config.n_ctx, d), blocks, LayerNorm(ones(d), zeros(d)))

    @views.carries(W_E=lambda m: m.W_E)
    def embed(self, tokens, positions, edit=no_edit):
        return edit("hook_embed", self.wte[tokens]) + edit("hook_pos_embed", self.wpe[positions])

    @views.carries(W_U=lambda m: m.W_U, b_U=lambda m: m.b_U)
    def unembed(self, x, edit=no_edit, columns=None):
        """Final layer norm and tied unembedding: [..., d] -> float32 logits [..., d_vocab] (or [..., C]
        at the ids `columns`)."""
        normalized = normalize_hooked(x, self.config.layer_norm_eps, edit, "ln_final")
        x = edit("unembed.hook_in", normalized * self.ln_f.weight + self.ln_f.bias)
        return edit("unembed.hook_out", unembedding(x, self.W_U, self.b_u, columns))

    # --- weights in TransformerLens's shapes -------------------------------------------

    def _heads(self, w):  # [L, d, H * d_head] -> [L, H, d, d_head]
        L, d, _ = w.shape
        return w.reshape(L, d, self.config.n_head, -1).transpose(0, 2, 1, 3)

    def _qkv(self, i):
        d = self.config.d_model
        return self._heads(self.blocks.attn.c_attn_w[..., i * d:(i + 1) * d])

    def _qkv_bias(self, i):
        d = self.config.d_model
        return self.blocks.attn.c_attn_b[..., i * d:(i + 1) * d].reshape(self.config.n_layer, self.config.n_head, -1)

    W_E = property(lambda self: self.wte, doc="[d_vocab, d_model]")
    W_pos = property(lambda self: self.wpe, doc="[n_ctx, d_model]")
    pos_embed = property(lambda self: views.Weights(W_pos=self.wpe), doc="TransformerLens's model.pos_embed.W_pos")
    W_U = property(lambda self: self.wte.T if self.w_u is None else self.w_u,
                   doc="[d_model, d_vocab] (tied to W_E unless processed)")
    b_U = property(lambda self: jnp.zeros(self.config.d_vocab, self.dtype) if self.b_u is None else self.b_u,
                   doc="[d_vocab]: zero (GPT-2 has none) unless processed")
    W_Q = property(lambda self: self._qkv(0), doc="[n_layers, n_heads, d_model, d_head]")
    W_K = property(lambda self: self._qkv(1), doc="[n_layers, n_heads, d_model, d_head]")
    W_V = property(lambda self: self._qkv(2), doc="[n_layers, n_heads, d_model, d_head]")
    b_Q = property(lambda self: self._qkv_bias(0), doc="[n_layers, n_heads, d_head]")
    b_K = property(lambda self: self._qkv_bias(1), doc="[n_layers, n_heads, d_head]")
    b_V = property(lambda self: self._qkv_bias(2), doc="[n_layers, n_heads, d_head]")
    W_O = property(lambda self: self.blocks.attn.c_proj_w.reshape(self.config.n_layer, self.config.n_head,
                                                                  self.config.d_head, self.config.d_model),
                   doc="[n_layers, n_heads, d_head, d_model]")
    b_O = property(lambda self: self.blocks.attn.c_proj_b, doc="[n_layers, d_model]")
    W_in = property(lambda self: self.blocks.mlp.c_fc_w, doc="[n_layers, d_model, d_mlp]")
    b_in = property(lambda self: self.blocks.mlp.c_fc_b, doc="[n_layers, d_mlp]")
    W_out = property(lambda self: self.blocks.mlp.c_proj_w, doc="[n_layers, d_mlp, d_model]")
    b_out = property(lambda self: self.blocks.mlp.c_proj_b, doc="[n_layers, d_model]")

    def layer_norms(self):
        """The layer norms by TransformerLens's names (each block's as [n_layer, d_model] stacks)."""
        return {"ln1": self.blocks.ln_1, "ln2": self.blocks.ln_2, "ln_final": self.ln_f}

    def with_tl_weights(self, w):
        """This model with weights given in TransformerLens's shapes (`processing.tl_weights`' keys)."""
        L, d = self.config.n_layer, self.config.d_model
        flat = lambda t: jnp.swapaxes(t, 1, 2).reshape(L, d, -1)  # [L, H, d, d_head] -> [L, d, H * d_head]
        attn = Attention(jnp.concatenate([flat(w["W_Q"]), flat(w["W_K"]), flat(w["W_V"])], -1),
                         jnp.concatenate([w[b].reshape(L, -1) for b in ("b_Q", "b_K", "b_V")], -1),
                         w["W_O"].reshape(L, -1, d), w["b_O"])
        blocks = Block(LayerNorm(*w["ln1"]), attn, LayerNorm(*w["ln2"]),
                       MLP(w["W_in"], w["b_in"], w["W_out"], w["b_out"]))
        return GPT2(self.config, w["W_E"], w["W_pos"], blocks, LayerNorm(*w["ln_final"]), w["W_U"], w["b_U"])

    @views.carries(w=lambda m: m.ln_f.weight, b=lambda m: m.ln_f.bias)
    def ln_final(self, x):
        """The final layer norm with its weights: [..., d_model] -> [..., d_model] float32."""
        return self.ln_f(x.astype(jnp.float32), self.config.layer_norm_eps)
