"""A careless or hostile user: every refusal is one `jpatch...: ...` line, exit status 2, no
traceback, and touches no file; jpatch replaces only folders it wrote; bulk runs share a folder
(each shard computed once), survive corrupt shards, a lost manifest and killed writers.

The model is a tiny random GPT-2 with GPT-2's vocabulary; commands run in-process from a
workspace folder holding a "precious" folder of the user's files.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

import jpatch
from jpatch.runs import bulk
from jpatch.face import cli
from jpatch.model import convert
from jpatch import patching
from jpatch.runs import results
from jpatch.files import safety
from jpatch.runs.bulk import bulk_sweep
from jpatch.runs.results import load_result
from test_bulk import CONFIG, assert_same, examples, subprocess_env, tiny_model, write_jsonl

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def _hf_config_copy(src, dst, **changes):
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**config, **changes}))


@pytest.fixture(scope="module")
def ws(model, hf_tiny, tmp_path_factory):
    """The workspace: a model, data, a Hugging Face checkpoint, the user's files, an earlier output."""
    ws = tmp_path_factory.mktemp("ws")
    jpatch.save(model, ws / "m")
    write_jsonl(ws / "data.jsonl", examples(4))
    write_jsonl(ws / "empty-prompt.jsonl", [{**examples(1)[0], "clean": ""}])
    hf_tiny.save_pretrained(ws / "nest" / "hf")
    _hf_config_copy(ws / "nest" / "hf", ws / "hf-n_head-0", n_head=0)
    for field, value in {"n_head": 0, "n_layer": -1, "d_model": "64", "n_ctx": 64.0}.items():
        folder = ws / f"cfg-{field}-{value!r}".replace("'", "")
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({**CONFIG.to_dict(), field: value}))
    (ws / "precious" / "sub").mkdir(parents=True)
    (ws / "precious" / "notes.txt").write_text("keep me")
    (ws / "precious" / "sub" / "data.bin").write_bytes(b"\x00\x01")
    (ws / "afile").write_text("a file, not a folder")
    (ws / "old-sweep").mkdir()
    (ws / "old-sweep" / "result.npz").write_bytes(b"an earlier sweep")
    safety.write_marker(ws / "old-sweep", "sweep")
    return ws


