"""The Llama family on `jpatch.model.architecture`: Llama 3, Qwen 2 / 2.5, Qwen 3 and Mistral.

RMSNorm before attention and MLP (sequential block), rotary position embeddings on every dim of
a head (Llama 3.1's `rope_scaling` "llama3" optional), a SwiGLU MLP, grouped-query attention
(`n_kv_head` key-value heads, each shared by n_head / n_kv_head query heads), no biases. Variants
by config flag: q/k/v biases (Qwen 2), RMSNorm on each head's q and k (Qwen 3), a sliding
attention window (Mistral). Weights in TransformerLens's per-head shapes; k and v have
`n_kv_head` heads (TransformerLens's `_W_K` / `_W_V`). `jpatch.model.llama_hf` converts
Hugging Face's checkpoints.
"""

import dataclasses
from typing import ClassVar, Optional

import equinox as eqx
import jax
import jax.numpy as jnp

from jpatch.model import sites
from jpatch.model.architecture import Config, Transformer
from jpatch.model.layers import (ACTIVATIONS, HeadProjections, RMSNorm, attention_inputs, no_edit, rms_hooked, rotate,
                                 take_rows, unembedding)

KV = ("batch", "pos", "kv_head", "d_head")
# TransformerLens's hook points of a Llama block (hook_pre: the gate's, hook_pre_linear: the up
# projection's); k, v (and their per-head inputs) are per key-value head.
SITES = sites.SiteTable(
    "Llama", tuple(s for s in sites.VOCABULARY if s not in ("hook_pos_embed",) + sites.POST_NORM_SITES),
    sweep=("hook_resid_pre", "attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_pattern", "attn.hook_z",
           "hook_attn_out", "hook_resid_mid", "hook_mlp_out", "hook_resid_post"),
    on_request=("attn.hook_result",) + sites.READER_INPUT_SITES,
    axes={"attn.hook_k": KV, "attn.hook_v": KV, "attn.hook_rot_k": KV,
          "hook_k_input": ("batch", "pos", "kv_head", "d_model"), "hook_v_input": ("batch", "pos", "kv_head", "d_model")})


