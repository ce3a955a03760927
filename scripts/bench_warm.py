"""Warm jpatch time of GPT-2-small-shaped get_act_patch_* sweeps (bench.py's IOI batch, min of 3),
with a Metric and with a TransformerLens-style callable, in whichever jpatch is imported: compares
two checkouts (e.g. before and after a refactor) run alternately on one machine, where bench.py's
TransformerLens baseline is the same in both and only costs time.

    python scripts/bench_warm.py build            # once: the random Hugging Face model in HF_DIR
    PYTHONPATH=/path/to/checkout python scripts/bench_warm.py LABEL   # prints one JSON line
"""
import os, sys, time, json, tempfile
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import numpy as np
import jpatch
from jpatch import patching, metrics
from bench import ioi_batch
hf_dir = os.environ.get("HF_DIR", os.path.join(tempfile.gettempdir(), "jpatch_bench_warm_hf"))
if not os.path.exists(hf_dir):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(initializer_range=0.05, attn_implementation="eager")).eval().save_pretrained(hf_dir)
    sys.exit(0)
tmp = tempfile.mkdtemp()
jpatch.convert_hf(hf_dir, os.path.join(tmp, "jp"))
model = jpatch.load(os.path.join(tmp, "jp"))
clean, corrupted, answers, contrasts = ioi_batch()
_, cache = model.run_with_cache(clean)
metric = metrics.logit_diff(answers, contrasts)
rows = np.arange(len(answers))
fn = lambda logits: (logits[rows, -1, answers] - logits[rows, -1, contrasts]).mean()
out = {}
for name in ("resid_pre", "attn_head_out_all_pos"):
    for kind, m in (("Metric", metric), ("callable", fn)):
        f = getattr(patching, f"get_act_patch_{name}")
        f(model, corrupted, cache, m, progress=False)
        times = []
        for _ in range(3):
            t = time.perf_counter(); np.asarray(f(model, corrupted, cache, m, progress=False)); times.append(time.perf_counter() - t)
        out[f"{name}/{kind}"] = min(times)
print(json.dumps({"version": sys.argv[1], **{k: round(v, 3) for k, v in out.items()}}))
