"""Benchmark: exact path patching in jpatch vs a two-pass TransformerLens 3.9 implementation, and ACDC.

GPT-2 small's shape (random weights), 8 IOI prompts of 15 tokens, normalized logit difference:
path patching from every one of the 144 heads to the logits (noising: each head's corrupted output
reaches only the logits, every other head frozen clean, MLPs recomputed), jpatch in one compiled
call vs TransformerLens 3.9 with one hooked forward per sender head (`reference.tl_path_patch`,
caches reused), in the same process. Warm times after one warm-up each; jpatch's first call
(compilation included) beside them. The two must agree within 1e-4; target: >= 8x.
Then ACDC on the bundled toy model (IOI, KL): edges kept, forwards evaluated in how many compiled
calls, and the forwards of the sequential algorithm it replaced.

    python scripts/bench.py --circuits [--json out.json]
"""

import json
import os
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
TARGET = 8


def bench_path_patching(figures):
    import jax
    import torch

    sys.path.insert(0, os.path.join(HERE, "..", "tests"))
    import bench
    from reference import tl_path_patch

    from jpatch import path_patch

    from jpatch.methods import metrics
    with tempfile.TemporaryDirectory() as tmp:
        tl, model = bench.build_models(tmp)
    clean, corrupted, answers, contrasts = bench.ioi_batch()
    L, H = model.config.n_layer, model.config.n_head
    rows = np.arange(len(clean))
    ld = lambda logits: (logits[rows, -1, answers] - logits[rows, -1, contrasts]).mean()

    def tl_run():
        with torch.no_grad():
            (clean_logits, base_cache), (corrupted_logits, src_cache) = (
                tl.run_with_cache(torch.tensor(t)) for t in (clean, corrupted))
        ld_clean, ld_corrupted = ld(clean_logits.numpy()), ld(corrupted_logits.numpy())
        raw = np.array([[ld(tl_path_patch(tl, clean, corrupted, (l, h), ["logits"], caches=(base_cache, src_cache)))
                         for h in range(H)] for l in range(L)])
        return (raw - ld_corrupted) / (ld_clean - ld_corrupted)

    metric = metrics.logit_diff(answers, contrasts)
    jp_run = lambda: np.asarray(path_patch(model, clean, corrupted, "heads", "logits", metric))
    t = time.perf_counter()
    jp_run()
    jp_cold = time.perf_counter() - t
    t = time.perf_counter()
    jp = jp_run()
    jp_s = time.perf_counter() - t
    with torch.no_grad():
        tl(torch.tensor(clean))  # warm-up
    t = time.perf_counter()
    ref = tl_run()
    tl_s = time.perf_counter() - t
    diff = float(np.abs(jp - ref).max())
    row = {"senders": L * H, "receivers": "logits", "prompts": int(len(clean)), "tokens": int(clean.shape[1]),
           "tl_s": tl_s, "jpatch_s": jp_s, "jpatch_first_call_s": jp_cold, "speedup": tl_s / jp_s,
           "speedup_first_call": tl_s / jp_cold, "max_abs_diff": diff, "target": TARGET,
           "device": str(jax.devices()[0])}
    figures["path_patching"] = row
    print(f"path patching, {L * H} sender heads -> logits: TransformerLens 3.9 two-pass {tl_s:.2f} s | jpatch "
          f"{jp_s:.3f} s warm ({row['speedup']:.1f}x, target >= {TARGET}x), first call {jp_cold:.2f} s "
          f"({row['speedup_first_call']:.1f}x) | max |diff| {diff:.1e}")
    if diff > 1e-4:
        raise SystemExit(f"path patching: jpatch and TransformerLens disagree (max abs diff {diff:.2e})")
    return row


def bench_acdc(figures, n_prompts=8, threshold=0.01):
    import jpatch
    from jpatch.data.tasks import ioi_task
    from jpatch.methods.circuits import acdc

    weights = os.path.join(HERE, "..", "weights", "toy")
    model = jpatch.load(weights)
    task = ioi_task(n_prompts, split="test", length=15)  # circuits need prompts of one length
    t = time.perf_counter()
    circuit = acdc(model, task.clean_tokens, task.corrupted_tokens, threshold=threshold)
    first = time.perf_counter() - t
    t = time.perf_counter()
    circuit = acdc(model, task.clean_tokens, task.corrupted_tokens, threshold=threshold)
    warm = time.perf_counter() - t
    row = {"model": "toy", "task": "ioi", "prompts": n_prompts, "threshold": threshold,
           "edges_kept": int(circuit.keep.sum()), "edges": int(circuit.valid.sum()),
           "sequential_forwards_replaced": circuit.n_tested, "forwards_evaluated": circuit.n_forwards,
           "compiled_calls": circuit.n_calls, "warm_s": warm, "first_call_s": first}
    figures["acdc"] = row
    print(f"ACDC on the toy (IOI, {n_prompts} prompts, KL, threshold {threshold}): {row['edges_kept']} of "
          f"{row['edges']} edges kept | {circuit.n_tested} sequential forwards replaced by {circuit.n_forwards} "
          f"batched ones in {circuit.n_calls} compiled calls | {warm:.2f} s warm, {first:.2f} s first call")
    return row


def main(json_path=None):
    figures = {}
    bench_path_patching(figures)
    bench_acdc(figures)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(figures, f, indent=2)
    return figures


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
