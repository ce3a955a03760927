"""Bulk sweeps: per-prompt results equal single-prompt `sweep`s (mixed prompt lengths, both
corruptions, every metric), resume after SIGKILL without recomputing, refusal of a folder
made with other settings, dataset errors naming the line before any compute, the CLI.

The model is a tiny random GPT-2 with GPT-2's vocabulary (50257), so real text goes through
the real tokenizer.
"""

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from jpatch import GPT2, GPT2Config

from jpatch.runs import bulk

from jpatch import patching

from jpatch.runs import results
from jpatch.files import atomic
from jpatch.data.dataset import key_token_std, read_dataset
from jpatch.face import bulk_cli
from jpatch.methods.metrics import by_name as make_metric
from jpatch.runs.bulk import bulk_sweep, noise_run
from jpatch.runs.results import load_result
from jpatch.model.tokenizer import get_tokenizer

REPO = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
CONFIG = GPT2Config(n_layer=2, n_head=4, d_model=64, d_mlp=256, n_ctx=64, d_vocab=50257)
NAMES = [" Mary", " John", " Tom", " Sarah", " Alice", " Bob", " James", " Anna"]
TEMPLATES = [
    "When{a} and{b} went to the store,{b} gave a drink to",  # 14 tokens
    "{a} and{b} met.{b} waved to",  # 8 tokens
]
SITES = "resid_pre,attn_head_out_all_pos"


def tiny_model(seed=0):
    return GPT2.init(CONFIG, key=jax.random.key(seed), std=0.1)


def examples(n, seed=0):
    """IOI-style examples of two token lengths: clean / corrupted (other names), answer, contrast, key positions."""
    tok = get_tokenizer()
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        template = TEMPLATES[i % 3 == 2]
        a, b, c, d = rng.choice(NAMES, 4, replace=False)
        clean = template.format(a=a, b=b)
        ids = tok.encode(clean)
        keys = [p for p, t in enumerate(ids) if t in (tok.token_id(a), tok.token_id(b))]
        rows.append({"clean": clean, "corrupted": template.format(a=c, b=d), "answer": a, "contrast": b,
                     "key_positions": keys})
    return rows


def write_jsonl(path, rows):
    Path(path).write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def subprocess_env(**extra):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(TESTS), env.get("PYTHONPATH", "")])
    env.update(extra)
    return env


def assert_same(a, b, tol=1e-6, what=""):
    assert a.shape == b.shape, what
    assert (np.isnan(a) == np.isnan(b)).all(), f"{what}: NaN at different places"
    err = np.nanmax(np.abs(a - b)) if np.isfinite(a).any() else 0.0
    assert err <= tol, f"{what}: max abs difference {err:.3g} > {tol}"


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def data7(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "data.jsonl", examples(7))


@pytest.fixture(scope="module")
def str_run(model, data7, tmp_path_factory):
    out = tmp_path_factory.mktemp("bulk") / "str"
    run = bulk_sweep(model, data7, SITES, "str", "logit-diff", out, shard_size=4, progress=False)
    return run, load_result(out)


# --- per-prompt equality with single-prompt sweeps -----------------------------------------


def single_sweeps(model, dataset, i, corruption, metric, specs, *, direction="denoise", window=1, std=None, seed=0,
                  n_samples=10):
    e = dataset.examples[i]
    clean = e.clean[None]
    if corruption == "str":
        corrupted = e.corrupted[None]
    else:
        corrupted = noise_run(model, clean, [e.key_positions], [i], n_samples=n_samples, std=std, scale=3.0, seed=seed)
    m = make_metric(metric, [e.answer], [e.contrast])
    return {s.name: patching.sweep(model, clean, corrupted, s.site, m, axes=s.axes, per_prompt=True, direction=direction,
                                   window=window, progress=False)
            for s in specs}


def check_against_single(model, data, result, corruption, metric, prompts, **kw):
    dataset = read_dataset(data, corruption=corruption)
    specs = bulk.resolve_sites(result.settings["sites"], kw.get("window", 1))
    max_len = int(dataset.lengths.max())
    assert len(set(dataset.lengths)) > 1, "the test needs prompts of several lengths"
    for i in prompts:
        T = len(dataset.examples[i].clean)
        expected = single_sweeps(model, dataset, i, corruption, metric, specs, std=result.settings["noise_std"], **kw)
        for s in specs:
            got = result[s.name][i]
            assert got.shape == s.grid(model.config, max_len)
            if "pos" in s.axes:
                pos = s.axes.index("pos")
                real = np.take(got, np.arange(T), axis=pos)
                assert np.isnan(np.take(got, np.arange(T, max_len), axis=pos)).all(), "padding must be NaN"
            else:
                real = got
            assert np.isfinite(real).all()
            assert_same(real, np.asarray(expected[s.name])[0], tol=1e-5, what=f"prompt {i} {s.name}")


