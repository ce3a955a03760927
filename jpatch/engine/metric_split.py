"""A whole-batch callable metric split at its reduction over prompts, so a sweep can run it in
prompt chunks as it runs a per-prompt `Metric`.

A TransformerLens-style metric (`lambda logits: (logits[rows, -1, a] - logits[rows, -1, c]).mean()`)
is written for the whole batch, so the engine has had to run every prompt of a patch together. Its
traced program usually computes one value per prompt (the logit difference) and then mixes the
prompts (the mean). `split` reads the program with the actual inputs and finds that value: one
[batch] array whose entry i depends on prompt i's logits alone (and on constants), the only value
that depends on the logits and reaches the mixing part. The sweep then scores each prompt chunk for
that value (`RowScore`: the program's first part, run on the chunk's rows set into a batch-sized
array) and `Split.combine` runs the rest on the [patches, batch] values. Anything else (two such
values, a value mixed in another way, an operation this reading does not follow) returns None and
the sweep keeps the whole batch together: the split is exact or it is not made.
"""

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np

MAX_MAP_ENTRIES = 1 << 24  # the row map of the logits is materialized; larger logits are not split
CONST, MIXED = -1, -2  # row-map entries: depends on no prompt / on several

_ELEMENTWISE = {
    "add", "sub", "mul", "div", "neg", "exp", "exp2", "log", "log1p", "expm1", "tanh", "logistic", "max", "min",
    "abs", "sign", "pow", "integer_pow", "sqrt", "rsqrt", "square", "select_n", "convert_element_type", "eq", "ne",
    "lt", "le", "gt", "ge", "and", "or", "not", "xor", "stop_gradient", "erf", "clamp", "rem", "floor", "ceil",
    "round", "is_finite", "copy", "copy_p", "reduce_precision", "sin", "cos", "atan2", "erf_inv", "nextafter",
}
_MOVES = {"slice", "squeeze", "reshape", "gather", "dynamic_slice", "transpose", "broadcast_in_dim",
          "expand_dims", "rev", "copy", "copy_p", "convert_element_type", "pad"}
_REDUCTIONS = {"reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "argmax", "argmin", "reduce_and",
               "reduce_or"}
_CALLS = {"jit": "jaxpr", "pjit": "jaxpr", "closed_call": "call_jaxpr", "core_call": "call_jaxpr",
          "custom_jvp_call": "call_jaxpr", "remat": "jaxpr", "checkpoint": "jaxpr"}


class _Rows:
    """A traced value's row map: the prompt each entry depends on (CONST, MIXED, or a row)."""

    def __init__(self, rows):
        self.rows = np.asarray(rows)

    @property
    def pure(self):
        return not (self.rows == MIXED).any()

    @property
    def per_row(self):
        return self.pure and (self.rows >= 0).any()


def _combine(maps):
    """Entries depending on the rows of every map: one row where they agree, MIXED where not."""
    out = np.full(np.broadcast_shapes(*(m.shape for m in maps)), CONST)
    for m in np.broadcast_arrays(*maps):
        clash = (out >= 0) & (m >= 0) & (out != m) | (m == MIXED)
        out = np.where(clash, MIXED, np.where(out == CONST, m, out))
    return out


def _reduce(rows, axes):
    """The row map of a reduction over `axes`."""
    if not axes:
        return rows
    mixed = (rows == MIXED).any(axis=axes)
    hi = rows.max(axis=axes)
    lo = np.where(rows == CONST, np.iinfo(np.int32).max, rows).min(axis=axes)
    return np.where(mixed, MIXED, np.where(hi == CONST, CONST, np.where(lo == hi, hi, MIXED)))


def _dot(eqn, ins):
    """The row map of a dot_general: each operand's map reduced over its contracting dimensions,
    placed in the output's (batch, lhs free, rhs free) order."""
    (contract_l, contract_r), (batch_l, batch_r) = eqn.params["dimension_numbers"]
    ndims = [np.ndim(x.rows if isinstance(x, _Rows) else x) for x in ins]
    shape = eqn.outvars[0].aval.shape
    maps = []
    for side, (contract, batch) in enumerate(((contract_l, batch_l), (contract_r, batch_r))):
        if not isinstance(ins[side], _Rows):
            continue
        rows = ins[side].rows
        free = [d for d in range(rows.ndim) if d not in contract and d not in batch]
        rows = _reduce(np.transpose(rows, list(batch) + free + list(contract)),
                       tuple(range(len(batch) + len(free), rows.ndim)))
        other_free = ndims[1 - side] - len(contract) - len(batch)
        at = rows.ndim if side == 0 else len(batch)
        maps.append(np.broadcast_to(rows.reshape(rows.shape[:at] + (1,) * other_free + rows.shape[at:]), shape))
    return _combine(maps)


