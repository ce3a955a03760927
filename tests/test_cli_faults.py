"""The command line under the fault battery (issue 21): every failure is one `jpatch...` line (no
traceback), settings are refused before anything is written or compiled, valid task files run,
bulk runs never hang on a lock nobody refreshes, and jpatch touches only the files it wrote.

A tiny random GPT-2 with GPT-2's vocabulary; commands run in-process (`cli.main`) from a workspace
folder, except where a real Ctrl-C is sent to a child process.
"""

import json
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import jax
import numpy as np
import pytest

import jpatch
from jpatch.face import circuit_report, cli
from jpatch.files import safety
from jpatch.model import convert
from jpatch.runs import bulk, results
from test_bulk import REPO, examples, subprocess_env, tiny_model, write_jsonl


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A workspace: the model "m" and "data.jsonl" (4 prompts of two token lengths, 14 and 8)."""
    ws = tmp_path_factory.mktemp("ws")
    jpatch.save(tiny_model(), ws / "m")
    write_jsonl(ws / "data.jsonl", examples(4))
    return ws


@pytest.fixture
def here(ws, monkeypatch):
    monkeypatch.chdir(ws)
    return ws


def run_cli(argv, capsys):
    """(exit status, stderr) of `jpatch ARGV` run in-process."""
    capsys.readouterr()  # what the test printed before
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def refused(argv, capsys, message):
    """Run `jpatch ARGV`: exit status 2, one `jpatch` line matching `message`, no traceback; the line."""
    code, err = run_cli(argv, capsys)
    assert "Traceback" not in err, err[-3000:]
    assert code == 2, err[-3000:]
    lines = err.strip().splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("jpatch")]  # after any progress bar
    assert starts, err[-3000:]
    lines = lines[starts[0]:]
    assert any(message in line for line in lines), f"{message!r} not in {err[-3000:]!r}"
    return err


def must_not(*what):
    """A stand-in for a function that a refused command must never reach."""
    return lambda *a, **k: pytest.fail(f"reached {what[0] if what else 'the computation'} before refusing")


BULK = ["bulk", "--model", "m", "--data", "data.jsonl", "--no-progress"]


# --- tracebacks instead of a jpatch line ------------------------------------------------------


@pytest.mark.parametrize("command", ["bulk", "sweep"])
def test_deeply_nested_json_line_is_named(here, capsys, command):
    deep = "[" * 100_000 + "]" * 100_000
    write_jsonl(here / "deep.jsonl", [examples(1)[0], deep])
    argv = (["bulk", "--model", "m", "--data", "deep.jsonl", "--no-progress"] if command == "bulk"
            else ["sweep", "--model", "m", "--task", "deep.jsonl"])
    refused(argv + ["--out", "new"], capsys, "line 2: malformed JSON: nested too deeply")
    assert not (here / "new").exists()


@pytest.mark.parametrize("layout", ["itself", "each other"])
def test_safetensors_index_cycles_are_refused(hf_tiny, tmp_path, monkeypatch, capsys, layout):
    hf = tmp_path / "hf"
    hf_tiny.save_pretrained(hf)
    (hf / "model.safetensors").unlink()  # the index is read
    index = "model.safetensors.index.json"
    if layout == "itself":
        (hf / index).write_text(json.dumps({"weight_map": {"wte.weight": index}}))
    else:
        (hf / index).write_text(json.dumps({"weight_map": {"wte.weight": "b.safetensors.index.json"}}))
        (hf / "b.safetensors.index.json").write_text(json.dumps({"weight_map": {"wte.weight": index}}))
    monkeypatch.chdir(tmp_path)
    refused(["convert", "hf", "out"], capsys, "is an index file, not a weight file")
    with pytest.raises(ValueError, match="is an index file, not a weight file"):
        convert.load_hf(hf)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("budget", ["1e400", "inf", "nan"])
def test_memory_budget_must_be_finite(here, capsys, budget):
    refused(BULK + ["--out", "new", "--memory-budget", budget], capsys, "byte count must be a finite number")
    assert not (here / "new").exists()


def test_manifest_timeout_nan_is_refused(here, capsys):
    refused(BULK + ["--out", "new", "--manifest-timeout", "nan"], capsys, "--manifest-timeout must be")


@pytest.mark.parametrize("broken", ["NaN weights", "overflowing logits"])
def test_demo_on_a_nan_model_is_one_line(here, capsys, broken):
    """NaN weights (refused when loaded) or finite weights whose logits overflow (inf - inf: NaN metrics)."""
    import dataclasses

    model = tiny_model()
    if broken == "NaN weights":
        model = jax.tree_util.tree_map(lambda a: a * np.nan, model)
    else:
        model = dataclasses.replace(model, wte=model.wte * 100,
                                    ln_f=dataclasses.replace(model.ln_f, weight=model.ln_f.weight * 3e38))
    name = broken.replace(" ", "-")
    jpatch.save(model, here / name, overwrite=True)
    refused(["demo", "--model", name, "--n-prompts", "2", "--out", f"demo-{name}"], capsys, "")
    assert not (here / f"demo-{name}").exists()


@pytest.mark.parametrize("argv, where", [
    (["demo", "--n-prompts", "2"], "run_sweep"),
    (["sweep", "--n-prompts", "2"], "run_sweep"),
    (["bulk", "--data", "data.jsonl", "--no-progress"], "bulk"),
])
def test_ctrl_c_is_one_line_with_status_130(here, capsys, monkeypatch, argv, where):
    def interrupt(*a, **k):
        raise KeyboardInterrupt

    if where == "bulk":
        monkeypatch.setattr(bulk, "_compute_shard", interrupt)
    else:
        monkeypatch.setattr(cli, "run_sweep", interrupt)
    code, err = run_cli(argv[:1] + ["--model", "m", "--out", "int-out"] + argv[1:], capsys)
    assert code == 130 and err == "jpatch: interrupted\n", err[-3000:]
    leftovers = [] if not (here / "int-out").exists() else [
        p.name for p in (here / "int-out").iterdir() if p.name.endswith(".lock") or p.name.startswith("shard-")]
    assert leftovers == [] and not [p for p in here.iterdir() if ".tmp-" in p.name]


CTRL_C_CHILD = """
import sys, time
from jpatch.face import cli
from jpatch.runs import bulk
def hang(*a, **k):
    print("computing", flush=True)
    time.sleep(120)
