"""How far to trust an attribution estimate: compare it with the exact sweep.

`agreement(estimate, exact, axes)` gives Pearson and Spearman correlation, top-k
recall (k = 10 and 5% of the components), sign agreement and the largest misses;
`compare_exact(...)` runs `attribute` and `sweep` on the same inputs and adds, as an
option, AtP*'s false-negative diagnostic: exact patching of random subsets of the
components outside the estimate's top set, all of a subset at once, to bound the size
of any effect the estimate missed. `jpatch attribute ... --compare-exact` is the
command-line form (`jpatch.face.attribute_cli`).
"""

import numpy as np

from jpatch.engine.inputs import check_baselines, checked_inputs
from jpatch.engine.readout import prepare_metric
from jpatch.engine.sweep import default_axes, sweep
from jpatch.engine.inputs import check_base
from jpatch.methods.stats import pearson, spearman, top_k

SIGN_FLOOR = 0.01  # components with |exact| below this fraction of the largest do not count for signs


def top_k_recall(estimate, exact, k):
    """The fraction of the k largest-|exact| components among the k largest-|estimate| ones."""
    k = min(int(k), np.size(exact))
    return len(set(top_k(exact, k)) & set(top_k(estimate, k))) / k if k else float("nan")


def agreement(estimate, exact, axes, *, misses=5):
    """Agreement between an estimate and the exact result of the same sweep (same shape)."""
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
        "pearson": pearson(e, x),
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
    clean, corrupted, mask = checked_inputs(model, clean, corrupted, attention_mask)
    if corrupted.samples != 1:
        raise ValueError("the subset diagnostic takes runs of a single sample")
    base, source = (corrupted, clean) if direction == "denoise" else (clean, corrupted)
    check_base(base)
    N, T = clean.tokens.shape
    metric = prepare_metric(metric, model.config.d_vocab, N, T, mask)
    data, read = metric.batch_data(N), metric.read_positions(N, T)
    run = lambda r, overrides=None: model(r.tokens, overrides={**r.overrides, **(overrides or {})},
                                          attention_mask=mask, logits_at=read)
    clean_logits = run(clean)
    score = lambda r, overrides=None: np.asarray(metric.score(run(r, overrides), clean_logits, data))
    clean_score, corrupted_score = score(clean), score(corrupted)
    check_baselines(metric, clean_score, corrupted_score, N)
    _, cache = model.run_with_cache(source.tokens, overrides=source.overrides, attention_mask=mask)
    value = cache.stacked(site)
    names = attribution.estimate_dims(site)  # the activation's layout, with "row" for prompts
    base_score = score(base)
    if base_score.ndim:  # per-prompt scores: the sweep's mean over prompts
        base_score, clean_score, corrupted_score = base_score.mean(), clean_score.mean(), corrupted_score.mean()
    unpatched = metric.normalized(base_score, clean_score, corrupted_score)
    effects = []
    for grid_mask in chosen:
        select = np.zeros([value.shape[i] if n != "row" else 1 for i, n in enumerate(names)], bool)
        for index in np.argwhere(grid_mask):
            at = dict(zip(axes, index))
            select[tuple(at.get(n, slice(None)) if n != "row" else 0 for n in names)] = True
        if site != "attn.hook_pattern":
            select = select[..., None]  # the feature axis
        raw = np.mean(score(base, {site: Override(value, jnp.asarray(select))}))
        effects.append(float(metric.normalized(raw, clean_score, corrupted_score) - unpatched))
    return np.array(effects)


class AgreementReport(dict):
    """`compare_exact`'s report: a dict (printed and saved as JSON as before) carrying the two grids
    it compares, which a notebook shows as a table and an estimate-vs-exact scatter plot."""

    estimate = exact = None

    def _repr_html_(self):
        from jpatch.files import html_view

        return html_view.fragment(html_view.agreement_panels(self, self.estimate, self.exact))


def compare_exact(model, clean, corrupted, site, metric, *, method="atp", direction="denoise", axes=None,
                  diagnostic=0, top=None, seed=0, attention_mask=None):
    """Run `attribute` and the exact `sweep`; their agreement, and with diagnostic=K the exact
    effect of K random subsets (a tenth of the rest each) of the components outside the
    estimate's top set (default: 5% of the components). Returns (estimate, exact, report)."""
    from jpatch.methods import attribution
    axes = tuple(axes or default_axes(site, model.sites))
    estimate = attribution.attribute(model, clean, corrupted, site, metric, method=method, direction=direction,
                                     axes=axes, attention_mask=attention_mask)
    exact = sweep(model, clean, corrupted, site, metric, direction=direction, axes=axes, progress=False,
                  attention_mask=attention_mask)
    report = AgreementReport(site=site, method=method, direction=direction, axes=list(axes),
                             **agreement(estimate, exact, axes))
    report.estimate, report.exact = np.asarray(estimate), np.asarray(exact)
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