def snapshot(folder):
    """Every file and folder under `folder` with its size and modification time."""
    return {str(p.relative_to(folder)): (p.is_dir(), p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(Path(folder).rglob("*"))}


def run_cli(argv, capsys):
    """(exit status, stderr) of `jpatch ARGV` run in-process."""
    try:
        code = cli.main(argv)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


M, NEW = "m", "new-output"
BULK = ["bulk", "--model", M, "--data", "data.jsonl", "--no-progress"]
NOISE = ["--corruption", "noise"]
CASES = {
    # output safety: never the user's files, the working directory or the conversion's source
    "demo into a user's folder": (["demo", "--model", M, "--out", "precious"],
                                  r"precious holds files jpatch did not write \(notes.txt, sub\)"),
    "demo into the working directory": (["demo", "--model", M, "--out", "."], "it is the working directory"),
    "sweep --overwrite of a user's folder": (["sweep", "--model", M, "--out", "precious", "--overwrite"],
                                             "precious holds files jpatch did not write"),
    "sweep into a parent of the working directory": (["sweep", "--model", M, "--out", ".."],
                                                     "is the working directory or contains it"),
    "sweep onto an earlier sweep": (["sweep", "--model", M, "--out", "old-sweep"],
                                    "old-sweep holds a previous jpatch sweep output; pass --overwrite to replace it"),
    "demo onto an earlier sweep": (["demo", "--model", M, "--out", "old-sweep"],
                                   "holds a jpatch sweep output, not a demo output"),
    "paper --overwrite of a user's folder": (["paper", "--model", M, "--out", "precious", "--overwrite"],
                                             "precious holds files jpatch did not write"),
    "convert onto its source": (["convert", "nest/hf", "nest/hf", "--overwrite"], "is or contains the input"),
    "convert onto a folder holding its source": (["convert", "nest/hf", "nest", "--overwrite"],
                                                 "is or contains the input"),
    "convert --overwrite of a user's folder": (["convert", "nest/hf", "precious", "--overwrite"],
                                               "precious holds files jpatch did not write"),
    "bulk into a user's folder": (BULK + ["--out", "precious"], "precious is not empty .* holds no bulk manifest"),
    "bulk under a file": (BULK + ["--out", "afile/sub"], "cannot create the output folder afile/sub"),
    # settings, checked before anything is written or compiled
    "sweep --n-prompts 0": (["sweep", "--model", M, "--n-prompts", "0", "--out", NEW],
                            "--n-prompts must be an integer >= 1, got 0"),
    "sweep --window 0": (["sweep", "--model", M, "--window", "0", "--out", NEW], "--window must be an integer >= 1"),
    "sweep --site embed": (["sweep", "--model", M, "--site", "embed", "--out", NEW],
                           "'hook_embed' has no layers to sweep"),
    "sweep --site blocks.99": (["sweep", "--model", M, "--site", "blocks.99.hook_resid_pre", "--out", NEW],
                               "'blocks.99.hook_resid_pre' names one layer"),
    "demo --n-prompts 0": (["demo", "--model", M, "--n-prompts", "0", "--out", NEW], "--n-prompts must be"),
    "paper --window 0": (["paper", "--model", M, "--window", "0", "--out", NEW],
                         "--window must be an integer >= 1, got 0"),
    "paper --n-factual -1": (["paper", "--model", M, "--n-factual", "-1", "--out", NEW],
                             "--n-factual must be an integer >= 1, got -1"),
    "bulk --dtype garbage": (BULK + ["--out", NEW, "--dtype", "garbage"],
                             "unknown --dtype 'garbage'; valid: float32, bfloat16, float16"),
    "bulk --dtype int32": (BULK + ["--out", NEW, "--dtype", "int32"], "unknown --dtype 'int32'"),
    "bulk --noise-std nan": (BULK + NOISE + ["--out", NEW, "--noise-std", "nan"],
                             "--noise-std must be a finite number > 0, got nan"),
    "bulk --noise-std 0": (BULK + NOISE + ["--out", NEW, "--noise-std", "0"], "--noise-std must be .* got 0.0"),
    "bulk --noise-scale -3": (BULK + NOISE + ["--out", NEW, "--noise-scale", "-3"],
                              "--noise-scale must be a finite number > 0, got -3.0"),
    "bulk --window 0": (BULK + ["--out", NEW, "--window", "0"], "--window must be an integer >= 1"),
    "bulk --distributed without a coordinator": (BULK + ["--out", NEW, "--distributed"],
                                                 r"jax.distributed.initialize\(\) failed .*--process-index"),
    "bulk worker without a manifest": (BULK + ["--out", NEW, "--process-index", "1", "--process-count", "2",
                                               "--manifest-timeout", "1"],
                                       r"process 1: no new-output/manifest.json after 1 s; process 0 writes it"),
    "bulk with an empty prompt": (["bulk", "--model", M, "--data", "empty-prompt.jsonl", "--out", NEW],
                                  "line 1: the clean prompt is empty"),
    # config values: type- and range-checked
    "model config n_head 0": (["demo", "--model", "cfg-n_head-0", "--out", NEW],
                              "GPT2Config n_head must be an integer >= 1, got 0"),
    "model config n_layer -1": (["sweep", "--model", "cfg-n_layer--1", "--out", NEW],
                                "GPT2Config n_layer must be an integer >= 1, got -1"),
    "model config d_model '64'": (["demo", "--model", "cfg-d_model-64", "--out", NEW],
                                  "GPT2Config d_model must be an integer >= 1, got '64'"),
    "model config n_ctx 64.0": (BULK + ["--model", "cfg-n_ctx-64.0", "--out", NEW],
                                "GPT2Config n_ctx must be an integer >= 1, got 64.0"),
    "convert a config with n_head 0": (["convert", "hf-n_head-0", NEW],
                                       "GPT2Config n_head must be an integer >= 1, got 0"),
}


@pytest.mark.parametrize("argv, message", list(CASES.values()), ids=list(CASES))
def test_refusals_are_one_line_and_touch_nothing(ws, argv, message, capsys, monkeypatch):
    monkeypatch.chdir(ws)
    before = snapshot(ws.parent)
    code, err = run_cli(argv, capsys)
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("jpatch")]
    assert starts, err
    said = "\n".join(lines[starts[-1]:])  # one line, or a dataset's list of bad lines
    assert re.search(message, said), f"{message!r} not in {said!r}"
    assert snapshot(ws.parent) == before, "a refused command changed files"


