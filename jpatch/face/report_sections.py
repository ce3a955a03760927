"""The six sections of the paper report, each a function of a `ReportRun` returning Markdown:
the setting, the measured comparison, and what the paper found."""

import math

import numpy as np

from jpatch.face.report_parts import (FACTUAL_SITES, HEADS, IOI_ROLES, baseline, curve_figure, factual, factual_curve, fmt,
                                      head_header, head_name, head_rows, heatmap_figure, ioi, ioi_heads, ioi_resid,
                                      md_table)
from jpatch.methods import metrics
from jpatch.methods.stats import peak, spearman, top_k



def section_corruption_ioi(run):
    model, s = run.model, run.settings
    task, gn = ioi(run)
    metric = task.metric()
    str_ = ioi_heads(run, "ioi_heads_str_ld_denoise", task.corrupted_tokens, metric)
    gn_ = ioi_heads(run, "ioi_heads_gn_ld_denoise", gn, metric)
    k = s["top_k"]
    top_str, top_gn = top_k(str_, k), top_k(gn_, k)
    overlap = len(set(top_str) & set(top_gn))
    rho = spearman(str_, gn_)
    base = {"clean": baseline(model, task.clean_tokens, task.answers, task.contrasts, task.lengths),
            "str": baseline(model, task.corrupted_tokens, task.answers, task.contrasts, task.lengths),
            "gn": baseline(model, gn, task.answers, task.contrasts, task.lengths)}
    run.numbers["corruption_ioi"] = {
        "top_str": [head_name(i, model.config.n_head) for i in top_str],
        "top_gn": [head_name(i, model.config.n_head) for i in top_gn],
        "overlap": overlap, "k": k, "spearman": rho, "baselines": base,
    }
    fig = run.figure(heatmap_figure([(gn_, "GN (name tokens)", "normalized logit diff"),
                                     (str_, "STR (ABC names)", "normalized logit diff")]),
                     "fig1_ioi_heads_gn_vs_str.png")
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
        f"embeddings = {fmt(run.numbers['ioi_nu'])}, {s['noise_samples']} noise samples (seed {s['noise_seed']}), "
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
        md_table(head_header(model, ["STR", "GN", "in STR top", "in GN top"]),
                 [r + ["yes" if i in top_str else "", "yes" if i in top_gn else ""]
                  for r, i in zip(head_rows(model, order, [str_, gn_]), order)]),
        "",
        md_table(["comparison", "value"], [[f"top-{k} overlap (of {k})", overlap], ["Spearman rank correlation", fmt(rho)]]),
        "",
        f"**This model.** STR's top heads: {', '.join(run.numbers['corruption_ioi']['top_str'])}; GN's: "
        f"{', '.join(run.numbers['corruption_ioi']['top_gn'])}. The two localizations **{verdict}** "
        f"(top-{k} overlap {overlap}/{k}, Spearman {fmt(rho, 2)}; 'agree' means the same top-{k} and rho >= 0.9, "
        f"'partly agree' at least half of them and rho >= 0.5).",
    ]


def _baseline_table(columns, baselines, str_label):
    """The clean / STR / GN task baselines as a table, with a caution when the model hardly does the task."""
    runs = (("clean", baselines["clean"]), (str_label, baselines["str"]), ("GN", baselines["gn"]))
    table = md_table(["run"] + columns, [[name, fmt(b["logit_diff"]), fmt(b["accuracy"]), fmt(b["p_answer"])]
                                         for name, b in runs])
    return [table, *_caution(baselines["clean"], baselines["str"])]


def _caution(clean, corrupted):
    """A warning line when the model hardly does the task: normalized effects then
    divide by a small clean - corrupted gap and mean little."""
    gap = clean["logit_diff"] - corrupted["logit_diff"]
    if clean["accuracy"] >= 0.6 and gap >= 0.5:
        return []
    return ["", f"**Caution:** the model hardly does this task (clean accuracy {fmt(clean['accuracy'], 2)}, clean - "
                f"corrupted logit difference {fmt(gap, 3)}); normalized effects divide by that gap and mean little."]


def _bucket_table(run, tasks):
    return md_table(["bucket", "prompts", "weight"],
                    [[t.name, len(t), fmt(len(t) / sum(len(u) for u in tasks), 3)] for t in tasks])


