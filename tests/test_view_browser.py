"""The HTML views in a real browser: Debian's headless Chromium driven by Playwright for Python.

Each view is opened (from disk, as a user would), must log no console error, and shows the numbers
of the files it was made from: a hovered cell's tooltip against the result file read with NumPy, a
bulk run's prompt grid after switching the prompt against that prompt's row of the shard files, a
circuit edge against circuit.json, a scatter point against the two result files, the notebook
views against hand-computed normalized means and spreads. Screenshots go to each test's tmp folder.
"""

import json
import os
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

from jpatch.engine.aggregate import SweepResult
from jpatch.face import cli
from jpatch.files import html_view
from jpatch.methods.acdc import Circuit
from jpatch.methods.agreement import AgreementReport, agreement
from jpatch.methods.edges import Edges
from jpatch.runs.results import save_result

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser")) if p), None)


@pytest.fixture(scope="module")
def browser():
    """One headless Chromium for the module. Missing: a failure where JPATCH_REQUIRE_BROWSER=1 (.ci/run sets it
    once Chromium is installed), a skip elsewhere."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    missing = ("Playwright for Python is not installed (pip install -e '.[test]')" if sync_playwright is None else
               "no system Chromium on PATH (apt-get install -y chromium; .ci/run installs it)" if CHROMIUM is None
               else None)
    if missing:
        (pytest.fail if os.environ.get("JPATCH_REQUIRE_BROWSER") == "1" else pytest.skip)(f"browser tests need a browser: {missing}")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


class Page:
    """A page with its console errors collected."""

    def __init__(self, browser):
        self.page = browser.new_page(viewport={"width": 1300, "height": 900})
        self.errors = []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))

    def tooltip_after_hover(self, selector):
        target = self.page.locator(selector).first
        if target.evaluate("e => e.tagName") == "path":  # an edge: hover a point on its stroke, not its box's centre
            target.scroll_into_view_if_needed()
            x, y = target.evaluate("e => { const p = e.getPointAtLength(e.getTotalLength() / 2), m = e.getScreenCTM();"
                                   " return [p.x * m.a + p.y * m.c + m.e, p.x * m.b + p.y * m.d + m.f]; }")
            self.page.mouse.move(x, y)
        else:
            target.hover()
        tip = self.page.locator(".jp-tip:visible").first  # each view (a notebook output) has its own
        assert tip.is_visible()
        return tip.inner_text(), float(tip.locator(".jp-value").first.inner_text())

    def finish(self, shot):
        self.page.screenshot(path=str(shot), full_page=True)
        assert self.errors == []
        self.page.close()


def open_file(browser, path):
    page = Page(browser)
    page.page.goto(Path(path).as_uri())
    return page


def view(folder, out):
    assert cli.main(["view", str(folder), "--out", str(out), "--attention-prompts", "3"]) == 0
    return out


SWEEP_SETTINGS = {"model": "toy", "task": "ioi", "n_prompts": 3, "seed": 0, "corruption": "str", "metric": "logit-diff",
                  "direction": "denoise", "window": 1}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Result folders of each kind, in jpatch's formats, with known values (no model run but the bulk one)."""
    root = tmp_path_factory.mktemp("results")
    rng = np.random.default_rng(0)
    n_pos = cli.load_task("ioi", 3, 0).clean_tokens.shape[1]
    save_result(root / "sweeps" / "resid", {"hook_resid_pre": rng.normal(size=(4, n_pos)).astype(np.float32)},
                {**SWEEP_SETTINGS, "site": "hook_resid_pre", "axes": ["layer", "pos"]})
    save_result(root / "sweeps" / "heads", {"attn.hook_z": rng.normal(size=(4, 8)).astype(np.float32)},
                {**SWEEP_SETTINGS, "site": "attn.hook_z", "axes": ["layer", "head"]})
    # A bulk run: 5 prompts in 3 shards of two lengths. The view is checked against the shard files, so
    # any model serves: a random 2-layer GPT-2 compiles in about 60% of the bundled 4-layer toy's time.
    import jpatch
    from jpatch.runs.bulk import bulk_sweep
    from test_bulk import examples, write_jsonl

    data = write_jsonl(root / "data.jsonl", examples(5))
    model = jpatch.GPT2.init(jpatch.GPT2Config(n_layer=2, n_head=2, d_model=32, d_mlp=64, n_ctx=64, d_vocab=50257),
                             key=jax.random.PRNGKey(0), std=0.1)
    bulk_sweep(model, data, "resid_pre", "str", "logit-diff", root / "bulk", shard_size=2, model_name="tiny",
               progress=False)
    circuit = root / "circuit"
    circuit.mkdir()
    edges = [{"writer": "embed", "reader": "a0.h1<q>", "score": 0.25}, {"writer": "a0.h1", "reader": "m1", "score": -0.5},
             {"writer": "m1", "reader": "logits", "score": 1.5}]
    (circuit / "circuit.json").write_text(json.dumps({"method": "acdc", "threshold": 0.01, "metric": "kl",
                                                      "edges": edges}))
    (circuit / "figures.json").write_text(json.dumps({"to_logits": rng.normal(size=(4, 8)).tolist(), "to_queries": None}))
    attribute = root / "attribute"
    exact = rng.normal(size=(4, 8)).astype(np.float32)
    estimate = (exact + 0.1 * rng.normal(size=(4, 8))).astype(np.float32)
    for name, a in (("estimate", estimate), ("exact", exact)):
        save_result(attribute / name, {"attn.hook_z": a}, {**SWEEP_SETTINGS, "site": "attn.hook_z", "axes": ["layer", "head"]})
    report = {"site": "attn.hook_z", "method": "atp", "direction": "denoise", "axes": ["layer", "head"],
              **agreement(estimate, exact, ("layer", "head"))}
    (attribute / "agreement.json").write_text(json.dumps(report))
    paper = root / "paper"
    paper.mkdir()
    np.savez(paper / "results.npz", ioi_heads_str_ld_denoise=exact, ioi_heads_z_atp=estimate)
    return root


