"""A scripted notebook session (issue 23 item 5): `python scripts/bench.py --session`.

Twenty calls (by default) mixing get_act_patch_resid_pre / attn_head_out_all_pos / attn_head_out_by_pos /
mlp_out, attribute and path_patch on prompts of 10-60 tokens and batches of 1-16, each with a
fresh TransformerLens-style callable metric over new answer ids, in both directions. The jpatch
session runs in a fresh process with an empty persistent compilation cache, then in another with
the cache it left (warm); TransformerLens 3.9 runs the same calls in the first process on the same
weights (get_act_patch_* with its own functions, attribute as attribution patching through its hooks
and torch autograd; path_patch has no TransformerLens function and is timed for jpatch only).
Printed: each side's total wall time (compiles included), jpatch's compiles (XLA compile requests,
and how many the cache served), the empty- and warm-cache totals, and the arithmetic ceiling: the
get_act_patch_* calls' planned FLOPs at this machine's matmul speed, against TransformerLens's time for them.
"""

import itertools
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

import bench  # scripts/bench.py: matmul_flops, engine_flops

SHAPES = {"small": dict(n_layer=12, n_head=12, n_embd=768, vocab_size=50257),
          "tiny": dict(n_layer=2, n_head=4, n_embd=64, vocab_size=512)}
KINDS = ("resid_pre", "attn_head_out_all_pos", "mlp_out", "attribute", "path_patch")
BY_POS = "attn_head_out_by_pos"  # one call in 20: TransformerLens runs 144 x tokens forwards for it


def tl_seconds(kind, batch, tokens, n_layers=12, n_heads=12):
    """TransformerLens 3.9's time for a call on GPT-2 small's shape on this project's 2-core CPU, estimated
    from its measured forward (0.3 s + batch x tokens / 340 s, 2026-12-07): bounds the session's length."""
    forwards = {"resid_pre": n_layers * tokens, "mlp_out": n_layers * tokens, "attribute": 3, "path_patch": 0,
                "attn_head_out_all_pos": n_layers * n_heads, BY_POS: n_layers * n_heads * tokens}[kind]
    return forwards * (0.3 + batch * tokens / 340)


def session_calls(n, seed=0, max_len=60, max_batch=16, max_tl_s=120.0):
    """The session's calls: (kind, batch, tokens, direction). Kinds in turn, with a by-position heads sweep
    as the 4th of every 20 calls; shapes at random in 1..max_batch x 10..max_len, drawn again while
    TransformerLens's estimated time for the call is over max_tl_s (by-position: 4x that), as a notebook
    on a CPU keeps its sweeps to what finishes in minutes."""
    rng = np.random.default_rng(seed)
    others = itertools.cycle(KINDS)  # in turn, the by-position calls taking no turn
    calls = []
    for i in range(n):
        kind = BY_POS if i % 20 == 3 else next(others)
        cap = max_tl_s * (4 if kind == BY_POS else 1)
        while True:
            batch, tokens = int(rng.integers(1, max_batch + 1)), int(rng.integers(10, max_len + 1))
            if tl_seconds(kind, batch, tokens) <= cap or (batch, tokens) == (1, 10):
                break
        calls.append((kind, batch, tokens, ("denoise", "noise")[i % 2]))
    return calls


