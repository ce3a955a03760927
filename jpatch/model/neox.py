"""GPT-NeoX (Pythia) on `jpatch.model.architecture`: attention and MLP read the same residual
(parallel residual), rotary position embeddings on the first `rotary_dim` dims of each head,
an untied unembedding. Weights in TransformerLens's per-head shapes; `jpatch.model.families`
converts Hugging Face's `GPTNeoXForCausalLM` into them.
"""

import dataclasses
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp

from jpatch.model import sites, views
from jpatch.model.architecture import Config, Transformer
from jpatch.model.layers import (ACTIVATIONS, HeadProjections, LayerNorm, attention_inputs, no_edit, normalize_hooked,
                                 rotate, take_rows, unembedding)

# TransformerLens's NeoX hook points: GPT-2's without hook_pos_embed and hook_resid_mid (the block
# is parallel), with the rotated attn.hook_rot_q / attn.hook_rot_k.
SITES = sites.SiteTable(
    "GPT-NeoX", tuple(s for s in sites.VOCABULARY
                      if s not in ("hook_pos_embed", "hook_resid_mid") + sites.GATED_SITES + sites.POST_NORM_SITES),
    sweep=("hook_resid_pre", "attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_pattern", "attn.hook_z",
           "hook_attn_out", "hook_mlp_out", "hook_resid_post"),
    on_request=("attn.hook_result",) + sites.READER_INPUT_SITES)


@dataclasses.dataclass(frozen=True)
class NeoXConfig(Config):
    n_layer: int = 12
    n_head: int = 12
    d_model: int = 768
    d_mlp: int = 3072
    n_ctx: int = 2048
    d_vocab: int = 50304
    layer_norm_eps: float = 1e-5
    activation: str = "gelu"
    rotary_pct: float = 0.25
    rotary_base: float = 10000.0
    sites: ClassVar[object] = SITES  # the family's hook points
    parallel_block: ClassVar[bool] = True  # attention and MLP read the same input (residual graph)
    family: ClassVar[str] = "neox"  # the registry's name (jpatch.model.families)

    POSITIVE: ClassVar[tuple] = ("layer_norm_eps", "rotary_base")

    def __post_init__(self):
        super().__post_init__()
        if not 0 < self.rotary_pct <= 1 or self.rotary_dim < 2:
            raise ValueError(f"rotary_pct={self.rotary_pct!r} must be in (0, 1] and rotate at least 2 of "
                             f"the {self.d_head} dims of a head")

    @property
    def rotary_dim(self):
        """Rotated dims per head, as Hugging Face counts them (int(d_head * rotary_pct))."""
        return int(self.d_head * self.rotary_pct)


class Attention(HeadProjections):
    w_q: jax.Array  # [d_model, n_head, d_head]
    w_k: jax.Array
    w_v: jax.Array
    b_q: jax.Array  # [n_head, d_head]
    b_k: jax.Array
    b_v: jax.Array
    w_o: jax.Array  # [n_head, d_head, d_model]
    b_o: jax.Array  # [d_model]

    def out(self, z, edit=no_edit):
        """The heads' outputs summed (`HeadProjections.out`) plus the output bias."""
        return super().out(z, edit) + self.b_o


class MLP(eqx.Module):
    w_in: jax.Array  # [d_model, d_mlp]
    b_in: jax.Array
    w_out: jax.Array  # [d_mlp, d_model]
    b_out: jax.Array

    def __call__(self, x, activation, edit=no_edit):
        pre = edit("mlp.hook_pre", x @ self.w_in + self.b_in)
        return edit("mlp.hook_post", ACTIVATIONS[activation](pre)) @ self.w_out + self.b_out


def position_qk(config, q, k, positions):
    """q, k [..., T, H, d_head] as attention scores them: rotated at `positions`."""
    rot = lambda t: rotate(t, positions, config.rotary_dim, config.rotary_base)
    return rot(q), rot(k)


