"""Reading a Hugging Face state dict's tensors, checked, for the families' converters
(`neox_hf`, `llama_hf`, `gemma2_hf`)."""

import numpy as np
import jax.numpy as jnp


def tensor_reader(state, n_layer, dtype, prefix=""):
    """(get(name, shape) -> float32 NumPy, stack(suffix, shape, layout) -> [n_layer, ...] in `dtype`)
    over a state dict without the model's `prefix` ("model.", "gpt_neox."); a missing tensor is a
    KeyError naming it, a wrong shape or a non-finite value a ValueError naming it."""
    state = {k.removeprefix(prefix): v for k, v in state.items()}

    def get(name, shape):
        if name not in state:
            raise KeyError(f"tensor {name!r} is missing from the checkpoint")
        array = np.asarray(state[name], np.float32)
        if array.shape != shape:
            raise ValueError(f"tensor {name!r} has shape {array.shape}, but the config needs {shape}")
        if not np.isfinite(array).all():
            bad = int(array.size - np.isfinite(array).sum())
            raise ValueError(f"tensor {name!r} has {bad} non-finite value(s) (NaN or inf): a damaged checkpoint")
        return array

    def stack(suffix, shape, layout=lambda a: a):
        return jnp.asarray(np.stack([layout(get(f"layers.{i}.{suffix}", shape)) for i in range(n_layer)]), dtype)

    return get, stack
