"""The `jpatch` command: demo, sweep, convert, paper, bulk, attribute, circuit, view."""

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np

from jpatch.engine.inputs import DIRECTIONS
from jpatch.methods import corrupt, metrics
from jpatch.engine.sweep import default_axes, sweep
from jpatch.methods.metrics import METRICS
from jpatch.face.interrupt import CtrlC
from jpatch.face.summary import clean_value, longest_prompt_tokens, shown, top_components
from jpatch.face.view_cli import add_html_flag, html_extra



MAX_LINE = 1000  # characters of one message line kept (an error may quote a huge value)


def shorten(line, limit=MAX_LINE):
    """`line`, cut to `limit` characters with a note of how long it was."""
    return line if len(line) <= limit else f"{line[:limit]}... ({len(line)} characters)"


class Fail(SystemExit):
    """A refused command: one `jpatch: ...` line on stderr and exit status 2, no traceback
    (a dataset's errors: one line each); lines quoting huge values are shortened."""

    status = 2

    def __init__(self, message):
        super().__init__(self.status)
        message = message if message.startswith("jpatch") else f"jpatch: {message}"
        self.message = "\n".join(shorten(line) for line in message.split("\n"))

    def __str__(self):
        return self.message


class Interrupted(Fail):
    """Ctrl-C: one `jpatch: interrupted` line and exit status 130 (128 + SIGINT), no traceback."""

    status = 130

    def __init__(self):
        super().__init__("jpatch: interrupted")


# Errors that describe a bad setting, path or model (raised by the library's checks; FloatingPointError:
# a metric that is not finite, e.g. of a model with NaN weights): reported as one line.
USER_ERRORS = (ValueError, OSError, TimeoutError, FloatingPointError)


def cli_message(error):
    """An API error's text in command-line words."""
    from jpatch.files.safety import OVERWRITE_HINT

    return str(error).replace(OVERWRITE_HINT, "pass --overwrite")


def choice_error(what, value, valid):
    return Fail(f"unknown {what} {value!r}; valid: {', '.join(valid)}")


def check_finite(minimum, **options):
    """Refuse any float option (given as name=value) that is NaN, infinite or below `minimum`."""
    for name, value in options.items():
        if not math.isfinite(value) or value < minimum:
            raise Fail(f"--{name.replace('_', '-')} must be a finite number >= {minimum:g}, got {value}")


def check_at_least(minimum, **options):
    """Refuse any option (given as name=value, "_" for "-") below `minimum`."""
    for name, value in options.items():
        if value is not None and value < minimum:
            raise Fail(f"--{name.replace('_', '-')} must be an integer >= {minimum}, got {value}")


def task_text(model):
    """(tokenizer, bos) of `model`'s tasks (`jpatch.data.tasks.wording.for_model`: GPT-2's as before;
    another family's own tokenizer.json and BOS convention); a model without a tokenizer is refused."""
    from jpatch.data.tasks.wording import for_model

    if model is None:
        return None, False
    try:
        return for_model(model)
    except ValueError as e:
        raise Fail(f"the tasks need this model's tokenizer: {e}") from None


def load_task(name, n_prompts, seed, model=None):
    """The task's first `n_prompts` prompts as one Task (prompts of several lengths padded together),
    in `model`'s tokenizer (None: GPT-2's)."""
    from jpatch.data.tasks import combine, get_task

    kw = {} if name not in ("ioi", "greater-than") else {"n_prompts": n_prompts, "seed": seed}
    if name == "ioi":
        kw["split"] = "test"  # names and templates the bundled toy model never saw in IOI prompts
    tokenizer, bos = task_text(model)
    if tokenizer is not None:
        kw.update(tokenizer=tokenizer, bos=bos)
    try:
        task = get_task(name, **kw)
    except ValueError as e:
        raise Fail(str(e)) from None
    if isinstance(task, list):
        task = combine(task, name)
    return task.select(slice(0, n_prompts)) if len(task) > n_prompts else task


def make_corruption(model, task, corruption, site, *, noise_samples, noise_seed):
    """The corrupted Run for a task (noise_seed: Gaussian noise and resampling)."""
    clean, mask = task.clean_tokens, task.attention_mask
    declared = task.key_counts() > 0
    if corruption == "str":  # prompts that declare key positions must differ only there
        positions = task.key_mask() | ~declared[:, None]
        return corrupt.token_replacement(clean, task.corrupted_tokens, positions, attention_mask=mask)
    if corruption == "noise" and not declared.all():
        lines = task.info.get("line", np.arange(1, len(task) + 1))
        raise Fail(f"--corruption noise needs key_positions (the tokens Gaussian noise corrupts) for every prompt; "
                   f"{(~declared).sum()} have none (line(s) {np.asarray(lines)[~declared][:20].tolist()})")
    if corruption == "noise":
        return corrupt.gaussian_noise(model, clean, task.key_positions, n_samples=noise_samples,
                                      std_tokens=task.key_token_ids(), seed=noise_seed, attention_mask=mask)
    if corruption == "zero":
        return corrupt.zero_ablation(model, clean, site)
    if corruption == "mean":
        return corrupt.mean_ablation(model, clean, site, clean)
    if corruption == "resample":
        return corrupt.resample_ablation(clean, clean, seed=noise_seed)
    raise choice_error("corruption", corruption, corrupt.CORRUPTIONS)


