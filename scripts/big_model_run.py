"""A random model with Llama-3.2-1B's (or Gemma-2-2B's) shape patched on this CPU, the way a user gets
there: transformers builds it (random weights, norms perturbed), saves it in bfloat16 to a temporary
folder, `jpatch.convert_hf` converts it, `jpatch.load` loads it in bfloat16, and then, timed:

- a `resid_pre` sweep (every layer x 8 positions), a heads sweep (`z` over layer x head, all positions:
  TransformerLens's attn_head_out_all_pos) and `attribute` for z, at the default memory budgets;
- exactness: a few resid_pre patches re-run in float32 by jpatch (the same bfloat16-rounded weights,
  upcast) and by transformers with a forward pre-hook on the decoder layer replacing the residual at one
  position; raw per-prompt logit differences compared (tolerance --tol). The bfloat16 sweep's values
  at those patches are compared with the same float32 reference, in units of the clean - corrupted gap.

Peak memory per phase is /proc/self/status VmHWM, reset between phases through /proc/self/clear_refs (which
resets what ru_maxrss reads too: the process's peak is the largest phase's). One copy of the weights at a time;
with --fresh-check each side of the float32 check runs in a new process (its peak is that process's own).

    nice -n 10 .venv/bin/python scripts/big_model_run.py --family llama          # the 1B shape
    .venv/bin/python scripts/big_model_run.py --family gemma2 --fresh-check      # the Gemma-2-2B shape
    .venv/bin/python scripts/big_model_run.py --family llama --layers 2 --d-model 256 --vocab 512  # quick
"""

import argparse
import contextlib
import gc
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SHAPES = {
    # Llama-3.2-1B's config.json (random weights)
    "llama": dict(layers=16, d_model=2048, heads=32, kv_heads=8, head_dim=64, d_mlp=8192, vocab=128256),
    # Gemma-2-2B's config.json
    "gemma2": dict(layers=26, d_model=2304, heads=8, kv_heads=4, head_dim=256, d_mlp=9216, vocab=256000),
}
PROMPTS, TOKENS = 8, 32
CORRUPT = (3, 11)  # the corrupted prompts differ from the clean ones at these positions


def hf_config(family, s):
    """The transformers config of `s` (a SHAPES entry), eager attention."""
    import transformers

    last = s["vocab"] - 1
    common = dict(num_hidden_layers=s["layers"], hidden_size=s["d_model"], num_attention_heads=s["heads"],
                  num_key_value_heads=s["kv_heads"], head_dim=s["head_dim"], intermediate_size=s["d_mlp"],
                  vocab_size=s["vocab"], bos_token_id=last, eos_token_id=last, pad_token_id=last,
                  tie_word_embeddings=True, attn_implementation="eager")
    if family == "llama":
        return transformers.LlamaConfig(
            **common, max_position_embeddings=131072, rms_norm_eps=1e-5, hidden_act="silu",
            rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=32.0, low_freq_factor=1.0,
                                 high_freq_factor=4.0, original_max_position_embeddings=8192))
    return transformers.Gemma2Config(
        **common, max_position_embeddings=8192, rms_norm_eps=1e-6, hidden_activation="gelu_pytorch_tanh",
        sliding_window=4096, attn_logit_softcapping=50.0, final_logit_softcapping=30.0, query_pre_attn_scalar=256)


def hf_class(family):
    import transformers

    return transformers.LlamaForCausalLM if family == "llama" else transformers.Gemma2ForCausalLM


def build_hf_folder(family, s, folder, seed):
    """A random model built directly in bfloat16 (norm weights perturbed so that they matter), saved."""
    import torch

    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = hf_class(family)(hf_config(family, s)).eval()
    finally:
        torch.set_default_dtype(default)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
        if family == "gemma2":
            bfloat16_exact_gemma(model, s["d_model"])
    model.save_pretrained(folder)
    del model
    gc.collect()


