"""TransformerLens's hook functions, run on jpatch's overrides.

A notebook's `fn(activation, hook)` runs eagerly on the concrete activation, and what it returns
goes back into the model as an `Override` of that site (TransformerLens's rule: None leaves the
activation unchanged). Hook points run in forward order on activations recorded by a forward with
the earlier hooks' values in place (one forward records them all, and again after each hook that
changes its activation); a last forward puts every value in place. Those forwards are two
compiled programs per set of hooked sites, keyed by the sites and not by the layer (an all-layer
override with a layer mask) nor by the hook function, so a loop that builds a new closure for
every layer x position compiles twice, not once per closure.

Backward hooks receive the gradient, at their site, of `backward_of(logits)` (JAX has no
`.backward()` to call later). Gradients are not taken through an activation a forward hook
changed: that combination is refused.
"""

import contextlib
import dataclasses
import traceback
import weakref

import jax
import jax.numpy as jnp
import numpy as np

from jpatch.model import sites, views
from jpatch.model.interventions import Apply, Override

RETURN_TYPES = ("logits", "loss", "both", None)


@dataclasses.dataclass
class HookPoint:
    """What a hook function receives as `hook`: the hook point's full name and its layer."""

    name: str
    _layer: int = None
    ctx: dict = dataclasses.field(default_factory=dict)

    def layer(self):
        if self._layer is None:
            raise ValueError(f"hook point {self.name!r} is outside the blocks: it has no layer")
        return self._layer


@dataclasses.dataclass
class RegisteredHook:
    """A hook point of one model (`model.hook_dict[name]`): add_hook / remove_hooks as in TransformerLens."""

    model: object
    name: str

    def add_hook(self, fn, dir="fwd"):
        add_hook(self.model, self.name, fn, dir)

    def remove_hooks(self, dir="fwd"):
        _registered(self.model)[dir] = [(n, f) for n, f in _registered(self.model)[dir] if n != self.name]


# Hooks added with add_hook, by model object (jpatch models are immutable values; hooks belong to
# the object they were added to and vanish with it).
_REGISTRY = {}


def _registered(model):
    key = id(model)
    if key not in _REGISTRY:
        _REGISTRY[key] = {"fwd": [], "bwd": []}
        weakref.finalize(model, _REGISTRY.pop, key, None)
    return _REGISTRY[key]


def has_hooks(model):
    hooks = _REGISTRY.get(id(model))
    return bool(hooks and (hooks["fwd"] or hooks["bwd"]))


def refuse_hooked(model, what="jpatch's methods"):
    """Methods that run their own compiled forwards (sweeps, attribution, circuits) do not run hooks
    added with add_hook: refused, rather than silently computed without them."""
    if has_hooks(model):
        raise ValueError(f"this model has hooks added with add_hook; {what} do not run them (they take overrides): "
                         "call model.reset_hooks() first, or write the hook as an override (jpatch.Apply, Override)")


def add_hook(model, name, fn, dir="fwd"):
    """Keep `fn` at hook point `name` (a name, or a filter of full names) for every later forward
    of this model object (`model(...)`, run_with_cache, run_with_hooks), until `reset_hooks`."""
    if dir not in ("fwd", "bwd"):
        raise ValueError(f"dir must be 'fwd' or 'bwd', got {dir!r}")
    resolve_hooks(model, [(name, fn)])  # checked now, not at the next forward
    _registered(model)[dir].append((name, fn))


def reset_hooks(model):
    _REGISTRY.pop(id(model), None)


def _forward_order(model):
    """Every full hook name of the model, in forward order."""
    table, L = model.sites, model.config.n_layer
    before = [s for s in ("hook_embed", "hook_pos_embed") if s in table]
    after = [s for s in sites.GLOBAL_AXES if s in table and s not in before]
    layer = [s for s in sites.LAYER_AXES if s in table]
    return before + [sites.full_name(s, l) for l in range(L) for s in layer] + after


def hook_names(model):
    """The full hook names a filter function is asked about, in forward order: all but the sites
    computed on request (attn.hook_result; the reader inputs hook_q_input ..., which as in
    TransformerLens's use_split_qkv_input change how the block computes), hooked only when named."""
    on_request = set(model.sites.on_request) - views.attn_result_sites(model)  # set_use_attn_result
    return [n for n in _forward_order(model) if sites.resolve(n)[0] not in on_request]


