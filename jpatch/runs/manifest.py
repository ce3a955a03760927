"""A bulk run's manifest.json: the run's identity (settings, hashes of the model's weights and
the dataset's content), written by process 0 and checked by every process and every resume, so
results of different settings are never mixed; and the shards' checksums recorded in it."""

import contextlib
import hashlib
import logging
import os
import time

import numpy as np

from jpatch.data.dataset import canonical_json
from jpatch.files import atomic, safety
from jpatch.runs import results

log = logging.getLogger("jpatch.bulk")
# Settings that identify a run's numbers (a resume must match them); "model" and "dataset"
# (a name and a path) are informational: the hashes identify the weights and the content.
INFO_SETTINGS = ("model", "dataset")


def model_hash(model):
    """sha256 of the model's config and every weight (name, dtype, shape, bytes)."""
    from jpatch.model.checkpoint import named_arrays

    h = hashlib.sha256(canonical_json(model.config.to_dict()).encode())
    for name, a in sorted(named_arrays(model).items()):
        a = np.ascontiguousarray(np.asarray(a))
        h.update(f"{name}:{a.dtype.str}:{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def run_hash(settings):
    compared = {k: v for k, v in settings.items() if k not in INFO_SETTINGS}
    return hashlib.sha256(canonical_json(atomic.to_json(compared)).encode()).hexdigest()


def _describe_differences(stored, current):
    lines = []
    for key in sorted(set(stored) | set(current)):
        if key in INFO_SETTINGS:
            continue
        a, b = stored.get(key), current.get(key)
        if a == b:
            continue
        if key == "model_hash":
            lines.append(f"model weights differ (stored hash {str(a)[:12]}, now {str(b)[:12]})")
        elif key == "dataset_hash":
            lines.append(f"dataset content differs (stored hash {str(a)[:12]}, now {str(b)[:12]})")
        else:
            lines.append(f"{key}: stored {a!r}, now {b!r}")
    return lines


def _check_manifest(out_dir, manifest, expected):
    if manifest["hash"] == expected["hash"]:
        return
    diffs = _describe_differences(manifest.get("settings", {}), expected["settings"]) or ["(the run hash differs)"]
    raise ValueError(
        f"{out_dir} holds a bulk run with other settings; refusing to mix results:\n  "
        + "\n  ".join(diffs)
        + "\nUse another output folder, or delete this one to start over."
    )


@contextlib.contextmanager
def _manifest_lock(out_dir, timeout=60.0):
    """Serialize writes of manifest.json between processes sharing the folder."""
    lock = safety.Lock(out_dir / f".{results.MANIFEST_FILE}.lock")
    deadline = time.monotonic() + timeout
    while not lock.acquire():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{lock.path} is held for over {timeout:.0f} s ({lock.describe()}); "
                               "delete it if that process is gone")
        time.sleep(0.02)
    try:
        yield
    finally:
        lock.release()


def _read_or_rebuild(out_dir, path):
    """The folder's manifest; rebuilt from the shards when manifest.json is missing or unreadable."""
    if path.is_file():
        try:
            return results.read_manifest(out_dir)
        except ValueError as e:
            if not any(out_dir.glob("shard-*.npz")):
                raise
            log.warning(f"jpatch bulk: {e}; rebuilding it from the shards")
    else:
        log.warning(f"jpatch bulk: {out_dir} has shards but no {path.name}; rebuilding it from the shards")
    return results.rebuild_manifest(out_dir)


def prepare_out_dir(out_dir, expected, process_index, timeout):
    """Write or verify manifest.json (process 0 writes it; the others wait for it).

    A missing or damaged manifest is rebuilt from the shards; a folder holding anything
    else is refused. Returns the manifest on disk (with the checksums recorded so far)."""
    path = out_dir / results.MANIFEST_FILE
    safety.check_placement(out_dir)  # not the working directory, a folder holding it, a link or a file
    has_shards = out_dir.is_dir() and any(out_dir.glob("shard-*.npz"))
    if path.is_file() or has_shards:
        with _manifest_lock(out_dir):
            manifest = _read_or_rebuild(out_dir, path)
        _check_manifest(out_dir, manifest, expected)
        return manifest
    if process_index == 0:
        if out_dir.exists():
            names = [results.MANIFEST_FILE] + [results.shard_name(i) for i in range(expected["n_shards"])]
            others = [p.name for p in out_dir.iterdir() if not safety.is_own_file(p, names, "bulk")]
            if others and not path.is_file():  # (a manifest now: another run is starting in this folder)
                raise FileExistsError(
                    f"{out_dir} is not empty ({', '.join(sorted(others)[:5])}) and holds no bulk manifest; "
                    "use an empty or new folder"
                )
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise PermissionError(f"cannot create the output folder {out_dir}: {e.strerror}") from None
        if not os.access(out_dir, os.W_OK):
            raise PermissionError(f"the output folder {out_dir} is not writable")
        with _manifest_lock(out_dir):
            if not path.is_file():  # another run into the same folder may have written it meanwhile
                atomic.atomic_write_json(path, expected)
                safety.write_marker(out_dir, "bulk", files=[])
            manifest = results.read_manifest(out_dir)
        _check_manifest(out_dir, manifest, expected)
        return manifest
    log.warning(f"jpatch bulk: process {process_index}: waiting up to {timeout:.0f} s for process 0 to write {path}")
    deadline = time.monotonic() + timeout
    while not path.is_file():
        if time.monotonic() > deadline:
            raise TimeoutError(f"process {process_index}: no {path} after {timeout:.0f} s; process 0 writes it "
                               "(is it running, with the same --out?)")
        time.sleep(0.2)
    manifest = results.read_manifest(out_dir)
    _check_manifest(out_dir, manifest, expected)
    return manifest


def record_checksums(out_dir, digests):
    """Add {shard name: sha256} to manifest.json (read, update and replace under the manifest lock)."""
    with _manifest_lock(out_dir):
        manifest = results.read_manifest(out_dir)
        manifest["shards"] = {**manifest.get("shards", {}), **digests}
        atomic.atomic_write_json(out_dir / results.MANIFEST_FILE, manifest)
