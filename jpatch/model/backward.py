"""A forward and a backward in one compiled program: the activations of the recorded hook points
and the gradient, at each of them, of a scalar function of the logits. This is TransformerLens's
`run_with_cache(..., incl_bwd=True)`, which caches gradients under `<hook name>_grad` by calling
`.backward()` on the model's output; JAX has no `.backward()` to call later, so the scalar is
named up front: `return_type="loss"` (TransformerLens's own use: the next-token loss) or
`metric=fn(logits) -> scalar` (the attribution demo's `metric(model(tokens)).backward()`).

Each recorded site gets a zero `Add` at every layer and one `jax.vjp` gives the gradients with
respect to all of them: the gradient of the activation, as a backward hook receives it.
"""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp

from jpatch.model import hooks as hook_functions
from jpatch.model import sites
from jpatch.model.cache import Cache
from jpatch.model.interventions import Add, Apply
from jpatch.model.views import attn_result_sites


@eqx.filter_jit
def forward_backward(model, tokens, attention_mask, logits_at, record, value_of):
    """(value, logits, activation stacks, gradient stacks) of one forward and backward:
    value = value_of.fn(logits) (any shape; the gradients are those of its sum), or the next-token
    loss for value_of "loss"; stacks {site: [n_layer, ...] or [...]} of the sites in `record`.
    value_of: an `Apply` of the function, so the compile is keyed by what the function reads, not
    by its identity alone."""
    run = lambda overrides: model._run(tokens, overrides, attention_mask, logits_at, record=record, hooks=False)
    shapes = jax.eval_shape(lambda: run(None)[1].stacks)

    def f(eps):
        logits, cache = run({site: Add(e) for site, e in eps.items()})
        value = (hook_functions.lm_cross_entropy_loss(logits, tokens, attention_mask) if value_of == "loss"
                 else jnp.asarray(value_of.fn(logits), jnp.float32))
        return value.sum(), (value, logits, cache.stacks)

    eps = {site: jnp.zeros(s.shape, s.dtype) for site, s in shapes.items()}
    (_, vjp, (value, logits, stacks)) = jax.vjp(f, eps, has_aux=True)
    return value, logits, stacks, vjp(jnp.ones((), jnp.float32))[0]


def with_gradients(run_with_cache):
    """`model.run_with_cache(tokens, ..., incl_bwd=False, metric=None, return_type="logits")`:
    return_type "loss" / "both" returns the next-token loss (and the logits) as TransformerLens's;
    incl_bwd=True also caches the gradients, at every cached hook point, of the loss or of
    `metric(logits)` (a scalar; then the metric's value is returned in place of the logits):
    `cache["blocks.0.hook_resid_pre_grad"]`, or `cache.grad_cache()` keyed by the plain names."""

    @functools.wraps(run_with_cache)
    def method(model, tokens, *, incl_bwd=False, metric=None, return_type="logits", **kwargs):
        if not incl_bwd and metric is None and return_type == "logits":
            return run_with_cache(model, tokens, **kwargs)
        return run_with_gradients(model, tokens, incl_bwd=incl_bwd, metric=metric, return_type=return_type, **kwargs)

    method.__doc__ = f"{run_with_cache.__doc__}\n\n{with_gradients.__doc__}"
    return method


def run_with_gradients(model, tokens, *, names_filter=None, overrides=None, attention_mask=None, logits_at=None,
                       stop_at_layer=None, remove_batch_dim=False, incl_bwd=False, metric=None, return_type="logits"):
    """`model.run_with_cache` with `return_type` and gradients (incl_bwd): see `with_gradients`."""
    if return_type not in ("logits", "loss", "both"):
        raise ValueError(f"run_with_cache's return_type must be 'logits', 'loss' or 'both', got {return_type!r}")
    if metric is not None and not callable(metric):
        raise TypeError(f"metric must be a function of the logits returning a scalar, got {type(metric).__name__}")
    if metric is not None and not incl_bwd:
        raise ValueError("metric= is the scalar whose gradients incl_bwd=True caches: pass incl_bwd=True too")
    if metric is not None and return_type != "logits":
        raise ValueError("pass either metric= (its gradients are cached) or return_type='loss', not both")
    if return_type != "logits" and logits_at is not None:
        raise ValueError("the loss reads every position: do not pass logits_at with return_type 'loss' / 'both'")
    if not incl_bwd:
        tokens, attention_mask = model.as_tokens(tokens, attention_mask)
        logits, cache = model.run_with_cache(tokens, names_filter=names_filter, overrides=overrides,
                                             attention_mask=attention_mask, stop_at_layer=stop_at_layer,
                                             remove_batch_dim=remove_batch_dim)
        if stop_at_layer is not None:
            raise ValueError("stop_at_layer returns the residual stream, not logits: return_type must be 'logits'")
        loss = model.loss_fn(logits, tokens, attention_mask)
        return (loss if return_type == "loss" else (logits, loss)), cache
    if metric is None and return_type == "logits":
        raise ValueError("incl_bwd=True needs a scalar to differentiate: pass return_type='loss' (TransformerLens's "
                         "run_with_cache(tokens, return_type='loss', incl_bwd=True)) or metric=fn(logits) -> scalar "
                         "(the attribution demo's metric(model(tokens)).backward())")
    if stop_at_layer is not None:
        raise ValueError("incl_bwd=True cannot be combined with stop_at_layer: there are no logits to differentiate")
    if overrides:
        raise ValueError("incl_bwd=True does not take overrides: gradients are taken through the model's own forward")
    hook_functions.refuse_hooked(model, "run_with_cache(incl_bwd=True)'s gradients")
    from jpatch.model.architecture import record_sites  # architecture imports this module

    tokens, attention_mask = model.as_tokens(tokens, attention_mask)
    model.check_tokens(tokens)
    n = model.config.n_layer
    record = frozenset(record_sites(names_filter, model.sites, n) | attn_result_sites(model, names_filter))
    if metric is not None:
        shape = jax.eval_shape(metric, jax.ShapeDtypeStruct(
            (tokens.shape[0], tokens.shape[1] if logits_at is None else jnp.shape(logits_at)[1],
             model.config.d_vocab), jnp.float32)).shape
        if shape != ():
            raise ValueError(f"incl_bwd=True differentiates a scalar; the metric returned shape {shape} (average "
                             "it, as the attribution demo's metric does)")
    value, logits, stacks, grads = forward_backward(
        model, tokens, attention_mask, None if logits_at is None else jnp.asarray(logits_at), record,
        "loss" if metric is None else Apply(metric))
    keep = None
    if callable(names_filter):
        keep = {sites.full_name(s, l) for s in record if s in sites.LAYER_AXES for l in range(n)}
        keep = {name for name in keep | {s for s in record if s not in sites.LAYER_AXES} if names_filter(name)}
    cache = Cache(stacks, n, model, model.sites, keep=keep, grads=grads)
    cache = cache.remove_batch_dim() if remove_batch_dim else cache
    return (logits, value) if return_type == "both" else value, cache
