"""Saved results: single sweeps written atomically (never half a folder, no silent overwrite),
bulk folders assembled from shards in dataset order with NaN-aware mean / std, and the errors
for incomplete or foreign shards."""

from pathlib import Path

import numpy as np
import pytest

import jpatch
from jpatch.files import atomic
from jpatch.runs import results
from jpatch.runs.results import Result, load_result, save_result

SETTINGS = {"model": "gpt2", "task": "ioi", "site": "resid_pre", "corruption": "str", "metric": "logit-diff",
            "direction": "denoise", "window": 1, "seed": np.int64(3), "layers": (0, 1), "scale": np.float32(0.5)}


def test_save_and_load_a_sweep(tmp_path):
    arrays = {"resid_pre": np.arange(6, dtype=np.float32).reshape(2, 3), "attn.hook_z": np.ones((2, 4))}
    out = save_result(tmp_path / "a" / "b", arrays, SETTINGS)
    assert sorted(p.name for p in out.iterdir()) == [".jpatch-output.json", "result.npz", "settings.json"]
    loaded = load_result(out)
    assert loaded.kind == "sweep" and set(loaded.keys()) == set(arrays)
    for name, a in arrays.items():
        assert loaded[name].dtype == a.dtype and (loaded[name] == a).all()
    assert loaded.settings == {**SETTINGS, "seed": 3, "layers": [0, 1], "scale": 0.5, "jpatch_version": jpatch.__version__}
    assert load_result(out / "result.npz").settings == loaded.settings
    with pytest.raises(KeyError, match="no array 'mlp_out'.*resid_pre"):
        loaded["mlp_out"]
    with pytest.raises(ValueError, match="only a bulk result"):
        loaded.mean("resid_pre")


def test_refuses_to_overwrite_unless_asked(tmp_path):
    save_result(tmp_path / "r", {"x": np.zeros(2)}, {"v": 1})
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_result(tmp_path / "r", {"x": np.ones(2)}, {"v": 2})
    assert load_result(tmp_path / "r").settings["v"] == 1
    save_result(tmp_path / "r", {"x": np.ones(2)}, {"v": 2}, overwrite=True)
    loaded = load_result(tmp_path / "r")
    assert loaded.settings["v"] == 2 and (loaded["x"] == 1).all()
    assert [p.name for p in tmp_path.iterdir()] == ["r"], "no temporary folders left behind"