def section_corruption_factual(run):
    model, s = run.model, run.settings
    tasks, noise = factual(run)
    str_ = factual_curve(run, "str", 1)
    gn_ = factual_curve(run, "gn", 1)
    context = {(site, c): factual_curve(run, c, 1, site) for site in ("attn_out", "resid_pre") for c in ("str", "gn")}
    p_str, p_gn = peak(str_), peak(gn_)
    rho = spearman(str_, gn_)
    base = {name: [] for name in ("clean", "str", "gn")}
    for t, gn in zip(tasks, noise):
        base["clean"].append(baseline(model, t.clean_tokens, t.answers, t.contrasts))
        base["str"].append(baseline(model, t.corrupted_tokens, t.answers, t.contrasts))
        base["gn"].append(baseline(model, gn, t.answers, t.contrasts))
    w = np.array([len(t) for t in tasks], float) / sum(len(t) for t in tasks)
    mean = {name: {m: float(sum(wi * b[m] for wi, b in zip(w, bs))) for m in bs[0]} for name, bs in base.items()}
    run.numbers["corruption_factual"] = {"str": str_.tolist(), "gn": gn_.tolist(), "peak_str": p_str[0],
                                         "peak_gn": p_gn[0], "spearman": rho, "baselines": mean}
    site_curves = lambda c, mlp: [("MLP out", mlp), ("attention out", context[("attn_out", c)]),
                                  ("resid_pre (hidden state)", context[("resid_pre", c)])]
    fig = run.figure(curve_figure([("MLP output at the last subject token", [("STR", str_), ("GN", gn_)]),
                                   ("STR: the three sites", site_curves("str", str_)),
                                   ("GN: the three sites", site_curves("gn", gn_))], model.config.n_layer),
                     "fig2_factual_mlp_gn_vs_str.png")
    run.numbers["corruption_factual"]["context"] = {f"{FACTUAL_SITES[site]}_{c}": v.tolist()
                                                    for (site, c), v in context.items()}
    n = sum(len(t) for t in tasks)
    largest = max(np.abs(str_).max(), np.abs(gn_).max())
    small = (f" Both MLP curves stay below {fmt(largest, 3)} of the clean - corrupted gap: in this model the MLP "
             "outputs at the last subject token carry little of the effect (compare the residual stream and "
             "attention curves)." if largest < 0.05 else "")
    return [
        f"**Setting.** Factual recall (the bundled paired facts, STR pairs in both directions), {n} prompts in "
        f"{len(tasks)} (token length, subject length) bucket(s): each bucket is swept on its own and the per-layer "
        "results are averaged weighted by prompt count. Site: MLP output (`mlp_out`) at the last subject token. "
        "Metric: normalized logit difference (the prompt's answer vs its pair's answer). Direction: denoising. "
        f"Window: 1. Corruptions: **STR** = the paired prompt (another subject of the same token length); "
        f"**GN** = Gaussian noise on the subject tokens' embeddings, nu = {s['noise_scale']:g} x std of the subject "
        f"tokens' embeddings (every subject token of the chosen prompts) = {fmt(run.numbers['factual_nu'])}, "
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
        md_table(["layer", "STR", "GN", "STR attn", "GN attn", "STR resid_pre", "GN resid_pre"],
                 [[l, fmt(a), fmt(b)] + [fmt(context[(site, c)][l]) for site in ("attn_out", "resid_pre")
                                         for c in ("str", "gn")] for l, (a, b) in enumerate(zip(str_, gn_))]),
        "",
        f"**This model.** MLP outputs: STR peaks at layer {p_str[0]} ({fmt(p_str[1], 3)}), GN at layer {p_gn[0]} "
        f"({fmt(p_gn[1], 3)}); Spearman rank correlation of the two per-layer curves {fmt(rho, 2)}. The peak layers "
        f"{'agree' if p_str[0] == p_gn[0] else 'differ'}.{small}",
    ]