def _moved(eqn, rows, rest):
    """A move primitive applied to the row map (indices and pads concrete)."""
    params = dict(eqn.params)
    if eqn.primitive.name == "convert_element_type":
        params["new_dtype"] = jnp.int32
    if eqn.primitive.name == "pad":
        rest = [np.int32(CONST)]
    return np.asarray(eqn.primitive.bind(jnp.asarray(rows, jnp.int32), *rest, **params))


def _interpret(jaxpr, consts, args):
    """Evaluate `jaxpr` on concrete values, following each logit-dependent value's row map;
    returns (outputs, env)."""
    env = {}
    read = lambda v: v.val if isinstance(v, jax.extend.core.Literal) else env[v]
    for var, val in list(zip(jaxpr.constvars, consts)) + list(zip(jaxpr.invars, args)):
        env[var] = val
    for eqn in jaxpr.eqns:
        ins = [read(v) for v in eqn.invars]
        traced = [isinstance(x, _Rows) for x in ins]
        name = eqn.primitive.name
        if not any(traced):
            outs = eqn.primitive.bind(*ins, **eqn.params)
            outs = outs if eqn.primitive.multiple_results else [outs]
        elif name in _CALLS and _CALLS[name] in eqn.params:
            inner = eqn.params[_CALLS[name]]
            inner_jaxpr, inner_consts = (inner.jaxpr, inner.consts) if hasattr(inner, "consts") else (inner, ())
            outs = _interpret(inner_jaxpr, inner_consts, ins)[0]
        elif name in _MOVES and traced[0] and not any(traced[1:]):
            outs = [_Rows(_moved(eqn, ins[0].rows, ins[1:]))]
        elif name in _ELEMENTWISE or name == "concatenate":
            maps = [x.rows if isinstance(x, _Rows) else np.full(np.shape(x), CONST) for x in ins]
            if name == "concatenate":
                outs = [_Rows(np.concatenate(maps, axis=eqn.params["dimension"]))]
            else:
                outs = [_Rows(_combine(maps))]
        elif name == "dot_general":
            outs = [_Rows(_dot(eqn, ins))]
        elif name in _REDUCTIONS and len(ins) == 1:
            outs = [_Rows(_reduce(ins[0].rows, tuple(eqn.params["axes"])))]
        else:  # anything else mixes every row its inputs depend on
            outs = [_Rows(np.full(v.aval.shape, MIXED)) for v in eqn.outvars]
        for var, val in zip(eqn.outvars, outs):
            env[var] = val
    return [read(v) for v in jaxpr.outvars], env


def _needed(jaxpr, wanted, given=()):
    """The top-level equations that compute `wanted` vars, not looking past `given` ones."""
    producer = {v: eqn for eqn in jaxpr.eqns for v in eqn.outvars}
    need, stack = set(), [v for v in wanted if not isinstance(v, jax.extend.core.Literal)]
    seen = set(given)
    while stack:
        v = stack.pop()
        if v in seen or v not in producer:
            continue
        seen.add(v)
        eqn = producer[v]
        need.add(id(eqn))
        stack += [u for u in eqn.invars if not isinstance(u, jax.extend.core.Literal)]
    return [eqn for eqn in jaxpr.eqns if id(eqn) in need]


def _evaluate(jaxpr, consts, bound, eqns, wanted):
    """`wanted` vars of `jaxpr` from the `bound` {var: value} by the equations `eqns` (traceable)."""
    env = dict(zip(jaxpr.constvars, consts))
    env.update(bound)
    read = lambda v: v.val if isinstance(v, jax.extend.core.Literal) else env[v]
    for eqn in eqns:
        outs = eqn.primitive.bind(*[read(v) for v in eqn.invars], **eqn.params)
        outs = outs if eqn.primitive.multiple_results else [outs]
        env.update(zip(eqn.outvars, outs))
    return [read(v) for v in wanted]


