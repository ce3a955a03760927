"""TransformerLens 4.3's attribution_patch on a saved Hugging Face folder (run by
bench_attribution.py inside its own virtual environment; imports no jpatch).

    python bench_attribution_tl43.py MODEL_DIR INPUTS.npz OUT.npz

Times node and edge attribution (warm: after one untimed call on the first prompt
pair) and saves the scores as arrays, averaged over prompt pairs as TransformerLens does.
"""

import json
import sys
import time

import numpy as np
import torch
from transformer_lens.model_bridge import TransformerBridge
from transformer_lens.tools.analysis.attribution_patching import EdgeAttributionConfig, attribution_patch


def main(model_dir, inputs, out):
    data = np.load(inputs)
    clean, corrupted = torch.tensor(data["clean"]), torch.tensor(data["corrupted"])
    answers, contrasts = data["answers"], data["contrasts"]
    model = TransformerBridge.boot_transformers(model_dir, device="cpu")
    model.eval()
    cfg = model.cfg
    L, H, T = cfg.n_layers, cfg.n_heads, clean.shape[1]

    def metric(i):  # attribution_patch hands the metric one pair's logits; each pair has its own answer
        return lambda logits: logits[0, -1, int(answers[i])] - logits[0, -1, int(contrasts[i])]

    def run(config):
        """attribution_patch over the pairs, one pair per call, averaged (what it does for a batch)."""
        results = [attribution_patch(model, clean[i:i + 1], corrupted[i:i + 1], metric(i), config)
                   for i in range(len(clean))]
        return results

    figures = {}
    for name, config in (("node", EdgeAttributionConfig()), ("edge", EdgeAttributionConfig(granularity="edge"))):
        attribution_patch(model, clean[:1], corrupted[:1], metric(0), config)  # warm-up
        t = time.perf_counter()
        results = run(config)
        figures[f"{name}_s"] = time.perf_counter() - t
        if name == "node":
            z, mlp, embed = np.zeros((L, T, H)), np.zeros((L, T)), np.zeros(T)
            for r in results:
                for node, score in r.node_scores.items():
                    if node.kind == "attn_head_out":
                        z[node.layer, node.position, node.head] += score / len(results)
                    elif node.kind == "mlp_out":
                        mlp[node.layer, node.position] += score / len(results)
                    elif node.kind == "embed":
                        embed[node.position] += score / len(results)
        else:
            edges = {}
            for r in results:
                for (w, v), score in r.edge_scores.items():
                    key = (_writer(w), _reader(v), w.position)
                    edges[key] = edges.get(key, 0.0) + score / len(results)
    keys = sorted(edges)
    np.savez(out, z=z, mlp=mlp, embed=embed, edge_writer=np.array([k[0] for k in keys]),
             edge_reader=np.array([k[1] for k in keys]), edge_pos=np.array([k[2] for k in keys]),
             edge_score=np.array([edges[k] for k in keys]), figures=json.dumps(figures))


def _writer(node):
    if node.kind == "embed":
        return "embed"
    if node.kind == "attn_head_out":
        return f"a{node.layer}.h{node.head}"
    return f"m{node.layer}"


def _reader(node):
    if node.kind in ("q_input", "k_input", "v_input"):
        return f"a{node.layer}.h{node.head}<{node.kind[0]}>"
    if node.kind == "mlp_in":
        return f"m{node.layer}"
    return "logits"


if __name__ == "__main__":
    torch.set_grad_enabled(True)
    main(*sys.argv[1:4])
