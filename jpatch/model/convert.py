"""Hugging Face GPT-2 weights -> jpatch `GPT2`, and the conversion of any family's checkpoint.

The GPT-2 mapping is name for name (Hugging Face Conv1D weights are already [in, out]);
the per-layer tensors are stacked along a leading layer axis. `convert_hf` reads a
checkpoint folder (safetensors, torch bin or Flax msgpack) or Hub id of a family jpatch
has (`jpatch.model.families`, by config.json's `model_type`: gpt2, gpt_neox) and writes a
jpatch folder that `jpatch.model.checkpoint.load` reads.
"""

import dataclasses
import json
import logging
import re

from pathlib import Path

import numpy as np
import jax.numpy as jnp

from jpatch.model.checkpoint import named_arrays, refuse_non_finite
from jpatch.model.gpt2 import GPT2, GPT2Config, Attention, Block, LayerNorm, MLP


def config_from_hf(hf):
    """A Hugging Face GPT2Config (object or config.json dict) -> GPT2Config."""
    get = hf.get if isinstance(hf, dict) else lambda k, default=None: getattr(hf, k, default)
    d_model = get("n_embd")
    return GPT2Config(
        n_layer=get("n_layer"),
        n_head=get("n_head"),
        d_model=d_model,
        d_mlp=get("n_inner") or 4 * d_model,
        n_ctx=get("n_positions"),
        d_vocab=get("vocab_size"),
        layer_norm_eps=get("layer_norm_epsilon", 1e-5),
        activation=get("activation_function", "gelu_new"),
    )


def from_hf_state_dict(state, config, dtype=jnp.float32):
    """Build a `GPT2` from a Hugging Face GPT-2 state dict of NumPy arrays.

    Accepts GPT2LMHeadModel keys ("transformer.h.0...") and GPT2Model keys ("h.0...").
    Raises KeyError naming a missing tensor and ValueError naming a tensor whose
    shape does not match `config`.
    """
    state = {k.removeprefix("transformer."): v for k, v in state.items()}
    L, d, m, V = config.n_layer, config.d_model, config.d_mlp, config.d_vocab

    def get(name, shape):
        if name not in state:
            raise KeyError(f"tensor {name!r} is missing from the checkpoint")
        array = np.asarray(state[name])
        if array.shape != shape:
            raise ValueError(f"tensor {name!r} has shape {array.shape}, but the config needs {shape}")
        array = jnp.asarray(array, dtype=dtype)
        refuse_non_finite({name: array}, "the checkpoint")  # after the cast: past bfloat16's range is inf
        return array

    def stack(suffix, shape):
        return jnp.stack([get(f"h.{i}.{suffix}", shape) for i in range(L)])

    if "lm_head.weight" in state and not np.array_equal(
        np.asarray(state["lm_head.weight"]), np.asarray(state["wte.weight"])
    ):
        raise ValueError("'lm_head.weight' differs from 'wte.weight': jpatch supports GPT-2's tied unembedding only")
    blocks = Block(
        ln_1=LayerNorm(stack("ln_1.weight", (d,)), stack("ln_1.bias", (d,))),
        attn=Attention(
            stack("attn.c_attn.weight", (d, 3 * d)),
            stack("attn.c_attn.bias", (3 * d,)),
            stack("attn.c_proj.weight", (d, d)),
            stack("attn.c_proj.bias", (d,)),
        ),
        ln_2=LayerNorm(stack("ln_2.weight", (d,)), stack("ln_2.bias", (d,))),
        mlp=MLP(
            stack("mlp.c_fc.weight", (d, m)),
            stack("mlp.c_fc.bias", (m,)),
            stack("mlp.c_proj.weight", (m, d)),
            stack("mlp.c_proj.bias", (d,)),
        ),
    )
    return GPT2(
        config,
        get("wte.weight", (V, d)),
        get("wpe.weight", (config.n_ctx, d)),
        blocks,
        LayerNorm(get("ln_f.weight", (d,)), get("ln_f.bias", (d,))),
    )


# --- reading Hugging Face checkpoints -------------------------------------------------

# Weight files in the order they are preferred; a sharded checkpoint has an index file.
SAFETENSORS, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
TORCH_BIN, TORCH_BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
FLAX_MSGPACK = "flax_model.msgpack"
WEIGHT_FILES = (SAFETENSORS, SAFETENSORS_INDEX, TORCH_BIN, TORCH_BIN_INDEX, FLAX_MSGPACK)

# A GPT-NeoX model carries its tokenizer (jpatch.model.hf_tokenizer): the file and its special tokens.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
HF_CONFIG_KEYS = ("n_layer", "n_head", "n_embd", "n_positions", "vocab_size")

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def resolve_source(src):
    """A local checkpoint directory, or a Hugging Face Hub id downloaded with `snapshot_download`."""
    path = Path(src).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise NotADirectoryError(f"{path} is not a directory; pass the folder holding config.json and the weights")
    name = str(src)
    # A hub id is "name" or "org/name"; a path whose folder exists here ("weights/gpt2x") is a local typo.
    looks_local = len(path.parts) > 1 and path.parent.exists()
    if not _HUB_ID.fullmatch(name) or name.endswith(WEIGHT_FILES + ("config.json",)) or looks_local:
        raise FileNotFoundError(f"no such checkpoint directory: {path}")
    logging.getLogger("jpatch").warning(f"jpatch: {name!r} is not a local directory; trying it as a Hugging Face Hub id")
    return _download(name)


