"""What a user's Python callable reads besides its arguments, as a hashable key.

jit reuses a compiled program for a static callable that compares equal, and the program has the
values the callable read while tracing baked in. A notebook reuses `metric = lambda logits: ...`
after rebinding `answers`, or an `Apply(fn)` after changing a vector fn adds: keyed by the callable
alone, the old program (and the old numbers) would come back. Keyed by `captured_state`, it is
reused only while what the callable reads is unchanged.
"""

import functools
import hashlib
import types

import jax
import numpy as np


def _value_key(x, module, depth, seen):
    """A hashable stand-in for a value a callable reads: arrays and plain data by value (their
    bytes hashed), the user's own functions by what they read in turn, anything else by identity."""
    if isinstance(x, (np.ndarray, np.generic, jax.Array)) and not isinstance(x, jax.core.Tracer):
        a = np.asarray(x)
        return ("array", a.shape, str(a.dtype), hashlib.sha1(a.tobytes()).hexdigest())
    if x is None or isinstance(x, (bool, int, float, complex, str, bytes)):
        return (type(x).__name__, x)
    if isinstance(x, (list, tuple)):
        return (type(x).__name__,) + tuple(_value_key(v, module, depth, seen) for v in x)
    if isinstance(x, dict):
        return ("dict",) + tuple((repr(k), _value_key(v, module, depth, seen)) for k, v in x.items())
    if isinstance(x, (types.FunctionType, functools.partial)) and depth < 4 and id(x) not in seen:
        func = x.func if isinstance(x, functools.partial) else x
        if getattr(func, "__module__", None) in (module, "__main__"):  # the user's code, not a library's
            seen.add(id(x))
            return ("function", id(x), captured_state(x, module, depth + 1, seen))
    return ("object", id(x))