class RowScore:
    """A `score` giving the split value of each prompt of a chunk: the chunk's logits set into a
    batch-sized array at their rows (`data["split.rows"]`), the program's first part run on it with
    the whole batch's data (`data["split.full"]`, one copy per row), the chunk's entries taken."""

    def __init__(self, inner, closed, cut, batch):
        self.inner, self.closed, self.cut, self.batch = inner, closed, cut, batch
        self.eqns = _needed(closed.jaxpr, [cut])
        producer = next(i for i, e in enumerate(closed.jaxpr.eqns) if cut in e.outvars)
        # equal for the same callable (or structure, when lifted) on the same shapes: the same program
        self._key = (inner, batch, producer, closed.jaxpr.eqns[producer].outvars.index(cut),
                     tuple(v.aval.shape for v in closed.jaxpr.invars))

    def __call__(self, logits, clean_logits, data):
        rows = data["split.rows"]
        full = jnp.zeros((self.batch,) + logits.shape[1:], logits.dtype).at[rows].set(logits)
        leaves = [v[0] for v in data["split.full"]]
        jaxpr = self.closed.jaxpr
        bound = dict(zip(jaxpr.invars, [full] + leaves))
        (value,) = _evaluate(jaxpr, self.closed.consts, bound, self.eqns, [self.cut])
        return value[rows]

    def __hash__(self):
        return hash(self._key)

    def __eq__(self, other):
        return isinstance(other, RowScore) and other._key == self._key


@functools.partial(jax.jit, static_argnums=0)
def _combine_patches(row_score, values, leaves):
    """The program's rest on each patch's [batch] split values -> its scores."""
    closed = row_score.closed
    jaxpr = closed.jaxpr
    rest = _needed(jaxpr, jaxpr.outvars, given=[row_score.cut])

    def one(value):
        bound = dict(zip(jaxpr.invars[1:], leaves))
        bound[row_score.cut] = value
        return _evaluate(jaxpr, closed.consts, bound, rest, jaxpr.outvars)[0]

    return jax.vmap(one)(values)


class Split:
    """A metric's per-prompt part (`score`, `data` for the engine's prompt chunks) and `combine`."""

    def __init__(self, row_score, data, leaves):
        self.score, self.data, self._leaves = row_score, data, leaves

    def combine(self, values):
        """[patches, batch] split values -> the metric's raw scores [patches] or [patches, batch]."""
        return np.asarray(_combine_patches(self.score, jnp.asarray(values, jnp.float32), self._leaves))


def split(score, data, shape):
    """A `Split` of `score(logits, clean, data)` on logits `shape` [batch, K, vocab] at its one
    per-prompt value mixed over prompts, or None where there is no such exact split."""
    batch = shape[0]
    if np.prod(shape) > MAX_MAP_ENTRIES:
        return None
    leaves, tree = jax.tree_util.tree_flatten(data)
    fn = lambda lg, *flat: score(lg, lg, jax.tree_util.tree_unflatten(tree, flat))
    try:
        with warnings.catch_warnings():  # casts of the program's constants while reading it
            warnings.simplefilter("ignore", RuntimeWarning)
            closed = jax.make_jaxpr(fn)(jax.ShapeDtypeStruct(tuple(shape), jnp.float32),
                                        *[jax.ShapeDtypeStruct(np.shape(a), np.asarray(a).dtype) for a in leaves])
            logits_rows = _Rows(np.broadcast_to(np.arange(batch, dtype=np.int32)[:, None, None], shape))
            outs, env = _interpret(closed.jaxpr, closed.consts, [logits_rows] + [np.asarray(a) for a in leaves])
    except Exception:  # a primitive this reading cannot follow on concrete values
        return None
    jaxpr = closed.jaxpr
    if len(outs) != 1:
        return None
    # The cut: the logit-dependent, per-prompt values that reach a part mixing prompts (or the output).
    mixing = [eqn for eqn in jaxpr.eqns if any(isinstance(env.get(v), _Rows) and not env[v].pure
                                                for v in eqn.outvars)]
    cut = {v for eqn in mixing for v in eqn.invars
           if not isinstance(v, jax.extend.core.Literal) and isinstance(env.get(v), _Rows) and env[v].per_row}
    out = jaxpr.outvars[0]
    if isinstance(env.get(out), _Rows) and env[out].per_row:
        cut.add(out)
    if len(cut) != 1:
        return None
    (cut,) = cut
    if cut.aval.shape != (batch,) or not (env[cut].rows == np.arange(batch)).all():
        return None
    # The rest must read the logits only through the cut.
    for eqn in _needed(jaxpr, jaxpr.outvars, given=[cut]):
        for v in eqn.invars:
            if isinstance(v, jax.extend.core.Literal):
                continue
            if v is jaxpr.invars[0] or (v is not cut and isinstance(env.get(v), _Rows) and env[v].per_row):
                return None
    row_score = RowScore(score, closed, cut, batch)
    full = [np.broadcast_to(np.asarray(a), (batch,) + np.shape(a)) for a in leaves]
    split_data = {"split.rows": np.arange(batch, dtype=np.int32), "split.full": full}
    return Split(row_score, split_data, [jnp.asarray(a) for a in leaves])
