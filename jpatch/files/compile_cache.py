"""JAX's persistent compilation cache, on by default in a per-user folder, in a form that survives
faults: a program compiled once is loaded from disk by the next process instead of compiled again.

What crashed before (issue 23; the cache was off by default since): test processes segfaulted
inside JAX's cache calls while serializing and reading entries. Reproduced here by using up the
process's memory-map slots (vm.max_map_count, 65530; every loaded XLA:CPU program holds about 6),
the state of a test process that kept thousands of compiled programs alive: with the cache off,
XLA aborts in its compiler ("Unable to allocate section memory"); with it on, the same exhaustion
segfaults in the cache's compile-and-write path or aborts while loading an entry. The cache was
where the crash showed, not its cause, and the suite drops its compiled programs after each module
since (tests/conftest.py). The cache's own faults are handled here instead of left to JAX's
defaults: entries are written atomically (a concurrent reader, a killed writer or a full disk never
leaves a half-written entry), each carries a SHA-256 checked on reading (a corrupt or truncated
entry is deleted and the program compiled again, never loaded), any failure to read or write is a
cache miss (a read-only or full folder compiles as without a cache), and the folder is named after
the JAX version and the CPU, so no process loads code built for another machine or JAX.

JPATCH_COMPILE_CACHE=0 turns it off; a JAX cache the user configured (JAX_COMPILATION_CACHE_DIR or
jax.config) is left alone.
"""

import contextlib
import hashlib
import os
import platform
import tempfile
from pathlib import Path

import jax

ENV = "JPATCH_COMPILE_CACHE"
MAX_BYTES = 2 << 30  # the folder's size limit; the least recently used entries go first
MIN_COMPILE_SECS = 0.05  # programs that compile faster are not worth a file (most eager ops)
_MAGIC = b"jpatch-xla-1\n"
_SUFFIX = "-cache"


def folder():
    """This user's cache folder for this JAX and CPU: $XDG_CACHE_HOME/jpatch/xla/<tag> (~/.cache
    without XDG_CACHE_HOME)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "jpatch" / "xla" / _tag()


def _tag():
    """JAX's and jaxlib's versions and a fingerprint of the CPU (XLA:CPU compiles for the host's
    instruction set, which JAX's cache key does not include)."""
    import jaxlib

    cpu = platform.machine() + platform.processor()
    with contextlib.suppress(OSError):
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu += "".join(sorted({line for line in lines if line.split(":")[0].strip() in ("model name", "flags")}))
    return f"jax-{jax.__version__}-jaxlib-{jaxlib.__version__}-{hashlib.sha256(cpu.encode()).hexdigest()[:12]}"


class SafeCache:
    """JAX's cache interface (get, put) over a folder of checksummed, atomically written entries."""

    def __init__(self, path, max_bytes=MAX_BYTES):
        self._path = Path(path)
        self.max_bytes = max_bytes

    def get(self, key):
        """The entry's bytes, or None (a miss) when absent, unreadable or not intact."""
        path = self._path / (key + _SUFFIX)
        try:
            data = path.read_bytes()
        except OSError:
            return None
        digest, value = data[len(_MAGIC): len(_MAGIC) + 32], data[len(_MAGIC) + 32:]
        if not data.startswith(_MAGIC) or hashlib.sha256(value).digest() != digest:
            with contextlib.suppress(OSError):  # corrupt or truncated: compiled again and rewritten
                path.unlink()
            return None
        with contextlib.suppress(OSError):
            os.utime(path)  # recently used
        return value

    def put(self, key, value):
        """Write the entry whole or not at all; a failure (read-only, full) writes nothing."""
        path = self._path / (key + _SUFFIX)
        if len(value) > self.max_bytes or path.exists():
            return
        tmp = None
        try:
            self._evict(len(value))
            fd, tmp = tempfile.mkstemp(dir=self._path, prefix=".tmp-")
            with os.fdopen(fd, "wb") as f:
                f.write(_MAGIC + hashlib.sha256(value).digest() + value)
            os.replace(tmp, path)
            tmp = None
        except OSError:
            pass
        finally:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)

    def _evict(self, incoming):
        """Delete the least recently used entries until `incoming` more bytes fit."""
        entries = []
        for p in self._path.glob("*" + _SUFFIX):
            with contextlib.suppress(OSError):
                st = p.stat()
                entries.append((st.st_mtime, st.st_size, p))
        total = sum(size for _, size, _ in entries) + incoming
        for _, size, p in sorted(entries, key=lambda e: e[0]):
            if total <= self.max_bytes:
                break
            with contextlib.suppress(OSError):
                p.unlink()
            total -= size


def _own_folder(path):
    """Create `path` for this user alone; False when it is not this user's, or others may write
    to it (JAX runs what a cache holds: it must be trusted)."""
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        st = path.stat()
    except OSError:
        return False
    return st.st_uid == os.getuid() and not st.st_mode & 0o022


def enable():
    """Turn the cache on for this process unless JPATCH_COMPILE_CACHE=0 or the user configured a
    JAX cache. Returns the folder, or None when off. Call before anything is compiled."""
    if os.environ.get(ENV, "1") == "0" or jax.config.jax_compilation_cache_dir is not None:
        return None
    path = folder()
    if not _own_folder(path):
        return None
    try:
        from jax._src import compilation_cache as jax_cache  # the hook for a cache of our own
    except ImportError:
        return None
    if not hasattr(jax_cache, "_cache") or not hasattr(jax_cache, "_cache_initialized"):
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECS)
    if "JAX_PERSISTENT_CACHE_ENABLE_XLA_CACHES" not in os.environ:
        # XLA's own GPU caches would write unchecked files here and put this folder's path in every
        # program's key (a moved or copied cache would never hit); jpatch turns GPU autotuning off.
        jax.config.update("jax_persistent_cache_enable_xla_caches", "none")
    with jax_cache._cache_initialized_mutex:
        jax_cache._cache = SafeCache(path)
        jax_cache._cache_initialized = True
    return path
