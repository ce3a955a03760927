"""The activation cache: activations keyed by TransformerLens hook names, as TransformerLens's
ActivationCache (a read-only mapping with its analysis helpers). `run_with_cache` makes one; one can
also be built from {full hook name: array} and a model."""

import operator
import weakref

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from jpatch.model import analysis, sites


# id(cache) -> its {full name: activation}, while the cache lives (`Cache._entries`)
_ENTRIES = {}


class Cache(eqx.Module):
    """Activations keyed by TransformerLens hook names; a read-only mapping as TransformerLens's
    ActivationCache (`len`, iteration over the full names, `keys` / `values` / `items`, `cache_dict`).

    `stacks[site]` holds a per-layer site as one [n_layer, ...] array;
    `cache["blocks.3.hook_resid_pre"]` gives one layer's slice. `Cache(cache_dict, model)` builds
    one from {full hook name: array} (TransformerLens's `ActivationCache(cache_dict, model)`; torch
    tensors are read as arrays).
    """

    stacks: dict
    n_layer: int = eqx.field(static=True)
    model: object = None  # the model that made it, for the analysis helpers (attached outside jit)
    table: sites.SiteTable = eqx.field(static=True, default=None)  # the family's sites (their axes)
    has_batch_dim: bool = eqx.field(static=True, default=True)
    # The full names this cache holds when only some layers of a site are (a names_filter function,
    # stop_at_layer, a partial cache_dict); None: every layer of every stacked site.
    keep: frozenset = eqx.field(static=True, default=None)
    # Gradients of the same sites, as stacks (run_with_cache(incl_bwd=True)): keys "<name>_grad".
    grads: dict = None

    def __init__(self, stacks, n_layer=None, model=None, table=None, has_batch_dim=True, keep=None, grads=None):
        if n_layer is not None and not isinstance(n_layer, (int, np.integer)):
            # TransformerLens's ActivationCache(cache_dict, model, has_batch_dim=True)
            if isinstance(model, bool):
                has_batch_dim, model = model, None
            if model is not None or table is not None or keep is not None:
                raise TypeError("Cache(cache_dict, model, has_batch_dim=True) takes a dict and a model, "
                                "or (stacks, n_layer, model=, table=)")
            n_layer, model = None, n_layer
        if n_layer is None:
            if not hasattr(model, "config") or not hasattr(model, "sites"):
                raise TypeError(f"Cache(cache_dict, model): model must be a jpatch model, got {type(model).__name__}")
            stacks, keep = _stacks_from_names(stacks, model)
            n_layer, table = model.config.n_layer, model.sites
        self.stacks = stacks
        self.n_layer = int(n_layer)
        self.model = model
        self.table = table
        self.has_batch_dim = bool(has_batch_dim)
        self.keep = None if keep is None else frozenset(keep)
        self.grads = grads

    # TransformerLens's ActivationCache helpers (see jpatch.analysis); they need the batch axis
    def _batched(helper):
        def method(self, *args, **kwargs):
            if not self.has_batch_dim:
                raise ValueError(f"cache.{helper.__name__} needs the cache's batch axis: this cache has none "
                                 "(remove_batch_dim=True); run run_with_cache without it and index [0] afterwards")
            return helper(self, *args, **kwargs)

        method.__name__, method.__doc__ = helper.__name__, helper.__doc__
        return method

    accumulated_resid = _batched(analysis.accumulated_resid)
    decompose_resid = _batched(analysis.decompose_resid)
    stack_head_results = _batched(analysis.stack_head_results)
    apply_ln_to_stack = _batched(analysis.apply_ln_to_stack)
    logit_attrs = _batched(analysis.logit_attrs)
    logit_lens = _batched(analysis.logit_lens)
    del _batched

    def __contains__(self, name):
        try:
            self[name]
        except KeyError:
            return False
        return True

    def __getitem__(self, name):
        if isinstance(name, str) and name.endswith("_grad"):
            if self.grads is None:
                raise KeyError(f"{name!r} was not cached: gradients are, by run_with_cache(..., incl_bwd=True)")
            return self.grad_cache()[name[: -len("_grad")]]
        site, layer = sites.parse(_int_layer_key(name), self.n_layer)
        if site not in self.stacks or (self.keep is not None and sites.full_name(site, layer) not in self.keep):
            raise KeyError(f"{name!r} was not cached" + (
                " (attn.hook_result is cached only when asked: run_with_cache(names_filter=...))"
                if site == "attn.hook_result" else ""))
        return self.stacks[site] if layer is None else self.stacks[site][layer]

    def keys(self):
        """Full hook names in TransformerLens's (forward) order."""
        have = lambda names: [s for s in names if s in self.stacks]
        blocks = [f"blocks.{l}.{s}" for l in range(self.n_layer) for s in have(sites.LAYER_AXES)]
        names = have(sites.GLOBAL_SITES[:2]) + blocks + have(sites.GLOBAL_SITES[2:])
        names = names if self.keep is None else [n for n in names if n in self.keep]
        # TransformerLens's incl_bwd cache: the forward names, then each "<name>_grad"
        return names + [f"{n}_grad" for n in names] if self.grads is not None else names

    def grad_cache(self):
        """The gradients (run_with_cache(incl_bwd=True)) as a cache of their own, keyed by the plain
        hook names: what the attribution demo's backward hooks collect into `grad_cache`."""
        if self.grads is None:
            raise ValueError("this cache holds no gradients: run_with_cache(..., incl_bwd=True) makes one that does")
        return Cache(self.grads, self.n_layer, self.model, self.table, self.has_batch_dim, self.keep)

    def _with(self, stacks, grads, **changes):
        """This cache with new stacks (and gradient stacks); `changes`: has_batch_dim."""
        return Cache(stacks, self.n_layer, self.model, self.table, keep=self.keep, grads=grads,
                     **{"has_batch_dim": self.has_batch_dim, **changes})

    def _entries(self):
        """{full name: activation}, sliced once per cache: a notebook reads `cache.cache_dict[k]` in a
        loop over k, and a Cache never changes (slicing anew each time was quadratic in the names)."""
        found = _ENTRIES.get(id(self))
        if found is None:
            found = {name: self[name] for name in self.keys()}
            if not any(isinstance(a, jax.core.Tracer) for a in jax.tree_util.tree_leaves(self.stacks)):
                _ENTRIES[id(self)] = found
                weakref.finalize(self, _ENTRIES.pop, id(self), None)
        return found

    def values(self):
        return list(self._entries().values())

    def items(self):
        return list(self._entries().items())

    def __iter__(self):
        return iter(self.keys())

    def __len__(self):
        return len(self.keys())

    def __repr__(self):
        return f"Cache with keys {self.keys()}"

    @property
    def cache_dict(self):
        """{full hook name: activation}, as TransformerLens's `cache.cache_dict`."""
        return dict(self._entries())

    def stacked(self, site):
        """All layers of a site as one [n_layer, ...] array."""
        return self.stacks[sites.canonical(site)]

    def stack_activation(self, activation_name, layer=-1, sublayer_type=None):
        """The activation of layers 0 .. layer - 1 stacked: [layers, ...], as TransformerLens's
        (layer -1 or None: every layer)."""
        if layer is None or layer == -1:
            layer = self.n_layer
        layer = int(layer)
        if not 0 <= layer <= self.n_layer:
            raise ValueError(f"layer must be in [0, {self.n_layer}], -1 or None, got {layer}")
        parts = [self[(activation_name, l, sublayer_type)] for l in range(layer)]
        if not parts:
            raise ValueError("layer=0 stacks no layers")
        return jnp.stack(parts)

    def remove_batch_dim(self):
        """This cache with its batch axis (of size 1) removed, as TransformerLens's (a new cache:
        jpatch's caches are immutable)."""
        if not self.has_batch_dim:
            return self
        drop = lambda stacks: None if stacks is None else {
            s: v[:, 0] if s in sites.LAYER_AXES else v[0] for s, v in stacks.items()}
        sizes = {v.shape[1] if s in sites.LAYER_AXES else v.shape[0] for s, v in self.stacks.items()}
        if sizes != {1}:
            raise ValueError(f"cannot remove the batch axis of a cache with batch size {sorted(sizes)}")
        return self._with(drop(self.stacks), drop(self.grads), has_batch_dim=False)

    def apply_slice_to_batch_dim(self, batch_slice):
        """This cache at some batch rows, as TransformerLens's: an int (the batch axis goes), a slice,
        a (start, stop[, step]) tuple, a list or array of rows, or None (all)."""
        if batch_slice is None:
            return self
        if not self.has_batch_dim:
            raise ValueError("Cannot index into a cache without a batch dim")
        if isinstance(batch_slice, tuple):
            batch_slice = slice(*batch_slice)
        elif not isinstance(batch_slice, slice):
            try:
                batch_slice = operator.index(batch_slice)
            except TypeError:
                batch_slice = jnp.asarray(batch_slice)
        take = lambda stacks: None if stacks is None else {
            s: v[:, batch_slice] if s in sites.LAYER_AXES else v[batch_slice] for s, v in stacks.items()}
        return self._with(take(self.stacks), take(self.grads), has_batch_dim=not isinstance(batch_slice, int))

    def to(self, device):
        """This cache on `device` (a jax.Device, or "cpu" / "cuda" / "gpu" / "tpu"): a new cache."""
        if isinstance(device, str):
            platform = {"cuda": "gpu"}.get(device.split(":")[0], device.split(":")[0])
            index = int(device.split(":")[1]) if ":" in device else 0
            device = jax.devices(platform)[index]
        return self._with(jax.device_put(self.stacks, device), jax.device_put(self.grads, device))


