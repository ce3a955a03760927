"""Every saved result in a folder as the panels of one HTML view (`jpatch.files.html_view`).

Found anywhere under the folder (hidden folders, i.e. jpatch's temporaries, skipped): sweeps
(result.npz + settings.json: heatmaps), bulk runs (manifest.json + shards: the mean grid with a
prompt picker beside it), circuit reports (circuit.json, figures.json: the graph and the path-patching
grids), attribution comparisons (agreement.json beside estimate/ and exact/: a scatter plot), the
paper's report (results.npz + results.json). Token labels and attention patterns come from the
prompts the settings name (the command line's task, or a bulk run's dataset, checked against its
hash) and the model; when those cannot be had the view says why and labels positions by index.
A result that cannot be read (truncated, an older format) raises ValueError naming the file.
"""

import json
import warnings
from pathlib import Path

import numpy as np

from jpatch.files import html_view
from jpatch.runs import results

VIEW_FILES = (results.RESULT_FILE, results.MANIFEST_FILE, "circuit.json", "agreement.json", "results.npz")


def result_folders(folder):
    """The folders under `folder` (itself included) that hold a result, in path order."""
    found = []
    for path in sorted([Path(folder), *Path(folder).rglob("*")]):
        rel = path.relative_to(folder).parts
        if not path.is_dir() or path.is_symlink() or any(p.startswith(".") for p in rel):
            continue
        if any((path / name).is_file() for name in VIEW_FILES) or any(path.glob("shard-*.npz")):
            found.append(path)
    return found


def _read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {path}: {e}") from None


class Prompts:
    """Token strings and attention patterns of the prompts a result's settings name, built once per
    (model, prompts) and shared by the results of one folder."""

    def __init__(self, attention_prompts):
        self.attention_prompts = attention_prompts
        self.models, self.cache = {}, {}

    def model(self, name):
        import jpatch

        if name not in self.models:
            self.models[name] = jpatch.load(name)
        return self.models[name]

    def for_settings(self, settings, bulk):
        """(tokens [n][len] as strings, token ids [n][len], None) or (None, None, why not)."""
        key = json.dumps([settings.get(k) for k in ("task", "n_prompts", "seed", "dataset", "dataset_hash")])
        if key not in self.cache:
            try:
                self.cache[key] = (*self._ids(settings, bulk), None)
            except (ValueError, OSError, KeyError, SystemExit) as e:  # SystemExit: the command line's refusals
                self.cache[key] = (None, None, f"positions labelled by index: {e}")
        ids, why = self.cache[key][0], self.cache[key][1]
        if ids is None:
            return None, None, why
        from jpatch.data.tasks.wording import resolve

        tok = resolve(self.tokenizer(settings))
        return [tok.to_str_tokens(t) for t in ids], ids, None

    def tokenizer(self, settings):
        """The tokenizer of the result's model (None: GPT-2's, also when the model cannot be loaded,
        as the labels were before other families)."""
        from jpatch.data.tasks.wording import for_model

        try:
            return for_model(self.model(settings["model"]))[0]
        except (ValueError, OSError, KeyError):
            return None

    def _ids(self, settings, bulk):
        if bulk:
            from jpatch.data.dataset import read_dataset

            data = read_dataset(settings["dataset"], corruption=settings["corruption"], metric=settings["metric"],
                                tokenizer=self.tokenizer(settings))
            if data.content_hash != settings.get("dataset_hash"):
                raise ValueError(f"the dataset {settings['dataset']} changed since the run")
            return [np.asarray(ex.clean) for ex in data.examples], None
        if settings.get("task") is None or settings.get("n_prompts") is None:
            raise ValueError("the settings name no task")
        from jpatch.face.cli import load_task

        model = self.model(settings["model"]) if self.tokenizer(settings) is not None else None
        task = load_task(settings["task"], settings["n_prompts"], settings.get("seed", 0), model)
        return [np.asarray(t[:n]) for t, n in zip(task.clean_tokens, task.lengths)], None

    def attention(self, settings, ids, labels, tokens):
        """The attention panel of the first prompts, or a note why there is none."""
        n = min(len(ids), self.attention_prompts)
        if not n:
            return None
        try:
            model = self.model(settings["model"])
        except (ValueError, OSError, KeyError) as e:
            return html_view.table([], title="Attention patterns", note=f"not shown: model not loadable ({e})")
        T = max(len(t) for t in ids[:n])
        tokens_in, mask = np.zeros((n, T), np.int32), np.zeros((n, T), np.int32)
        for b, t in enumerate(ids[:n]):  # right-padded: a causal prompt never attends to its padding
            tokens_in[b, : len(t)], mask[b, : len(t)] = t, 1
        _, cache = model.run_with_cache(tokens_in, names_filter="pattern", attention_mask=mask)
        out = np.moveaxis(np.asarray(cache.stacked("pattern"), np.float32), 0, 1)  # [n, layer, head, dest, src]
        out = np.where(mask[:, None, None, :, None] * mask[:, None, None, None, :] > 0, out, 0)
        return html_view.attention(out, tokens[:n], labels[:n], title="Attention patterns",
                                   note=f"model {settings['model']}, the first {n} prompts (probabilities, 8-bit)")


