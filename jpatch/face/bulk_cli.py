"""`jpatch bulk`: the command line of `jpatch.runs.bulk.bulk_sweep`."""

import math

import jax
import numpy as np

from jpatch.data.dataset import FILE_CORRUPTIONS, read_dataset
from jpatch.data.tasks.wording import for_model
from jpatch.engine.inputs import DIRECTIONS
from jpatch.engine.patching import SWEEPS
from jpatch.engine.scores import DEFAULT_MEMORY_BUDGET
from jpatch.files import html_view, safety
from jpatch.methods import corrupt, metrics
from jpatch.runs import results
from jpatch.runs.bulk import DEFAULT_SHARD_SIZE, bulk_sweep, check_positive, resolve_sites

DTYPES = ("float32", "bfloat16", "float16")  # --dtype


def parse_bytes(text):
    """'4G' / '512M' / '1e9' / '1073741824' -> int bytes."""
    text = str(text).strip()
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    scale = 1
    low = text.lower().removesuffix("ib").removesuffix("b")
    if low and low[-1] in units:
        scale, low = units[low[-1]], low[:-1]
    try:
        value = float(low) * scale
    except ValueError:
        raise ValueError(f"not a byte count: {text!r} (e.g. 4G, 512M, 1000000)") from None
    if not math.isfinite(value):
        raise ValueError(f"byte count must be a finite number, got {text!r}")
    if value <= 0:
        raise ValueError(f"byte count must be positive, got {text!r}")
    return int(value)


def add_arguments(parser):
    """The `jpatch bulk` options."""
    parser.add_argument("--model", required=True, help="model folder or name under weights/ (jpatch.model.checkpoint.load)")
    parser.add_argument("--data", required=True,
                        help="JSONL dataset: one {clean, corrupted, answer, contrast, key_positions} per line")
    parser.add_argument("--sites", default="resid_pre",
                        help=f"comma-separated sweeps ({', '.join(SWEEPS)}) or sites (default: resid_pre)")
    parser.add_argument("--corruption", choices=FILE_CORRUPTIONS, default="str",
                        help="str: the 'corrupted' prompts; noise: Gaussian noise on 'key_positions' (default: str)")
    parser.add_argument("--metric", choices=metrics.METRICS, default="logit-diff", help="default: logit-diff (normalized)")
    parser.add_argument("--direction", choices=DIRECTIONS, default="denoise", help="default: denoise")
    parser.add_argument("--window", type=int, default=1, help="sliding window of layers (default: 1)")
    parser.add_argument("--out", required=True, help="output folder (rerun the same command to resume)")
    parser.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE,
                        help=f"prompts per shard file (default: {DEFAULT_SHARD_SIZE})")
    parser.add_argument("--memory-budget", default=str(DEFAULT_MEMORY_BUDGET),
                        help="bytes per compiled call, e.g. 4G (default: 4G)")
    parser.add_argument("--seed", type=int, default=corrupt.NOISE_SEED,
                        help=f"Gaussian-noise seed (default: {corrupt.NOISE_SEED})")
    parser.add_argument("--n-samples", type=int, default=10, help="Gaussian-noise samples per prompt (default: 10)")
    parser.add_argument("--noise-scale", type=float, default=3.0, help="noise std = scale x embedding std (default: 3)")
    parser.add_argument("--noise-std", type=float, default=None,
                        help="embedding std (default: measured over the dataset's key tokens)")
    parser.add_argument("--dtype", default="float32", help=f"the weights' dtype: {' | '.join(DTYPES)} (default: "
                        "float32; bfloat16 halves the memory, attention and logits still accumulate in float32)")
    parser.add_argument("--distributed", action="store_true",
                        help="call jax.distributed.initialize() first (TPU pod slices, SLURM / GPU clusters)")
    parser.add_argument("--process-index", type=int, default=None, help="this process's share without jax.distributed")
    parser.add_argument("--process-count", type=int, default=None, help="number of processes sharing --out")
    parser.add_argument("--manifest-timeout", type=float, default=600.0,
                        help="seconds a process other than 0 waits for process 0's manifest (default: 600)")
    parser.add_argument("--break-locks", action="store_true",
                        help="first remove the lock files of --out (left by runs that are gone; a lock unrefreshed "
                             f"for {safety.LOCK_LEASE:g} s is taken over anyway); never while another run writes there")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    from jpatch.face.view_cli import add_html_flag

    add_html_flag(parser)
    return parser


