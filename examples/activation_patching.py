"""TransformerLens's Activation Patching demo, ported to jpatch (imports changed, numpy for torch).

    python examples/activation_patching.py --out results/examples

The bundled toy model was trained without a BOS token, hence prepend_bos=False.
"""

import argparse

import jax.numpy as jnp
import numpy as np

import jpatch
from jpatch import patching
from jpatch.face import plot
parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--out", default="results/examples", help="folder for the heatmaps")
args = parser.parse_args()

model = jpatch.load("toy")  # TL: HookedTransformer.from_pretrained("gpt2-small")

prompts = [
    "Then, John and Mary went to the store. John gave a drink to",
    "Then, John and Mary went to the store. Mary gave a drink to",
    "Later, Tom and Anna walked to the park. Tom handed a ball to",
    "Later, Tom and Anna walked to the park. Anna handed a ball to",
]
answers = [(" Mary", " John"), (" John", " Mary"), (" Anna", " Tom"), (" Tom", " Anna")]
clean_tokens = model.to_tokens(prompts, prepend_bos=False)
corrupted_tokens = clean_tokens[jnp.array([1, 0, 3, 2])]  # swap the subject: the other name is right
print("Clean string 0:   ", model.to_string(clean_tokens[0]))
print("Corrupted string 0:", model.to_string(corrupted_tokens[0]))

answer_token_indices = jnp.array([[model.to_single_token(a) for a in pair] for pair in answers])


def get_logit_diff(logits, answer_token_indices=answer_token_indices):
    if len(logits.shape) == 3:
        logits = logits[:, -1, :]  # the final position
    correct = jnp.take_along_axis(logits, answer_token_indices[:, 0, None], axis=1)
    incorrect = jnp.take_along_axis(logits, answer_token_indices[:, 1, None], axis=1)
    return (correct - incorrect).mean()


clean_logits, clean_cache = model.run_with_cache(clean_tokens)
corrupted_logits, corrupted_cache = model.run_with_cache(corrupted_tokens)
CLEAN_BASELINE = float(get_logit_diff(clean_logits))
CORRUPTED_BASELINE = float(get_logit_diff(corrupted_logits))
print(f"Clean logit diff: {CLEAN_BASELINE:.4f}, corrupted logit diff: {CORRUPTED_BASELINE:.4f}")


def ioi_metric(logits):
    return (get_logit_diff(logits) - CORRUPTED_BASELINE) / (CLEAN_BASELINE - CORRUPTED_BASELINE)


print(f"Clean baseline is 1: {float(ioi_metric(clean_logits)):.4f}")
print(f"Corrupted baseline is 0: {float(ioi_metric(corrupted_logits)):.4f}")

# Patching the residual stream: [layer, pos]
resid_pre_act_patch_results = patching.get_act_patch_resid_pre(model, corrupted_tokens, clean_cache, ioi_metric,
                                                               progress=False)
labels = [f"{tok} {i}" for i, tok in enumerate(model.to_str_tokens(clean_tokens[0]))]
fig = plot.plot_sweep(resid_pre_act_patch_results, ("layer", "pos"), tokens=labels, title="resid_pre Activation Patching")
plot.save(fig, f"{args.out}/resid_pre.png")

# Patching the layer outputs: [3, layer, pos] for resid_pre, attn_out, mlp_out
every_block_result = patching.get_act_patch_block_every(model, corrupted_tokens, clean_cache, ioi_metric,
                                                        progress=False)
for name, result in zip(["resid_pre", "attn_out", "mlp_out"], every_block_result):
    plot.save(plot.plot_sweep(result, ("layer", "pos"), tokens=labels, title=f"{name} Activation Patching"),
              f"{args.out}/block_{name}.png")

# Patching the heads: [layer, head], all positions at once
attn_head_out_all_pos_act_patch_results = patching.get_act_patch_attn_head_out_all_pos(
    model, corrupted_tokens, clean_cache, ioi_metric, progress=False)
plot.save(plot.plot_sweep(attn_head_out_all_pos_act_patch_results, ("layer", "head"),
                          title="attn_head_out Activation Patching (All Pos)"), f"{args.out}/heads.png")
layer, head = np.unravel_index(np.abs(attn_head_out_all_pos_act_patch_results).argmax(),
                               attn_head_out_all_pos_act_patch_results.shape)
print(f"resid_pre at the final position, last layer: {resid_pre_act_patch_results[-1, -1]:.3f}")
print(f"most important head: L{layer}H{head} ({attn_head_out_all_pos_act_patch_results[layer, head]:+.3f})")
