"""`python scripts/bench.py --attr-recipe`: TransformerLens's Attribution_Patching_Demo recipe on the
bundled toy model (jpatch.load("toy"): 4 layers, d_model 128, GPT-2's vocabulary), 8 IOI prompts of
15 tokens, the demo's normalized logit-difference metric, in one process on the same weights:

1. TransformerLens 3.9, the notebook's code: get_cache_fwd_and_bwd (hooks caching every hook point
   but the q / k / v inputs, forward and backward) of the clean and of the corrupted prompts, then
   attr_patch_residual, attr_patch_layer_out, attr_patch_head_out, attr_patch_head_vector (q, k, v,
   z), attr_patch_head_pattern, attr_patch_head_path, create_attention_attr, the attr_cache and its
   three get_attr_patch_*_every;
2. the same cells on jpatch's hooks (run_with_hooks with the demo's caching hooks and
   backward_of=metric; the functions ported to jax.numpy, eagerly);
3. jpatch's API: jpatch.attribution.get_caches_fwd_and_bwd (both runs, one compiled forward and
   backward) and jpatch.attribution's functions of the same names.

Each is timed on its first call (compiling included; XLA's compile seconds counted beside it, and
the process CPU seconds, which a loaded machine does not inflate as much as wall time) and warm
(best of --repeat); first calls are cold (jpatch's persistent compilation cache off unless
JPATCH_COMPILE_CACHE is set). The results must agree within 1e-4 (ln1's hook_scale gradient aside, which
TransformerLens's hooks take from one of ln1's three calls: attr_patch_head_path is compared on
autograd's gradient there).
"""

import os
import sys
import time

import numpy as np


