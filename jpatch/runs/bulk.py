"""Bulk sweeps: one patching sweep per prompt of a JSONL dataset, streamed to disk in shards.

Dataset: JSONL, one example per line::

    {"clean": "When Mary and John went to the store, John gave a drink to",
     "corrupted": "When Tom and Bob went to the store, Bob gave a drink to",   # STR only
     "answer": " Mary", "contrast": " John",      # single GPT-2 tokens
     "key_positions": [1, 3, 9]}                   # Gaussian noise goes here (required for "noise")

`read_dataset` checks every line (JSON, fields, single-token answers, lengths
against the model's context, equal clean / corrupted token lengths for STR, key
positions in range) before anything runs, and names the line of each error.
Prompts are tokenized as they are (no BOS token; write "<|endoftext|>" into the
text for one).

`bulk_sweep` writes `out_dir/manifest.json` and `out_dir/shard-NNNNN.npz`
(format in `jpatch.results`). Prompts are ordered by (token length, line) and cut
into shards of `shard_size`; inside a shard, prompts of one length form a batch
(no padding inside a prompt, so every per-prompt result is exactly that of
`jpatch.sweep(..., per_prompt=True)` on the prompt alone). Grids over positions
are stored padded with NaN to the longest prompt. Each shard file is written
atomically once computed, so a killed run resumes where it stopped: rerunning
the same command skips the shards that exist. A different model, dataset or
setting in the same folder is refused. With several processes (jax.distributed,
or explicit process_index / process_count over a shared folder), process p
computes the shards i with i % process_count == p on its local devices.

Gaussian noise (corruption "noise") follows ROME: nu = noise_scale x the std of
the token embeddings of the dataset's key tokens (every key position of every
clean prompt); each prompt's noise comes from PRNGKey(seed) folded with its
dataset index, so it does not depend on shards, batches or processes.
"""

import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jpatch.engine import aggregate
from jpatch.engine.inputs import DIRECTIONS, Run
from jpatch.engine.patching import SWEEPS
from jpatch.engine.scores import DEFAULT_MEMORY_BUDGET
from jpatch.engine.sweep import WINDOW_SITES, check_memory_budget, default_axes, sweep

from jpatch.methods import corrupt

from jpatch.methods import metrics

from jpatch.model import padding


from jpatch.runs import results
from jpatch.files import atomic

from jpatch.files import safety

from jpatch.model import sites
from jpatch.runs.results import RAW_PREFIX

CORRUPTIONS = ("str", "noise")
METRICS = metrics.METRICS
METRIC_FIELDS = {"logit-diff": ("answer", "contrast"), "prob": ("answer",), "logprob": ("answer",), "kl": ()}
DEFAULT_SHARD_SIZE = 64
DTYPES = ("float32", "bfloat16", "float16")  # --dtype
MAX_ERRORS = 20
# Settings that identify a run's numbers (a resume must match them); "model" and "dataset"
# (a name and a path) are informational: the hashes identify the weights and the content.
INFO_SETTINGS = ("model", "dataset")