def models(shape, seed=0):
    """A random transformers GPT-2 of `shape` (jpatch and TransformerLens load its weights)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    s = SHAPES[shape]
    hf = GPT2LMHeadModel(GPT2Config(**s, n_positions=1024, bos_token_id=s["vocab_size"] - 1,
                                    eos_token_id=s["vocab_size"] - 1, attn_implementation="eager")).eval()
    return hf


def tl_model(hf):
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights

    c = hf.config
    cfg = HookedTransformerConfig(n_layers=c.n_layer, d_model=c.n_embd, n_ctx=c.n_positions, d_head=c.n_embd // c.n_head,
                                  n_heads=c.n_head, d_mlp=4 * c.n_embd, d_vocab=c.vocab_size, act_fn="gelu_new",
                                  normalization_type="LN", eps=c.layer_norm_epsilon, default_prepend_bos=False,
                                  device="cpu")
    model = HookedTransformer(cfg)
    model.load_and_process_state_dict(convert_gpt2_weights(hf, cfg), fold_ln=False, center_writing_weights=False,
                                      center_unembed=False, fold_value_biases=False)
    return model.eval()


def inputs(call, vocab, seed):
    kind, batch, tokens, direction = call
    rng = np.random.default_rng(seed)
    clean = rng.integers(0, vocab, (batch, tokens))
    corrupted = clean.copy()
    corrupted[:, tokens // 2] = (corrupted[:, tokens // 2] + 1) % vocab
    return clean, corrupted, rng.integers(0, vocab, batch), rng.integers(0, vocab, batch)


def jpatch_call(jpatch, model, call, clean, corrupted, a, b):
    """One call as a notebook writes it: a fresh lambda over this call's answers."""
    from jpatch import patching

    kind, batch, _, direction = call
    rows = np.arange(batch)
    metric = lambda logits: (logits[rows, -1, a] - logits[rows, -1, b]).mean()
    if kind == "attribute":
        return jpatch.attribute(model, clean, corrupted, "resid_pre", metric, direction=direction)
    if kind == "path_patch":
        return jpatch.path_patch(model, clean, corrupted, "heads", "logits", metric, direction=direction)
    base, source = (corrupted, clean) if direction == "denoise" else (clean, corrupted)
    _, cache = model.run_with_cache(source)
    return getattr(patching, f"get_act_patch_{kind}")(model, base, cache, metric, progress=False)


def tl_call(tl, call, clean, corrupted, a, b):
    """The same call through TransformerLens 3.9 (None for path_patch: no such function)."""
    import torch
    from transformer_lens import patching as tl_patching

    kind, batch, _, direction = call
    rows, a, b = torch.arange(batch), torch.tensor(a), torch.tensor(b)
    metric = lambda logits: (logits[rows, -1, a] - logits[rows, -1, b]).mean()
    base, source = (corrupted, clean) if direction == "denoise" else (clean, corrupted)
    base, source = torch.tensor(base), torch.tensor(source)
    if kind == "path_patch":
        return None
    if kind == "attribute":  # AtP: (source - base activation) . d metric / d activation, summed over d_model
        names = [f"blocks.{l}.hook_resid_pre" for l in range(tl.cfg.n_layers)]
        with torch.no_grad():
            _, src = tl.run_with_cache(source, names_filter=lambda n: n in names)
        acts = {}

        def keep(act, hook):
            act.retain_grad()
            acts[hook.name] = act
            return act
        tl.zero_grad(set_to_none=True)
        metric(tl.run_with_hooks(base, fwd_hooks=[(n, keep) for n in names])).backward()
        return torch.stack([((src[n] - acts[n]) * acts[n].grad).sum(-1).mean(0) for n in names]).detach().numpy()
    _, cache = tl.run_with_cache(source)
    with torch.no_grad():
        return getattr(tl_patching, f"get_act_patch_{kind}")(tl, base, cache, metric).numpy()


def progress(line):
    print(line, file=sys.stderr, flush=True)  # the parent passes stderr through: a long run shows where it is


def planned_flops(model, calls):
    """The engine's planned arithmetic (bench.engine_flops) of each get_act_patch_* call at the shape it
    runs at (its bucket unless JPATCH_BUCKETS=0), its metric's logits at two ids per prompt (a power of
    two, `readout.on_columns`); None for attribute and path_patch."""
    from jpatch.engine import buckets

    out = []
    for kind, batch, tokens, _ in calls:
        rows, pos = (buckets.size(n) if buckets.enabled() else n for n in (batch, tokens))
        sweeps = kind.startswith(("resid", "mlp", "attn"))
        out.append(bench.engine_flops(model, kind, rows, pos, 1 << (2 * rows - 1).bit_length()) if sweeps else None)
    return out


