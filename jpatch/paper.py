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

import dataclasses
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
from jpatch import corrupt, metrics
from jpatch.checkpoint import atomic_dir, check_target
from jpatch.patching import as_run, sweep
from jpatch.tasks import factual_task, ioi_task

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
IOI_HEAD_CLASSES = {
    **{h: "name mover" for h in ((9, 6), (9, 9), (10, 0))},
    **{h: "negative name mover" for h in ((10, 7), (11, 10))},
    **{h: "S-inhibition" for h in ((7, 3), (7, 9), (8, 6), (8, 10))},
    **{h: "induction" for h in ((5, 5), (5, 8), (5, 9), (6, 9))},
    **{h: "duplicate token" for h in ((0, 1), (0, 10), (3, 0))},
    **{h: "previous token" for h in ((2, 2), (4, 11))},
    **{h: "backup name mover" for h in ((9, 0), (9, 7), (10, 1), (10, 2), (10, 6), (10, 10), (11, 2), (11, 9))},
}

SECTION_TITLES = {
    "corruption_ioi": "1. Corruption: Gaussian noise vs symmetric token replacement (IOI attention heads)",
    "corruption_factual": "2. Corruption: Gaussian noise vs symmetric token replacement (factual-recall MLPs)",
    "metrics": "3. Metrics: probability vs logit difference vs KL divergence (IOI attention heads)",
    "window": "4. Sliding window: 1 vs 5 layers (factual-recall MLPs)",
    "direction": "5. Direction: denoising vs noising (IOI)",
    "attribution": "6. Attribution patching: AtP and AtP* vs exact patching (IOI attention heads)",
}
HEADS = ("layer", "head")


# --- choosing the prompts -----------------------------------------------------------------


def choose_factual(tasks, n_prompts, *, min_bucket=8):
    """The factual-recall buckets a run uses: the largest (token length, subject length)
    buckets first, taking prompts until `n_prompts` (whole pairs: an even number per
    bucket, the first ones of a bucket when it is cut); a bucket that would add fewer
    than `min_bucket` prompts ends the choice. Returns a list of Tasks (at least one)."""
    remaining, chosen = int(n_prompts), []
    for task in sorted(tasks, key=lambda t: (-len(t), t.name)):
        take = min(len(task), remaining) // 2 * 2
        if chosen and take < min_bucket:
            break
        take = max(take, min(2, len(task)))
        chosen.append(task if take == len(task) else task.select(slice(0, take)))
        remaining -= take
        if remaining <= 0:
            break
    return chosen


def subject_tokens(tasks):
    """The clean token ids at the key positions of every prompt of `tasks`, every
    occurrence counted (ROME measures the embedding std over its dataset's subjects)."""
    return np.concatenate([np.take_along_axis(t.clean_tokens, t.key_positions, axis=1).ravel() for t in tasks])


def ioi_noise(model, task, *, n_samples=10, scale=3.0, seed=1):
    """The Gaussian-noise corruption of IOI: noise on the three name tokens, nu = scale x
    the std of the name tokens' embeddings (every occurrence in the batch)."""
    return corrupt.gaussian_noise(model, task.clean_tokens, task.key_positions, n_samples=n_samples, scale=scale,
                                  std_tokens=subject_tokens([task]), seed=seed, attention_mask=task.attention_mask)


def factual_noise(model, task, std, *, n_samples=10, scale=3.0, seed=1):
    """The Gaussian-noise corruption of one factual bucket: noise on the subject tokens,
    nu = scale x `std` (one std for every bucket of the run)."""
    return corrupt.gaussian_noise(model, task.clean_tokens, task.key_positions, n_samples=n_samples, scale=scale,
                                  std=std, seed=seed)


# --- small statistics -----------------------------------------------------------------------


def _ranks(x):
    """Ranks (1..n), ties averaged."""
    x = np.asarray(x, float).ravel()
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(1, len(x) + 1)
    for value in np.unique(x):
        tie = x == value
        if tie.sum() > 1:
            ranks[tie] = ranks[tie].mean()
    return ranks


def spearman(a, b):
    """Spearman rank correlation of two equally shaped arrays (nan if either is constant)."""
    ra, rb = _ranks(a), _ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def top_k(values, k, *, by="abs"):
    """Flat indices of the k largest entries (by |value|, by value, or by -value), largest first."""
    flat = np.asarray(values, float).ravel()
    key = {"abs": np.abs(flat), "max": flat, "min": -flat}[by]
    return [int(i) for i in np.argsort(-key, kind="stable")[:k]]


def peak(curve):
    """(peak layer, peak value, width): width = the contiguous run of layers around the
    peak whose value is at least half the peak value (0 when the peak is not positive)."""
    curve = np.asarray(curve, float)
    at = int(np.argmax(curve))
    top = float(curve[at])
    if top <= 0:
        return at, top, 0
    lo = hi = at
    while lo > 0 and curve[lo - 1] >= top / 2:
        lo -= 1
    while hi < len(curve) - 1 and curve[hi + 1] >= top / 2:
        hi += 1
    return at, top, hi - lo + 1


# --- the report -------------------------------------------------------------------------------


