"""Draw the README's cost-against-length plot from `bench.py --scaling --json` files.

    python scripts/plot_scaling.py docs/scaling.png run1.json [run2.json ...]

One panel per batch size (GPT-2 small's shape): seconds per resid_pre sweep against prompt
length, log-log, for jpatch warm and cold and TransformerLens (filled markers where measured,
hollow where extrapolated from its per-patch time). Later files win where two runs measured
the same case.
"""

import json
import sys

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def load_rows(paths):
    rows = {}
    for path in paths:
        with open(path) as f:
            for row in json.load(f).get("scaling", []):
                rows[(row["model"], row["tokens"], row["batch"])] = row
    return [r for k, r in sorted(rows.items()) if k[0] == "small"]


def plot(rows, out):
    batches = sorted({r["batch"] for r in rows})
    if not batches:
        raise SystemExit("no GPT-2-small scaling rows in the given files")
    fig, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 4), squeeze=False)
    for ax, batch in zip(axes[0], batches):
        rs = sorted((r for r in rows if r["batch"] == batch), key=lambda r: r["tokens"])
        tokens = [r["tokens"] for r in rs]
        ax.plot(tokens, [r["jpatch_warm_s"] for r in rs], "o-", label="jpatch warm")
        ax.plot(tokens, [r["jpatch_cold_s"] for r in rs], "s--", label="jpatch cold (compile included)")
        ax.plot(tokens, [r["tl_s"] for r in rs], "k-", alpha=0.4)
        for r in rs:
            measured = r["tl"] == "measured"
            ax.plot(r["tokens"], r["tl_s"], "D", color="k", mfc="k" if measured else "none")
        ax.plot([], [], "D", color="k", label="TransformerLens (hollow: extrapolated)")
        for r in rs:
            ax.annotate(f"{r['warm_speedup']:.1f}x", (r["tokens"], r["jpatch_warm_s"]), textcoords="offset points",
                        xytext=(4, -12), fontsize=8)
        ax.set(xscale="log", yscale="log", xlabel="prompt length (tokens)", ylabel="seconds per sweep",
               title=f"resid_pre sweep, GPT-2 small shape, batch {batch}")
        ax.set_xticks(tokens, [str(t) for t in tokens])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    plot(load_rows(sys.argv[2:]), sys.argv[1])
