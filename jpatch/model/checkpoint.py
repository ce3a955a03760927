"""Save and load jpatch models: a folder with config.json and an orbax checkpoint.

    weights/<name>/config.json   "family" (jpatch.model.families; absent: gpt2), the family's config
                                 fields, "dtype", "sha256" (of each checkpoint file, verified by `load`;
                                 a folder saved before jpatch wrote it loads unverified), and whatever
                                 the writer added ("source")
    weights/<name>/checkpoint/   orbax: one array per model leaf, named like "blocks.attn.c_attn_w"
    weights/<name>/tokenizer.json   the model's tokenizer, for a family that carries its own (GPT-NeoX),
                                 with tokenizer_config.json / special_tokens_map.json when it had them

Loading needs only the folder: the model's structure comes from config.json, so
no model has to exist first. Folders are written atomically (a temporary folder
beside the target, renamed at the end).
"""

import contextlib
import importlib.resources
import dataclasses
import json
import logging
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp

from jpatch.files.atomic import atomic_dir, file_sha256
from jpatch.model import processing

CONFIG_FILE = "config.json"
ARRAYS_DIR = "checkpoint"
TOKENIZER_FILE = "tokenizer.json"
CHECKSUMS = "sha256"  # config.json's {path under the folder: hex digest} of the checkpoint's files


# --- names <-> arrays ---------------------------------------------------------------


def _key_name(key):
    for attr in ("name", "key", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def named_arrays(model):
    """The model's arrays as {"wte": ..., "blocks.attn.c_attn_w": ..., ...} (stable, readable names)."""
    leaves = jax.tree_util.tree_flatten_with_path(model)[0]
    return {".".join(_key_name(k) for k in path): leaf for path, leaf in leaves}


def refuse_non_finite(arrays, where):
    """Refuse a tensor holding NaN or inf: a damaged checkpoint, or a value past the range of the
    dtype it was cast to (bfloat16 turns a finite 3.4e38 into inf), so check after any cast."""
    for name, array in arrays.items():
        array = jnp.asarray(array)
        if jnp.issubdtype(array.dtype, jnp.floating) and not bool(jnp.isfinite(array).all()):
            bad = int(array.size - jnp.isfinite(array).sum())
            raise ValueError(f"{where}: tensor {name!r} has {bad} non-finite value(s) (NaN or inf) as "
                             f"{jnp.dtype(array.dtype).name}: a damaged checkpoint, or values past that dtype's range")


def _checksums(folder):
    """{path relative to `folder`: sha256} of every file of its checkpoint."""
    files = sorted(p for p in (Path(folder) / ARRAYS_DIR).rglob("*") if p.is_file())
    return {p.relative_to(folder).as_posix(): file_sha256(p) for p in files}


def _verify_checksums(folder, expected):
    """Compare the checkpoint's files with the sha256s `save` wrote in config.json (orbax stores none, so
    one flipped byte would load as a wrong weight); None (saved before jpatch wrote them): nothing to compare."""
    if expected is None:
        return
    path = Path(folder) / CONFIG_FILE
    if not isinstance(expected, dict):
        raise ValueError(f"cannot read {path}: {CHECKSUMS!r} must map file names to sha256 digests")
    directory = (Path(folder) / ARRAYS_DIR).absolute()
    for name, digest in expected.items():
        file = Path(folder) / name
        if not file.is_file():
            raise ValueError(f"corrupt or unreadable checkpoint {directory}: {name} is missing")
        if file_sha256(file) != digest:
            raise ValueError(f"corrupt or unreadable checkpoint {directory}: {name} does not match the sha256 "
                             f"saved in {path} (the file changed since it was saved)")


def _abstract_model(config, dtype):
    """A model of `config`'s family whose leaves are ShapeDtypeStructs: the structure config.json
    implies, at no cost."""
    from jpatch.model import families

    model = families.by_name(config.family).model
    return jax.eval_shape(lambda: model.init(config, key=jax.random.key(0), dtype=dtype))


def _tokenizer_files(model):
    """[(source path, name in the folder)] of the model's tokenizer: its tokenizer.json and the
    special-token files beside it; [] for a model without one. Raises if the file is gone."""
    from jpatch.model.hf_tokenizer import SPECIAL_TOKEN_FILES

    path = getattr(model, "tokenizer_file", None)
    if path is None:
        return []
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"the model's tokenizer file {path} is missing; set tokenizer_file=None to save "
                                "the model without a tokenizer")
    return [(path, TOKENIZER_FILE)] + [(path.parent / n, n) for n in SPECIAL_TOKEN_FILES if (path.parent / n).is_file()]


# --- quiet orbax ----------------------------------------------------------------------


