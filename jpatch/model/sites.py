"""Site names: TransformerLens hook names <-> (site, layer), and activation shapes.

A *site* is a hook name without its layer ("hook_resid_pre", "attn.hook_z");
a full name adds the layer ("blocks.3.attn.hook_z"). Sites outside the blocks
("hook_embed", "ln_final.hook_normalized") have no layer. `resolve` is the one
function that reads every spelling: short ("z"), site ("attn.hook_z"), full
("blocks.3.attn.hook_z"), TransformerLens shorthand ("z3", "scale4ln1") and
tuples as `cache["z", 3]` takes them.
"""

import re
from typing import NamedTuple

from jpatch.model.names import get_act_name

D, HEADS, SCALE = ("batch", "pos", "d_model"), ("batch", "pos", "head", "d_head"), ("batch", "pos", "one")
SCORES = ("batch", "head", "query", "key")
# Every hook point a family's block may have, in forward order, with its axes as TransformerLens
# defines the name (one meaning per name, in every family). Which of them a family has, and which
# the engine sweeps there, is the family's `SiteTable`.
LAYER_AXES = {
    "hook_resid_pre": D,
    "hook_q_input": ("batch", "pos", "head", "d_model"),  # each head's q / k / v input (edge and path
    "hook_k_input": ("batch", "pos", "head", "d_model"),  # patching replace them; TransformerLens's
    "hook_v_input": ("batch", "pos", "head", "d_model"),  # use_split_qkv_input)
    "ln1.hook_scale": SCALE,
    "ln1.hook_normalized": D,
    "attn.hook_q": HEADS,
    "attn.hook_k": HEADS,
    "attn.hook_v": HEADS,
    "attn.hook_rot_q": HEADS,  # q and k after rotary embedding (rotary families)
    "attn.hook_rot_k": HEADS,
    "attn.hook_attn_scores": SCORES,
    "attn.hook_pattern": SCORES,
    "attn.hook_z": HEADS,
    "attn.hook_result": ("batch", "pos", "head", "d_model"),
    "ln1_post.hook_scale": SCALE,  # norms of the attention and MLP outputs (Gemma 2)
    "ln1_post.hook_normalized": D,
    "hook_attn_out": D,
    "hook_resid_mid": D,  # sequential blocks only
    "hook_mlp_in": D,  # the MLP's input before its norm (TransformerLens's use_hook_mlp_in)
    "ln2.hook_scale": SCALE,
    "ln2.hook_normalized": D,
    "mlp.hook_pre": ("batch", "pos", "d_mlp"),
    "mlp.hook_pre_linear": ("batch", "pos", "d_mlp"),  # a gated MLP's linear half (hook_pre: the gate's)
    "mlp.hook_post": ("batch", "pos", "d_mlp"),
    "ln2_post.hook_scale": SCALE,
    "ln2_post.hook_normalized": D,
    "hook_mlp_out": D,
    "hook_resid_post": D,
}
GLOBAL_AXES = {
    "hook_embed": D,
    "hook_pos_embed": D,  # learned position embeddings only
    "ln_final.hook_scale": SCALE,
    "ln_final.hook_normalized": D,
    "unembed.hook_in": D,
    "unembed.hook_out": ("batch", "pos", "d_vocab"),
}
VOCABULARY = tuple(LAYER_AXES) + tuple(GLOBAL_AXES)  # every name any family may have
ROTARY_SITES = ("attn.hook_rot_q", "attn.hook_rot_k")
GATED_SITES = ("mlp.hook_pre_linear",)  # gated MLPs only (Llama's SwiGLU)
POST_NORM_SITES = ("ln1_post.hook_scale", "ln1_post.hook_normalized", "ln2_post.hook_scale", "ln2_post.hook_normalized")
# The reader inputs a block reports only when asked (`edit.split_inputs` for q, k, v).
SPLIT_INPUT_SITES = ("hook_q_input", "hook_k_input", "hook_v_input")
READER_INPUT_SITES = SPLIT_INPUT_SITES + ("hook_mlp_in",)
# TransformerLens's GPT-2 hook points by default (0.1's names; a family's own are in its SiteTable).
LAYER_SITES = tuple(s for s in LAYER_AXES if s not in ROTARY_SITES + GATED_SITES + POST_NORM_SITES + READER_INPUT_SITES)
GLOBAL_SITES = tuple(GLOBAL_AXES)
ALL_SITES = LAYER_SITES + GLOBAL_SITES
# jpatch's own short name beside TransformerLens's shorthand (which spells it "normalized").
SHORT_NAMES = {"ln_final": "ln_final.hook_normalized"}

