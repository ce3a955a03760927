"""The persistent compilation cache (jpatch.files.compile_cache) in real processes: concurrent
processes sharing one folder, corrupt and truncated entries, a read-only folder and a full one
each fall back to compiling, never crash, and give exactly the numbers of a process without the
cache; JPATCH_COMPILE_CACHE=0 and a user's own JAX cache turn jpatch's off."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from jpatch.files.compile_cache import SafeCache

# A tiny GPT-2's logits: a few programs, every one written to the cache (no minimum compile time).
WORKER = """
import collections, json, os, sys
if os.environ.get("FSIZE_LIMIT"):  # a full disk: writes past the limit fail (EFBIG) instead of killing us
    import resource, signal
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    limit = int(os.environ["FSIZE_LIMIT"])
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
import jax, numpy as np
events = collections.Counter()
jax.monitoring.register_event_listener(lambda e, **kw: events.update([e]))
import jpatch
model = jpatch.GPT2.init(jpatch.GPT2Config(n_layer=2, n_head=2, d_model=32, d_mlp=64, n_ctx=16, d_vocab=97),
                         key=jax.random.PRNGKey(0), std=0.1)
logits = np.asarray(model(np.arange(10).reshape(2, 5) % 97))
print(json.dumps({"logits": logits.ravel().tolist(), "dir": jax.config.jax_compilation_cache_dir,
                  "hits": events["/jax/compilation_cache/cache_hits"],
                  "misses": events["/jax/compilation_cache/cache_misses"]}))
"""


def command():
    return [sys.executable, "-c", WORKER]


def env(home, cache="1", **extra):
    out = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    return {**out, "XDG_CACHE_HOME": str(home), "JPATCH_COMPILE_CACHE": cache,
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", **extra}


def finish(proc):
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def run(cmd, environ):
    return finish(subprocess.Popen(cmd, env=environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))


def entries(home):
    return sorted(home.glob("jpatch/xla/*/*-cache"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The logits without a cache; JPATCH_COMPILE_CACHE=0 creates no folder."""
    home = tmp_path_factory.mktemp("off")
    got = run(command(), env(home, "0"))
    assert got["dir"] is None and not (home / "jpatch").exists()
    return got["logits"]


@pytest.fixture(scope="module")
def warm(tmp_path_factory, reference):
    """Three processes start together on one empty folder, then a fourth reads what they wrote."""
    home = tmp_path_factory.mktemp("shared")
    procs = [subprocess.Popen(command(), env=env(home), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    for got in map(finish, procs):
        assert got["logits"] == reference and got["misses"] > 0
    assert entries(home) and not list(home.glob("jpatch/xla/*/.tmp-*"))
    got = run(command(), env(home))
    assert got["logits"] == reference and got["hits"] > 0 and got["misses"] == 0
    assert got["dir"].startswith(str(home / "jpatch" / "xla"))
    return home


def copy(warm, tmp_path):
    home = tmp_path / "home"
    shutil.copytree(warm, home)
    return home


def test_corrupt_and_truncated_entries_are_compiled_again(warm, reference, tmp_path):
    home = copy(warm, tmp_path)
    files = entries(home)
    for i, path in enumerate(files):
        data = bytearray(path.read_bytes())
        if i % 2:
            data[len(data) // 2] ^= 0xFF  # a flipped byte: its checksum no longer matches
        else:
            data = data[: len(data) // 2]  # cut short, as by a killed writer
        path.write_bytes(bytes(data))
    got = run(command(), env(home))
    assert got["logits"] == reference and got["hits"] == 0 and got["misses"] > 0
    cache = SafeCache(files[0].parent)
    for path in entries(home):  # rewritten whole
        assert cache.get(path.name[: -len("-cache")]) is not None


def read_only(cmd, folder):
    """`cmd` run with `folder` read-only: by its permissions, or, where they do not bind (root),
    in a mount namespace with the folder bound read-only."""
    for path in [folder, *folder.rglob("*")]:
        path.chmod(0o555 if path.is_dir() else 0o444)
    probe = folder / "probe"
    try:
        probe.write_bytes(b"")
    except OSError:
        return cmd
    probe.unlink()
    wrap = ["unshare", "-m", "sh", "-c", 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && shift && exec "$@"',
            str(folder), "--", *cmd]
    if shutil.which("unshare") and subprocess.run(wrap[:-len(cmd)] + ["true"], capture_output=True).returncode == 0:
        return wrap
    pytest.skip("cannot make a folder read-only here (root without mount namespaces)")


def test_read_only_folder(warm, reference, tmp_path):
    home = copy(warm, tmp_path)
    folder = entries(home)[0].parent
    before = entries(home)
    got = run(read_only(command(), home / "jpatch"), env(home))  # full: read from it
    assert got["logits"] == reference and got["hits"] > 0
    shutil.rmtree(home / "jpatch", onerror=lambda f, p, e: (os.chmod(os.path.dirname(p), 0o755), f(p)))
    folder.mkdir(parents=True, mode=0o700)
    got = run(read_only(command(), home / "jpatch"), env(home))  # empty: compile, write nothing
    assert got["logits"] == reference and got["misses"] > 0
    assert entries(home) == [] and before


def test_full_folder(reference, tmp_path):
    """Writes fail part-way (the file size limit stands in for a full disk): nothing half-written
    is left, and the numbers are the same."""
    got = run(command(), env(tmp_path, FSIZE_LIMIT="600"))
    assert got["logits"] == reference and got["misses"] > 0
    assert not list(tmp_path.glob("jpatch/xla/*/.tmp-*"))
    files = entries(tmp_path)
    assert all(SafeCache(p.parent).get(p.name[: -len("-cache")]) is not None for p in files)


def test_users_own_jax_cache_is_left_alone(reference, tmp_path):
    got = run(command(), env(tmp_path, JAX_COMPILATION_CACHE_DIR=str(tmp_path / "mine")))
    assert got["logits"] == reference and got["dir"] == str(tmp_path / "mine")
    assert not (tmp_path / "jpatch").exists()


def test_least_recently_used_entries_go_first(tmp_path):
    cache = SafeCache(tmp_path, max_bytes=3000)
    for i in range(3):
        cache.put(f"k{i}", bytes([i]) * 900)
        os.utime(tmp_path / f"k{i}-cache", (1000 + i, 1000 + i))
    assert cache.get("k0") == bytes([0]) * 900  # read: now the most recent
    cache.put("k3", b"x" * 900)
    assert cache.get("k1") is None and cache.get("k0") is not None and cache.get("k3") == b"x" * 900
    cache.put("big", b"y" * 4000)  # larger than the whole cache: not written
    assert cache.get("big") is None
