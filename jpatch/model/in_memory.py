"""`jpatch.from_hf`: a jpatch model from a Hugging Face model already in memory (a transformers
model in a notebook, or its state dict and config), with the checks `jpatch convert` makes."""

import dataclasses

import jax.numpy as jnp
import numpy as np

from jpatch.model import convert
from jpatch.model.checkpoint import named_arrays, refuse_non_finite

DTYPES = ("float32", "bfloat16")


def from_hf(model_or_state_dict, config=None, *, dtype="float32", tokenizer_file=None):
    """A jpatch model (GPT-2, GPT-NeoX / Pythia: the config's `model_type`) from memory.

    model_or_state_dict: a transformers model (`GPT2LMHeadModel`, `GPTNeoXForCausalLM`, ...; its
    own config is used) or its `state_dict()` (torch tensors or NumPy arrays), then with `config`:
    the transformers config object or its dict. Refused, naming the field or tensor, as by
    `jpatch convert`: a config setting jpatch cannot reproduce exactly, a missing tensor or one of
    the wrong shape, a NaN or inf weight (checked after the cast to `dtype`).
    dtype: "float32" or "bfloat16". tokenizer_file: a tokenizer.json for families that carry their
    own tokenizer (GPT-NeoX), so that `to_tokens` works.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if hasattr(model_or_state_dict, "state_dict") and hasattr(model_or_state_dict, "config"):
        if config is not None:
            raise ValueError("pass a transformers model alone (its own config is used), or a state dict and a config")
        state, config = model_or_state_dict.state_dict(), model_or_state_dict.config
    elif isinstance(model_or_state_dict, dict):
        if config is None:
            raise ValueError("a state dict needs its config: from_hf(state_dict, model.config)")
        state = model_or_state_dict
    else:
        raise TypeError(f"expected a transformers model or a state dict, got {type(model_or_state_dict).__name__}")
    hf_config = config.to_dict() if hasattr(config, "to_dict") else config
    family, jp_config = convert.check_hf_config(hf_config, "the config")
    model = family.from_hf_state_dict({k: _numpy(v) for k, v in state.items()}, jp_config, jnp.dtype(dtype),
                                      convert.tied_unembedding(family, hf_config))
    refuse_non_finite(named_arrays(model), f"the state dict as {dtype}")
    if tokenizer_file is not None:
        if not hasattr(model, "tokenizer_file"):
            raise ValueError(f"{family.name} models use jpatch's GPT-2 tokenizer; tokenizer_file is for families "
                             "with their own (GPT-NeoX)")
        model = dataclasses.replace(model, tokenizer_file=str(tokenizer_file))
        model.tokenizer  # read now: a broken file is refused here, not at the first to_tokens
    return model


def _numpy(tensor):
    """A float32 NumPy copy of a torch tensor (bfloat16 included) or an array."""
    if hasattr(tensor, "detach"):
        tensor = tensor.detach().cpu()
        return tensor.float().numpy() if tensor.is_floating_point() else tensor.numpy()
    return np.asarray(tensor)
