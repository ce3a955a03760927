"""Benchmark: jpatch vs TransformerLens 3.9 on the same weights, same machine, same process.

A random-weight model of GPT-2 small's shape (12 layers, d_model 768, vocab 50257),
8 IOI prompts of 15 tokens, normalized logit difference. For each sweep it prints
both warm times (after one warm-up each), the speedup, jpatch's achieved FLOP/s
as a fraction of this machine's measured dense-matmul FLOP/s, peak memory, and
the cold time (first call in a fresh process, compilation included) beside
TransformerLens's. The two results must agree within 1e-4.

    python scripts/bench.py [--json out.json] [--family neox]   (neox: Pythia-160M's shape)
    python scripts/bench.py --family llama | gemma2 [--n-prompts 8 --n-pos 16]
        (llama: SmolLM-135M's shape, grouped-query; gemma2: a small Gemma 2 with soft caps and
        sliding-window layers; random prompts, since the vocabulary is not GPT-2's)
    python scripts/bench.py --bulk [--bulk-prompts 1000] [--json out.json]
    python scripts/bench.py --attribution [--json out.json]   (see bench_attribution.py)
    python scripts/bench.py --circuits [--json out.json]      (see bench_circuits.py)
    python scripts/bench.py --hook-loop [--json out.json]     (see bench_hook_loop.py)
    python scripts/bench.py --attr-recipe [--json out.json]   (see bench_attr_recipe.py)
    python scripts/bench.py --scaling [--lengths 16,64,256,1024] [--batches 1,8] [--deep medium,xl]

Each sweep is also timed with the TransformerLens-style jnp callable of the same
metric (`lambda logits: ...logits[rows, -1, answers]...`) beside the `Metric`, and
the cold run counts XLA compilations (all, and the engine's own programs).

--scaling measures cost against prompt length and depth: a resid_pre sweep on GPT-2
small's shape at each length (at 1,024 tokens over 32 sampled positions) and batch,
jpatch cold and warm, compilations and peak RSS in a fresh process per case, beside
TransformerLens's time: measured when its estimate is under --tl-limit seconds,
otherwise its measured time per patched forward times the number of patches
(labelled "extrapolated"). --deep adds GPT-2 medium's / XL's shapes on the
factual-recall grid (every layer x the last subject position and the last position).

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

# On a GPU the bench's processes (this one, TransformerLens's torch, the cold-sweep child) share
# the device: JAX must not take 75% of its memory up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

SWEEPS = {"resid_pre": 180, "attn_head_out_all_pos": 144}
NAMES = [" Mary", " John", " Tom", " James", " Dan", " Sarah", " Paul", " Anne", " Mark", " Lisa"]
TEMPLATE = "When{a} and{b} went to the store,{b} gave a drink to"


def ioi_batch(n=8):
    """n IOI prompts (15 tokens each, with a BOS) with answer = IO, contrast = S;
    the corrupted prompts replace the three names by others (the paper's ABC)."""
    from jpatch.model.tokenizer import get_tokenizer

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


TL_DEVICE = "cpu"  # --tl-device: where TransformerLens runs (e.g. "cuda" beside JAX on a GPU)


def tt(array):
    """A torch tensor of `array` on TransformerLens's device."""
    import torch

    return torch.tensor(np.asarray(array), device=TL_DEVICE)


# --family neox: Pythia-160M's shape.
PYTHIA_160M = dict(num_hidden_layers=12, num_attention_heads=12, hidden_size=768, intermediate_size=3072,
                   vocab_size=50304, max_position_embeddings=2048)
# --family llama: SmolLM-135M's shape (Llama architecture, 9 query / 3 key-value heads, tied embeddings).
SMOLLM_135M = dict(num_hidden_layers=30, hidden_size=576, num_attention_heads=9, num_key_value_heads=3,
                   intermediate_size=1536, vocab_size=49152, max_position_embeddings=2048, rms_norm_eps=1e-5,
                   tie_word_embeddings=True, rope_parameters=dict(rope_type="default", rope_theta=10000.0))
# --family gemma2: Gemma-2-2B's structure scaled down (2B: 26 layers, d 2304, 8 / 4 heads of 256, vocab 256,000):
# alternating sliding-window (64) and global layers, attention and final-logit soft caps, (1 + w) norms.
GEMMA2_SMALL = dict(num_hidden_layers=8, hidden_size=512, num_attention_heads=8, num_key_value_heads=4, head_dim=64,
                    intermediate_size=2048, vocab_size=32768, max_position_embeddings=2048, rms_norm_eps=1e-6,
                    query_pre_attn_scalar=64, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                    sliding_window=64, layer_types=["sliding_attention", "full_attention"] * 4)
FAMILY_SHAPES = {"neox": PYTHIA_160M, "llama": SMOLLM_135M, "gemma2": GEMMA2_SMALL}
RANDOM_PROMPTS = {"n": 8, "pos": 16}  # --n-prompts / --n-pos: the llama / gemma2 batch


def random_batch(vocab, n, pos, seed=0):
    """n random prompts of `pos` tokens, corrupted at three positions (as IOI's three names), with
    random distinct answer / contrast ids: for the families whose vocabulary is not GPT-2's."""
    rng = np.random.default_rng(seed)
    clean = rng.integers(0, vocab, (n, pos))
    corrupted = clean.copy()
    for p in (pos // 4, pos // 2, pos - 3):
        corrupted[:, p] = (clean[:, p] + rng.integers(1, vocab, n)) % vocab
    answers, contrasts = rng.choice(vocab, 2 * n, replace=False).reshape(2, n)
    return clean, corrupted, answers, contrasts


def batch_for(family, n=None, pos=None):
    """The bench's prompts: IOI in GPT-2's tokenizer (GPT-2, Pythia), else random ones."""
    if family in ("gpt2", "neox"):
        return ioi_batch()
    return random_batch(FAMILY_SHAPES[family]["vocab_size"], n or RANDOM_PROMPTS["n"], pos or RANDOM_PROMPTS["pos"])


def build_models(tmp, family="gpt2"):
    """Random weights of GPT-2 small's shape (or `FAMILY_SHAPES[family]`) in transformers,
    TransformerLens and jpatch (converted from the saved Hugging Face folder, as users do)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
    from reference import gemma2_hf_model, gemma2_tl_model, llama_tl_model, neox_hf_model, neox_tl_model, tl_model

    import jpatch

    torch.manual_seed(0)
    if family == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        hf = LlamaForCausalLM(LlamaConfig(**SMOLLM_135M, initializer_range=0.05, attn_implementation="eager")).eval()
        tl = llama_tl_model(hf)
    elif family == "gemma2":
        hf = gemma2_hf_model(seed=0, initializer_range=0.05, **GEMMA2_SMALL)
        tl = gemma2_tl_model(hf)
    elif family == "neox":
        hf = neox_hf_model(seed=0, rotary_pct=0.25, initializer_range=0.05, **PYTHIA_160M)
        tl = neox_tl_model(hf)
    else:
        hf = GPT2LMHeadModel(GPT2Config(initializer_range=0.05, attn_implementation="eager")).eval()
        tl = tl_model(hf)
    hf.save_pretrained(os.path.join(tmp, "hf"))
    jpatch.convert_hf(os.path.join(tmp, "hf"), os.path.join(tmp, "jp"))
    return tl.to(TL_DEVICE), jpatch.load(os.path.join(tmp, "jp"))


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


def engine_flops(model, name, n_prompts, pos, vocab_ids=None):
    """FLOPs the engine performs for a sweep: block matmuls on every recomputed row (in the last
    layer, attention output and MLP on the read rows only), attention of each row over the cached
    keys and its window's own keys, and the unembedding at the read position of `vocab_ids` ids
    (None: the whole vocabulary; a logit difference: `readout.on_columns`'s count)."""
    from jpatch.engine import plan
    from jpatch.engine.patching import SWEEPS
    from jpatch.engine.sweep import make_patches
    cfg = model.config
    site, axes = SWEEPS[name]
    patches, _ = make_patches(cfg, site, axes, pos, n_prompts)
    layout = plan.plan_layout(patches, cfg.n_layer, pos, merge_below=plan.cheap_row_layers(cfg, n_prompts))  # as the engine plans
    d, H = cfg.d_model, cfg.n_head
    per_row = cfg.block_flops_per_row()
    total = 0
    for stage in layout.stages:
        layers = stage.end_layer - stage.first_layer
        window, _ = plan.attention_steps(stage.n_rows, pos, stage.span, H)
        keys = pos + window + stage.span - 1  # see rows_attention
        total += layers * n_prompts * stage.n_rows * (per_row + 4 * H * keys * cfg.d_head)
    last_rows, read_rows = layout.stages[-1].n_rows, len(layout.order)  # one read position per patch slot
    if 2 * read_rows <= last_rows:  # as execute.run_layout: the rest skip attention output and MLP
        after_attention = per_row - 2 * d * cfg.d_head * (H + 2 * cfg.n_kv_head)
        total -= n_prompts * (last_rows - read_rows) * after_attention
    return total + n_prompts * len(patches) * 2 * d * (vocab_ids or cfg.d_vocab)


def tl_metric_fn(tl, clean, corrupted, answers, contrasts):
    import torch

    idx = tt(np.arange(len(answers)))
    a, c = tt(answers), tt(contrasts)
    ld = lambda logits: (logits[idx, -1, a] - logits[idx, -1, c]).mean()
    with torch.no_grad():
        clean_ld = ld(tl(tt(clean)))
        corrupted_ld = ld(tl(tt(corrupted)))
    return lambda logits: (ld(logits) - corrupted_ld) / (clean_ld - corrupted_ld)


class Compiles:
    """XLA compilations from now on: all of them (the listener on JAX's backend-compile
    event), and the engine's own programs (new entries in its jit caches)."""

    def __init__(self):
        from jax import monitoring

        from jpatch.engine import execute as engine
        self.events = []
        monitoring.register_event_duration_secs_listener(
            lambda event, secs, **kw: self.events.append(event) if event == "/jax/core/compile/backend_compile_duration" else None)
        self.programs = (engine.run_layout, engine._cache_chunk)
        self.start = sum(p._cache_size() for p in self.programs)

    def all(self):
        return len(self.events)

    def engine(self):
        return sum(p._cache_size() for p in self.programs) - self.start


def jp_callable(answers, contrasts, clean_ld, corrupted_ld):
    """The normalized mean logit difference as a TransformerLens user writes it, in jnp."""
    import jax.numpy as jnp

    rows, a, c = jnp.arange(len(answers)), jnp.asarray(answers), jnp.asarray(contrasts)
    return lambda logits: ((logits[rows, -1, a] - logits[rows, -1, c]).mean() - corrupted_ld) / (clean_ld - corrupted_ld)


def cold_jpatch(model_dir, name, cache_dir, family="gpt2"):
    """Time the first jpatch sweep in a fresh process (compilation included), with
    JAX's persistent compilation cache in `cache_dir`."""
    code = f"""
import time, resource, json, sys
t0 = time.perf_counter()
sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
import bench, jpatch
from jpatch.engine import patching
from jpatch.engine.patching import SWEEPS
from jpatch.engine.sweep import make_patches, sweep
from jpatch.methods import metrics
model = jpatch.load({model_dir!r})
bench.RANDOM_PROMPTS.update({RANDOM_PROMPTS!r})
clean, corrupted, answers, contrasts = bench.batch_for({family!r})
_, cache = model.run_with_cache(clean)
count = bench.Compiles()
t = time.perf_counter()
patching.get_act_patch_{name}(model, corrupted, cache, metrics.logit_diff(answers, contrasts), progress=False)
print(json.dumps({{"sweep_s": time.perf_counter() - t, "total_s": time.perf_counter() - t0,
                   "compiles": count.all(), "engine_programs": count.engine(),
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

    from jpatch.data.tasks import ioi_task

    patches = 12 * 15
    rows = {}
    for n in (n_prompts // 10, n_prompts):
        data = os.path.join(tmp, f"ioi-{n}.jsonl")
        ioi_task(n, seed=1, length=15).to_jsonl(data)  # the 15-token templates: one length, as TL needs
        rows[n] = bulk_process(os.path.join(tmp, "jp"), data, os.path.join(tmp, f"bulk-{n}"), n)
        rate = n * patches / rows[n]["s"]
        print(f"bulk resid_pre, {n} IOI prompts x {patches} patches: {rows[n]['s']:.1f} s, "
              f"{rate:.0f} prompt-patches/s, peak RSS {rows[n]['peak_rss_gb']:.2f} GB")
    sample = ioi_task(8, seed=1, length=15)
    clean, corrupted = tt(sample.clean_tokens), tt(sample.corrupted_tokens)
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


SHAPES = {"small": (12, 12, 768), "medium": (24, 16, 1024), "xl": (48, 25, 1600)}  # layers, heads, d_model


def scaling_inputs(batch, pos, vocab, subject=None):
    """Random prompts; the corrupted ones differ at position 1 and at the middle (or the
    subject position); random answer / contrast tokens."""
    rng = np.random.default_rng(pos * 100 + batch)
    clean = rng.integers(0, vocab, (batch, pos))
    corrupted = clean.copy()
    for p in {1, pos // 2 if subject is None else subject}:
        corrupted[:, p] = (clean[:, p] + 1 + rng.integers(0, vocab - 1, batch)) % vocab
    return clean, corrupted, rng.integers(0, vocab, batch), rng.integers(0, vocab, batch)


def sweep_positions(pos, sampled):
    """Every position, or `sampled` evenly spread ones (always the last)."""
    return None if pos <= sampled else np.unique(np.linspace(0, pos - 1, sampled).round().astype(int))


def scaling_child(spec):
    """One scaling case in this (fresh) process: cold and warm jpatch sweeps."""
    import jax

    import jpatch
    from jpatch.methods import metrics
    if "model_dir" in spec:
        model = jpatch.load(spec["model_dir"])
    else:
        layers, heads, d = SHAPES[spec["shape"]]
        cfg = jpatch.GPT2Config(n_layer=layers, n_head=heads, d_model=d, d_mlp=4 * d)
        model = jpatch.GPT2.init(cfg, key=jax.random.PRNGKey(0), std=0.05)
    clean, corrupted, answers, contrasts = scaling_inputs(spec["batch"], spec["pos"], model.config.d_vocab,
                                                          spec.get("subject"))
    positions = spec.get("positions")
    metric = metrics.logit_diff(answers, contrasts, normalize=False)  # LD_pt - LD_*: random weights, no ratio
    run = lambda: jpatch.sweep(model, clean, corrupted, "resid_pre", metric, positions=positions, progress=False)
    count = Compiles()
    t = time.perf_counter()
    run()
    cold = time.perf_counter() - t
    compiles, programs = count.all(), count.engine()
    t = time.perf_counter()
    result = run()
    warm = time.perf_counter() - t
    return {"jpatch_cold_s": cold, "jpatch_warm_s": warm, "compiles": compiles, "engine_programs": programs,
            "warm_compiles": count.all() - compiles, "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "result": np.asarray(result).tolist()}


def run_child(spec):
    """scaling_child(spec) in a fresh process without a persistent compilation cache (a cache
    would add the cost of writing its entries to the cold sweep, or skip the compile)."""
    code = (f"import sys, json; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r}); import bench; "
            f"print(json.dumps(bench.scaling_child(json.loads(sys.argv[1]))))")
    env = {**{k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}, "JPATCH_COMPILE_CACHE": "0"}
    run = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], capture_output=True, text=True, env=env)
    if run.returncode:
        raise SystemExit(f"scaling case {spec} failed:\n{run.stderr[-3000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def tl_resid_pre(tl, clean, corrupted, answers, contrasts, positions, limit):
    """TransformerLens's time for the resid_pre sweep over `positions` (None: all): measured
    (its own get_act_patch_resid_pre, or the same hooks over sampled positions) when its
    per-patch forward time x patches is under `limit` s, else that product."""
    import torch
    from transformer_lens import patching as tl_patching

    idx, a, c = tt(np.arange(len(answers))), tt(answers), tt(contrasts)
    ld = lambda logits: (logits[idx, -1, a] - logits[idx, -1, c]).double().mean()
    T = clean.shape[1]
    pos_list = list(range(T)) if positions is None else [int(p) for p in positions]
    n_patches = tl.cfg.n_layers * len(pos_list)
    with torch.no_grad():
        corrupted_t = tt(corrupted)
        _, cache = tl.run_with_cache(tt(clean), names_filter=lambda n: n.endswith("hook_resid_pre"))
        corrupted_ld = ld(tl(corrupted_t))

        def hook(act, hook, pos=pos_list[-1]):
            act[:, pos] = cache[hook.name][:, pos]
            return act

        patched = lambda: tl.run_with_hooks(corrupted_t, fwd_hooks=[("blocks.0.hook_resid_pre", hook)])
        patched()
        times = []
        for _ in range(2):
            t = time.perf_counter()
            patched()
            times.append(time.perf_counter() - t)
        per_patch = min(times)
        if per_patch * n_patches > limit:
            return per_patch * n_patches, "extrapolated", None, per_patch
        t = time.perf_counter()
        if positions is None:
            result = tl_patching.get_act_patch_resid_pre(tl, corrupted_t, cache, lambda l: ld(l) - corrupted_ld).cpu().numpy()
        else:
            result = np.zeros((tl.cfg.n_layers, len(pos_list)))
            for layer in range(tl.cfg.n_layers):
                for i, p in enumerate(pos_list):
                    result[layer, i] = float(ld(tl.run_with_hooks(corrupted_t, fwd_hooks=[
                        (f"blocks.{layer}.hook_resid_pre", lambda act, hook, p=p: hook_at(act, hook, p, cache))])) - corrupted_ld)
        return time.perf_counter() - t, "measured", result, per_patch


def hook_at(act, hook, pos, cache):
    act[:, pos] = cache[hook.name][:, pos]
    return act


def bench_scaling(tmp, tl, args, figures):
    """Cost against prompt length (GPT-2 small's shape) and depth (medium / XL shapes)."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    rows = figures["scaling"] = []
    header = (f"{'model':>7} {'tokens':>6} {'batch':>5} {'patches':>7} | {'jpatch cold':>11} {'warm':>8} "
              f"{'compiles (engine)':>17} {'peak RSS':>8} | {'TransformerLens':>22} | {'warm x':>6} {'cold x':>6}")
    print(header)
    cases = [("small", T, b) for T in map(int, args.lengths.split(",")) for b in map(int, args.batches.split(","))]
    cases += [(shape, 16, 8) for shape in filter(None, args.deep.split(","))]
    for shape, T, batch in cases:
        if shape == "small":
            spec = {"model_dir": os.path.join(tmp, "jp"), "pos": T, "batch": batch}
            positions = sweep_positions(T, args.sampled)
            model_tl = tl
        else:  # the factual-recall grid: every layer x (last subject position, last position)
            spec = {"shape": shape, "pos": T, "batch": batch, "subject": T - 5}
            positions = np.array([T - 5, T - 1])
        if positions is not None:
            spec["positions"] = positions.tolist()
        jp = run_child(spec)
        if shape != "small":  # built after the jpatch child has exited: XL's two copies never coexist
            layers, heads, d = SHAPES[shape]
            model_tl = HookedTransformer(HookedTransformerConfig(
                n_layers=layers, d_model=d, n_ctx=1024, d_head=d // heads, n_heads=heads, d_mlp=4 * d, d_vocab=50257,
                act_fn="gelu_new", normalization_type="LN", default_prepend_bos=False, device=TL_DEVICE)).eval()
        clean, corrupted, answers, contrasts = scaling_inputs(batch, T, 50257, spec.get("subject"))
        tl_s, how, tl_result, per_patch = tl_resid_pre(model_tl, clean, corrupted, answers, contrasts, positions,
                                                       args.tl_limit)
        if model_tl is not tl:
            del model_tl
        diff = None
        if tl_result is not None and shape == "small":
            diff = float(np.abs(np.asarray(jp["result"]) - tl_result).max())
            if diff > 1e-3 * max(1.0, float(np.abs(tl_result).max())):
                raise SystemExit(f"{shape} {T} tokens x {batch}: jpatch and TransformerLens disagree by {diff:.2e}")
        n_patches = SHAPES[shape][0] * (T if positions is None else len(positions))
        row = {"model": shape, "tokens": T, "batch": batch, "patches": n_patches, "tl_s": tl_s, "tl": how,
               "tl_per_patch_s": per_patch, "warm_speedup": tl_s / jp["jpatch_warm_s"],
               "cold_speedup": tl_s / jp["jpatch_cold_s"], "max_abs_diff": diff,
               **{k: v for k, v in jp.items() if k != "result"}}
        rows.append(row)
        print(f"{shape:>7} {T:>6} {batch:>5} {n_patches:>7} | {jp['jpatch_cold_s']:>10.1f}s {jp['jpatch_warm_s']:>7.2f}s "
              f"{jp['compiles']:>11} ({jp['engine_programs']}) {jp['peak_rss_gb']:>6.2f}GB | "
              f"{tl_s:>9.1f}s {how:>12} | {row['warm_speedup']:>5.1f}x {row['cold_speedup']:>5.1f}x", flush=True)
        write_figures(figures, args.json)  # after every case: a run stopped part-way keeps its rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write the figures to this file")
    parser.add_argument("--tl-device", default="cpu", help="TransformerLens's torch device, e.g. cuda (default: cpu)")
    parser.add_argument("--sweeps", default=",".join(SWEEPS), help="comma-separated: " + ", ".join(SWEEPS))
    parser.add_argument("--n-prompts", type=int, default=8, help="--family llama / gemma2: random prompts")
    parser.add_argument("--n-pos", type=int, default=16, help="--family llama / gemma2: tokens per prompt")
    parser.add_argument("--family", default="gpt2", choices=("gpt2", "neox", "llama", "gemma2"),
                        help="the sweeps' model: GPT-2 small's shape, or neox: Pythia-160M's (12 layers, d 768), "
                             "llama: SmolLM-135M's (30 layers, d 576, 9 / 3 heads), gemma2: a small Gemma 2 "
                             "(8 layers, d 512, 8 / 4 heads, window 64, soft caps)")
    parser.add_argument("--bulk", action="store_true", help="benchmark a bulk dataset sweep instead")
    parser.add_argument("--bulk-prompts", type=int, default=1000)
    parser.add_argument("--attribution", action="store_true",
                        help="benchmark attribution patching instead (scripts/bench_attribution.py)")
    parser.add_argument("--scaling", action="store_true", help="benchmark cost against prompt length and depth instead")
    parser.add_argument("--lengths", default="16,64,256,1024", help="--scaling: prompt lengths (GPT-2 small's shape)")
    parser.add_argument("--batches", default="1,8", help="--scaling: batch sizes")
    parser.add_argument("--sampled", type=int, default=32, help="--scaling: positions swept beyond this length")
    parser.add_argument("--deep", default="medium,xl", help="--scaling: deeper shapes on the factual grid ('' for none)")
    parser.add_argument("--tl-limit", type=float, default=600, help="--scaling: longest TransformerLens run measured (s)")
    parser.add_argument("--hook-loop", action="store_true",
                        help="benchmark a TransformerLens notebook's loop of hooked runs instead (bench_hook_loop.py)")
    parser.add_argument("--attr-recipe", action="store_true",
                        help="benchmark the Attribution_Patching_Demo's recipe instead (bench_attr_recipe.py)")
    parser.add_argument("--circuits", action="store_true",
                        help="benchmark path patching and ACDC instead (scripts/bench_circuits.py)")
    parser.add_argument("--session", action="store_true",
                        help="benchmark a notebook session of mixed calls instead (scripts/bench_session.py)")
    parser.add_argument("--session-shape", default="small", choices=("small", "tiny"), help="--session: model shape")
    parser.add_argument("--session-calls", type=int, default=20, help="--session: number of calls")
    parser.add_argument("--session-max", default="60,16", help="--session: longest prompt, largest batch")
    parser.add_argument("--session-no-tl", action="store_true",
                        help="--session: jpatch's calls only (to compare jpatch settings; no ratios printed)")
    args = parser.parse_args()
    if args.session:
        import bench_session

        max_len, max_batch = map(int, args.session_max.split(","))
        return bench_session.main(args.json, args.session_shape, args.session_calls, max_len, max_batch,
                                  tl=not args.session_no_tl)
    global TL_DEVICE
    TL_DEVICE = args.tl_device
    if args.circuits:
        import bench_circuits

        return bench_circuits.main(args.json)
    if args.attr_recipe:
        import bench_attr_recipe

        return bench_attr_recipe.main(args.json)
    if args.hook_loop:
        import bench_hook_loop

        return bench_hook_loop.main(args.json)
    if args.attribution:
        import bench_attribution

        return bench_attribution.main(args.json)

    import jax
    import torch
    from transformer_lens import patching as tl_patching

    from jpatch.engine.readout import on_columns
    from jpatch.methods import metrics

    from jpatch import patching
    if args.family != "gpt2" and (args.bulk or args.scaling):
        parser.error("--family applies to the sweeps (not --bulk or --scaling, which run GPT-2 shapes)")
    figures = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                           "jax_device": str(jax.devices()[0]), "jax": jax.__version__, "torch": torch.__version__},
               "family": args.family, "sweeps": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tl, model = build_models(tmp, args.family)
        if args.bulk:
            bench_bulk(tmp, tl, args.bulk_prompts, figures)
            args.sweeps = ""
        if args.scaling:
            bench_scaling(tmp, tl, args, figures)
            args.sweeps = ""
        RANDOM_PROMPTS.update(n=args.n_prompts, pos=args.n_pos)
        clean, corrupted, answers, contrasts = batch_for(args.family)
        figures["prompts"] = {"n": len(clean), "pos": int(clean.shape[1])}
        peak_flops = matmul_flops()
        figures["machine"]["matmul_gflops"] = peak_flops / 1e9
        print(f"device: {jax.devices()[0]}, measured dense matmul: {peak_flops / 1e9:.0f} GFLOP/s")

        jp_metric = metrics.logit_diff(answers, contrasts)
        n_vocab_ids = len(on_columns(jp_metric, model.config.d_vocab)[1])  # the ids the engine unembeds
        rows = np.arange(len(answers))
        lds = [model(t, logits_at=np.full((len(t), 1), t.shape[1] - 1))[rows, 0] for t in (clean, corrupted)]
        clean_ld, corrupted_ld = (float((np.asarray(l)[rows, answers] - np.asarray(l)[rows, contrasts]).mean()) for l in lds)
        callable_metric = jp_callable(answers, contrasts, clean_ld, corrupted_ld)
        tl_metric = tl_metric_fn(tl, clean, corrupted, answers, contrasts)
        _, tl_cache = tl.run_with_cache(tt(clean))
        _, jp_cache = model.run_with_cache(clean)
        for name in filter(None, args.sweeps.split(",")):
            cache_dir = os.path.join(tmp, f"jax-cache-{name}")
            cold = cold_jpatch(os.path.join(tmp, "jp"), name, cache_dir, args.family)  # empty compilation cache
            cached = cold_jpatch(os.path.join(tmp, "jp"), name, cache_dir, args.family)  # a second fresh process
            jp_fn = getattr(patching, f"get_act_patch_{name}")
            tl_fn = getattr(tl_patching, f"get_act_patch_{name}")

            with torch.no_grad():
                tl(tt(corrupted))  # warm-up: one forward (TransformerLens does not compile)
                t = time.perf_counter()
                tl_result = tl_fn(tl, tt(corrupted), tl_cache, tl_metric).cpu().numpy()
                tl_s = time.perf_counter() - t

            jax.block_until_ready(jp_fn(model, corrupted, jp_cache, jp_metric, progress=False))  # warm-up
            t = time.perf_counter()
            jp_result = jp_fn(model, corrupted, jp_cache, jp_metric, progress=False)
            jp_s = time.perf_counter() - t
            jp_fn(model, corrupted, jp_cache, callable_metric, progress=False)  # warm-up
            t = time.perf_counter()
            callable_result = jp_fn(model, corrupted, jp_cache, callable_metric, progress=False)
            callable_s = time.perf_counter() - t

            diff = float(np.abs(jp_result - tl_result).max())
            diff = max(diff, float(np.abs(callable_result - tl_result).max()))
            flops = engine_flops(model, name, len(clean), clean.shape[1], n_vocab_ids)
            row = {
                "patches": int(np.prod(tl_result.shape)),
                "tl_s": tl_s,
                "jpatch_s": jp_s,
                "speedup": tl_s / jp_s,
                "jpatch_cold_s": cold["sweep_s"],
                "jpatch_cold_process_s": cold["total_s"],
                "cold_speedup": tl_s / cold["sweep_s"],
                "jpatch_callable_s": callable_s,
                "callable_over_metric": callable_s / jp_s,
                "cold_compiles": cold["compiles"],
                "cold_engine_programs": cold["engine_programs"],
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
                f"cold with compile cache {cached['sweep_s']:.1f} s | callable metric {callable_s:.2f} s warm "
                f"({row['callable_over_metric']:.2f}x the Metric) | cold compiles {cold['compiles']} "
                f"({cold['engine_programs']} engine programs) | "
                f"{row['jpatch_gflops']:.0f} GFLOP/s = {row['matmul_fraction']:.0%} of matmul | "
                f"jpatch peak RSS {cold['peak_rss_gb']:.2f} GB | max |diff| {diff:.1e}"
            )
            if diff > 1e-4:
                raise SystemExit(f"{name}: jpatch and TransformerLens disagree (max abs diff {diff:.2e})")
    figures["tl_peak_rss_gb_process"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    write_figures(figures, args.json)
    return figures


def write_figures(figures, path):
    """The figures as JSON at `path` (--json; nothing when None)."""
    if path:
        with open(path, "w") as f:
            json.dump(figures, f, indent=2)


if __name__ == "__main__":
    main()