def bfloat16_exact_gemma(model, d_model):
    """Gemma 2's weights drawn so that what a jpatch folder stores of them, (1 + w) norms and the embedding
    times sqrt(d_model), is exact in bfloat16 (the embedding keeps 6 significant bits, so a product with
    sqrt(2304) = 3 x 16 fits bfloat16's 8): the float32 check then compares the engine with transformers on
    the same weights. A bfloat16 folder of an arbitrary bfloat16 Gemma checkpoint rounds those two (README)."""
    import torch

    for name, p in model.named_parameters():
        if "norm" in name:
            p.copy_((1 + p.float()).bfloat16().float() - 1)
    embed = model.model.embed_tokens.weight
    mantissa, exponent = torch.frexp(embed.float())
    embed.copy_(torch.ldexp(torch.round(mantissa * 64) / 64, exponent))
    scale = torch.tensor(d_model ** 0.5)
    for a in [1 + p.float() for n, p in model.named_parameters() if "norm" in n] + [embed.float() * scale]:
        if not torch.equal(a.bfloat16().float(), a):
            raise ValueError(f"d_model={d_model}: Gemma's stored tensors are not exact in bfloat16 here")


def inputs(vocab, seed, prompts, tokens):
    """Random clean prompts, corrupted ones differing at CORRUPT, and (answer, contrast) ids."""
    rng = np.random.default_rng(seed)
    clean = rng.integers(0, vocab - 1, (prompts, tokens))
    corrupted = clean.copy()
    for p in CORRUPT:
        corrupted[:, p] = (clean[:, p] + 1 + rng.integers(0, vocab - 2, prompts)) % (vocab - 1)
    answer, contrast = rng.choice(vocab - 1, (2, prompts), replace=False)
    return clean, corrupted, answer, contrast


