"""`python scripts/bench.py --hook-loop`: TransformerLens's Exploratory Analysis demo's resid_pre
patching loop (a new hook closure for every layer x position, `run_with_hooks`, the logit
difference read back each time) on GPT-2 small's shape, 8 IOI prompts of 15 tokens: TransformerLens
3.9 and jpatch (the same loop, the hook written with jnp) in the same process on the same weights,
and the same grid as one `jpatch.patching.get_act_patch_resid_pre` call. jpatch's first loop
includes its compiling (a notebook runs the loop once); the second is warm.
"""

import os
import sys
import tempfile
import time
from functools import partial

import numpy as np


def main(json_path=None):
    import torch

    import jpatch
    from bench import build_models, ioi_batch, tt, write_figures
    from jpatch import patching

    torch.set_num_threads(os.cpu_count())
    with tempfile.TemporaryDirectory() as tmp:
        tl, model = build_models(tmp)
        clean, corrupted, answers, contrasts = ioi_batch()
        L, T = model.cfg.n_layers, clean.shape[1]
        rows = np.arange(len(answers))

        def logit_diff(logits):
            logits = np.asarray(logits.detach() if isinstance(logits, torch.Tensor) else logits)
            return float((logits[rows, -1, answers] - logits[rows, -1, contrasts]).mean())

        # TransformerLens, as the demo writes it
        with torch.no_grad():
            _, tl_cache = tl.run_with_cache(tt(clean))
            tl_clean, tl_corrupted = logit_diff(tl(tt(clean))), logit_diff(tl(tt(corrupted)))

            def patch_residual_component(component, hook, pos, clean_cache):
                component[:, pos, :] = clean_cache[hook.name][:, pos, :]
                return component

            t = time.perf_counter()
            tl_grid = np.zeros((L, T))
            for layer in range(L):
                for position in range(T):
                    hook_fn = partial(patch_residual_component, pos=position, clean_cache=tl_cache)
                    patched = tl.run_with_hooks(tt(corrupted), fwd_hooks=[(f"blocks.{layer}.hook_resid_pre", hook_fn)])
                    tl_grid[layer, position] = (logit_diff(patched) - tl_corrupted) / (tl_clean - tl_corrupted)
            tl_s = time.perf_counter() - t

        # jpatch: the same cells, the hook in jax.numpy
        _, cache = model.run_with_cache(clean)
        jp_clean, jp_corrupted = logit_diff(model(clean)), logit_diff(model(corrupted))

        def jp_patch(component, hook, pos, clean_cache):
            return component.at[:, pos, :].set(clean_cache[hook.name][:, pos, :])

        def jp_loop():
            grid = np.zeros((L, T))
            for layer in range(L):
                for position in range(T):
                    hook_fn = partial(jp_patch, pos=position, clean_cache=cache)
                    patched = model.run_with_hooks(corrupted, fwd_hooks=[(f"blocks.{layer}.hook_resid_pre", hook_fn)])
                    grid[layer, position] = (logit_diff(patched) - jp_corrupted) / (jp_clean - jp_corrupted)
            return grid

        timed = []
        for _ in range(2):
            t = time.perf_counter()
            grid = jp_loop()
            timed.append(time.perf_counter() - t)

        metric = jpatch.metrics.logit_diff(answers, contrasts)
        sweep_s = []
        for _ in range(2):
            t = time.perf_counter()
            swept = np.asarray(patching.get_act_patch_resid_pre(model, corrupted, cache, metric, progress=False))
            sweep_s.append(time.perf_counter() - t)

    diff = max(float(np.abs(grid - tl_grid).max()), float(np.abs(swept - tl_grid).max()))
    figures = {"hook_loop": {
        "runs": L * T, "tl_s": tl_s, "jpatch_first_s": timed[0], "jpatch_warm_s": timed[1],
        "first_speedup": tl_s / timed[0], "warm_speedup": tl_s / timed[1],
        "sweep_first_s": sweep_s[0], "sweep_warm_s": sweep_s[1], "sweep_warm_speedup": tl_s / sweep_s[1],
        "max_abs_diff": diff}}
    f = figures["hook_loop"]
    print(f"hook loop, {L * T} hooked runs: TransformerLens {tl_s:.1f} s | jpatch {timed[0]:.1f} s first "
          f"({f['first_speedup']:.2f}x), {timed[1]:.1f} s warm ({f['warm_speedup']:.2f}x) | the same grid as one "
          f"get_act_patch_resid_pre: {sweep_s[0]:.1f} s first, {sweep_s[1]:.2f} s warm ({f['sweep_warm_speedup']:.1f}x) | "
          f"max |diff| {diff:.1e}")
    if diff > 1e-4:
        raise SystemExit(f"hook loop: jpatch and TransformerLens disagree (max abs diff {diff:.2e})")
    write_figures(figures, json_path)
    return figures


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main(sys.argv[1] if len(sys.argv) > 1 else None)