def test_str_logit_diff_matches_single_prompt_sweeps(model, data7, str_run):
    run, result = str_run
    assert run.computed == [0, 1] and run.skipped == [] and run.complete
    assert result.kind == "bulk" and result.n_prompts == 7
    assert list(result.lengths) == [14, 14, 8, 14, 14, 8, 14]
    assert result["resid_pre"].shape == (7, 2, 14) and result["attn_head_out_all_pos"].shape == (7, 2, 4)
    assert result.axes("resid_pre") == ("prompt", "layer", "pos")
    check_against_single(model, data7, result, "str", "logit-diff", range(7))
    # mean: the paper's aggregate, normalize the mean over the prompts reaching each position, built
    # here from single-prompt sweeps' raw scores and baselines; std over per-prompt values ignores padding
    dataset = read_dataset(data7, corruption="str")
    specs = [s for s in bulk.resolve_sites(["resid_pre"]) if s.name == "resid_pre"]
    single = [single_sweeps(model, dataset, i, "str", "logit-diff", specs)["resid_pre"] for i in range(7)]
    for positions, prompts in ((slice(0, 8), range(7)), (slice(8, 14), [0, 1, 3, 4, 6])):
        raw = np.mean([single[i].raw[0][:, positions] for i in prompts], 0)
        cl = np.mean([single[i].clean_per_prompt[0] for i in prompts])
        co = np.mean([single[i].corrupted_per_prompt[0] for i in prompts])
        assert_same(result.mean("resid_pre")[:, positions], (raw - co) / (cl - co), tol=1e-5)
        np.testing.assert_allclose(result.clean_score[list(prompts)], [single[i].clean_per_prompt[0] for i in prompts],
                                   atol=1e-5)
    per = result["resid_pre"]
    assert_same(result.std("resid_pre")[:, 8:], per[[0, 1, 3, 4, 6], :, 8:].std(0), tol=1e-6)
    assert (result.count("resid_pre")[:, 8:] == 5).all() and (result.count("resid_pre")[:, :8] == 7).all()
    with pytest.raises(ValueError, match="only a bulk result"):
        results.Result({"x": np.zeros(3)}, {}).mean("x")


