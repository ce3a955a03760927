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
