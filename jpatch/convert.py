"""Hugging Face GPT-2 weights -> jpatch `GPT2`.

The mapping is name for name (Hugging Face Conv1D weights are already [in, out]);
the per-layer tensors are stacked along a leading layer axis.
"""

import numpy as np
import jax.numpy as jnp

from jpatch.model import GPT2, GPT2Config, Attention, Block, LayerNorm, MLP


def config_from_hf(hf):
    """A Hugging Face GPT2Config (object or config.json dict) -> GPT2Config."""
    get = hf.get if isinstance(hf, dict) else lambda k, default=None: getattr(hf, k, default)
    d_model = get("n_embd")
    return GPT2Config(
        n_layer=get("n_layer"),
        n_head=get("n_head"),
        d_model=d_model,
        d_mlp=get("n_inner") or 4 * d_model,
        n_ctx=get("n_positions"),
        d_vocab=get("vocab_size"),
        layer_norm_eps=get("layer_norm_epsilon", 1e-5),
        activation=get("activation_function", "gelu_new"),
    )


def from_hf_state_dict(state, config, dtype=jnp.float32):
    """Build a `GPT2` from a Hugging Face GPT-2 state dict of NumPy arrays.

    Accepts GPT2LMHeadModel keys ("transformer.h.0...") and GPT2Model keys ("h.0...").
    Raises KeyError naming a missing tensor and ValueError naming a tensor whose
    shape does not match `config`.
    """
    state = {k.removeprefix("transformer."): v for k, v in state.items()}
    L, d, m, V = config.n_layer, config.d_model, config.d_mlp, config.d_vocab

    def get(name, shape):
        if name not in state:
            raise KeyError(f"tensor {name!r} is missing from the checkpoint")
        array = np.asarray(state[name])
        if array.shape != shape:
            raise ValueError(f"tensor {name!r} has shape {array.shape}, but the config needs {shape}")
        return jnp.asarray(array, dtype=dtype)

    def stack(suffix, shape):
        return jnp.stack([get(f"h.{i}.{suffix}", shape) for i in range(L)])

    if "lm_head.weight" in state and not np.array_equal(
        np.asarray(state["lm_head.weight"]), np.asarray(state["wte.weight"])
    ):
        raise ValueError("'lm_head.weight' differs from 'wte.weight': jpatch supports GPT-2's tied unembedding only")
    blocks = Block(
        ln_1=LayerNorm(stack("ln_1.weight", (d,)), stack("ln_1.bias", (d,))),
        attn=Attention(
            stack("attn.c_attn.weight", (d, 3 * d)),
            stack("attn.c_attn.bias", (3 * d,)),
            stack("attn.c_proj.weight", (d, d)),
            stack("attn.c_proj.bias", (d,)),
        ),
        ln_2=LayerNorm(stack("ln_2.weight", (d,)), stack("ln_2.bias", (d,))),
        mlp=MLP(
            stack("mlp.c_fc.weight", (d, m)),
            stack("mlp.c_fc.bias", (m,)),
            stack("mlp.c_proj.weight", (m, d)),
            stack("mlp.c_proj.bias", (d,)),
        ),
    )
    return GPT2(
        config,
        get("wte.weight", (V, d)),
        get("wpe.weight", (config.n_ctx, d)),
        blocks,
        LayerNorm(get("ln_f.weight", (d,)), get("ln_f.bias", (d,))),
    )
