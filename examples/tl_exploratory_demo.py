"""TransformerLens's Exploratory_Analysis_Demo.ipynb (demos/, TransformerLens main at 4cd36aa), ported
cell by cell: direct logit attribution, activation patching with hook functions, direct path
patching, head scores, ablation with `model.blocks[l].attn.hook_z.add_hook`.

`run(model)` runs every cell that ports on a jpatch model and returns {cell: the numbers it
produces}; `run(model, tl_model)` also runs the notebook's own code on TransformerLens (a
HookedTransformer with the same weights, loaded as the notebook loads GPT-2) and returns
(jpatch's, TransformerLens's). tests/test_tl_notebooks.py checks that they agree.

The notebook's code is kept, except (each marked `# jpatch:`): imports and model loading (jpatch
has no `refactor_factored_attn_matrices`; no number below depends on it); torch calls made jnp /
numpy (result stores are numpy arrays; hooks return `act.at[...].set(...)` where they assigned
into a clone of the activation); random tokens drawn with numpy. Left out: Colab / plotting /
widget cells, and GPT-2-small-specific layer and head numbers (cells 34-39: the direct path cells
run on the model's own layers 0 -> 1; cells 35-36 are outside the notebook's CI). Cell numbers count code cells from 0.
"""

from functools import partial
from typing import List, Optional, Union  # noqa: F401

import einops
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Float

import jpatch
from jpatch import utils
from jpatch.utils import einsum  # jpatch: fancy_einsum's einsum refuses JAX arrays

ActivationCache = jpatch.ActivationCache