def test_noise_kl_noising_window_matches_single_prompt_sweeps(model, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", examples(3))
    run = bulk_sweep(model, data, "mlp_out", "noise", "kl", tmp_path / "out", direction="noise", window=3,
                     shard_size=4, seed=5, n_samples=4, progress=False)
    result = load_result(run.out_dir)
    s = result.settings
    assert (s["corruption"], s["metric"], s["direction"], s["window"], s["n_samples"]) == ("noise", "kl", "noise", 3, 4)
    assert s["noise_std"] == pytest.approx(key_token_std(model, read_dataset(data)), rel=1e-12)
    check_against_single(model, data, result, "noise", "kl", [0, 2], direction="noise", window=3, seed=5, n_samples=4)


def test_key_token_std_is_roms_embedding_std(model, data7):
    from jpatch.methods.corrupt import embedding_std

    dataset = read_dataset(data7)
    ids = np.concatenate([e.clean[list(e.key_positions)] for e in dataset.examples])
    assert key_token_std(model, dataset) == pytest.approx(embedding_std(model, ids), rel=1e-10)


@pytest.mark.parametrize("metric", ["prob", "logprob"])
def test_prob_and_logprob_match_single_prompt_sweeps(model, tmp_path, metric):
    data = write_jsonl(tmp_path / "d.jsonl", examples(3))
    run = bulk_sweep(model, data, "resid_pre", "str", metric, tmp_path / "out", shard_size=4, progress=False)
    check_against_single(model, data, load_result(run.out_dir), "str", metric, [1, 2])


# --- resume --------------------------------------------------------------------------------

CHILD = """
import sys, time
from jpatch.runs import results
from jpatch.files import atomic
write = atomic.atomic_write_npz
def slow_write(path, arrays):  # give the parent time to kill us between shards
    out = write(path, arrays)
    time.sleep(3)
    return out
atomic.atomic_write_npz = slow_write
from test_bulk import tiny_model
from jpatch.runs.bulk import bulk_sweep
bulk_sweep(tiny_model(), sys.argv[1], "resid_pre", "str", "logit-diff", sys.argv[2], shard_size=2, progress=False)
print("finished")
"""


def test_resume_after_sigkill_gives_the_uninterrupted_result(model, data7, tmp_path):
    out = tmp_path / "killed"
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    child = subprocess.Popen([sys.executable, str(script), str(data7), str(out)], env=subprocess_env(), cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = out / results.shard_name(0)
    deadline = time.monotonic() + 120
    while not first.exists():
        if child.poll() is not None:
            pytest.fail(f"the child ended before writing a shard: {child.communicate()[1].decode()[-2000:]}")
        assert time.monotonic() < deadline, "no shard after 120 s"
        time.sleep(0.02)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert child.returncode == -signal.SIGKILL
    written = sorted(out.glob("shard-*.npz"))
    assert 1 <= len(written) < 4, "the kill must land part-way"
    mtimes = {p.name: p.stat().st_mtime_ns for p in written}
    with pytest.raises(FileNotFoundError, match="incomplete.*shard-00003.npz"):
        load_result(out)
    # as the killed writer leaves it (host, pid, start ticks in the name), and one of a live process
    stale = out / f".shard-00003.npz.tmp-{socket.gethostname()}-{child.pid}-1-deadbeef"
    stale.write_bytes(b"partial")
    live = out / f".shard-00003.npz.tmp-{socket.gethostname()}-{os.getppid()}-None-cafef00d"
    live.write_bytes(b"someone else's")

    resumed = bulk_sweep(model, data7, "resid_pre", "str", "logit-diff", out, shard_size=2, progress=False)
    assert resumed.skipped == [int(n[6:11]) for n in mtimes]
    assert sorted(resumed.computed + resumed.skipped) == [0, 1, 2, 3]
    assert {p.name: p.stat().st_mtime_ns for p in written} == mtimes, "finished shards were rewritten"
    assert not stale.exists() and live.read_bytes() == b"someone else's"
    live.unlink()
    again = bulk_sweep(model, data7, "resid_pre", "str", "logit-diff", out, shard_size=2, progress=False)
    assert again.computed == [] and again.skipped == [0, 1, 2, 3]

    whole = bulk_sweep(model, data7, "resid_pre", "str", "logit-diff", tmp_path / "whole", shard_size=2, progress=False)
    a, b = load_result(out), load_result(whole.out_dir)
    assert_same(a["resid_pre"], b["resid_pre"], tol=1e-6, what="resumed vs uninterrupted")
    assert (a.lengths == b.lengths).all()


# --- refusals ------------------------------------------------------------------------------


def test_refuses_other_settings_model_or_data(model, data7, str_run, tmp_path, monkeypatch):
    out = str_run[0].out_dir
    before = sorted(p.name for p in out.iterdir())
    monkeypatch.setattr(patching, "sweep", lambda *a, **k: pytest.fail("computed before refusing"))
    with pytest.raises(ValueError, match="metric: stored 'logit-diff', now 'prob'"):
        bulk_sweep(model, data7, SITES, "str", "prob", out, shard_size=4, progress=False)
    with pytest.raises(ValueError, match="shard_size: stored 4, now 2"):
        bulk_sweep(model, data7, SITES, "str", "logit-diff", out, shard_size=2, progress=False)
    with pytest.raises(ValueError, match="sites: stored"):
        bulk_sweep(model, data7, "resid_pre", "str", "logit-diff", out, shard_size=4, progress=False)
    with pytest.raises(ValueError, match="direction: stored 'denoise', now 'noise'"):
        bulk_sweep(model, data7, SITES, "str", "logit-diff", out, direction="noise", shard_size=4, progress=False)
    with pytest.raises(ValueError, match="model weights differ"):
        bulk_sweep(tiny_model(seed=1), data7, SITES, "str", "logit-diff", out, shard_size=4, progress=False)
    other = write_jsonl(tmp_path / "other.jsonl", examples(7, seed=1))
    with pytest.raises(ValueError, match="dataset content differs"):
        bulk_sweep(model, other, SITES, "str", "logit-diff", out, shard_size=4, progress=False)
    assert sorted(p.name for p in out.iterdir()) == before
    # the same settings with another model name / dataset path resume (nothing to do)
    moved = write_jsonl(tmp_path / "moved.jsonl", examples(7))
    run = bulk_sweep(model, moved, SITES, "str", "logit-diff", out, shard_size=4, model_name="renamed", progress=False)
    assert run.computed == [] and run.skipped == [0, 1]
    # a folder holding something else
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="holds no bulk manifest"):
        bulk_sweep(model, data7, SITES, "str", "logit-diff", tmp_path / "busy", progress=False)


def test_process_share_and_incomplete_result(model, data7, tmp_path):
    with pytest.raises(TimeoutError, match="process 1: no .*manifest.json"):  # process 1 waits for process 0's manifest
        bulk_sweep(model, data7, SITES, "str", "logit-diff", tmp_path / "half", shard_size=4, process_index=1,
                   process_count=2, manifest_timeout=0.1, progress=False)
    run = bulk_sweep(model, data7, SITES, "str", "logit-diff", tmp_path / "half", shard_size=4, process_index=0,
                     process_count=2, progress=False)
    assert run.computed == [0] and not run.complete
    with pytest.raises(FileNotFoundError, match=r"1 of 2 shards missing \(shard-00001.npz\)"):
        load_result(tmp_path / "half")


# --- bad input -------------------------------------------------------------------------------

GOOD = examples(1)[0]
LONG = " and".join(["When Mary"] * 40) + " went to the store, John gave a drink to"
BAD_LINES = [
    ('{"clean": "When Mary went", "answer": " Mary"', "line 3: malformed JSON"),
    ({**GOOD, "answer": " Mary Smith"}, "line 3: answer: ' Mary Smith' is not a single GPT-2 token"),
    ({**GOOD, "contrast": "Johnathan"}, "line 3: contrast: 'Johnathan' is not a single GPT-2 token"),
    ({**GOOD, "clean": LONG, "corrupted": LONG}, "line 3: the clean prompt is 1.. tokens, longer than the model's context n_ctx=64"),
    ({**GOOD, "corrupted": GOOD["corrupted"] + " again"}, "line 3: the corrupted prompt is 15 tokens but the clean prompt is 14"),
    ({k: v for k, v in GOOD.items() if k != "corrupted"}, "line 3: missing field 'corrupted'"),
    ({**GOOD, "key_positions": [0, 14]}, r"line 3: key position\(s\) \[14\] out of range"),
    ("[1, 2]", "line 3: expected a JSON object"),
]


@pytest.mark.parametrize("bad, message", BAD_LINES, ids=[m.split(": ")[1][:24] for _, m in BAD_LINES])
def test_bad_lines_are_named_before_any_compute(model, tmp_path, monkeypatch, bad, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD, "", bad, GOOD])  # line 2 blank: skipped, still counted
    monkeypatch.setattr(patching, "sweep", lambda *a, **k: pytest.fail("computed before validating"))
    monkeypatch.setattr(bulk, "model_hash", lambda *a, **k: pytest.fail("hashed the model before validating"))
    with pytest.raises(ValueError, match=message) as info:
        bulk_sweep(model, path, "resid_pre", "str", "logit-diff", tmp_path / "out", progress=False)
    assert "line 1" not in str(info.value) and "line 4" not in str(info.value)
    assert not (tmp_path / "out").exists()


