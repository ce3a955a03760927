"""Hugging Face Llama, Qwen 2 / 2.5, Qwen 3 and Mistral -> jpatch `Llama`: the config, refused
by field name where jpatch cannot reproduce it exactly, and the weights, from the
`*ForCausalLM` state-dict names into TransformerLens's per-head shapes."""

import numpy as np
import jax.numpy as jnp

from jpatch.model.hf_tensors import tensor_reader
from jpatch.model.llama import Attention, Block, Llama, LlamaConfig, MLP, RMSNorm

HF_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")
HF_CONFIG_KEYS = ("num_hidden_layers", "num_attention_heads", "hidden_size", "intermediate_size", "vocab_size")
LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def _rope(get):
    """(rope_theta, llama3 scaling or None) from transformers 5's rope_parameters or the older
    rope_theta + rope_scaling; any other rope type is refused."""
    rope = dict(get("rope_parameters") or {})
    scaling = get("rope_scaling")
    if scaling:
        rope = {**rope, **scaling}
    kind = rope.get("rope_type", rope.get("type", "default"))
    theta = float(rope.get("rope_theta", get("rope_theta", 10000.0)))
    if rope.get("partial_rotary_factor", get("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError(f"partial_rotary_factor={rope.get('partial_rotary_factor', get('partial_rotary_factor'))!r}"
                         " is not implemented: jpatch's Llama rotates every dim of a head")
    if kind == "default":
        return theta, None
    if kind != "llama3":
        raise ValueError(f"rope_type={kind!r} is not implemented; jpatch's Llama has 'default' and 'llama3'")
    missing = [k for k in LLAMA3_KEYS if rope.get(k) is None]
    if missing:
        raise ValueError(f"rope_type='llama3' without {', '.join(missing)}")
    return theta, tuple(float(rope[k]) for k in LLAMA3_KEYS)


def _window(get, model_type, n_layer):
    """The sliding window every layer uses (None: full attention); mixed layers are refused."""
    if model_type == "mistral":
        return get("sliding_window")
    if model_type == "llama":
        return None
    # Qwen: layer_types (or use_sliding_window from max_window_layers on) says which layers slide
    types = get("layer_types")
    if types is None:
        start = get("max_window_layers", n_layer) if get("use_sliding_window") else n_layer
        types = ["full_attention" if l < start else "sliding_attention" for l in range(n_layer)]
    if set(types) == {"full_attention"}:
        return None
    if set(types) == {"sliding_attention"} and get("sliding_window"):
        return get("sliding_window")
    raise ValueError(f"layer_types={list(types)!r} (use_sliding_window={get('use_sliding_window')!r}): sliding "
                     "windows on some layers only are not implemented for this family")


def config_from_hf(hf):
    """A Hugging Face Llama / Qwen2 / Qwen3 / Mistral config (object or config.json dict) ->
    LlamaConfig. A setting jpatch does not reproduce exactly is refused with a ValueError naming it."""
    get = hf.get if isinstance(hf, dict) else lambda k, default=None: getattr(hf, k, default)
    model_type = get("model_type")
    if model_type not in HF_MODEL_TYPES:
        raise ValueError(f"model_type={model_type!r} is not one of the Llama family's {', '.join(HF_MODEL_TYPES)}")
    missing = [k for k in HF_CONFIG_KEYS if get(k) is None]
    if missing:
        raise ValueError(f"not a {model_type} config: missing {', '.join(missing)}")
    if get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act={get('hidden_act')!r} is not implemented; the Llama family's MLP is SwiGLU (silu)")
    if get("mlp_bias", False):
        raise ValueError("mlp_bias=true is not implemented: jpatch's Llama MLP has no biases")
    # Qwen 2 has q/k/v biases by design (no config field); attention_bias elsewhere adds an output bias too
    if get("attention_bias", False):
        raise ValueError(f"attention_bias=true is not implemented for {model_type}")
    n_layer, n_head, d_model = get("num_hidden_layers"), get("num_attention_heads"), get("hidden_size")
    theta, llama3 = _rope(get)
    window = _window(get, model_type, n_layer)
    return LlamaConfig(
        n_layer=n_layer,
        n_head=n_head,
        n_kv_head=get("num_key_value_heads") or n_head,
        d_head=get("head_dim") or d_model // n_head,
        d_model=d_model,
        d_mlp=get("intermediate_size"),
        n_ctx=get("max_position_embeddings", 2048),
        d_vocab=get("vocab_size"),
        layer_norm_eps=float(get("rms_norm_eps", 1e-6)),
        rotary_base=theta,
        rope_llama3=llama3,
        qkv_bias=model_type == "qwen2",
        qk_norm=model_type == "qwen3",
        sliding_window=window,
        default_prepend_bos=model_type not in ("qwen2", "qwen3"),  # TransformerLens's
    )


def attention_from_hf(stack, config, dtype):
    """q/k/v/o projections (and Qwen 2's biases, Qwen 3's q/k norms) in TransformerLens's per-head shapes."""
    L, d, H, G, e = config.n_layer, config.d_model, config.n_head, config.n_kv_head, config.d_head
    heads = lambda n: lambda w: w.reshape(n, e, d).transpose(2, 0, 1)  # [n * e, d] -> [d, n, e]
    proj = lambda name, n: stack(f"self_attn.{name}.weight", (n * e, d), heads(n))
    bias = lambda name, n: (stack(f"self_attn.{name}.bias", (n * e,), lambda b: b.reshape(n, e)) if config.qkv_bias
                            else jnp.zeros((L, n, e), dtype))
    norm = lambda name: stack(f"self_attn.{name}.weight", (e,)) if config.qk_norm else None
    return Attention(proj("q_proj", H), proj("k_proj", G), proj("v_proj", G),
                     bias("q_proj", H), bias("k_proj", G), bias("v_proj", G),
                     stack("self_attn.o_proj.weight", (d, H * e), lambda w: w.T.reshape(H, e, d)),
                     norm("q_norm"), norm("k_norm"))


def mlp_from_hf(stack, config):
    linear = lambda name, shape: stack(f"mlp.{name}.weight", shape, np.transpose)
    d, m = config.d_model, config.d_mlp
    return MLP(linear("gate_proj", (m, d)), linear("up_proj", (m, d)), linear("down_proj", (d, m)))


def from_hf_state_dict(state, config, dtype=jnp.float32, tied=False):
    """Build a `Llama` from a Hugging Face *ForCausalLM state dict of NumPy arrays.

    Raises KeyError naming a missing tensor and ValueError naming a tensor whose shape does not
    match `config` or that holds non-finite values. tied: the unembedding is the embedding
    (`tie_word_embeddings`, as transformers reads it: lm_head.weight is then not used)."""
    get, stack = tensor_reader(state, config.n_layer, dtype, "model.")
    d, V = config.d_model, config.d_vocab
    blocks = Block(
        ln1=RMSNorm(stack("input_layernorm.weight", (d,))),
        attn=attention_from_hf(stack, config, dtype),
        ln2=RMSNorm(stack("post_attention_layernorm.weight", (d,))),
        mlp=mlp_from_hf(stack, config),
    )
    embed = get("embed_tokens.weight", (V, d))
    unembed = embed if tied else get("lm_head.weight", (V, d))
    return Llama(config, jnp.asarray(embed, dtype), blocks, RMSNorm(jnp.asarray(get("norm.weight", (d,)), dtype)),
                 jnp.asarray(unembed.T, dtype))