def cells(model):
    """The notebook's cells on a jpatch `model` loaded as the notebook loads GPT-2: `jpatch.load(...,
    fold_ln=True, center_writing_weights=True, center_unembed=True, fold_value_biases=True)`."""
    out = {}
    # cell 4 (the rest of it loads the model)
    model.set_use_attn_result(True)
    device = utils.get_device()  # noqa: F841

    # cell 5
    example_prompt = "After John and Mary went to the store, John gave a bottle of milk to"
    example_answer = " Mary"
    utils.test_prompt(example_prompt, example_answer, model, prepend_bos=True)

    # cell 6
    prompt_format = [
        "When John and Mary went to the shops,{} gave the bag to",
        "When Tom and James went to the park,{} gave the ball to",
        "When Dan and Sid went to the shops,{} gave an apple to",
        "After Martin and Amy went to the park,{} gave a drink to",
    ]
    names = [(" Mary", " John"), (" Tom", " James"), (" Dan", " Sid"), (" Martin", " Amy")]
    prompts = []
    answers = []
    answer_tokens = []
    for i in range(len(prompt_format)):
        for j in range(2):
            answers.append((names[i][j], names[i][1 - j]))
            answer_tokens.append((model.to_single_token(answers[-1][0]), model.to_single_token(answers[-1][1])))
            prompts.append(prompt_format[i].format(answers[-1][1]))
    answer_tokens = jnp.array(answer_tokens)  # jpatch: torch.tensor(answer_tokens).to(device)
    out["6 answer_tokens"] = answer_tokens

    # cell 7
    for prompt in prompts:
        str_tokens = model.to_str_tokens(prompt)
        print("Prompt length:", len(str_tokens))

    # cell 8
    tokens = model.to_tokens(prompts, prepend_bos=True)
    original_logits, cache = model.run_with_cache(tokens)

    # cell 9
    def logits_to_ave_logit_diff(logits, answer_tokens, per_prompt=False):
        final_logits = logits[:, -1, :]
        answer_logits = jnp.take_along_axis(final_logits, answer_tokens, axis=-1)  # jpatch: .gather(dim=-1, ...)
        answer_logit_diff = answer_logits[:, 0] - answer_logits[:, 1]
        if per_prompt:
            return answer_logit_diff
        else:
            return answer_logit_diff.mean()

    print("Per prompt logit difference:",
          jnp.round(logits_to_ave_logit_diff(original_logits, answer_tokens, per_prompt=True), 3))  # jpatch
    original_average_logit_diff = logits_to_ave_logit_diff(original_logits, answer_tokens)
    out["9 logit diffs"] = [logits_to_ave_logit_diff(original_logits, answer_tokens, per_prompt=True),
                            original_average_logit_diff]

    # cell 10
    W_U = model.unembed.W_U
    answer_residual_directions = W_U[:, answer_tokens]
    answer_residual_directions = einops.rearrange(
        answer_residual_directions, "d_model batch correct_incorrect -> batch correct_incorrect d_model"
    )
    logit_diff_directions = answer_residual_directions[:, 0] - answer_residual_directions[:, 1]

    # cell 11
    final_residual_stream = cache["resid_post", -1]
    final_token_residual_stream = final_residual_stream[:, -1, :]
    scaled_final_token_residual_stream = cache.apply_ln_to_stack(final_token_residual_stream, layer=-1, pos_slice=-1)
    average_logit_diff = einsum(
        "batch d_model, batch d_model -> ", scaled_final_token_residual_stream, logit_diff_directions
    ) / len(prompts)
    print("Calculated average logit diff:", round(average_logit_diff.item(), 3))
    print("Original logit difference:", round(original_average_logit_diff.item(), 3))
    out["11 calculated logit diff"] = average_logit_diff

    # cell 12
    def residual_stack_to_logit_diff(
        residual_stack: Float[jax.Array, "components batch d_model"],  # jpatch: torch.Tensor
        cache: ActivationCache,
    ) -> float:
        scaled_residual_stack = cache.apply_ln_to_stack(residual_stack, layer=-1, pos_slice=-1)
        return einsum(
            "... batch d_model, batch d_model -> ...", scaled_residual_stack, logit_diff_directions
        ) / len(prompts)

    # cells 13-15
    accumulated_residual, labels = cache.accumulated_resid(layer=-1, incl_mid=True, pos_slice=-1, return_labels=True)
    out["13 logit lens"] = [residual_stack_to_logit_diff(accumulated_residual, cache), labels]
    per_layer_residual, labels = cache.decompose_resid(layer=-1, pos_slice=-1, return_labels=True)
    out["14 per layer"] = [residual_stack_to_logit_diff(per_layer_residual, cache), labels]
    per_head_residual, labels = cache.stack_head_results(layer=-1, pos_slice=-1, return_labels=True)
    per_head_logit_diffs = residual_stack_to_logit_diff(per_head_residual, cache)
    per_head_logit_diffs = einops.rearrange(
        per_head_logit_diffs,
        "(layer head_index) -> layer head_index",
        layer=model.cfg.n_layers,
        head_index=model.cfg.n_heads,
    )
    out["15 per head"] = [per_head_logit_diffs, labels]

    # cell 17 (the heads the plots show)
    top_k = 3
    top_positive_logit_attr_heads = jax.lax.top_k(per_head_logit_diffs.flatten(), top_k)[1]  # jpatch: torch.topk
    top_negative_logit_attr_heads = jax.lax.top_k(-per_head_logit_diffs.flatten(), top_k)[1]
    out["17 top heads"] = [top_positive_logit_attr_heads, top_negative_logit_attr_heads]

    # cell 18
    corrupted_prompts = []
    for i in range(0, len(prompts), 2):
        corrupted_prompts.append(prompts[i + 1])
        corrupted_prompts.append(prompts[i])
    corrupted_tokens = model.to_tokens(corrupted_prompts, prepend_bos=True)
    corrupted_logits, corrupted_cache = model.run_with_cache(corrupted_tokens, return_type="logits")
    corrupted_average_logit_diff = logits_to_ave_logit_diff(corrupted_logits, answer_tokens)
    out["18 corrupted"] = corrupted_average_logit_diff

    # cell 19
    out["19 strings"] = model.to_string(corrupted_tokens)

    # cell 20
    def patch_residual_component(corrupted_residual_component: Float[jax.Array, "batch pos d_model"], hook, pos,
                                 clean_cache):
        clean_value = clean_cache[hook.name][:, pos, :]  # jpatch: .clone() dropped
        # jpatch: a clone and an in-place write
        return corrupted_residual_component.at[:, pos: pos + 1, :].set(clean_value[:, None])

    def normalize_patched_logit_diff(patched_logit_diff):
        return (patched_logit_diff - corrupted_average_logit_diff) / (
            original_average_logit_diff - corrupted_average_logit_diff
        )

    patched_residual_stream_diff = np.zeros((model.cfg.n_layers, tokens.shape[1]), np.float32)  # jpatch: torch
    for layer in range(model.cfg.n_layers):
        for position in range(tokens.shape[1]):
            hook_fn = partial(patch_residual_component, pos=position, clean_cache=cache)
            patched_logits = model.run_with_hooks(
                corrupted_tokens,
                fwd_hooks=[(utils.get_act_name("resid_pre", layer), hook_fn)],
                return_type="logits",
            )
            patched_logit_diff = logits_to_ave_logit_diff(patched_logits, answer_tokens)
            patched_residual_stream_diff[layer, position] = normalize_patched_logit_diff(patched_logit_diff)
    out["20 resid_pre"] = patched_residual_stream_diff

    # cell 21 (the plot's labels)
    out["21 labels"] = [f"{tok}_{i}" for i, tok in enumerate(model.to_str_tokens(tokens[0]))]

    # cell 22
    patched_attn_diff = np.zeros((model.cfg.n_layers, tokens.shape[1]), np.float32)  # jpatch: torch.zeros
    patched_mlp_diff = np.zeros((model.cfg.n_layers, tokens.shape[1]), np.float32)
    for layer in range(model.cfg.n_layers):
        for position in range(tokens.shape[1]):
            hook_fn = partial(patch_residual_component, pos=position, clean_cache=cache)
            patched_attn_logits = model.run_with_hooks(
                corrupted_tokens,
                fwd_hooks=[(utils.get_act_name("attn_out", layer), hook_fn)],
                return_type="logits",
            )
            patched_attn_logit_diff = logits_to_ave_logit_diff(patched_attn_logits, answer_tokens)
            patched_mlp_logits = model.run_with_hooks(
                corrupted_tokens,
                fwd_hooks=[(utils.get_act_name("mlp_out", layer), hook_fn)],
                return_type="logits",
            )
            patched_mlp_logit_diff = logits_to_ave_logit_diff(patched_mlp_logits, answer_tokens)
            patched_attn_diff[layer, position] = normalize_patched_logit_diff(patched_attn_logit_diff)
            patched_mlp_diff[layer, position] = normalize_patched_logit_diff(patched_mlp_logit_diff)
    out["22 attn_out, mlp_out"] = [patched_attn_diff, patched_mlp_diff]

    # cell 25
    def patch_head_vector(corrupted_head_vector: Float[jax.Array, "batch pos head_index d_head"], hook, head_index,
                          clean_cache):
        clean_value = clean_cache[hook.name][:, :, head_index, :]  # jpatch: .clone() dropped
        return corrupted_head_vector.at[:, :, head_index: head_index + 1, :].set(clean_value[:, :, None])  # jpatch

    patched_head_z_diff = np.zeros((model.cfg.n_layers, model.cfg.n_heads), np.float32)  # jpatch: torch.zeros
    for layer in range(model.cfg.n_layers):
        for head_index in range(model.cfg.n_heads):
            hook_fn = partial(patch_head_vector, head_index=head_index, clean_cache=cache)
            patched_logits = model.run_with_hooks(
                corrupted_tokens,
                fwd_hooks=[(utils.get_act_name("z", layer, "attn"), hook_fn)],
                return_type="logits",
            )
            patched_logit_diff = logits_to_ave_logit_diff(patched_logits, answer_tokens)
            patched_head_z_diff[layer, head_index] = normalize_patched_logit_diff(patched_logit_diff)
    out["25 z"] = patched_head_z_diff

    # cell 27
    patched_head_v_diff = np.zeros((model.cfg.n_layers, model.cfg.n_heads), np.float32)  # jpatch: torch.zeros
    for layer in range(model.cfg.n_layers):
        for head_index in range(model.cfg.n_heads):
            hook_fn = partial(patch_head_vector, head_index=head_index, clean_cache=cache)
            patched_logits = model.run_with_hooks(
                corrupted_tokens,
                fwd_hooks=[(utils.get_act_name("v", layer, "attn"), hook_fn)],
                return_type="logits",
            )
            patched_logit_diff = logits_to_ave_logit_diff(patched_logits, answer_tokens)
            patched_head_v_diff[layer, head_index] = normalize_patched_logit_diff(patched_logit_diff)
    out["27 v"] = patched_head_v_diff

    # cell 29 (the plot's labels)
    head_labels = [f"L{l}H{h}" for l in range(model.cfg.n_layers) for h in range(model.cfg.n_heads)]
    out["29 head labels"] = head_labels

    # cell 30
    def patch_head_pattern(corrupted_head_pattern: Float[jax.Array, "batch head_index query_pos d_head"], hook,
                           head_index, clean_cache):
        clean_value = clean_cache[hook.name][:, head_index, :, :]  # jpatch: .clone() dropped
        return corrupted_head_pattern.at[:, head_index: head_index + 1, :, :].set(clean_value[:, None])  # jpatch

    patched_head_attn_diff = np.zeros((model.cfg.n_layers, model.cfg.n_heads), np.float32)  # jpatch: torch.zeros
    for layer in range(model.cfg.n_layers):
        for head_index in range(model.cfg.n_heads):
            hook_fn = partial(patch_head_pattern, head_index=head_index, clean_cache=cache)
            patched_logits = model.run_with_hooks(
                corrupted_tokens,
                fwd_hooks=[(utils.get_act_name("attn", layer, "attn"), hook_fn)],
                return_type="logits",
            )
            patched_logit_diff = logits_to_ave_logit_diff(patched_logits, answer_tokens)
            patched_head_attn_diff[layer, head_index] = normalize_patched_logit_diff(patched_logit_diff)
    out["30 pattern"] = patched_head_attn_diff

    # cell 32
    def patch_direct_path_A_output_to_B_attn_act(corrupted_attn_act: Float[jax.Array, "batch pos head_index d_head"],
                                                 hook, attn_act_type, A_layer, A_head_index, B_layer, B_head_index,
                                                 clean_cache, corrupted_cache):
        A_output_act_name = utils.get_act_name("result", A_layer, "attn")
        clean_A_output = clean_cache[A_output_act_name][:, :, A_head_index, :]
        corrupted_A_output = corrupted_cache[A_output_act_name][:, :, A_head_index, :]
        corrupted_B_act = corrupted_attn_act[:, :, B_head_index, :]
        W_B = _get_attention_weights(model.blocks[B_layer].attn, attn_act_type)[B_head_index]
        corrupted_ln1_scale = corrupted_cache[utils.get_act_name("scale", B_layer, "ln1")]
        patched_B_act = corrupted_B_act + (clean_A_output - corrupted_A_output) @ W_B / corrupted_ln1_scale
        return corrupted_attn_act.at[:, :, B_head_index, :].set(patched_B_act)  # jpatch: clone, write, return

    def direct_path_output_to_attn_act_diffs(output_layer, attn_act_layer, attn_act_type):
        A_to_B_diffs = np.zeros((model.cfg.n_heads, model.cfg.n_heads), np.float32)  # jpatch: torch.zeros
        for A in range(model.cfg.n_heads):
            for B in range(model.cfg.n_heads):
                patch_hook = (
                    utils.get_act_name(attn_act_type, attn_act_layer, "attn"),
                    partial(patch_direct_path_A_output_to_B_attn_act, attn_act_type=attn_act_type,
                            A_layer=output_layer, A_head_index=A, B_layer=attn_act_layer, B_head_index=B,
                            clean_cache=cache, corrupted_cache=corrupted_cache),
                )
                patched_logits = model.run_with_hooks(corrupted_tokens, fwd_hooks=[patch_hook], return_type="logits")
                patched_logit_diff = logits_to_ave_logit_diff(patched_logits, answer_tokens)
                A_to_B_diffs[A, B] = normalize_patched_logit_diff(patched_logit_diff)
        return A_to_B_diffs

    def _get_attention_weights(attn, attn_act_type):
        if attn_act_type == "q":
            return attn.W_Q
        if attn_act_type == "k":
            return attn.W_K
        if attn_act_type == "v":
            return attn.W_V
        raise ValueError

    # cell 34, on this model's layers (the notebook's are GPT-2 small's 5 -> 8; cells 35-36 repeat it for
    # queries and keys on other layers, outside the notebook's CI: `if not IN_GITHUB`)
    out["34 direct path"] = direct_path_output_to_attn_act_diffs(0, 1, "v")

    # cell 38
    example_text = "Research in mechanistic interpretability seeks to explain behaviors of machine learning models in terms of their internal components."  # noqa: E501
    example_repeated_text = example_text + example_text
    example_repeated_tokens = model.to_tokens(example_repeated_text, prepend_bos=True)
    example_repeated_logits, example_repeated_cache = model.run_with_cache(example_repeated_tokens)
    out["38 logits"] = example_repeated_logits[:, -1]

    # cell 40
    seq_len = 100
    batch_size = 2
    prev_token_scores = np.zeros((model.cfg.n_layers, model.cfg.n_heads), np.float32)  # jpatch: torch.zeros

    def prev_token_hook(pattern, hook):
        layer = hook.layer()
        diagonal = pattern.diagonal(offset=1, axis1=-1, axis2=-2)  # jpatch: dim1 / dim2
        prev_token_scores[layer] = einops.reduce(diagonal, "batch head_index diagonal -> head_index", "mean")

    duplicate_token_scores = np.zeros((model.cfg.n_layers, model.cfg.n_heads), np.float32)  # jpatch: torch.zeros

    def duplicate_token_hook(pattern, hook):
        layer = hook.layer()
        diagonal = pattern.diagonal(offset=seq_len, axis1=-1, axis2=-2)  # jpatch: dim1 / dim2
        duplicate_token_scores[layer] = einops.reduce(diagonal, "batch head_index diagonal -> head_index", "mean")

    induction_scores = np.zeros((model.cfg.n_layers, model.cfg.n_heads), np.float32)  # jpatch: torch.zeros

    def induction_hook(pattern, hook):
        layer = hook.layer()
        diagonal = pattern.diagonal(offset=seq_len - 1, axis1=-1, axis2=-2)  # jpatch: dim1 / dim2
        induction_scores[layer] = einops.reduce(diagonal, "batch head_index diagonal -> head_index", "mean")

    # jpatch: torch.manual_seed(0); torch.randint(100, 20000, size=(batch_size, seq_len))
    original_tokens = np.random.default_rng(0).integers(100, 20000, size=(batch_size, seq_len))
    repeated_tokens = einops.repeat(original_tokens, "batch seq_len -> batch (2 seq_len)")
    pattern_filter = lambda act_name: act_name.endswith("hook_pattern")  # noqa: E731
    loss = model.run_with_hooks(
        repeated_tokens,
        return_type="loss",
        fwd_hooks=[(pattern_filter, prev_token_hook), (pattern_filter, duplicate_token_hook),
                   (pattern_filter, induction_hook)],
    )
    print(jnp.round(utils.get_corner(prev_token_scores), 3))  # jpatch: torch.round(... .detach().cpu(), decimals=3)
    out["40 scores"] = [loss, prev_token_scores, duplicate_token_scores, induction_scores]

    # cell 42
    top_name_mover = per_head_logit_diffs.flatten().argmax().item()
    top_name_mover_layer = top_name_mover // model.cfg.n_heads
    top_name_mover_head = top_name_mover % model.cfg.n_heads

    def ablate_top_head_hook(z: Float[jax.Array, "batch pos head_index d_head"], hook):
        return z.at[:, -1, top_name_mover_head, :].set(0)  # jpatch: z = z.clone(); z[...] = 0; return z

    model.blocks[top_name_mover_layer].attn.hook_z.add_hook(ablate_top_head_hook)
    ablated_logits, ablated_cache = model.run_with_cache(tokens)
    print(f"Original logit diff: {original_average_logit_diff:.2f}")
    print(f"Post ablation logit diff: {logits_to_ave_logit_diff(ablated_logits, answer_tokens).item():.2f}")
    out["42 ablation"] = [top_name_mover, logits_to_ave_logit_diff(ablated_logits, answer_tokens),
                          original_average_logit_diff - per_head_logit_diffs.flatten()[top_name_mover].item()]

    # cell 43
    per_head_ablated_residual, labels = ablated_cache.stack_head_results(layer=-1, pos_slice=-1, return_labels=True)
    per_head_ablated_logit_diffs = residual_stack_to_logit_diff(per_head_ablated_residual, ablated_cache)
    per_head_ablated_logit_diffs = per_head_ablated_logit_diffs.reshape(model.cfg.n_layers, model.cfg.n_heads)
    out["43 ablated per head"] = per_head_ablated_logit_diffs

    # cell 44
    out["44 ln scale ratio"] = [
        round((cache["ln_final.hook_scale"][:, -1] / ablated_cache["ln_final.hook_scale"][:, -1]).mean().item(), 3),
        jnp.round(ablated_cache["ln_final.hook_scale"][:, -1], 2),  # jpatch: .detach().cpu().round(decimals=2)
        jnp.round(cache["ln_final.hook_scale"][:, -1], 2),
    ]
    model.reset_hooks()
    return out


