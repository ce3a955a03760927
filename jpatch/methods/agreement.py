"""How far to trust an attribution estimate: compare it with the exact sweep.

`agreement(estimate, exact, axes)` gives Pearson and Spearman correlation, top-k
recall (k = 10 and 5% of the components), sign agreement and the largest misses;
`compare_exact(...)` runs `attribute` and `sweep` on the same inputs and adds, as an
option, AtP*'s false-negative diagnostic: exact patching of random subsets of the
components outside the estimate's top set, all of a subset at once, to bound the size
of any effect the estimate missed. `jpatch attribute ... --compare-exact` is the
command-line form (this module's `add_arguments` / `main`).
"""

import dataclasses
import json
from pathlib import Path

import numpy as np

from jpatch.engine.inputs import as_run, batch_mask
from jpatch.engine.readout import prepare_metric
from jpatch.engine.sweep import default_axes, sweep

SIGN_FLOOR = 0.01  # components with |exact| below this fraction of the largest do not count for signs


def _pearson(a, b):
    a, b = a - a.mean(), b - b.mean()
    denom = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denom) if denom > 0 else float("nan")


def top_k_recall(estimate, exact, k):
    """The fraction of the k largest-|exact| components among the k largest-|estimate| ones."""
    from jpatch.face.report import top_k

    k = min(int(k), np.size(exact))
    return len(set(top_k(exact, k)) & set(top_k(estimate, k))) / k if k else float("nan")


def agreement(estimate, exact, axes, *, misses=5):
    """Agreement between an estimate and the exact result of the same sweep (same shape)."""
    from jpatch.face.report import spearman

    estimate, exact = np.asarray(estimate, np.float64), np.asarray(exact, np.float64)
    if estimate.shape != exact.shape:
        raise ValueError(f"estimate {estimate.shape} and exact {exact.shape} must have the same shape")
    finite = np.isfinite(estimate) & np.isfinite(exact)  # NaN: positions past a prompt's end
    e, x = estimate[finite], exact[finite]
    n = len(x)
    big = np.abs(x) >= SIGN_FLOOR * np.abs(x).max() if n else np.zeros(0, bool)
    coords = np.argwhere(finite)
    worst = np.argsort(-np.abs(e - x), kind="stable")[:misses]
    k5 = max(1, round(0.05 * n))
    return {
        "components": n,
        "pearson": _pearson(e, x),
        "spearman": spearman(e, x),
        "top_k_recall": {str(k): top_k_recall(e, x, k) for k in sorted({10, k5})},
        "sign_agreement": float((np.sign(e[big]) == np.sign(x[big])).mean()) if big.any() else float("nan"),
        "largest_misses": [{**{a: int(c) for a, c in zip(axes, coords[i])}, "estimate": float(e[i]),
                            "exact": float(x[i])} for i in worst],
    }