def _download(repo_id):
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:
        raise FileNotFoundError(
            f"{repo_id!r} is not a local directory, and huggingface_hub is not installed to download it from the Hub"
        ) from e
    # One weight format only: the Hub's GPT-2 repos also hold TF, Rust and ONNX copies.
    formats = (
        [SAFETENSORS, SAFETENSORS_INDEX, "model-*-of-*.safetensors"],
        [TORCH_BIN, TORCH_BIN_INDEX, "pytorch_model-*-of-*.bin"],
        [FLAX_MSGPACK],
    )
    try:
        for patterns in formats:
            folder = Path(snapshot_download(repo_id, allow_patterns=["config.json", *TOKENIZER_FILES, *patterns]))
            if any((folder / f).is_file() for f in patterns[:2]):
                return folder
    except Exception as e:
        raise OSError(
            f"{repo_id!r} is not a local directory and could not be downloaded from the Hugging Face Hub: "
            f"{type(e).__name__}: {e}"
        ) from e
    raise FileNotFoundError(f"Hugging Face Hub repo {repo_id!r} has no {', '.join(WEIGHT_FILES)}")


def _read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"missing {path}") from None
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {path}: {e}") from e


def _read_safetensors(path):
    import safetensors.numpy

    try:
        return safetensors.numpy.load_file(path)
    except TypeError:  # bfloat16, which NumPy's own dtypes lack: read through JAX
        import safetensors.flax

        return {k: np.asarray(v) for k, v in safetensors.flax.load_file(path).items()}


def _read_torch(path):
    try:
        import torch
    except ImportError:
        raise ImportError(
            f"{path} is a PyTorch checkpoint and reading it needs torch (pip install torch); "
            f"or convert from a folder with {SAFETENSORS}"
        ) from None
    state = torch.load(path, map_location="cpu", weights_only=True)
    to_numpy = lambda t: (t.float() if t.dtype == torch.bfloat16 else t).detach().numpy()
    return {k: to_numpy(v) for k, v in state.items() if isinstance(v, torch.Tensor)}


def _read_flax(path):
    from flax.serialization import msgpack_restore

    return flax_params_to_hf(msgpack_restore(Path(path).read_bytes()))


def flax_params_to_hf(params):
    """Hugging Face Flax GPT-2 params (nested dict) -> PyTorch state-dict names and layout.

    FlaxGPT2 names its tensors transformer/h/0/attn/c_attn/kernel etc.; LayerNorm
    weights are `scale`, embeddings `embedding`. Its `FlaxConv1D` declares `kernel`
    as [out, in] (transposed on use), the transpose of PyTorch's Conv1D [in, out],
    so every kernel is transposed here (as HF's own Flax<->PyTorch converter does;
    this also maps an untied `lm_head` Dense kernel [in, out] to Linear's [out, in]).
    """
    state = {}

    def walk(node, path):
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, (*path, str(key)))
                continue
            leaf, value = str(key), np.asarray(value)
            if leaf == "kernel":
                leaf, value = "weight", np.ascontiguousarray(value.T)
            elif leaf in ("scale", "embedding"):
                leaf = "weight"
            state[".".join((*path, leaf))] = value

    if set(params) == {"params"}:
        params = params["params"]
    walk(params, ())
    return state


def _weight_file(folder, family="GPT-2"):
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"no {family} weights in {folder}: expected one of {', '.join(WEIGHT_FILES)}")


def _read_weights(path):
    if path.name.endswith(".index.json"):
        weight_map = _read_json(path).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{path} has no weight_map")
        folder = path.parent.resolve()
        state = {}
        for shard in sorted(set(map(str, weight_map.values()))):
            if folder not in (path.parent / shard).resolve().parents:  # no "../" or absolute paths
                raise ValueError(f"{path}: weight_map entry {shard!r} points outside the checkpoint folder {folder}")
            if shard.endswith(".index.json"):  # an index naming an index (itself, or a cycle) never ends
                raise ValueError(f"{path}: weight_map entry {shard!r} is an index file, not a weight file")
            state.update(_read_weights(path.parent / shard))
        return state
    if not path.is_file():
        raise FileNotFoundError(f"missing weight file {path}")
    reader = _read_flax if path.suffix == ".msgpack" else _read_safetensors if path.suffix == ".safetensors" else _read_torch
    try:
        return reader(path)
    except ImportError:
        raise
    except Exception as e:
        raise ValueError(f"cannot read weights from {path}: {type(e).__name__}: {e}") from e


def _hf_config_keys(family):
    from jpatch.model import llama_hf, neox_hf

    return {"gpt2": HF_CONFIG_KEYS, "neox": neox_hf.HF_CONFIG_KEYS, "llama": llama_hf.HF_CONFIG_KEYS,
            "gemma2": llama_hf.HF_CONFIG_KEYS}.get(family.name, ())


