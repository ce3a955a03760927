"""The agreement report: statistics against scipy / hand computation, the subset diagnostic
against single-component exact sweeps, and `jpatch attribute --compare-exact` end to end."""

import json

import jax
import numpy as np
import pytest
import scipy.stats

import jpatch
from jpatch.methods import agreement
from jpatch.face import cli
from jpatch.methods import metrics
from jpatch import patching
def test_statistics_match_scipy_and_hand_counts():
    rng = np.random.default_rng(0)
    exact = rng.normal(size=(3, 8))
    exact[0, 0] = exact[0, 1]  # a tie: Spearman averages tied ranks
    estimate = exact + 0.3 * rng.normal(size=exact.shape)
    estimate[2, 5] = np.nan  # e.g. a position past a prompt's end: left out
    report = agreement.agreement(estimate, exact, ("layer", "pos"), misses=2)
    keep = np.isfinite(estimate)
    assert report["components"] == 23
    assert report["pearson"] == pytest.approx(scipy.stats.pearsonr(estimate[keep], exact[keep])[0], abs=1e-12)
    assert report["spearman"] == pytest.approx(scipy.stats.spearmanr(estimate[keep], exact[keep])[0], abs=1e-12)
    big = np.abs(exact[keep]) >= 0.01 * np.abs(exact[keep]).max()
    assert report["sign_agreement"] == pytest.approx((np.sign(estimate[keep]) == np.sign(exact[keep]))[big].mean())
    gaps = np.abs(estimate - exact)
    worst = np.unravel_index(np.nanargmax(gaps), gaps.shape)
    assert (report["largest_misses"][0]["layer"], report["largest_misses"][0]["pos"]) == worst
    # top-k recall by hand: exact's top 2 are {a, b}; the estimate ranks a first and b third
    assert agreement.top_k_recall(np.array([5.0, 0.1, 3.0, -4.0]), np.array([5.0, 0.0, 1.0, -4.5]), 2) == 1.0
    assert agreement.top_k_recall(np.array([5.0, 4.0, 3.0, 0.0]), np.array([5.0, 0.0, 1.0, -4.5]), 2) == 0.5


@pytest.fixture(scope="module")
def small():
    config = jpatch.GPT2Config(n_layer=2, n_head=4, d_model=64, d_mlp=256, n_ctx=32, d_vocab=97)
    model = jpatch.GPT2.init(config, key=jax.random.PRNGKey(1), std=0.15)
    rng = np.random.default_rng(3)
    clean = rng.integers(0, 97, (3, 6))
    corrupted = clean.copy()
    corrupted[:, 2] = (clean[:, 2] + 11) % 97
    gap = np.asarray(model(clean))[:, -1] - np.asarray(model(corrupted))[:, -1]
    return model, clean, corrupted, metrics.logit_diff(gap.argmax(-1), gap.argmin(-1))


def test_subset_of_one_component_is_the_exact_sweep(small):
    model, clean, corrupted, metric = small
    axes = ("layer", "head")
    exact = patching.sweep(model, clean, corrupted, "z", metric, axes=axes, progress=False)
    chosen = [np.eye(1, exact.size, i, dtype=bool).reshape(exact.shape) for i in (0, 5)]
    effects = agreement.subset_effects(model, clean, corrupted, "z", metric, axes, chosen)
    np.testing.assert_allclose(effects, exact.ravel()[[0, 5]], atol=1e-5)
    # two components at once: the sweep of both (the whole layer 0) equals patching all its heads
    layer0 = np.zeros(exact.shape, bool)
    layer0[0] = True
    whole = patching.sweep(model, clean, corrupted, "attn_out", metric, axes=("layer",), progress=False)[0]
    np.testing.assert_allclose(agreement.subset_effects(model, clean, corrupted, "z", metric, axes, [layer0]),
                               [whole], atol=1e-5)


def test_compare_exact_report(small):
    model, clean, corrupted, metric = small
    estimate, exact, report = agreement.compare_exact(model, clean, corrupted, "z", metric, axes=("layer", "pos"),
                                                      diagnostic=2)
    assert estimate.shape == exact.shape == (2, 6)
    assert report["components"] == 12 and set(report["top_k_recall"]) == {"1", "10"}
    assert report["diagnostic"]["subsets"] == 2 and len(report["diagnostic"]["effects"]) == 2
    assert "Spearman" in agreement.format_report(report)


def test_cli_attribute_compare_exact(tmp_path, capsys):
    model_dir = tmp_path / "m"
    config = jpatch.GPT2Config(n_layer=2, n_head=4, d_model=64, d_mlp=256, n_ctx=64)
    jpatch.save(jpatch.GPT2.init(config, key=jax.random.PRNGKey(0), std=0.1), model_dir)
    out = tmp_path / "attr"
    cli.main(["attribute", "--model", str(model_dir), "--site", "z", "--axes", "layer,head", "--n-prompts", "4",
              "--compare-exact", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "Spearman" in printed and "top-k recall" in printed
    report = json.loads((out / "agreement.json").read_text())
    assert report["site"] == "attn.hook_z" and report["axes"] == ["layer", "head"]
    assert (out / "scatter.png").stat().st_size > 0
    assert (out / "estimate" / "result.npz").exists() and (out / "exact" / "result.npz").exists()
    with pytest.raises(SystemExit, match="unknown method"):
        cli.main(["attribute", "--model", str(model_dir), "--method", "ig", "--out", str(tmp_path / "x")])
