"""The jpatch command: help, demo and sweep on a small random model, clear errors."""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest

import jpatch
from jpatch.face import cli
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A small random model with GPT-2's vocabulary, saved like a converted one."""
    config = jpatch.GPT2Config(n_layer=2, n_head=4, d_model=64, d_mlp=256, n_ctx=64)
    path = tmp_path_factory.mktemp("model") / "m"
    jpatch.save(jpatch.GPT2.init(config, key=jax.random.PRNGKey(0), std=0.1), path)
    return str(path)


@pytest.mark.parametrize("command", ["demo", "sweep", "convert", "paper", "bulk", "attribute"])
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit:
        cli.main([command, "--help"])
    assert exit.value.code == 0
    assert f"usage: jpatch {command}" in capsys.readouterr().out


def test_console_script_is_installed():
    out = subprocess.run([sys.executable, "-m", "jpatch.face.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "demo" in out.stdout and "sweep" in out.stdout


def test_demo_prints_top_components_and_writes_heatmaps(model_dir, tmp_path, capsys):
    out = tmp_path / "demo"
    cli.main(["demo", "--model", model_dir, "--out", str(out), "--n-prompts", "4"])
    from jpatch.data.tasks import ioi_task

    longest = ioi_task(4, seed=0, split="test").seq_len  # the IOI templates differ in length
    printed = capsys.readouterr().out
    assert "top hook_resid_pre components" in printed and "head " in printed
    for name in ("resid_pre", "heads"):
        assert (out / f"{name}.png").stat().st_size > 1000
        settings = json.loads((out / name / "settings.json").read_text())
        assert settings["corruption"] == "str" and settings["metric"] == "logit-diff"
        result = jpatch.load_result(out / name)[settings["site"]]
        assert result.shape == ((2, longest) if name == "resid_pre" else (2, 4))
        assert np.isfinite(result).all()


def test_sweep_equals_library_call(model_dir, tmp_path):
    """The command's saved result is the library's sweep of the same task."""
    from jpatch.data.tasks import ioi_task

    out = tmp_path / "s"
    cli.main(["sweep", "--model", model_dir, "--task", "ioi", "--site", "mlp_out", "--n-prompts", "4",
              "--out", str(out)])
    task = ioi_task(4, seed=0, split="test")
    expected = jpatch.sweep(jpatch.load(model_dir), task.clean_tokens, task.corrupted_tokens, "mlp_out",
                            task.metric(), progress=False, attention_mask=task.attention_mask)
    np.testing.assert_allclose(jpatch.load_result(out)["hook_mlp_out"], expected, atol=1e-5)
    assert (out / "heatmap.png").exists()


@pytest.mark.parametrize(
    "flag, value, listed",
    [
        ("--task", "nope", "ioi, factual, greater-than"),
        ("--site", "resid_pree", "hook_resid_pre"),
        ("--corruption", "blur", "str, noise, zero, mean, resample"),
        ("--metric", "accuracy", "logit-diff, prob, kl, logprob"),
    ],
)
def test_unknown_names_list_the_valid_ones(model_dir, tmp_path, flag, value, listed):
    args = ["sweep", "--model", model_dir, "--n-prompts", "2", "--out", str(tmp_path / "x"), flag, value]
    with pytest.raises(SystemExit, match=listed):
        cli.main(args)
    assert not (tmp_path / "x").exists()


def test_missing_model_is_named(tmp_path):
    with pytest.raises(SystemExit, match="nowhere"):
        cli.main(["demo", "--model", str(tmp_path / "nowhere"), "--out", str(tmp_path / "d")])
    assert not (tmp_path / "d").exists()


def test_failed_sweep_leaves_no_output(model_dir, tmp_path):
    """A sweep that fails (noising with a zero ablation as the base run) writes nothing."""
    out = tmp_path / "fail"
    with pytest.raises(SystemExit, match="base run"):
        cli.main(["sweep", "--model", model_dir, "--site", "mlp_out", "--corruption", "zero", "--n-prompts", "2",
                  "--direction", "denoise", "--out", str(out)])
    assert not out.exists()


def test_convert_then_load_gives_transformers_logits(hf_tiny, tmp_path, capsys):
    """`jpatch convert` of a locally saved random GPT-2, then `jpatch.load`."""
    import reference

    hf_tiny.save_pretrained(tmp_path / "hf")
    cli.main(["convert", str(tmp_path / "hf"), str(tmp_path / "jp")])
    assert "converted" in capsys.readouterr().out
    tokens = reference.random_tokens(2, 9, hf_tiny.config.vocab_size)
    np.testing.assert_allclose(np.asarray(jpatch.load(tmp_path / "jp")(tokens)), reference.hf_logits(hf_tiny, tokens),
                               atol=1e-4, rtol=0)
    with pytest.raises(SystemExit, match="no such checkpoint directory: .*missing"):
        cli.main(["convert", str(tmp_path / "missing"), str(tmp_path / "jp2")])
    assert not (tmp_path / "jp2").exists()


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        cli.main(["sweep", "--help"])
    out = capsys.readouterr().out
    for default in ("(default: toy)", "(default: 32)", "(default: denoise)", "(default: 0)", "(default: resid_pre)"):
        assert default in out


def test_noising_sweep_summary_shows_the_effect(model_dir, tmp_path, capsys):
    out = tmp_path / "noise"
    cli.main(["sweep", "--model", model_dir, "--site", "attn_out", "--direction", "noise", "--n-prompts", "3",
              "--out", str(out)])
    printed = capsys.readouterr().out
    r = jpatch.load_result(out)
    assert r.settings["clean"] == 1.0  # the normalized metric of the clean run
    effect = r["hook_attn_out"] - 1.0
    top = np.unravel_index(np.argmax(np.abs(effect)), effect.shape)
    assert "patched - clean" in printed and f"{effect[top]:+.3f}" in printed


def test_sweep_task_file_sweeps_every_prompt_of_every_length(model_dir, tmp_path):
    """A dataset file with prompts of two token lengths: every prompt is swept (padded together), and
    the saved aggregate is the normalized mean over the prompts reaching each position, built here
    from library sweeps of each length on its own."""
    import json as _json

    from jpatch.data.tasks import factual_task

    buckets = [t.select(slice(0, 2)) for t in factual_task()[:2]]
    assert buckets[0].seq_len != buckets[1].seq_len
    data = tmp_path / "mixed.jsonl"
    data.write_text("".join(_json.dumps(ex) + "\n" for t in buckets for ex in t.examples()))
    out = tmp_path / "s"
    cli.main(["sweep", "--model", model_dir, "--task", str(data), "--site", "resid_pre", "--out", str(out)])
    saved = jpatch.load_result(out)
    assert saved.settings["n_prompts"] == 4
    model = jpatch.load(model_dir)
    parts = [jpatch.sweep(model, t.clean_tokens, t.corrupted_tokens, "resid_pre", t.metric(), progress=False)
             for t in buckets]
    T = max(t.seq_len for t in buckets)
    raw = np.concatenate([np.pad(p.raw, [(0, 0), (0, 0), (0, T - p.raw.shape[-1])], constant_values=np.nan)
                          for p in parts])
    clean = np.concatenate([p.clean_per_prompt for p in parts])
    corrupted = np.concatenate([p.corrupted_per_prompt for p in parts])
    reach = ~np.isnan(raw)
    mean = lambda a: np.where(reach, a, 0).sum(0) / reach.sum(0)
    expected = (mean(raw) - mean(corrupted[:, None, None] + 0 * raw)) / (
        mean(clean[:, None, None] + 0 * raw) - mean(corrupted[:, None, None] + 0 * raw))
    np.testing.assert_allclose(saved["hook_resid_pre"], expected, atol=1e-4)
