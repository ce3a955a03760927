"""Atomic writes: a file or folder appears whole or not at all, and only where jpatch may write.

Folders (`atomic_dir`) are built under a temporary name beside the target and renamed at the
end, after `jpatch.files.safety.check_output` has accepted the target; files (`atomic_write`)
are written to a temporary file, fsynced and renamed. `to_json` is the one conversion of
settings and numbers to JSON for every file jpatch writes.
"""

import contextlib
import hashlib
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np

from jpatch.files import safety


def check_target(out_dir, overwrite=False, *, kind="output", inputs=()):
    """Raise unless `out_dir` may be written as a jpatch `kind` output (`jpatch.files.safety.check_output`):
    new, empty, or with `overwrite` a previous jpatch output of that kind."""
    return safety.check_output(out_dir, kind, overwrite, inputs=inputs)


@contextlib.contextmanager
def atomic_dir(out_dir, overwrite=False, *, kind="output", inputs=()):
    """Yield a temporary folder beside `out_dir`; on success it is marked as a jpatch `kind`
    output and replaces `out_dir`, on failure it is removed.

    Parent folders created here are removed again on failure too; temporaries of killed
    runs into the same place are removed first.
    """
    out_dir = check_target(out_dir, overwrite, kind=kind, inputs=inputs).absolute()
    created = [p for p in [out_dir.parent, *out_dir.parent.parents] if not p.exists()]
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    safety.remove_stale(out_dir.parent, out_dir.name)
    tmp = out_dir.parent / safety.tmp_name(out_dir.name)
    tmp.mkdir()
    try:
        yield tmp
        safety.write_marker(tmp, kind)
        check_target(out_dir, overwrite, kind=kind, inputs=inputs)  # something may have appeared meanwhile
        if out_dir.exists():
            old = out_dir.parent / safety.tmp_name(out_dir.name, "old")
            out_dir.rename(old)
            try:
                tmp.rename(out_dir)
            except BaseException:
                old.rename(out_dir)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for p in created:  # innermost first
            with contextlib.suppress(OSError):
                p.rmdir()
        raise


def to_json(obj, *, str_keys=False):
    """`obj` with NumPy scalars / arrays and tuples turned into JSON types and non-finite floats
    into null (JSON has no NaN); raises TypeError naming the key. str_keys: str() other keys
    instead of refusing them."""

    def convert(x, where):
        if isinstance(x, dict):
            out = {}
            for k, v in x.items():
                if str_keys:
                    k = str(k)
                if not isinstance(k, str):
                    raise TypeError(f"settings key {where}{k!r} is not a str")
                out[k] = convert(v, f"{where}{k}.")
            return out
        if isinstance(x, (list, tuple)):
            return [convert(v, where) for v in x]
        if isinstance(x, np.ndarray):
            return convert(x.tolist(), where)
        if isinstance(x, np.generic):
            return convert(x.item(), where)
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, Path):
            return str(x)
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        raise TypeError(f"setting {where.rstrip('.') or 'value'!r} is a {type(x).__name__}, which JSON cannot store")

    return convert(obj, "")


def _tmp_path(path):
    path = Path(path)
    return path.parent / safety.tmp_name(path.name)


def atomic_write(path, write):
    """Call `write(file)` on a temporary file beside `path`, fsync it, then rename it to `path`.

    Readers see either no file or the whole file; on failure the temporary file is removed.
    """
    path = Path(path)
    tmp = _tmp_path(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_json(path, obj):
    text = json.dumps(to_json(obj), indent=2, sort_keys=False) + "\n"
    return atomic_write(path, lambda f: f.write(text.encode()))


def atomic_write_npz(path, arrays):
    return atomic_write(path, lambda f: np.savez(f, **arrays))


def file_sha256(path):
    """The sha256 of a file's bytes (hex), read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
