"""Heatmaps straight from saved results (single and bulk), their axes and titles, and the
noising effect (patched - clean) instead of values near the clean run's."""

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest

from jpatch.face import plot
from jpatch.runs.results import load_result, save_result
from test_results import fake_bulk

SETTINGS = {"model": "toy", "site": "hook_resid_pre", "axes": ["layer", "pos"], "corruption": "str",
            "metric": "logit-diff", "direction": "denoise", "window": 1}


def image(fig):
    return np.asarray(fig.axes[0].images[0].get_array())


def test_plot_sweep_takes_a_saved_single_sweep(tmp_path):
    values = np.arange(6, dtype=np.float32).reshape(2, 3) / 5
    r = load_result(save_result(tmp_path / "a" / "b", {"hook_resid_pre": values}, SETTINGS))  # missing parents made
    assert r.axes() == r.axes("hook_resid_pre") == ("layer", "pos")
    fig = plot.plot_sweep(r, tokens=["x", "y", "z"])
    np.testing.assert_allclose(image(fig), values)
    ax = fig.axes[0]
    assert ax.get_xlabel() == "position" and ax.get_ylabel() == "layer"
    assert "hook_resid_pre" in ax.get_title() and "toy" in ax.get_title()
    assert [t.get_text() for t in ax.get_xticklabels()] == ["x", "y", "z"]
    np.testing.assert_allclose(image(plot.heatmap(r)), values)
    out = tmp_path / "new" / "folder" / "h.png"
    plot.save(fig, out)
    assert out.stat().st_size > 1000


def test_noising_heatmap_shows_the_effect(tmp_path):
    values = np.array([[1.0, 0.4], [1.0, 0.9]], np.float32)
    r = load_result(save_result(tmp_path / "n", {"hook_resid_pre": values},
                                {**SETTINGS, "direction": "noise", "clean": 1.0}))
    fig = plot.plot_sweep(r)
    np.testing.assert_allclose(image(fig), values - 1.0)
    assert "patched - clean" in fig.axes[1].get_ylabel()


def test_plot_sweep_takes_a_bulk_result(tmp_path):
    _, raw, clean, corrupted = fake_bulk(tmp_path / "bulk")
    r = load_result(tmp_path / "bulk")
    reach = ~np.isnan(raw)  # the normalized mean over the prompts reaching each entry
    mean = lambda a: np.where(reach, a, 0).sum(0) / reach.sum(0)
    expected = (mean(raw) - mean(corrupted[:, None, None] + 0 * raw)) / (
        mean(clean[:, None, None] + 0 * raw) - mean(corrupted[:, None, None] + 0 * raw))
    np.testing.assert_allclose(image(plot.plot_sweep(r, site="s")), expected)
    np.testing.assert_allclose(image(plot.plot_sweep(r)), expected)  # the only site


def test_bulk_noising_heatmap_shows_the_effect(tmp_path):
    import json

    _, raw, clean, corrupted = fake_bulk(tmp_path / "bulk")
    manifest = json.loads((tmp_path / "bulk" / "manifest.json").read_text())
    manifest["settings"]["direction"] = "noise"
    (tmp_path / "bulk" / "manifest.json").write_text(json.dumps(manifest))
    r = load_result(tmp_path / "bulk")
    reach = ~np.isnan(raw)
    mean = lambda a: np.where(reach, a, 0).sum(0) / reach.sum(0)
    gap = mean(clean[:, None, None] + 0 * raw) - mean(corrupted[:, None, None] + 0 * raw)
    effect = (mean(raw) - mean(corrupted[:, None, None] + 0 * raw)) / gap - 1.0  # "range": the clean run is 1
    np.testing.assert_allclose(image(plot.plot_sweep(r)), effect, rtol=1e-5, atol=1e-6)


def test_plot_errors(tmp_path):
    three = load_result(save_result(tmp_path / "3", {"attn.hook_z": np.zeros((2, 3, 4))},
                                    {**SETTINGS, "site": "attn.hook_z", "axes": ["layer", "pos", "head"]}))
    with pytest.raises(ValueError, match="2-D"):
        plot.plot_sweep(three)
    two = load_result(save_result(tmp_path / "2", {"a": np.zeros((2, 2)), "b": np.zeros((2, 2))}, {}))
    with pytest.raises(ValueError, match="holds a, b: name one"):
        plot.plot_sweep(two)
    with pytest.raises(ValueError, match="name its 2 axes"):
        plot.plot_sweep(two, site="a")
    np.testing.assert_allclose(image(plot.plot_sweep(two, ("layer", "head"), site="b")), 0)