def section_metrics(run):
    model, s = run.model, run.settings
    task, _ = ioi(run)
    ld = ioi_heads(run, "ioi_heads_str_ld_denoise", task.corrupted_tokens, task.metric())
    prob = ioi_heads(run, "ioi_heads_str_prob_denoise", task.corrupted_tokens,
                     metrics.probability(task.answers, normalize=True))
    kl = ioi_heads(run, "ioi_heads_str_kl_denoise", task.corrupted_tokens, metrics.kl(normalize=True))
    thr, k = s["negative_threshold"], s["top_k"]
    named = (("logit_diff", ld), ("probability", prob), ("kl", kl))
    counts = {name: int((v < -thr).sum()) for name, v in named}
    positive = {name: int((v > thr).sum()) for name, v in named}
    top_ld = top_k(ld, k, by="max")
    most_negative = [i for i in top_k(ld, k, by="min") if ld.ravel()[i] < 0]
    run.numbers["metrics"] = {
        "negative_counts": counts, "positive_counts": positive, "threshold": thr,
        "most_negative_ld": [head_name(i, model.config.n_head) for i in most_negative],
        "min": {"logit_diff": float(ld.min()), "probability": float(prob.min()), "kl": float(kl.min())},
        "spearman_ld_prob": spearman(ld, prob), "spearman_ld_kl": spearman(ld, kl),
    }
    fig = run.figure(heatmap_figure([(ld, "logit difference", "normalized"), (prob, "probability", "normalized"),
                                     (kl, "KL divergence", "normalized")]), "fig3_ioi_heads_metrics.png")
    missed = [i for i in most_negative if ld.ravel()[i] < -thr and prob.ravel()[i] >= -thr]
    if most_negative:
        negative_rows = md_table(head_header(model, ["logit diff", "probability", "KL"]),
                                 head_rows(model, most_negative, [ld, prob, kl]))
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
        md_table(head_header(model, ["logit diff", "probability", "KL"]), head_rows(model, top_ld, [ld, prob, kl])),
        "",
        f"**Most negative heads under logit difference** (up to {k}) and what the other metrics give there:",
        "",
        negative_rows,
        "",
        f"**Heads with a clearly negative / positive effect** (normalized value < -{thr:g} / > {thr:g}):",
        "",
        md_table(["metric", f"heads < -{thr:g}", f"heads > {thr:g}", "minimum", "maximum", "Spearman vs logit diff"],
                 [[label, counts[name], positive[name], fmt(v.min()), fmt(v.max()),
                   "1" if name == "logit_diff" else fmt(spearman(ld, v))]
                  for label, (name, v) in zip(("logit difference", "probability", "KL divergence"), named)]),
        "",
        f"**This model.** Logit difference marks {counts['logit_diff']} head(s) clearly negative, probability "
        f"{counts['probability']}, KL {counts['kl']} (clearly positive: {positive['logit_diff']}, "
        f"{positive['probability']}, {positive['kl']}). "
        + (f"Heads negative under logit difference but not under probability: "
           f"{', '.join(head_name(i, model.config.n_head) for i in missed)}." if missed
           else "Probability misses none of the clearly negative logit-difference heads here."),
    ]


def section_window(run):
    model, s = run.model, run.settings
    tasks, _ = factual(run)
    w = s["window"]
    curves = {(c, win): factual_curve(run, c, win) for c in ("str", "gn") for win in (1, w)}
    rows, numbers = [], {}
    for (c, win), curve in curves.items():
        at, top, width = peak(curve)
        numbers[f"{c}_w{win}"] = {"peak_layer": at, "peak": top, "width": width, "curve": curve.tolist()}
        rows.append([c.upper(), win, at, fmt(top), width, fmt(curve.sum())])
    run.numbers["window"] = numbers
    fig = run.figure(curve_figure([(f"{c.upper()}: window 1 vs {w}", [(f"window {win}", curves[(c, win)])
                                                                      for win in (1, w)]) for c in ("str", "gn")],
                                  model.config.n_layer), "fig4_factual_mlp_window.png")
    table = md_table(["layer"] + [f"{c.upper()} w{win}" for c, win in curves],
                     [[l] + [fmt(v[l]) for v in curves.values()] for l in range(model.config.n_layer)])
    notes = []
    for c in ("str", "gn"):
        a, b = numbers[f"{c}_w1"], numbers[f"{c}_w{w}"]
        if a["peak"] <= 0 or b["peak"] <= 0:
            notes.append(f"{c.upper()}: no positive peak (largest values {fmt(a['peak'], 3)} with window 1, "
                         f"{fmt(b['peak'], 3)} with window {w}).")
            continue
        notes.append(f"{c.upper()}: window {w} peaks at layer {b['peak_layer']} ({fmt(b['peak'], 3)}, width "
                     f"{b['width']}) vs window 1 at layer {a['peak_layer']} ({fmt(a['peak'], 3)}, width {a['width']}); "
                     f"the peak is {fmt(b['peak'] / a['peak'], 2)}x as high and {b['width'] - a['width']:+d} "
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
        md_table(["corruption", "window", "peak layer", "peak value", "width (layers >= half peak)", "sum over layers"],
                 rows),
        "",
        table,
        "",
        "**This model.** " + " ".join(notes),
    ]