def _centre(settings, clean):
    """White on the colour scale: the base run's value (0 denoising; the clean run's when noising)."""
    return float(clean) if settings.get("direction") == "noise" and clean is not None else 0.0


def _describe(settings):
    keys = ("model", "task", "dataset", "site", "corruption", "metric", "direction", "window", "n_prompts", "method")
    return ", ".join(f"{k} {settings[k]}" for k in keys if settings.get(k) is not None)


def sweep_panels(path, name, prompts):
    result = results.load_result(path)
    settings = result.settings
    site = result.only()
    axes = result.axes(site)
    if axes is None:
        raise ValueError(f"{path / results.SETTINGS_FILE}: a result of an older format (no axes for {site}, jpatch "
                         f"{settings.get('jpatch_version', 'before 0.2')}); rerun the command that made it")
    tokens, ids, why = prompts.for_settings(settings, bulk=False)
    pos = [a for a in axes if a in html_view.POSITION_AXES]
    n_pos = result[site].shape[axes.index(pos[0])] if pos else 0
    labels = None if tokens is None or not pos else html_view.position_labels(tokens, n_pos)
    why = why if pos else None  # no position axis to label
    hover = None if labels is None else {pos[0]: html_view.position_variants(tokens, len(labels))}
    panel = html_view.heatmap(result[site], axes, name=name, title=f"{name}: {site}", tokens=labels, hover=hover,
                              note=_describe(settings) + (f"; {why}" if why else ""), unit=settings.get("metric", ""),
                              centre=_centre(settings, settings.get("clean")))
    extra = []
    if ids is not None:
        extra = [("attention", settings, ids, tokens, [f"prompt {i}: {''.join(t)}" for i, t in enumerate(tokens)])]
    return [panel], extra


def bulk_panels(path, name, prompts):
    result = results.load_result(path)
    settings, n = result.settings, result.n_prompts
    tokens, ids, why = prompts.for_settings(settings, bulk=True)
    labels = [f"#{i}" + ("" if tokens is None else f": {''.join(tokens[i])[:70]}") for i in range(n)]
    panels = []
    for site in result.sites:
        axes = result.axes(site)[1:]
        with warnings.catch_warnings():  # unstable per-prompt values are the spread's business here
            warnings.simplefilter("ignore")
            mean, spread, count = result.mean(site), result.std(site), result.count(site)
        pos = [a for a in axes if a in html_view.POSITION_AXES]
        n_pos = mean.shape[axes.index(pos[0])] if pos else 0
        common = None if tokens is None or not pos else html_view.position_labels(tokens, n_pos)
        clean = result.clean_value(site)
        panels.append(html_view.heatmap(
            mean, axes, name=f"{name}/{site}" if name else site, title=f"{name}: bulk {site}, {n} prompts",
            hover=None if common is None else {pos[0]: html_view.position_variants(tokens, len(common))},
            note=_describe(settings) + (f"; {why}" if why else "") + "; left: the normalized mean over prompts "
            "(hover: spread), right: the chosen prompt normalized by its own baselines", tokens=common, spread=spread,
            count=count, unit=settings.get("metric", ""), prompts=result[site], prompt_labels=labels,
            prompt_tokens=tokens, grid_title="mean over prompts",
            centre=_centre(settings, None if clean is None else np.nanmean(clean))))
    extra = [] if ids is None else [("attention", settings, ids, tokens, labels)]
    return panels, extra