@contextlib.contextmanager
def _quiet():
    """Silence orbax's absl / Python logging below ERROR for the duration."""
    import absl.logging

    verbosity = absl.logging.get_verbosity()
    loggers = [logging.getLogger(n) for n in ("absl", "orbax", "orbax.checkpoint")]
    levels = [lg.level for lg in loggers]
    absl.logging.set_verbosity(absl.logging.ERROR)
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        absl.logging.set_verbosity(verbosity)
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _ocp():
    import orbax.checkpoint as ocp

    return ocp


# --- save / load ----------------------------------------------------------------------


def save(model, out_dir, *, extra_config=None, overwrite=False, inputs=()):
    """Write `model` to `out_dir` (config.json + orbax checkpoint) atomically; returns the path.

    The arrays are stored in the model's dtype (`model.astype(jnp.bfloat16)` halves
    the folder). `extra_config` entries are added to config.json ("source", ...).
    Refuses to replace a non-empty `out_dir` unless it is a jpatch model folder and
    `overwrite=True` (`check_target`); `inputs`: paths `out_dir` may not be or contain.
    """
    if processing.is_processed(model):
        raise ValueError("jpatch saves unprocessed weights only (a processed model's folder would load as a "
                         "different model): save the unprocessed one and process at load, e.g. "
                         "jpatch.load(folder, fold_ln=True, center_writing_weights=True, center_unembed=True)")
    extra_config = dict(extra_config or {})
    clash = set(extra_config) & ({f.name for f in dataclasses.fields(model.config)} | {"dtype", "family", CHECKSUMS})
    if clash:
        raise ValueError(f"extra_config may not set {sorted(clash)}: they are written from the model")
    tokenizer = _tokenizer_files(model)
    arrays = named_arrays(model)
    dtypes = sorted({str(jnp.dtype(a.dtype)) for a in arrays.values()})
    config = {"family": model.config.family, **model.config.to_dict(),
              "dtype": dtypes[0] if len(dtypes) == 1 else dtypes, **extra_config}
    out_dir = Path(out_dir).expanduser()
    with atomic_dir(out_dir, overwrite, kind="model", inputs=inputs) as tmp:
        for source, name in tokenizer:
            shutil.copyfile(source, tmp / name)
        ocp = _ocp()
        with _quiet():
            checkpointer = ocp.StandardCheckpointer()
            try:
                checkpointer.save((tmp / ARRAYS_DIR).absolute(), arrays)
                checkpointer.wait_until_finished()
            finally:
                checkpointer.close()
        config[CHECKSUMS] = _checksums(tmp)  # after the checkpoint is complete
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return out_dir


def bundled_weights():
    """The folder of the models shipped with jpatch: the package `jpatch.weights` (the
    repository's weights/, mapped by pyproject.toml, so editable and regular installs both
    find it), or weights/ beside the source tree when jpatch runs uninstalled (PYTHONPATH)."""
    try:
        return Path(str(importlib.resources.files("jpatch.weights")))
    except ModuleNotFoundError:
        return Path(__file__).resolve().parents[2] / "weights"


def resolve(path_or_name):
    """A model folder: a path, or a bare name looked up as weights/<name>/ in the working
    directory and then among the models bundled with jpatch (the repository's weights/ folder,
    installed as the package `jpatch.weights`)."""
    path = Path(path_or_name).expanduser()
    if (path / CONFIG_FILE).is_file():
        return path
    name = str(path_or_name)
    searched = []
    if len(Path(name).parts) == 1 and not name.startswith("."):
        searched = [Path.cwd() / "weights" / name, bundled_weights() / name]
        for candidate in searched:
            if candidate.is_dir():
                return candidate
    if path.is_dir():
        return path  # load() reports the missing config.json
    if path.exists():
        raise NotADirectoryError(f"{path} is not a model folder (expected a directory with {CONFIG_FILE})")
    where = f" (looked for {path}, {', '.join(map(str, searched))})" if searched else ""
    raise FileNotFoundError(f"no model folder {name!r}{where}")


