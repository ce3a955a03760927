"""Hugging Face checkpoints (safetensors, torch bin, Flax msgpack, Hub id) -> convert_hf ->
checkpoint.load, compared with `transformers` logits; atomic writes; clear errors."""

import importlib.util
import json
import os
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import reference
from jpatch.model import checkpoint
from jpatch.model.convert import convert_hf, flax_params_to_hf, load_hf_state_dict

V = reference.TINY["vocab_size"]
TOKENS = reference.random_tokens(2, 10, V, seed=3)
REPO = Path(__file__).resolve().parent.parent


def max_err(a, b):
    return float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max())


def folder_bytes(path):
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


# --- writing the three Hugging Face formats ------------------------------------------------


def flax_params(state, n_layer):
    """A PyTorch GPT-2 state dict in the layout HF's FlaxGPT2LMHeadModel saved to flax_model.msgpack.

    transformers 5 dropped Flax, so this follows transformers 4.x modeling_flax_gpt2.py:
    params["transformer"] holds wte/wpe {"embedding"}, h/{i}/{ln_1, attn/{c_attn, c_proj},
    ln_2, mlp/{c_fc, c_proj}}, ln_f; LayerNorm weights are "scale". `FlaxConv1D` declares
    its kernel as (features, in_features), i.e. [out, in], the transpose of PyTorch's
    Conv1D weight [in, out]. The tied lm_head has no params.
    """
    conv = lambda name: {"kernel": state[f"{name}.weight"].T.copy(), "bias": state[f"{name}.bias"]}
    norm = lambda name: {"scale": state[f"{name}.weight"], "bias": state[f"{name}.bias"]}
    h = {}
    for i in range(n_layer):
        p = f"transformer.h.{i}"
        h[str(i)] = {
            "ln_1": norm(f"{p}.ln_1"),
            "attn": {"c_attn": conv(f"{p}.attn.c_attn"), "c_proj": conv(f"{p}.attn.c_proj")},
            "ln_2": norm(f"{p}.ln_2"),
            "mlp": {"c_fc": conv(f"{p}.mlp.c_fc"), "c_proj": conv(f"{p}.mlp.c_proj")},
        }
    d = state["transformer.wte.weight"].shape[1]
    assert h["0"]["attn"]["c_attn"]["kernel"].shape == (3 * d, d)  # (features, in_features)
    return {
        "transformer": {
            "wte": {"embedding": state["transformer.wte.weight"]},
            "wpe": {"embedding": state["transformer.wpe.weight"]},
            "h": h,
            "ln_f": norm("transformer.ln_f"),
        }
    }


def write_hf(hf, folder, fmt):
    folder = Path(folder)
    if fmt == "safetensors":
        hf.save_pretrained(folder)
        assert (folder / "model.safetensors").is_file()
        return folder
    folder.mkdir(parents=True)
    hf.config.to_json_file(folder / "config.json")
    if fmt == "bin":  # as transformers 4 save_pretrained(safe_serialization=False) wrote it, lm_head included
        torch.save(hf.state_dict(), folder / "pytorch_model.bin")
    elif fmt == "msgpack":
        from flax.serialization import msgpack_serialize

        params = flax_params(reference.hf_state_dict(hf), hf.config.n_layer)
        (folder / "flax_model.msgpack").write_bytes(msgpack_serialize(params))
    return folder