def test_sweep_view_tooltip_reads_the_result_file(browser, folders, tmp_path):
    page = open_file(browser, view(folders / "sweeps", tmp_path / "sweeps.html"))
    values = np.load(folders / "sweeps" / "resid" / "result.npz")["hook_resid_pre"]
    text, shown = page.tooltip_after_hover('section[data-name="resid"] .jp-cell[data-r="2"][data-c="4"]')
    assert shown == pytest.approx(float(values[2, 4]), rel=1e-5, abs=1e-6)
    assert "layer 2" in text and "pos 4" in text
    # A position is labelled with its token where every prompt reaching it has the same one
    from jpatch.model.tokenizer import get_tokenizer

    task, decode = cli.load_task("ioi", 3, 0), get_tokenizer().decode
    expected = []
    for i in range(n_pos := values.shape[1]):
        seen = {decode([int(t[i])]) for t, n in zip(task.clean_tokens, task.lengths) if i < n}
        expected.append(seen.pop() if len(seen) == 1 else f"pos {i}")
    labels = page.page.locator('section[data-name="resid"] svg text').all_text_contents()
    shown = labels[4:4 + n_pos]  # after the four row labels
    assert shown == [t if len(t) <= 14 else t[:13] + "\u2026" for t in expected]
    assert any(not t.startswith("pos ") for t in shown)
    heads = np.load(folders / "sweeps" / "heads" / "result.npz")["attn.hook_z"]
    _, shown = page.tooltip_after_hover('section[data-name="heads"] .jp-cell[data-r="3"][data-c="7"]')
    assert shown == pytest.approx(float(heads[3, 7]), rel=1e-5, abs=1e-6)
    # Attention patterns of the task's prompts: causal probabilities (each row sums to 1 within 8-bit rounding).
    att = page.page.locator("section.jp-attention")
    assert att.count() == 1
    att.locator("select.jp-att-head").select_option("5")
    row = [c.get_attribute("data-v") for c in att.locator('.jp-cell[data-r="6"]').all()]
    probs = [float(v) for v in row if v != "n/a"]
    assert len(probs) == 7 and abs(sum(probs) - 1) < 7 * 0.5 / 255 + 1e-6
    page.finish(tmp_path / "sweeps.png")


