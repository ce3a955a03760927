"""The main cells of TransformerLens's IOI walkthrough (Exploratory Analysis Demo), ported to
jpatch: tokens, cache indexing, direct logit attribution, the logit lens, attention patterns,
then steering and generation.

    python examples/ioi_walkthrough.py --out results/examples

The bundled toy model was trained with and without a BOS token; these prompts have none (prepend_bos=False).
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np

import jpatch
from jpatch import utils
from jpatch.face import plot
parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--out", default="results/examples", help="folder for the figures")
args = parser.parse_args()

model = jpatch.load("toy")
print(f"{model.cfg.n_layers} layers, {model.cfg.n_heads} heads, d_model {model.cfg.d_model}, {model.cfg.act_fn}")

prompt_format = [
    "Then, John and Mary went to the store.{} gave a drink to",
    "Later, Tom and Anna walked to the park.{} handed a ball to",
]
name_pairs = [(" Mary", " John"), (" Anna", " Tom")]
prompts, answers = [], []
for fmt, (io, s) in zip(prompt_format, name_pairs):
    prompts += [fmt.format(s), fmt.format(io)]
    answers += [(io, s), (s, io)]
tokens = model.to_tokens(prompts, prepend_bos=False)
answer_tokens = jnp.array([[model.to_single_token(a) for a in pair] for pair in answers])
print(model.to_str_tokens(prompts[0], prepend_bos=False))

original_logits, cache = model.run_with_cache(tokens)


def logits_to_ave_logit_diff(logits, answer_tokens, per_prompt=False):
    final_logits = logits[:, -1, :]
    answer_logits = jnp.take_along_axis(final_logits, answer_tokens, axis=1)
    answer_logit_diff = answer_logits[:, 0] - answer_logits[:, 1]
    return answer_logit_diff if per_prompt else answer_logit_diff.mean()


original_average_logit_diff = float(logits_to_ave_logit_diff(original_logits, answer_tokens))
print(f"Per prompt logit difference: {np.round(logits_to_ave_logit_diff(original_logits, answer_tokens, True), 3)}")
print(f"Average logit difference: {original_average_logit_diff:.3f}")

# Cache indexing: every spelling TransformerLens accepts
assert cache["z", 0].shape == cache["blocks.0.attn.hook_z"].shape == cache[utils.get_act_name("z", 0)].shape

# Direct logit attribution: the logit difference direction in the residual stream
answer_residual_directions = model.tokens_to_residual_directions(answer_tokens)  # [batch, 2, d_model]
correct_residual_directions, incorrect_residual_directions = answer_residual_directions[:, 0], answer_residual_directions[:, 1]
# jpatch keeps the final layer norm's weight and bias unfolded (TransformerLens folds them into W_U by
# default): fold the weight into the directions here; the bias adds a constant.
unembed_diff = correct_residual_directions - incorrect_residual_directions
logit_diff_directions = unembed_diff * model.ln_f.weight
bias_logit_diff = float((unembed_diff * model.ln_f.bias).sum(-1).mean())

final_residual_stream = cache["resid_post", -1]  # [batch, pos, d_model]
final_token_residual_stream = final_residual_stream[:, -1, :]
scaled_final_token_residual_stream = cache.apply_ln_to_stack(final_token_residual_stream, layer=-1, pos_slice=-1)
average_logit_diff = float((scaled_final_token_residual_stream * logit_diff_directions).sum(-1).mean())
print(f"Calculated average logit diff: {average_logit_diff + bias_logit_diff:.3f} "
      f"(original: {original_average_logit_diff:.3f})")
assert abs(average_logit_diff + bias_logit_diff - original_average_logit_diff) < 0.05


def residual_stack_to_logit_diff(residual_stack, cache):
    scaled = cache.apply_ln_to_stack(residual_stack, layer=-1, pos_slice=-1)
    return (scaled * logit_diff_directions).sum(-1).mean(-1)


# Logit lens over the accumulated residual stream
accumulated_residual, labels = cache.accumulated_resid(layer=-1, incl_mid=True, pos_slice=-1, return_labels=True)
logit_lens_logit_diffs = residual_stack_to_logit_diff(accumulated_residual, cache)
print("logit lens:", dict(zip(labels, np.round(np.asarray(logit_lens_logit_diffs), 2))))
lens = cache.logit_lens(pos_slice=-1)  # [layers + 1, batch, d_vocab]: what each layer "predicts"
print("top prediction by layer (prompt 0):", [model.to_string(lens[l, 0].argmax()) for l in range(len(lens))])

# Layer and head attribution
per_layer_residual, labels = cache.decompose_resid(layer=-1, pos_slice=-1, return_labels=True)
per_layer_logit_diffs = residual_stack_to_logit_diff(per_layer_residual, cache)
print("per layer:", dict(zip(labels, np.round(np.asarray(per_layer_logit_diffs), 2))))
per_head_residual, labels = cache.stack_head_results(layer=-1, pos_slice=-1, return_labels=True)
per_head_logit_diffs = residual_stack_to_logit_diff(per_head_residual, cache).reshape(model.cfg.n_layers,
                                                                                      model.cfg.n_heads)
plot.save(plot.heatmap(per_head_logit_diffs, rows="layer", cols="head", title="Logit Difference From Each Head"),
          f"{args.out}/dla_heads.png")
layer, head = np.unravel_index(np.abs(per_head_logit_diffs).argmax(), per_head_logit_diffs.shape)
print(f"top head: L{layer}H{head} ({float(per_head_logit_diffs[layer, head]):+.3f})")

# Its attention pattern on prompt 0
pattern = cache["pattern", int(layer)][0, int(head)]
str_tokens = model.to_str_tokens(tokens[0])
plot.save(plot.heatmap(pattern, rows="destination", cols="src", col_labels=str_tokens,
                       row_labels=[repr(t)[1:-1] for t in str_tokens], title=f"L{layer}H{head} attention"),
          f"{args.out}/pattern.png")

# Steering: add a multiple of the residual stream's difference between prompts 1 and 0 (which
# differ in the repeated name) at one layer; at coefficient 1 prompt 0 becomes prompt 1 there.
steer_layer = 1
vector = cache["resid_pre", steer_layer][1] - cache["resid_pre", steer_layer][0]  # [pos, d_model]
coefficients = jnp.linspace(0.0, 1.0, 5)


@jax.jit
def steered_logit_diff(model, coefficients):  # every coefficient in one compiled call
    run = lambda c: model(tokens[:1], overrides={f"blocks.{steer_layer}.hook_resid_pre": jpatch.Add(c * vector)})
    return jax.vmap(lambda c: logits_to_ave_logit_diff(run(c), answer_tokens[:1]))(coefficients)


steered = np.asarray(steered_logit_diff(model, coefficients))
print("steering, logit diff of prompt 0 by coefficient:", np.round(steered, 2))
per_prompt = np.asarray(logits_to_ave_logit_diff(original_logits, answer_tokens, True))
assert abs(steered[0] - per_prompt[0]) < 0.1 and abs(steered[-1] + per_prompt[1]) < 0.5  # prompt 1's answer wins

# Generation (greedy, with a key-value cache)
print(model.generate(prompts[0], max_new_tokens=4, do_sample=False, prepend_bos=False))