def test_dataset_errors_for_noise_and_all_lines_listed(model, tmp_path):
    no_keys = {k: v for k, v in GOOD.items() if k not in ("key_positions", "corrupted")}
    path = write_jsonl(tmp_path / "bad.jsonl", [no_keys, {**no_keys, "key_positions": []}, {**no_keys, "key_positions": [-1]},
                                                {**GOOD, "corrupted": GOOD["clean"]}])
    with pytest.raises(ValueError) as info:
        read_dataset(path, corruption="noise", n_ctx=64)
    text = str(info.value)
    assert "3 error(s)" in text
    assert "line 1: missing field 'key_positions'" in text
    assert "line 2: 'key_positions' is empty" in text
    assert "line 3: key position(s) [-1] out of range" in text
    with pytest.raises(ValueError, match="line 4: the corrupted prompt is the clean prompt"):
        read_dataset(path, corruption="str")
    # kl needs no answer / contrast; logit-diff needs both
    path = write_jsonl(tmp_path / "kl.jsonl", [{k: v for k, v in GOOD.items() if k not in ("answer", "contrast")}])
    assert len(read_dataset(path, metric="kl")) == 1
    with pytest.raises(ValueError, match="line 1: missing field 'answer'"):
        read_dataset(path, metric="logit-diff")
    with pytest.raises(FileNotFoundError, match="cannot open dataset"):
        read_dataset(tmp_path / "absent.jsonl")


