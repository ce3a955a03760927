"""Saved sweep results: one folder per sweep, or one folder of shards per bulk sweep.

Single sweep (`save_result`), written atomically (a temporary folder renamed at the end)::

    out_dir/result.npz      the arrays, e.g. {"resid_pre": [layer, pos]}
    out_dir/settings.json   how they were made (model, task, site, corruption, metric,
                            direction, window, seed, jpatch_version, ...)

Bulk sweep (`jpatch.runs.bulk.bulk_sweep`), written shard by shard::

    out_dir/manifest.json       {"format": "jpatch-bulk", "settings": {...}, "hash": ...,
                                 "n_prompts", "shard_size", "n_shards", "max_len",
                                 "sites": {name: {"site", "axes", "grid"}},
                                 "shards": {"shard-00000.npz": sha256 of the file, ...}}
    out_dir/shard-00000.npz     "index" [n] dataset indices (0-based, file order) of its prompts,
                                "length" [n] their token lengths, "run_hash" (the manifest's hash),
                                "manifest" (the run's manifest as JSON text, without "shards"),
                                "clean_score" / "corrupted_score" [n] the baselines, and per site
                                name "raw.<name>" [n, *grid] the patched scores and "<name>"
                                [n, *grid] each prompt normalized by its own baselines (float32)

Loading and resuming verify each shard against its recorded sha256 (`check_shard`); a
lost or damaged manifest.json is rebuilt from the shards (`rebuild_manifest`).

Shard k holds the prompts k * shard_size ... (k + 1) * shard_size - 1 of the dataset
ordered by (token length, line), so a shard's prompts share few lengths. A shard
file exists only once complete (temporary file + `os.replace`). Grid axes over
positions ("pos", "src") are padded to the dataset's longest prompt (`max_len`)
with NaN: prompt i's values live at positions [0, length[i]). A prompt whose
metric is undefined (e.g. equal clean and corrupted baselines) is NaN throughout.

`load_result(path)` reads either kind and returns a `Result`.
"""

import json
import warnings
from pathlib import Path

import numpy as np

from jpatch.engine import aggregate
from jpatch.files.atomic import atomic_dir, atomic_write_json, file_sha256, to_json  # noqa: F401 (results.file_sha256)
from jpatch.version import __version__
RESULT_FILE = "result.npz"
SETTINGS_FILE = "settings.json"
MANIFEST_FILE = "manifest.json"
BULK_FORMAT = "jpatch-bulk"
BULK_FORMAT_VERSION = 2
SHARD_META = ("index", "length", "run_hash", "manifest", "clean_score", "corrupted_score")
RAW_PREFIX = "raw."  # shard arrays "raw.<name>": patched scores before normalization


def shard_name(i):
    return f"shard-{i:05d}.npz"


# --- single sweeps ----------------------------------------------------------------------


def _check_arrays(arrays):
    if not isinstance(arrays, dict) or not arrays:
        raise ValueError("arrays must be a non-empty dict of name -> array")
    out = {}
    for name, a in arrays.items():
        if not isinstance(name, str) or not name or "/" in name or name in SHARD_META:
            raise ValueError(f"invalid array name {name!r} (a non-empty str without '/', not one of {SHARD_META})")
        a = np.asarray(a)
        if a.dtype == object:
            raise TypeError(f"array {name!r} has dtype object; only numeric arrays are stored")
        out[name] = a
    return out


def save_result(out_dir, arrays, settings, *, overwrite=False):
    """Write `arrays` ({name: array}) and `settings` (a JSON-able dict) to `out_dir` atomically.

    `out_dir` gets result.npz and settings.json; "jpatch_version" is added to the
    settings when missing. Nothing is written when anything fails (the folder is
    built under a temporary name and renamed at the end). Refuses to replace a
    non-empty `out_dir` unless it is a jpatch result folder and `overwrite=True`
    (`jpatch.files.atomic.check_target`). Returns the folder's Path.
    """
    arrays = _check_arrays(arrays)
    if not isinstance(settings, dict):
        raise TypeError(f"settings must be a dict, got {type(settings).__name__}")
    settings = to_json({**settings, "jpatch_version": settings.get("jpatch_version", __version__)})
    text = json.dumps(settings, indent=2) + "\n"
    out_dir = Path(out_dir).expanduser()
    with atomic_dir(out_dir, overwrite, kind="result") as tmp:
        with open(tmp / RESULT_FILE, "wb") as f:
            np.savez(f, **arrays)
        (tmp / SETTINGS_FILE).write_text(text)
    return out_dir