def _int_layer_key(name):
    """A tuple key's layer of any integer type (numpy, 0-d arrays) as an int."""
    if isinstance(name, tuple) and len(name) > 1 and name[1] is not None and not isinstance(name[1], int):
        try:
            layer = operator.index(name[1])
        except TypeError:
            raise KeyError(f"layer in {name!r} must be an integer") from None
        name = (name[0], layer, *name[2:])
    return name


def _as_array(value):
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # a torch tensor
        value = value.detach().cpu()
        value = value.float() if str(value.dtype) == "torch.bfloat16" else value
        value = value.numpy()
    return jnp.asarray(value)


def _stacks_from_names(cache_dict, model):
    """{full hook name: array} -> (stacks, keep): per-layer sites stacked (layers not given are NaN
    and not keys of the cache)."""
    if not isinstance(cache_dict, dict):
        raise TypeError(f"Cache(cache_dict, model): cache_dict must be a dict of full hook names, "
                        f"got {type(cache_dict).__name__}")
    n_layer, per_layer, stacks, keep = model.config.n_layer, {}, {}, set()
    for name, value in cache_dict.items():
        if not isinstance(name, str):
            raise KeyError(f"Cache(cache_dict, model): keys are full hook names, got {name!r}")
        site, layer = sites.parse(name, n_layer)
        model.sites.check(site)
        value = _as_array(value)
        if layer is None:
            stacks[site] = value
        else:
            per_layer.setdefault(site, {})[layer] = value
        keep.add(sites.full_name(site, layer))
    for site, layers in per_layer.items():
        shapes = {v.shape for v in layers.values()}
        if len(shapes) > 1:
            raise ValueError(f"Cache(cache_dict, model): {site!r} has different shapes at different layers: {shapes}")
        first = next(iter(layers.values()))
        fill = jnp.full(first.shape, jnp.nan, first.dtype)
        stacks[site] = jnp.stack([layers.get(l, fill) for l in range(n_layer)])
    full = all(len(layers) == n_layer for layers in per_layer.values())
    return stacks, None if full else keep