def make_metric(task, name):
    """The task's own metric for "logit-diff" (Greater-Than: its probability difference), else by name."""
    if name == "logit-diff":
        return task.metric()
    try:
        return metrics.by_name(name, task.answers, task.contrasts)
    except ValueError:
        raise choice_error("metric", name, METRICS) from None


def load_model(name):
    import jpatch

    try:
        model = jpatch.load(name)
    except (FileNotFoundError, ValueError, OSError) as e:
        raise Fail(f"cannot load model {name!r}: {e}") from None
    return model


def run_sweep(model, task, site, axes, *, corruption, metric, direction, window, noise_samples, noise_seed):
    corrupted = make_corruption(model, task, corruption, site, noise_samples=noise_samples, noise_seed=noise_seed)
    return sweep(model, task.clean_tokens, corrupted, site, make_metric(task, metric),
                 direction=direction, window=window, axes=axes, attention_mask=task.attention_mask)


def write_sweeps(out, model_name, task, sweeps, settings, overwrite, kind, extra=None):
    """Write each sweep's result.npz + settings.json and heatmap into `out` (a jpatch `kind`
    output), atomically: into out/<name>/ and out/<name>.png, or straight into `out` for a
    single sweep named "". extra(folder): writes further files into the same output."""
    from jpatch.face import plot
    from jpatch.files.atomic import atomic_dir
    from jpatch.runs.results import load_result, save_result

    tokens = longest_prompt_tokens(task)
    with atomic_dir(Path(out), overwrite, kind=kind) as tmp:
        for name, (site, axes, result) in sweeps.items():
            # the array is named after its site; "clean" lets a noising heatmap show patched - clean
            known = getattr(result, "normalization", None) is not None  # a SweepResult knows its baselines
            saved = save_result(tmp / name, {site: result},
                                {**settings, "site": site, "axes": list(axes),
                                 **({"clean": clean_value(result)} if known else {})}, overwrite=not name)
            if len(axes) == 2:
                fig = plot.plot_sweep(load_result(saved), tokens=tokens)
                plot.save(fig, tmp / f"{name or 'heatmap'}.png")
        if extra is not None:
            extra(tmp)
    return Path(out)


def add_task_arguments(parser, *, site):
    """The options of a command that patches (or estimates) one site on a task."""
    parser.add_argument("--model", default="toy")
    parser.add_argument("--task", default="ioi", help="ioi | factual | greater-than | a .jsonl file")
    parser.add_argument("--site", default=site, help="e.g. resid_pre, attn_out, mlp_out, z, q, k, v, pattern")
    parser.add_argument("--axes", help="comma-separated result axes, e.g. layer,head (default per site)")
    parser.add_argument("--corruption", default="str", help=" | ".join(corrupt.CORRUPTIONS))
    parser.add_argument("--metric", default="logit-diff", help=" | ".join(METRICS))
    parser.add_argument("--direction", default="denoise", choices=DIRECTIONS)
    parser.add_argument("--n-prompts", type=int, default=32)
    parser.add_argument("--noise-samples", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0, help="prompt sampling seed (default: 0)")
    parser.add_argument("--noise-seed", type=int, default=corrupt.NOISE_SEED,
                        help=f"Gaussian-noise / resampling seed (default: {corrupt.NOISE_SEED})")


def check_axes(model, site, axes, window=1):
    """Refuse axes (or a window) the sweep engine would refuse for `site` on `model`, before any compile."""
    from jpatch.engine.sweep import make_patches

    try:
        make_patches(model.config, site, axes, 1, 1, window=window)
    except (KeyError, ValueError) as e:
        raise Fail(f"--site {site} --axes {','.join(axes)}: {e.args[0] if e.args else e}") from None


def check_out(out, overwrite, kind):
    """Refuse an output folder jpatch may not write, before any work."""
    from jpatch.files.atomic import check_target

    try:
        check_target(out, overwrite, kind=kind)
    except OSError as e:
        raise Fail(cli_message(e)) from None