def test_no_half_written_folder_on_failure(tmp_path, monkeypatch):
    with pytest.raises(TypeError, match="'model'.*object"):
        save_result(tmp_path / "r", {"x": np.zeros(2)}, {"model": object()})
    with pytest.raises(ValueError, match="invalid array name"):
        save_result(tmp_path / "r", {"a/b": np.zeros(2)}, {})

    def failing_savez(f, **arrays):
        f.write(b"PK\x03\x04 partial")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", failing_savez)
    with pytest.raises(OSError, match="disk full"):
        save_result(tmp_path / "deep" / "r", {"x": np.zeros(2)}, {})
    assert list(tmp_path.iterdir()) == [], "nothing may remain, not even created parents"
    # an existing result survives a failed overwrite
    monkeypatch.undo()
    save_result(tmp_path / "r", {"x": np.zeros(2)}, {"v": 1})
    monkeypatch.setattr(np, "savez", failing_savez)
    with pytest.raises(OSError):
        save_result(tmp_path / "r", {"x": np.ones(2)}, {"v": 2}, overwrite=True)
    monkeypatch.undo()
    assert load_result(tmp_path / "r").settings["v"] == 1
    with pytest.raises(OSError):
        monkeypatch.setattr(np, "savez", failing_savez)
        atomic.atomic_write_npz(tmp_path / "shard.npz", {"x": np.zeros(2)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]


def fake_bulk(folder, n_prompts=5, shard_size=2, lengths=(3, 2, 3, 1, 2), skip=(), wrong_hash=()):
    """A bulk folder written with the format helpers: site "s" [layer=2, pos=3], prompts ordered by length."""
    folder.mkdir()
    order = np.argsort(lengths, kind="stable")
    n_shards = -(-n_prompts // shard_size)
    manifest = {"format": results.BULK_FORMAT, "format_version": results.BULK_FORMAT_VERSION, "hash": "h" * 64,
                "settings": {"metric": "logit-diff"}, "normalization": "range", "n_prompts": n_prompts,
                "shard_size": shard_size,
                "n_shards": n_shards, "max_len": 3, "sites": {"s": {"site": "hook_resid_pre", "axes": ["layer", "pos"],
                                                                    "grid": [2, 3]}}}
    atomic.atomic_write_json(folder / results.MANIFEST_FILE, manifest)
    raw = np.full((n_prompts, 2, 3), np.nan, np.float32)
    for i, T in enumerate(lengths):
        raw[i, :, :T] = i + np.arange(2 * T).reshape(2, T)
    clean, corrupted = 10.0 + np.arange(n_prompts, dtype=np.float32), 0.5 * np.arange(n_prompts, dtype=np.float32)
    full = (raw - corrupted[:, None, None]) / (clean - corrupted)[:, None, None]
    for k in range(n_shards):
        if k in skip:
            continue
        index = order[k * shard_size:(k + 1) * shard_size]
        atomic.atomic_write_npz(folder / results.shard_name(k), {
            "index": index, "length": np.array(lengths)[index], "s": full[index], "raw.s": raw[index],
            "clean_score": clean[index], "corrupted_score": corrupted[index],
            "run_hash": np.array("x" * 64 if k in wrong_hash else manifest["hash"])})
    return full, raw, clean, corrupted


def test_load_bulk_assembles_shards_in_dataset_order(tmp_path):
    full, raw, clean, corrupted = fake_bulk(tmp_path / "bulk")
    r = load_result(tmp_path / "bulk")
    assert r.kind == "bulk" and r.n_prompts == 5 and r.sites == ["s"]
    assert r.axes("s") == ("prompt", "layer", "pos")
    assert (r.lengths == [3, 2, 3, 1, 2]).all()
    assert np.array_equal(r["s"], full, equal_nan=True) and np.array_equal(r.raw["s"], raw, equal_nan=True)
    np.testing.assert_allclose(r.clean_score, clean) and np.testing.assert_allclose(r.corrupted_score, corrupted)
    np.testing.assert_allclose(r.std("s"), np.nanstd(full, 0), rtol=1e-6)
    assert (r.count("s") == [[5, 4, 2], [5, 4, 2]]).all()
    # mean: normalize the mean over prompts; position 2 exists for prompts 0 and 2 only
    ratio = lambda p, layer, pos: ((raw[p, layer, pos].mean() - corrupted[p].mean())
                                   / (clean[p].mean() - corrupted[p].mean()))
    assert r.mean("s")[1, 2] == pytest.approx(ratio([0, 2], 1, 2))
    assert r.mean("s")[0, 0] == pytest.approx(ratio([0, 1, 2, 3, 4], 0, 0))
    assert load_result(tmp_path / "bulk" / "manifest.json").n_prompts == 5


def test_load_bulk_errors(tmp_path):
    fake_bulk(tmp_path / "gap", skip=(0, 2))
    with pytest.raises(FileNotFoundError, match=r"2 of 3 shards missing \(shard-00000.npz, shard-00002.npz\)"):
        load_result(tmp_path / "gap")
    fake_bulk(tmp_path / "foreign", wrong_hash=(1,))
    with pytest.raises(ValueError, match="shard-00001.npz belongs to another run"):
        load_result(tmp_path / "foreign")
    with pytest.raises(FileNotFoundError, match="no result at"):
        load_result(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no jpatch result"):
        load_result(tmp_path / "empty")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot read"):
        load_result(tmp_path / "junk")


def test_result_object():
    r = Result({"a": np.array([[1.0, np.nan], [3.0, 4.0]])}, {"k": 1}, kind="bulk", lengths=np.array([1, 2]),
               raw={"a": np.array([[1.0, np.nan], [3.0, 4.0]])}, clean_score=np.array([2.0, 5.0]),
               corrupted_score=np.array([0.0, 1.0]), manifest={"normalization": "range"})
    assert list(r) == ["a"] and "a" in r and r.n_prompts == 2
    np.testing.assert_allclose(r.mean("a"), [(2.0 - 0.5) / (3.5 - 0.5), (4.0 - 1.0) / (5.0 - 1.0)])
    np.testing.assert_allclose(r.std("a"), [1.0, 0.0])
    assert "bulk" in repr(r) and r.axes("a") is None
    assert isinstance(Path(results.shard_name(12)), Path) and results.shard_name(12) == "shard-00012.npz"