# --- loading ----------------------------------------------------------------------------


class Result:
    """A loaded result: `settings` (dict) and `arrays` ({name: np.ndarray}); `result[name]` is an array.

    For a bulk result (`kind == "bulk"`) every site's array is [n_prompts, *grid] of
    per-prompt normalized values in dataset order, NaN-padded along position axes beyond
    each prompt's length (`lengths`); `raw[name]` holds the patched scores and
    `clean_score` / `corrupted_score` [n_prompts] the baselines. `mean(site)` is the
    paper's aggregate (normalize the mean over prompts); `std(site)` / `count(site)`
    describe the per-prompt normalized values. `manifest` holds the bulk manifest
    (None for a single sweep).
    """

    def __init__(self, arrays, settings, *, kind="sweep", lengths=None, manifest=None, path=None, raw=None,
                 clean_score=None, corrupted_score=None):
        self.arrays = dict(arrays)
        self.settings = settings
        self.kind = kind
        self.lengths = lengths
        self.manifest = manifest
        self.path = path
        self.raw = raw
        self.clean_score = clean_score
        self.corrupted_score = corrupted_score

    def __getitem__(self, name):
        try:
            return self.arrays[name]
        except KeyError:
            raise KeyError(f"no array {name!r} in {self.path}; it has {', '.join(self.arrays)}") from None

    def __contains__(self, name):
        return name in self.arrays

    def __iter__(self):
        return iter(self.arrays)

    def keys(self):
        return self.arrays.keys()

    @property
    def sites(self):
        return list(self.arrays)

    @property
    def n_prompts(self):
        return None if self.lengths is None else len(self.lengths)

    def only(self, site=None):
        """`site`, or the name of the only array (a clear error when there are several)."""
        if site is not None:
            self[site]  # raises naming the arrays
            return site
        if len(self.arrays) != 1:
            raise ValueError(f"{self.path or 'this result'} holds {', '.join(self.arrays)}: name one")
        return next(iter(self.arrays))

    def axes(self, site=None):
        """The names of the array's axes, e.g. ("layer", "pos"), ("prompt", "layer", "pos") for a
        bulk result (None when unknown)."""
        site = self.only(site)
        if self.manifest is None:
            axes = self.settings.get("axes")
            return tuple(axes) if axes and len(axes) == self[site].ndim else None
        if site not in self.manifest.get("sites", {}):
            return None
        return ("prompt",) + tuple(self.manifest["sites"][site]["axes"])

    def clean_value(self, site=None):
        """The unpatched clean run's value in the units of `site`'s aggregate (1 for a normalized
        metric; per grid entry for a bulk result, over the prompts reaching it), or None when unknown.
        A noising sweep's effect is `values - clean_value`."""
        site = self.only(site)
        if self.kind != "bulk":
            return self.settings.get("clean")
        if self.raw is None or self.clean_score is None:
            return None
        raw = np.moveaxis(self.raw[site], 0, -1)
        clean = np.where(np.isnan(raw), np.nan, np.broadcast_to(self.clean_score, raw.shape))
        return aggregate.normalized_mean(self.manifest["normalization"], clean, self.clean_score, self.corrupted_score)

    def _per_prompt(self, site):
        if self.kind != "bulk":
            raise ValueError("mean / std / count reduce over prompts: only a bulk result has a prompt axis")
        return self[site]

    def mean(self, site):
        """The paper's and TransformerLens's aggregate, [*grid]: the mean patched score over the
        prompts that reach each entry, normalized by the mean baselines of those prompts."""
        self._per_prompt(site)
        return aggregate.normalized_mean(self.manifest["normalization"], np.moveaxis(self.raw[site], 0, -1),
                                         self.clean_score, self.corrupted_score)

    def per_prompt(self, site):
        """[n_prompts, *grid] each prompt normalized by its own baselines; warns about prompts
        whose clean-corrupted gap is tiny next to the others' (their values are unstable)."""
        values = self._per_prompt(site)
        aggregate.warn_small_gaps(self.manifest["normalization"], self.clean_score, self.corrupted_score)
        return values

    def std(self, site, ddof=0):
        """Standard deviation of the per-prompt normalized values, ignoring NaN: [*grid]."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return np.nanstd(self.per_prompt(site), axis=0, ddof=ddof)

    def count(self, site):
        """Number of prompts with a value at each grid entry: [*grid]."""
        return np.isfinite(self._per_prompt(site)).sum(0)

    def __repr__(self):
        shapes = ", ".join(f"{k}: {tuple(v.shape)}" for k, v in self.arrays.items())
        return f"Result({self.kind}, {shapes})"


def _load_npz(path, what):
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except Exception as e:
        raise ValueError(f"cannot read {what} {path}: {type(e).__name__}: {e}") from e


def read_manifest(out_dir):
    path = Path(out_dir) / MANIFEST_FILE
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {path}: {e}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != BULK_FORMAT:
        raise ValueError(f"{path} is not a jpatch bulk manifest")
    if manifest.get("format_version") != BULK_FORMAT_VERSION:
        raise ValueError(
            f"{path} has bulk format version {manifest.get('format_version')}, this jpatch reads {BULK_FORMAT_VERSION}"
        )
    return manifest


class CorruptShard(ValueError):
    """A shard file that fails its checksum or cannot be read (a rerun of the bulk command recomputes it)."""


def check_shard(out_dir, manifest, i):
    """Verify shard `i` against the manifest: its recorded sha256, or (none recorded yet, e.g. the
    writer was killed before recording it) that it reads completely and belongs to this run.

    Returns its sha256; raises CorruptShard naming the file, or ValueError for another run's shard.
    """
    path = Path(out_dir) / shard_name(i)
    digest = file_sha256(path)
    recorded = (manifest.get("shards") or {}).get(path.name)
    if recorded is not None:
        if recorded != digest:
            raise CorruptShard(f"shard {path} is corrupt: its sha256 differs from the one {MANIFEST_FILE} recorded")
        return digest
    try:
        shard = _load_npz(path, "shard")
    except ValueError as e:
        raise CorruptShard(f"shard {path} is corrupt: {e}") from None
    if str(shard.get("run_hash")) != manifest["hash"]:
        raise ValueError(f"{path} belongs to another run (its hash differs from {MANIFEST_FILE})")
    missing = [k for k in ("index", "length", *manifest["sites"]) if k not in shard]
    if missing:
        raise CorruptShard(f"shard {path} is corrupt: it lacks {', '.join(missing)}")
    return digest


def rebuild_manifest(out_dir, *, write=True):
    """Recover a bulk folder's manifest from its shards (each carries its run's manifest) with their
    checksums; unreadable shards are left out (a rerun recomputes them). Writes
    out_dir/manifest.json unless write=False; returns the manifest."""
    out_dir = Path(out_dir)
    manifest, sums = None, {}
    for path in sorted(out_dir.glob("shard-*.npz")):
        try:
            shard = _load_npz(path, "shard")  # reads every member: a damaged one fails its zip CRC
            embedded = json.loads(str(shard["manifest"]))
        except (ValueError, KeyError):
            warnings.warn(f"{path} is unreadable or carries no manifest; left out", RuntimeWarning, stacklevel=2)
            continue
        if manifest is not None and embedded.get("hash") != manifest.get("hash"):
            raise ValueError(f"{out_dir} holds shards of different runs ({path.name} differs); cannot rebuild")
        manifest = manifest or embedded
        sums[path.name] = file_sha256(path)
    if manifest is None:
        raise FileNotFoundError(f"no readable shard in {out_dir} to rebuild {MANIFEST_FILE} from")
    manifest = {**manifest, "shards": sums}
    if write:
        atomic_write_json(out_dir / MANIFEST_FILE, manifest)
    return manifest


def missing_shards(out_dir, manifest):
    out_dir = Path(out_dir)
    return [i for i in range(manifest["n_shards"]) if not (out_dir / shard_name(i)).is_file()]


def _load_bulk(out_dir, manifest=None):
    manifest = manifest or read_manifest(out_dir)
    missing = missing_shards(out_dir, manifest)
    if missing:
        names = ", ".join(shard_name(i) for i in missing[:10])
        names += f" and {len(missing) - 10} more" if len(missing) > 10 else ""
        raise FileNotFoundError(
            f"bulk result {out_dir} is incomplete: {len(missing)} of {manifest['n_shards']} shards missing ({names}); "
            "rerun the same bulk command to finish it"
        )
    n = manifest["n_prompts"]
    names = list(manifest["sites"]) + [RAW_PREFIX + name for name in manifest["sites"]]
    arrays = {name: np.full((n, *manifest["sites"][name.removeprefix(RAW_PREFIX)]["grid"]), np.nan, np.float32)
              for name in names}
    baselines = {k: np.zeros(n, np.float32) for k in ("clean_score", "corrupted_score")}
    lengths = np.zeros(n, np.int64)
    seen = np.zeros(n, bool)
    for i in range(manifest["n_shards"]):
        path = Path(out_dir) / shard_name(i)
        try:
            check_shard(out_dir, manifest, i)
        except CorruptShard as e:
            raise CorruptShard(f"{e}; rerun the same bulk command to recompute it") from None
        shard = _load_npz(path, "shard")
        if str(shard.get("run_hash")) != manifest["hash"]:
            raise ValueError(f"{path} belongs to another run (its hash differs from {MANIFEST_FILE})")
        index = shard["index"]
        if seen[index].any():
            raise ValueError(f"{path} repeats prompts already in another shard")
        seen[index] = True
        lengths[index] = shard["length"]
        for name, a in {**arrays, **baselines}.items():
            a[index] = shard[name]
    if not seen.all():
        raise ValueError(f"bulk result {out_dir}: shards cover {int(seen.sum())} of {n} prompts")
    raw = {name: arrays.pop(RAW_PREFIX + name) for name in manifest["sites"]}
    return Result(arrays, manifest["settings"], kind="bulk", lengths=lengths, manifest=manifest, path=Path(out_dir),
                  raw=raw, **baselines)


def load_result(path):
    """Load a single-sweep folder (result.npz + settings.json) or a bulk folder (manifest.json + shards).

    A bulk result must be complete; the error names the missing shards otherwise.
    """
    path = Path(path).expanduser()
    if path.is_file() and path.name in (RESULT_FILE, SETTINGS_FILE, MANIFEST_FILE):
        path = path.parent
    if (path / MANIFEST_FILE).is_file():
        return _load_bulk(path)
    if any(path.glob("shard-*.npz")):
        warnings.warn(f"{path} has bulk shards but no {MANIFEST_FILE}: rebuilt from the shards", RuntimeWarning,
                      stacklevel=2)
        return _load_bulk(path, rebuild_manifest(path, write=False))
    if (path / RESULT_FILE).is_file():
        settings_path = path / SETTINGS_FILE
        try:
            settings = json.loads(settings_path.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read {settings_path}: {e}") from e
        return Result(_load_npz(path / RESULT_FILE, "result"), settings, kind="sweep", path=path)
    if not path.exists():
        raise FileNotFoundError(f"no result at {path}")
    raise FileNotFoundError(f"{path} holds no jpatch result ({RESULT_FILE} or {MANIFEST_FILE})")
