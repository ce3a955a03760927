"""The pieces the paper report is built from: the prompts and noise of each task, the state of
a report run (`ReportRun`: model, tasks, sweeps and the numbers quoted), Markdown and figure
helpers, and the sweeps the sections share."""

import dataclasses
import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jpatch.methods import corrupt
from jpatch.engine.inputs import as_run
from jpatch.data.tasks import factual_task, ioi_task
from jpatch.engine.sweep import sweep

HEADS = ("layer", "head")
IOI_HEAD_CLASSES = {
    **{h: "name mover" for h in ((9, 6), (9, 9), (10, 0))},
    **{h: "negative name mover" for h in ((10, 7), (11, 10))},
    **{h: "S-inhibition" for h in ((7, 3), (7, 9), (8, 6), (8, 10))},
    **{h: "induction" for h in ((5, 5), (5, 8), (5, 9), (6, 9))},
    **{h: "duplicate token" for h in ((0, 1), (0, 10), (3, 0))},
    **{h: "previous token" for h in ((2, 2), (4, 11))},
    **{h: "backup name mover" for h in ((9, 0), (9, 7), (10, 1), (10, 2), (10, 6), (10, 10), (11, 2), (11, 9))},
}


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
    """The key-position token ids of every prompt of `tasks` (`Task.key_token_ids`)."""
    return np.concatenate([t.key_token_ids() for t in tasks])


def ioi_noise(model, task, *, n_samples=10, scale=3.0, seed=corrupt.NOISE_SEED):
    """The Gaussian-noise corruption of IOI: noise on the three name tokens, nu = scale x
    the std of the name tokens' embeddings (every occurrence in the batch)."""
    return corrupt.gaussian_noise(model, task.clean_tokens, task.key_positions, n_samples=n_samples, scale=scale,
                                  std_tokens=subject_tokens([task]), seed=seed, attention_mask=task.attention_mask)


def factual_noise(model, task, std, *, n_samples=10, scale=3.0, seed=corrupt.NOISE_SEED):
    """The Gaussian-noise corruption of one factual bucket: noise on the subject tokens,
    nu = scale x `std` (one std for every bucket of the run)."""
    return corrupt.gaussian_noise(model, task.clean_tokens, task.key_positions, n_samples=n_samples, scale=scale,
                                  std=std, seed=seed)


@dataclasses.dataclass
class ReportRun:
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
        from jpatch.face import plot
        plot.save(fig, str(self.out / name))
        return name


def fmt(x, digits=4):
    x = float(x)
    return "nan" if not math.isfinite(x) else f"{x:.{digits}f}"


def md_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def head_name(index, n_head):
    return f"{index // n_head}.{index % n_head}"


def _gpt2_small(model):
    return model.config.n_layer == 12 and model.config.n_head == 12


def head_rows(model, indices, columns):
    """Table rows (head, [Wang et al. class], value per column) for flat head indices."""
    n_head = model.config.n_head
    rows = []
    for i in indices:
        row = [head_name(i, n_head)]
        if _gpt2_small(model):
            row.append(IOI_HEAD_CLASSES.get((i // n_head, i % n_head), ""))
        rows += [row + [fmt(np.ravel(c)[i]) for c in columns]]
    return rows


def head_header(model, names):
    return ["head"] + (["Wang et al. class"] if _gpt2_small(model) else []) + list(names)


def heatmap_figure(panels, *, rows="layer", cols="head", col_labels=None):
    """Side-by-side heatmaps: panels = [(values, title, colorbar label)]."""
    import matplotlib.pyplot as plt

    from jpatch.face import plot
    shape = np.shape(panels[0][0])
    width = max(4.0, 0.45 * shape[1] + 2.5)
    height = max(3.0, 0.3 * shape[0] + 1.5)
    fig, axes = plt.subplots(1, len(panels), figsize=(width * len(panels), height + 0.4), squeeze=False)
    for ax, (values, title, label) in zip(axes[0], panels):
        plot.heatmap(values, rows=rows, cols=cols, col_labels=col_labels, title=title, ax=ax, colorbar_label=label)
    fig.tight_layout()
    return fig


def curve_figure(panels, n_layer):
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


def baseline(model, run, answers, contrasts, lengths=None):
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


def ioi(run):
    if "ioi" not in run.cache:
        s = run.settings
        task = ioi_task(s["n_prompts"], seed=s["seed"], split=s["ioi_split"])
        gn = ioi_noise(run.model, task, n_samples=s["noise_samples"], scale=s["noise_scale"], seed=s["noise_seed"])
        run.cache["ioi"] = (task, gn)
        run.numbers["ioi_noise_std"] = corrupt.embedding_std(run.model, subject_tokens([task]))
        run.numbers["ioi_nu"] = s["noise_scale"] * run.numbers["ioi_noise_std"]
    return run.cache["ioi"]


def factual(run):
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


def ioi_heads(run, key, corrupted, metric, direction="denoise"):
    task, _ = ioi(run)
    return run.sweep(key, task.clean_tokens, corrupted, "z", metric, axes=HEADS, direction=direction,
                     attention_mask=task.attention_mask)


IOI_ROLES = ("1st name", "2nd name", "S2", "end")


def ioi_resid(run, key, metric, direction="denoise"):
    """resid_pre at each IOI role, [layer, role]: the templates put the names at different
    positions, so each prompt is patched at its own first name, second name, repeated
    subject and last token (`prompt_positions`) rather than at one position index."""
    task, _ = ioi(run)
    if key not in run.arrays:
        roles = [*task.key_positions.T, task.lengths - 1]
        run.arrays[key] = np.stack([run.sweep(f"{key}/{name}", task.clean_tokens, task.corrupted_tokens, "resid_pre",
                                              metric, prompt_positions=pos, direction=direction,
                                              attention_mask=task.attention_mask)[:, 0]
                                    for name, pos in zip(IOI_ROLES, roles)], 1)
    return run.arrays[key]


FACTUAL_SITES = {"mlp_out": "mlp", "attn_out": "attn", "resid_pre": "resid_pre"}


def factual_curve(run, corruption, window, site="mlp_out"):
    """Per-layer normalized logit difference of patching `site` (default the MLP output)
    at the last subject token, averaged over the buckets weighted by their prompt counts."""
    key = f"factual_{FACTUAL_SITES[site]}_{corruption}_w{window}"
    if key not in run.arrays:
        tasks, noise = factual(run)
        curves = []
        for task, gn in zip(tasks, noise):
            corrupted = gn if corruption == "gn" else task.corrupted_tokens
            result = run.sweep(f"{key}/{task.name}", task.clean_tokens, corrupted, site, task.metric(),
                               prompt_positions=task.last_key_position, window=window)
            curves.append(result[:, 0])
        weights = np.array([len(t) for t in tasks], float)
        run.arrays[key] = (np.stack(curves) * weights[:, None]).sum(0) / weights.sum()
    return run.arrays[key]