# --- dataset ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Example:
    """One validated dataset line: token ids ([T] int32), answer / contrast ids (or None)."""

    line: int
    clean: np.ndarray
    corrupted: np.ndarray  # None for Gaussian noise
    answer: int
    contrast: int
    key_positions: tuple


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Validated examples plus a hash of their content (`content_hash`)."""

    examples: list
    corruption: str
    content_hash: str
    source: str = None
    n_ctx: int = None
    fields: tuple = ()

    def __len__(self):
        return len(self.examples)

    @functools.cached_property
    def lengths(self):
        """Token length of each clean prompt [n]."""
        return np.array([len(e.clean) for e in self.examples], np.int64)


def jsonl_records(path):
    """(line number, raw bytes) of a JSONL file, lines split at b"\\n" only: the one reader of
    dataset files (bulk and `jpatch sweep --task FILE`), so line numbers always agree."""
    path = Path(path).expanduser()
    try:
        f = open(path, "rb")
    except OSError as e:
        raise FileNotFoundError(f"cannot open dataset {path}: {e.strerror}") from e
    with f:
        for number, raw in enumerate(f, 1):
            yield number, raw


def _canonical(obj):
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def parse_examples(records, *, corruption="str", metric=None, n_ctx=None, source="<examples>", tokenizer=None):
    """Validate (line number, JSON text or dict) records into a `Dataset`; see `read_dataset`."""
    if corruption not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {corruption!r}; valid: {', '.join(CORRUPTIONS)}")
    if metric is not None and metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; valid: {', '.join(METRICS)}")
    required = METRIC_FIELDS[metric] if metric is not None else ("answer", "contrast")
    if tokenizer is None:
        from jpatch.model.tokenizer import get_tokenizer

        tokenizer = get_tokenizer()
    examples, errors = [], []
    digest = hashlib.sha256()
    for number, raw in records:
        line_errors = []

        def bad(reason):
            line_errors.append(f"line {number}: {reason}")

        if isinstance(raw, dict):
            obj = raw
        else:
            text = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else raw
            if not text.strip():
                continue  # blank lines are allowed
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                errors.append(f"line {number}: malformed JSON: {e.msg} (column {e.colno})")
                continue
        if not isinstance(obj, dict):
            errors.append(f"line {number}: expected a JSON object, got {type(obj).__name__}")
            continue
        digest.update(_canonical(obj).encode() + b"\n")

        def prompt(field):
            value = obj.get(field)
            if value is None:
                bad(f"missing field {field!r}")
                return None
            if not isinstance(value, str):
                bad(f"{field!r} must be a string, got {type(value).__name__}")
                return None
            ids = np.asarray(tokenizer.encode(value), np.int32)
            if len(ids) == 0:
                bad(f"the {field} prompt is empty")
                return None
            if n_ctx is not None and len(ids) > n_ctx:
                bad(f"the {field} prompt is {len(ids)} tokens, longer than the model's context n_ctx={n_ctx}")
                return None
            return ids

        def token(field):
            value = obj.get(field)
            if value is None:
                if field in required:
                    bad(f"missing field {field!r} (needed by metric {metric or 'logit-diff'!r})")
                return None
            if not isinstance(value, str):
                bad(f"{field!r} must be a string (one token, e.g. ' Mary'), got {type(value).__name__}")
                return None
            try:
                return int(tokenizer.token_id(value))
            except ValueError as e:
                bad(f"{field}: {e}")
                return None

        clean = prompt("clean")
        corrupted = prompt("corrupted") if corruption == "str" else None
        answer, contrast = token("answer"), token("contrast")
        if metric in (None, "logit-diff") and answer is not None and answer == contrast:
            bad("answer and contrast are the same token: their logit difference is always 0")
        if clean is not None and corrupted is not None:
            if len(corrupted) != len(clean):
                bad(
                    f"the corrupted prompt is {len(corrupted)} tokens but the clean prompt is {len(clean)}; "
                    "symmetric token replacement needs replacements of the same token length"
                )
            elif (corrupted == clean).all():
                bad("the corrupted prompt is the clean prompt: nothing is corrupted")
        positions = obj.get("key_positions")
        if positions is None:
            if corruption == "noise":
                bad("missing field 'key_positions' (the tokens Gaussian noise corrupts)")
            positions = ()
        elif (
            not isinstance(positions, list)
            or not all(isinstance(p, int) and not isinstance(p, bool) for p in positions)
        ):
            bad(f"'key_positions' must be a list of integer token positions, got {positions!r}")
            positions = ()
        else:
            if corruption == "noise" and not positions:
                bad("'key_positions' is empty: Gaussian noise needs at least one position to corrupt")
            if clean is not None:
                out = [p for p in positions if not 0 <= p < len(clean)]
                if out:
                    bad(f"key position(s) {out} out of range for the clean prompt's {len(clean)} tokens [0, {len(clean)})")
            positions = tuple(sorted(set(positions)))
        if line_errors:
            errors += line_errors
            continue
        examples.append(Example(number, clean, corrupted, answer, contrast, positions))
    if errors:
        shown = errors[:MAX_ERRORS]
        more = f"\n  ... and {len(errors) - MAX_ERRORS} more" if len(errors) > MAX_ERRORS else ""
        raise ValueError(f"invalid dataset {source}: {len(errors)} error(s)\n  " + "\n  ".join(shown) + more)
    if not examples:
        raise ValueError(f"dataset {source} has no examples")
    fields = tuple(f for f in ("answer", "contrast") if all(getattr(e, f) is not None for e in examples))
    return Dataset(examples, corruption, digest.hexdigest(), source, n_ctx, fields)


def read_dataset(path, *, corruption="str", metric=None, n_ctx=None, tokenizer=None):
    """Read and validate a JSONL dataset; every problem is reported before any compute.

    Each line: {"clean": str, "corrupted": str (corruption "str"; ignored for "noise"),
    "answer": str, "contrast": str, "key_positions": [int] (required for "noise")}.
    answer / contrast must be single GPT-2 tokens; `metric` says which are required
    (None: both). Blank lines are skipped; other fields are ignored. Raises
    ValueError listing each bad line ("line 7: ...") with its reason.
    """
    return parse_examples(jsonl_records(path), corruption=corruption, metric=metric, n_ctx=n_ctx,
                          source=str(path), tokenizer=tokenizer)


def _as_dataset(dataset, corruption, metric, n_ctx):
    if isinstance(dataset, Dataset):
        if dataset.corruption != corruption:
            raise ValueError(f"the dataset was read for corruption {dataset.corruption!r}, the sweep uses {corruption!r}")
        missing = [f for f in METRIC_FIELDS[metric] if f not in dataset.fields]
        if missing:
            raise ValueError(f"metric {metric!r} needs {' and '.join(missing)} for every example")
        long = [e.line for e in dataset.examples if len(e.clean) > n_ctx]
        if long:
            raise ValueError(f"dataset {dataset.source}: line(s) {long[:MAX_ERRORS]} longer than the model's n_ctx={n_ctx}")
        return dataset
    if isinstance(dataset, (str, os.PathLike)):
        return read_dataset(dataset, corruption=corruption, metric=metric, n_ctx=n_ctx)
    records = [(i, r) for i, r in enumerate(dataset, 1)]
    return parse_examples(records, corruption=corruption, metric=metric, n_ctx=n_ctx)


# --- sites, metrics, noise ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SiteSpec:
    name: str  # as the user wrote it: the key of the result arrays
    site: str  # canonical site ("hook_resid_pre")
    axes: tuple

    def grid(self, config, n_pos):
        sizes = {"layer": config.n_layer, "pos": n_pos, "head": config.n_head, "src": n_pos}
        return tuple(sizes[a] for a in self.axes)


def resolve_sites(names, window=1):
    """Sweep names (`SWEEPS` keys, e.g. "resid_pre", "attn_head_out_all_pos") or site
    names ("hook_mlp_out", "z", ...; default axes) -> [SiteSpec]."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    names = list(names)
    if not names:
        raise ValueError("no sites given")
    if len(set(names)) != len(names):
        raise ValueError(f"sites repeat: {names}")
    specs = []
    for name in names:
        if name in SWEEPS:
            site, axes = SWEEPS[name]
        else:
            try:
                if name.startswith("blocks."):
                    raise KeyError(f"{name!r} names one layer; a bulk sweep covers every layer: "
                                   f"pass {sites.parse(name)[0]!r}")
                site = sites.canonical(name)
                axes = default_axes(site)
            except (KeyError, ValueError) as e:
                msg = e.args[0] if e.args else str(e)
                raise ValueError(f"unknown site {name!r} ({msg}); sweeps: {', '.join(SWEEPS)}") from None
        if window > 1 and site not in WINDOW_SITES:
            raise ValueError(f"a sliding window applies to {', '.join(WINDOW_SITES)}, not {name!r} ({site})")
        specs.append(SiteSpec(name, site, tuple(axes)))
    return specs


