"""Rerun the comparisons of Zhang & Nanda (ICLR 2024) on a model and write a report.

    report = run_paper(jpatch.load("toy"), "results/paper-toy", model_name="toy")

writes `results/paper-toy/report.md` with figures (PNG) beside it, and the raw
sweep results (`results.npz`) and the numbers quoted in the report
(`results.json`). Six sections, each giving its setting and what the paper found:

1. Gaussian noise (GN) vs symmetric token replacement (STR) on IOI attention heads;
2. GN vs STR on factual-recall MLPs at the last subject token;
3. probability vs logit difference vs KL divergence on IOI heads;
4. sliding window 1 vs 5 on factual-recall MLPs;
5. denoising vs noising on IOI (heads and the residual stream);
6. attribution patching (AtP, AtP*) vs exact patching on IOI heads (Kramar et al. 2024).

Every sweep is one `jpatch.sweep` call. The report is written into a temporary
folder beside `out_dir` and renamed at the end: a run that fails leaves no
half-written folder. `add_arguments` / `main` are the command line
(`scripts/reproduce_paper.py`, `jpatch paper`).
"""

import datetime
import json
import math
import re
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import jpatch
from jpatch.methods import corrupt
from jpatch.files.atomic import atomic_dir, check_target, to_json
from jpatch.face.report_parts import ReportRun, fmt, md_table
from jpatch.face.report_sections import SECTIONS

REPORT = "report.md"

RECOMMENDATIONS = (
    "Prefer symmetric token replacement (STR) over Gaussian noise (GN) as the corruption: GN puts the model "
    "off-distribution, and its localization differs from STR's and is brittle to the noise scale.",
    "Use the (normalized) logit difference as the metric: probability hides negative components; "
    "use KL divergence when there is no single contrast token.",
    "Be careful with sliding windows: they exaggerate and smear peaks. Report window 1, or check that w > 1 agrees.",
    "Vary the corrupted tokens and prompts; report the spread over prompts, not one prompt.",
    "Denoising (finds sufficient components) and noising (finds necessary components) answer different "
    "questions: say which one is used.",
)

# Wang et al. (2022)'s IOI circuit in GPT-2 small (12 layers x 12 heads), (layer, head) -> class.
SECTION_TITLES = {
    "corruption_ioi": "1. Corruption: Gaussian noise vs symmetric token replacement (IOI attention heads)",
    "corruption_factual": "2. Corruption: Gaussian noise vs symmetric token replacement (factual-recall MLPs)",
    "metrics": "3. Metrics: probability vs logit difference vs KL divergence (IOI attention heads)",
    "window": "4. Sliding window: 1 vs 5 layers (factual-recall MLPs)",
    "direction": "5. Direction: denoising vs noising (IOI)",
    "attribution": "6. Attribution patching: AtP and AtP* vs exact patching (IOI attention heads)",
}


# --- the report -------------------------------------------------------------------------------


