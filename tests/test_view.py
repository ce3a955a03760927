"""`jpatch view` and `--html` without a browser: what is refused (one line each, nothing written),
which files it may replace, that the file is self-contained, and its size (tests/test_view_browser.py
checks what the views show)."""

import json
import re
import zipfile

import numpy as np
import pytest

from jpatch.face import cli
from jpatch.files import html_view
from jpatch.runs.results import save_result

SETTINGS = {"model": "no-such-model", "task": "ioi", "n_prompts": 2, "seed": 0, "direction": "denoise",
            "site": "attn.hook_z", "axes": ["layer", "head"]}


def sweep_folder(path, values=None, settings=SETTINGS):
    values = np.arange(12, dtype=np.float32).reshape(3, 4) / 10 if values is None else values
    return save_result(path, {"attn.hook_z": values}, settings)


def refused(capsys, *argv):
    """Run `jpatch` expecting a refusal: returns its one stderr line."""
    with pytest.raises(SystemExit) as e:
        cli.main(list(argv))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("jpatch view: "), err
    return err


def nothing_written(folder):
    """No report and no temporary beside where it would have gone."""
    return sorted(p.name for p in folder.iterdir()) == []


def test_view_writes_one_self_contained_file(tmp_path, capsys):
    sweep_folder(tmp_path / "res" / "a")
    out = tmp_path / "out" / "report.html"
    assert cli.main(["view", str(tmp_path / "res"), "--out", str(out), "--attention-prompts", "0"]) == 0
    text = out.read_text()
    # Offline: no script, style, image or link is fetched; the only URL is SVG's namespace name.
    assert set(re.findall(r"https?://[^\s\"')]+", text)) == {"http://www.w3.org/2000/svg"}
    assert not re.search(r"<(script|img|link|iframe)[^>]*\s(src|href)=\"(?!data:)", text)
    assert html_view.is_view_file(out)
    data = json.loads(re.search(r'class="jp-data">(.*?)</script>', text).group(1))
    (panel,) = data["panels"]
    stored = np.frombuffer(__import__("base64").b64decode(panel["values"]["b64"]), "<f4").reshape(panel["values"]["shape"])
    np.testing.assert_array_equal(stored, np.arange(12, dtype=np.float32).reshape(3, 4) / 10)
    # The model named in the settings cannot be loaded: said in the page, positions need no tokens here.
    assert panel["axes"] == ["layer", "head"]