def resolve_hooks(model, hooks):
    """[(name or filter of full names, fn)] -> {full name: [fn, ...]} in forward order."""
    order = {name: i for i, name in enumerate(_forward_order(model))}
    filtered = hook_names(model)
    found = {}
    for item in hooks:
        if not (isinstance(item, (tuple, list)) and len(item) == 2 and callable(item[1])):
            raise TypeError(f"a hook is (name or filter function, fn(activation, hook)), got {item!r}")
        name, fn = item
        if callable(name):
            names = [n for n in filtered if name(n)]
        else:
            site, layer = sites.resolve(name, model.config.n_layer)
            model.sites.check(site)
            layers = range(model.config.n_layer) if site in sites.LAYER_AXES and layer is None else [layer]
            names = [sites.full_name(site, l) for l in layers]
        for n in names:
            found.setdefault(n, []).append(fn)
    return dict(sorted(found.items(), key=lambda kv: order[kv[0]]))


def _call(fn, act, hook):
    """fn(act, hook), its None meaning unchanged, and a message that says what to write instead
    where a TransformerLens hook meets a JAX array."""
    try:
        out = fn(act, hook=hook)  # TransformerLens passes the hook point by keyword
    except Exception as e:
        text = f"{type(e).__name__}: {e}"
        torch_frames = any("torch" in frame.filename for frame in traceback.extract_tb(e.__traceback__))
        if "does not support item assignment" in text or "immutable" in text:
            advice = ("jpatch hooks receive JAX arrays, which are immutable: return act.at[:, pos].set(value) "
                      "instead of assigning into act")
        elif torch_frames or "Tensor" in text or "clone" in text or "detach" in text:
            advice = ("jpatch hooks receive JAX arrays, not torch tensors: write the hook with jax.numpy "
                      "(jnp.zeros_like(act), act.at[...].set(...), jnp.einsum) and drop .clone() / .detach()")
        else:
            advice = None
        if advice is None:
            raise
        raise TypeError(f"hook at {hook.name!r} failed ({text}); {advice}") from e
    if out is None:
        return act
    out = jnp.asarray(out)
    if out.shape != act.shape:
        raise ValueError(f"hook at {hook.name!r} returned shape {tuple(out.shape)}; the activation is "
                         f"{tuple(act.shape)}")
    return out.astype(act.dtype)


def _overrides(model, values, intervention):
    """{full name: array} -> overrides keyed by site, an all-layer stack with a layer mask for a block's
    site, so that the compiled forward depends on which sites are hooked, not on which layers."""
    L = model.config.n_layer
    by_site = {}
    for name, value in values.items():
        site, layer = sites.resolve(name, L)
        by_site.setdefault(site, {})[layer] = value
    out = {}
    for site, layers in by_site.items():
        if site not in sites.LAYER_AXES:
            out[site] = intervention(layers[None], jnp.asarray(True))
            continue
        any_value = next(iter(layers.values()))
        stack = jnp.zeros((L,) + any_value.shape, any_value.dtype)
        mask = np.zeros((L,) + (1,) * any_value.ndim, bool)
        for layer, value in layers.items():
            stack = stack.at[layer].set(value)
            mask[layer] = True
        out[site] = intervention(stack, jnp.asarray(mask))
    return out


def _record(model, tokens, attention_mask, overrides, names):
    """{full name: activation} of `names` in one forward with `overrides` in place."""
    L = model.config.n_layer
    record = frozenset(sites.resolve(n, L)[0] for n in names)
    # Logits are not needed, unless a hook reads them: unembed one position only.
    at = None if any(s.startswith(("ln_final", "unembed")) for s in record) else \
        jnp.zeros((tokens.shape[0], 1), jnp.int32)
    _, cache = model._run(tokens, overrides, attention_mask, at, record=record, hooks=False)
    return {n: cache[n] for n in names}


def run(model, tokens, attention_mask, fwd_hooks=(), bwd_hooks=(), *, backward_of=None, record=frozenset()):
    """The forward of `model` ([batch, pos] tokens) with its hooks added by add_hook and the given
    ones: logits [batch, pos, d_vocab] and a `Cache` of the sites in `record` (None when empty)."""
    model.check_tokens(tokens)
    registered = _REGISTRY.get(id(model), {"fwd": [], "bwd": []})
    forward = resolve_hooks(model, list(registered["fwd"]) + list(fwd_hooks))
    backward = resolve_hooks(model, list(registered["bwd"]) + list(bwd_hooks))
    if backward and backward_of is None:
        raise ValueError("backward hooks need backward_of=fn(logits) -> scalar: JAX has no .backward() to call "
                         "after the forward, so the gradient they receive is that of backward_of")
    if backward and not record:  # one compiled forward and backward serves both kinds of hooks
        return _read_only_forward_and_backward(model, tokens, attention_mask, forward, backward, backward_of), None
    # One forward records every pending hook point; a hook that changes its activation makes the later
    # points' records stale, so the rest are recorded again with its value in place.
    values, pending = {}, list(forward.items())
    while pending:
        recorded = _record(model, tokens, attention_mask, _overrides(model, values, Override), [n for n, _ in pending])
        for i, (name, fns) in enumerate(pending):
            act = new = recorded[name]
            for fn in fns:
                new = _call(fn, new, HookPoint(name, sites.resolve(name, model.config.n_layer)[1]))
            if new is not act:
                values[name] = new
                pending = pending[i + 1:]
                break
        else:
            pending = []
    if backward and values:
        _refuse_changed(values)
    logits, cache = model._run(tokens, _overrides(model, values, Override), attention_mask, None, record=record,
                               hooks=False)
    if backward:
        _read_only_forward_and_backward(model, tokens, attention_mask, {}, backward, backward_of)
    return logits, cache