def check_hf_config(config, path):
    """config.json's family (by `model_type`; none means gpt2) and the jpatch config it converts
    to; a ValueError naming `path` and the field for a setting jpatch cannot reproduce."""
    from jpatch.model import families

    if not isinstance(config, dict):
        raise ValueError(f"{path} is not a Hugging Face model config: expected a JSON object")
    model_type = config.get("model_type", "gpt2")
    try:
        family = families.by_hf_type(model_type)
    except ValueError as e:
        raise ValueError(f"{path} describes a {model_type!r} model: {e}") from None
    label = family.config.sites.family
    missing = [k for k in _hf_config_keys(family) if config.get(k) is None]
    if missing:
        raise ValueError(f"{path} is not a {label} config: missing {', '.join(missing)}")
    try:
        return family, family.config_from_hf(config)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path}: {e}") from None


def tied_unembedding(family, hf_config):
    """Whether the checkpoint ties its unembedding to the embedding, as transformers reads config.json."""
    return bool(hf_config.get("tie_word_embeddings", family.name in ("gpt2", "gemma2")))  # their configs' default


def load_hf_state_dict(src):
    """Read a Hugging Face checkpoint of a family jpatch has: (state dict of NumPy arrays, config.json dict).

    `src` is a local folder with config.json and one of model.safetensors,
    pytorch_model.bin (needs torch) or flax_model.msgpack (tried in that order;
    sharded *.index.json checkpoints work too), or a Hub id such as "gpt2" when
    no such folder exists (downloaded with huggingface_hub). State-dict names and
    layouts are PyTorch's whatever the file format.
    """
    folder = resolve_source(src)
    config = _read_json(folder / "config.json")
    family, _ = check_hf_config(config, folder / "config.json")
    return _read_weights(_weight_file(folder, family.config.sites.family)), config


def load_hf(src, *, dtype=jnp.float32):
    """A model (`GPT2`, `NeoX`: config.json's `model_type`) straight from a Hugging Face checkpoint
    folder or Hub id (see `load_hf_state_dict`). A GPT-NeoX folder's tokenizer.json becomes the
    model's `tokenizer_file`."""
    folder = resolve_source(src)
    state, hf_config = load_hf_state_dict(folder)
    family, config = check_hf_config(hf_config, folder / "config.json")
    model = family.from_hf_state_dict(state, config, dtype, tied_unembedding(family, hf_config))
    refuse_non_finite(named_arrays(model), f"{folder} as {jnp.dtype(dtype).name}")  # every family, after the cast
    tokenizer = _source_tokenizer(folder, model)
    if tokenizer is not None:
        model = dataclasses.replace(model, tokenizer_file=str(tokenizer))
    return model


def _source_tokenizer(folder, model):
    """The source folder's tokenizer.json when the model carries a tokenizer (GPT-NeoX); checked
    readable, so that a broken file is refused before anything is written."""
    path = Path(folder) / "tokenizer.json"
    if not hasattr(model, "tokenizer_file") or not path.is_file():
        return None
    from jpatch.model.hf_tokenizer import HFTokenizer

    tok = HFTokenizer(path)
    if tok.vocab_size > model.config.d_vocab:
        raise ValueError(f"{path} has {tok.vocab_size} tokens, more than the model's vocab_size="
                         f"{model.config.d_vocab}")
    return path.absolute()


def convert_hf(src, out_dir, *, dtype="float32", overwrite=False):
    """Convert a Hugging Face checkpoint of a family jpatch has (GPT-2, GPT-NeoX / Pythia: config.json's
    `model_type`) into a jpatch folder: config.json + orbax checkpoint (+ tokenizer.json, for a
    GPT-NeoX source folder that has one).

    A local source's config.json is checked first: a setting jpatch cannot reproduce exactly is
    refused, naming the field, before anything is written. The folder is written atomically (a
    temporary folder beside `out_dir`, renamed at the end), so a failed conversion leaves nothing
    behind. An existing non-empty `out_dir` is replaced only when it is a jpatch model folder and
    `overwrite=True`; the source (or a folder containing it) is never a valid `out_dir`. Returns
    the folder's path.
    """
    from jpatch.files import atomic
    from jpatch.model import checkpoint
    try:
        dtype_name = jnp.dtype(dtype).name
    except TypeError:
        dtype_name = None
    if dtype_name not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    local_dir = Path(src).expanduser()
    if local_dir.is_dir() and (local_dir / "config.json").is_file():  # settings first; a Hub id's after download
        check_hf_config(_read_json(local_dir / "config.json"), local_dir / "config.json")
    local = [local_dir] if local_dir.exists() else []
    atomic.check_target(out_dir, overwrite, kind="model", inputs=local)  # before the slow part
    folder = resolve_source(src)
    source = str(src) if not Path(src).expanduser().is_dir() else str(folder.resolve())
    model = load_hf(folder, dtype=DTYPES[dtype_name])
    return checkpoint.save(model, out_dir, extra_config={"source": source}, overwrite=overwrite, inputs=[folder])