def _family(name):
    """The family of the model folder `name` from its config.json ("gpt2" when it cannot be read:
    loading it then reports why)."""
    from jpatch.model.checkpoint import read_config, resolve

    try:
        return read_config(resolve(name))[0].family
    except (OSError, ValueError):
        return "gpt2"


def main(args):
    """Run `jpatch bulk` from parsed `args`; returns the exit status (refusals: `jpatch.face.cli.Fail`, status 2)."""
    from jpatch.model.checkpoint import load
    from jpatch.face.cli import Fail

    if (args.process_index is None) != (args.process_count is None):
        raise Fail("jpatch bulk: --process-index and --process-count go together")
    if args.dtype is not None and args.dtype not in DTYPES:
        raise Fail(f"jpatch bulk: unknown --dtype {args.dtype!r}; valid: {', '.join(DTYPES)}")
    if args.distributed:
        try:
            jax.distributed.initialize()
        except Exception as e:  # jax raises ValueError / RuntimeError / XlaRuntimeError here
            raise Fail(f"jpatch bulk: --distributed: jax.distributed.initialize() failed ({type(e).__name__}: "
                       f"{str(e).splitlines()[0] if str(e) else ''}); it needs a cluster environment (TPU pod, "
                       "SLURM, ...) or a coordinator address; without one use --process-index/--process-count") from None
    corruption, metric = args.corruption, args.metric
    try:
        safety.check_placement(args.out, inputs=[args.data])  # as for every output: not the working directory
        safety.check_writable(args.out)
        if math.isnan(args.manifest_timeout) or args.manifest_timeout < 0:
            raise ValueError(f"--manifest-timeout must be a number of seconds >= 0, got {args.manifest_timeout}")
        resolve_sites(args.sites, args.window)
        memory_budget = parse_bytes(args.memory_budget)
        for name in ("window", "shard_size", "n_samples"):
            if getattr(args, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be an integer >= 1, got {getattr(args, name)}")
        if corruption == "noise":
            check_positive("--noise-scale", args.noise_scale)
            if args.noise_std is not None:
                check_positive("--noise-std", args.noise_std)
        # Validate the data before loading weights, so a bad line is reported at once (GPT-2's tokenizer;
        # another family's dataset is read with the model's own, once loaded).
        gpt2 = _family(args.model) == "gpt2"
        dataset = read_dataset(args.data, corruption=corruption, metric=metric) if gpt2 else None
        model = load(args.model, dtype=args.dtype)
        if dataset is None:
            dataset = read_dataset(args.data, corruption=corruption, metric=metric, tokenizer=for_model(model)[0])
        if args.break_locks:
            for path in safety.break_locks(args.out):
                print(f"jpatch bulk: removed the lock {path}")
        run = bulk_sweep(model, dataset, args.sites, corruption, metric, args.out, direction=args.direction,
                         window=args.window, shard_size=args.shard_size, memory_budget=memory_budget,
                         seed=args.seed, n_samples=args.n_samples, noise_scale=args.noise_scale,
                         noise_std=args.noise_std, model_name=str(args.model), progress=not args.no_progress,
                         process_index=args.process_index, process_count=args.process_count,
                         manifest_timeout=args.manifest_timeout)
    except (ValueError, OSError, TimeoutError) as e:
        raise Fail(f"jpatch bulk: {e}") from None
    part = f"process {run.process_index}/{run.process_count}: " if run.process_count > 1 else ""
    print(f"{part}{len(run.computed)} shard(s) computed, {len(run.skipped)} already done, in {run.out_dir}")
    if run.complete:
        result = results.load_result(run.out_dir)
        for name in result.sites:
            mean = result.mean(name)
            print(f"  {name}: {result.n_prompts} prompts, grid {mean.shape}, mean over prompts in "
                  f"[{np.nanmin(mean):.3g}, {np.nanmax(mean):.3g}]")
        print(f"load with: jpatch.runs.results.load_result({str(run.out_dir)!r})")
        if getattr(args, "html", False):  # beside the shards; replaces only an earlier view
            from jpatch.face import view_cli

            path = run.out_dir / view_cli.REPORT_HTML
            try:
                if path.exists() and not html_view.is_view_file(path):
                    raise FileExistsError(f"{path} exists and is not a view jpatch wrote; move it away")
                view_cli.write_view(run.out_dir, path, title=f"jpatch bulk: {args.model}, {args.data}")
            except (ValueError, OSError) as e:
                raise Fail(f"jpatch bulk: --html: {view_cli.one_line(e)}") from None
            print(f"wrote {path}")
    elif run.process_count > 1:
        print("other processes are still writing their shards")
    return 0