def tl_from_jpatch(model, torch):
    """TransformerLens 3.9's HookedTransformer with a jpatch GPT-2's weights."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    c = model.config
    cfg = HookedTransformerConfig(n_layers=c.n_layer, d_model=c.d_model, n_ctx=c.n_ctx, d_head=c.d_head,
                                  n_heads=c.n_head, d_mlp=c.d_mlp, d_vocab=c.d_vocab, act_fn=c.activation,
                                  normalization_type="LN", eps=c.layer_norm_eps, positional_embedding_type="standard",
                                  default_prepend_bos=False, device="cpu")
    tl = HookedTransformer(cfg)
    tl.load_state_dict({n: torch.tensor(np.asarray(w, np.float32)) for n, w in model.named_parameters()}, strict=False)
    tl.set_use_attn_result(True)
    return tl.eval()


def notebook(xp, einsum, model_cfg, caches):
    """The demo's attribution cells on (clean, corrupted, corrupted_grad, clean_grad) caches, written
    once for torch and jax.numpy (`xp`), as the notebook writes them (einops)."""
    import einops

    clean, corrupted, grad, clean_grad = caches
    L, H = model_cfg
    out = {}
    for name, fn in (("residual", lambda c: c.accumulated_resid(-1, incl_mid=True)),
                     ("layer_out", lambda c: c.decompose_resid(-1)), ("head_out", lambda c: c.stack_head_results(-1))):
        c, x, g = fn(clean), fn(corrupted), fn(grad)
        out[name] = einops.reduce(g * (c - x), "component batch pos d_model -> component pos", "sum")
    for name in "kqvz":
        st = lambda cache: einops.rearrange(xp.stack([cache[name, l] for l in range(L)]),
                                            "layer batch pos head d_head -> (layer head) batch pos d_head")
        out[name] = einops.reduce(st(grad) * (st(clean) - st(corrupted)), "c batch pos d_head -> c pos", "sum")
    st = lambda cache: einops.rearrange(xp.stack([cache["pattern", l] for l in range(L)]),
                                        "layer batch head dest src -> (layer head) batch dest src")
    out["pattern"] = einops.reduce(st(grad) * (st(clean) - st(corrupted)), "c batch dest src -> c dest src", "sum")
    out["attention_attr"] = einops.rearrange(
        xp.stack([clean["pattern", l] for l in range(L)]) * xp.stack([clean_grad["pattern", l] for l in range(L)]),
        "layer batch head dest src -> batch layer head dest src")
    W = {"q": "W_Q", "k": "W_K", "v": "W_V"}
    full = xp.stack([xp.stack([einsum("bphd,bp,hmd->bphm", grad[n, l], grad["scale", l, "ln1"][..., 0],
                                      getattr(clean.model, W[n])[l]) for l in range(L)]) for n in "qkv"])
    diff = einops.rearrange(clean.stack_head_results(-1) - corrupted.stack_head_results(-1),
                            "(layer head) batch pos d_model -> layer batch pos head d_model", layer=L)
    path = einsum("qlbphm,sbpgm->qlhsgp", full, diff)
    later = xp.arange(L)[None, :, None, None, None, None] > xp.arange(L)[None, None, None, :, None, None]
    path = xp.where(later, path, xp.zeros(1, dtype=path.dtype))
    out["head_path"] = einops.rearrange(path, "qkv le he ls hs pos -> (le he qkv) (ls hs) pos")
    attr = {k: grad.cache_dict[k] * (clean.cache_dict[k] - corrupted.cache_dict[k])
            for k in grad.cache_dict if k in clean.cache_dict}
    st = lambda name: xp.stack([attr[f"blocks.{l}.{name}"] for l in range(L)])
    out["block_every"] = xp.stack([einops.reduce(st(n), "layer batch pos d -> layer pos", "sum")
                                   for n in ("hook_resid_pre", "hook_attn_out", "hook_mlp_out")])
    heads = [st(f"attn.hook_{n}") for n in "zqkv"]
    out["all_pos_every"] = xp.stack([einops.reduce(h, "layer batch pos head d -> layer head", "sum") for h in heads]
                                    + [einops.reduce(st("attn.hook_pattern"), "layer b head d s -> layer head", "sum")])
    out["by_pos_every"] = xp.stack([einops.reduce(h, "layer batch pos head d -> layer pos head", "sum")
                                    for h in heads]
                                   + [einops.reduce(st("attn.hook_pattern"), "layer b head d s -> layer d head", "sum")])
    return out


def jpatch_api(model, clean, corrupted, metric):
    """The same results from jpatch.attribution: one compiled forward and backward, then its functions."""
    from jpatch import attribution as A

    r = A.get_caches_fwd_and_bwd(model, clean, corrupted, metric)
    args = (r.clean_cache, r.corrupted_cache, r.corrupted_grad_cache)
    out = {"residual": A.attr_patch_residual(*args)[0], "layer_out": A.attr_patch_layer_out(*args)[0],
           "head_out": A.attr_patch_head_out(*args)[0], "pattern": A.attr_patch_head_pattern(*args)[0],
           "head_path": A.attr_patch_head_path(*args)[0],
           "attention_attr": A.create_attention_attr(r.clean_cache, r.clean_grad_cache)}
    out.update({n: A.attr_patch_head_vector(*args, n)[0] for n in "kqvz"})
    attr_cache = A.attribution_cache(*args)
    out["block_every"] = A.get_attr_patch_block_every(attr_cache)
    out["all_pos_every"] = A.get_attr_patch_attn_head_all_pos_every(attr_cache)
    out["by_pos_every"] = A.get_attr_patch_attn_head_by_pos_every(attr_cache)
    return {k: np.asarray(v) for k, v in out.items()}


def timed(fn, repeat, compiles):
    """(first call: wall s, XLA compile s, CPU s), best warm wall s, the first call's result."""
    compiles.clear()
    t, c = time.perf_counter(), time.process_time()
    result = fn()
    first = (time.perf_counter() - t, sum(compiles), time.process_time() - c)
    warm = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        warm.append(time.perf_counter() - t)
    return first, min(warm), result