make_metric = metrics.by_name  # a CLI metric name for a batch of prompts


def key_token_std(model, dataset):
    """ROME's embedding std over the key tokens of every clean prompt (each occurrence counted)."""
    ids = np.concatenate([e.clean[list(e.key_positions)] for e in dataset.examples if e.key_positions] or [[]])
    if ids.size == 0:
        raise ValueError("the dataset has no key positions to measure the embedding std over; pass noise_std")
    return corrupt.embedding_std(model, ids.astype(np.int64))


def noise_key(seed, index):
    """The PRNG key of dataset prompt `index`'s Gaussian noise."""
    return jax.random.fold_in(jax.random.PRNGKey(seed), index)


def noise_run(model, tokens, key_positions, indices, *, n_samples, std, scale, seed, lengths=None):
    """Gaussian-noise Run of prompts `tokens` [B, T] (dataset indices `indices`), each prompt's noise
    from `noise_key(seed, index)` drawn at its own length `lengths[b]` (so it does not depend on the
    batch it is padded into), stacked sample-major like `corrupt.gaussian_noise`."""
    from jpatch.model.gpt2 import Override

    B, T = tokens.shape
    lengths = np.full(B, T) if lengths is None else np.asarray(lengths)
    runs = [
        corrupt.gaussian_noise(model, tokens[b : b + 1, : lengths[b]], [list(key_positions[b])], n_samples=n_samples,
                               scale=scale, std=std, key=noise_key(seed, int(indices[b])))
        for b in range(B)
    ]
    S = n_samples

    def interleave(arrays):  # B arrays of [S, length, ...] -> [S * B, T, ...] sample-major, padded to T
        padded = [np.pad(np.asarray(a), [(0, 0), (0, T - a.shape[1])] + [(0, 0)] * (a.ndim - 2)) for a in arrays]
        joined = np.stack(padded, axis=1)  # [S, B, T, ...]
        return joined.reshape((S * B,) + joined.shape[2:])

    ov = [r.overrides["hook_embed"] for r in runs]
    override = Override(jnp.asarray(interleave([o.value for o in ov])), jnp.asarray(interleave([o.mask for o in ov])))
    mask = np.tile(np.arange(T) < lengths[:, None], (S, 1)).astype(np.int32)
    return Run(np.tile(tokens, (S, 1)), {"hook_embed": override}, S, mask)


