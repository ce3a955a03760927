"""Hugging Face Gemma 2 -> jpatch `Gemma2`: the config, refused by field name where jpatch cannot
reproduce it exactly, and the weights (norms stored as 1 + w, the embedding scaled by
sqrt(d_model) as Hugging Face scales it in float32)."""

import numpy as np
import jax.numpy as jnp

from jpatch.model.gemma2 import LAYER_TYPES, Block, Gemma2, Gemma2Config
from jpatch.model.layers import RMSNorm
from jpatch.model.hf_tensors import tensor_reader
from jpatch.model.llama_hf import HF_CONFIG_KEYS, attention_from_hf, mlp_from_hf

HF_MODEL_TYPES = ("gemma2",)


def config_from_hf(hf):
    """A Hugging Face Gemma2Config (object or config.json dict) -> Gemma2Config; a setting jpatch
    does not reproduce exactly is refused with a ValueError naming it."""
    get = hf.get if isinstance(hf, dict) else lambda k, default=None: getattr(hf, k, default)
    if get("model_type") not in HF_MODEL_TYPES:
        raise ValueError(f"model_type={get('model_type')!r} is not Gemma 2")
    missing = [k for k in HF_CONFIG_KEYS if get(k) is None]
    if missing:
        raise ValueError(f"not a gemma2 config: missing {', '.join(missing)}")
    act = get("hidden_activation", get("hidden_act", "gelu_pytorch_tanh"))
    if act != "gelu_pytorch_tanh":
        raise ValueError(f"hidden_activation={act!r} is not implemented; Gemma 2's is gelu_pytorch_tanh")
    for name in ("attention_bias", "use_bidirectional_attention"):
        if get(name):
            raise ValueError(f"{name}={get(name)!r} is not implemented for Gemma 2")
    rope = dict(get("rope_parameters") or {})
    rope.update(get("rope_scaling") or {})
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind != "default":
        raise ValueError(f"rope_type={kind!r} is not implemented for Gemma 2 (only 'default')")
    n_layer, n_head, d_model = get("num_hidden_layers"), get("num_attention_heads"), get("hidden_size")
    types = get("layer_types") or ["sliding_attention" if l % 2 == 0 else "full_attention" for l in range(n_layer)]
    unknown = sorted(set(types) - set(LAYER_TYPES))
    if unknown:
        raise ValueError(f"layer_types {unknown} are not implemented for Gemma 2")
    return Gemma2Config(
        n_layer=n_layer, n_head=n_head, n_kv_head=get("num_key_value_heads") or n_head,
        d_head=get("head_dim") or d_model // n_head, d_model=d_model, d_mlp=get("intermediate_size"),
        n_ctx=get("max_position_embeddings", 8192), d_vocab=get("vocab_size"),
        layer_norm_eps=float(get("rms_norm_eps", 1e-6)), rotary_base=float(rope.get("rope_theta", get("rope_theta", 1e4))),
        sliding_window=get("sliding_window"), query_pre_attn_scalar=float(get("query_pre_attn_scalar", 256)),
        attn_softcap=get("attn_logit_softcapping"), final_softcap=get("final_logit_softcapping"),
        layer_types=tuple(types), default_prepend_bos=True)


def from_hf_state_dict(state, config, dtype=jnp.float32, tied=True):
    """Build a `Gemma2` from a Hugging Face Gemma2ForCausalLM state dict of NumPy arrays (missing,
    misshapen or non-finite tensors refused by name). tied: the unembedding is the embedding."""
    get, stack = tensor_reader(state, config.n_layer, dtype, "model.")
    d, V = config.d_model, config.d_vocab
    norm = lambda name: RMSNorm(stack(f"{name}.weight", (d,), lambda w: 1 + w))  # (1 + w), in float32 as HF
    blocks = Block(norm("input_layernorm"), attention_from_hf(stack, config, dtype), norm("post_attention_layernorm"),
                   norm("pre_feedforward_layernorm"), mlp_from_hf(stack, config), norm("post_feedforward_layernorm"),
                   jnp.asarray(config.windows(), jnp.int32))
    embed = get("embed_tokens.weight", (V, d))
    unembed = embed if tied else get("lm_head.weight", (V, d))
    scaled = embed * np.float32(d ** 0.5)  # Hugging Face: embedding * tensor(sqrt(d_model)) in float32
    final = RMSNorm(jnp.asarray(1 + get("norm.weight", (d,)), dtype))
    return Gemma2(config, jnp.asarray(scaled, dtype), blocks, final, jnp.asarray(unembed.T, dtype))