def section_direction(run):
    model, s = run.model, run.settings
    task, _ = ioi(run)
    metric, k = task.metric(), s["top_k"]
    den = ioi_heads(run, "ioi_heads_str_ld_denoise", task.corrupted_tokens, metric)
    noi = ioi_heads(run, "ioi_heads_str_ld_noise", task.corrupted_tokens, metric, direction="noise")
    res_den = ioi_resid(run, "ioi_resid_pre_str_ld_denoise", metric)
    res_noi = ioi_resid(run, "ioi_resid_pre_str_ld_noise", metric, direction="noise")
    drop, res_drop = 1 - noi, 1 - res_noi
    top_den, top_noi = top_k(den, k), top_k(drop, k)
    overlap = len(set(top_den) & set(top_noi))
    rho = spearman(den, drop)
    run.numbers["direction"] = {
        "top_denoise": [head_name(i, model.config.n_head) for i in top_den],
        "top_noise": [head_name(i, model.config.n_head) for i in top_noi],
        "overlap": overlap, "k": k, "spearman_heads": rho, "spearman_resid_pre": spearman(res_den, res_drop),
    }
    labels = list(IOI_ROLES)
    fig_heads = run.figure(heatmap_figure([(den, "denoising: recovered", "normalized logit diff"),
                                           (drop, "noising: destroyed (1 - metric)", "1 - normalized logit diff")]),
                           "fig5_ioi_heads_denoise_vs_noise.png")
    fig_resid = run.figure(heatmap_figure([(res_den, "denoising: recovered", "normalized logit diff"),
                                           (res_drop, "noising: destroyed (1 - metric)", "1 - normalized logit diff")],
                                          cols="pos", col_labels=labels), "fig5_ioi_resid_pre_denoise_vs_noise.png")
    order = list(dict.fromkeys(top_den + top_noi))
    res_top = lambda v: ", ".join(f"L{i // v.shape[1]} {labels[i % v.shape[1]]} ({fmt(v.ravel()[i], 2)})"
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
        md_table(head_header(model, ["denoising (recovered)", "noising (destroyed)", "in denoising top",
                                     "in noising top"]),
                 [r + ["yes" if i in top_den else "", "yes" if i in top_noi else ""]
                  for r, i in zip(head_rows(model, order, [den, drop]), order)]),
        "",
        md_table(["comparison", "value"],
                 [[f"heads: top-{k} overlap (of {k})", overlap], ["heads: Spearman rank correlation", fmt(rho)],
                  ["resid_pre: Spearman rank correlation", fmt(run.numbers["direction"]["spearman_resid_pre"])]]),
        "",
        f"**This model.** Denoising's top heads: {', '.join(run.numbers['direction']['top_denoise'])}; noising's: "
        f"{', '.join(run.numbers['direction']['top_noise'])} (overlap {overlap}/{k}, Spearman {fmt(rho, 2)}). "
        f"resid_pre, largest recovery (denoising): {res_top(res_den)}; largest damage (noising): {res_top(res_drop)}.",
    ]


def section_attribution(run):
    from jpatch.methods.agreement import agreement, top_k_recall
    from jpatch.methods.attribution import attribute

    model, s = run.model, run.settings
    task, _ = ioi(run)
    metric, k = task.metric(), s["top_k"]
    na = lambda x: "n/a" if not math.isfinite(x) else fmt(x, 3)  # e.g. a constant estimate has no correlation
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
    fig = run.figure(heatmap_figure([(run.arrays["ioi_heads_str_ld_denoise"], "exact patching", "normalized logit diff"),
                                     (z_atp, "AtP estimate", "normalized logit diff")]),
                     "fig6_ioi_heads_atp_vs_exact.png")
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
        md_table(["site", "method", "compared with", "Pearson", "Spearman", f"top-{k} recall", "sign agreement"], rows),
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


