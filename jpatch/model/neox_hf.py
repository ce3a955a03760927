"""Hugging Face GPT-NeoX (Pythia) -> jpatch `NeoX`: the config, refused where jpatch cannot
reproduce it exactly, and the weights, from `GPTNeoXForCausalLM` state-dict names into
TransformerLens's per-head shapes."""

import numpy as np
import jax.numpy as jnp

from jpatch.model.hf_tensors import tensor_reader
from jpatch.model.layers import ACTIVATIONS
from jpatch.model.neox import NeoX, NeoXConfig, Attention, Block, LayerNorm, MLP

HF_CONFIG_KEYS = ("num_hidden_layers", "num_attention_heads", "hidden_size", "intermediate_size", "vocab_size")


def config_from_hf(hf):
    """A Hugging Face GPTNeoXConfig (object or config.json dict) -> NeoXConfig.

    A setting jpatch does not reproduce exactly is refused with a ValueError naming the field."""
    get = hf.get if isinstance(hf, dict) else lambda k, default=None: getattr(hf, k, default)
    missing = [k for k in HF_CONFIG_KEYS if get(k) is None]
    if missing:
        raise ValueError(f"not a GPT-NeoX config: missing {', '.join(missing)}")
    if get("use_parallel_residual", True) is not True:
        raise ValueError("use_parallel_residual=false: jpatch's GPT-NeoX runs the parallel block only")
    if get("attention_bias", True) is not True:
        raise ValueError("attention_bias=false: jpatch's GPT-NeoX expects the q/k/v and output biases")
    act = get("hidden_act", "gelu")
    if act not in ACTIVATIONS:
        raise ValueError(f"hidden_act={act!r} is not implemented; jpatch has {', '.join(ACTIVATIONS)}")
    rope = get("rope_parameters") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if get("rope_scaling"):
        raise ValueError(f"rope_scaling={get('rope_scaling')!r} is not implemented for GPT-NeoX")
    if rope_type != "default":
        raise ValueError(f"rope_parameters.rope_type={rope_type!r} is not implemented for GPT-NeoX (only 'default')")
    rotary_pct = rope.get("partial_rotary_factor", get("rotary_pct", 1.0))
    rotary_base = rope.get("rope_theta", get("rotary_emb_base", 10000))
    return NeoXConfig(
        n_layer=get("num_hidden_layers"),
        n_head=get("num_attention_heads"),
        d_model=get("hidden_size"),
        d_mlp=get("intermediate_size"),
        n_ctx=get("max_position_embeddings", 2048),
        d_vocab=get("vocab_size"),
        layer_norm_eps=get("layer_norm_eps", 1e-5),
        activation=act,
        rotary_pct=float(rotary_pct),
        rotary_base=float(rotary_base),
    )


def from_hf_state_dict(state, config, dtype=jnp.float32, tied=False):
    """Build a `NeoX` from a Hugging Face GPTNeoXForCausalLM state dict of NumPy arrays.

    Raises KeyError naming a missing tensor and ValueError naming a tensor whose shape does not
    match `config` or that holds non-finite values. tied: the checkpoint ties the unembedding to
    the embedding (`tie_word_embeddings`), so it may lack embed_out.weight."""
    state = {k.removeprefix("gpt_neox."): v for k, v in state.items()}
    L, d, m, V, H, e = (config.n_layer, config.d_model, config.d_mlp, config.d_vocab, config.n_head,
                        config.d_head)

    get, stack = tensor_reader(state, L, dtype)

    # query_key_value rows are laid out per head: [head, (q, k, v), d_head] x d_model.
    qkv_w = lambda j: lambda w: w.reshape(H, 3, e, d)[:, j].transpose(2, 0, 1)  # -> [d_model, H, d_head]
    qkv_b = lambda j: lambda b: b.reshape(H, 3, e)[:, j]
    attn = Attention(
        *(stack("attention.query_key_value.weight", (3 * d, d), qkv_w(j)) for j in range(3)),
        *(stack("attention.query_key_value.bias", (3 * d,), qkv_b(j)) for j in range(3)),
        stack("attention.dense.weight", (d, d), lambda w: w.T.reshape(H, e, d)),
        stack("attention.dense.bias", (d,)),
    )
    norm = lambda name: LayerNorm(stack(f"{name}.weight", (d,)), stack(f"{name}.bias", (d,)))
    blocks = Block(
        ln1=norm("input_layernorm"),
        attn=attn,
        ln2=norm("post_attention_layernorm"),
        mlp=MLP(stack("mlp.dense_h_to_4h.weight", (m, d), np.transpose), stack("mlp.dense_h_to_4h.bias", (m,)),
                stack("mlp.dense_4h_to_h.weight", (d, m), np.transpose), stack("mlp.dense_4h_to_h.bias", (d,))),
    )
    embed = get("embed_in.weight", (V, d))
    # Pythia's checkpoints name the unembedding embed_out; transformers 5 saves it as lm_head.
    head = next((n for n in ("embed_out.weight", "lm_head.weight") if n in state), None)
    unembed = embed if tied and head is None else get(head or "embed_out.weight", (V, d))
    final = LayerNorm(jnp.asarray(get("final_layer_norm.weight", (d,)), dtype),
                      jnp.asarray(get("final_layer_norm.bias", (d,)), dtype))
    return NeoX(config, jnp.asarray(embed, dtype), blocks, final, jnp.asarray(unembed.T, dtype))