_FULL = re.compile(r"^blocks\.(-?\d+)\.(.+)$")


def unknown_site_error(name):
    return KeyError(
        f"unknown site {name!r}; valid sites: {', '.join(VOCABULARY)} "
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
        if len(name) == 2 and layer is not None and site in LAYER_AXES:
            full = f"blocks.{layer}.{site}"  # ("attn.hook_z", 3)
        else:
            full = get_act_name(*name[:1], layer, *name[2:]) if layer is not None or len(name) > 2 else name[0]
    elif isinstance(name, str):
        full = name
    else:
        raise KeyError(f"a site name is a str or a (name, layer) tuple, got {type(name).__name__}: {name!r}")
    full = SHORT_NAMES.get(full, full)
    if full not in VOCABULARY and not _FULL.match(full):
        full = get_act_name(full)
    match = _FULL.match(full)
    if match is None:
        if full not in VOCABULARY:
            raise unknown_site_error(name)
        return full, None
    layer, site = int(match.group(1)), match.group(2)
    if site not in LAYER_AXES:
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
    if site in LAYER_AXES and layer is None:
        raise KeyError(f"site {name!r} needs a layer: write 'blocks.{{layer}}.{site}' or ({name!r}, layer)")
    return site, layer


def full_name(site, layer=None):
    """A valid cache / override key: full_name('z', 3) == 'blocks.3.attn.hook_z'."""
    site = canonical(site)
    if layer is None:
        return site
    if site not in LAYER_AXES:
        raise KeyError(f"site {site!r} is outside the blocks and has no layer")
    return f"blocks.{int(layer)}.{site}"


class Site(NamedTuple):
    """One hook point of a family: its axes per call (batch first) and what the engine does with it."""

    axes: tuple  # e.g. ("batch", "pos", "head", "d_head"); sizes from the config (`axis_size`)
    sweep: bool = False  # the patching engine patches it (sweep, get_act_patch_*, attribute)
    on_request: bool = False  # computed only when a cache filter or an override asks for it


def axis_size(config, axis, batch, pos):
    """The length of a named axis for a [batch, pos] input."""
    sizes = {"batch": batch, "pos": pos, "query": pos, "key": pos, "one": 1, "head": config.n_head,
             "kv_head": getattr(config, "n_kv_head", config.n_head), "d_head": config.d_head,
             "d_model": config.d_model, "d_mlp": config.d_mlp, "d_vocab": config.d_vocab}
    return sizes[axis]


class SiteTable:
    """A family's hook points: which names of the vocabulary it has, with their axes, which the
    engine sweeps and which are computed only on request. Everything that depends on what a
    site is (its shape, its heads, whether the engine sweeps it) reads this table; a family has
    exactly the sites its table lists, and a name it lacks is refused naming the family."""

    def __init__(self, family, names, *, sweep=(), on_request=(), axes=None):
        axes = {**LAYER_AXES, **GLOBAL_AXES, **(axes or {})}
        unknown = [s for s in (*names, *sweep, *on_request) if s not in axes or s not in names]
        if unknown:
            raise ValueError(f"{family}: sites {unknown} are not in jpatch's vocabulary or not listed")
        self.family = family
        self.sites = {s: Site(axes[s], s in sweep, s in on_request) for s in VOCABULARY if s in names}
        self.layer = {s: v for s, v in self.sites.items() if s in LAYER_AXES}
        self.layer_sites = tuple(self.layer)
        self.global_sites = tuple(s for s in self.sites if s in GLOBAL_AXES)
        self.all_sites = tuple(self.sites)
        self.sweep_sites = tuple(sweep)
        self.on_request = tuple(on_request)

    def __contains__(self, site):
        return site in self.sites

    def __getitem__(self, site):
        if site not in self.sites:
            raise KeyError(f"{self.family} has no hook point {site!r}; its hook points: {', '.join(self.all_sites)}")
        return self.sites[site]

    def has_heads(self, site):
        return "head" in self[site].axes or "kv_head" in self[site].axes

    def check(self, site):
        """`site` (canonical) if this family has it, else a KeyError naming the family's sites."""
        self[site]
        return site


def activation_shape(config, site, batch, pos):
    """Shape of one layer's activation at `site` for a [batch, pos] input (the family's table)."""
    return tuple(axis_size(config, a, batch, pos) for a in config.sites[canonical(site)].axes)