def test_bulk_view_prompt_picker_shows_that_prompts_numbers(browser, folders, tmp_path):
    page = open_file(browser, view(folders / "bulk", tmp_path / "bulk.html"))
    per_prompt = {}
    for shard in sorted((folders / "bulk").glob("shard-*.npz")):
        with np.load(shard) as z:
            per_prompt.update({int(i): v for i, v in zip(z["index"], z["resid_pre"])})
    assert sorted(per_prompt) == list(range(5))
    grid = page.page.locator(".jp-prompt .jp-cell")
    for k in (3, 1):  # prompts of both lengths (their grids differ in where the NaN padding starts)
        page.page.select_option("select.jp-prompt", str(k))
        shown = np.array([np.nan if v == "n/a" else float(v) for v in (c.get_attribute("data-v") for c in grid.all())])
        np.testing.assert_allclose(shown, per_prompt[k].ravel(), rtol=1e-5, atol=1e-6)
    page.page.select_option("select.jp-prompt", "4")
    r, c = 1, 3
    _, value = page.tooltip_after_hover(f'.jp-prompt .jp-cell[data-r="{r}"][data-c="{c}"]')
    assert value == pytest.approx(float(per_prompt[4][r, c]), rel=1e-5, abs=1e-6)
    text, _ = page.tooltip_after_hover(f'.jp-mean .jp-cell[data-r="{r}"][data-c="{c}"]')
    spread = np.nanstd(np.stack([per_prompt[i][r, c] for i in range(5)]))  # over the prompts reaching it
    assert f"{float(text.split('spread over prompts (std) ')[1].split()[0]):.4g}" == f"{spread:.4g}"
    tokens = page.page.locator(".jp-tokens span").all_inner_texts()
    assert "".join(tokens) == json.loads((folders / "data.jsonl").read_text().splitlines()[4])["clean"]
    page.finish(tmp_path / "bulk.png")


def test_circuit_attribute_and_paper_views(browser, folders, tmp_path):
    page = open_file(browser, view(folders / "circuit", tmp_path / "circuit.html"))
    edges = json.loads((folders / "circuit" / "circuit.json").read_text())["edges"]
    paths = page.page.locator("path.jp-edge")
    assert paths.count() == len(edges)
    text, score = page.tooltip_after_hover('path.jp-edge[data-i="1"]')
    assert score == edges[1]["score"] and f"{edges[1]['writer']} \u2192 {edges[1]['reader']}" in text
    widths = [float(p.get_attribute("stroke-width")) for p in paths.all()]
    assert np.argmax(widths) == np.argmax([abs(e["score"]) for e in edges])
    page.finish(tmp_path / "circuit.png")

    page = open_file(browser, view(folders / "attribute", tmp_path / "attribute.html"))
    exact = np.load(folders / "attribute" / "exact" / "result.npz")["attn.hook_z"]
    estimate = np.load(folders / "attribute" / "estimate" / "result.npz")["attn.hook_z"]
    text, _ = page.tooltip_after_hover('circle.jp-pt[data-i="13"]')  # layer 1, head 5
    assert "layer 1, head 5" in text
    assert float(text.split("exact ")[1].split()[0]) == pytest.approx(float(exact[1, 5]), rel=1e-5)
    assert float(text.split("atp ")[1].split()[0]) == pytest.approx(float(estimate[1, 5]), rel=1e-5)
    page.finish(tmp_path / "attribute.png")

    page = open_file(browser, view(folders / "paper", tmp_path / "paper.html"))
    assert page.page.locator("section.jp-scatter").count() == 1 and page.page.locator("section.jp-heatmap").count() == 2
    page.finish(tmp_path / "paper.png")