@pytest.fixture(scope="module")
def hf_dirs(hf_tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {fmt: write_hf(hf_tiny, root / fmt, fmt) for fmt in ("safetensors", "bin", "msgpack")}


@pytest.fixture(scope="module")
def hf_tiny_logits(hf_tiny):
    return reference.hf_logits(hf_tiny, TOKENS)


# --- round trips -------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["safetensors", "bin", "msgpack"])
def test_convert_and_load_match_transformers(fmt, hf_dirs, hf_tiny_logits, tmp_path):
    out = convert_hf(hf_dirs[fmt], tmp_path / "model")
    assert out == tmp_path / "model"
    assert sorted(p.name for p in out.iterdir()) == [".jpatch-output.json", "checkpoint", "config.json"]
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "float32" and config["source"] == str(hf_dirs[fmt].resolve())
    assert config["n_layer"] == 2 and config["d_vocab"] == V
    model = checkpoint.load(out)
    assert model.dtype == jnp.float32
    assert max_err(model(TOKENS), hf_tiny_logits) < 1e-4


def test_flax_state_dict_equals_torch(hf_tiny, hf_dirs):
    """The msgpack reader recovers PyTorch names and orientation exactly."""
    flax_state, _ = load_hf_state_dict(hf_dirs["msgpack"])
    torch_state = {k.removeprefix("transformer."): v for k, v in reference.hf_state_dict(hf_tiny).items()}
    assert set(flax_state) == {f"transformer.{k}" for k in torch_state if k != "lm_head.weight"}
    for name, value in flax_state.items():
        np.testing.assert_array_equal(value, torch_state[name.removeprefix("transformer.")], err_msg=name)
    # a GPT2Model (no LM head) checkpoint, and a {"params": ...} wrapper, read the same
    bare = flax_params_to_hf({"params": {"h": {"0": {"attn": {"c_proj": {"kernel": np.eye(3)[::-1]}}}}}})
    np.testing.assert_array_equal(bare["h.0.attn.c_proj.weight"], np.eye(3)[::-1].T)


@pytest.fixture(scope="module")
def hf_small():
    return reference.hf_model(initializer_range=0.02, **reference.SMALL)


def test_gpt2_small_shape(hf_small, tmp_path):
    """The real GPT-2 small shape (12 layers, 768, vocab 50257), random weights, one short prompt.
    In safetensors, the format GPT-2 ships in: every format's reading is checked against
    transformers at the tiny shape (test_convert_and_load_match_transformers), and the shape's
    handling after reading does not depend on the format."""
    model = checkpoint.load(convert_hf(write_hf(hf_small, tmp_path / "hf", "safetensors"), tmp_path / "jp"))
    assert model.config.n_layer == 12 and model.wte.shape == (50257, 768) and model.wpe.shape == (1024, 768)
    tokens = np.array([[464, 2068, 7586, 21831, 18045, 625, 262, 16931, 3290, 13]])
    assert max_err(model(tokens), reference.hf_logits(hf_small, tokens)) < 1e-4


def test_bfloat16(hf_dirs, hf_tiny_logits, tmp_path):
    f32 = convert_hf(hf_dirs["safetensors"], tmp_path / "f32")
    bf16 = convert_hf(hf_dirs["safetensors"], tmp_path / "bf16", dtype="bfloat16")
    assert json.loads((bf16 / "config.json").read_text())["dtype"] == "bfloat16"
    assert checkpoint.load(bf16).dtype == jnp.float32  # analysis defaults to float32
    model = checkpoint.load(bf16, dtype=None)  # the stored dtype
    assert model.dtype == jnp.bfloat16 and model.blocks.attn.c_attn_w.dtype == jnp.bfloat16
    logits = np.asarray(model(TOKENS))
    scale = np.abs(hf_tiny_logits).max()
    assert max_err(logits, hf_tiny_logits) < 0.05 * scale
    assert folder_bytes(bf16) < 0.6 * folder_bytes(f32)
    # cast while loading, both ways
    assert checkpoint.load(bf16, dtype="float32").dtype == jnp.float32
    up = checkpoint.load(f32, dtype=jnp.bfloat16)
    assert up.dtype == jnp.bfloat16
    assert max_err(up.wte, model.wte) == 0


def test_save_load_round_trip_and_names(jp_tiny, tmp_path, monkeypatch):
    out = checkpoint.save(jp_tiny, tmp_path / "weights" / "tiny", extra_config={"source": "test", "note": 1})
    config = json.loads((out / "config.json").read_text())
    assert config["source"] == "test" and config["note"] == 1
    for path_or_name in (out, str(out), "tiny"):
        monkeypatch.chdir(tmp_path)  # "tiny" -> ./weights/tiny
        loaded = checkpoint.load(path_or_name)
        assert loaded.config == jp_tiny.config
        for name, array in checkpoint.named_arrays(jp_tiny).items():
            np.testing.assert_array_equal(checkpoint.named_arrays(loaded)[name], array, err_msg=name)
    assert "blocks.attn.c_attn_w" in checkpoint.named_arrays(jp_tiny)
    with pytest.raises(ValueError, match="dtype"):
        checkpoint.save(jp_tiny, tmp_path / "x", extra_config={"dtype": "float16"})


def test_bare_name_resolves_against_repository_root(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as info:
        checkpoint.load("no-such-model")
    message = str(info.value)
    assert str(tmp_path / "weights" / "no-such-model") in message
    assert str(REPO / "weights" / "no-such-model") in message


# --- overwrite and atomicity ---------------------------------------------------------------


def leftovers(parent):
    return [p.name for p in Path(parent).iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_refuses_to_overwrite_unless_asked(hf_dirs, tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    convert_hf(hf_dirs["safetensors"], out)  # an empty folder is fine
    with pytest.raises(FileExistsError, match="overwrite=True"):
        convert_hf(hf_dirs["safetensors"], out)
    convert_hf(hf_dirs["msgpack"], out, overwrite=True)  # replaces the jpatch model folder it wrote
    assert "msgpack" in json.loads((out / "config.json").read_text())["source"]
    assert leftovers(tmp_path) == []
    (out / "notes.txt").write_text("mine")  # a file jpatch did not write: never replaced
    with pytest.raises(FileExistsError, match="did not write there.*notes.txt"):
        convert_hf(hf_dirs["safetensors"], out, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"
    for target in (hf_dirs["safetensors"], hf_dirs["safetensors"].parent):  # the source, or a folder holding it
        with pytest.raises(FileExistsError, match="is or contains the input"):
            convert_hf(hf_dirs["safetensors"], target, overwrite=True)
        assert (hf_dirs["safetensors"] / "config.json").is_file()


def test_failed_conversion_leaves_nothing(hf_dirs, tmp_path, monkeypatch):
    import orbax.checkpoint as ocp

    def fail(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ocp.StandardCheckpointer, "save", fail)
    out = tmp_path / "new" / "deeper" / "model"
    with pytest.raises(RuntimeError, match="disk full"):
        convert_hf(hf_dirs["safetensors"], out)
    assert list(tmp_path.iterdir()) == []  # no out_dir, no temp folder, no created parents

    # a failed overwrite keeps the old folder intact
    monkeypatch.undo()
    old = convert_hf(hf_dirs["safetensors"], tmp_path / "model")
    before = sorted(str(p.relative_to(old)) for p in old.rglob("*"))
    monkeypatch.setattr(ocp.StandardCheckpointer, "save", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        convert_hf(hf_dirs["msgpack"], old, overwrite=True)
    assert sorted(str(p.relative_to(old)) for p in old.rglob("*")) == before
    assert leftovers(tmp_path) == []
    monkeypatch.undo()
    checkpoint.load(old)


# --- errors: Hugging Face side --------------------------------------------------------------


def test_missing_weight_file(hf_tiny, tmp_path):
    folder = tmp_path / "hf"
    folder.mkdir()
    hf_tiny.config.to_json_file(folder / "config.json")
    with pytest.raises(FileNotFoundError, match=f"no GPT-2 weights in {folder}.*model.safetensors"):
        convert_hf(folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_config(hf_dirs, tmp_path):
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes((hf_dirs["safetensors"] / "model.safetensors").read_bytes())
    with pytest.raises(FileNotFoundError, match=f"missing {folder / 'config.json'}"):
        load_hf_state_dict(folder)


def test_missing_local_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such-dir"):
        load_hf_state_dict(tmp_path / "no-such-dir")
    with pytest.raises(FileNotFoundError, match="no-such-dir"):
        load_hf_state_dict("./no-such-dir")


def test_corrupt_weight_file(hf_tiny, tmp_path):
    for name in ("model.safetensors", "pytorch_model.bin", "flax_model.msgpack"):
        folder = tmp_path / name
        folder.mkdir()
        hf_tiny.config.to_json_file(folder / "config.json")
        (folder / name).write_bytes(b"not a checkpoint")
        with pytest.raises(ValueError, match=f"cannot read weights from {folder / name}"):
            load_hf_state_dict(folder)


def write_state(hf, folder, state):
    from safetensors.numpy import save_file

    folder.mkdir()
    hf.config.to_json_file(folder / "config.json")
    save_file(state, folder / "model.safetensors")
    return folder


def test_tensor_with_wrong_shape(hf_tiny, tmp_path):
    state = reference.hf_state_dict(hf_tiny)
    state["transformer.h.1.attn.c_attn.weight"] = state["transformer.h.1.attn.c_attn.weight"].T.copy()
    folder = write_state(hf_tiny, tmp_path / "hf", state)
    with pytest.raises(ValueError, match=r"'h\.1\.attn\.c_attn\.weight' has shape \(192, 64\).*\(64, 192\)"):
        convert_hf(folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_tensor(hf_tiny, tmp_path):
    state = reference.hf_state_dict(hf_tiny)
    del state["transformer.h.1.mlp.c_fc.bias"]
    folder = write_state(hf_tiny, tmp_path / "hf", state)
    with pytest.raises(KeyError, match=r"h\.1\.mlp\.c_fc\.bias"):
        convert_hf(folder, tmp_path / "out")


def test_torch_bin_without_torch(hf_dirs, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch -> ImportError
    with pytest.raises(ImportError, match=r"pytorch_model\.bin.*needs torch"):
        load_hf_state_dict(hf_dirs["bin"])


def test_dtype_names_and_objects(hf_dirs, tmp_path):
    stored = checkpoint.load(convert_hf(hf_dirs["bin"], tmp_path / "bf", dtype=jnp.bfloat16), dtype=None)
    assert stored.dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="float32, bfloat16"):
        convert_hf(hf_dirs["safetensors"], tmp_path / "out", dtype="float8")


# --- Hub ids (no network: snapshot_download is replaced) ------------------------------------


def test_hub_id_downloads_with_snapshot_download(hf_dirs, hf_tiny_logits, tmp_path, monkeypatch):
    import huggingface_hub

    calls = []

    def fake_snapshot_download(repo_id, allow_patterns=None, **kwargs):
        calls.append((repo_id, allow_patterns))
        return str(hf_dirs["safetensors"])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    out = convert_hf("someone/tiny-gpt2", tmp_path / "out")
    assert calls[0][0] == "someone/tiny-gpt2" and "model.safetensors" in calls[0][1]
    assert not any("rust" in p or ".h5" in p for p in calls[0][1])
    assert json.loads((out / "config.json").read_text())["source"] == "someone/tiny-gpt2"
    assert max_err(checkpoint.load(out)(TOKENS), hf_tiny_logits) < 1e-4


def test_hub_download_failure_names_the_id(tmp_path, monkeypatch):
    import huggingface_hub

    def offline(repo_id, **kwargs):
        raise ConnectionError("network is unreachable")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(OSError, match="'gpt2-xl'.*network is unreachable"):
        convert_hf("gpt2-xl", tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


# --- errors: jpatch checkpoints --------------------------------------------------------------


@pytest.fixture
def saved(jp_tiny, tmp_path):
    return checkpoint.save(jp_tiny, tmp_path / "saved")


def test_load_missing_folder_or_config(saved, tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere")):
        checkpoint.load(tmp_path / "nowhere")
    (saved / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=f"missing {saved / 'config.json'}"):
        checkpoint.load(saved)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # orbax's event loop, after the error
def test_load_missing_or_corrupt_checkpoint(saved):
    import shutil

    arrays = saved / "checkpoint"
    for f in arrays.rglob("*"):
        if f.is_file() and f.name not in ("_METADATA", "_CHECKPOINT_METADATA", "_sharding"):
            f.write_bytes(b"garbage")
    with pytest.raises(ValueError, match=f"corrupt or unreadable checkpoint {arrays}"):
        checkpoint.load(saved)
    shutil.rmtree(arrays)
    with pytest.raises(FileNotFoundError, match=f"missing checkpoint {arrays}"):
        checkpoint.load(saved)


def test_load_shape_mismatch_names_the_array(saved):
    config = json.loads((saved / "config.json").read_text())
    (saved / "config.json").write_text(json.dumps({**config, "d_mlp": 128}))
    with pytest.raises(ValueError, match=r"'blocks\.mlp\.c_fc_w'.*\(2, 64, 256\).*\(2, 64, 128\)"):
        checkpoint.load(saved)


def test_load_bad_config(saved):
    (saved / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=f"cannot read {saved / 'config.json'}"):
        checkpoint.load(saved)


# --- the script -----------------------------------------------------------------------------


def test_convert_script(hf_dirs, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("convert_hf_script", REPO / "scripts" / "convert_hf.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "out"
    assert script.main([str(hf_dirs["msgpack"]), str(out), "--dtype", "bfloat16"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert checkpoint.load(out, dtype=None).dtype == jnp.bfloat16
    assert script.main([str(hf_dirs["msgpack"]), str(out)]) == 1
    assert "overwrite" in capsys.readouterr().err
    assert script.main([str(hf_dirs["safetensors"]), str(out), "--overwrite"]) == 0
    assert script.main([str(tmp_path / "missing"), str(tmp_path / "o2")]) == 1
    assert str(tmp_path / "missing") in capsys.readouterr().err


def test_not_a_gpt2_config(hf_dirs, tmp_path):
    for name, config in {"mamba": {"model_type": "mamba"}, "partial": {"model_type": "gpt2", "n_layer": 2}}.items():
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(config))
        with pytest.raises(ValueError, match=f"{folder / 'config.json'}.*(mamba|missing n_head)"):
            load_hf_state_dict(folder)


def test_sharded_safetensors(hf_tiny, hf_tiny_logits, tmp_path):
    hf_tiny.save_pretrained(tmp_path / "hf", max_shard_size="100KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "hf").glob("model-*.safetensors"))) > 1
    model = checkpoint.load(convert_hf(tmp_path / "hf", tmp_path / "out"))
    assert max_err(model(TOKENS), hf_tiny_logits) < 1e-4