@dataclasses.dataclass(frozen=True)
class LlamaConfig(Config):
    n_layer: int = 16
    n_head: int = 32
    n_kv_head: Optional[int] = None  # key-value heads (grouped-query attention); None: n_head
    d_head: Optional[int] = None  # Hugging Face's head_dim (Qwen 3: not d_model / n_head); None: that
    d_model: int = 2048
    d_mlp: int = 8192
    n_ctx: int = 2048
    d_vocab: int = 128256
    layer_norm_eps: float = 1e-5  # rms_norm_eps
    activation: str = "silu"
    rotary_base: float = 10000.0
    # Llama 3.1's rope_scaling: (factor, low_freq_factor, high_freq_factor, original_max_position_embeddings)
    rope_llama3: Optional[tuple] = None
    qkv_bias: bool = False  # Qwen 2
    qk_norm: bool = False  # Qwen 3: RMSNorm over each head's q and k before rotary
    sliding_window: Optional[int] = None  # Mistral: a query sees the last `sliding_window` positions
    default_prepend_bos: bool = True  # TransformerLens's for the family (Qwen: False)
    sites: ClassVar[object] = SITES
    parallel_block: ClassVar[bool] = False
    normalization: ClassVar[str] = "RMS"  # TransformerLens's normalization_type (apply_ln_to_stack does not centre)
    family: ClassVar[str] = "llama"

    POSITIVE: ClassVar[tuple] = ("layer_norm_eps", "rotary_base")
    SIZES: ClassVar[tuple] = Config.SIZES + ("n_kv_head", "d_head")

    def __post_init__(self):
        if self.n_kv_head is None:
            object.__setattr__(self, "n_kv_head", self.n_head)
        if self.d_head is None and isinstance(self.n_head, int) and self.n_head > 0:
            object.__setattr__(self, "d_head", self.d_model // self.n_head)
        super().__post_init__()
        if self.rope_llama3 is not None:  # a JSON list from config.json -> a hashable tuple
            object.__setattr__(self, "rope_llama3", tuple(float(v) for v in self.rope_llama3))
            if len(self.rope_llama3) != 4 or min(self.rope_llama3) <= 0 or self.rope_llama3[1] >= self.rope_llama3[2]:
                raise ValueError(f"rope_llama3 must be (factor, low_freq_factor < high_freq_factor, original "
                                 f"context) > 0, got {self.rope_llama3}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head={self.n_head} is not a multiple of n_kv_head={self.n_kv_head}")
        if self.d_head % 2:
            raise ValueError(f"d_head={self.d_head} must be even (rotary embeddings pair its halves)")
        window = self.sliding_window
        if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
            raise ValueError(f"sliding_window must be None or an integer >= 1, got {window!r}")

    @property
    def d_mlp_in(self):
        return 2 * self.d_mlp  # gate and up projections

    n_key_value_heads = property(lambda self: self.n_kv_head)  # TransformerLens's name


class Attention(HeadProjections):
    w_q: jax.Array  # [d_model, n_head, d_head]
    w_k: jax.Array  # [d_model, n_kv_head, d_head]
    w_v: jax.Array
    b_q: jax.Array  # [n_head, d_head] (zero without qkv_bias)
    b_k: jax.Array  # [n_kv_head, d_head]
    b_v: jax.Array
    w_o: jax.Array  # [n_head, d_head, d_model]
    q_norm: Optional[jax.Array]  # [d_head] with qk_norm, else None
    k_norm: Optional[jax.Array]


class MLP(eqx.Module):
    w_gate: jax.Array  # [d_model, d_mlp]
    w_in: jax.Array  # [d_model, d_mlp] (Hugging Face's up_proj; TransformerLens's W_in)
    w_out: jax.Array  # [d_mlp, d_model]

    def __call__(self, x, activation, edit=no_edit):
        gate = edit("mlp.hook_pre", x @ self.w_gate)
        linear = edit("mlp.hook_pre_linear", x @ self.w_in)
        return edit("mlp.hook_post", ACTIVATIONS[activation](gate) * linear) @ self.w_out


def position_qk(config, q, k, positions):
    """q, k [..., T, heads, d_head] as attention scores them: rotated at `positions` (after the
    q / k norms, for a config with qk_norm: see `Block`)."""
    rot = lambda t: rotate(t, positions, config.d_head, config.rotary_base, config.rope_llama3)
    return rot(q), rot(k)


def head_norm(x, weight, eps):
    """Qwen 3's RMSNorm over each head's d_head dims (no hook points, as Hugging Face's)."""
    return (rms_hooked(x, eps, no_edit, "") * weight).astype(x.dtype)


def attention_qkv(block, x, positions, config, edit):
    """A block's start (`attention_inputs`), then Qwen 3's q / k norms and the rotation, through
    attn.hook_rot_q / hook_rot_k: (x, q, k, v), k and v per key-value head. Gemma 2's blocks too."""
    heads = (config.n_head, config.n_kv_head, config.n_kv_head)
    x, q, k, v = attention_inputs(x, block.ln1, block.attn, heads, config.layer_norm_eps, edit)
    if config.qk_norm:
        eps = config.layer_norm_eps
        q, k = head_norm(q, block.attn.q_norm, eps), head_norm(k, block.attn.k_norm, eps)
    q, k = position_qk(config, q, k, positions)
    return x, edit("attn.hook_rot_q", q), edit("attn.hook_rot_k", k), v


class Block(eqx.Module):
    ln1: RMSNorm
    attn: Attention
    ln2: RMSNorm
    mlp: MLP

    def __call__(self, x, positions, config, attend, edit=no_edit, rows=None):
        """One sequential block on rows x [..., d] at `positions`; only the rows `rows` after attention."""
        eps = config.layer_norm_eps
        x, q, k, v = attention_qkv(self, x, positions, config, edit)
        z = edit("attn.hook_z", attend(q, k, v, window=config.sliding_window))
        x, z = take_rows(x, rows), take_rows(z, rows)
        x = edit("hook_resid_mid", x + edit("hook_attn_out", self.attn.out(z, edit)))
        mlp_in = edit("hook_mlp_in", x)
        mlp_out = edit("hook_mlp_out", self.mlp(self.ln2(mlp_in, eps, edit, "ln2"), config.activation, edit))
        return edit("hook_resid_post", x + mlp_out)


class Llama(Transformer):
    config: LlamaConfig = eqx.field(static=True)
    embed_in: jax.Array  # [d_vocab, d_model]
    blocks: Block  # every leaf has a leading [n_layer] axis
    final_norm: RMSNorm
    unembed_w: jax.Array  # [d_model, d_vocab] (a copy of embed_in.T when tied)
    tokenizer_file: str = eqx.field(static=True, default=None)  # tokenizer.json of the model's folder
    KEY_SITE: ClassVar[str] = "attn.hook_rot_k"

    @classmethod
    def init(cls, config, *, key, std=0.02, dtype=jnp.float32):
        """Random weights (normal(0, std) weights, zero biases, unit norms)."""
        L, d, m, H, G, e = (config.n_layer, config.d_model, config.d_mlp, config.n_head, config.n_kv_head,
                            config.d_head)
        keys = iter(jax.random.split(key, 10))
        normal = lambda *shape: std * jax.random.normal(next(keys), shape, dtype)
        zeros = lambda *shape: jnp.zeros(shape, dtype)
        ones = lambda *shape: jnp.ones(shape, dtype)
        norm = ones(L, e) if config.qk_norm else None
        blocks = Block(
            ln1=RMSNorm(ones(L, d)),
            attn=Attention(normal(L, d, H, e), normal(L, d, G, e), normal(L, d, G, e), zeros(L, H, e),
                           zeros(L, G, e), zeros(L, G, e), normal(L, H, e, d), norm, norm),
            ln2=RMSNorm(ones(L, d)),
            mlp=MLP(normal(L, d, m), normal(L, d, m), normal(L, m, d)),
        )
        return cls(config, normal(config.d_vocab, d), blocks, RMSNorm(ones(d)), normal(d, config.d_vocab))

    @property
    def tokenizer(self):
        """The model's tokenizer (`jpatch.model.hf_tokenizer.HFTokenizer`) from `tokenizer_file`."""
        if self.tokenizer_file is None:
            raise ValueError("this Llama-family model has no tokenizer (its folder has no tokenizer.json): pass "
                             "token ids, or set one with dataclasses.replace(model, tokenizer_file='.../tokenizer.json')")
        from jpatch.model.hf_tokenizer import load_tokenizer

        return load_tokenizer(self.tokenizer_file)

    def embed(self, tokens, positions, edit=no_edit):
        return edit("hook_embed", self.embed_in[tokens])

    def unembed(self, x, edit=no_edit, columns=None):
        """Final RMSNorm and the unembedding: [..., d] -> float32 logits [..., d_vocab] (or [..., C] at
        the ids `columns`)."""
        normalized = rms_hooked(x, self.config.layer_norm_eps, edit, "ln_final")
        x = edit("unembed.hook_in", (normalized * self.final_norm.weight).astype(self.unembed_w.dtype))
        return edit("unembed.hook_out", unembedding(x, self.unembed_w, None, columns))

    def position_qk(self, q, k, positions):
        """q, k as attention scores them, for AtP*'s QK fix (which recomputes a full causal pattern)."""
        if self.config.qk_norm:  # the norms' weights differ by layer, and this has no layer
            raise ValueError("q / k attention scores of a Qwen 3 model (q/k norms) are not available outside its "
                             "blocks: the QK fix (atp-qk, atp*) of q / k is not implemented for it")
        window = self.config.sliding_window
        if window is not None and q.shape[-3] > window:
            raise ValueError(f"the QK fix (atp-qk, atp*) of q / k recomputes full causal patterns: not implemented "
                             f"for prompts of {q.shape[-3]} tokens, longer than the sliding window ({window})")
        return position_qk(self.config, q, k, positions)

    def layer_norms(self):
        """The RMS norms by TransformerLens's names (each block's as [n_layer, d_model] stacks)."""
        return {"ln1": self.blocks.ln1, "ln2": self.blocks.ln2, "ln_final": self.final_norm}

    _TL_ATTN = ("W_Q", "W_O", "b_Q", "b_O", "_W_K", "_W_V", "_b_K", "_b_V")  # TransformerLens's order
    _TL_MLP = ("W_in", "W_out", "W_gate", "b_in", "b_out")

    def named_parameters(self):
        """TransformerLens's listing (names, order, shapes, values): RMS norms have a weight only, k and
        v are listed as their n_kv originals (_W_K ...), as its grouped-query attention lists them."""
        norms = self.layer_norms()
        attn = {name: getattr(self, name) for name in self._TL_ATTN}
        mlp = {name: getattr(self, name) for name in self._TL_MLP}
        out = [("embed.W_E", self.W_E)]
        for l in range(self.config.n_layer):
            out += [(f"blocks.{l}.{ln}.w", norm.weight[l]) for ln, norm in norms.items() if ln != "ln_final"]
            out += [(f"blocks.{l}.attn.{name}", w[l]) for name, w in attn.items()]
            out += [(f"blocks.{l}.mlp.{name}", w[l]) for name, w in mlp.items()]
        return out + [("ln_final.w", norms["ln_final"].weight), ("unembed.W_U", self.W_U), ("unembed.b_U", self.b_U)]

    def ln_final(self, x):
        """The final RMSNorm with its weight: [..., d_model] -> [..., d_model] float32."""
        return self.final_norm(x.astype(jnp.float32), self.config.layer_norm_eps)

    def per_query_head(self, w):
        """A key-value weight [n_layers, n_kv, ...] repeated for each query head (TransformerLens's
        W_K / W_V of a grouped-query model; its _W_K / _W_V are the n_kv originals)."""
        return jnp.repeat(w, self.config.n_head // self.config.n_kv_head, axis=1)

    # --- weights in TransformerLens's shapes (W_K, W_V, b_K, b_V per query head, as its) -------
    W_E = property(lambda self: self.embed_in, doc="[d_vocab, d_model]")
    W_U = property(lambda self: self.unembed_w, doc="[d_model, d_vocab]")
    b_U = property(lambda self: jnp.zeros(self.config.d_vocab, self.dtype), doc="[d_vocab]: zero")
    W_Q = property(lambda self: jnp.moveaxis(self.blocks.attn.w_q, 2, 1), doc="[n_layers, n_heads, d_model, d_head]")
    W_K = property(lambda self: self.per_query_head(jnp.moveaxis(self.blocks.attn.w_k, 2, 1)),
                   doc="[n_layers, n_heads, d_model, d_head]")
    W_V = property(lambda self: self.per_query_head(jnp.moveaxis(self.blocks.attn.w_v, 2, 1)),
                   doc="[n_layers, n_heads, d_model, d_head]")
    _W_K = property(lambda self: jnp.moveaxis(self.blocks.attn.w_k, 2, 1), doc="[n_layers, n_kv, d_model, d_head]")
    _W_V = property(lambda self: jnp.moveaxis(self.blocks.attn.w_v, 2, 1), doc="[n_layers, n_kv, d_model, d_head]")
    b_Q = property(lambda self: self.blocks.attn.b_q, doc="[n_layers, n_heads, d_head]")
    b_K = property(lambda self: self.per_query_head(self.blocks.attn.b_k), doc="[n_layers, n_heads, d_head]")
    b_V = property(lambda self: self.per_query_head(self.blocks.attn.b_v), doc="[n_layers, n_heads, d_head]")
    _b_K = property(lambda self: self.blocks.attn.b_k, doc="[n_layers, n_kv, d_head]")
    _b_V = property(lambda self: self.blocks.attn.b_v, doc="[n_layers, n_kv, d_head]")
    W_O = property(lambda self: self.blocks.attn.w_o, doc="[n_layers, n_heads, d_head, d_model]")
    b_O = property(lambda self: jnp.zeros((self.config.n_layer, self.config.d_model), self.dtype),
                   doc="[n_layers, d_model]: zero")
    W_gate = property(lambda self: self.blocks.mlp.w_gate, doc="[n_layers, d_model, d_mlp]")
    W_in = property(lambda self: self.blocks.mlp.w_in, doc="[n_layers, d_model, d_mlp]")
    b_in = property(lambda self: jnp.zeros((self.config.n_layer, self.config.d_mlp), self.dtype), doc="zero")
    W_out = property(lambda self: self.blocks.mlp.w_out, doc="[n_layers, d_mlp, d_model]")
    b_out = property(lambda self: jnp.zeros((self.config.n_layer, self.config.d_model), self.dtype), doc="zero")
