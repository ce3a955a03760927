"""Bulk sweeps: one patching sweep per prompt of a JSONL dataset, streamed to disk in shards.

The dataset format and its validation: `jpatch.data.dataset`.

`bulk_sweep` writes `out_dir/manifest.json` and `out_dir/shard-NNNNN.npz`
(format in `jpatch.runs.results`; the manifest in `jpatch.runs.manifest`). Prompts are
ordered by (token length, line) and cut into shards of `shard_size`; a shard's prompts are
swept as one right-padded batch with an attention mask (each prompt's result is that of the
prompt swept alone, within float32 rounding). Grids over positions
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

import dataclasses
import json
import logging
import math
import time
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jpatch.data.dataset import FILE_CORRUPTIONS, MAX_ERRORS, Dataset, as_dataset, key_token_std
from jpatch.data.tasks.wording import for_model
from jpatch.engine import aggregate
from jpatch.engine.inputs import Run, check_direction
from jpatch.engine.patching import SWEEPS
from jpatch.engine.scores import DEFAULT_MEMORY_BUDGET
from jpatch.engine.sweep import WINDOW_SITES, check_memory_budget, default_axes, sweep
from jpatch.files import atomic, safety
from jpatch.methods import corrupt, metrics
from jpatch.model import padding, sites
from jpatch.runs import results
from jpatch.runs.manifest import model_hash, prepare_out_dir, record_checksums, run_hash
from jpatch.runs.results import RAW_PREFIX

log = logging.getLogger("jpatch.bulk")
DEFAULT_SHARD_SIZE = 64


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
                site = sites.canonical(name)
                axes = default_axes(site)
            except (KeyError, ValueError) as e:
                msg = e.args[0] if e.args else str(e)
                raise ValueError(f"unknown site {name!r} ({msg}); sweeps: {', '.join(SWEEPS)}") from None
        if window > 1 and site not in WINDOW_SITES:
            raise ValueError(f"a sliding window applies to {', '.join(WINDOW_SITES)}, not {name!r} ({site})")
        specs.append(SiteSpec(name, site, tuple(axes)))
    return specs


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
    clean, mask = padding.pad([ex[b].clean for b in take], pad_id=model.pad_id)
    lengths = mask.sum(1)
    if cfg["corruption"] == "str":
        corrupted = Run(padding.pad([ex[b].corrupted for b in take], pad_id=model.pad_id)[0], attention_mask=mask)
    else:
        corrupted = noise_run(model, clean, [ex[b].key_positions for b in take], [indices[b] for b in take],
                              n_samples=cfg["n_samples"], std=cfg["noise_std"], scale=cfg["noise_scale"], seed=cfg["seed"],
                              lengths=lengths)
    answers = np.array([ex[b].answer if ex[b].answer is not None else 0 for b in take])
    contrasts = np.array([ex[b].contrast if ex[b].contrast is not None else 0 for b in take])
    metric = metrics.by_name(cfg["metric"], answers, contrasts)
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
    normalization = metrics.by_name(cfg["metric"], [0], [0]).normalize
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


def check_positive(name, value):
    """Zero, negative or non-finite noise would give an uncorrupted (all-NaN) or meaningless run."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not 0 < value < math.inf:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def bulk_sweep(model, dataset, sites, corruption, metric, out_dir, *, direction="denoise", window=1,
               shard_size=DEFAULT_SHARD_SIZE, memory_budget=DEFAULT_MEMORY_BUDGET, seed=corrupt.NOISE_SEED, n_samples=10,
               noise_scale=3.0, noise_std=None, model_name=None, progress=True, process_index=None,
               process_count=None, manifest_timeout=600.0, devices=None):
    """Sweep `sites` over every prompt of `dataset`, streaming per-prompt results to `out_dir`.

    model: a jpatch model. dataset: a JSONL path, a `Dataset` (`read_dataset`) or a list of
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
    if corruption not in FILE_CORRUPTIONS:
        raise ValueError(f"unknown corruption {corruption!r}; valid: {', '.join(FILE_CORRUPTIONS)}")
    if metric not in metrics.METRICS:
        raise ValueError(f"unknown metric {metric!r}; valid: {', '.join(metrics.METRICS)}")
    check_direction(direction)
    if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 1:
        raise ValueError(f"window must be an integer >= 1, got {window!r}")
    if isinstance(shard_size, bool) or not isinstance(shard_size, (int, np.integer)) or shard_size < 1:
        raise ValueError(f"shard_size must be an integer >= 1, got {shard_size!r}")
    check_memory_budget(memory_budget)
    bad_samples = isinstance(n_samples, bool) or not isinstance(n_samples, (int, np.integer)) or n_samples < 1
    if corruption == "noise" and bad_samples:
        raise ValueError(f"n_samples must be an integer >= 1, got {n_samples!r}")
    if corruption == "noise":
        check_positive("noise_scale", noise_scale)
        if noise_std is not None:
            check_positive("noise_std", noise_std)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    process_index = jax.process_index() if process_index is None else int(process_index)
    process_count = jax.process_count() if process_count is None else int(process_count)
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} out of range for process_count {process_count}")
    specs = resolve_sites(sites, int(window))
    # read here with the model's tokenizer (GPT-2's for GPT-2); a Dataset given was read with the caller's
    tokenizer = None if isinstance(dataset, Dataset) else for_model(model)[0]
    dataset = as_dataset(dataset, corruption, metric, model.config.n_ctx, tokenizer)
    out_dir = Path(out_dir).expanduser()

    cfg = dict(corruption=corruption, metric=metric, direction=direction, window=int(window), seed=int(seed),
               shard_size=int(shard_size), memory_budget=memory_budget, n_samples=None, noise_scale=None,
               noise_std=None)
    if corruption == "noise":
        std = key_token_std(model, dataset) if noise_std is None else float(noise_std)
        check_positive("noise_std (measured over the key tokens)", std)
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
        "normalization": metrics.by_name(metric, [0], [0]).normalize,  # how Result.mean normalizes raw scores
        "sites": {s.name: {"site": s.site, "axes": list(s.axes), "grid": list(s.grid(model.config, max_len))}
                  for s in specs},
    }
    on_disk = prepare_out_dir(out_dir, manifest, process_index, manifest_timeout)
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
            log.warning(f"jpatch bulk: {e}; recomputing it")
            return False
        if name not in now.get("shards", {}):
            unrecorded[name] = digest
        return True

    done = [i for i in mine if finished(i, on_disk)]
    if unrecorded:  # shards whose writer was killed before recording their checksum
        record_checksums(out_dir, unrecorded)
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
                    record_checksums(out_dir, {path.name: results.file_sha256(path)})
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
                    log.warning(f"jpatch bulk: waiting for {len(queue)} shard(s) another run is computing (e.g. "
                                f"{lock.path.name}: {lock.describe()})")
                    told = True
                time.sleep(0.5)
    finally:
        bar.close()
    if unrecorded:
        record_checksums(out_dir, unrecorded)
    if undefined:
        warnings.warn(
            f"the metric was undefined (not finite) for {len(undefined)} prompt(s), stored as NaN: dataset line(s) "
            f"{sorted(undefined)[:MAX_ERRORS]}", RuntimeWarning, stacklevel=2
        )
    return BulkRun(out_dir, n, n_shards, computed, sorted(done + by_others), process_index, process_count,
                   sorted(undefined))