def child(spec):
    """One session in this fresh process: jpatch's calls, then (spec["tl"]) TransformerLens's."""
    import jax

    requests, hits = [], []
    jax.monitoring.register_event_duration_secs_listener(
        lambda e, d, **kw: requests.append(d) if e == "/jax/core/compile/backend_compile_duration" else None)
    jax.monitoring.register_event_listener(
        lambda e, **kw: hits.append(e) if e == "/jax/compilation_cache/cache_hits" else None)
    import torch

    import jpatch

    torch.set_num_threads(os.cpu_count())
    hf = models(spec["shape"])
    model = jpatch.from_hf(hf)
    calls = [tuple(c) for c in spec["calls"]]
    out = {"jpatch_s": [], "tl_s": [], "compiles": [], "cache_hits": [], "max_abs_diff": 0.0}
    results = []
    for i, call in enumerate(calls):
        data = inputs(call, hf.config.vocab_size, i)
        n, h, t = len(requests), len(hits), time.perf_counter()
        results.append(np.asarray(jpatch_call(jpatch, model, call, *data)))
        out["jpatch_s"].append(time.perf_counter() - t)
        out["compiles"].append(len(requests) - n)
        out["cache_hits"].append(len(hits) - h)
        progress(f"jpatch {i + 1}/{len(calls)} {call}: {out['jpatch_s'][-1]:.2f} s, {out['compiles'][-1]} compiles")
    out["planned_flops"], out["matmul_flops"] = planned_flops(model, calls), bench.matmul_flops()
    if spec["tl"]:
        tl = tl_model(hf)
        for i, call in enumerate(calls):
            data = inputs(call, hf.config.vocab_size, i)
            t = time.perf_counter()
            expected = tl_call(tl, call, *data)
            out["tl_s"].append(time.perf_counter() - t)
            progress(f"TransformerLens {i + 1}/{len(calls)} {call}: {out['tl_s'][-1]:.2f} s")
            if expected is not None and call[0] != "attribute":  # get_act_patch_*: the same numbers
                out["max_abs_diff"] = max(out["max_abs_diff"], float(np.abs(results[i] - expected).max()))
    return out


def run(spec, cache_home):
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")},
           "XDG_CACHE_HOME": cache_home, "JPATCH_COMPILE_CACHE": "1"}
    code = (f"import sys, json; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r}); "
            f"import bench_session; print(json.dumps(bench_session.child(json.loads(sys.argv[1]))))")
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], stdout=subprocess.PIPE, text=True, env=env)
    if proc.returncode:
        raise SystemExit("session process failed (its error is above)")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_session(shape="small", n_calls=20, tl=True, max_len=60, max_batch=16):
    """The session with an empty then a warm persistent cache; returns the figures."""
    calls = session_calls(n_calls, max_len=max_len, max_batch=max_batch)
    spec = {"shape": shape, "calls": calls, "tl": tl}
    with tempfile.TemporaryDirectory() as home:
        empty = run(spec, home)
        warm = run({**spec, "tl": False}, home)
    tl_total = sum(empty["tl_s"]) if tl else None
    tl_comparable = sum(s for s, c in zip(empty["tl_s"], calls) if c[0] != "path_patch") if tl else None
    jp_comparable = lambda r: sum(s for s, c in zip(r["jpatch_s"], calls) if c[0] != "path_patch")
    figures = {"shape": shape, "calls": calls, "empty": empty, "warm": warm,
               "jpatch_empty_s": sum(empty["jpatch_s"]), "jpatch_warm_s": sum(warm["jpatch_s"]), "tl_s": tl_total,
               "speedup_empty": tl_comparable / jp_comparable(empty) if tl else None,
               "speedup_warm": tl_comparable / jp_comparable(warm) if tl else None}
    return figures