def scatter(estimate, exact, *, title=None, label="metric"):
    """Estimate against exact, one point per component, with the line y = x."""
    import matplotlib.pyplot as plt

    estimate, exact = np.ravel(estimate), np.ravel(exact)
    finite = np.isfinite(estimate) & np.isfinite(exact)
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.scatter(exact[finite], estimate[finite], s=8, alpha=0.6)
    lo = float(min(exact[finite].min(), estimate[finite].min()))
    hi = float(max(exact[finite].max(), estimate[finite].max()))
    ax.plot([lo, hi], [lo, hi], color="grey", lw=1, ls="--")
    ax.set_xlabel(f"exact patching ({label})")
    ax.set_ylabel(f"attribution estimate ({label})")
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def subset_effects(model, clean, corrupted, site, metric, axes, chosen, *, direction="denoise",
                   attention_mask=None):
    """Exact effect (normalized as `sweep`) of patching every component in each subset at once.

    chosen: a list of boolean arrays over the sweep's grid (its shape over `axes`)."""
    import jax.numpy as jnp

    from jpatch.methods import attribution

    from jpatch.model import sites
    from jpatch.model.gpt2 import Override

    site = sites.canonical(site)
    clean, corrupted = as_run(clean, "clean"), as_run(corrupted, "corrupted")
    if corrupted.samples != 1:
        raise ValueError("the subset diagnostic takes runs of a single sample")
    base, source = (corrupted, clean) if direction == "denoise" else (clean, corrupted)
    attribution._check_base(base)
    N, T = clean.tokens.shape
    mask = batch_mask(attention_mask, clean, corrupted, pad_id=model.config.d_vocab - 1)
    metric = prepare_metric(metric, model.config.d_vocab, N, T, mask)
    data, read = metric.batch_data(N), metric.read_positions(N, T)
    run = lambda r, overrides=None: model(r.tokens, overrides={**r.overrides, **(overrides or {})},
                                          attention_mask=mask, logits_at=read)
    clean_logits = run(clean)
    score = lambda r, overrides=None: np.asarray(metric.score(run(r, overrides), clean_logits, data))
    clean_score, corrupted_score = score(clean), score(corrupted)
    _, cache = model.run_with_cache(source.tokens, overrides=source.overrides, attention_mask=mask)
    value = cache.stacked(site)
    names = attribution._DIMS[site]  # the activation's layout, with "row" for prompts
    base_score = score(base)
    if base_score.ndim:  # per-prompt scores: the sweep's mean over prompts
        base_score, clean_score, corrupted_score = base_score.mean(), clean_score.mean(), corrupted_score.mean()
    unpatched = metric.compare(base_score, clean_score, corrupted_score)
    effects = []
    for grid_mask in chosen:
        select = np.zeros([value.shape[i] if n != "row" else 1 for i, n in enumerate(names)], bool)
        for index in np.argwhere(grid_mask):
            at = dict(zip(axes, index))
            select[tuple(at.get(n, slice(None)) if n != "row" else 0 for n in names)] = True
        if site != "attn.hook_pattern":
            select = select[..., None]  # the feature axis
        raw = np.mean(score(base, {site: Override(value, jnp.asarray(select))}))
        effects.append(float(metric.compare(raw, clean_score, corrupted_score) - unpatched))
    return np.array(effects)


