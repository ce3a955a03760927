"""run_paper: the report's sections, figures and numbers, checked against direct sweeps; atomic output."""

import argparse
import math
import re

import jax
import numpy as np
import pytest

import jpatch
from jpatch.methods import stats
from jpatch.methods import corrupt
from jpatch.face import report as paper
from jpatch.face import report_parts, report_sections
from jpatch.files import safety
from jpatch.data.tasks import factual_task, ioi_task

# One noise sample: the GN runs then have the STR runs' shapes and reuse their compiled sweeps (test time).
SETTINGS = dict(n_prompts=4, n_factual=8, noise_samples=1, progress=False)


@pytest.fixture(scope="module")
def tiny():
    cfg = jpatch.GPT2Config(n_layer=2, n_head=2, d_model=32, d_mlp=128, n_ctx=32, d_vocab=50257)
    return jpatch.GPT2.init(cfg, key=jax.random.PRNGKey(0))


@pytest.fixture(scope="module")
def report(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("paper") / "report"
    path = paper.run_paper(tiny, out, model_name="tiny", **SETTINGS)
    return out, path, open(path, encoding="utf-8").read()


def _section(text, key):
    """The Markdown of one section, up to the next '## ' heading."""
    start = text.index(f"## {paper.SECTION_TITLES[key]}")
    end = text.find("\n## ", start + 1)
    return text[start:] if end < 0 else text[start:end]


def _tables(text):
    """Markdown tables -> lists of rows (header first, separator dropped)."""
    tables, current = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            if not re.fullmatch(r"\|(---\|)+", line):
                current.append([c.strip() for c in line.strip("|").split("|")])
        elif current:
            tables.append(current)
            current = []
    return tables


def _table_with(text, first_header):
    return next(t for t in _tables(text) if t[0][0] == first_header and len(t[0]) > 1)


def test_report_sections_figures_and_finite_numbers(report):
    out, path, text = report
    assert path.endswith("report.md") and (out / "report.md").is_file()
    for title in paper.SECTION_TITLES.values():
        assert f"\n## {title}\n" in text
    for needle in ("tiny", jpatch.__version__, "## Runtime", "## The paper's recommendations", "## Settings"):
        assert needle in text
    for i, rec in enumerate(paper.RECOMMENDATIONS, 1):
        assert f"{i}. {rec}" in text
    figures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert len(figures) >= 6
    for name in figures:
        assert name.endswith(".png") and (out / name).is_file() and (out / name).stat().st_size > 1000
    numbers = 0
    for table in _tables(text):
        for row in table[1:]:
            for cell in row:
                assert cell.lower() not in ("nan", "inf", "-inf"), (table[0], row)
                try:
                    value = float(cell)
                except ValueError:
                    continue
                assert math.isfinite(value)
                numbers += 1
    assert numbers > 50
    assert {"report.md", "results.json", "results.npz"} <= {p.name for p in out.iterdir()}
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".report.tmp")]


def test_ioi_gn_vs_str_equals_direct_sweeps(tiny, report):
    """Section 1's numbers are those of two plain jpatch.sweep calls with the same prompts and seeds."""
    out, _, text = report
    task = ioi_task(4, seed=0, split="test")
    mask = task.attention_mask  # the templates have different lengths: a right-padded batch
    gn = corrupt.gaussian_noise(tiny, task.clean_tokens, task.key_positions, n_samples=1, scale=3.0, seed=1,
                                attention_mask=mask)
    kw = dict(axes=("layer", "head"), progress=False, attention_mask=mask)
    direct_str = jpatch.sweep(tiny, task.clean_tokens, task.corrupted_tokens, "z", task.metric(), **kw)
    direct_gn = jpatch.sweep(tiny, task.clean_tokens, gn, "z", task.metric(), **kw)
    stored = np.load(out / "results.npz")
    np.testing.assert_allclose(stored["ioi_heads_str_ld_denoise"], direct_str, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stored["ioi_heads_gn_ld_denoise"], direct_gn, rtol=1e-5, atol=1e-6)
    table = _table_with(_section(text, "corruption_ioi"), "head")
    assert table[0][:3] == ["head", "STR", "GN"]
    for row in table[1:]:
        layer, head = map(int, row[0].split("."))
        assert float(row[1]) == pytest.approx(direct_str[layer, head], abs=6e-5)
        assert float(row[2]) == pytest.approx(direct_gn[layer, head], abs=6e-5)
    top = stats.top_k(direct_str, 3)
    assert [f"{i // 2}.{i % 2}" for i in top] == [r[0] for r in table[1:4]]


def test_ioi_resid_pre_by_role_equals_direct_sweeps(tiny, report):
    """Section 5's resid_pre panel: each column is a direct sweep at each prompt's own role position."""
    out, _, _ = report
    task = ioi_task(4, seed=0, split="test")
    assert task.attention_mask is not None and len(set(map(tuple, task.key_positions.tolist()))) > 1
    stored = np.load(out / "results.npz")["ioi_resid_pre_str_ld_denoise"]
    roles = [*task.key_positions.T, task.lengths - 1]
    assert stored.shape[1] == len(roles) == len(report_parts.IOI_ROLES)
    for column, pos in zip(stored.T, roles):
        direct = jpatch.sweep(tiny, task.clean_tokens, task.corrupted_tokens, "resid_pre", task.metric(),
                              prompt_positions=pos, attention_mask=task.attention_mask, progress=False)
        np.testing.assert_allclose(column, np.asarray(direct)[:, 0], rtol=1e-5, atol=1e-6)


