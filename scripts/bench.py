"""Benchmark: jpatch vs TransformerLens 3.9 on the same weights, same machine, same process.

A random-weight model of GPT-2 small's shape (12 layers, d_model 768, vocab 50257),
8 IOI prompts of 15 tokens, normalized logit difference. For each sweep it prints
both warm times (after one warm-up each), the speedup, jpatch's achieved FLOP/s
as a fraction of this machine's measured dense-matmul FLOP/s, peak memory, and
the cold time (first call in a fresh process, compilation included) beside
TransformerLens's. The two results must agree within 1e-4.

    python scripts/bench.py [--json out.json]
    python scripts/bench.py --bulk [--bulk-prompts 1000] [--json out.json]
    python scripts/bench.py --attribution [--json out.json]   (see bench_attribution.py)
    python scripts/bench.py --circuits [--json out.json]      (see bench_circuits.py)

--bulk measures dataset sweeps instead: prompts x patches per second of a
resumable `jpatch bulk` sweep (resid_pre, STR, logit difference) over an IOI
dataset, run in fresh processes with 1/10 and all of the prompts to show that
peak memory does not grow with the dataset, beside TransformerLens's time for a
sample of it, extrapolated.
"""

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

SWEEPS = {"resid_pre": 180, "attn_head_out_all_pos": 144}
NAMES = [" Mary", " John", " Tom", " James", " Dan", " Sarah", " Paul", " Anne", " Mark", " Lisa"]
TEMPLATE = "When{a} and{b} went to the store,{b} gave a drink to"


def ioi_batch(n=8):
    """n IOI prompts (15 tokens each, with a BOS) with answer = IO, contrast = S;
    the corrupted prompts replace the three names by others (the paper's ABC)."""
    from jpatch.tokenizer import get_tokenizer

    tok = get_tokenizer()
    rng = np.random.default_rng(0)
    clean, corrupted, answers, contrasts = [], [], [], []
    for _ in range(n):
        a, b, c, d = rng.choice(NAMES, 4, replace=False)
        clean.append([tok.eos_id] + tok.encode(TEMPLATE.format(a=a, b=b)))
        corrupted.append([tok.eos_id] + tok.encode(f"When{c} and{d} went to the store,{a} gave a drink to"))
        answers.append(tok.token_id(a))
        contrasts.append(tok.token_id(b))
    clean, corrupted = np.array(clean), np.array(corrupted)
    assert clean.shape == corrupted.shape == (n, 15), clean.shape
    return clean, corrupted, np.array(answers), np.array(contrasts)


def build_models(tmp):
    """Random GPT-2-small-shaped weights in transformers, TransformerLens and jpatch."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
    from reference import tl_model

    import jpatch

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(initializer_range=0.05, attn_implementation="eager")).eval()
    hf.save_pretrained(os.path.join(tmp, "hf"))
    jpatch.convert_hf(os.path.join(tmp, "hf"), os.path.join(tmp, "jp"))
    return tl_model(hf), jpatch.load(os.path.join(tmp, "jp"))


def matmul_flops():
    """This machine's dense float32 matmul throughput in JAX (best of several)."""
    import jax
    import jax.numpy as jnp

    a = jnp.ones((8192, 768), jnp.float32)
    b = jnp.ones((768, 3072), jnp.float32)
    f = jax.jit(lambda a, b: a @ b)
    f(a, b).block_until_ready()
    best = float("inf")
    for _ in range(10):
        t = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * 8192 * 768 * 3072 / best


def engine_flops(model, name, n_prompts, pos):
    """FLOPs the engine performs for a sweep: block matmuls on every recomputed row,
    per-patch attention, and the unembedding at the read position."""
    from jpatch import engine, patching

    cfg = model.config
    site, axes = patching.SWEEPS[name]
    patches, _ = patching.make_patches(cfg, site, axes, pos, n_prompts)
    layout = engine.plan(patches, cfg.n_layer, pos)
    d, m, H = cfg.d_model, cfg.d_mlp, cfg.n_head
    per_row = 2 * (4 * d * d + 2 * d * m)
    total = 0
    for first, end, alive, rows in layout.stages:
        layers = end - first
        total += layers * n_prompts * (rows * per_row + 4 * alive * H * pos * pos * cfg.d_head)
    return total + n_prompts * len(patches) * 2 * d * cfg.d_vocab