@dataclasses.dataclass
class _Run:
    model: object
    name: str
    out: Path
    settings: dict
    progress: bool
    arrays: dict = dataclasses.field(default_factory=dict)
    numbers: dict = dataclasses.field(default_factory=dict)
    timings: dict = dataclasses.field(default_factory=dict)
    cache: dict = dataclasses.field(default_factory=dict)

    def log(self, message):
        if self.progress:
            print(f"[paper] {message}", file=sys.stderr, flush=True)

    def sweep(self, key, clean, corrupted, site, metric, **kw):
        """One `jpatch.sweep`, stored under `key` (and reused when asked again)."""
        if key not in self.arrays:
            self.log(f"sweep {key}")
            result = sweep(self.model, clean, corrupted, site, metric, progress=self.progress, **kw)
            self.arrays[key] = np.asarray(result, np.float64)
        return self.arrays[key]

    def figure(self, fig, name):
        from jpatch import plot

        plot.save(fig, str(self.out / name))
        return name


def _f(x, digits=4):
    x = float(x)
    return "nan" if not math.isfinite(x) else f"{x:.{digits}f}"


def _table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _head_name(index, n_head):
    return f"{index // n_head}.{index % n_head}"


def _gpt2_small(model):
    return model.config.n_layer == 12 and model.config.n_head == 12