def _code_names(code):
    """Every global name a code object (and the functions and comprehensions inside it) may read."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _code_names(const)
    return names


def captured_state(fn, module=None, depth=0, seen=None):
    """What a Python callable reads besides its argument (globals its code names, closure cells,
    defaults, a partial's arguments), as a hashable key: a compiled program that baked those values
    in is reused only while they are unchanged (a notebook reuses `metric` after rebinding `answers`)."""
    seen = set() if seen is None else seen
    if isinstance(fn, functools.partial):
        module = module or getattr(fn.func, "__module__", None)
        return ("partial", _value_key(fn.func, module, depth, seen), _value_key(fn.args, module, depth, seen),
                _value_key(dict(fn.keywords), module, depth, seen))
    if not isinstance(fn, types.FunctionType):
        return ("object", id(fn))
    module = module or fn.__module__
    key = lambda v: _value_key(v, module, depth, seen)
    names = sorted(n for n in _code_names(fn.__code__) if n in fn.__globals__)
    cells = []
    for cell in fn.__closure__ or ():
        try:
            cells.append(key(cell.cell_contents))
        except ValueError:  # an empty cell (a name assigned later)
            cells.append(("empty",))
    return (tuple((n, key(fn.__globals__[n])) for n in names), tuple(cells), key(fn.__defaults__),
            key(fn.__kwdefaults__))


# A callable's structure and its captured arrays, apart: a metric closure made anew for each call
# (`lambda logits: logits[rows, -1, answers]` over new answers) is keyed by its structure and fed
# its arrays as arguments, so one compiled program serves every closure of the same form.

MAX_LIFTED = 4096  # elements of captured arrays passed as arguments; larger ones are baked in


class Lifted:
    """`fn` split into `key` (hashable: its code, and every value it reads that is not passed as
    `captured_state` keys it, and the shape and dtype of each passed array) and `leaves` (the
    arrays in the globals its code reads, its closure cells, defaults and the user's functions it
    reads, as np.ndarrays of JAX's dtypes); `build(leaves)` is `fn` with those leaves in their
    places. Two callables with equal keys compute the same function of their leaves; `kept` holds
    the values baked in (their keys may be ids)."""

    def __init__(self, fn, key, leaves, rebuild, kept):
        self.fn, self.key, self.leaves, self._rebuild, self.kept = fn, key, tuple(leaves), rebuild, kept

    def build(self, leaves):
        if len(leaves) != len(self.leaves):
            raise ValueError(f"expected {len(self.leaves)} captured arrays, got {len(leaves)}")
        return self._rebuild(iter(leaves))


def _leaf(x):
    """x as an array to pass as an argument (np.ndarray of a JAX dtype), or None to bake it in:
    a JAX array keeps its dtype (a weakly typed one promotes differently once passed: baked);
    NumPy's int64 passes as JAX's int32 (what jnp makes of it) when every value fits; float64 and
    other dtypes JAX would narrow are baked, so a passed array reads exactly what the callable would."""
    if isinstance(x, jax.core.Tracer) or not isinstance(x, (np.ndarray, np.generic, jax.Array)):
        return None
    if isinstance(x, jax.Array) and x.weak_type:
        return None
    a = np.asarray(x)
    try:
        canonical = np.dtype(jax.dtypes.canonicalize_dtype(a.dtype))
    except (TypeError, ValueError):
        return None
    if canonical == a.dtype:
        return a
    if a.dtype.kind in "iu" and canonical.kind == a.dtype.kind and a.size:
        info = np.iinfo(canonical)
        if info.min <= a.min() and a.max() <= info.max:
            return a.astype(canonical)
    return None


def _split(x, module, depth, seen, budget, kept):
    """(key, leaves, rebuild(iterator of leaves) -> value) of a value a callable reads; `kept`
    collects the values baked in, so the ids their keys may hold stay theirs while the key lives."""
    a = _leaf(x)
    if a is not None and a.size <= budget[0]:
        budget[0] -= a.size
        return ("leaf", a.shape, str(a.dtype)), [a], lambda it: next(it)
    if type(x) in (tuple, list) or (type(x) is dict and all(type(k) is str for k in x)):
        items = list(x.values()) if type(x) is dict else list(x)
        parts = [_split(v, module, depth, seen, budget, kept) for v in items]
        keys = tuple(x) if type(x) is dict else len(x)
        leaves = [leaf for _, part, _ in parts for leaf in part]

        def rebuild(it, kind=type(x), keys=keys, parts=parts):
            values = [r(it) for _, _, r in parts]
            return dict(zip(keys, values)) if kind is dict else kind(values)
        return ("split", type(x).__name__, keys, tuple(k for k, _, _ in parts)), leaves, rebuild
    if (isinstance(x, types.FunctionType) and depth < 4 and id(x) not in seen
            and getattr(x, "__module__", None) in (module, "__main__")):  # the user's code, not a library's
        seen.add(id(x))
        return _split_function(x, module, depth + 1, seen, budget, kept)
    kept.append(x)
    return _value_key(x, module, depth, seen), [], lambda it, x=x: x


def _split_function(fn, module, depth, seen, budget, kept):
    """A function's key, leaves and rebuild: the globals its code reads (a copy of its globals dict
    holds the passed ones), closure cells, defaults and keyword defaults, in that order."""
    split = lambda v: _split(v, module, depth, seen, budget, kept)
    names = sorted(n for n in _code_names(fn.__code__) if n in fn.__globals__)
    bound = [split(fn.__globals__[n]) for n in names]
    cells = []
    for cell in fn.__closure__ or ():
        try:
            cells.append(split(cell.cell_contents))
        except ValueError:  # an empty cell (a name assigned later)
            cells.append((("empty",), [], None))
    defaults, kwdefaults = split(fn.__defaults__), split(fn.__kwdefaults__)
    parts = bound + cells + [defaults, kwdefaults]
    key = ("code", fn.__code__, tuple(names), tuple(k for k, _, _ in parts))
    leaves = [leaf for _, part, _ in parts for leaf in part]
    passes_globals = any(part for _, part, _ in bound)

    def rebuild(it):
        values = {n: r(it) for n, (_, _, r) in zip(names, bound)}
        scope = {**fn.__globals__, **values} if passes_globals else fn.__globals__
        closure = tuple(types.CellType() if r is None else types.CellType(r(it)) for _, _, r in cells)
        new = types.FunctionType(fn.__code__, scope, fn.__name__, defaults[2](it), closure or None)
        new.__kwdefaults__ = kwdefaults[2](it)
        new.__dict__.update(fn.__dict__)
        new.__qualname__ = fn.__qualname__
        return new
    return key, leaves, rebuild


def lift(fn, max_elements=MAX_LIFTED):
    """`fn` (a plain Python function) as a `Lifted`, passing captured arrays of up to `max_elements`
    elements in all; None for any other callable (keyed by `captured_state` instead)."""
    if not isinstance(fn, types.FunctionType):
        return None
    kept = []
    key, leaves, rebuild = _split_function(fn, fn.__module__, 0, set(), [max_elements], kept)
    return Lifted(fn, key, leaves, rebuild, kept)