# --- hashing and the manifest -------------------------------------------------------------


def model_hash(model):
    """sha256 of the model's config and every weight (name, dtype, shape, bytes)."""
    from jpatch.model.checkpoint import named_arrays

    h = hashlib.sha256(_canonical(model.config.to_dict()).encode())
    for name, a in sorted(named_arrays(model).items()):
        a = np.ascontiguousarray(np.asarray(a))
        h.update(f"{name}:{a.dtype.str}:{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def run_hash(settings):
    compared = {k: v for k, v in settings.items() if k not in INFO_SETTINGS}
    return hashlib.sha256(_canonical(atomic.to_json(compared)).encode()).hexdigest()


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


def _ours(name):
    """Files a bulk run keeps in its folder besides manifest.json and the shards."""
    return name == safety.MARKER or name.startswith((f".{results.MANIFEST_FILE}.", ".shard-"))


def _read_or_rebuild(out_dir, path):
    """The folder's manifest; rebuilt from the shards when manifest.json is missing or unreadable."""
    if path.is_file():
        try:
            return results.read_manifest(out_dir)
        except ValueError as e:
            if not any(out_dir.glob("shard-*.npz")):
                raise
            print(f"jpatch bulk: {e}; rebuilding it from the shards", file=sys.stderr)
    else:
        print(f"jpatch bulk: {out_dir} has shards but no {path.name}; rebuilding it from the shards", file=sys.stderr)
    return results.rebuild_manifest(out_dir)


def _prepare_out_dir(out_dir, expected, process_index, timeout):
    """Write or verify manifest.json (process 0 writes it; the others wait for it).

    A missing or damaged manifest is rebuilt from the shards; a folder holding anything
    else is refused. Returns the manifest on disk (with the checksums recorded so far)."""
    path = out_dir / results.MANIFEST_FILE
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is not a directory")
    has_shards = out_dir.is_dir() and any(out_dir.glob("shard-*.npz"))
    if path.is_file() or has_shards:
        with _manifest_lock(out_dir):
            manifest = _read_or_rebuild(out_dir, path)
        _check_manifest(out_dir, manifest, expected)
        return manifest
    if process_index == 0:
        if out_dir.exists():
            others = [p.name for p in out_dir.iterdir() if not _ours(p.name)]
            if others:
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
    print(f"jpatch bulk: process {process_index}: waiting up to {timeout:.0f} s for process 0 to write {path}",
          file=sys.stderr)
    deadline = time.monotonic() + timeout
    while not path.is_file():
        if time.monotonic() > deadline:
            raise TimeoutError(f"process {process_index}: no {path} after {timeout:.0f} s; process 0 writes it "
                               "(is it running, with the same --out?)")
        time.sleep(0.2)
    manifest = results.read_manifest(out_dir)
    _check_manifest(out_dir, manifest, expected)
    return manifest


def _record_checksums(out_dir, digests):
    """Add {shard name: sha256} to manifest.json (read, update and replace under the manifest lock)."""
    with _manifest_lock(out_dir):
        manifest = results.read_manifest(out_dir)
        manifest["shards"] = {**manifest.get("shards", {}), **digests}
        atomic.atomic_write_json(out_dir / results.MANIFEST_FILE, manifest)


# --- computing shards ---------------------------------------------------------------------


@dataclasses.dataclass
class BulkRun:
    """What a `bulk_sweep` call did. `computed` / `skipped`: shard numbers of this process."""

    out_dir: Path
    n_prompts: int
    n_shards: int
    computed: list
    skipped: list
    process_index: int
    process_count: int
    undefined_lines: list  # dataset lines whose metric was not finite (stored as NaN)

    @property
    def complete(self):
        return not results.missing_shards(self.out_dir, results.read_manifest(self.out_dir))


def _batch_rows(n, shard_size):
    """Prompts per compiled batch: n rounded up to a power of two (at most shard_size), so
    batches of a few sizes share compiled programs. Extra rows repeat a prompt and are dropped."""
    return min(1 << max(0, math.ceil(math.log2(n))), max(shard_size, n))


def _sweep_batch(model, dataset, indices, specs, cfg, devices):
    """Sweeps of prompts `indices` (of any lengths, padded together with an attention mask) ->
    {name: [n, *grid] raw patched scores}, clean and corrupted baselines [n]."""
    ex = [dataset.examples[i] for i in indices]
    rows = _batch_rows(len(ex), cfg["shard_size"])
    take = [min(b, len(ex) - 1) for b in range(rows)]  # padding rows repeat the last prompt
    clean, mask = padding.pad([ex[b].clean for b in take])
    lengths = mask.sum(1)
    if cfg["corruption"] == "str":
        corrupted = Run(padding.pad([ex[b].corrupted for b in take])[0], attention_mask=mask)
    else:
        corrupted = noise_run(model, clean, [ex[b].key_positions for b in take], [indices[b] for b in take],
                              n_samples=cfg["n_samples"], std=cfg["noise_std"], scale=cfg["noise_scale"], seed=cfg["seed"],
                              lengths=lengths)
    answers = np.array([ex[b].answer if ex[b].answer is not None else 0 for b in take])
    contrasts = np.array([ex[b].contrast if ex[b].contrast is not None else 0 for b in take])
    metric = make_metric(cfg["metric"], answers, contrasts)
    raw, baselines = {}, None
    for spec in specs:
        with np.errstate(divide="ignore", invalid="ignore"):
            r = sweep(model, clean, corrupted, spec.site, metric, direction=cfg["direction"],
                               window=cfg["window"], axes=spec.axes, attention_mask=mask,
                               memory_budget=cfg["memory_budget"], progress=False, devices=devices, check_finite=False)
        raw[spec.name] = r.raw[: len(ex)]
        baselines = (r.clean_per_prompt[: len(ex)], r.corrupted_per_prompt[: len(ex)])
    return raw, baselines


def _compute_shard(model, dataset, indices, specs, cfg, devices, max_len, bar):
    """Every prompt of a shard swept in one padded batch: per site the raw patched scores and the
    per-prompt normalized values [n, *grid] (NaN past each prompt's end), and the baselines [n]."""
    raw, (clean, corrupted) = _sweep_batch(model, dataset, [int(i) for i in indices], specs, cfg, devices)
    normalization = make_metric(cfg["metric"], [0], [0]).normalize
    arrays = {"clean_score": clean, "corrupted_score": corrupted}
    for spec in specs:
        full = np.full((len(indices),) + spec.grid(model.config, max_len), np.nan, np.float32)
        region = (slice(None),) + tuple(slice(0, raw[spec.name].shape[i + 1]) for i in range(len(spec.axes)))
        full[region] = raw[spec.name]
        arrays[RAW_PREFIX + spec.name] = full
        values = aggregate.per_prompt(normalization, np.moveaxis(full, 0, -1), clean, corrupted, warn=False)
        arrays[spec.name] = np.moveaxis(values, -1, 0)
    undefined = [dataset.examples[int(i)].line for i, c, x in zip(indices, clean, corrupted)
                 if normalization == "range" and c == x]
    if bar is not None:
        bar.update(len(indices))
    return arrays, undefined


def _settings(model_name, model_digest, dataset, specs, cfg):
    from jpatch.version import __version__

    return {
        "model": model_name,
        "model_hash": model_digest,
        "dataset": dataset.source,
        "dataset_hash": dataset.content_hash,
        "n_prompts": len(dataset),
        "sites": [s.name for s in specs],
        "corruption": cfg["corruption"],
        "metric": cfg["metric"],
        "direction": cfg["direction"],
        "window": cfg["window"],
        "seed": cfg["seed"],
        "n_samples": cfg["n_samples"],
        "noise_scale": cfg["noise_scale"],
        "noise_std": cfg["noise_std"],
        "shard_size": cfg["shard_size"],
        "jpatch_version": __version__,
    }


def _check_positive(name, value):
    """Zero, negative or non-finite noise would give an uncorrupted (all-NaN) or meaningless run."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not 0 < value < math.inf:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def bulk_sweep(model, dataset, sites, corruption, metric, out_dir, *, direction="denoise", window=1,
               shard_size=DEFAULT_SHARD_SIZE, memory_budget=DEFAULT_MEMORY_BUDGET, seed=0, n_samples=10,
               noise_scale=3.0, noise_std=None, model_name=None, progress=True, process_index=None,
               process_count=None, manifest_timeout=600.0, devices=None):
    """Sweep `sites` over every prompt of `dataset`, streaming per-prompt results to `out_dir`.

    model: a jpatch GPT2. dataset: a JSONL path, a `Dataset` (`read_dataset`) or a list of
    example dicts. sites: names (list or comma-separated) of `SWEEPS` ("resid_pre",
    "attn_head_out_all_pos", ...) or sites ("mlp_out", "attn.hook_z": default axes).
    corruption: "str" (the example's "corrupted" prompt) or "noise" (Gaussian noise on its
    "key_positions": n_samples samples, nu = noise_scale x noise_std, noise_std defaulting to
    the std of the dataset's key-token embeddings). metric: "logit-diff" (normalized per
    prompt), "prob", "kl", "logprob" (differences from the corrupted run).
    direction: "denoise" / "noise"; window: ROME's sliding window (1 = none).
    shard_size: prompts per shard file; memory_budget: bytes per compiled call (chunks prompts).
    process_index / process_count: this process's share (default jax.process_index() /
    jax.process_count()): it computes the shards i with i % process_count == process_index
    on `devices` (default jax.local_devices()).

    Writes out_dir/manifest.json and out_dir/shard-NNNNN.npz (see `jpatch.results`); load them
    with `jpatch.runs.results.load_result(out_dir)`: per-prompt arrays [n_prompts, *grid], position
    axes padded with NaN to the longest prompt. Rerunning resumes (existing shards are skipped);
    other settings, weights or data in the same folder are refused. Returns a `BulkRun`.
    """
    if corruption not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {corruption!r}; valid: {', '.join(CORRUPTIONS)}")
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; valid: {', '.join(METRICS)}")
    if direction not in DIRECTIONS:
        raise ValueError(f"unknown direction {direction!r}; valid: {', '.join(DIRECTIONS)}")
    if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 1:
        raise ValueError(f"window must be an integer >= 1, got {window!r}")
    if isinstance(shard_size, bool) or not isinstance(shard_size, (int, np.integer)) or shard_size < 1:
        raise ValueError(f"shard_size must be an integer >= 1, got {shard_size!r}")
    check_memory_budget(memory_budget)
    bad_samples = isinstance(n_samples, bool) or not isinstance(n_samples, (int, np.integer)) or n_samples < 1
    if corruption == "noise" and bad_samples:
        raise ValueError(f"n_samples must be an integer >= 1, got {n_samples!r}")
    if corruption == "noise":
        _check_positive("noise_scale", noise_scale)
        if noise_std is not None:
            _check_positive("noise_std", noise_std)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    process_index = jax.process_index() if process_index is None else int(process_index)
    process_count = jax.process_count() if process_count is None else int(process_count)
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} out of range for process_count {process_count}")
    specs = resolve_sites(sites, int(window))
    dataset = _as_dataset(dataset, corruption, metric, model.config.n_ctx)
    out_dir = Path(out_dir).expanduser()

    cfg = dict(corruption=corruption, metric=metric, direction=direction, window=int(window), seed=int(seed),
               shard_size=int(shard_size), memory_budget=memory_budget, n_samples=None, noise_scale=None,
               noise_std=None)
    if corruption == "noise":
        std = key_token_std(model, dataset) if noise_std is None else float(noise_std)
        _check_positive("noise_std (measured over the key tokens)", std)
        cfg.update(n_samples=int(n_samples), noise_scale=float(noise_scale), noise_std=std)
    settings = _settings(model_name, model_hash(model), dataset, specs, cfg)
    lengths = dataset.lengths
    max_len = int(lengths.max())
    n = len(dataset)
    n_shards = math.ceil(n / shard_size)
    order = np.argsort(lengths, kind="stable")  # by (token length, line)
    manifest = {
        "format": results.BULK_FORMAT,
        "format_version": results.BULK_FORMAT_VERSION,
        "hash": run_hash(settings),
        "settings": settings,
        "n_prompts": n,
        "shard_size": int(shard_size),
        "n_shards": n_shards,
        "max_len": max_len,
        "normalization": make_metric(metric, [0], [0]).normalize,  # how Result.mean normalizes raw scores
        "sites": {s.name: {"site": s.site, "axes": list(s.axes), "grid": list(s.grid(model.config, max_len))}
                  for s in specs},
    }
    on_disk = _prepare_out_dir(out_dir, manifest, process_index, manifest_timeout)
    safety.remove_stale(out_dir, results.MANIFEST_FILE)
    embedded = np.array(json.dumps(atomic.to_json(manifest)))  # each shard carries its run's manifest

    mine = [i for i in range(n_shards) if i % process_count == process_index]
    shard_prompts = lambda i: order[i * shard_size : (i + 1) * shard_size]  # noqa: E731
    unrecorded = {}

    def finished(i, known=None):
        """Shard i exists and passes its check against the manifest (`known`, or as on disk now);
        a corrupt one is reported (and then recomputed)."""
        name = results.shard_name(i)
        if not (out_dir / name).is_file():
            return False
        now = known or results.read_manifest(out_dir)
        try:
            digest = results.check_shard(out_dir, now, i)
        except results.CorruptShard as e:
            print(f"jpatch bulk: {e}; recomputing it", file=sys.stderr)
            return False
        if name not in now.get("shards", {}):
            unrecorded[name] = digest
        return True

    done = [i for i in mine if finished(i, on_disk)]
    if unrecorded:  # shards whose writer was killed before recording their checksum
        _record_checksums(out_dir, unrecorded)
        unrecorded.clear()
    todo = [i for i in mine if i not in set(done)]
    devices = list(devices or jax.local_devices())
    if len(devices) > 1:
        # The patched calls shard prompts over these devices; the model is replicated on them.
        mesh = jax.sharding.Mesh(np.array(devices), ("batch",))
        model = jax.device_put(model, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    bar = tqdm(total=sum(len(shard_prompts(i)) for i in mine), initial=sum(len(shard_prompts(i)) for i in done),
               disable=not progress, unit="prompt", dynamic_ncols=True,
               desc=f"bulk {out_dir.name}" + (f" [{process_index}/{process_count}]" if process_count > 1 else ""))
    undefined, computed, by_others, queue, told = [], [], [], list(todo), False
    try:
        while queue:
            busy = []
            for i in queue:
                lock = safety.Lock(out_dir / f".{results.shard_name(i)}.lock")
                if not lock.acquire():  # another run is computing it
                    busy.append((i, lock))
                    continue
                try:
                    if finished(i):  # finished by another run meanwhile
                        by_others.append(i)
                        bar.update(len(shard_prompts(i)))
                        continue
                    safety.remove_stale(out_dir, results.shard_name(i))
                    indices = shard_prompts(i)
                    arrays, bad = _compute_shard(model, dataset, indices, specs, cfg, devices, max_len, bar)
                    undefined += bad
                    path = atomic.atomic_write_npz(out_dir / results.shard_name(i), {
                        "index": indices.astype(np.int64), "length": lengths[indices],
                        "run_hash": np.array(manifest["hash"]), "manifest": embedded, **arrays})
                    _record_checksums(out_dir, {path.name: results.file_sha256(path)})
                    computed.append(i)
                finally:
                    lock.release()
            queue = []
            for i, lock in busy:
                if finished(i):
                    by_others.append(i)
                    bar.update(len(shard_prompts(i)))
                else:
                    queue.append(i)
            if queue:
                if not told:
                    print(f"jpatch bulk: waiting for {len(queue)} shard(s) another run is computing (e.g. "
                          f"{lock.path.name}: {lock.describe()})", file=sys.stderr)
                    told = True
                time.sleep(0.5)
    finally:
        bar.close()
    if unrecorded:
        _record_checksums(out_dir, unrecorded)
    if undefined:
        warnings.warn(
            f"the metric was undefined (not finite) for {len(undefined)} prompt(s), stored as NaN: dataset line(s) "
            f"{sorted(undefined)[:MAX_ERRORS]}", RuntimeWarning, stacklevel=2
        )
    return BulkRun(out_dir, n, n_shards, computed, sorted(done + by_others), process_index, process_count,
                   sorted(undefined))


# --- command line -------------------------------------------------------------------------


def parse_bytes(text):
    """'4G' / '512M' / '1e9' / '1073741824' -> int bytes."""
    text = str(text).strip()
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    scale = 1
    low = text.lower().removesuffix("ib").removesuffix("b")
    if low and low[-1] in units:
        scale, low = units[low[-1]], low[:-1]
    try:
        value = float(low) * scale
    except ValueError:
        raise ValueError(f"not a byte count: {text!r} (e.g. 4G, 512M, 1000000)") from None
    if value <= 0:
        raise ValueError(f"byte count must be positive, got {text!r}")
    return int(value)


def add_arguments(parser):
    """The `jpatch bulk` options."""
    parser.add_argument("--model", required=True, help="model folder or name under weights/ (jpatch.model.checkpoint.load)")
    parser.add_argument("--data", required=True,
                        help="JSONL dataset: one {clean, corrupted, answer, contrast, key_positions} per line")
    parser.add_argument("--sites", default="resid_pre",
                        help=f"comma-separated sweeps ({', '.join(SWEEPS)}) or sites (default: resid_pre)")
    parser.add_argument("--corruption", choices=CORRUPTIONS, default="str",
                        help="str: the 'corrupted' prompts; noise: Gaussian noise on 'key_positions' (default: str)")
    parser.add_argument("--metric", choices=METRICS, default="logit-diff", help="default: logit-diff (normalized)")
    parser.add_argument("--direction", choices=DIRECTIONS, default="denoise", help="default: denoise")
    parser.add_argument("--window", type=int, default=1, help="sliding window of layers (default: 1)")
    parser.add_argument("--out", required=True, help="output folder (rerun the same command to resume)")
    parser.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE,
                        help=f"prompts per shard file (default: {DEFAULT_SHARD_SIZE})")
    parser.add_argument("--memory-budget", type=parse_bytes, default=DEFAULT_MEMORY_BUDGET,
                        help="bytes per compiled call, e.g. 4G (default: 4G)")
    parser.add_argument("--seed", type=int, default=0, help="Gaussian-noise seed (default: 0)")
    parser.add_argument("--n-samples", type=int, default=10, help="Gaussian-noise samples per prompt (default: 10)")
    parser.add_argument("--noise-scale", type=float, default=3.0, help="noise std = scale x embedding std (default: 3)")
    parser.add_argument("--noise-std", type=float, default=None,
                        help="embedding std (default: measured over the dataset's key tokens)")
    parser.add_argument("--dtype", default="float32", help=f"the weights' dtype: {' | '.join(DTYPES)} (default: "
                        "float32; bfloat16 halves the memory, attention and logits still accumulate in float32)")
    parser.add_argument("--distributed", action="store_true",
                        help="call jax.distributed.initialize() first (TPU pod slices, SLURM / GPU clusters)")
    parser.add_argument("--process-index", type=int, default=None, help="this process's share without jax.distributed")
    parser.add_argument("--process-count", type=int, default=None, help="number of processes sharing --out")
    parser.add_argument("--manifest-timeout", type=float, default=600.0,
                        help="seconds a process other than 0 waits for process 0's manifest (default: 600)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(args):
    """Run `jpatch bulk` from parsed `args`; returns the exit status (refusals: `jpatch.face.cli.Fail`, status 2)."""
    from jpatch.model.checkpoint import load
    from jpatch.face.cli import Fail

    if (args.process_index is None) != (args.process_count is None):
        raise Fail("jpatch bulk: --process-index and --process-count go together")
    if args.dtype is not None and args.dtype not in DTYPES:
        raise Fail(f"jpatch bulk: unknown --dtype {args.dtype!r}; valid: {', '.join(DTYPES)}")
    if args.distributed:
        try:
            jax.distributed.initialize()
        except Exception as e:  # jax raises ValueError / RuntimeError / XlaRuntimeError here
            raise Fail(f"jpatch bulk: --distributed: jax.distributed.initialize() failed ({type(e).__name__}: "
                       f"{str(e).splitlines()[0] if str(e) else ''}); it needs a cluster environment (TPU pod, "
                       "SLURM, ...) or a coordinator address; without one use --process-index/--process-count") from None
    corruption, metric = args.corruption, args.metric
    try:
        resolve_sites(args.sites, args.window)
        for name in ("window", "shard_size", "n_samples"):
            if getattr(args, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be an integer >= 1, got {getattr(args, name)}")
        if corruption == "noise":
            _check_positive("--noise-scale", args.noise_scale)
            if args.noise_std is not None:
                _check_positive("--noise-std", args.noise_std)
        # Validate the data before loading weights, so a bad line is reported at once.
        dataset = read_dataset(args.data, corruption=corruption, metric=metric)
        model = load(args.model, dtype=args.dtype)
        run = bulk_sweep(model, dataset, args.sites, corruption, metric, args.out, direction=args.direction,
                         window=args.window, shard_size=args.shard_size, memory_budget=args.memory_budget,
                         seed=args.seed, n_samples=args.n_samples, noise_scale=args.noise_scale,
                         noise_std=args.noise_std, model_name=str(args.model), progress=not args.no_progress,
                         process_index=args.process_index, process_count=args.process_count,
                         manifest_timeout=args.manifest_timeout)
    except (ValueError, OSError, TimeoutError) as e:
        raise Fail(f"jpatch bulk: {e}") from None
    part = f"process {run.process_index}/{run.process_count}: " if run.process_count > 1 else ""
    print(f"{part}{len(run.computed)} shard(s) computed, {len(run.skipped)} already done, in {run.out_dir}")
    if run.complete:
        result = results.load_result(run.out_dir)
        for name in result.sites:
            mean = result.mean(name)
            print(f"  {name}: {result.n_prompts} prompts, grid {mean.shape}, mean over prompts in "
                  f"[{np.nanmin(mean):.3g}, {np.nanmax(mean):.3g}]")
        print(f"load with: jpatch.runs.results.load_result({str(run.out_dir)!r})")
    elif run.process_count > 1:
        print("other processes are still writing their shards")
    return 0


if __name__ == "__main__":  # python -m jpatch.bulk ...
    from jpatch.face import cli
    sys.exit(cli.main(["bulk", *sys.argv[1:]]))