def check_patches(layers, tokens):
    """(layer, position) pairs checked against transformers: a corrupted position at layer 0, a later
    position mid-stack, the last position at the last layer."""
    return [(0, CORRUPT[0]), (layers // 2, CORRUPT[1] + 4), (layers - 1, tokens - 1)]


class Phases:
    """Wall time and peak RSS (VmHWM, reset per phase) of each phase."""

    def __init__(self):
        self.rows = {}

    @contextlib.contextmanager
    def __call__(self, name):
        reset_peak()
        rss_start = vm_hwm()
        start = time.perf_counter()
        yield
        self.rows[name] = dict(seconds=round(time.perf_counter() - start, 1), rss_start_gb=round(rss_start / 2**30, 2),
                               peak_rss_gb=round(vm_hwm() / 2**30, 2))
        print(f"{name}: {self.rows[name]}", flush=True)


def reset_peak():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    except OSError:
        pass


def vm_hwm():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def swap_total():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("SwapTotal:"):
                return int(line.split()[1]) * 1024
    return 0


def hf_patched_logit_diffs(hf, tokens, answer, contrast, patch=None, cache=None):
    """Per-prompt logit(answer) - logit(contrast) at the last position of transformers' model; `cache`
    {layer: resid_pre} collects a run's decoder inputs, `patch` = (layer, position, clean resid_pre)
    replaces one position's residual through a forward pre-hook on that decoder layer."""
    import torch

    def hook(layer):
        def fn(mod, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            if cache is not None:
                cache[layer] = x.detach().clone()
            if patch is not None and patch[0] == layer:
                x = x.clone()
                x[:, patch[1]] = patch[2][:, patch[1]]
            return ((x,) + args[1:], kwargs) if args else (args, {**kwargs, "hidden_states": x})
        return fn

    handles = [block.register_forward_pre_hook(hook(l), with_kwargs=True) for l, block in enumerate(hf.model.layers)]
    try:
        with torch.no_grad():
            logits = hf(torch.tensor(tokens)).logits[:, -1].double().numpy()
    finally:
        for h in handles:
            h.remove()
    rows = np.arange(len(tokens))
    return logits[rows, answer] - logits[rows, contrast]


def jpatch_float32_check(jp_dir, clean, corrupted, answer, contrast, layers, positions):
    """jpatch's float32 resid_pre patches at `layers` x `positions`: raw scores and baselines (NumPy)."""
    import jpatch

    model = jpatch.load(jp_dir, dtype="float32")
    f32 = jpatch.sweep(model, clean, corrupted, "resid_pre", jpatch.metrics.logit_diff(answer, contrast),
                       layers=layers, positions=positions, progress=False)
    return dict(raw=np.asarray(f32.raw), clean=np.asarray(f32.clean_per_prompt),
                corrupted=np.asarray(f32.corrupted_per_prompt))


def hf_float32_check(family, hf_dir, clean, corrupted, answer, contrast, checks):
    """transformers' float32 clean and corrupted logit differences and each checked patch's."""
    import torch

    hf = hf_class(family).from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager").eval()
    clean_cache = {}
    hf_clean = hf_patched_logit_diffs(hf, clean, answer, contrast, cache=clean_cache)
    hf_corrupted = hf_patched_logit_diffs(hf, corrupted, answer, contrast)
    return hf_clean, hf_corrupted, [hf_patched_logit_diffs(hf, corrupted, answer, contrast, (l, p, clean_cache[l]))
                                    for l, p in checks]


def in_process(fn, *args):
    """(fn(*args), its Phases row: wall time and peak RSS) in this process, its arrays dropped after."""
    import jax

    phases = Phases()
    with phases(fn.__name__):
        out = fn(*args)
        gc.collect()
        jax.clear_caches()
    return out, phases.rows[fn.__name__]


def fresh_process(fn, *args):
    """in_process(fn, *args) in a new spawned process: the bfloat16 steps' memory, freed but kept by this
    process's allocator, is not under its peak, and what it allocates goes when it ends."""
    import concurrent.futures
    import multiprocessing

    sys.path.insert(0, str(Path(__file__).parent))  # the child imports this module by name
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        out, row = pool.submit(in_process, fn, *args).result()
    return out, {**row, "process": "fresh"}


def run(family="llama", shape=None, prompts=PROMPTS, tokens=TOKENS, seed=0, tol=1e-4, out=None, heads=True,
        attribute=True, heads_prompts=None, sweeps=True, fresh_check=False, resid_sweep=True, check=True):
    """Build, convert, sweep and check; returns the report (a dict). `shape` overrides SHAPES[family];
    sweeps=False skips the bfloat16 model and its sweeps (only the float32 exactness check); fresh_check runs
    each side of that check in a process of its own (a model whose float32 copy does not fit beside them);
    resid_sweep=False, attribute=False, check=False leave those steps out (report["exact"] is then None)."""
    import jax
    import torch

    import jpatch
    from jpatch.engine.plan import default_memory_budget

    s = {**SHAPES[family], **(shape or {})}
    torch.set_num_threads(max(1, torch.get_num_threads()))
    heads_prompts = heads_prompts or prompts
    report = dict(family=family, shape=s, prompts=prompts, heads_prompts=heads_prompts, tokens=tokens,
                  swap_total_bytes=swap_total(),
                  memory_budget_bytes=default_memory_budget())
    phases = Phases()
    clean, corrupted, answer, contrast = inputs(s["vocab"], seed, prompts, tokens)
    metric = jpatch.metrics.logit_diff(answer, contrast)
    checks = check_patches(s["layers"], tokens)
    with contextlib.ExitStack() as stack:
        root = Path(out) if out else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="jpatch_big_")))
        root.mkdir(parents=True, exist_ok=True)
        hf_dir, jp_dir = root / "hf_bf16", root / "jpatch_bf16"
        with phases("build transformers model (bf16) + save_pretrained"):
            build_hf_folder(family, s, hf_dir, seed)
        with phases("jpatch.convert_hf (bf16)"):
            jpatch.convert_hf(hf_dir, jp_dir, dtype="bfloat16")
        positions = list(range(3, tokens, max(1, tokens // 8)))[:8]
        resid, model = None, None
        if sweeps and (resid_sweep or attribute):
            with phases("jpatch.load (bf16)"):
                model = jpatch.load(jp_dir, dtype="bfloat16")
        if sweeps and resid_sweep:
            with phases("resid_pre sweep (bf16)"):
                resid = jpatch.sweep(model, clean, corrupted, "resid_pre", metric, positions=positions, progress=False)
            report["resid_pre_grid"] = list(resid.shape)
        if sweeps and attribute:
            with phases("attribute z (bf16)"):
                atp = jpatch.attribute(model, clean, corrupted, "z", metric)
            report["attribute_grid"] = list(atp.shape)
            report["attribute_finite"] = bool(np.isfinite(np.asarray(atp)).all())
        del model
        gc.collect()
        jax.clear_caches()
        print(json.dumps(report), flush=True)  # what is in so far

        report["exact"] = None
        if check:
            # exactness: the same patches in float32 on both sides
            check_layers = sorted({l for l, _ in checks})
            check_pos = sorted({p for _, p in checks})
            phase = fresh_process if fresh_check else in_process
            f32, phases.rows["jpatch float32: load + the checked patches"] = phase(
                jpatch_float32_check, str(jp_dir), clean, corrupted, answer, contrast, check_layers, check_pos)
            (hf_clean, hf_corrupted, expected), phases.rows["transformers float32: load + the checked patches with hooks"] = \
                phase(hf_float32_check, family, str(hf_dir), clean, corrupted, answer, contrast, checks)
            rows = []
            for (layer, pos), want in zip(checks, expected):
                got32 = f32["raw"][:, check_layers.index(layer), check_pos.index(pos)]
                got16 = None if resid is None else np.asarray(resid.raw)[:, layer, positions.index(pos)]
                gap = np.abs(hf_clean - hf_corrupted).mean()
                rows.append(dict(layer=layer, pos=pos, float32_max_abs_err=float(np.abs(got32 - want).max()),
                                 patch_effect=float(np.abs(want - hf_corrupted).max()),
                                 bf16_max_abs_err_over_gap=None if got16 is None
                                 else float(np.abs(got16 - want).max() / gap)))
            base_err = max(float(np.abs(f32["clean"] - hf_clean).max()), float(np.abs(f32["corrupted"] - hf_corrupted).max()))
            report["exactness"] = dict(patches=rows, baselines_float32_max_abs_err=base_err, tol=tol,
                                       clean_minus_corrupted_mean_abs=float(np.abs(hf_clean - hf_corrupted).mean()))
            report["exact"] = base_err <= tol and all(r["float32_max_abs_err"] <= tol for r in rows)
        if sweeps and heads:  # last, the bfloat16 model loaded again: the longest sweep (a head's patch recomputes
            n = heads_prompts  # every position of every later layer), so the check above is in before it
            z_metric = jpatch.metrics.logit_diff(answer[:n], contrast[:n])
            with phases("jpatch.load (bf16) again"):
                model = jpatch.load(jp_dir, dtype="bfloat16")
            with phases(f"heads sweep z all positions, {n} prompts (bf16)"):
                z = jpatch.sweep(model, clean[:n], corrupted[:n], "z", z_metric, axes=("layer", "head"), progress=False)
            report["heads_grid"] = list(z.shape)
            report["heads_finite"] = bool(np.isfinite(np.asarray(z)).all())
            del model
    report["phases"] = phases.rows
    # the process's peak: the largest phase's (clear_refs resets the high-water mark that ru_maxrss reads too)
    report["peak_rss_gb"] = max(p["peak_rss_gb"] for p in phases.rows.values())
    report["ru_maxrss_gb_since_last_reset"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30, 2)
    return report


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--family", choices=sorted(SHAPES), default="llama")
    for key in SHAPES["llama"]:
        p.add_argument("--" + key.replace("_", "-"), type=int, help=f"override the shape's {key}")
    p.add_argument("--prompts", type=int, default=PROMPTS)
    p.add_argument("--tokens", type=int, default=TOKENS)
    p.add_argument("--tol", type=float, default=1e-4, help="float32 max abs error of raw logit differences")
    p.add_argument("--out", help="a new folder for the converted models (default: a temporary one)")
    p.add_argument("--heads-prompts", type=int, help="prompts in the heads sweep (default: all)")
    p.add_argument("--no-heads", action="store_true")
    p.add_argument("--check-only", action="store_true", help="no bfloat16 sweeps: only the float32 exactness check")
    p.add_argument("--no-attribute", action="store_true")
    p.add_argument("--heads-only", action="store_true", help="build, convert and the heads sweep only")
    p.add_argument("--fresh-check", action="store_true",
                   help="run each side of the float32 check in a new process (lower peak RSS: Gemma-2-2B's shape)")
    args = p.parse_args(argv)
    shape = {k: getattr(args, k) for k in SHAPES["llama"] if getattr(args, k) is not None}
    if args.out and Path(args.out).exists():
        p.error(f"--out {args.out} exists; give a new folder")
    report = run(args.family, shape, args.prompts, args.tokens, tol=args.tol, out=args.out,
                 heads=not args.no_heads, attribute=not (args.no_attribute or args.heads_only),
                 heads_prompts=args.heads_prompts, sweeps=not args.check_only, fresh_check=args.fresh_check,
                 resid_sweep=not args.heads_only, check=not args.heads_only)
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    sys.exit(0 if main()["exact"] in (True, None) else 1)  # None: no check run
