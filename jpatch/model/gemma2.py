"""Gemma 2 on `jpatch.model.architecture`, built from the Llama family's parts: grouped-query
attention with rotary embeddings and a gated MLP (GeGLU, tanh gelu), plus Gemma 2's own: RMSNorms
both before and after attention and MLP (their (1 + w) weights stored as 1 + w), embeddings
scaled by sqrt(d_model) (stored scaled, as TransformerLens's W_E), scores scaled by
query_pre_attn_scalar**-0.5 and soft-capped, final logits soft-capped, and local (sliding
window) and global layers alternating. `jpatch.model.gemma2_hf` converts Hugging Face's
`Gemma2ForCausalLM`.
"""

import dataclasses
import math
from typing import ClassVar, Optional

import equinox as eqx
import jax
import jax.numpy as jnp

from jpatch.model import sites
from jpatch.model.layers import RMSNorm, no_edit, soft_cap, take_rows
from jpatch.model.llama import KV, Attention, Llama, LlamaConfig, MLP, attention_qkv

SITES = sites.SiteTable(
    "Gemma 2", tuple(s for s in sites.VOCABULARY if s != "hook_pos_embed"),
    sweep=("hook_resid_pre", "attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_pattern", "attn.hook_z",
           "hook_attn_out", "hook_resid_mid", "hook_mlp_out", "hook_resid_post"),
    on_request=("attn.hook_result",) + sites.READER_INPUT_SITES,
    axes={"attn.hook_k": KV, "attn.hook_v": KV, "attn.hook_rot_k": KV,
          "hook_k_input": ("batch", "pos", "kv_head", "d_model"), "hook_v_input": ("batch", "pos", "kv_head", "d_model")})
LAYER_TYPES = ("sliding_attention", "full_attention")


@dataclasses.dataclass(frozen=True)
class Gemma2Config(LlamaConfig):
    activation: str = "gelu_new"  # Hugging Face's gelu_pytorch_tanh
    query_pre_attn_scalar: float = 256.0  # scores are q.k / sqrt(query_pre_attn_scalar)
    attn_softcap: Optional[float] = 50.0
    final_softcap: Optional[float] = 30.0
    layer_types: Optional[tuple] = None  # per layer "sliding_attention" / "full_attention"; None: all full
    sites: ClassVar[object] = SITES
    family: ClassVar[str] = "gemma2"
    post_norms: ClassVar[bool] = True  # attention and MLP outputs normalized before the residual (edge graph)

    def __post_init__(self):
        if self.layer_types is not None:  # a JSON list -> a hashable tuple
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
        super().__post_init__()
        types = self.layer_types or ("full_attention",) * self.n_layer
        if len(types) != self.n_layer or not set(types) <= set(LAYER_TYPES):
            raise ValueError(f"layer_types must give each of the {self.n_layer} layers one of {LAYER_TYPES}, "
                             f"got {self.layer_types!r}")
        if "sliding_attention" in types and self.sliding_window is None:
            raise ValueError("sliding_attention layers need a sliding_window")
        for name in ("query_pre_attn_scalar", "attn_softcap", "final_softcap"):
            value = getattr(self, name)
            if value is not None and not 0 < value < math.inf:
                raise ValueError(f"{name} must be a finite number > 0 (or None for the caps), got {value!r}")

    def windows(self):
        """Each layer's window; a global layer's is n_ctx (a query sees every earlier key)."""
        types = self.layer_types or ("full_attention",) * self.n_layer
        return [self.sliding_window if t == "sliding_attention" else self.n_ctx for t in types]


class Block(eqx.Module):
    ln1: RMSNorm
    attn: Attention
    ln1_post: RMSNorm
    ln2: RMSNorm
    mlp: MLP
    ln2_post: RMSNorm
    window: jax.Array  # int32 scalar per layer: local layers' sliding window, n_ctx for global ones

    def __call__(self, x, positions, config, attend, edit=no_edit, rows=None):
        """One block on rows x [..., d] at `positions`: attention and MLP each between two norms; only
        the rows `rows` after attention."""
        eps = config.layer_norm_eps
        x, q, k, v = attention_qkv(self, x, positions, config, edit)
        # attend divides by sqrt(d_head): scaling q makes it sqrt(query_pre_attn_scalar)
        q_scaled = q * jnp.asarray(math.sqrt(config.d_head / config.query_pre_attn_scalar), q.dtype)
        z = edit("attn.hook_z", attend(q_scaled, k, v, window=self.window, softcap=config.attn_softcap))
        x, z = take_rows(x, rows), take_rows(z, rows)
        attn_out = edit("hook_attn_out", self.ln1_post(self.attn.out(z, edit), eps, edit, "ln1_post"))
        x = edit("hook_resid_mid", x + attn_out)
        mlp_in = edit("hook_mlp_in", x)
        mlp_out = self.mlp(self.ln2(mlp_in, eps, edit, "ln2"), config.activation, edit)
        mlp_out = edit("hook_mlp_out", self.ln2_post(mlp_out, eps, edit, "ln2_post"))
        return edit("hook_resid_post", x + mlp_out)


class Gemma2(Llama):
    """Gemma 2: `Llama`'s embedding, weight views and tokenizer, with its own blocks and capped logits.
    embed_in holds the embedding times sqrt(d_model) (TransformerLens's W_E); unembed_w the plain one."""

    blocks: Block

    @classmethod
    def init(cls, config, *, key, std=0.02, dtype=jnp.float32):
        """Random weights (normal(0, std) weights, unit norms)."""
        base = Llama.init(config, key=key, std=std, dtype=dtype)
        b, L, d = base.blocks, config.n_layer, config.d_model
        ones = lambda: jnp.ones((L, d), dtype)
        blocks = Block(b.ln1, b.attn, RMSNorm(ones()), b.ln2, b.mlp, RMSNorm(ones()),
                       jnp.asarray(config.windows(), jnp.int32))
        return cls(config, base.embed_in, blocks, base.final_norm, base.unembed_w)

    def unembed(self, x, edit=no_edit, columns=None):
        """Final RMSNorm, the unembedding (unembed.hook_out) and the final soft cap: float32 logits
        (at the ids `columns` when given)."""
        return soft_cap(super().unembed(x, edit, columns), self.config.final_softcap)

    def position_qk(self, q, k, positions):
        raise ValueError("the QK fix (atp-qk, atp*) of q / k recomputes plain causal patterns: not implemented for "
                         "Gemma 2 (soft-capped scores, sliding windows)")

    def layer_norms(self):
        return {"ln1": self.blocks.ln1, "ln1_post": self.blocks.ln1_post, "ln2": self.blocks.ln2,
                "ln2_post": self.blocks.ln2_post, "ln_final": self.final_norm}
