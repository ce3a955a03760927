"""Interventions as data: what to do to a site's activation in a forward.

An `overrides` dict maps a site name, in any spelling `jpatch.sites.resolve` reads,
to an intervention or a list of them (applied in order):

    Override(value, mask)   replace where mask is True
    Add(value, mask=None)   add value (where mask is True)
    Scale(factor, mask=None) multiply by factor (where mask is True)
    Apply(fn)               fn(activation) -> activation, any jittable function

Keyed by a site without a layer ("hook_resid_pre", "z") a per-layer site's arrays carry
a leading [n_layer] axis (one slice per layer) and `Apply` runs at every layer; keyed by
one layer's name ("blocks.1.hook_resid_pre", ("z", 1)) they broadcast to that layer's
activation, e.g. a [d_model] vector added at every position. Arrays are ordinary pytree
leaves, so `jax.vmap` over a stack of interventions runs the patched forwards in one call.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from jpatch.model import sites
from jpatch.model.captured import captured_state
def _array(x):
    return None if x is None else jnp.asarray(x)


def _check(site, act, **arrays):
    shapes = {k: tuple(v.shape) for k, v in arrays.items() if v is not None}
    try:
        fits = np.broadcast_shapes(*shapes.values(), act.shape) == act.shape
    except ValueError:
        fits = False
    if not fits:
        given = " and ".join(f"{k} {s}" for k, s in shapes.items())
        raise ValueError(f"intervention at {site!r}: {given} must broadcast to the activation shape {tuple(act.shape)}")


class Override(eqx.Module):
    """Replace a site's activation where `mask` is True by `value`."""

    value: jax.Array = eqx.field(converter=_array)
    mask: jax.Array = eqx.field(converter=_array)

    def __call__(self, act, site):
        _check(site, act, value=self.value, mask=self.mask)
        return jnp.where(self.mask, self.value.astype(act.dtype), act)


class Add(eqx.Module):
    """Add `value` to the activation (only where `mask` is True when given): steering."""

    value: jax.Array = eqx.field(converter=_array)
    mask: jax.Array = eqx.field(converter=_array, default=None)

    def __call__(self, act, site):
        _check(site, act, value=self.value, mask=self.mask)
        added = act + self.value.astype(act.dtype)
        return added if self.mask is None else jnp.where(self.mask, added, act)


class Scale(eqx.Module):
    """Multiply the activation by `factor` (only where `mask` is True when given)."""

    factor: jax.Array = eqx.field(converter=_array)
    mask: jax.Array = eqx.field(converter=_array, default=None)

    def __call__(self, act, site):
        _check(site, act, factor=self.factor, mask=self.mask)
        scaled = act * self.factor.astype(act.dtype)
        return scaled if self.mask is None else jnp.where(self.mask, scaled, act)


class Apply(eqx.Module):
    """Replace the activation by `fn(activation)`; fn is jittable and keeps the shape."""

    fn: object = eqx.field(static=True)
    state: object = eqx.field(static=True)  # what fn reads (`captured_state`): part of the compile key

    def __init__(self, fn):
        self.fn = fn
        self.state = captured_state(fn)

    def __call__(self, act, site):
        out = self.fn(act)
        if getattr(out, "shape", None) != act.shape:
            raise ValueError(f"Apply at {site!r}: fn returned shape {getattr(out, 'shape', None)}, "
                             f"expected the activation's {tuple(act.shape)}")
        return out.astype(act.dtype)


INTERVENTIONS = (Override, Add, Scale, Apply)


def normalize(overrides, n_layer, table=None):
    """An overrides dict -> {site: [(layer, intervention), ...]} in the order given.

    table: the model family's `SiteTable`; a site the family does not have is refused (it
    would never be reached).

    layer is an int for a one-layer key, None for a global site or an all-layer key
    (whose arrays then need a leading [n_layer] axis).
    """
    plan = {}
    seen = {}
    for key, given in dict(overrides or {}).items():
        site, layer = sites.resolve(key, n_layer)
        if table is not None and site not in table:
            raise KeyError(f"override {key!r}: {table.family} has no hook point {site!r}; "
                           f"its hook points: {', '.join(table.all_sites)}")
        if (site, layer) in seen:
            raise KeyError(f"override keys {seen[site, layer]!r} and {key!r} name the same site; "
                           "give one key a list of interventions, applied in order")
        seen[site, layer] = key
        items = list(given) if isinstance(given, (list, tuple)) else [given]
        for iv in items:
            if not isinstance(iv, INTERVENTIONS):
                raise TypeError(f"override {key!r}: expected Override, Add, Scale or Apply, got {type(iv).__name__}")
            if site in sites.LAYER_AXES and layer is None:
                for leaf in jax.tree_util.tree_leaves(iv):
                    if leaf.shape[:1] != (n_layer,):
                        raise ValueError(
                            f"override for {key!r} (every layer): its arrays {[tuple(x.shape) for x in jax.tree_util.tree_leaves(iv)]} "
                            f"need a leading layer axis of size n_layer={n_layer}; key one layer "
                            f"('{sites.full_name(site, 0)}') to broadcast to that layer's activation"
                        )
            plan.setdefault(site, []).append((layer, iv))
    return plan


def apply(entries, site, act, layer=None):
    """Apply a site's interventions in order; `layer` is the (traced) index inside the layer scan."""
    for at, iv in entries:
        if at is None and layer is not None:  # an all-layer intervention: this layer's slice
            act = jax.tree_util.tree_map(lambda a: a[layer], iv)(act, site)
        elif at is None:
            act = iv(act, site)
        else:
            act = jnp.where(layer == at, iv(act, sites.full_name(site, at)), act)
    return act