def test_factual_gn_vs_str_equals_direct_sweeps(tiny, report):
    """Section 2: n_factual=8 takes the first 8 prompts of the largest bucket; its per-layer
    table equals direct sweeps of the MLP output at the last subject token."""
    _, _, text = report
    bucket = max(factual_task(), key=len).select(slice(0, 8))
    gn = corrupt.gaussian_noise(tiny, bucket.clean_tokens, bucket.key_positions, n_samples=1, scale=3.0, seed=1)
    kw = dict(prompt_positions=bucket.last_key_position, progress=False)
    direct_str = jpatch.sweep(tiny, bucket.clean_tokens, bucket.corrupted_tokens, "mlp_out", bucket.metric(), **kw)
    direct_gn = jpatch.sweep(tiny, bucket.clean_tokens, gn, "mlp_out", bucket.metric(), **kw)
    section = _section(text, "corruption_factual")
    assert f"| {bucket.name} | 8 |" in section
    table = _table_with(section, "layer")
    assert table[0][:3] == ["layer", "STR", "GN"] and len(table) == 1 + tiny.config.n_layer
    for layer, row in enumerate(table[1:]):
        assert float(row[1]) == pytest.approx(direct_str[layer, 0], abs=6e-5)
        assert float(row[2]) == pytest.approx(direct_gn[layer, 0], abs=6e-5)


def test_choose_factual_weights_and_buckets():
    tasks = factual_task()
    sizes = sorted((len(t) for t in tasks), reverse=True)
    chosen = report_parts.choose_factual(tasks, sizes[0] + sizes[1] + 3, min_bucket=8)
    assert [len(t) for t in chosen] == [sizes[0], sizes[1]]  # 3 more prompts (2 after rounding to pairs) < 8
    chosen = report_parts.choose_factual(tasks, sizes[0] + 10, min_bucket=8)
    assert [len(t) for t in chosen] == [sizes[0], 10]
    assert [len(t) for t in report_parts.choose_factual(tasks, 1)] == [2]


def test_helpers():
    assert stats.spearman([1, 2, 3, 4], [10, 20, 30, 45]) == pytest.approx(1.0)
    assert stats.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(stats.spearman([1, 1, 1], [1, 2, 3]))
    assert stats.peak([0.1, 0.5, 0.3, 0.2, 0.26]) == (1, 0.5, 2)
    assert stats.top_k(np.array([[0.1, -0.9], [0.5, 0.0]]), 2) == [1, 2]


def test_refuses_non_empty_out_dir_before_any_work(tiny, tmp_path, monkeypatch):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    monkeypatch.setattr(report_parts, "sweep", lambda *a, **k: pytest.fail("swept although the folder is refused"))
    with pytest.raises(FileExistsError, match="did not write"):
        paper.run_paper(tiny, out, **SETTINGS)
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    args = argparse.Namespace(model="no-such-model", out=str(out), n_prompts=4, n_factual=None, noise_samples=2,
                              noise_scale=3.0, window=5, ioi_split="test", seed=0, overwrite=False, quiet=True)
    assert paper.main(args) == 2


def _failing_sweep(monkeypatch, after):
    real, calls = report_parts.sweep, []

    def sweep(*args, **kwargs):
        calls.append(1)
        if len(calls) > after:
            raise RuntimeError("sweep failed")
        return real(*args, **kwargs)

    for module in (report_parts, report_sections):  # every report module that sweeps
        if hasattr(module, "sweep"):
            monkeypatch.setattr(module, "sweep", sweep)


def test_no_half_written_folder_when_a_section_raises(tiny, tmp_path, monkeypatch):
    _failing_sweep(monkeypatch, after=2)  # section 1 completes (and writes its figure), section 2 fails
    out = tmp_path / "new" / "report"
    with pytest.raises(RuntimeError, match="sweep failed"):
        paper.run_paper(tiny, out, **SETTINGS)
    assert not out.exists() and not (tmp_path / "new").exists()
    assert list(tmp_path.iterdir()) == []

    old = tmp_path / "old"  # overwrite=True keeps the old report when the new one fails
    old.mkdir()
    (old / "report.md").write_text("previous")
    safety.write_marker(old, "paper")  # as an earlier run leaves it
    _failing_sweep(monkeypatch, after=0)
    with pytest.raises(RuntimeError, match="sweep failed"):
        paper.run_paper(tiny, old, overwrite=True, **SETTINGS)
    assert [p.name for p in tmp_path.iterdir()] == ["old"] and (old / "report.md").read_text() == "previous"


def test_cli_arguments():
    parser = paper.add_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--out", "x"])
    assert (args.model, args.n_prompts, args.noise_samples, args.overwrite) == ("toy", 64, 10, False)
    args = parser.parse_args(["--model", "gpt2", "--out", "y", "--n-prompts", "8", "--noise-samples", "3",
                              "--overwrite"])
    assert (args.model, args.out, args.n_prompts, args.noise_samples, args.overwrite) == ("gpt2", "y", 8, 3, True)