def cmd_demo(args):
    check_at_least(1, n_prompts=args.n_prompts)
    check_out(args.out, True, "demo")  # replaces only an earlier demo output
    model = load_model(args.model)
    task = load_task("ioi", args.n_prompts, args.seed, model)
    tokens = longest_prompt_tokens(task)
    print(f"model {args.model}: {model.config.n_layer} layers x {model.config.n_head} heads; "
          f"IOI, {len(task)} prompts of {task.seq_len} tokens, e.g. {task.prompts[0]!r}")
    print("corruption: symmetric token replacement (ABC names); metric: normalized logit difference; denoising")
    if task.attention_mask is not None:  # IOI templates differ in length and name positions
        print(f"prompts of {task.lengths.min()} to {task.seq_len} tokens, right-padded; positions are token indices "
              "(the names sit at different indices per template), labelled with the longest prompt's tokens")
    common = dict(corruption="str", metric="logit-diff", direction="denoise", window=1,
                  noise_samples=1, noise_seed=corrupt.NOISE_SEED)
    start = time.perf_counter()
    sweeps = {
        "resid_pre": ("hook_resid_pre", ("layer", "pos"),
                      run_sweep(model, task, "hook_resid_pre", ("layer", "pos"), **common)),
        "heads": ("attn.hook_z", ("layer", "head"), run_sweep(model, task, "attn.hook_z", ("layer", "head"), **common)),
    }
    elapsed = time.perf_counter() - start
    for name, (site, axes, result) in sweeps.items():
        print(f"\ntop {site} components ({' x '.join(axes)}):")
        print("\n".join(top_components(result, axes, tokens)))
    settings = {"model": args.model, "task": "ioi", "n_prompts": len(task), **common}
    out = write_sweeps(args.out, args.model, task, sweeps, settings, overwrite=True, kind="demo",
                       extra=html_extra(args, f"jpatch demo: {args.model}, IOI"))
    print(f"\n{sum(np.prod(r.shape) for _, _, r in sweeps.values())} patches in {elapsed:.1f} s; "
          f"heatmaps and results in {out}/")


def cmd_sweep(args):
    from jpatch.model import sites
    if args.corruption not in corrupt.CORRUPTIONS:
        raise choice_error("corruption", args.corruption, corrupt.CORRUPTIONS)
    if args.metric not in METRICS:
        raise choice_error("metric", args.metric, METRICS)
    try:
        site = sites.canonical(args.site)
    except KeyError as e:
        raise Fail(e.args[0]) from None
    check_at_least(1, window=args.window, n_prompts=args.n_prompts, noise_samples=args.noise_samples)
    try:
        axes = tuple(args.axes.split(",")) if args.axes else default_axes(site)
    except (KeyError, ValueError) as e:
        raise Fail(f"--site {args.site}: {e.args[0]}") from None
    check_out(args.out, args.overwrite, "sweep")
    model = load_model(args.model)
    check_axes(model, site, axes, args.window)
    task = load_task(args.task, args.n_prompts, args.seed, model)
    try:
        result = run_sweep(model, task, site, axes, corruption=args.corruption, metric=args.metric,
                           direction=args.direction, window=args.window, noise_samples=args.noise_samples,
                           noise_seed=args.noise_seed)
    except (ValueError, FloatingPointError) as e:
        raise Fail(str(e)) from None
    effect = " (noising: patched - clean)" if args.direction == "noise" else ""
    print(f"{site} over {' x '.join(axes)}: top components{effect}")
    print("\n".join(top_components(shown(result, args.direction), axes, longest_prompt_tokens(task))))
    settings = {"model": args.model, "task": args.task, "n_prompts": len(task), "corruption": args.corruption,
                "metric": args.metric, "direction": args.direction, "window": args.window, "seed": args.seed,
                "noise_samples": args.noise_samples, "noise_seed": args.noise_seed}
    out = write_sweeps(args.out, args.model, task, {"": (site, axes, result)}, settings, args.overwrite, "sweep",
                       extra=html_extra(args, f"jpatch sweep: {args.model}, {args.task}, {site}"))
    print(f"results in {out}/")


def cmd_convert(args):
    from jpatch.model.convert import convert_hf

    try:
        out = convert_hf(args.src, args.out, dtype=args.dtype, overwrite=args.overwrite)
    except (FileNotFoundError, FileExistsError, ValueError, KeyError, OSError, ImportError) as e:
        raise Fail(f"jpatch convert: {cli_message(e)}") from None
    print(f"converted {args.src} -> {out}")


class _HelpWithDefaults(argparse.HelpFormatter):
    """--help lists every option's default (options without a help text too)."""

    @staticmethod
    def _shows_default(action):
        return action.option_strings and not any(action.default is v for v in (None, False, argparse.SUPPRESS))

    def _format_action(self, action):
        if not action.help and self._shows_default(action):
            action.help = "(default: %(default)s)"  # argparse prints nothing for an option without help
        return super()._format_action(action)

    def _get_help_string(self, action):
        help = action.help or ""
        if self._shows_default(action) and "default" not in help:
            help = f"{help} (default: %(default)s)"
        return help


