"""Site names: TransformerLens hook names <-> (site, layer), and activation shapes.

A *site* is a hook name without its layer ("hook_resid_pre", "attn.hook_z");
a full name adds the layer ("blocks.3.attn.hook_z"). Sites outside the blocks
("hook_embed", "ln_final.hook_normalized") have no layer. `resolve` is the one
function that reads every spelling: short ("z"), site ("attn.hook_z"), full
("blocks.3.attn.hook_z"), TransformerLens shorthand ("z3", "scale4ln1") and
tuples as `cache["z", 3]` takes them.
"""

import re

from jpatch.model.names import get_act_name

# Every hook point of TransformerLens's GPT-2 block, in forward order.
LAYER_SITES = (
    "hook_resid_pre",
    "ln1.hook_scale",
    "ln1.hook_normalized",
    "attn.hook_q",
    "attn.hook_k",
    "attn.hook_v",
    "attn.hook_attn_scores",
    "attn.hook_pattern",
    "attn.hook_z",
    "attn.hook_result",
    "hook_attn_out",
    "hook_resid_mid",
    "ln2.hook_scale",
    "ln2.hook_normalized",
    "mlp.hook_pre",
    "mlp.hook_post",
    "hook_mlp_out",
    "hook_resid_post",
)
GLOBAL_SITES = ("hook_embed", "hook_pos_embed", "ln_final.hook_scale", "ln_final.hook_normalized", "unembed.hook_in",
                "unembed.hook_out")
ALL_SITES = LAYER_SITES + GLOBAL_SITES
HEAD_VECTOR_SITES = ("attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_z")
# [batch, pos, head, d_model]: computed only when a cache filter or an override asks for it.
ON_REQUEST_SITES = ("attn.hook_result",)
# The sites the patching engine sweeps (it patches them inside its packed rows).
SWEEP_SITES = (
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

# jpatch's own short name beside TransformerLens's shorthand (which spells it "normalized").
SHORT_NAMES = {"ln_final": "ln_final.hook_normalized"}

_FULL = re.compile(r"^blocks\.(-?\d+)\.(.+)$")


def unknown_site_error(name):
    return KeyError(
        f"unknown site {name!r}; valid sites: {', '.join(ALL_SITES)} "
        f"(per layer as 'blocks.{{layer}}.<site>'), or TransformerLens's short names "
        "(e.g. 'z', 'resid_pre', 'pattern', 'pre', 'scale', ('z', 3), 'z3', 'scale4ln1')"
    )


def resolve(name, n_layer=None):
    """Any spelling of a hook name -> (site, layer), layer None when the name has none.

    'z', 'attn.hook_z' -> ('attn.hook_z', None); 'blocks.3.attn.hook_z', ('z', 3), 'z3' ->
    ('attn.hook_z', 3); ('z', -1) counts from the last layer (needs n_layer).
    """
    if isinstance(name, tuple):
        if not 1 <= len(name) <= 3 or not isinstance(name[0], str):
            raise KeyError(f"a tuple key is (name, layer[, layer_type]), got {name!r}")
        layer = name[1] if len(name) > 1 else None
        if layer is not None and not isinstance(layer, int):
            raise KeyError(f"layer in {name!r} must be an int")
        site = SHORT_NAMES.get(name[0], name[0])
        if len(name) == 2 and layer is not None and site in LAYER_SITES:
            full = f"blocks.{layer}.{site}"  # ("attn.hook_z", 3)
        else:
            full = get_act_name(*name[:1], layer, *name[2:]) if layer is not None or len(name) > 2 else name[0]
    elif isinstance(name, str):
        full = name
    else:
        raise KeyError(f"a site name is a str or a (name, layer) tuple, got {type(name).__name__}: {name!r}")
    full = SHORT_NAMES.get(full, full)
    if full not in ALL_SITES and not _FULL.match(full):
        full = get_act_name(full)
    match = _FULL.match(full)
    if match is None:
        if full not in ALL_SITES:
            raise unknown_site_error(name)
        return full, None
    layer, site = int(match.group(1)), match.group(2)
    if site not in LAYER_SITES:
        raise unknown_site_error(name)
    if n_layer is not None:
        if layer < 0:
            layer += n_layer
        if not 0 <= layer < n_layer:
            raise KeyError(f"{name!r}: layer {match.group(1)} out of range, the model has {n_layer} layers")
    elif layer < 0:
        raise KeyError(f"{name!r}: a negative layer needs the model's layer count")
    return site, layer


class OneLayerName(KeyError, ValueError):
    """A one-layer name ('blocks.3.hook_resid_pre') where a site is expected: a KeyError for name
    lookups, a ValueError for the sweeps that take a site (they refuse it the same way)."""

    def __str__(self):
        return self.args[0]


def canonical(site, n_layer=None):
    """A site name without a layer, in any spelling ('z' / 'attn.hook_z') -> 'attn.hook_z'.

    The one resolver of a site where a site (not one layer's activation) is expected: sweeps,
    bulk, the command line. A one-layer name is refused, never silently read as its site (its layer
    is checked against n_layer first, when given)."""
    site_name, layer = resolve(site, n_layer)
    if layer is not None:
        raise OneLayerName(f"{site!r} names one layer; a site is expected here: pass the site {site_name!r} "
                           f"(add layers=[{layer}] to patch that layer only)")
    return site_name


def parse(name, n_layer=None):
    """A cache key -> (site, layer): 'blocks.3.attn.hook_z' / ('z', 3) -> ('attn.hook_z', 3);
    'hook_embed' -> ('hook_embed', None). A per-layer site needs its layer."""
    site, layer = resolve(name, n_layer)
    if site in LAYER_SITES and layer is None:
        raise KeyError(f"site {name!r} needs a layer: write 'blocks.{{layer}}.{site}' or ({name!r}, layer)")
    return site, layer


def full_name(site, layer=None):
    """A valid cache / override key: full_name('z', 3) == 'blocks.3.attn.hook_z'."""
    site = canonical(site)
    if layer is None:
        return site
    if site not in LAYER_SITES:
        raise KeyError(f"site {site!r} is outside the blocks and has no layer")
    return f"blocks.{int(layer)}.{site}"


def activation_shape(config, site, batch, pos):
    """Shape of one layer's activation at `site` for a [batch, pos] input."""
    site = canonical(site)
    if site in HEAD_VECTOR_SITES:
        return (batch, pos, config.n_head, config.d_head)
    if site in ("attn.hook_pattern", "attn.hook_attn_scores"):
        return (batch, config.n_head, pos, pos)
    if site == "attn.hook_result":
        return (batch, pos, config.n_head, config.d_model)
    if site.endswith("hook_scale"):
        return (batch, pos, 1)
    if site == "unembed.hook_out":
        return (batch, pos, config.d_vocab)
    if site.startswith("mlp."):
        return (batch, pos, config.d_mlp)
    return (batch, pos, config.d_model)
