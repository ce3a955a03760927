"""TransformerLens's module paths to the weights and hook points: `model.blocks[l].attn.W_Q`,
`model.blocks[l].attn.hook_z.add_hook(fn)`, `model.embed.W_E`, `model.unembed.W_U`,
`model.ln_final.w`, `model.pos_embed.W_pos`.

jpatch's blocks are one module with a leading layer axis and its embed / unembed / ln_final are
methods, so these are views: `model.blocks[l]` is a `LayerView` of layer l of the model the blocks
were read from (`OwnsBlocks` remembers it when `model.blocks` is read: the stacked blocks carry no
config and no hooks), and the methods carry their weights as attributes (`carries`). Each view
reads the model's TransformerLens-shaped weights (`model.W_Q[l]`, ...); nothing is copied or stored.
"""

import weakref

from jpatch.model import sites
from jpatch.model.hooks import RegisteredHook

# id(stacked blocks) -> the model they were last read from (weak: a view never keeps a model alive).
_OWNERS = weakref.WeakValueDictionary()

# TransformerLens's names under blocks[l].<part> -> (the model's stacked weight, or a layer norm's field)
_PARTS = {
    "attn": {name: name for name in ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O")},
    "mlp": {name: name for name in ("W_in", "b_in", "W_out", "b_out")},
    "ln1": {"w": ("ln1", "weight"), "b": ("ln1", "bias")},
    "ln2": {"w": ("ln2", "weight"), "b": ("ln2", "bias")},
}


class OwnsBlocks:
    """Mixin of `Transformer`: reading `model.blocks` remembers the model, for `blocks[l]`."""

    def __getattribute__(self, name):
        value = object.__getattribute__(self, name)
        if name == "blocks":
            _OWNERS[id(value)] = self
        return value


class HookView(RegisteredHook):
    """A hook point reached by its module path (`model.blocks[l].attn.hook_z`): add_hook / remove_hooks."""

    def __repr__(self):
        return f"HookPoint({self.name!r})"


def _hook(model, name):
    """The hook point `name` (a full name) of `model`, checked against the family's hook points."""
    try:
        model.sites.check(sites.resolve(name, model.config.n_layer)[0])
    except KeyError as e:  # an AttributeError, so that hasattr(block.attn, "hook_x") answers
        raise AttributeError(str(e)) from None
    return HookView(model, name)


class _Part:
    """blocks[l].attn / .mlp / .ln1 / .ln2: weights of layer l and the hook points under it."""

    def __init__(self, model, layer, part):
        self._model, self._layer, self._part = model, layer, part

    def __getattr__(self, name):
        model, layer, part = self._model, self._layer, self._part
        if name.startswith("hook_"):
            return _hook(model, f"blocks.{layer}.{part}.{name}")
        if name in ("OV", "QK") and part == "attn":
            return getattr(model, name)[layer]
        source = _PARTS[part].get(name)
        if source is None:
            raise AttributeError(f"blocks[{layer}].{part} has no {name!r}; it has {sorted(_PARTS[part])} and its "
                                 "hook points")
        if isinstance(source, tuple):
            norm, field = source
            return getattr(model.layer_norms()[norm], field)[layer]
        return getattr(model, source)[layer]


class LayerView:
    """`model.blocks[l]`: .attn / .mlp / .ln1 / .ln2 (weights in TransformerLens's per-layer shapes,
    hook points) and the block's own hook points (`.hook_resid_pre.add_hook(fn)`)."""

    def __init__(self, model, layer):
        self._model, self._layer = model, layer

    def __getattr__(self, name):
        if name in _PARTS:
            return _Part(self._model, self._layer, name)
        if name.startswith("hook_"):
            return _hook(self._model, f"blocks.{self._layer}.{name}")
        raise AttributeError(f"blocks[{self._layer}] has no {name!r}; it has {sorted(_PARTS)} and its hook points")


def layer_view(blocks, layer):
    """`Block.__getitem__`: `model.blocks[l]` as TransformerLens's block l (a `LayerView`)."""
    model = _OWNERS.get(id(blocks))
    if model is None or object.__getattribute__(model, "blocks") is not blocks:
        raise TypeError("these stacked blocks were not read from a model (model.blocks[l]): index them as "
                        "model.blocks[l], or use model.W_Q[l] and model.hook_dict['blocks.l.attn.hook_z']")
    n = model.config.n_layer
    try:
        index = int(layer)
    except TypeError:
        raise TypeError(f"model.blocks[l] takes one integer layer, got {layer!r}") from None
    if index != layer or not -n <= index < n:
        raise IndexError(f"layer {layer!r} out of range for a model with {n} layers")
    return LayerView(model, index % n)


class _Carrying:
    """A bound method that also carries weight views as attributes (`model.unembed.W_U`)."""

    def __init__(self, bound, views):
        self._bound, self._views = bound, views

    def __call__(self, *args, **kwargs):
        return self._bound(*args, **kwargs)

    def __getattr__(self, name):
        if name in self._views:
            return self._views[name](self._bound.__self__)
        raise AttributeError(f"{self._bound.__name__} has no {name!r}; it carries {sorted(self._views)}")


class carries:  # noqa: N801  (a decorator, used as @views.carries(...))
    """Decorate a family method so that `model.<method>.<name>` reads `views[name](model)`:
    `@carries(W_E=lambda m: m.W_E)` on `embed` gives TransformerLens's `model.embed.W_E`."""

    def __init__(self, **views):
        self.views = views

    def __call__(self, fn):
        self.fn = fn
        return self

    def __get__(self, model, owner=None):
        if model is None:
            return self.fn
        return _Carrying(self.fn.__get__(model, owner), self.views)


class Weights:
    """A plain holder of named weights (`model.pos_embed.W_pos`)."""

    def __init__(self, **weights):
        self.__dict__.update(weights)