def report(f):
    """The figures as printable lines."""
    lines = [f"session: {len(f['calls'])} calls on GPT-2 {f['shape']}'s shape "
             f"(tokens {min(c[2] for c in f['calls'])}-{max(c[2] for c in f['calls'])}, "
             f"batch {min(c[1] for c in f['calls'])}-{max(c[1] for c in f['calls'])})"]
    for i, c in enumerate(f["calls"]):
        tl = f["empty"]["tl_s"][i] if f["empty"]["tl_s"] else None
        lines.append(f"  {i + 1:2d} {c[0]:>22} B={c[1]:2d} T={c[2]:2d} {c[3]:>7} | jpatch empty "
                     f"{f['empty']['jpatch_s'][i]:6.2f} s ({f['empty']['compiles'][i]:3d} compiles) warm "
                     f"{f['warm']['jpatch_s'][i]:6.2f} s ({f['warm']['cache_hits'][i]:3d} from cache) | TransformerLens "
                     + ("-" if tl is None or c[0] == "path_patch" else f"{tl:6.2f} s"))
    lines.append(f"jpatch total: {f['jpatch_empty_s']:.1f} s with an empty cache "
                 f"({sum(f['empty']['compiles'])} compiles), {f['jpatch_warm_s']:.1f} s warm "
                 f"({sum(f['warm']['cache_hits'])} of {sum(f['warm']['compiles'])} compiles from the cache)")
    from jpatch.engine.buckets import size  # the shape buckets' padding (JPATCH_BUCKETS=0: none)
    on = os.environ.get("JPATCH_BUCKETS", "1").strip() != "0"
    ratio = lambda power: (sum((size(c[1]) if on else c[1]) * (size(c[2]) if on else c[2]) ** power for c in f["calls"])
                           / sum(c[1] * c[2] ** power for c in f["calls"]))
    lines.append(f"shape buckets {'on' if on else 'off'}: {ratio(1):.3f}x the prompt-token rows, {ratio(2):.3f}x the "
                 "rows of a by-position sweep (rows ~ batch x tokens^2)")
    if f["tl_s"] is not None:
        lines.append(f"TransformerLens total: {f['tl_s']:.1f} s; TransformerLens time / jpatch time without path_patch "
                     f"(no TransformerLens function): {f['speedup_empty']:.2f}x with an empty cache, "
                     f"{f['speedup_warm']:.2f}x warm; "
                     f"get_act_patch_* max |diff| {f['empty']['max_abs_diff']:.1e}")
        swept = [i for i, fl in enumerate(f["empty"]["planned_flops"]) if fl is not None]
        flops, peak = sum(f["empty"]["planned_flops"][i] for i in swept), f["empty"]["matmul_flops"]
        tl_swept = sum(f["empty"]["tl_s"][i] for i in swept)
        lines.append(f"arithmetic ceiling: the {len(swept)} get_act_patch_* calls plan {flops / 1e12:.2f} TFLOP, "
                     f"{flops / peak:.1f} s at this machine's dense matmul speed ({peak / 1e9:.0f} GFLOP/s): at most "
                     f"{tl_swept * peak / flops:.1f}x TransformerLens's {tl_swept:.1f} s for them with no compiling, "
                     f"tracing or host work (measured: {tl_swept / sum(f['empty']['jpatch_s'][i] for i in swept):.2f}x "
                     f"empty, {tl_swept / sum(f['warm']['jpatch_s'][i] for i in swept):.2f}x warm)")
    return lines


def main(json_path=None, shape="small", n_calls=20, max_len=60, max_batch=16, tl=True):
    figures = bench_session(shape, n_calls, tl=tl, max_len=max_len, max_batch=max_batch)
    print("\n".join(report(figures)))
    if json_path:
        with open(json_path, "w") as f:
            json.dump(figures, f, indent=1)