def compare_exact(model, clean, corrupted, site, metric, *, method="atp", direction="denoise", axes=None,
                  diagnostic=0, top=None, seed=0, attention_mask=None):
    """Run `attribute` and the exact `sweep`; their agreement, and with diagnostic=K the exact
    effect of K random subsets (a tenth of the rest each) of the components outside the
    estimate's top set (default: 5% of the components). Returns (estimate, exact, report)."""
    from jpatch.methods import attribution
    axes = tuple(axes or default_axes(site))
    estimate = attribution.attribute(model, clean, corrupted, site, metric, method=method, direction=direction,
                                     axes=axes, attention_mask=attention_mask)
    exact = sweep(model, clean, corrupted, site, metric, direction=direction, axes=axes, progress=False,
                           attention_mask=attention_mask)
    report = {"site": site, "method": method, "direction": direction, "axes": list(axes),
              **agreement(estimate, exact, axes)}
    if diagnostic:
        n = estimate.size
        top = top or max(1, round(0.05 * n))
        rest = np.argsort(-np.abs(np.nan_to_num(estimate)).ravel(), kind="stable")[top:]
        rng = np.random.default_rng(seed)
        size = max(1, len(rest) // 10)
        chosen = []
        for _ in range(int(diagnostic)):
            grid = np.zeros(n, bool)
            grid[rng.choice(rest, size, replace=False)] = True
            chosen.append(grid.reshape(estimate.shape))
        effects = subset_effects(model, clean, corrupted, site, metric, axes, chosen, direction=direction,
                                 attention_mask=attention_mask)
        report["diagnostic"] = {"outside_top": top, "subsets": int(diagnostic), "subset_size": size,
                                "max_abs_effect": float(np.abs(effects).max()), "effects": effects.tolist()}
    return estimate, exact, report


def format_report(report):
    lines = [f"{report['site']} over {' x '.join(report['axes'])}, {report['method']} vs exact "
             f"({report['components']} components, {report['direction']}):",
             f"  Pearson {report['pearson']:.3f}, Spearman {report['spearman']:.3f}, "
             f"sign agreement {report['sign_agreement']:.0%} (|exact| >= {SIGN_FLOOR:.0%} of the largest)",
             "  top-k recall: " + ", ".join(f"k={k}: {v:.0%}" for k, v in report["top_k_recall"].items()),
             "  largest misses:"]
    for miss in report["largest_misses"]:
        where = ", ".join(f"{a} {miss[a]}" for a in report["axes"])
        lines.append(f"    {where:<28} estimate {miss['estimate']:+.3f}, exact {miss['exact']:+.3f}")
    if "diagnostic" in report:
        d = report["diagnostic"]
        lines.append(f"  false-negative diagnostic: {d['subsets']} random subsets of {d['subset_size']} components "
                     f"outside the top {d['outside_top']}: largest |exact effect| {d['max_abs_effect']:.3f}")
    return "\n".join(lines)


# --- command line: jpatch attribute ----------------------------------------------------------------


def add_arguments(parser):
    from jpatch.methods.attribution import METHODS
    from jpatch.face.cli import add_task_arguments

    add_task_arguments(parser, site="z")
    parser.add_argument("--method", default="atp", help=" | ".join(METHODS))
    parser.add_argument("--compare-exact", action="store_true",
                        help="also run the exact sweep and report how well the estimate agrees")
    parser.add_argument("--diagnostic", type=int, default=0,
                        help="with --compare-exact: exactly patch this many random subsets outside the top 5%%")
    parser.add_argument("--out", required=True)
    parser.add_argument("--overwrite", action="store_true")


def main(args):
    from jpatch.methods import attribution
    from jpatch.face import cli
    from jpatch.face import plot
    from jpatch.model import sites
    if args.method not in attribution.METHODS:
        raise cli._choice_error("method", args.method, attribution.METHODS)
    if args.corruption not in cli.CORRUPTIONS:
        raise cli._choice_error("corruption", args.corruption, cli.CORRUPTIONS)
    if args.diagnostic and not args.compare_exact:
        raise cli.Fail("--diagnostic needs --compare-exact")
    cli.check_at_least(1, n_prompts=args.n_prompts, noise_samples=args.noise_samples)
    cli.check_at_least(0, diagnostic=args.diagnostic)
    try:
        site = sites.canonical(args.site)
        axes = tuple(args.axes.split(",")) if args.axes else default_axes(site)
    except (KeyError, ValueError) as e:
        raise cli.Fail(f"--site {args.site}: {e.args[0]}") from None
    cli.check_out(args.out, args.overwrite, "attribute")
    model = cli.load_model(args.model)
    task = cli.load_task(args.task, args.n_prompts, args.seed)
    corrupted = cli.make_corruption(model, task, args.corruption, site, noise_samples=args.noise_samples,
                                    seed=args.seed)
    metric = cli.make_metric(task, args.metric)
    clean = task.clean_tokens
    try:
        if args.compare_exact:
            estimate, exact, report = compare_exact(model, clean, corrupted, site, metric, method=args.method,
                                                    direction=args.direction, axes=axes,
                                                    diagnostic=args.diagnostic, seed=args.seed,
                                                    attention_mask=task.attention_mask)
        else:
            estimate = attribution.attribute(model, clean, corrupted, site, metric, method=args.method,
                                             direction=args.direction, axes=axes, attention_mask=task.attention_mask)
    except (ValueError, FloatingPointError) as e:
        raise cli.Fail(cli.cli_message(e)) from None
    print(f"{site} over {' x '.join(axes)}, {args.method} estimate: top components")
    print("\n".join(cli.top_components(estimate, axes, cli.longest_prompt_tokens(task))))
    settings = {"model": args.model, "task": args.task, "n_prompts": len(task), "corruption": args.corruption,
                "metric": args.metric, "direction": args.direction, "window": 1, "seed": args.seed,
                "noise_samples": args.noise_samples, "method": args.method}
    sweeps = {"estimate": (site, axes, np.asarray(estimate))}

    def extra(folder):
        if args.compare_exact:
            (folder / "agreement.json").write_text(json.dumps(report, indent=2) + "\n")
            fig = scatter(estimate, exact, title=f"{args.model} | {site} | {args.method} vs exact",
                          label=args.metric)
            plot.save(fig, folder / "scatter.png")

    if args.compare_exact:
        sweeps["exact"] = (site, axes, np.asarray(exact))
        print(format_report(report))
    out = cli.write_sweeps(args.out, args.model, task, sweeps, settings, args.overwrite, "attribute", extra=extra)
    print(f"results in {out}/")