def transformer_lens_cells(model):
    """The same cells as the notebook writes them, on TransformerLens's HookedTransformer (loaded with
    the notebook's processing, refactor_factored_attn_matrices included). Random tokens as `cells`."""
    import torch
    from fancy_einsum import einsum

    from transformer_lens import utilities as utils

    torch.set_grad_enabled(False)
    out = {}
    model.set_use_attn_result(True)
    device = utils.get_device()
    prompt_format = [
        "When John and Mary went to the shops,{} gave the bag to",
        "When Tom and James went to the park,{} gave the ball to",
        "When Dan and Sid went to the shops,{} gave an apple to",
        "After Martin and Amy went to the park,{} gave a drink to",
    ]
    names = [(" Mary", " John"), (" Tom", " James"), (" Dan", " Sid"), (" Martin", " Amy")]
    prompts, answers, answer_tokens = [], [], []
    for i in range(len(prompt_format)):
        for j in range(2):
            answers.append((names[i][j], names[i][1 - j]))
            answer_tokens.append((model.to_single_token(answers[-1][0]), model.to_single_token(answers[-1][1])))
            prompts.append(prompt_format[i].format(answers[-1][1]))
    answer_tokens = torch.tensor(answer_tokens).to(device)
    out["6 answer_tokens"] = answer_tokens
    tokens = model.to_tokens(prompts, prepend_bos=True)
    original_logits, cache = model.run_with_cache(tokens)

    def logits_to_ave_logit_diff(logits, answer_tokens, per_prompt=False):
        final_logits = logits[:, -1, :]
        answer_logits = final_logits.gather(dim=-1, index=answer_tokens)
        answer_logit_diff = answer_logits[:, 0] - answer_logits[:, 1]
        return answer_logit_diff if per_prompt else answer_logit_diff.mean()

    original_average_logit_diff = logits_to_ave_logit_diff(original_logits, answer_tokens)
    out["9 logit diffs"] = [logits_to_ave_logit_diff(original_logits, answer_tokens, per_prompt=True),
                            original_average_logit_diff]
    W_U = model.unembed.W_U
    answer_residual_directions = einops.rearrange(
        W_U[:, answer_tokens], "d_model batch correct_incorrect -> batch correct_incorrect d_model")
    logit_diff_directions = answer_residual_directions[:, 0] - answer_residual_directions[:, 1]
    final_token_residual_stream = cache["resid_post", -1][:, -1, :]
    scaled = cache.apply_ln_to_stack(final_token_residual_stream, layer=-1, pos_slice=-1)
    out["11 calculated logit diff"] = einsum("batch d_model, batch d_model -> ", scaled, logit_diff_directions) / len(
        prompts)

    def residual_stack_to_logit_diff(residual_stack, cache):
        scaled_residual_stack = cache.apply_ln_to_stack(residual_stack, layer=-1, pos_slice=-1)
        return einsum("... batch d_model, batch d_model -> ...", scaled_residual_stack, logit_diff_directions) / len(
            prompts)

    accumulated_residual, labels = cache.accumulated_resid(layer=-1, incl_mid=True, pos_slice=-1, return_labels=True)
    out["13 logit lens"] = [residual_stack_to_logit_diff(accumulated_residual, cache), labels]
    per_layer_residual, labels = cache.decompose_resid(layer=-1, pos_slice=-1, return_labels=True)
    out["14 per layer"] = [residual_stack_to_logit_diff(per_layer_residual, cache), labels]
    per_head_residual, labels = cache.stack_head_results(layer=-1, pos_slice=-1, return_labels=True)
    per_head_logit_diffs = einops.rearrange(residual_stack_to_logit_diff(per_head_residual, cache),
                                            "(layer head_index) -> layer head_index", layer=model.cfg.n_layers,
                                            head_index=model.cfg.n_heads)
    out["15 per head"] = [per_head_logit_diffs, labels]
    out["17 top heads"] = [torch.topk(per_head_logit_diffs.flatten(), k=3).indices,
                           torch.topk(-per_head_logit_diffs.flatten(), k=3).indices]

    corrupted_prompts = []
    for i in range(0, len(prompts), 2):
        corrupted_prompts += [prompts[i + 1], prompts[i]]
    corrupted_tokens = model.to_tokens(corrupted_prompts, prepend_bos=True)
    corrupted_logits, corrupted_cache = model.run_with_cache(corrupted_tokens, return_type="logits")
    corrupted_average_logit_diff = logits_to_ave_logit_diff(corrupted_logits, answer_tokens)
    out["18 corrupted"] = corrupted_average_logit_diff
    out["19 strings"] = model.to_string(corrupted_tokens)

    def patch_residual_component(corrupted_residual_component, hook, pos, clean_cache):
        clean_value = clean_cache[hook.name][:, pos, :].clone()
        corrupted_residual_component = corrupted_residual_component.clone()
        corrupted_residual_component[:, pos: pos + 1, :] = clean_value.unsqueeze(1)
        return corrupted_residual_component

    def normalize_patched_logit_diff(patched_logit_diff):
        return (patched_logit_diff - corrupted_average_logit_diff) / (
            original_average_logit_diff - corrupted_average_logit_diff)

    def sweep(act_name, hook, axis_size, **fixed):
        """The notebook's loops (cells 20, 22, 25, 27, 30): one hooked run per layer x position or head."""
        result = torch.zeros(model.cfg.n_layers, axis_size, device=device, dtype=torch.float32)
        for layer in range(model.cfg.n_layers):
            for index in range(axis_size):
                key = "pos" if hook is patch_residual_component else "head_index"
                hook_fn = partial(hook, **{key: index}, clean_cache=cache)
                name = utils.get_act_name(act_name, layer) if key == "pos" else utils.get_act_name(act_name, layer,
                                                                                                    "attn")
                patched_logits = model.run_with_hooks(corrupted_tokens, fwd_hooks=[(name, hook_fn)],
                                                      return_type="logits")
                result[layer, index] = normalize_patched_logit_diff(
                    logits_to_ave_logit_diff(patched_logits, answer_tokens))
        return result

    def patch_head_vector(corrupted_head_vector, hook, head_index, clean_cache):
        clean_value = clean_cache[hook.name][:, :, head_index, :].clone()
        corrupted_head_vector = corrupted_head_vector.clone()
        corrupted_head_vector[:, :, head_index: head_index + 1, :] = clean_value.unsqueeze(2)
        return corrupted_head_vector

    def patch_head_pattern(corrupted_head_pattern, hook, head_index, clean_cache):
        clean_value = clean_cache[hook.name][:, head_index, :, :].clone()
        corrupted_head_pattern = corrupted_head_pattern.clone()
        corrupted_head_pattern[:, head_index: head_index + 1, :, :] = clean_value.unsqueeze(1)
        return corrupted_head_pattern

    T, H = tokens.shape[1], model.cfg.n_heads
    out["20 resid_pre"] = sweep("resid_pre", patch_residual_component, T)
    out["21 labels"] = [f"{tok}_{i}" for i, tok in enumerate(model.to_str_tokens(tokens[0]))]
    out["22 attn_out, mlp_out"] = [sweep("attn_out", patch_residual_component, T),
                                   sweep("mlp_out", patch_residual_component, T)]
    out["25 z"] = sweep("z", patch_head_vector, H)
    out["27 v"] = sweep("v", patch_head_vector, H)
    out["29 head labels"] = [f"L{l}H{h}" for l in range(model.cfg.n_layers) for h in range(model.cfg.n_heads)]
    out["30 pattern"] = sweep("attn", patch_head_pattern, H)

    def patch_direct_path_A_output_to_B_attn_act(corrupted_attn_act, hook, attn_act_type, A_layer, A_head_index,
                                                 B_layer, B_head_index, clean_cache, corrupted_cache):
        A_output_act_name = utils.get_act_name("result", A_layer, "attn")
        clean_A_output = clean_cache[A_output_act_name][:, :, A_head_index, :]
        corrupted_A_output = corrupted_cache[A_output_act_name][:, :, A_head_index, :]
        corrupted_B_act = corrupted_attn_act[:, :, B_head_index, :]
        W_B = {"q": "W_Q", "k": "W_K", "v": "W_V"}[attn_act_type]
        W_B = getattr(model.blocks[B_layer].attn, W_B)[B_head_index]
        corrupted_ln1_scale = corrupted_cache[utils.get_act_name("scale", B_layer, "ln1")]
        patched_B_act = corrupted_B_act + (clean_A_output - corrupted_A_output) @ W_B / corrupted_ln1_scale
        patched_attn_act = corrupted_attn_act.clone()
        patched_attn_act[:, :, B_head_index, :] = patched_B_act
        return patched_attn_act

    def direct_path_output_to_attn_act_diffs(output_layer, attn_act_layer, attn_act_type):
        A_to_B_diffs = torch.zeros(model.cfg.n_heads, model.cfg.n_heads, device=device, dtype=torch.float32)
        for A in range(model.cfg.n_heads):
            for B in range(model.cfg.n_heads):
                patch_hook = (utils.get_act_name(attn_act_type, attn_act_layer, "attn"),
                              partial(patch_direct_path_A_output_to_B_attn_act, attn_act_type=attn_act_type,
                                      A_layer=output_layer, A_head_index=A, B_layer=attn_act_layer, B_head_index=B,
                                      clean_cache=cache, corrupted_cache=corrupted_cache))
                patched_logits = model.run_with_hooks(corrupted_tokens, fwd_hooks=[patch_hook], return_type="logits")
                A_to_B_diffs[A, B] = normalize_patched_logit_diff(logits_to_ave_logit_diff(patched_logits,
                                                                                           answer_tokens))
        return A_to_B_diffs

    out["34 direct path"] = direct_path_output_to_attn_act_diffs(0, 1, "v")

    example_text = "Research in mechanistic interpretability seeks to explain behaviors of machine learning models in terms of their internal components."  # noqa: E501
    example_repeated_tokens = model.to_tokens(example_text + example_text, prepend_bos=True)
    out["38 logits"] = model.run_with_cache(example_repeated_tokens)[0][:, -1]

    seq_len, batch_size = 100, 2
    scores = {name: torch.zeros((model.cfg.n_layers, model.cfg.n_heads), device=device)
              for name in ("prev", "duplicate", "induction")}

    def score_hook(name, offset):
        def hook_fn(pattern, hook):
            diagonal = pattern.diagonal(offset=offset, dim1=-1, dim2=-2)
            scores[name][hook.layer()] = einops.reduce(diagonal, "batch head_index diagonal -> head_index", "mean")
        return hook_fn

    repeated_tokens = einops.repeat(
        torch.tensor(np.random.default_rng(0).integers(100, 20000, size=(batch_size, seq_len))),
        "batch seq_len -> batch (2 seq_len)")
    pattern_filter = lambda act_name: act_name.endswith("hook_pattern")  # noqa: E731
    loss = model.run_with_hooks(repeated_tokens, return_type="loss",
                                fwd_hooks=[(pattern_filter, score_hook("prev", 1)),
                                           (pattern_filter, score_hook("duplicate", seq_len)),
                                           (pattern_filter, score_hook("induction", seq_len - 1))])
    out["40 scores"] = [loss, scores["prev"], scores["duplicate"], scores["induction"]]

    top_name_mover = per_head_logit_diffs.flatten().argmax().item()
    top_name_mover_layer = top_name_mover // model.cfg.n_heads
    top_name_mover_head = top_name_mover % model.cfg.n_heads

    def ablate_top_head_hook(z, hook):
        z = z.clone()
        z[:, -1, top_name_mover_head, :] = 0
        return z

    model.blocks[top_name_mover_layer].attn.hook_z.add_hook(ablate_top_head_hook)
    ablated_logits, ablated_cache = model.run_with_cache(tokens)
    out["42 ablation"] = [top_name_mover, logits_to_ave_logit_diff(ablated_logits, answer_tokens),
                          original_average_logit_diff - per_head_logit_diffs.flatten()[top_name_mover].item()]
    per_head_ablated_residual, labels = ablated_cache.stack_head_results(layer=-1, pos_slice=-1, return_labels=True)
    out["43 ablated per head"] = residual_stack_to_logit_diff(per_head_ablated_residual, ablated_cache).reshape(
        model.cfg.n_layers, model.cfg.n_heads)
    out["44 ln scale ratio"] = [
        round((cache["ln_final.hook_scale"][:, -1] / ablated_cache["ln_final.hook_scale"][:, -1]).mean().item(), 3),
        ablated_cache["ln_final.hook_scale"][:, -1].detach().cpu().round(decimals=2),
        cache["ln_final.hook_scale"][:, -1].detach().cpu().round(decimals=2),
    ]
    model.reset_hooks()
    return out


def run(model, tl_model=None):
    """{cell: numbers} of the ported cells on the jpatch `model`; with `tl_model` (TransformerLens,
    the same weights), (jpatch's, TransformerLens's)."""
    ours = cells(model)
    return ours if tl_model is None else (ours, transformer_lens_cells(tl_model))


if __name__ == "__main__":
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from test_tl_notebooks import build_models  # a small random GPT-2 with GPT-2's vocabulary

    for cell, numbers in run(build_models()[0]).items():
        print(cell, str(numbers)[:200])