class Block(eqx.Module):
    ln1: LayerNorm
    attn: Attention
    ln2: LayerNorm
    mlp: MLP

    def __call__(self, x, positions, config, attend, edit=no_edit, rows=None):
        """One parallel block on rows x [..., d] at `positions` (broadcastable to x's [...]):
        attention and MLP both read the block's input, and both write to its output; only the rows
        `rows` after attention."""
        eps = config.layer_norm_eps
        x, q, k, v = attention_inputs(x, self.ln1, self.attn, config.n_head, eps, edit)
        q, k = position_qk(config, q, k, positions)
        q, k = edit("attn.hook_rot_q", q), edit("attn.hook_rot_k", k)
        z = edit("attn.hook_z", attend(q, k, v))
        x, z = take_rows(x, rows), take_rows(z, rows)
        attn_out = edit("hook_attn_out", self.attn.out(z, edit))
        mlp_in = edit("hook_mlp_in", x)
        mlp_out = edit("hook_mlp_out", self.mlp(self.ln2(mlp_in, eps, edit, "ln2"), config.activation, edit))
        return edit("hook_resid_post", mlp_out + attn_out + x)  # Hugging Face's order of the sum

    __getitem__ = views.layer_view  # model.blocks[l]: TransformerLens's block l (weights, hook points)