def _delegate(module, command):
    """Subcommands whose module defines add_arguments(parser) and main(args)."""
    import importlib

    def add(subparsers, help):
        parser = subparsers.add_parser(command, help=help, description=help, formatter_class=_HelpWithDefaults)
        mod = importlib.import_module(module)
        mod.add_arguments(parser)
        parser.set_defaults(func=mod.main)

    return add


def build_parser():
    parser = argparse.ArgumentParser(prog="jpatch", description="Fast batched activation patching for GPT-2 (JAX).",
                                     formatter_class=_HelpWithDefaults)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="IOI sweeps (resid_pre, heads) on the bundled model, with heatmaps",
                          description="Run the IOI sweeps of resid_pre (layer x position) and attention-head "
                                      "outputs (layer x head) with symmetric token replacement and normalized "
                                      "logit difference; print the top components and write heatmaps.",
                          formatter_class=_HelpWithDefaults)
    demo.add_argument("--model", default="toy", help="a folder or a name under weights/ (default: toy)")
    demo.add_argument("--out", default="results/demo",
                      help="output folder (default: results/demo); replaces only an earlier demo output")
    demo.add_argument("--n-prompts", type=int, default=32)
    demo.add_argument("--seed", type=int, default=0)
    add_html_flag(demo)
    demo.set_defaults(func=cmd_demo)

    sweep = sub.add_parser("sweep", help="one sweep of a site on a task", description="One patching sweep.",
                           formatter_class=_HelpWithDefaults)
    add_task_arguments(sweep, site="resid_pre")
    sweep.add_argument("--window", type=int, default=1)
    sweep.add_argument("--out", required=True)
    sweep.add_argument("--overwrite", action="store_true")
    add_html_flag(sweep)
    sweep.set_defaults(func=cmd_sweep)

    convert = sub.add_parser("convert", help="convert HF weights (GPT-2, NeoX, Llama, Qwen, Mistral, Gemma 2)",
                             description="Convert a Hugging Face checkpoint (folder or hub id) of GPT-2, GPT-NeoX "
                                         "(Pythia), Llama, Qwen 2 / 3, Mistral or Gemma 2 (config.json's model_type) "
                                         "to weights/<name>; the folder's tokenizer.json comes along.",
                             formatter_class=_HelpWithDefaults)
    convert.add_argument("src")
    convert.add_argument("out")
    convert.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    convert.add_argument("--overwrite", action="store_true")
    convert.set_defaults(func=cmd_convert)

    _delegate("jpatch.face.report", "paper")(sub, "rerun the paper's comparisons and write a Markdown report")
    _delegate("jpatch.face.bulk_cli", "bulk")(sub, "resumable sweeps over a JSONL dataset, sharded over devices and hosts")
    _delegate("jpatch.face.attribute_cli", "attribute")(sub, "attribution-patching estimate of a sweep (--compare-exact: "
                                                        "agreement with the exact sweep)")
    _delegate("jpatch.face.circuit_report", "circuit")(sub, "path patching, ACDC, EAP / EAP-IG circuits and their "
                                                       "faithfulness, as a Markdown report with the circuit picture")
    _delegate("jpatch.face.view_cli", "view")(sub, "every result in a folder as one self-contained, interactive HTML "
                                              "file (heatmaps, prompt picker, attention, circuit, scatter)")
    return parser


def main(argv=None):
    ctrl_c = CtrlC(str(Interrupted()), Interrupted.status).install()  # before the parser, which imports the subcommands' modules
    command = None
    try:
        try:
            args = build_parser().parse_args(argv)
            command = args.command
            result = args.func(args)
            if not ctrl_c.signalled:
                return result
            fail = Interrupted()  # a Ctrl-C whose KeyboardInterrupt was swallowed: the command still stops here
        except KeyboardInterrupt:  # Ctrl-C: exit status 130 as usual, without a traceback
            fail = Interrupted()
        except USER_ERRORS as e:  # after a Ctrl-C: an error it caused (a library may wrap the interrupt)
            fail = Interrupted() if ctrl_c.signalled else Fail(f"jpatch {command}: {cli_message(e)}")
        except Fail as e:
            fail = e
        except Exception:
            if not ctrl_c.signalled:
                raise
            fail = Interrupted()
        if ctrl_c.signalled:  # a real Ctrl-C, everything cleaned up on the way here: no finalization
            ctrl_c.leave()
        print(fail, file=sys.stderr)
        raise fail
    finally:
        ctrl_c.restore()


if __name__ == "__main__":
    sys.exit(main())
