"""Site names: TransformerLens hook names <-> (site, layer), and activation shapes.

A *site* is a hook name without its layer ("hook_resid_pre", "attn.hook_z");
a full name adds the layer ("blocks.3.attn.hook_z"). Sites outside the blocks
("hook_embed", "ln_final.hook_normalized") have no layer.
"""

import re

LAYER_SITES = (
    "hook_resid_pre",
    "hook_resid_mid",
    "hook_resid_post",
    "hook_attn_out",
    "hook_mlp_out",
    "attn.hook_q",
    "attn.hook_k",
    "attn.hook_v",
    "attn.hook_z",
    "attn.hook_pattern",
)
GLOBAL_SITES = ("hook_embed", "hook_pos_embed", "ln_final.hook_normalized")
ALL_SITES = LAYER_SITES + GLOBAL_SITES
HEAD_VECTOR_SITES = ("attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_z")

# TransformerLens's short names (utils.get_act_name): "resid_pre", "z", "pattern", ...
SHORT_NAMES = {
    "resid_pre": "hook_resid_pre",
    "resid_mid": "hook_resid_mid",
    "resid_post": "hook_resid_post",
    "attn_out": "hook_attn_out",
    "mlp_out": "hook_mlp_out",
    "q": "attn.hook_q",
    "k": "attn.hook_k",
    "v": "attn.hook_v",
    "z": "attn.hook_z",
    "pattern": "attn.hook_pattern",
    "embed": "hook_embed",
    "pos_embed": "hook_pos_embed",
    "ln_final": "ln_final.hook_normalized",
}

_FULL = re.compile(r"^blocks\.(\d+)\.(.+)$")


def unknown_site_error(name):
    return KeyError(
        f"unknown site {name!r}; valid sites: {', '.join(ALL_SITES)} "
        f"(per layer as 'blocks.{{layer}}.<site>'), or the short names {', '.join(SHORT_NAMES)}"
    )


def canonical(site):
    """'z' / 'attn.hook_z' -> 'attn.hook_z'; raises KeyError listing the valid sites."""
    site = SHORT_NAMES.get(site, site)
    if site not in ALL_SITES:
        raise unknown_site_error(site)
    return site


def parse(name, n_layer=None):
    """'blocks.3.attn.hook_z' -> ('attn.hook_z', 3); 'hook_embed' -> ('hook_embed', None)."""
    match = _FULL.match(name)
    if match is None:
        site = canonical(name)
        if site in LAYER_SITES:
            raise KeyError(f"site {name!r} needs a layer: write 'blocks.{{layer}}.{site}'")
        return site, None
    layer, site = int(match.group(1)), match.group(2)
    if site not in LAYER_SITES:
        raise unknown_site_error(name)
    if n_layer is not None and layer >= n_layer:
        raise KeyError(f"{name!r}: layer {layer} out of range, the model has {n_layer} layers")
    return site, layer


def full_name(site, layer=None):
    return site if layer is None else f"blocks.{layer}.{site}"


def activation_shape(config, site, batch, pos):
    """Shape of one layer's activation at `site` for a [batch, pos] input."""
    site = canonical(site)
    if site in HEAD_VECTOR_SITES:
        return (batch, pos, config.n_head, config.d_head)
    if site == "attn.hook_pattern":
        return (batch, config.n_head, pos, pos)
    return (batch, pos, config.d_model)
