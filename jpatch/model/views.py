"""TransformerLens's module paths to the weights and hook points: `model.blocks[l].attn.W_Q`,
`model.blocks[l].attn.hook_z.add_hook(fn)`, `model.embed.W_E`, `model.unembed.W_U`,
`model.ln_final.w`, `model.pos_embed.W_pos`.

jpatch's blocks are one module with a leading layer axis and its embed / unembed / ln_final are
methods, so these are views: `model.blocks[l]` is a `LayerView` of layer l of the model the blocks
were read from (`TransformerLensViews` remembers it when `model.blocks` is read: the stacked blocks carry no
config and no hooks), and the methods carry their weights as attributes (`carries`). Each view
reads the model's TransformerLens-shaped weights (`model.W_Q[l]`, ...); nothing is copied or stored.
"""

import weakref

from jpatch.model import sites

# id(stacked blocks) -> the model they were last read from (weak: a view never keeps a model alive).
_OWNERS = weakref.WeakValueDictionary()
# ids of the model objects set_use_attn_result(True) was called on (removed when the model goes).
_ATTN_RESULT = set()

# TransformerLens's names under blocks[l].<part> -> (the model's stacked weight, or a layer norm's field)
_PARTS = {
    "attn": {name: name for name in ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O")},
    "mlp": {name: name for name in ("W_in", "b_in", "W_out", "b_out")},
    "ln1": {"w": ("ln1", "weight"), "b": ("ln1", "bias")},
    "ln2": {"w": ("ln2", "weight"), "b": ("ln2", "bias")},
}


class TransformerLensViews:
    """Mixin of `Transformer`: reading `model.blocks` remembers the model, for `blocks[l]`; and
    TransformerLens's settings of what a forward records."""

    def __getattribute__(self, name):
        value = object.__getattribute__(self, name)
        if name == "blocks":
            _OWNERS[id(value)] = self
        return value

    def set_use_attn_result(self, use_attn_result):
        """As TransformerLens's: with True, this model object's run_with_cache (every hook point) and
        hook filter functions (forward and backward hooks) include each head's attn.hook_result too.
        jpatch computes it on request anyway; a name list can always ask for it."""
        key = id(self)
        if use_attn_result and key not in _ATTN_RESULT:
            _ATTN_RESULT.add(key)
            weakref.finalize(self, _ATTN_RESULT.discard, key)
        elif not use_attn_result:
            _ATTN_RESULT.discard(key)

    def residual_before(self, stop_at_layer, tokens, overrides=None, attention_mask=None, logits_at=None,
                        return_type="logits"):
        """`model(tokens, stop_at_layer=k)`: the residual stream before block k, as run_with_cache's."""
        if return_type != "logits":
            raise ValueError("stop_at_layer returns the residual stream: return_type must be 'logits'")
        return self.run_with_cache(tokens, names_filter=[], overrides=overrides, attention_mask=attention_mask,
                                   logits_at=logits_at, stop_at_layer=stop_at_layer)[0]

    def tl_named_parameters(self):
        """TransformerBridge's name for `named_parameters` (TransformerLens's names and shapes)."""
        return self.named_parameters()


def attn_result_sites(model, names_filter=None):
    """{"attn.hook_result"} where set_use_attn_result(True) adds it to what `names_filter` (None: every
    hook point; a filter function) records of `model`, else the empty set."""
    if id(model) in _ATTN_RESULT and (names_filter is None or callable(names_filter)):
        return {"attn.hook_result"}
    return set()


def _hook(model, name):
    """The hook point `name` (a full name) of `model` (add_hook / remove_hooks), checked against the
    family's hook points."""
    from jpatch.model.hooks import RegisteredHook  # hooks reads attn_result_sites from here

    class HookView(RegisteredHook):
        def __repr__(self):
            return f"HookPoint({self.name!r})"

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