bulk._compute_shard = hang
sys.exit(cli.main(sys.argv[1:]))
"""


def test_ctrl_c_in_a_real_process(ws, tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CTRL_C_CHILD)
    proc = subprocess.Popen([sys.executable, str(script), *BULK, "--out", str(tmp_path / "out")], cwd=ws,
                            env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "computing", proc.communicate(timeout=60)[1][-3000:]
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "jpatch: interrupted", err[-3000:]
    assert not list((tmp_path / "out").glob(".*.lock"))


# Ctrl-C while the demo compiles its sweeps: the crash at interpreter exit (exit 139 in about 1 of 3
# tries, XLA's threads still running) is gone; each try is one line and 130. The delays count from
# the demo's first line (model and task loaded, compilation next).
CTRL_C_DELAYS = (0.3, 1.5, 3.0)


def test_ctrl_c_while_compiling_never_crashes(tmp_path):
    outcomes = []
    deadline = time.monotonic() + 30
    for i, delay in enumerate(CTRL_C_DELAYS):
        if time.monotonic() > deadline:
            break
        out = tmp_path / f"out{i}"
        proc = subprocess.Popen([sys.executable, "-m", "jpatch.face.cli", "demo", "--out", str(out)], cwd=tmp_path,
                                env=subprocess_env(PYTHONUNBUFFERED="1"), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        try:
            first = proc.stdout.readline()
            if not first.startswith("model"):
                pytest.fail(f"the demo did not start: {first!r} {proc.communicate(timeout=60)[1][-3000:]}")
            time.sleep(delay)
            finished = proc.poll() is not None
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=60)
        finally:
            proc.kill()
        if finished:  # done before the Ctrl-C (a fast machine): nothing interrupted
            continue
        outcomes.append((delay, proc.returncode, err))
        assert proc.returncode in (0, 130), f"delay {delay}: exit status {proc.returncode}\n{err[-3000:]}"
        assert "Traceback" not in err and "Exception ignored" not in err, err[-3000:]
        if proc.returncode == 130:
            assert [l for l in err.splitlines() if l.startswith("jpatch")] == ["jpatch: interrupted"], err[-3000:]
            assert not out.exists() and not [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name]
    if not any(code == 130 for _, code, _ in outcomes):
        pytest.skip(f"no Ctrl-C landed while the demo ran ({[(d, c) for d, c, _ in outcomes]})")


# --- valid input that failed --------------------------------------------------------------------


def test_sweep_of_one_prompt_from_a_file_of_two_lengths(here, capsys):
    code, err = run_cli(["sweep", "--model", "m", "--task", "data.jsonl", "--n-prompts", "1", "--out", "one"], capsys)
    assert code in (0, None), err[-3000:]
    result = jpatch.load_result(here / "one")["hook_resid_pre"]
    assert result.shape == (2, 8) and np.isfinite(result).all()  # the shortest bucket's prompt, unpadded


def _write(path, rows):
    return write_jsonl(path, rows)


def test_str_needs_no_key_positions_and_counts_may_differ(here, capsys):
    rows = examples(4)
    none = [{k: v for k, v in r.items() if k != "key_positions"} for r in rows]
    _write(here / "nokeys.jsonl", none)
    code, err = run_cli(["sweep", "--model", "m", "--task", "nokeys.jsonl", "--n-prompts", "4", "--out", "nokeys"],
                        capsys)
    assert code in (0, None), err[-3000:]
    mixed = [none[0], {**rows[1], "key_positions": [0] + rows[1]["key_positions"]}, rows[2], rows[3]]  # 0, 4, 3, 3
    _write(here / "mixed.jsonl", mixed)
    code, err = run_cli(["sweep", "--model", "m", "--task", "mixed.jsonl", "--n-prompts", "4", "--out", "mixed"],
                        capsys)
    assert code in (0, None), err[-3000:]
    refused(["sweep", "--model", "m", "--task", "mixed.jsonl", "--corruption", "noise", "--out", "mixed2"], capsys,
            "for every prompt; 1 have none (line(s) [1])")
    assert not (here / "mixed2").exists()


def test_declared_key_positions_are_still_checked_for_str(here, capsys):
    """A prompt that declares key positions must still differ only there."""
    row = examples(1)[0]
    _write(here / "undeclared.jsonl", [{**row, "key_positions": row["key_positions"][:1]}])
    refused(["sweep", "--model", "m", "--task", "undeclared.jsonl", "--out", "u"], capsys,
            "which is not a declared key position")


# --- hangs: locks with a lease ------------------------------------------------------------------


def other_host_lock(path, age, lease=safety.LOCK_LEASE):
    path.write_text(json.dumps({"host": "pod-before-preemption", "pid": 4242, "ticks": 1, "start": "then",
                                "lease": lease}))
    os.utime(path, (time.time() - age,) * 2)


def test_another_hosts_lock_is_taken_over_once_its_lease_ran_out(tmp_path):
    path = tmp_path / "x.lock"
    other_host_lock(path, age=10)
    assert not safety.Lock(path).acquire(), "a fresh lock of another host is respected"
    other_host_lock(path, age=safety.LOCK_LEASE + 10)
    mine = safety.Lock(path)
    assert mine.acquire() and json.loads(path.read_text())["pid"] == os.getpid()
    mine.release()
    assert not path.exists()


def test_a_held_lock_is_refreshed(tmp_path):
    path = tmp_path / "x.lock"
    lock = safety.Lock(path, lease=0.5)
    assert lock.acquire()
    os.utime(path, (time.time() - 100,) * 2)
    time.sleep(0.3)
    assert time.time() - path.stat().st_mtime < 5, "the holder did not refresh its lock"
    lock.release()
    assert not path.exists() and not lock._thread.is_alive()


def no_waiting(monkeypatch):
    """Fail instead of waiting on a lock (the bug was an endless wait)."""
    waits = []

    def sleep(seconds):
        waits.append(seconds)
        if len(waits) > 20:
            pytest.fail("bulk waits on a lock nobody holds")

    monkeypatch.setattr(bulk, "time", types.SimpleNamespace(sleep=sleep, time=time.time, monotonic=time.monotonic))


def test_bulk_resumes_past_a_lock_of_a_vanished_host(here, capsys, monkeypatch, tmp_path):
    no_waiting(monkeypatch)
    out = tmp_path / "bulk"
    out.mkdir()
    other_host_lock(out / ".shard-00000.npz.lock", age=safety.LOCK_LEASE + 60)
    code, err = run_cli(BULK + ["--out", out, "--shard-size", "2"], capsys)
    assert code in (0, None), err[-3000:]
    assert sorted(p.name for p in out.glob("shard-*")) == ["shard-00000.npz", "shard-00001.npz"]
    assert not list(out.glob(".*.lock"))


def test_break_locks_removes_only_jpatchs_locks(here, capsys, monkeypatch, tmp_path):
    no_waiting(monkeypatch)
    out = tmp_path / "bulk"
    out.mkdir()
    other_host_lock(out / ".shard-00000.npz.lock", age=1)  # fresh: would be waited for
    code, err = run_cli(BULK + ["--out", out, "--shard-size", "2", "--break-locks"], capsys)
    assert code in (0, None), err[-3000:]
    assert (out / "shard-00000.npz").is_file() and not list(out.glob(".*.lock"))
    assert "--break-locks" in (REPO / "README.md").read_text()
    user = tmp_path / "user"
    user.mkdir()
    (user / ".mine.lock").write_text("the user's file")
    assert safety.break_locks(user) == [] and (user / ".mine.lock").exists()


# --- files jpatch did not create ------------------------------------------------------------------


def test_bulk_refuses_the_empty_working_directory(ws, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    refused(["bulk", "--model", ws / "m", "--data", ws / "data.jsonl", "--out", "."], capsys,
            "it is the working directory")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(FileExistsError, match="it is the working directory"):
        bulk.bulk_sweep(tiny_model(), ws / "data.jsonl", "resid_pre", "str", "logit-diff", ".", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_bulk_refuses_a_symlinked_out(here, capsys, tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    refused(BULK + ["--out", tmp_path / "link"], capsys, "is a symbolic link")
    assert list(real.iterdir()) == []


@pytest.mark.parametrize("name", [".shard-notes", ".shard-00000.npz.lock", ".manifest.json.lock"])
def test_bulk_refuses_a_users_file_named_like_its_own(here, capsys, monkeypatch, tmp_path, name):
    no_waiting(monkeypatch)  # (a lock file nobody refreshes was waited for forever)
    out = tmp_path / "out"
    out.mkdir()
    (out / name).write_text("the user's")
    refused(BULK + ["--out", out], capsys, f"is not empty ({name})")
    assert [p.name for p in out.iterdir()] == [name] and (out / name).read_text() == "the user's"


def test_overwrite_never_deletes_a_link_or_folder_the_user_added(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "precious.txt").write_text("keep")
    out = results.save_result("r", {"x": np.zeros(2)}, {"v": 1})
    for name, make in {"link": lambda p: p.symlink_to(target), "folder": lambda p: p.mkdir()}.items():
        make(out / name)
        with pytest.raises(FileExistsError, match=f"holds files jpatch did not write there \\({name}\\)"):
            results.save_result("r", {"x": np.ones(2)}, {"v": 2}, overwrite=True)
        assert (out / name).exists() or (out / name).is_symlink()
        (out / name).unlink() if name == "link" else (out / name).rmdir()
    assert (target / "precious.txt").read_text() == "keep"
    results.save_result("r", {"x": np.ones(2)}, {"v": 3}, overwrite=True)  # its own files only: replaced
    assert jpatch.load_result("r").settings["v"] == 3


# --- settings checked before anything compiles ------------------------------------------------------


@pytest.mark.parametrize("threshold", ["-1", "nan", "inf"])
def test_circuit_threshold_is_checked_first(here, capsys, monkeypatch, threshold):
    monkeypatch.setattr(circuit_report, "analyse", must_not("ACDC"))
    monkeypatch.setattr(cli, "load_model", must_not("loading the model"))
    refused(["circuit", "--model", "m", "--threshold", threshold, "--out", "c"], capsys,
            f"--threshold must be a finite number >= 0, got {float(threshold)}")
    assert not (here / "c").exists()


@pytest.mark.parametrize("argv", [
    ["sweep", "--site", "resid_pre", "--axes", "layer,head"],
    ["sweep", "--site", "z", "--axes", "pos,head"],
    ["attribute", "--site", "resid_pre", "--axes", "layer,bogus"],
])
def test_axes_are_checked_before_compiling(here, capsys, monkeypatch, argv):
    monkeypatch.setattr(cli, "load_task", must_not("the task and the sweep"))
    refused(argv + ["--model", "m", "--out", "ax"], capsys, "--axes")
    assert not (here / "ax").exists()


@pytest.mark.parametrize("command", ["sweep", "demo", "circuit"])
def test_read_only_out_is_checked_first(here, capsys, monkeypatch, tmp_path, command):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    real = os.access
    if os.geteuid() == 0:  # root writes anywhere: stand in for a read-only folder
        monkeypatch.setattr(safety.os, "access",
                            lambda p, mode, **k: False if Path(p) == locked else real(p, mode, **k))
    monkeypatch.setattr(cli, "load_model", must_not("loading the model"))
    try:
        refused([command, "--model", "m", "--out", locked / "out"], capsys, "is not writable")
    finally:
        locked.chmod(0o755)
    assert list(locked.iterdir()) == []


def test_huge_key_positions_are_quoted_short(here, capsys):
    row = examples(1)[0]
    _write(here / "huge.jsonl", [{**row, "key_positions": list(range(10**6))},
                                 {**row, "key_positions": ["x"] * 10**6}])
    err = refused(["bulk", "--model", "m", "--data", "huge.jsonl", "--out", "h"], capsys, "line 1: key position(s)")
    assert "line 2: 'key_positions' must be a list" in err and len(err) < 2000, len(err)
    assert len(str(cli.Fail("x" * 10**6))) < 1100