def _head_rows(model, indices, columns):
    """Table rows (head, [Wang et al. class], value per column) for flat head indices."""
    n_head = model.config.n_head
    rows = []
    for i in indices:
        row = [_head_name(i, n_head)]
        if _gpt2_small(model):
            row.append(IOI_HEAD_CLASSES.get((i // n_head, i % n_head), ""))
        rows += [row + [_f(np.ravel(c)[i]) for c in columns]]
    return rows


def _head_header(model, names):
    return ["head"] + (["Wang et al. class"] if _gpt2_small(model) else []) + list(names)


def _heatmaps(panels, *, rows="layer", cols="head", col_labels=None):
    """Side-by-side heatmaps: panels = [(values, title, colorbar label)]."""
    import matplotlib.pyplot as plt

    from jpatch import plot

    shape = np.shape(panels[0][0])
    width = max(4.0, 0.45 * shape[1] + 2.5)
    height = max(3.0, 0.3 * shape[0] + 1.5)
    fig, axes = plt.subplots(1, len(panels), figsize=(width * len(panels), height + 0.4), squeeze=False)
    for ax, (values, title, label) in zip(axes[0], panels):
        plot.heatmap(values, rows=rows, cols=cols, col_labels=col_labels, title=title, ax=ax, colorbar_label=label)
    fig.tight_layout()
    return fig


def _curves(panels, n_layer):
    """Per-layer line plots: panels = [(title, [(label, curve), ...])]."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, len(panels), figsize=(max(4.5, 0.12 * n_layer + 4) * len(panels), 3.6),
                             squeeze=False)
    for ax, (title, lines) in zip(axes[0], panels):
        for label, curve in lines:
            ax.plot(np.arange(n_layer), curve, marker="o", markersize=3, label=label)
        ax.axhline(0, color="grey", linewidth=0.7)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("layer")
        ax.set_ylabel("normalized logit difference")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _baseline(model, run, answers, contrasts, lengths=None):
    """Mean logit difference, accuracy (answer logit > contrast logit) and mean P(answer)
    of a run at each prompt's last real token (`lengths`: of a right-padded batch; a noised
    run: over every sample)."""
    run = as_run(run, "run")
    n, t = run.tokens.shape
    ends = np.full(n, t) if lengths is None else np.tile(np.asarray(lengths), n // len(answers))
    logits = np.asarray(model(run.tokens, overrides=run.overrides, logits_at=(ends - 1)[:, None])[:, 0], np.float32)
    reps = logits.shape[0] // len(answers)
    a, c = np.tile(answers, reps), np.tile(contrasts, reps)
    rows = np.arange(len(a))
    ld = logits[rows, a] - logits[rows, c]
    p = np.asarray(jax.nn.softmax(jnp.asarray(logits), axis=-1))[rows, a]
    return {"logit_diff": float(ld.mean()), "accuracy": float((ld > 0).mean()), "p_answer": float(p.mean())}


# --- sections ------------------------------------------------------------------------------


def _ioi(run):
    if "ioi" not in run.cache:
        s = run.settings
        task = ioi_task(s["n_prompts"], seed=s["seed"], split=s["ioi_split"])
        gn = ioi_noise(run.model, task, n_samples=s["noise_samples"], scale=s["noise_scale"], seed=s["noise_seed"])
        run.cache["ioi"] = (task, gn)
        run.numbers["ioi_noise_std"] = corrupt.embedding_std(run.model, subject_tokens([task]))
        run.numbers["ioi_nu"] = s["noise_scale"] * run.numbers["ioi_noise_std"]
    return run.cache["ioi"]


def _factual(run):
    if "factual" not in run.cache:
        s = run.settings
        tasks = choose_factual(factual_task(), s["n_factual"], min_bucket=s["min_bucket"])
        std = corrupt.embedding_std(run.model, subject_tokens(tasks))
        runs = [factual_noise(run.model, t, std, n_samples=s["noise_samples"], scale=s["noise_scale"],
                              seed=s["noise_seed"]) for t in tasks]
        run.cache["factual"] = (tasks, runs)
        run.numbers["factual_noise_std"] = std
        run.numbers["factual_nu"] = s["noise_scale"] * std
        run.numbers["factual_buckets"] = [{"name": t.name, "prompts": len(t)} for t in tasks]
    return run.cache["factual"]


def _ioi_heads(run, key, corrupted, metric, direction="denoise"):
    task, _ = _ioi(run)
    return run.sweep(key, task.clean_tokens, corrupted, "z", metric, axes=HEADS, direction=direction,
                     attention_mask=task.attention_mask)


IOI_ROLES = ("1st name", "2nd name", "S2", "end")


def _ioi_resid(run, key, metric, direction="denoise"):
    """resid_pre at each IOI role, [layer, role]: the templates put the names at different
    positions, so each prompt is patched at its own first name, second name, repeated
    subject and last token (`prompt_positions`) rather than at one position index."""
    task, _ = _ioi(run)
    if key not in run.arrays:
        roles = [*task.key_positions.T, task.lengths - 1]
        run.arrays[key] = np.stack([run.sweep(f"{key}/{name}", task.clean_tokens, task.corrupted_tokens, "resid_pre",
                                              metric, prompt_positions=pos, direction=direction,
                                              attention_mask=task.attention_mask)[:, 0]
                                    for name, pos in zip(IOI_ROLES, roles)], 1)
    return run.arrays[key]


FACTUAL_SITES = {"mlp_out": "mlp", "attn_out": "attn", "resid_pre": "resid_pre"}


def _factual_curve(run, corruption, window, site="mlp_out"):
    """Per-layer normalized logit difference of patching `site` (default the MLP output)
    at the last subject token, averaged over the buckets weighted by their prompt counts."""
    key = f"factual_{FACTUAL_SITES[site]}_{corruption}_w{window}"
    if key not in run.arrays:
        tasks, noise = _factual(run)
        curves = []
        for task, gn in zip(tasks, noise):
            corrupted = gn if corruption == "gn" else task.corrupted_tokens
            result = run.sweep(f"{key}/{task.name}", task.clean_tokens, corrupted, site, task.metric(),
                               prompt_positions=task.last_key_position, window=window)
            curves.append(result[:, 0])
        weights = np.array([len(t) for t in tasks], float)
        run.arrays[key] = (np.stack(curves) * weights[:, None]).sum(0) / weights.sum()
    return run.arrays[key]


def section_corruption_ioi(run):
    model, s = run.model, run.settings
    task, gn = _ioi(run)
    metric = task.metric()
    str_ = _ioi_heads(run, "ioi_heads_str_ld_denoise", task.corrupted_tokens, metric)
    gn_ = _ioi_heads(run, "ioi_heads_gn_ld_denoise", gn, metric)
    k = s["top_k"]
    top_str, top_gn = top_k(str_, k), top_k(gn_, k)
    overlap = len(set(top_str) & set(top_gn))
    rho = spearman(str_, gn_)
    base = {"clean": _baseline(model, task.clean_tokens, task.answers, task.contrasts, task.lengths),
            "str": _baseline(model, task.corrupted_tokens, task.answers, task.contrasts, task.lengths),
            "gn": _baseline(model, gn, task.answers, task.contrasts, task.lengths)}
    run.numbers["corruption_ioi"] = {
        "top_str": [_head_name(i, model.config.n_head) for i in top_str],
        "top_gn": [_head_name(i, model.config.n_head) for i in top_gn],
        "overlap": overlap, "k": k, "spearman": rho, "baselines": base,
    }
    fig = run.figure(_heatmaps([(gn_, "GN (name tokens)", "normalized logit diff"),
                                (str_, "STR (ABC names)", "normalized logit diff")]), "fig1_ioi_heads_gn_vs_str.png")
    verdict = ("agree" if overlap == k and rho >= 0.9 else "partly agree" if overlap >= k / 2 and rho >= 0.5
               else "differ")
    order = list(dict.fromkeys(top_str + top_gn))
    return [
        f"**Setting.** IOI, {len(task)} prompts ({task.name}, {task.lengths.min()} to {task.seq_len} tokens). "
        "Site: each attention head's "
        "output z over all positions (`attn_head_out_all_pos`, site `z`, axes layer x head). Metric: normalized "
        "logit difference (IO vs S): 0 = corrupted, 1 = clean. Direction: denoising. Window: 1. Corruptions: "
        f"**STR** = the ABC prompts (the three names replaced by three other names); **GN** = Gaussian noise on "
        f"the token embeddings of the three name tokens, nu = {s['noise_scale']:g} x std of the name tokens' "
        f"embeddings = {_f(run.numbers['ioi_nu'])}, {s['noise_samples']} noise samples (seed {s['noise_seed']}), "
        "averaged per prompt.",
        "",
        "**Paper.** GN and STR give different localizations (on IOI in GPT-2 small, GN misses or distorts heads "
        "that STR finds); GN takes the model off-distribution. Recommendation: prefer STR.",
        "",
        "**Task baselines** (last position, mean over prompts; GN over every noise sample):",
        "",
        *_baseline_table(["logit diff (IO - S)", "accuracy (IO > S)", "P(IO)"], base, "STR (ABC)"),
        "",
        f"![GN vs STR on IOI heads]({fig})",
        "",
        f"**Top {k} heads by |effect|** under each corruption (the union, STR's first):",
        "",
        _table(_head_header(model, ["STR", "GN", "in STR top", "in GN top"]),
               [r + ["yes" if i in top_str else "", "yes" if i in top_gn else ""]
                for r, i in zip(_head_rows(model, order, [str_, gn_]), order)]),
        "",
        _table(["comparison", "value"], [[f"top-{k} overlap (of {k})", overlap], ["Spearman rank correlation", _f(rho)]]),
        "",
        f"**This model.** STR's top heads: {', '.join(run.numbers['corruption_ioi']['top_str'])}; GN's: "
        f"{', '.join(run.numbers['corruption_ioi']['top_gn'])}. The two localizations **{verdict}** "
        f"(top-{k} overlap {overlap}/{k}, Spearman {_f(rho, 2)}; 'agree' means the same top-{k} and rho >= 0.9, "
        f"'partly agree' at least half of them and rho >= 0.5).",
    ]


def _baseline_table(columns, baselines, str_label):
    """The clean / STR / GN task baselines as a table, with a caution when the model hardly does the task."""
    runs = (("clean", baselines["clean"]), (str_label, baselines["str"]), ("GN", baselines["gn"]))
    table = _table(["run"] + columns, [[name, _f(b["logit_diff"]), _f(b["accuracy"]), _f(b["p_answer"])]
                                       for name, b in runs])
    return [table, *_caution(baselines["clean"], baselines["str"])]


def _caution(clean, corrupted):
    """A warning line when the model hardly does the task: normalized effects then
    divide by a small clean - corrupted gap and mean little."""
    gap = clean["logit_diff"] - corrupted["logit_diff"]
    if clean["accuracy"] >= 0.6 and gap >= 0.5:
        return []
    return ["", f"**Caution:** the model hardly does this task (clean accuracy {_f(clean['accuracy'], 2)}, clean - "
                f"corrupted logit difference {_f(gap, 3)}); normalized effects divide by that gap and mean little."]


def _bucket_table(run, tasks):
    return _table(["bucket", "prompts", "weight"],
                  [[t.name, len(t), _f(len(t) / sum(len(u) for u in tasks), 3)] for t in tasks])


def section_corruption_factual(run):
    model, s = run.model, run.settings
    tasks, noise = _factual(run)
    str_ = _factual_curve(run, "str", 1)
    gn_ = _factual_curve(run, "gn", 1)
    context = {(site, c): _factual_curve(run, c, 1, site) for site in ("attn_out", "resid_pre") for c in ("str", "gn")}
    p_str, p_gn = peak(str_), peak(gn_)
    rho = spearman(str_, gn_)
    base = {name: [] for name in ("clean", "str", "gn")}
    for t, gn in zip(tasks, noise):
        base["clean"].append(_baseline(model, t.clean_tokens, t.answers, t.contrasts))
        base["str"].append(_baseline(model, t.corrupted_tokens, t.answers, t.contrasts))
        base["gn"].append(_baseline(model, gn, t.answers, t.contrasts))
    w = np.array([len(t) for t in tasks], float) / sum(len(t) for t in tasks)
    mean = {name: {m: float(sum(wi * b[m] for wi, b in zip(w, bs))) for m in bs[0]} for name, bs in base.items()}
    run.numbers["corruption_factual"] = {"str": str_.tolist(), "gn": gn_.tolist(), "peak_str": p_str[0],
                                         "peak_gn": p_gn[0], "spearman": rho, "baselines": mean}
    site_curves = lambda c, mlp: [("MLP out", mlp), ("attention out", context[("attn_out", c)]),
                                  ("resid_pre (hidden state)", context[("resid_pre", c)])]
    fig = run.figure(_curves([("MLP output at the last subject token", [("STR", str_), ("GN", gn_)]),
                              ("STR: the three sites", site_curves("str", str_)),
                              ("GN: the three sites", site_curves("gn", gn_))], model.config.n_layer),
                     "fig2_factual_mlp_gn_vs_str.png")
    run.numbers["corruption_factual"]["context"] = {f"{FACTUAL_SITES[site]}_{c}": v.tolist()
                                                    for (site, c), v in context.items()}
    n = sum(len(t) for t in tasks)
    largest = max(np.abs(str_).max(), np.abs(gn_).max())
    small = (f" Both MLP curves stay below {_f(largest, 3)} of the clean - corrupted gap: in this model the MLP "
             "outputs at the last subject token carry little of the effect (compare the residual stream and "
             "attention curves)." if largest < 0.05 else "")
    return [
        f"**Setting.** Factual recall (the bundled paired facts, STR pairs in both directions), {n} prompts in "
        f"{len(tasks)} (token length, subject length) bucket(s): each bucket is swept on its own and the per-layer "
        "results are averaged weighted by prompt count. Site: MLP output (`mlp_out`) at the last subject token. "
        "Metric: normalized logit difference (the prompt's answer vs its pair's answer). Direction: denoising. "
        f"Window: 1. Corruptions: **STR** = the paired prompt (another subject of the same token length); "
        f"**GN** = Gaussian noise on the subject tokens' embeddings, nu = {s['noise_scale']:g} x std of the subject "
        f"tokens' embeddings (every subject token of the chosen prompts) = {_f(run.numbers['factual_nu'])}, "
        f"{s['noise_samples']} noise samples (seed {s['noise_seed']}).",
        "",
        "**Paper.** On GPT-2 XL, GN and STR localize factual recall differently: GN (ROME's causal tracing) shows a "
        "pronounced peak of MLP effects in early-middle layers at the last subject token, which STR reproduces "
        "only in part. (ROME, GN, probability metric: the hidden state's effect peaks at ~8.7% of P around layer 15; "
        "MLP 6.6% vs attention 1.6%.) Recommendation: prefer STR.",
        "",
        _bucket_table(run, tasks),
        "",
        "**Task baselines** (weighted mean over buckets):",
        "",
        *_baseline_table(["logit diff (answer - pair's answer)", "accuracy", "P(answer)"], mean, "STR"),
        "",
        f"![GN vs STR on factual-recall MLPs]({fig})",
        "",
        "Per layer, window 1 (the MLP columns are the paper's comparison; attention output and the residual "
        "stream before the block, at the same token, are ROME's other two sites, for context):",
        "",
        _table(["layer", "STR", "GN", "STR attn", "GN attn", "STR resid_pre", "GN resid_pre"],
               [[l, _f(a), _f(b)] + [_f(context[(site, c)][l]) for site in ("attn_out", "resid_pre")
                                     for c in ("str", "gn")] for l, (a, b) in enumerate(zip(str_, gn_))]),
        "",
        f"**This model.** MLP outputs: STR peaks at layer {p_str[0]} ({_f(p_str[1], 3)}), GN at layer {p_gn[0]} "
        f"({_f(p_gn[1], 3)}); Spearman rank correlation of the two per-layer curves {_f(rho, 2)}. The peak layers "
        f"{'agree' if p_str[0] == p_gn[0] else 'differ'}.{small}",
    ]


def section_metrics(run):
    model, s = run.model, run.settings
    task, _ = _ioi(run)
    ld = _ioi_heads(run, "ioi_heads_str_ld_denoise", task.corrupted_tokens, task.metric())
    prob = _ioi_heads(run, "ioi_heads_str_prob_denoise", task.corrupted_tokens,
                      metrics.probability(task.answers, normalize=True))
    kl = _ioi_heads(run, "ioi_heads_str_kl_denoise", task.corrupted_tokens, metrics.kl(normalize=True))
    thr, k = s["negative_threshold"], s["top_k"]
    named = (("logit_diff", ld), ("probability", prob), ("kl", kl))
    counts = {name: int((v < -thr).sum()) for name, v in named}
    positive = {name: int((v > thr).sum()) for name, v in named}
    top_ld = top_k(ld, k, by="max")
    most_negative = [i for i in top_k(ld, k, by="min") if ld.ravel()[i] < 0]
    run.numbers["metrics"] = {
        "negative_counts": counts, "positive_counts": positive, "threshold": thr,
        "most_negative_ld": [_head_name(i, model.config.n_head) for i in most_negative],
        "min": {"logit_diff": float(ld.min()), "probability": float(prob.min()), "kl": float(kl.min())},
        "spearman_ld_prob": spearman(ld, prob), "spearman_ld_kl": spearman(ld, kl),
    }
    fig = run.figure(_heatmaps([(ld, "logit difference", "normalized"), (prob, "probability", "normalized"),
                                (kl, "KL divergence", "normalized")]), "fig3_ioi_heads_metrics.png")
    missed = [i for i in most_negative if ld.ravel()[i] < -thr and prob.ravel()[i] >= -thr]
    if most_negative:
        negative_rows = _table(_head_header(model, ["logit diff", "probability", "KL"]),
                               _head_rows(model, most_negative, [ld, prob, kl]))
    else:
        negative_rows = "No head has a negative normalized logit difference."
    return [
        f"**Setting.** IOI, {len(task)} prompts; STR (ABC) corruption; attention heads' outputs over all positions "
        "(site `z`, layer x head); denoising; window 1. Three metrics, each normalized so 0 = corrupted run and "
        "1 = clean run: **logit difference** (IO - S), **probability** P(IO) ((P_pt - P_*) / (P_cl - P_*)), "
        "**KL divergence** (1 - KL(P_cl || P_pt) / KL(P_cl || P_*), full next-token distribution).",
        "",
        "**Paper.** Probability misses negative components: it saturates near its floor and cannot go usefully "
        "below 0, so it misses e.g. the negative name-mover heads 10.7 and 11.10 of GPT-2 small that logit "
        "difference shows. Recommendation: logit difference (or KL when there is no contrast token).",
        "",
        f"![probability vs logit difference vs KL]({fig})",
        "",
        f"**Top {k} heads under logit difference** and what the other metrics give there:",
        "",
        _table(_head_header(model, ["logit diff", "probability", "KL"]), _head_rows(model, top_ld, [ld, prob, kl])),
        "",
        f"**Most negative heads under logit difference** (up to {k}) and what the other metrics give there:",
        "",
        negative_rows,
        "",
        f"**Heads with a clearly negative / positive effect** (normalized value < -{thr:g} / > {thr:g}):",
        "",
        _table(["metric", f"heads < -{thr:g}", f"heads > {thr:g}", "minimum", "maximum", "Spearman vs logit diff"],
               [[label, counts[name], positive[name], _f(v.min()), _f(v.max()),
                 "1" if name == "logit_diff" else _f(spearman(ld, v))]
                for label, (name, v) in zip(("logit difference", "probability", "KL divergence"), named)]),
        "",
        f"**This model.** Logit difference marks {counts['logit_diff']} head(s) clearly negative, probability "
        f"{counts['probability']}, KL {counts['kl']} (clearly positive: {positive['logit_diff']}, "
        f"{positive['probability']}, {positive['kl']}). "
        + (f"Heads negative under logit difference but not under probability: "
           f"{', '.join(_head_name(i, model.config.n_head) for i in missed)}." if missed
           else "Probability misses none of the clearly negative logit-difference heads here."),
    ]


def section_window(run):
    model, s = run.model, run.settings
    tasks, _ = _factual(run)
    w = s["window"]
    curves = {(c, win): _factual_curve(run, c, win) for c in ("str", "gn") for win in (1, w)}
    rows, numbers = [], {}
    for (c, win), curve in curves.items():
        at, top, width = peak(curve)
        numbers[f"{c}_w{win}"] = {"peak_layer": at, "peak": top, "width": width, "curve": curve.tolist()}
        rows.append([c.upper(), win, at, _f(top), width, _f(curve.sum())])
    run.numbers["window"] = numbers
    fig = run.figure(_curves([(f"{c.upper()}: window 1 vs {w}", [(f"window {win}", curves[(c, win)])
                                                                  for win in (1, w)]) for c in ("str", "gn")],
                             model.config.n_layer), "fig4_factual_mlp_window.png")
    table = _table(["layer"] + [f"{c.upper()} w{win}" for c, win in curves],
                   [[l] + [_f(v[l]) for v in curves.values()] for l in range(model.config.n_layer)])
    notes = []
    for c in ("str", "gn"):
        a, b = numbers[f"{c}_w1"], numbers[f"{c}_w{w}"]
        if a["peak"] <= 0 or b["peak"] <= 0:
            notes.append(f"{c.upper()}: no positive peak (largest values {_f(a['peak'], 3)} with window 1, "
                         f"{_f(b['peak'], 3)} with window {w}).")
            continue
        notes.append(f"{c.upper()}: window {w} peaks at layer {b['peak_layer']} ({_f(b['peak'], 3)}, width "
                     f"{b['width']}) vs window 1 at layer {a['peak_layer']} ({_f(a['peak'], 3)}, width {a['width']}); "
                     f"the peak is {_f(b['peak'] / a['peak'], 2)}x as high and {b['width'] - a['width']:+d} "
                     "layer(s) wider.")
    return [
        f"**Setting.** The factual-recall prompts and corruptions of section 2 ({sum(len(t) for t in tasks)} "
        f"prompts); MLP output at the last subject token; normalized logit difference; denoising. Window w: "
        f"patch the MLP outputs of layers [l - w//2, l - w//2 + w) (clipped to the model) at once, for w = 1 and "
        f"w = {w}.",
        "",
        "**Paper.** Sliding windows exaggerate and smear peaks: with w > 1 the effect per layer is larger and spread "
        "over more layers than any single layer's, so the localization looks sharper and stronger than it is. "
        "Recommendation: report w = 1, or check that w > 1 agrees.",
        "",
        f"![window 1 vs {w}]({fig})",
        "",
        _table(["corruption", "window", "peak layer", "peak value", "width (layers >= half peak)", "sum over layers"],
               rows),
        "",
        table,
        "",
        "**This model.** " + " ".join(notes),
    ]


def section_direction(run):
    model, s = run.model, run.settings
    task, _ = _ioi(run)
    metric, k = task.metric(), s["top_k"]
    den = _ioi_heads(run, "ioi_heads_str_ld_denoise", task.corrupted_tokens, metric)
    noi = _ioi_heads(run, "ioi_heads_str_ld_noise", task.corrupted_tokens, metric, direction="noise")
    res_den = _ioi_resid(run, "ioi_resid_pre_str_ld_denoise", metric)
    res_noi = _ioi_resid(run, "ioi_resid_pre_str_ld_noise", metric, direction="noise")
    drop, res_drop = 1 - noi, 1 - res_noi
    top_den, top_noi = top_k(den, k), top_k(drop, k)
    overlap = len(set(top_den) & set(top_noi))
    rho = spearman(den, drop)
    run.numbers["direction"] = {
        "top_denoise": [_head_name(i, model.config.n_head) for i in top_den],
        "top_noise": [_head_name(i, model.config.n_head) for i in top_noi],
        "overlap": overlap, "k": k, "spearman_heads": rho, "spearman_resid_pre": spearman(res_den, res_drop),
    }
    labels = list(IOI_ROLES)
    fig_heads = run.figure(_heatmaps([(den, "denoising: recovered", "normalized logit diff"),
                                      (drop, "noising: destroyed (1 - metric)", "1 - normalized logit diff")]),
                           "fig5_ioi_heads_denoise_vs_noise.png")
    fig_resid = run.figure(_heatmaps([(res_den, "denoising: recovered", "normalized logit diff"),
                                      (res_drop, "noising: destroyed (1 - metric)", "1 - normalized logit diff")],
                                     cols="pos", col_labels=labels), "fig5_ioi_resid_pre_denoise_vs_noise.png")
    order = list(dict.fromkeys(top_den + top_noi))
    res_top = lambda v: ", ".join(f"L{i // v.shape[1]} {labels[i % v.shape[1]]} ({_f(v.ravel()[i], 2)})"
                                  for i in top_k(v, min(k, v.size), by="max"))
    return [
        f"**Setting.** IOI, {len(task)} prompts; STR (ABC) corruption; normalized logit difference; window 1. "
        "**Denoising**: the corrupted run with one clean activation patched in (what it recovers: sufficiency). "
        "**Noising**: the clean run with one corrupted activation patched in; shown as 1 - metric, the share of the "
        "clean logit difference it destroys (necessity). Sites: attention heads (site `z`, layer x head) and the "
        "residual stream before each block (`resid_pre`, layer x role: each prompt patched at its own first name, "
        "second name, repeated subject S2 and last token, since the templates put them at different positions).",
        "",
        "**Paper.** Denoising and noising find different components: a component can be sufficient without being "
        "necessary (e.g. backup heads take over when it is noised) and the reverse (e.g. a component whose "
        "contribution only matters together with others). Recommendation: say which one is used.",
        "",
        f"![denoising vs noising, heads]({fig_heads})",
        "",
        f"![denoising vs noising, resid_pre]({fig_resid})",
        "",
        f"**Top {k} heads by |effect|** under each direction:",
        "",
        _table(_head_header(model, ["denoising (recovered)", "noising (destroyed)", "in denoising top",
                                    "in noising top"]),
               [r + ["yes" if i in top_den else "", "yes" if i in top_noi else ""]
                for r, i in zip(_head_rows(model, order, [den, drop]), order)]),
        "",
        _table(["comparison", "value"],
               [[f"heads: top-{k} overlap (of {k})", overlap], ["heads: Spearman rank correlation", _f(rho)],
                ["resid_pre: Spearman rank correlation", _f(run.numbers["direction"]["spearman_resid_pre"])]]),
        "",
        f"**This model.** Denoising's top heads: {', '.join(run.numbers['direction']['top_denoise'])}; noising's: "
        f"{', '.join(run.numbers['direction']['top_noise'])} (overlap {overlap}/{k}, Spearman {_f(rho, 2)}). "
        f"resid_pre, largest recovery (denoising): {res_top(res_den)}; largest damage (noising): {res_top(res_drop)}.",
    ]


def section_attribution(run):
    from jpatch.agreement import agreement, top_k_recall
    from jpatch.attribution import attribute

    model, s = run.model, run.settings
    task, _ = _ioi(run)
    metric, k = task.metric(), s["top_k"]
    na = lambda x: "n/a" if not math.isfinite(x) else _f(x, 3)  # e.g. a constant estimate has no correlation
    rows, found = [], run.numbers.setdefault("attribution", {})
    for site in ("z", "q", "k"):
        key = "ioi_heads_str_ld_denoise" if site == "z" else f"ioi_heads_{site}_str_ld_denoise"
        exact = run.sweep(key, task.clean_tokens, task.corrupted_tokens, site, metric, axes=HEADS,
                          attention_mask=task.attention_mask)
        for method in ("atp", "atp-qk", "atp*") if site != "z" else ("atp", "atp*"):
            run.log(f"attribution {site} {method}")
            est = np.asarray(attribute(model, task.clean_tokens, task.corrupted_tokens, site, metric, method=method,
                                       axes=HEADS, attention_mask=task.attention_mask), np.float64)
            run.arrays[f"ioi_heads_{site}_{method}"] = est
            signed = method != "atp*"  # GradDrop gives sizes: compared with |exact|
            target = exact if signed else np.abs(exact)
            stats = agreement(est, target, HEADS)
            recall = top_k_recall(est, target, k)
            found[f"{site}/{method}"] = {"pearson": stats["pearson"], "spearman": stats["spearman"],
                                         f"top_{k}_recall": recall, "sign_agreement": stats["sign_agreement"]}
            rows.append([f"`{site}`", method, "exact" if signed else "abs(exact)", na(stats["pearson"]),
                         na(stats["spearman"]), na(recall), na(stats["sign_agreement"]) if signed else "-"])
    z_atp = run.arrays["ioi_heads_z_atp"]
    fig = run.figure(_heatmaps([(run.arrays["ioi_heads_str_ld_denoise"], "exact patching", "normalized logit diff"),
                                (z_atp, "AtP estimate", "normalized logit diff")]), "fig6_ioi_heads_atp_vs_exact.png")
    z = found["z/atp"]
    return [
        f"**Setting.** IOI, {len(task)} prompts; STR (ABC) corruption; normalized logit difference; denoising; "
        "attention heads by head output (`z`), query (`q`) and key (`k`), all positions at once (layer x head). "
        "Exact: one patched forward per head (`jpatch.sweep`). AtP: (clean - corrupted) . gradient at the "
        "corrupted run, every head from two forwards and one backward (`jpatch.attribute`). atp-qk: AtP*'s QK "
        "fix, the attention pattern recomputed with the patched query / key. atp*: the QK fix plus GradDrop, "
        "(1/(L-1)) sum_l |estimate with layer l's residual writes cut from the backward pass|, a size compared "
        "with abs(exact).",
        "",
        "**Paper (Kramar et al. 2024, AtP*).** AtP ranks components well at a tiny fraction of the cost, but has "
        "false negatives where attention saturates (queries and keys: the softmax is far from linear) and where "
        "direct and indirect effects cancel; the QK fix and GradDrop remove most of them. Verify the top "
        "components with exact patching.",
        "",
        f"![exact vs AtP, heads]({fig})",
        "",
        _table(["site", "method", "compared with", "Pearson", "Spearman", f"top-{k} recall", "sign agreement"], rows),
        "",
        f"**This model.** Head outputs: AtP's Spearman correlation with exact patching is {na(z['spearman'])}, and "
        f"{round(z[f'top_{k}_recall'] * k)} of the exact top {k} heads are in AtP's top {k}.",
    ]


SECTIONS = (
    ("corruption_ioi", section_corruption_ioi),
    ("corruption_factual", section_corruption_factual),
    ("metrics", section_metrics),
    ("window", section_window),
    ("direction", section_direction),
    ("attribution", section_attribution),
)


def _header(run, total):
    model, s = run.model, run.settings
    cfg = model.config
    tasks, _ = run.cache.get("factual", ([], None))
    settings = [
        ["IOI prompts", f"{s['n_prompts']} (names and templates split {s['ioi_split']!r}, seed {s['seed']})"],
        ["factual prompts", f"{sum(len(t) for t in tasks)} of the requested {s['n_factual']}, in buckets "
                            + ", ".join(f"{t.name} ({len(t)})" for t in tasks)],
        ["Gaussian noise", f"{s['noise_samples']} samples, nu = {s['noise_scale']:g} x embedding std, seed "
                           f"{s['noise_seed']}; IOI nu = {_f(run.numbers.get('ioi_nu', float('nan')))}, factual "
                           f"nu = {_f(run.numbers.get('factual_nu', float('nan')))}"],
        ["top k", s["top_k"]],
        ["sliding window", f"1 vs {s['window']}"],
        ["'clearly negative'", f"normalized value < -{s['negative_threshold']:g}"],
    ]
    timings = [[SECTION_TITLES[key], _f(sec, 1)] for key, sec in run.timings.items()] + [["total", _f(total, 1)]]
    return [
        f"# Activation patching best practices on {run.name}",
        "",
        "Zhang & Nanda, *Towards Best Practices of Activation Patching in Language Models: Metrics and Methods* "
        "(ICLR 2024), rerun with jpatch.",
        "",
        _table(["", ""], [
            ["model", f"{run.name} ({cfg.n_layer} layers, {cfg.n_head} heads, d_model {cfg.d_model}, "
                      f"vocabulary {cfg.d_vocab}, {jnp.dtype(model.dtype).name})"],
            ["jpatch", jpatch.__version__],
            ["date", run.settings["date"]],
            ["device", f"{jax.devices()[0].platform} x {len(jax.devices())}"],
        ]),
        "",
        "## Settings",
        "",
        _table(["setting", "value"], settings),
        "",
        "## Runtime (seconds; a sweep reused by a later section counts in the first)",
        "",
        _table(["section", "seconds"], timings),
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


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    return x


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
              noise_seed=1, min_bucket=8, overwrite=False, progress=True):
    """Rerun the paper's five comparisons on `model` and write `out_dir/report.md`.

    n_prompts: IOI prompts; n_factual: factual-recall prompts (default 2 x n_prompts),
      taken from the largest (token length, subject length) buckets (`choose_factual`);
      every bucket is swept separately and per-layer results are averaged weighted by
      prompt count.
    noise_samples, noise_scale, noise_seed: Gaussian noise (ROME: 10 samples, 3 x std, seed 1).
    window: the sliding window compared with window 1 (section 4).
    top_k: heads compared between localizations (default: 5% of the heads, 3..10).
    negative_threshold: a normalized effect below -threshold counts as clearly negative.
    ioi_split: IOI names and templates ("all", "train", "test": the held-out ones a toy model never saw).
    overwrite: replace a non-empty out_dir (refused otherwise, before any work).
    Returns the path of report.md. Nothing is left at out_dir if a section raises.
    """
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
        run = _Run(model, model_name, Path(tmp), settings, progress)
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
        (run.out / "results.json").write_text(json.dumps(_jsonable(run.numbers), indent=1), encoding="utf-8")
        np.savez(run.out / "results.npz", **run.arrays)
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
                        help="IOI names and templates split (default test: ones a toy model never saw)")
    parser.add_argument("--seed", type=int, default=0, help="IOI prompt seed (default 0)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
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
                         progress=not args.quiet)
    except (OSError, ValueError) as e:
        from jpatch.cli import cli_message

        message = cli_message(e)
        message = re.sub(r"\b(n_prompts|n_factual|noise_samples|noise_scale|window|ioi_split)\b",
                         lambda m: "--" + m.group(1).replace("_", "-"), message, count=1)
        print(f"jpatch paper: {message}", file=sys.stderr)
        return 2
    print(path)
    return 0