def _header(run, total):
    model, s = run.model, run.settings
    cfg = model.config
    tasks, _ = run.cache.get("factual", ([], None))
    settings = [
        ["IOI prompts", f"{s['n_prompts']} (names split {s['ioi_split']!r}, seed {s['seed']})"],
        ["factual prompts", f"{sum(len(t) for t in tasks)} of the requested {s['n_factual']}, in buckets "
                            + ", ".join(f"{t.name} ({len(t)})" for t in tasks)],
        ["Gaussian noise", f"{s['noise_samples']} samples, nu = {s['noise_scale']:g} x embedding std, seed "
                           f"{s['noise_seed']}; IOI nu = {fmt(run.numbers.get('ioi_nu', float('nan')))}, factual "
                           f"nu = {fmt(run.numbers.get('factual_nu', float('nan')))}"],
        ["top k", s["top_k"]],
        ["sliding window", f"1 vs {s['window']}"],
        ["'clearly negative'", f"normalized value < -{s['negative_threshold']:g}"],
    ]
    timings = [[SECTION_TITLES[key], fmt(sec, 1)] for key, sec in run.timings.items()] + [["total", fmt(total, 1)]]
    return [
        f"# Activation patching best practices on {run.name}",
        "",
        "Zhang & Nanda, *Towards Best Practices of Activation Patching in Language Models: Metrics and Methods* "
        "(ICLR 2024), rerun with jpatch.",
        "",
        md_table(["", ""], [
            ["model", f"{run.name} ({cfg.n_layer} layers, {cfg.n_head} heads, d_model {cfg.d_model}, "
                      f"vocabulary {cfg.d_vocab}, {jnp.dtype(model.dtype).name})"],
            ["jpatch", jpatch.__version__],
            ["date", run.settings["date"]],
            ["device", f"{jax.devices()[0].platform} x {len(jax.devices())}"],
        ]),
        "",
        "## Settings",
        "",
        md_table(["setting", "value"], settings),
        "",
        "## Runtime (seconds; a sweep reused by a later section counts in the first)",
        "",
        md_table(["section", "seconds"], timings),
        "",
        "## The paper's recommendations",
        "",
        *[f"{i}. {r}" for i, r in enumerate(RECOMMENDATIONS, 1)],
        "",
        "Raw results: `results.npz` (every sweep result, e.g. `ioi_heads_str_ld_denoise` [layer, head], "
        "`factual_mlp_gn_w1` [layer]; one factual bucket's under `<key>/<bucket>`); the numbers quoted here: "
        "`results.json`.",
        "",
    ]


def _check_settings(*, noise_scale, ioi_split, **counts):
    """Refuse settings that would fail or shrink the report minutes into the run."""
    for name, value in counts.items():
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if not isinstance(noise_scale, (int, float, np.number)) or not math.isfinite(noise_scale) or noise_scale <= 0:
        raise ValueError(f"noise_scale must be a finite number > 0, got {noise_scale!r}")
    if ioi_split not in ("all", "train", "test"):
        raise ValueError(f"unknown ioi_split {ioi_split!r}; valid: all, train, test")