def test_refusal_in_a_fresh_process_has_no_traceback(ws):
    out = subprocess.run([sys.executable, "-m", "jpatch.face.cli", "demo", "--model", "m", "--out", "precious"], cwd=ws,
                         env=subprocess_env(), capture_output=True, text=True)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip() == ("jpatch: precious holds files jpatch did not write (notes.txt, sub); jpatch "
                                  "replaces only its own output folders: choose a new or empty folder")
    assert (ws / "precious" / "notes.txt").read_text() == "keep me"


# --- the API ------------------------------------------------------------------------------


@pytest.mark.parametrize("field, value", [("n_head", 0), ("n_layer", -1), ("n_layer", "4"), ("n_layer", 4.0),
                                          ("d_mlp", True), ("layer_norm_eps", 0.0), ("layer_norm_eps", float("nan"))])
def test_config_values_are_checked(field, value):
    with pytest.raises(ValueError, match=f"GPT2Config {field} must be"):
        jpatch.GPT2Config(**{field: value})


@pytest.mark.parametrize("clean, kwargs, message", [
    (np.zeros((0, 5), np.int32), {}, r"clean holds no tokens \(shape \(0, 5\)\)"),
    (np.zeros((2, 0), np.int32), {}, r"clean holds no tokens \(shape \(2, 0\)\)"),
    (np.ones((2, 5), np.int32), {"memory_budget": 0}, "memory_budget must be a positive number of bytes"),
    (np.ones((2, 5), np.int32), {"memory_budget": -1}, "memory_budget must be a positive number of bytes"),
    (np.ones((2, 5), np.int32), {"site": "blocks.99.hook_resid_pre"}, "layer 99 out of range, the model has 2"),
])
def test_sweep_refuses_before_computing(model, clean, kwargs, message, monkeypatch):
    monkeypatch.setattr(patching, "patch_scores", lambda *a, **k: pytest.fail("computed before refusing"))
    kwargs = {"site": "resid_pre", **kwargs}
    metric = jpatch.metrics.logit_diff([1, 1], [2, 2])
    corrupted = np.full(clean.shape, 3, np.int32)
    with pytest.raises((ValueError, KeyError), match=message):  # unknown sites are KeyErrors
        patching.sweep(model, clean, corrupted, kwargs.pop("site"), metric, progress=False, **kwargs)


def test_tiny_memory_budget_is_warned_about(model, monkeypatch):
    """A budget below one patch's memory splits the sweep into one group per patch (2 layers x
    6 positions = 12), run one after another, instead of one: said with the numbers before the work."""
    from jpatch.engine import execute as engine
    def stop(*a, **k):
        raise RuntimeError("stopped before computing")

    monkeypatch.setattr(engine, "run_layout", stop)
    metric = jpatch.metrics.logit_diff([1, 1], [2, 2])
    clean, corrupted = np.ones((2, 6), np.int32), np.full((2, 6), 3, np.int32)
    with pytest.warns(RuntimeWarning, match=r"memory_budget=1000 bytes splits this sweep into 12 patch groups"):
        with pytest.raises(RuntimeError, match="stopped"):
            patching.sweep(model, clean, corrupted, "resid_pre", metric, memory_budget=1000, progress=False)