def _refuse_changed(names):
    raise ValueError(f"forward hooks changed {sorted(names)[:3]} and backward hooks are given: gradients "
                     "through a changed activation are not taken here; run the backward hooks with forward "
                     "hooks that only read (return None)")


def _read_only_forward_and_backward(model, tokens, attention_mask, forward, backward, backward_of):
    """The logits of one compiled forward and backward (`backward.forward_backward`): each forward
    hook is called with its activation (it may only read) and each backward hook with the gradient,
    at its hook point, of backward_of(logits)."""
    from jpatch.model.backward import forward_backward  # that module imports this one

    L = model.config.n_layer
    record = frozenset(sites.resolve(name, L)[0] for name in list(forward) + list(backward))
    value, logits, stacks, grads = forward_backward(model, tokens, attention_mask, None, record, Apply(backward_of))
    if value.shape != ():
        raise ValueError(f"backward_of must return a scalar, got shape {tuple(value.shape)}")
    at = lambda tree, site, layer: tree[site] if site not in sites.LAYER_AXES else tree[site][layer]
    for name, fns in forward.items():
        site, layer = sites.resolve(name, L)
        act = new = at(stacks, site, layer)
        for fn in fns:
            new = _call(fn, new, HookPoint(name, layer))
        if new is not act:
            _refuse_changed([name])
    for name, fns in backward.items():
        site, layer = sites.resolve(name, L)
        for fn in fns:
            _call(fn, at(grads, site, layer), HookPoint(name, layer))
    return logits


def lm_cross_entropy_loss(logits, tokens, attention_mask=None, per_token=False):
    """Next-token cross-entropy: -log p(token t+1 | ..t), mean over the real positions (those whose
    next token is real, with an attention_mask), or [batch, pos - 1] per token."""
    log_probs = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32)[:, :-1], axis=-1)
    loss = -jnp.take_along_axis(log_probs, jnp.asarray(tokens)[:, 1:, None], axis=-1)[..., 0]
    if per_token:
        return loss
    if attention_mask is None:
        return loss.mean()
    real = jnp.asarray(attention_mask)[:, 1:].astype(jnp.float32)
    return (loss * real).sum() / real.sum()


def run_with_hooks(model, tokens, fwd_hooks=(), bwd_hooks=(), *, return_type="logits", attention_mask=None,
                   backward_of=None, reset_hooks_end=True):
    """TransformerLens's run_with_hooks (see the module docstring); backward_of: the scalar function of
    the logits whose gradients the backward hooks receive. reset_hooks_end=False keeps the forward
    hooks for later forwards (as add_hook does)."""
    if return_type not in RETURN_TYPES:
        raise ValueError(f"return_type must be one of {RETURN_TYPES}, got {return_type!r}")
    if not reset_hooks_end and bwd_hooks:
        raise ValueError("reset_hooks_end=False keeps backward hooks for a later .backward(), which JAX does not "
                         "have: pass backward_of=fn(logits) -> scalar with the backward hooks instead")
    tokens, attention_mask = model.as_tokens(tokens, attention_mask)
    logits, _ = run(model, tokens, attention_mask, fwd_hooks, bwd_hooks, backward_of=backward_of)
    if not reset_hooks_end:
        for name, fn in fwd_hooks:
            add_hook(model, name, fn)
    if return_type is None:
        return None
    if return_type == "logits":
        return logits
    loss = lm_cross_entropy_loss(logits, tokens, attention_mask)
    return loss if return_type == "loss" else (logits, loss)


@contextlib.contextmanager
def hooks(model, fwd_hooks=(), bwd_hooks=(), reset_hooks_end=True):
    """`with model.hooks(fwd_hooks=[...]):` every forward of the model inside runs them."""
    before = {d: list(h) for d, h in _registered(model).items()}
    try:
        for name, fn in fwd_hooks:
            add_hook(model, name, fn, "fwd")
        for name, fn in bwd_hooks:
            add_hook(model, name, fn, "bwd")
        yield model
    finally:
        if reset_hooks_end:
            _registered(model).update(before)
