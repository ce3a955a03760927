"""Warm jpatch time of GPT-2-small-shaped get_act_patch_* sweeps (bench.py's IOI batch, min of
--runs, default 3), with a Metric and with a TransformerLens-style callable timed alternately, in
whichever jpatch is imported: compares two checkouts (e.g. before and after a refactor) run one
after the other on one machine, where bench.py's TransformerLens baseline is the same in both and
only costs time. Each sweep's callable / Metric ratio is printed too.

    python scripts/bench_warm.py build            # once: the random Hugging Face model in HF_DIR
    PYTHONPATH=/path/to/checkout python scripts/bench_warm.py LABEL   # prints one JSON line
    python scripts/bench_warm.py LABEL --sweeps attn_head_out_by_pos --runs 2   # the by-position heads
        sweep (2,160 patches, about 100 s a run on a 2-core CPU), not in the default pair
"""
import argparse, os, sys, time, json, tempfile
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
parser = argparse.ArgumentParser()
parser.add_argument("label")
parser.add_argument("--sweeps", default="resid_pre,attn_head_out_all_pos", help="get_act_patch_<name> names")
parser.add_argument("--runs", type=int, default=3, help="warm runs of each (the minimum is reported)")
args = parser.parse_args()
tmp = tempfile.mkdtemp()
jpatch.convert_hf(hf_dir, os.path.join(tmp, "jp"))
model = jpatch.load(os.path.join(tmp, "jp"))
clean, corrupted, answers, contrasts = ioi_batch()
_, cache = model.run_with_cache(clean)
metric = metrics.logit_diff(answers, contrasts)
rows = np.arange(len(answers))
fn = lambda logits: (logits[rows, -1, answers] - logits[rows, -1, contrasts]).mean()
out = {}
for name in args.sweeps.split(","):
    f = getattr(patching, f"get_act_patch_{name}")
    kinds = (("Metric", metric), ("callable", fn))
    times = {kind: [] for kind, _ in kinds}
    for kind, m in kinds:  # warm-up: compiles
        f(model, corrupted, cache, m, progress=False)
    for _ in range(args.runs):  # alternately, so both see the same machine load
        for kind, m in kinds:
            t = time.perf_counter(); np.asarray(f(model, corrupted, cache, m, progress=False)); times[kind].append(time.perf_counter() - t)
    for kind, _ in kinds:
        out[f"{name}/{kind}"] = min(times[kind])
    out[f"{name}/ratio"] = out[f"{name}/callable"] / out[f"{name}/Metric"]
print(json.dumps({"version": args.label, **{k: round(v, 3) for k, v in out.items()}}))
