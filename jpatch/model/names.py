"""TransformerLens's `utils.get_act_name`, so notebooks that build hook names keep working."""

import re

_LAYER_TYPE_ALIAS = {"a": "attn", "m": "mlp", "b": "", "block": "", "blocks": "", "attention": "attn"}
_ACT_NAME_ALIAS = {
    "attn": "pattern",
    "attn_logits": "attn_scores",
    "key": "k",
    "query": "q",
    "value": "v",
    "mlp_pre": "pre",
    "mlp_mid": "mid",
    "mlp_post": "post",
}
_ATTN_NAMES = ("k", "v", "q", "z", "rot_k", "rot_q", "result", "pattern", "attn_scores")
_MLP_NAMES = ("pre", "post", "mid", "pre_linear")


def get_act_name(name, layer=None, layer_type=None):
    """Shorthand -> hook name, exactly as TransformerLens 3.9's `utils.get_act_name`.

    get_act_name("k", 6, "a") == "blocks.6.attn.hook_k"; get_act_name("pre", 2) == "blocks.2.mlp.hook_pre";
    get_act_name("embed") == "hook_embed"; get_act_name("normalized", 3, "ln2") == "blocks.3.ln2.hook_normalized";
    get_act_name("k6") == "blocks.6.attn.hook_k"; get_act_name("scale4ln1") == "blocks.4.ln1.hook_scale".
    The result is a name, not a check: `jpatch.sites.resolve` says whether the model has it.
    """
    if ("." in name or name.startswith("hook_")) and layer is None and layer_type is None:
        return name  # already a full name
    match = re.match(r"([a-z]+)(\d+)([a-z]?.*)", name)
    if match is not None:
        name, layer, layer_type = match.groups(0)
    name = _ACT_NAME_ALIAS.get(name, name)
    full = "" if layer is None else f"blocks.{layer}."
    if name in _ATTN_NAMES:
        layer_type = "attn"
    elif name in _MLP_NAMES:
        layer_type = "mlp"
    elif layer_type in _LAYER_TYPE_ALIAS:
        layer_type = _LAYER_TYPE_ALIAS[layer_type]
    if layer_type:
        full += f"{layer_type}."
    full += f"hook_{name}"
    if name in ("scale", "normalized") and layer is None:
        full = f"ln_final.{full}"
    return full


# --- TransformerLens's other utils that notebooks call ------------------------------------------


def to_numpy(tensor):
    """An array (JAX, numpy, torch, a list or tuple, a Python scalar or str) as a numpy array, as
    TransformerLens's `utils.to_numpy` (torch's bfloat16 read as float32)."""
    import numpy as np

    if isinstance(tensor, np.ndarray):
        return tensor
    if isinstance(tensor, (list, tuple)):
        return np.array(tensor)
    if hasattr(tensor, "detach") and hasattr(tensor, "cpu"):  # torch
        tensor = tensor.detach().cpu()
        return (tensor.float() if str(tensor.dtype) == "torch.bfloat16" else tensor).numpy()
    if isinstance(tensor, (int, float, bool, str)):
        return np.array(tensor)
    if hasattr(tensor, "__array__") and hasattr(tensor, "dtype"):  # a JAX array
        return np.asarray(tensor)
    raise ValueError(f"Input to to_numpy has invalid type: {type(tensor)}")


def get_device():
    """JAX's default device (a `jax.Device`: a GPU when JAX has one, else the CPU), for
    TransformerLens's `utils.get_device()`. jpatch models and arrays live there already: there is
    no `model.to(device)` to call."""
    import jax

    return jax.devices()[0]


def get_corner(tensor, n=3):
    """The top left corner [:n, :n, ...] of an array, as TransformerLens's `utils.get_corner`."""
    return tensor[tuple(slice(n) for _ in range(tensor.ndim))]


def einsum(equation, *operands):
    """fancy_einsum's `einsum(equation, *arrays)` (named axes, e.g. "batch pos d_model, d_model -> batch
    pos") on any arrays einops reads (JAX, numpy, torch): fancy_einsum itself refuses JAX arrays, so
    notebooks import this one instead (`from jpatch.utils import einsum`)."""
    import einops

    return einops.einsum(*operands, equation)