def run_paper(model, out_dir, *, model_name="model", n_prompts=64, n_factual=None, noise_samples=10,
              noise_scale=3.0, window=5, top_k=None, negative_threshold=0.02, ioi_split="test", seed=0,
              noise_seed=corrupt.NOISE_SEED, min_bucket=8, overwrite=False, progress=True, html=False):
    """Rerun the paper's five comparisons on `model` and write `out_dir/report.md`.

    n_prompts: IOI prompts; n_factual: factual-recall prompts (default 2 x n_prompts),
      taken from the largest (token length, subject length) buckets (`choose_factual`);
      every bucket is swept separately and per-layer results are averaged weighted by
      prompt count.
    noise_samples, noise_scale, noise_seed: Gaussian noise (ROME: 10 samples, 3 x std, seed 1).
    window: the sliding window compared with window 1 (section 4).
    top_k: heads compared between localizations (default: 5% of the heads, 3..10).
    negative_threshold: a normalized effect below -threshold counts as clearly negative.
    ioi_split: IOI names ("all", "train", "test": the held-out names a toy model never saw).
    overwrite: replace a non-empty out_dir (refused otherwise, before any work).
    html: also write report.html, the interactive view of the results (`jpatch.face.view_cli`).
    Returns the path of report.md. Nothing is left at out_dir if a section raises.
    """
    model.check_gpt2_ids("the paper's tasks")
    _check_settings(n_prompts=n_prompts, n_factual=n_factual, noise_samples=noise_samples, window=window,
                    top_k=top_k, min_bucket=min_bucket, noise_scale=noise_scale, ioi_split=ioi_split)
    check_target(out_dir, overwrite, kind="paper")
    n_heads = model.config.n_layer * model.config.n_head
    settings = {
        "n_prompts": int(n_prompts), "n_factual": int(n_factual if n_factual is not None else 2 * n_prompts),
        "noise_samples": int(noise_samples), "noise_scale": float(noise_scale), "window": int(window),
        "top_k": int(top_k if top_k is not None else min(10, max(3, round(0.05 * n_heads)), n_heads)),
        "negative_threshold": float(negative_threshold), "ioi_split": ioi_split, "seed": int(seed),
        "noise_seed": int(noise_seed), "min_bucket": int(min_bucket),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    start = time.perf_counter()
    with atomic_dir(out_dir, overwrite, kind="paper") as tmp:
        run = ReportRun(model, model_name, Path(tmp), settings, progress)
        body = []
        for key, section in SECTIONS:
            run.log(SECTION_TITLES[key])
            t0 = time.perf_counter()
            lines = section(run)
            run.timings[key] = time.perf_counter() - t0
            body += [f"## {SECTION_TITLES[key]}", "", *lines, ""]
        total = time.perf_counter() - start
        run.numbers["timings"] = {**run.timings, "total": total}
        run.numbers["settings"] = settings
        (run.out / REPORT).write_text("\n".join(_header(run, total) + body), encoding="utf-8")
        (run.out / "results.json").write_text(json.dumps(to_json(run.numbers, str_keys=True), indent=1), encoding="utf-8")
        np.savez(run.out / "results.npz", **run.arrays)
        if html:
            from jpatch.face.view_cli import REPORT_HTML, write_view

            write_view(run.out, run.out / REPORT_HTML, title=f"jpatch paper: {model_name}", name=Path(out_dir).name)
    return str(Path(out_dir).absolute() / REPORT)


# --- command line ------------------------------------------------------------------------


def add_arguments(parser):
    """The options of `jpatch paper` / scripts/reproduce_paper.py."""
    parser.add_argument("--model", default="toy", help="model folder or name under weights/ (default: toy)")
    parser.add_argument("--out", required=True, help="output folder for report.md and its figures")
    parser.add_argument("--n-prompts", type=int, default=64, help="IOI prompts (default 64)")
    parser.add_argument("--n-factual", type=int, default=None,
                        help="factual-recall prompts (default 2 x --n-prompts; the largest length buckets first)")
    parser.add_argument("--noise-samples", type=int, default=10, help="Gaussian-noise samples per prompt (default 10)")
    parser.add_argument("--noise-scale", type=float, default=3.0, help="nu = scale x embedding std (default 3)")
    parser.add_argument("--window", type=int, default=5, help="sliding window compared with window 1 (default 5)")
    parser.add_argument("--ioi-split", choices=("all", "train", "test"), default="test",
                        help="IOI name split (default test: names a toy model never saw)")
    parser.add_argument("--seed", type=int, default=0, help="IOI prompt seed (default 0)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    from jpatch.face.view_cli import add_html_flag

    add_html_flag(parser)
    return parser


def main(args):
    """Run `run_paper` from parsed `add_arguments` options; prints the report's path. Returns an exit code."""
    try:
        _check_settings(n_prompts=args.n_prompts, n_factual=args.n_factual, noise_samples=args.noise_samples,
                        window=args.window, noise_scale=args.noise_scale, ioi_split=args.ioi_split)
        check_target(args.out, args.overwrite, kind="paper")
        model = jpatch.load(args.model)
        name = Path(str(args.model)).name
        path = run_paper(model, args.out, model_name=name, n_prompts=args.n_prompts, n_factual=args.n_factual,
                         noise_samples=args.noise_samples, noise_scale=args.noise_scale, window=args.window,
                         ioi_split=args.ioi_split, seed=args.seed, overwrite=args.overwrite,
                         progress=not args.quiet, html=getattr(args, "html", False))
    except (OSError, ValueError) as e:
        from jpatch.face.cli import cli_message

        message = cli_message(e)
        message = re.sub(r"\b(n_prompts|n_factual|noise_samples|noise_scale|window|ioi_split)\b",
                         lambda m: "--" + m.group(1).replace("_", "-"), message, count=1)
        print(f"jpatch paper: {message}", file=sys.stderr)
        return 2
    print(path)
    return 0
