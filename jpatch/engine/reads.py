"""Which logits a plain callable metric reads, from its traced program: the [batch, pos] positions
and the vocabulary columns it selects by slicing or indexing with indices that do not depend on
the logits (`callable_reads`), so the engine unembeds only those (`jpatch.engine.readout`)."""

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np

# Primitives that only move or select entries: applied to a map of where each entry came
# from, they give where each entry of their output came from.
_MOVES = {"slice", "squeeze", "reshape", "gather", "dynamic_slice", "transpose", "broadcast_in_dim",
          "expand_dims", "rev", "copy", "copy_p", "convert_element_type"}
_LOGITS = "logits"  # the maps of the metric's input itself
_CALLS = {"jit": "jaxpr", "pjit": "jaxpr", "closed_call": "call_jaxpr", "core_call": "call_jaxpr",
          "custom_jvp_call": "call_jaxpr", "custom_vjp_call": "call_jaxpr", "remat": "jaxpr", "checkpoint": "jaxpr"}


class _Origin:
    """A traced value that depends on the logits. Either it is logits moved: `ids` maps each of its
    entries to the flat (prompt, position) of the logit it is, `cols` to its vocabulary column; or it
    was computed from them: `reads` [B * T] and `col_reads` [V] bool mark what it may depend on."""

    def __init__(self, ids=None, cols=None, reads=None, col_reads=None):
        self.ids, self.cols, self.reads, self.col_reads = ids, cols, reads, col_reads

    @staticmethod
    def _marked(ids, n):
        if ids is _LOGITS:
            return np.ones(n, bool)
        out = np.zeros(n, bool)
        out[np.unique(np.asarray(ids))] = True
        return out

    def positions(self, n):
        return self.reads if self.reads is not None else self._marked(self.ids, n)

    def columns(self, v):
        return self.col_reads if self.col_reads is not None else self._marked(self.cols, v)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _move_logits_map(primitive, params, shape, base, *rest):
    """`primitive` applied to `base` (a [B, T, 1] or [V] map) broadcast to the logits' shape, inside
    one compiled call, so the [B, T, V] map is never materialized."""
    return primitive.bind(jnp.broadcast_to(base, shape), *rest, **dict(params))


def _interpret(jaxpr, consts, args, n, v):
    """Evaluate `jaxpr` on constants, following which of the n logit positions and v columns each
    value depends on."""
    env = {}
    read = lambda x: x.val if isinstance(x, jax.extend.core.Literal) else env[x]
    for var, val in zip(jaxpr.constvars, consts):
        env[var] = val
    for var, val in zip(jaxpr.invars, args):
        env[var] = val
    for eqn in jaxpr.eqns:
        ins = [read(x) for x in eqn.invars]
        traced = [isinstance(x, _Origin) for x in ins]
        name = eqn.primitive.name
        if not any(traced):
            outs = eqn.primitive.bind(*ins, **eqn.params)
        elif name in _CALLS and _CALLS[name] in eqn.params:
            inner = eqn.params[_CALLS[name]]
            inner_jaxpr, inner_consts = (inner.jaxpr, inner.consts) if hasattr(inner, "consts") else (inner, ())
            outs = _interpret(inner_jaxpr, inner_consts, ins, n, v)
        elif name in _MOVES and traced[0] and not any(traced[1:]) and ins[0].ids is not None:
            params = dict(eqn.params)
            if name == "convert_element_type":
                params["new_dtype"] = jnp.int32
            if ins[0].ids is _LOGITS:  # the logits' own maps, broadcast over the vocabulary / positions
                shape = eqn.invars[0].aval.shape
                move = lambda base: _move_logits_map(eqn.primitive, tuple(params.items()), shape, base, *ins[1:])
                outs = _Origin(ids=move(np.arange(n, dtype=np.int32).reshape(shape[:2] + (1,))),
                               cols=move(np.arange(v, dtype=np.int32)))
            else:
                outs = _Origin(*(eqn.primitive.bind(m, *ins[1:], **params) for m in (ins[0].ids, ins[0].cols)))
        else:  # any other computation: its outputs may depend on every entry its inputs do
            reads, col_reads = np.zeros(n, bool), np.zeros(v, bool)
            for x in ins:
                if isinstance(x, _Origin):
                    reads |= x.positions(n)
                    col_reads |= x.columns(v)
            outs = [_Origin(reads=reads, col_reads=col_reads) for _ in eqn.outvars]
        outs = outs if eqn.primitive.multiple_results or isinstance(outs, list) else [outs]
        for var, val in zip(eqn.outvars, outs):
            env[var] = val
    return [read(x) for x in jaxpr.outvars]


def read_logits(fn, shape):
    """(positions, columns) a callable metric on logits `shape` ([batch, pos, vocab]) can read:
    [batch, pos] and [vocab] bool, each None when it reads every one, or when its traced program
    cannot show which (then all are computed)."""
    batch, pos, vocab = shape
    try:
        # through a new function: JAX caches a function's trace, which keeps the globals it read then
        closed = jax.make_jaxpr(lambda logits: fn(logits))(jax.ShapeDtypeStruct(tuple(shape), jnp.float32))
        with warnings.catch_warnings():  # casts of the program's constants while evaluating it
            warnings.simplefilter("ignore", RuntimeWarning)
            outs = _interpret(closed.jaxpr, closed.consts, [_Origin(ids=_LOGITS, cols=_LOGITS)], batch * pos, vocab)
    except Exception:  # a primitive this reading does not know how to follow: compute every logit
        return None, None
    reads, columns = np.zeros(batch * pos, bool), np.zeros(vocab, bool)
    for out in outs:
        if isinstance(out, _Origin):
            reads |= out.positions(batch * pos)
            columns |= out.columns(vocab)
    reads = reads.reshape(batch, pos)
    return None if reads.all() else reads, None if columns.all() else columns


def callable_reads(fn, shape):
    """The [batch, pos] logit positions a callable metric on logits `shape` ([batch, pos, vocab])
    can read (`read_logits`), None when it reads every position or the program cannot show which."""
    return read_logits(fn, shape)[0]