def test_weight_map_outside_the_folder_is_refused(hf_tiny, tmp_path):
    hf_tiny.save_pretrained(tmp_path / "hf")
    outside = tmp_path / "elsewhere.safetensors"
    (tmp_path / "hf" / "model.safetensors").rename(outside)
    (tmp_path / "hf" / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"wte.weight": "../elsewhere.safetensors"}}))
    with pytest.raises(ValueError, match="'../elsewhere.safetensors' points outside the checkpoint folder"):
        convert.convert_hf(tmp_path / "hf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_non_finite_weights_are_named(hf_tiny, tmp_path):
    import safetensors.numpy

    hf_tiny.save_pretrained(tmp_path / "hf")
    state = safetensors.numpy.load_file(tmp_path / "hf" / "model.safetensors")
    key = next(k for k in state if k.endswith("h.1.mlp.c_fc.bias"))
    state[key] = state[key].copy()
    state[key][3] = np.nan
    safetensors.numpy.save_file(state, tmp_path / "hf" / "model.safetensors")
    with pytest.raises(ValueError, match=r"tensor 'h.1.mlp.c_fc.bias' has 1 non-finite value"):
        convert.convert_hf(tmp_path / "hf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_local_path_typo_is_not_a_hub_id(tmp_path, monkeypatch, caplog):
    import huggingface_hub

    monkeypatch.chdir(tmp_path)
    (tmp_path / "weights").mkdir()
    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kw: calls.append(repo_id) or 1 / 0)
    with pytest.raises(FileNotFoundError, match="no such checkpoint directory: weights/gpt2x"):
        convert.resolve_source("weights/gpt2x")  # weights/ exists here: a typo, not a hub id
    assert calls == []
    with pytest.raises(OSError, match="'nosuchdir/sub' is not a local directory and could not be downloaded"):
        convert.resolve_source("nosuchdir/sub")
    assert calls == ["nosuchdir/sub"]
    assert "trying it as a Hugging Face Hub id" in caplog.text  # a logging warning: stderr outside pytest


def test_task_files_and_bulk_read_lines_alike(tmp_path):
    """"\\r\\r\\n" line endings: one reader, so sweep --task and bulk agree on every line."""
    from jpatch.data.tasks import read_jsonl

    rows = examples(4)
    plain = write_jsonl(tmp_path / "plain.jsonl", rows)
    odd = tmp_path / "odd.jsonl"
    odd.write_bytes(b"".join(json.dumps(r).encode() + b"\r\r\n" for r in rows))
    a, b = read_jsonl(plain), read_jsonl(odd)
    assert [t.prompts for t in a] == [t.prompts for t in b]
    assert [list(t.info["line"]) for t in a] == [list(t.info["line"]) for t in b]


# --- output folders -----------------------------------------------------------------------


def test_overwrite_replaces_only_jpatch_output(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = results.save_result("r", {"x": np.zeros(2)}, {"v": 1})
    assert safety.read_marker(out)["kind"] == "result"
    results.save_result("r", {"x": np.ones(2)}, {"v": 2}, overwrite=True)
    assert load_result("r").settings["v"] == 2
    (out / "mine.txt").write_text("user's")
    with pytest.raises(FileExistsError, match=r"r holds files jpatch did not write there \(mine.txt\)"):
        results.save_result("r", {"x": np.ones(2)}, {"v": 3}, overwrite=True)
    assert (out / "mine.txt").read_text() == "user's" and load_result("r").settings["v"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]


def test_sigkill_during_convert_leaves_no_stale_folder_after_the_next_run(hf_tiny, tmp_path):
    hf_tiny.save_pretrained(tmp_path / "hf")
    child = tmp_path / "child.py"
    child.write_text(
        "import sys, time\n"
        "from jpatch.files import safety\nfrom jpatch.model import convert\n"
        "safety.write_marker = lambda *a, **k: time.sleep(600)  # hold the full temporary folder\n"
        "convert.convert_hf(sys.argv[1], sys.argv[2])\n"
    )
    proc = subprocess.Popen([sys.executable, str(child), str(tmp_path / "hf"), str(tmp_path / "out")],
                            env=subprocess_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    temps = lambda: [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")]  # noqa: E731
    while not (temps() and (temps()[0] / "config.json").exists()):
        assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
        assert time.monotonic() < deadline, "the conversion never wrote its temporary folder"
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(temps()) == 1 and not (tmp_path / "out").exists()
    convert.convert_hf(tmp_path / "hf", tmp_path / "out")
    assert temps() == [], "the killed run's temporary folder is still there"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["child.py", "hf", "out"]


# --- bulk: integrity ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data4(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "d.jsonl", examples(4))


def run_bulk(model, data, out, **kw):
    return bulk_sweep(model, data, "resid_pre", "str", "logit-diff", out, shard_size=2, progress=False, **kw)


@pytest.fixture(scope="module")
def reference_run(model, data4, tmp_path_factory):
    """One uninterrupted run: the result every other run must reproduce."""
    out = tmp_path_factory.mktemp("ref") / "bulk"
    run_bulk(model, data4, out)
    return load_result(out)


def test_corrupt_shard_is_named_and_recomputed(model, data4, reference_run, tmp_path, caplog):
    out = tmp_path / "bulk"
    shutil.copytree(reference_run.path, out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(manifest["shards"]) == ["shard-00000.npz", "shard-00001.npz"]
    assert manifest["shards"]["shard-00001.npz"] == results.file_sha256(out / "shard-00001.npz")
    shard = out / "shard-00001.npz"
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with pytest.raises(results.CorruptShard, match="shard-00001.npz is corrupt: its sha256 differs.*rerun"):
        load_result(out)
    run = run_bulk(model, data4, out)
    assert run.computed == [1] and run.skipped == [0]
    assert "shard-00001.npz is corrupt" in caplog.text
    assert_same(load_result(out)["resid_pre"], reference_run["resid_pre"], tol=0, what="recomputed shard")


@pytest.mark.parametrize("damage", ["deleted", "truncated"])
def test_lost_manifest_loses_nothing(model, data4, reference_run, tmp_path, damage, monkeypatch):
    out = tmp_path / "bulk"
    shutil.copytree(reference_run.path, out)
    original = json.loads((out / "manifest.json").read_text())
    if damage == "deleted":
        (out / "manifest.json").unlink()
        with pytest.warns(RuntimeWarning, match="rebuilt from the shards"):
            assert_same(load_result(out)["resid_pre"], reference_run["resid_pre"], tol=0)
    else:
        (out / "manifest.json").write_text((out / "manifest.json").read_text()[:50])
    monkeypatch.setattr(bulk, "_compute_shard", lambda *a, **k: pytest.fail("recomputed a good shard"))
    run = run_bulk(model, data4, out)
    assert run.computed == [] and run.skipped == [0, 1]
    assert json.loads((out / "manifest.json").read_text()) == original


# --- bulk: concurrency ----------------------------------------------------------------------

CHILD = """
import json, os, sys, time
from pathlib import Path
from jpatch.runs import bulk
compute = bulk._compute_shard
def slow(*a, **k):  # long enough shards for the two runs to overlap
    time.sleep(0.5)
    return compute(*a, **k)
bulk._compute_shard = slow
from test_bulk import tiny_model
model = tiny_model()
barrier = Path(sys.argv[3])
(barrier / sys.argv[4]).touch()
while len(list(barrier.iterdir())) < 2:  # start both runs together
    time.sleep(0.01)
run = bulk.bulk_sweep(model, sys.argv[1], "resid_pre", "str", "logit-diff", sys.argv[2], shard_size=1, progress=False)
print(json.dumps({"computed": run.computed, "skipped": run.skipped}))
"""


def test_two_runs_on_one_folder_split_the_shards(model, data4, tmp_path):
    script, barrier, out = tmp_path / "child.py", tmp_path / "barrier", tmp_path / "shared"
    script.write_text(CHILD)
    barrier.mkdir()
    procs = [subprocess.Popen([sys.executable, str(script), str(data4), str(out), str(barrier), name],
                              env=subprocess_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for name in ("a", "b")]
    reports = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr.decode()[-3000:]
        reports.append(json.loads(stdout.decode().strip().splitlines()[-1]))
    a, b = (set(r["computed"]) for r in reports)
    assert not a & b, f"shards computed twice: {sorted(a & b)}"
    assert a | b == {0, 1, 2, 3}
    assert a and b, "the two runs did not share the work"
    for r in reports:
        assert sorted(r["computed"] + r["skipped"]) == [0, 1, 2, 3]
    assert not [p.name for p in out.iterdir() if p.name.endswith(".lock") or ".tmp-" in p.name]
    single = load_result(bulk_sweep(model, data4, "resid_pre", "str", "logit-diff", tmp_path / "single", shard_size=1,
                                    progress=False).out_dir)
    shared = load_result(out)
    assert_same(shared["resid_pre"], single["resid_pre"], tol=0, what="two runs vs one")
    assert (shared.lengths == single.lengths).all()


def test_stale_lock_is_taken_over_and_a_live_one_respected(model, data4, tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_owner = {"host": socket.gethostname(), "pid": int(dead.stdout), "ticks": None, "start": "earlier"}
    lock_path = tmp_path / "x.lock"
    lock_path.write_text(json.dumps(dead_owner))
    mine = safety.Lock(lock_path)
    assert mine.acquire() and json.loads(lock_path.read_text())["pid"] == os.getpid()
    other = safety.Lock(lock_path)
    assert not other.acquire() and other.holder["pid"] == os.getpid()  # a live holder keeps it
    mine.release()
    assert not lock_path.exists()
    lock_path.write_text("")  # a writer killed between creating and filling its lock
    assert not safety.Lock(lock_path).acquire(), "a fresh unreadable lock may be being written"
    os.utime(lock_path, (time.time() - 2 * safety.UNREADABLE_LOCK_AGE,) * 2)
    assert safety.Lock(lock_path).acquire()

    out = tmp_path / "bulk"
    out.mkdir()
    (out / ".shard-00000.npz.lock").write_text(json.dumps(dead_owner))  # a killed run's claim
    run = run_bulk(model, data4, out)
    assert run.computed == [0, 1] and not (out / ".shard-00000.npz.lock").exists()