def test_out_rules(tmp_path, capsys):
    res = sweep_folder(tmp_path / "res")
    assert "inside" in refused(capsys, "view", str(res), "--out", str(res / "report.html"))
    assert ".html" in refused(capsys, "view", str(res), "--out", str(tmp_path / "report.txt"))
    mine = tmp_path / "notes.html"
    mine.write_text("<html>my notes</html>")
    assert "not a view jpatch wrote" in refused(capsys, "view", str(res), "--out", str(mine), "--overwrite")
    assert mine.read_text() == "<html>my notes</html>"
    out = tmp_path / "view.html"
    assert cli.main(["view", str(res), "--out", str(out), "--attention-prompts", "0"]) == 0
    assert "--overwrite" in refused(capsys, "view", str(res), "--out", str(out))
    assert cli.main(["view", str(res), "--out", str(out), "--overwrite", "--attention-prompts", "0"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.html", "res", "view.html"]


def test_bad_inputs_one_line_each_and_no_file(tmp_path, capsys):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = str(out_dir / "r.html")
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    assert "holds no jpatch result" in refused(capsys, "view", str(empty), "--out", out)
    assert "no folder" in refused(capsys, "view", str(tmp_path / "absent"), "--out", out)

    old = sweep_folder(tmp_path / "old")  # an older sweep: settings without the axes of its array
    settings = json.loads((old / "settings.json").read_text())
    del settings["axes"]
    (old / "settings.json").write_text(json.dumps({**settings, "jpatch_version": "0.1.0"}))
    assert "older format" in refused(capsys, "view", str(old), "--out", out)

    old_bulk = tmp_path / "old_bulk"
    old_bulk.mkdir()
    (old_bulk / "manifest.json").write_text(json.dumps({"format": "jpatch-bulk", "format_version": 1}))
    assert "format version 1" in refused(capsys, "view", str(old_bulk), "--out", out)

    cut = sweep_folder(tmp_path / "cut")
    data = (cut / "result.npz").read_bytes()
    (cut / "result.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(zipfile.BadZipFile):  # really truncated
        zipfile.ZipFile(cut / "result.npz")
    assert "cannot read result" in refused(capsys, "view", str(cut), "--out", out)

    cut_json = sweep_folder(tmp_path / "cut_json")
    text = (cut_json / "settings.json").read_text()
    (cut_json / "settings.json").write_text(text[: len(text) // 2])
    assert "settings.json" in refused(capsys, "view", str(cut_json), "--out", out)

    circuit = tmp_path / "circuit"
    circuit.mkdir()
    (circuit / "circuit.json").write_text('{"method": "acdc", "edges": [{"writer": "emb')
    assert "circuit.json" in refused(capsys, "view", str(circuit), "--out", out)

    attribute = tmp_path / "attribute"
    for part in ("estimate", "exact"):
        sweep_folder(attribute / part)
    (attribute / "agreement.json").write_text(json.dumps({"site": "z", "pearson": 0.5}))
    assert "agreement.json" in refused(capsys, "view", str(attribute), "--out", out)
    assert nothing_written(out_dir)


def test_html_flag_writes_the_view_inside_the_output(tmp_path, capsys):
    """`jpatch sweep --html`: report.html inside the folder, listed by its marker (so --overwrite replaces it)."""
    out = tmp_path / "sweep"
    args = ["sweep", "--model", "toy", "--n-prompts", "2", "--site", "attn_out", "--axes", "layer", "--out", str(out),
            "--html"]
    assert cli.main(args) is None
    marker = json.loads((out / ".jpatch-output.json").read_text())
    assert "report.html" in marker["files"] and html_view.is_view_file(out / "report.html")
    text = (out / "report.html").read_text()
    values = np.load(out / "result.npz")["hook_attn_out"]
    data = json.loads(re.search(r'class="jp-data">(.*?)</script>', text).group(1))
    heat = next(p for p in data["panels"] if p["kind"] == "heatmap")
    stored = np.frombuffer(__import__("base64").b64decode(heat["values"]["b64"]), "<f4")
    np.testing.assert_array_equal(stored, values.ravel())
    assert any(p["kind"] == "attention" for p in data["panels"])  # the toy model and IOI prompts were found
    assert cli.main(args + ["--overwrite"]) is None


def test_bulk_report_size_scales_to_1000_prompts_under_20_mb(tmp_path):
    """The page's size is linear in the prompts (a grid and the tokens per prompt): measured on a
    synthetic 1,000-prompt bulk panel of GPT-2 small's grid (12 layers x 20 positions)."""
    n, grid = 1000, (12, 20)
    rng = np.random.default_rng(0)
    values = rng.normal(size=(n, *grid)).astype(np.float32)
    tokens = [[f" tok{i}" for i in range(20)] for _ in range(n)]
    panel = html_view.heatmap(values.mean(0), ("layer", "pos"), spread=values.std(0), count=np.full(grid, n),
                              prompts=values, prompt_labels=[f"#{i}: " + "".join(t)[:70] for i, t in enumerate(tokens)],
                              prompt_tokens=tokens)
    att = html_view.attention(rng.random((8, 12, 12, 20, 20)), tokens[:8], [str(i) for i in range(8)])
    size = len(html_view.page([panel, att], "size").encode())
    assert size < 20e6, size


@pytest.mark.parametrize("command", ["view", "demo", "sweep", "paper", "circuit", "bulk"])
def test_help_lists_view_and_html(command, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert ("--out" in out and "--attention-prompts" in out) if command == "view" else "--html" in out