class NeoX(Transformer):
    config: NeoXConfig = eqx.field(static=True)
    embed_in: jax.Array  # [d_vocab, d_model]
    blocks: Block  # every leaf has a leading [n_layer] axis
    final_norm: LayerNorm
    unembed_w: jax.Array  # [d_model, d_vocab] (untied)
    tokenizer_file: str = eqx.field(static=True, default=None)  # tokenizer.json of the model's folder
    b_u: jax.Array = None  # [d_vocab]: set only by `jpatch.process_weights` (NeoX has none)
    KEY_SITE: ClassVar[str] = "attn.hook_rot_k"

    @classmethod
    def init(cls, config, *, key, std=0.02, dtype=jnp.float32):
        """Random weights (normal(0, std) weights, zero biases, unit norms)."""
        L, d, m, H, e = config.n_layer, config.d_model, config.d_mlp, config.n_head, config.d_head
        keys = iter(jax.random.split(key, 10))
        normal = lambda *shape: std * jax.random.normal(next(keys), shape, dtype)
        zeros = lambda *shape: jnp.zeros(shape, dtype)
        ones = lambda *shape: jnp.ones(shape, dtype)
        blocks = Block(
            ln1=LayerNorm(ones(L, d), zeros(L, d)),
            attn=Attention(normal(L, d, H, e), normal(L, d, H, e), normal(L, d, H, e), zeros(L, H, e),
                           zeros(L, H, e), zeros(L, H, e), normal(L, H, e, d), zeros(L, d)),
            ln2=LayerNorm(ones(L, d), zeros(L, d)),
            mlp=MLP(normal(L, d, m), zeros(L, m), normal(L, m, d), zeros(L, d)),
        )
        return cls(config, normal(config.d_vocab, d), blocks, LayerNorm(ones(d), zeros(d)),
                   normal(d, config.d_vocab))

    @property
    def tokenizer(self):
        """The model's tokenizer (`jpatch.model.hf_tokenizer.HFTokenizer`) from `tokenizer_file`, the
        tokenizer.json its folder carries (`jpatch.load` sets it; `jpatch convert` copies it from the source)."""
        if self.tokenizer_file is None:
            raise ValueError("this GPT-NeoX model has no tokenizer (its folder has no tokenizer.json): pass token "
                             "ids, or set one with dataclasses.replace(model, tokenizer_file='.../tokenizer.json')")
        from jpatch.model.hf_tokenizer import load_tokenizer

        return load_tokenizer(self.tokenizer_file)

    @views.carries(W_E=lambda m: m.W_E)
    def embed(self, tokens, positions, edit=no_edit):
        return edit("hook_embed", self.embed_in[tokens])

    @views.carries(W_U=lambda m: m.W_U, b_U=lambda m: m.b_U)
    def unembed(self, x, edit=no_edit, columns=None):
        """Final layer norm and the unembedding: [..., d] -> float32 logits [..., d_vocab] (or [..., C]
        at the ids `columns`)."""
        normalized = normalize_hooked(x, self.config.layer_norm_eps, edit, "ln_final")
        x = edit("unembed.hook_in", normalized * self.final_norm.weight + self.final_norm.bias)
        return edit("unembed.hook_out", unembedding(x, self.unembed_w, self.b_u, columns))

    def position_qk(self, q, k, positions):
        return position_qk(self.config, q, k, positions)

    def layer_norms(self):
        """The layer norms by TransformerLens's names (each block's as [n_layer, d_model] stacks)."""
        return {"ln1": self.blocks.ln1, "ln2": self.blocks.ln2, "ln_final": self.final_norm}

    def with_tl_weights(self, w):
        """This model with weights given in TransformerLens's shapes (`processing.tl_weights`' keys)."""
        heads = lambda t: jnp.moveaxis(t, 1, 2)  # [L, H, d, d_head] -> [L, d, H, d_head]
        attn = Attention(heads(w["W_Q"]), heads(w["W_K"]), heads(w["W_V"]), w["b_Q"], w["b_K"], w["b_V"], w["W_O"],
                         w["b_O"])
        blocks = Block(LayerNorm(*w["ln1"]), attn, LayerNorm(*w["ln2"]),
                       MLP(w["W_in"], w["b_in"], w["W_out"], w["b_out"]))
        return NeoX(self.config, w["W_E"], blocks, LayerNorm(*w["ln_final"]), w["W_U"], self.tokenizer_file,
                    w["b_U"])

    @views.carries(w=lambda m: m.final_norm.weight, b=lambda m: m.final_norm.bias)
    def ln_final(self, x):
        """The final layer norm with its weights: [..., d_model] -> [..., d_model] float32."""
        return self.final_norm(x.astype(jnp.float32), self.config.layer_norm_eps)

    # --- weights in TransformerLens's shapes -------------------------------------------
    W_E = property(lambda self: self.embed_in, doc="[d_vocab, d_model]")
    W_U = property(lambda self: self.unembed_w, doc="[d_model, d_vocab]")
    b_U = property(lambda self: jnp.zeros(self.config.d_vocab, self.dtype) if self.b_u is None else self.b_u,
                   doc="[d_vocab]: zero (NeoX has none) unless processed")
    W_Q = property(lambda self: jnp.moveaxis(self.blocks.attn.w_q, 2, 1), doc="[n_layers, n_heads, d_model, d_head]")
    W_K = property(lambda self: jnp.moveaxis(self.blocks.attn.w_k, 2, 1), doc="[n_layers, n_heads, d_model, d_head]")
    W_V = property(lambda self: jnp.moveaxis(self.blocks.attn.w_v, 2, 1), doc="[n_layers, n_heads, d_model, d_head]")
    b_Q = property(lambda self: self.blocks.attn.b_q, doc="[n_layers, n_heads, d_head]")
    b_K = property(lambda self: self.blocks.attn.b_k, doc="[n_layers, n_heads, d_head]")
    b_V = property(lambda self: self.blocks.attn.b_v, doc="[n_layers, n_heads, d_head]")
    W_O = property(lambda self: self.blocks.attn.w_o, doc="[n_layers, n_heads, d_head, d_model]")
    b_O = property(lambda self: self.blocks.attn.b_o, doc="[n_layers, d_model]")
    W_in = property(lambda self: self.blocks.mlp.w_in, doc="[n_layers, d_model, d_mlp]")
    b_in = property(lambda self: self.blocks.mlp.b_in, doc="[n_layers, d_mlp]")
    W_out = property(lambda self: self.blocks.mlp.w_out, doc="[n_layers, d_mlp, d_model]")
    b_out = property(lambda self: self.blocks.mlp.b_out, doc="[n_layers, d_model]")