def read_config(folder):
    """config.json of a model folder -> (the family's config, the whole dict). The family is its
    "family" entry; a folder without one (written before jpatch had families) is GPT-2."""
    from jpatch.model import families

    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"missing {path}: not a jpatch model folder")
    try:
        raw = json.loads(path.read_text())
        family = raw.get("family", "gpt2")
        if not isinstance(family, str) or family not in families.FAMILIES:
            raise ValueError(f"family {family!r} is not a model family this jpatch has "
                             f"({', '.join(families.FAMILIES)}); a newer jpatch may have written it")
        config_class = families.by_name(family).config
        fields = {f.name for f in dataclasses.fields(config_class)}
        return config_class.from_dict({k: v for k, v in raw.items() if k in fields}), raw
    except (OSError, ValueError, TypeError, AttributeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from e


def _stored_arrays(checkpointer, directory):
    """{name: (shape, dtype)} from the checkpoint's metadata."""
    metadata = checkpointer.metadata(directory)
    tree = getattr(getattr(metadata, "item_metadata", metadata), "tree", None)
    if tree is None:
        tree = getattr(metadata, "item_metadata", metadata)
    return {name: (tuple(m.shape), jnp.dtype(m.dtype)) for name, m in dict(tree).items()}


def _read_dtype(stored, dtype):
    """The dtype an array is restored in: `dtype` (None: as stored), except that an integer array (a
    layer's sliding window) keeps its own, and a narrower float array is read as stored and widened
    after (orbax's cast while reading held both copies of every array: a bfloat16 folder loaded in
    float32 peaked at about 1.5x its float32 weights)."""
    stored = jnp.dtype(stored)
    if dtype is None or not jnp.issubdtype(stored, jnp.floating) or stored.itemsize < jnp.dtype(dtype).itemsize:
        return stored
    return jnp.dtype(dtype)


def load(path_or_name, *, dtype="float32", fold_ln=False, center_writing_weights=False, center_unembed=False,
         fold_value_biases=False):
    """Load a model (`GPT2`, `NeoX`: the folder's family) saved by `save` / `convert_hf`.

    `path_or_name` is a folder, or a bare name resolved to weights/<name>/ (working
    directory first, then the repository root). `dtype` casts the weights while
    reading: float32 by default, so analysis runs in full precision whatever the
    checkpoint stores; "bfloat16" halves the memory; None keeps the stored dtype (an integer
    dtype is refused). The checkpoint's files are checked against the sha256s `save` wrote, and
    the weights refused if any is NaN or inf.
    A model that carries its tokenizer (GPT-NeoX) reads it from the folder's tokenizer.json.
    fold_ln, center_writing_weights, center_unembed, fold_value_biases: TransformerLens's weight
    processing (`jpatch.process_weights`; its from_pretrained turns all four on), off by default.
    """
    steps = dict(fold_ln=fold_ln, center_writing_weights=center_writing_weights, center_unembed=center_unembed,
                 fold_value_biases=fold_value_biases)
    processing.check_steps(steps)  # before any file is read
    try:
        is_float = dtype is None or jnp.issubdtype(jnp.dtype(dtype), jnp.floating)
    except TypeError:
        is_float = False
    if not is_float:  # an integer dtype would round every weight
        raise ValueError(f"dtype must be a floating-point dtype (float32, bfloat16, ...) or None, got {dtype!r}")
    folder = resolve(path_or_name)
    config, raw = read_config(folder)
    directory = (folder / ARRAYS_DIR).absolute()
    if not directory.is_dir():
        raise FileNotFoundError(f"missing checkpoint {directory}")
    _verify_checksums(folder, raw.get(CHECKSUMS))
    ocp = _ocp()
    with _quiet():
        checkpointer = ocp.StandardCheckpointer()
        try:
            try:
                stored = _stored_arrays(checkpointer, directory)
            except Exception as e:
                raise ValueError(f"corrupt or unreadable checkpoint {directory}: {type(e).__name__}: {e}") from e
            abstract = _abstract_model(config, jnp.float32)
            expected = named_arrays(abstract)
            for name, struct in expected.items():
                if name not in stored:
                    raise ValueError(f"checkpoint {directory} lacks array {name!r}")
                if stored[name][0] != struct.shape:
                    raise ValueError(
                        f"array {name!r} in {directory} has shape {stored[name][0]}, "
                        f"but {folder / CONFIG_FILE} implies {struct.shape}"
                    )
            unexpected = sorted(set(stored) - set(expected))
            if unexpected:
                raise ValueError(f"checkpoint {directory} has arrays the model lacks: {unexpected}")
            # Under jax.distributed, jax.devices()[0] may belong to another process.
            sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            target = {
                name: jax.ShapeDtypeStruct(s.shape, _read_dtype(stored[name][1], dtype), sharding=sharding)
                for name, s in expected.items()
            }
            try:
                restored = checkpointer.restore(directory, target)
            except Exception as e:
                raise ValueError(f"corrupt or unreadable checkpoint {directory}: {type(e).__name__}: {e}") from e
        finally:
            checkpointer.close()
    for name in list(restored):  # widened one array at a time, each narrow copy freed as the next is cast
        if dtype and jnp.issubdtype(restored[name].dtype, jnp.floating) and restored[name].dtype != jnp.dtype(dtype):
            restored[name] = restored[name].astype(dtype).block_until_ready()  # done before the next: one copy at a time
    refuse_non_finite(restored, f"model {folder}")
    treedef = jax.tree_util.tree_structure(abstract)
    model = jax.tree_util.tree_unflatten(treedef, [restored[name] for name in expected])
    tokenizer = folder / TOKENIZER_FILE
    if hasattr(model, "tokenizer_file") and tokenizer.is_file():
        model = dataclasses.replace(model, tokenizer_file=str(tokenizer.absolute()))
    return processing.process_weights(model, **steps)