def circuit_panels(path, name):
    data = _read_json(path / "circuit.json")
    figures = _read_json(path / "figures.json") if (path / "figures.json").is_file() else {}
    grids = {k: np.asarray(v, np.float32) for k, v in figures.items() if k.startswith("to_") and v is not None}
    try:
        edges = [(e["writer"], e["reader"], e["score"]) for e in data["edges"]]
        named = [int(w[1:].split(".")[0]) for e in edges for w in e[:2] if w[0] in "am"]
        n_layer, n_head = next(iter(grids.values())).shape if grids else (max(named, default=0) + 1, max(
            (int(w.split(".h")[1].split("<")[0]) for e in edges for w in e[:2] if ".h" in w), default=0) + 1)
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise ValueError(f"{path / 'circuit.json'}: not a circuit of this jpatch ({type(e).__name__}: {e})") from None
    panels = [html_view.circuit(n_layer, n_head, edges, name=name,
                                score_name=f"{data.get('metric')} increase when removed",
                                title=f"{name}: ACDC circuit, {len(edges)} edges, threshold "
                                      f"{data.get('threshold')}")]
    for key, grid in grids.items():
        panels.append(html_view.heatmap(grid, ("layer", "head"), name=f"{name}/{key}", centre=1.0,
                                        title=f"path patching: heads -> {key.removeprefix('to_')}",
                                        note="noising; 1 = unpatched, far from 1 = the head matters"))
    return panels


def agreement_panels(path, name):
    report = _read_json(path / "agreement.json")
    estimate, exact = (results.load_result(path / part) for part in ("estimate", "exact"))
    try:
        return html_view.agreement_panels(report, estimate[estimate.only()], exact[exact.only()])
    except (KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{path / 'agreement.json'}: not an agreement report of this jpatch ({type(e).__name__}: "
                         f"{e})") from None


def paper_panels(path, name):
    try:
        with np.load(path / "results.npz", allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as e:
        raise ValueError(f"cannot read {path / 'results.npz'}: {type(e).__name__}: {e}") from None
    panels = []
    for key, a in arrays.items():
        heads = "heads" in key and a.ndim == 2
        if a.ndim in (1, 2):
            panels.append(html_view.heatmap(a, ("layer", "head") if heads else None, name=f"{name}/{key}", title=key))
    for site in ("z", "q", "k"):
        exact = arrays.get("ioi_heads_str_ld_denoise" if site == "z" else f"ioi_heads_{site}_str_ld_denoise")
        for method in ("atp", "atp-qk", "atp*"):
            est = arrays.get(f"ioi_heads_{site}_{method}")
            if est is not None and exact is not None:
                target = np.abs(exact) if method == "atp*" else exact  # AtP* gives sizes
                panels.append(html_view.scatter(target, est, ("layer", "head"), title=f"{site}: {method} vs exact",
                                                xlabel="|exact|" if method == "atp*" else "exact", ylabel=method))
    return panels


def folder_view(folder, *, attention_prompts=8, name=None):
    """The panels of every result under `folder`, attention patterns last (one panel per set of
    prompts); `name`: the folder's own results' label (default: its name; --html builds the folder
    under a temporary name). Raises FileNotFoundError for a folder without results, ValueError for
    an unreadable one."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no folder {folder}")
    found = result_folders(folder)
    if not found:
        raise FileNotFoundError(f"{folder} holds no jpatch result (no {', '.join(VIEW_FILES)} or bulk shard in it "
                                "or its subfolders)")
    prompts, panels, extras, name_of_root = Prompts(attention_prompts), [], {}, name
    for path in found:
        name = (name_of_root or folder.resolve().name) if path == folder else path.relative_to(folder).as_posix()
        more = []
        if (path / results.MANIFEST_FILE).is_file() or any(path.glob("shard-*.npz")):
            got, more = bulk_panels(path, name, prompts)
            panels += got
        elif (path / results.RESULT_FILE).is_file():
            got, more = sweep_panels(path, name, prompts)
            panels += got
        if (path / "circuit.json").is_file():
            panels += circuit_panels(path, name)
        if (path / "agreement.json").is_file():
            panels += agreement_panels(path, name)
        if (path / "results.npz").is_file():
            panels += paper_panels(path, name)
        for _, settings, ids, tokens, labels in more:
            key = json.dumps([settings.get(k) for k in ("model", "task", "n_prompts", "seed", "dataset")])
            extras.setdefault(key, (settings, ids, tokens, labels))
    for settings, ids, tokens, labels in extras.values():
        panel = prompts.attention(settings, ids, labels, tokens)
        panels += [panel] if panel is not None else []
    return panels