def main(json_path=None, repeat=3):
    if "jpatch" in sys.modules and os.environ.get("JPATCH_COMPILE_CACHE") != "0":
        print("note: jpatch was imported before with its compilation cache on: first calls may load from disk")
    # First calls are cold: jpatch's persistent compilation cache off (JPATCH_COMPILE_CACHE=1 to time it warm)
    os.environ.setdefault("JPATCH_COMPILE_CACHE", "0")
    import jax
    import jax.numpy as jnp
    import torch
    from transformer_lens import ActivationCache

    import jpatch
    from bench import ioi_batch, write_figures
    from jpatch import attribution as A

    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, secs, **kw: compiles.append(secs) if event.endswith("backend_compile_duration") else None)
    torch.set_num_threads(os.cpu_count())
    model = jpatch.load("toy")
    model.set_use_attn_result(True)  # as the demo does on TransformerLens: hooks see attn.hook_result
    tl = tl_from_jpatch(model, torch)
    clean, corrupted, answers, contrasts = ioi_batch()
    L, H = model.config.n_layer, model.config.n_head
    rows = np.arange(len(answers))
    keep = lambda name: "_input" not in name and not name.endswith("_in")  # noqa: E731 (TL 3.9 refuses hook_*_in)

    def logit_diff(logits):
        last = logits[:, -1]
        return (last[rows, answers] - last[rows, contrasts]).mean()

    with torch.no_grad():
        tl_clean, tl_corrupted = (logit_diff(tl(torch.tensor(t))).item() for t in (clean, corrupted))
    jp_clean, jp_corrupted = (float(logit_diff(model(t))) for t in (clean, corrupted))

    def tl_metric(logits):
        return (logit_diff(logits) - tl_corrupted) / (tl_clean - tl_corrupted)

    def jp_metric(logits):
        return (logit_diff(logits) - jp_corrupted) / (jp_clean - jp_corrupted)

    def tl_get_cache_fwd_and_bwd(tokens):  # the notebook's cell, on TransformerLens 3.9
        tl.reset_hooks()
        cache, grad_cache = {}, {}
        tl.add_hook(keep, lambda act, hook: cache.__setitem__(hook.name, act.detach()), "fwd")
        tl.add_hook(keep, lambda act, hook: grad_cache.__setitem__(hook.name, act.detach()), "bwd")
        value = tl_metric(tl(torch.tensor(tokens)))
        value.backward()
        tl.reset_hooks()
        return value.item(), ActivationCache(cache, tl), ActivationCache(grad_cache, tl)

    def tl_recipe():
        _, c, cg = tl_get_cache_fwd_and_bwd(clean)
        _, x, xg = tl_get_cache_fwd_and_bwd(corrupted)
        out = notebook(torch, torch.einsum, (L, H), (c, x, xg, cg))
        return {k: v.detach().numpy() for k, v in out.items()}

    def jp_get_cache_fwd_and_bwd(tokens):  # the same cell on jpatch's hooks
        cache, grad_cache = {}, {}
        logits = model.run_with_hooks(
            tokens, fwd_hooks=[(keep, lambda act, hook: cache.__setitem__(hook.name, act))],
            bwd_hooks=[(keep, lambda act, hook: grad_cache.__setitem__(hook.name, act))], backward_of=jp_metric)
        return float(jp_metric(logits)), jpatch.Cache(cache, model), jpatch.Cache(grad_cache, model)

    def jp_hooks_recipe():
        _, c, cg = jp_get_cache_fwd_and_bwd(clean)
        _, x, xg = jp_get_cache_fwd_and_bwd(corrupted)
        return {k: np.asarray(v) for k, v in notebook(jnp, jnp.einsum, (L, H), (c, x, xg, cg)).items()}

    # jpatch's first call first (torch's threads, once they have run, slow XLA's compiling down)
    api_first, api_warm, api_out = timed(lambda: jpatch_api(model, clean, corrupted, jp_metric), repeat, compiles)
    tl_recipe()  # TransformerLens's first call is not a compile: warm it up once
    (tl_first, _, _), tl_warm, tl_out = timed(tl_recipe, repeat, compiles)
    _, clean_cache = model.run_with_cache(clean)
    every = lambda: [np.asarray(getattr(A, f"get_attr_patch_{n}_every")(model, corrupted, clean_cache, jp_metric))
                     for n in ("block", "attn_head_all_pos", "attn_head_by_pos")]
    every_first, every_warm, every_out = timed(every, repeat, compiles)
    hooks_first, hooks_warm, hooks_out = timed(jp_hooks_recipe, repeat, compiles)

    # TransformerLens's hooks keep one of ln1's three hook_scale gradients: head_path on autograd's
    diff = {k: float(np.abs(api_out[k] - tl_out[k]).max()) for k in tl_out if k != "head_path"}
    diff.update({f"hooks_{k}": float(np.abs(hooks_out[k] - api_out[k]).max()) for k in api_out})
    # jpatch's get_attr_patch_*_every(model, ...) estimate the metric: corrupted value (0 here) + attribution
    diff.update({f"every_{k}": float(np.abs(got - api_out[k]).max())
                 for k, got in zip(("block_every", "all_pos_every", "by_pos_every"), every_out)})
    load = os.getloadavg()[0]
    figures = {"attr_recipe": {
        "model": "toy", "prompts": len(clean), "tokens": clean.shape[1], "load_average_1min": load,
        "cpus": os.cpu_count(), "tl_warm_s": tl_warm, "tl_call_s": tl_first,
        "jpatch_hooks_warm_s": hooks_warm, "jpatch_hooks_first_s": hooks_first[0],
        "jpatch_hooks_first_compile_s": hooks_first[1], "jpatch_api_warm_s": api_warm,
        "jpatch_api_first_s": api_first[0], "jpatch_api_first_compile_s": api_first[1],
        "jpatch_api_first_cpu_s": api_first[2], "api_vs_tl_warm": tl_warm / api_warm,
        "every_fns_warm_s": every_warm, "every_fns_first_s": every_first[0], "every_fns_first_compile_s": every_first[1],
        "api_vs_hooks_warm": hooks_warm / api_warm, "max_abs_diff": max(diff.values())}}
    f = figures["attr_recipe"]
    print(f"attribution demo's recipe on the toy, {len(clean)} prompts x {clean.shape[1]} tokens "
          f"(load average {load:.1f} on {os.cpu_count()} CPUs):\n"
          f"  TransformerLens 3.9:        warm {tl_warm * 1e3:7.1f} ms\n"
          f"  same cells on jpatch hooks: warm {hooks_warm * 1e3:7.1f} ms | first {hooks_first[0]:.1f} s "
          f"({hooks_first[1]:.1f} s compiling)\n"
          f"  jpatch.attribution API:     warm {api_warm * 1e3:7.1f} ms | first {api_first[0]:.1f} s "
          f"({api_first[1]:.1f} s compiling, {api_first[2]:.1f} CPU s)\n"
          f"  get_attr_patch_*_every(model, corrupted, clean_cache, metric), all three: warm {every_warm * 1e3:.1f} ms | "
          f"first {every_first[0]:.1f} s ({every_first[1]:.1f} s compiling)\n"
          f"  API vs TransformerLens {f['api_vs_tl_warm']:.1f}x warm, vs the hooks recipe "
          f"{f['api_vs_hooks_warm']:.1f}x | max |diff| {f['max_abs_diff']:.1e}")
    if f["max_abs_diff"] > 1e-4:
        raise SystemExit(f"attr recipe: results disagree: {diff}")
    write_figures(figures, json_path)
    return figures


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main(sys.argv[1] if len(sys.argv) > 1 else None)