def test_notebook_views_show_normalized_means_and_spreads(browser, tmp_path):
    raw = np.array([[[0.0, 1.0, 2.0]], [[1.0, 3.0, np.nan]]], np.float32)  # [prompt, layer, pos]
    clean, corrupted = np.array([2.0, 4.0], np.float32), np.array([0.0, 1.0], np.float32)
    result = SweepResult(np.zeros((1, 3), np.float32), raw=raw, clean_per_prompt=clean, corrupted_per_prompt=corrupted,
                         clean=3.0, corrupted=0.5, normalization="range", direction="denoise", axes=("layer", "pos"),
                         method="patching", per_prompt=False)
    html = result._repr_html_()
    assert repr(result) == repr(np.zeros((1, 3), np.float32)).replace("array", "SweepResult")  # repr unchanged
    page = Page(browser)
    page.page.set_content(f"<html><body>{html}</body></html>")
    text, value = page.tooltip_after_hover('.jp-mean .jp-cell[data-r="0"][data-c="1"]')
    # per_prompt=False shows the stored grid; the spread is over each prompt normalized by its own baselines
    assert value == 0.0
    each = [(1.0 - 0.0) / (2.0 - 0.0), (3.0 - 1.0) / (4.0 - 1.0)]
    assert float(text.split("spread over prompts (std) ")[1].split()[0]) == pytest.approx(np.std(each), rel=1e-5)
    page.page.select_option("select.jp-prompt", "1")
    _, value = page.tooltip_after_hover('.jp-prompt .jp-cell[data-r="0"][data-c="0"]')
    assert value == pytest.approx((1.0 - 1.0) / 3.0, abs=1e-7)
    page.finish(tmp_path / "sweep_result.png")
    page = open_file(browser, result.show(tokens=["The", " cat", " sat"]).save(tmp_path / "shown.html"))
    labels = page.page.locator(".jp-mean svg text").all_text_contents()
    assert labels[1:4] == ["The", " cat", " sat"]  # after the row label, the position axis' labels
    text, _ = page.tooltip_after_hover('.jp-mean .jp-cell[data-r="0"][data-c="2"]')
    assert 'pos 2 " sat"' in text
    page.finish(tmp_path / "shown.png")

    writers = ("embed", "a0.h0", "a0.h1", "m0")
    readers = ("a0.h0<q>", "a0.h1<q>", "m0", "logits")
    scores = np.array([[0.1, -0.2, 0.3, 0.4], [0, 0, 0.5, -0.6], [0, 0, 0.7, 0.8], [0, 0, 0, -0.9]], np.float32)
    valid = scores != 0
    edges = Edges(scores=scores, writers=writers, readers=readers, valid=valid, method="eap", direction="noise",
                  normalization="range", axes=("writer", "reader"))
    keep = np.zeros_like(valid)
    keep[3, 3] = keep[1, 2] = True
    circuit = Circuit(keep=keep, scores=scores, writers=writers, readers=readers, valid=valid, threshold=0.1,
                      metric="kl", baseline=1.0, n_forwards=3, n_calls=1, n_tested=3)
    report = AgreementReport(site="z", method="atp", direction="denoise", axes=["layer", "head"],
                             **agreement(scores[:2], scores[2:], ("layer", "head")))
    report.estimate, report.exact = scores[:2], scores[2:]
    assert repr(report) == repr(dict(report))
    page = Page(browser)
    page.page.set_content("<html><body>" + "".join(x._repr_html_() for x in (edges, circuit, report)) + "</body></html>")
    _, value = page.tooltip_after_hover('.jp-root >> nth=0 >> .jp-mean .jp-cell[data-r="2"][data-c="3"]')
    assert value == pytest.approx(0.8)
    _, value = page.tooltip_after_hover('.jp-root >> nth=1 >> path.jp-edge')
    assert value == pytest.approx(0.5) or value == pytest.approx(-0.9)
    assert page.page.locator(".jp-root >> nth=2 >> circle.jp-pt").count() == 8
    page.finish(tmp_path / "notebook.png")
