"""`jpatch attribute`: an attribution-patching estimate of a sweep, optionally compared with the
exact sweep (`jpatch.methods.agreement.compare_exact`)."""

import json

import numpy as np

from jpatch.engine.sweep import default_axes
from jpatch.face import cli, plot, summary
from jpatch.face.cli import add_task_arguments
from jpatch.methods import attribution, corrupt
from jpatch.methods.agreement import compare_exact, format_report, scatter
from jpatch.methods.attribution import METHODS
from jpatch.model import sites


def add_arguments(parser):
    add_task_arguments(parser, site="z")
    parser.add_argument("--method", default="atp", help=" | ".join(METHODS))
    parser.add_argument("--compare-exact", action="store_true",
                        help="also run the exact sweep and report how well the estimate agrees")
    parser.add_argument("--diagnostic", type=int, default=0,
                        help="with --compare-exact: exactly patch this many random subsets outside the top 5%%")
    parser.add_argument("--out", required=True)
    parser.add_argument("--overwrite", action="store_true")


def main(args):
    if args.method not in attribution.METHODS:
        raise cli.choice_error("method", args.method, attribution.METHODS)
    if args.corruption not in corrupt.CORRUPTIONS:
        raise cli.choice_error("corruption", args.corruption, corrupt.CORRUPTIONS)
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
    cli.check_axes(model, site, axes)
    task = cli.load_task(args.task, args.n_prompts, args.seed, model)
    corrupted = cli.make_corruption(model, task, args.corruption, site, noise_samples=args.noise_samples,
                                    noise_seed=args.noise_seed)
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
    print("\n".join(summary.top_components(estimate, axes, summary.longest_prompt_tokens(task))))
    settings = {"model": args.model, "task": args.task, "n_prompts": len(task), "corruption": args.corruption,
                "metric": args.metric, "direction": args.direction, "window": 1, "seed": args.seed,
                "noise_samples": args.noise_samples, "noise_seed": args.noise_seed, "method": args.method}
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