def tl_metric_fn(tl, clean, corrupted, answers, contrasts):
    import torch

    idx = torch.arange(len(answers))
    a, c = torch.tensor(answers), torch.tensor(contrasts)
    ld = lambda logits: (logits[idx, -1, a] - logits[idx, -1, c]).mean()
    with torch.no_grad():
        clean_ld = ld(tl(torch.tensor(clean)))
        corrupted_ld = ld(tl(torch.tensor(corrupted)))
    return lambda logits: (ld(logits) - corrupted_ld) / (clean_ld - corrupted_ld)


def cold_jpatch(model_dir, name, cache_dir):
    """Time the first jpatch sweep in a fresh process (compilation included), with
    JAX's persistent compilation cache in `cache_dir`."""
    code = f"""
import time, resource, json, sys
t0 = time.perf_counter()
sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
import bench, jpatch
from jpatch import patching, metrics
model = jpatch.load({model_dir!r})
clean, corrupted, answers, contrasts = bench.ioi_batch()
_, cache = model.run_with_cache(clean)
t = time.perf_counter()
patching.get_act_patch_{name}(model, corrupted, cache, metrics.logit_diff(answers, contrasts), progress=False)
print(json.dumps({{"sweep_s": time.perf_counter() - t, "total_s": time.perf_counter() - t0,
                   "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}}))
"""
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": cache_dir}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def bulk_process(model_dir, data, out, n_prompts):
    """One bulk sweep in a fresh process: its time and peak RSS."""
    code = f"""
import time, resource, json, jpatch
model = jpatch.load({model_dir!r})
t = time.perf_counter()
jpatch.bulk_sweep(model, {data!r}, ["resid_pre"], "str", "logit-diff", {out!r}, progress=False)
print(json.dumps({{"s": time.perf_counter() - t,
                   "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}}))
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if run.returncode:
        raise SystemExit(f"bulk sweep of {n_prompts} prompts failed:\n{run.stderr[-3000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def bench_bulk(tmp, tl, n_prompts, figures):
    import torch
    from transformer_lens import patching as tl_patching

    from jpatch.tasks import ioi_task

    patches = 12 * 15
    rows = {}
    for n in (n_prompts // 10, n_prompts):
        data = os.path.join(tmp, f"ioi-{n}.jsonl")
        ioi_task(n, seed=1).to_jsonl(data)
        rows[n] = bulk_process(os.path.join(tmp, "jp"), data, os.path.join(tmp, f"bulk-{n}"), n)
        rate = n * patches / rows[n]["s"]
        print(f"bulk resid_pre, {n} IOI prompts x {patches} patches: {rows[n]['s']:.1f} s, "
              f"{rate:.0f} prompt-patches/s, peak RSS {rows[n]['peak_rss_gb']:.2f} GB")
    sample = ioi_task(8, seed=1)
    clean, corrupted = torch.tensor(sample.clean_tokens), torch.tensor(sample.corrupted_tokens)
    metric = tl_metric_fn(tl, sample.clean_tokens, sample.corrupted_tokens, sample.answers, sample.contrasts)
    with torch.no_grad():
        _, cache = tl.run_with_cache(clean)
        t = time.perf_counter()
        tl_patching.get_act_patch_resid_pre(tl, corrupted, cache, metric)
        tl_s = (time.perf_counter() - t) * n_prompts / 8
    big, small = rows[n_prompts], rows[n_prompts // 10]
    figures["bulk"] = {
        "prompts": n_prompts, "patches_per_prompt": patches, "jpatch_s": big["s"],
        "prompt_patches_per_s": n_prompts * patches / big["s"], "tl_extrapolated_s": tl_s,
        "speedup": tl_s / big["s"], "peak_rss_gb": big["peak_rss_gb"],
        "peak_rss_gb_tenth": small["peak_rss_gb"], "peak_rss_growth": big["peak_rss_gb"] / small["peak_rss_gb"] - 1,
    }
    print(f"TransformerLens, extrapolated from 8 prompts: {tl_s:.0f} s for {n_prompts} prompts "
          f"({tl_s / big['s']:.1f}x slower); jpatch peak RSS {small['peak_rss_gb']:.2f} GB at {n_prompts // 10} "
          f"prompts, {big['peak_rss_gb']:.2f} GB at {n_prompts} ({figures['bulk']['peak_rss_growth']:+.0%})")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write the figures to this file")
    parser.add_argument("--sweeps", default=",".join(SWEEPS), help="comma-separated: " + ", ".join(SWEEPS))
    parser.add_argument("--bulk", action="store_true", help="benchmark a bulk dataset sweep instead")
    parser.add_argument("--bulk-prompts", type=int, default=1000)
    parser.add_argument("--attribution", action="store_true",
                        help="benchmark attribution patching instead (scripts/bench_attribution.py)")
    parser.add_argument("--circuits", action="store_true",
                        help="benchmark path patching and ACDC instead (scripts/bench_circuits.py)")
    args = parser.parse_args()
    if args.circuits:
        import bench_circuits

        return bench_circuits.main(args.json)
    if args.attribution:
        import bench_attribution

        return bench_attribution.main(args.json)

    import jax
    import torch
    from transformer_lens import patching as tl_patching

    from jpatch import metrics, patching

    figures = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                           "jax_device": str(jax.devices()[0]), "jax": jax.__version__, "torch": torch.__version__},
               "sweeps": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tl, model = build_models(tmp)
        if args.bulk:
            bench_bulk(tmp, tl, args.bulk_prompts, figures)
            args.sweeps = ""
        clean, corrupted, answers, contrasts = ioi_batch()
        peak_flops = matmul_flops()
        figures["machine"]["matmul_gflops"] = peak_flops / 1e9
        print(f"device: {jax.devices()[0]}, measured dense matmul: {peak_flops / 1e9:.0f} GFLOP/s")

        jp_metric = metrics.logit_diff(answers, contrasts)
        tl_metric = tl_metric_fn(tl, clean, corrupted, answers, contrasts)
        _, tl_cache = tl.run_with_cache(torch.tensor(clean))
        _, jp_cache = model.run_with_cache(clean)
        for name in filter(None, args.sweeps.split(",")):
            cache_dir = os.path.join(tmp, f"jax-cache-{name}")
            cold = cold_jpatch(os.path.join(tmp, "jp"), name, cache_dir)  # empty compilation cache
            cached = cold_jpatch(os.path.join(tmp, "jp"), name, cache_dir)  # a second fresh process
            jp_fn = getattr(patching, f"get_act_patch_{name}")
            tl_fn = getattr(tl_patching, f"get_act_patch_{name}")

            with torch.no_grad():
                tl(torch.tensor(corrupted))  # warm-up: one forward (TransformerLens does not compile)
                t = time.perf_counter()
                tl_result = tl_fn(tl, torch.tensor(corrupted), tl_cache, tl_metric).numpy()
                tl_s = time.perf_counter() - t

            jax.block_until_ready(jp_fn(model, corrupted, jp_cache, jp_metric, progress=False))  # warm-up
            t = time.perf_counter()
            jp_result = jp_fn(model, corrupted, jp_cache, jp_metric, progress=False)
            jp_s = time.perf_counter() - t

            diff = float(np.abs(jp_result - tl_result).max())
            flops = engine_flops(model, name, len(clean), clean.shape[1])
            row = {
                "patches": int(np.prod(tl_result.shape)),
                "tl_s": tl_s,
                "jpatch_s": jp_s,
                "speedup": tl_s / jp_s,
                "jpatch_cold_s": cold["sweep_s"],
                "jpatch_cold_process_s": cold["total_s"],
                "cold_speedup": tl_s / cold["sweep_s"],
                "jpatch_cold_cached_s": cached["sweep_s"],
                "jpatch_gflops": flops / jp_s / 1e9,
                "matmul_fraction": flops / jp_s / peak_flops,
                "jpatch_peak_rss_gb": cold["peak_rss_gb"],
                "max_abs_diff": diff,
            }
            figures["sweeps"][name] = row
            print(
                f"{name}: {row['patches']} patches | TransformerLens {tl_s:.1f} s | jpatch {jp_s:.2f} s warm "
                f"({row['speedup']:.1f}x), cold {cold['sweep_s']:.1f} s ({row['cold_speedup']:.1f}x), "
                f"cold with compile cache {cached['sweep_s']:.1f} s | "
                f"{row['jpatch_gflops']:.0f} GFLOP/s = {row['matmul_fraction']:.0%} of matmul | "
                f"jpatch peak RSS {cold['peak_rss_gb']:.2f} GB | max |diff| {diff:.1e}"
            )
            if diff > 1e-4:
                raise SystemExit(f"{name}: jpatch and TransformerLens disagree (max abs diff {diff:.2e})")
    figures["tl_peak_rss_gb_process"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)
    return figures


if __name__ == "__main__":
    main()