def test_bad_arguments(model, data7, tmp_path):
    out = tmp_path / "x"
    for kwargs, message in [
        (dict(sites="resid_sideways"), "unknown site 'resid_sideways'"),
        (dict(sites="attn_head_out_all_pos", window=3), "sliding window applies to"),
        (dict(sites="blocks.0.hook_resid_pre"), "names one layer"),
        (dict(metric="accuracy"), "unknown metric"),
        (dict(corruption="zero"), "unknown corruption"),
        (dict(shard_size=0), "shard_size"),
        (dict(process_index=2, process_count=2), "process_index 2 out of range"),
    ]:
        args = {"sites": "resid_pre", "corruption": "str", "metric": "logit-diff", **kwargs}
        with pytest.raises(ValueError, match=message):
            bulk_sweep(model, data7, out_dir=out, progress=False, **args)
    assert not out.exists()


# --- command line ------------------------------------------------------------------------------


def test_cli_main(model, data7, tmp_path, capsys):
    from jpatch.model.checkpoint import save

    save(model, tmp_path / "weights" / "tiny")
    parser = bulk_cli.add_arguments(argparse.ArgumentParser())
    argv = ["--model", str(tmp_path / "weights" / "tiny"), "--data", str(data7), "--sites", "resid_pre", "--out",
            str(tmp_path / "cli"), "--shard-size", "4", "--memory-budget", "512M", "--no-progress"]
    args = parser.parse_args(argv)
    assert bulk_cli.parse_bytes(args.memory_budget) == 512 << 20 and args.metric == "logit-diff" and args.corruption == "str"
    assert bulk_cli.main(args) == 0
    out = capsys.readouterr().out
    assert "2 shard(s) computed" in out and "resid_pre: 7 prompts" in out
    result = load_result(tmp_path / "cli")
    assert result.settings["model"] == str(tmp_path / "weights" / "tiny")
    assert bulk_cli.main(parser.parse_args(argv)) == 0
    assert "0 shard(s) computed, 2 already done" in capsys.readouterr().out
    assert bulk_cli.parse_bytes("4G") == 4 << 30 and bulk_cli.parse_bytes("1e6") == 10**6 and bulk_cli.parse_bytes("2GiB") == 2 << 30
    with pytest.raises(ValueError):
        bulk_cli.parse_bytes("lots")
    with pytest.raises(SystemExit, match="(?s)jpatch bulk: invalid dataset .*line 1: missing field 'answer'"):
        bad = write_jsonl(tmp_path / "bad.jsonl", [{k: v for k, v in GOOD.items() if k != "answer"}])
        bulk_cli.main(parser.parse_args(argv[:2] + ["--data", str(bad)] + argv[4:]))


def test_undefined_metric_is_stored_as_nan_with_a_warning(model, tmp_path):
    # noise below float32 resolution: the corrupted run is the clean run, so a normalized logit
    # difference is 0 / 0 (noise_std=0 itself is refused before anything is written)
    data = write_jsonl(tmp_path / "d.jsonl", examples(3))
    with pytest.raises(ValueError, match="noise_std must be a finite number > 0, got 0.0"):
        bulk_sweep(model, data, "resid_pre", "noise", "logit-diff", tmp_path / "out", noise_std=0.0, progress=False)
    assert not (tmp_path / "out").exists()
    with pytest.warns(RuntimeWarning, match=r"undefined .* for 3 prompt\(s\), stored as NaN: dataset line\(s\) \[1, 2, 3\]"):
        run = bulk_sweep(model, data, "resid_pre", "noise", "logit-diff", tmp_path / "out", n_samples=1, noise_std=1e-30,
                         progress=False)
    assert run.undefined_lines == [1, 2, 3]
    assert np.isnan(load_result(run.out_dir)["resid_pre"]).all()
    with pytest.raises(ValueError, match="line 1: answer and contrast are the same token"):
        read_dataset(write_jsonl(tmp_path / "same.jsonl", [{**GOOD, "contrast": GOOD["answer"]}]))


def test_cli_refuses_a_zero_memory_budget_with_a_jpatch_line(tmp_path):
    """--memory-budget is validated with the other settings: a `jpatch bulk:` message, not argparse's usage."""
    from jpatch.face.cli import Fail

    parser = bulk_cli.add_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--model", "toy", "--data", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "o"),
                              "--memory-budget", "0"])
    with pytest.raises(Fail, match="jpatch bulk: byte count must be positive, got '0'"):
        bulk_cli.main(args)
    assert list(tmp_path.iterdir()) == []
