"""TransformerLens's Attribution_Patching_Demo.ipynb (demos/, TransformerLens main at 4cd36aa), ported
cell by cell: the notebook's own recipe (a forward and backward per prompt set with backward
hooks, then attribution = corrupted gradient x (clean - corrupted) read off three caches) and its
comparison with activation patching (`patching.get_act_patch_*_every`).

`run(model)` runs every cell that ports on a jpatch model and returns {cell: the numbers it
produces}; `run(model, tl_model)` also runs the notebook's own code on TransformerLens (a
HookedTransformer with the same weights, processed as the notebook loads GPT-2) and returns
(jpatch's, TransformerLens's). tests/test_tl_notebooks.py checks that they agree.

The notebook's code is kept, except (each marked `# jpatch:`): imports and model loading; torch
calls made jnp (torch.stack, torch.where, .gather, sorting; a Python list as an index becomes an
array); `value.backward()`, which JAX does not have: the backward hooks run in
`model.run_with_hooks(tokens, bwd_hooks=..., backward_of=metric)` (see FAST API below for the
one-program version); TransformerBridge's workarounds (`_fix_cache_device_and_pos_embed`,
`_fix_head_result_cache`: no-ops on HookedTransformer and on jpatch) dropped. Left out: Colab /
plotting / widget cells (the computation behind a plot is kept; the plots are the notebook's own
no-op stubs), GPT-2-small-specific head numbers (cells 24, 33) and the GPT-2 XL cells (37-42,
a download). Cell numbers count code cells from 0.
"""

from typing import Any, Callable, Literal

import einops
import jax.numpy as jnp
import numpy as np

import jpatch
from jpatch import patching, utils  # noqa: F401  (cells 3, 5)
from jpatch.utils import einsum  # jpatch: fancy_einsum's einsum refuses JAX arrays

ActivationCache = jpatch.ActivationCache


class TT:  # torchtyping stub (cell 2)
    def __class_getitem__(cls, _):
        return Any


def line(*args, **kwargs):  # cell 4: the notebook's own stubs when neel_plotly is missing
    pass


def imshow(*args, **kwargs):
    pass


def scatter(*args, **kwargs):
    pass


# FAST API: set to True to take each run's activations and gradients from one compiled forward and
# backward (`run_with_cache(..., incl_bwd=True, metric=...)`) instead of the notebook's hooks.
FAST_API = False


def cells(model, act_patching=True):
    """The notebook's cells on a jpatch `model` (GPT-2's vocabulary, loaded as the notebook loads GPT-2:
    `jpatch.load(..., fold_ln=True, center_writing_weights=True, center_unembed=True, fold_value_biases=True)`).
    act_patching=False leaves out the `patching.get_act_patch_*_every` sweeps of cells 27, 30 and 34 (the
    notebook's NBVAL_SKIP: thousands of forwards in TransformerLens)."""
    out = {}
    model.set_use_attn_result(True)  # cell 6 (the rest of it loads the model)

    # cell 7
    prompts = [
        "When John and Mary went to the shops, John gave the bag to",
        "When John and Mary went to the shops, Mary gave the bag to",
        "When Tom and James went to the park, James gave the ball to",
        "When Tom and James went to the park, Tom gave the ball to",
        "When Dan and Sid went to the shops, Sid gave an apple to",
        "When Dan and Sid went to the shops, Dan gave an apple to",
        "After Martin and Amy went to the park, Amy gave a drink to",
        "After Martin and Amy went to the park, Martin gave a drink to",
    ]
    answers = [(" Mary", " John"), (" John", " Mary"), (" Tom", " James"), (" James", " Tom"), (" Dan", " Sid"),
               (" Sid", " Dan"), (" Martin", " Amy"), (" Amy", " Martin")]
    clean_tokens = model.to_tokens(prompts)
    # jpatch: a Python list as an index is an array
    corrupted_tokens = clean_tokens[jnp.array([(i + 1 if i % 2 == 0 else i - 1) for i in range(len(clean_tokens))])]
    print("Clean string 0", model.to_string(clean_tokens[0]))
    print("Corrupted string 0", model.to_string(corrupted_tokens[0]))
    answer_token_indices = jnp.array(  # jpatch: torch.tensor(..., device=model.cfg.device)
        [[model.to_single_token(answers[i][j]) for j in range(2)] for i in range(len(answers))]
    )
    out["7 answer_token_indices"] = answer_token_indices

    # cell 8
    def get_logit_diff(logits, answer_token_indices=answer_token_indices):
        if len(logits.shape) == 3:
            logits = logits[:, -1, :]
        # jpatch: logits.gather(1, answer_token_indices[:, 0].unsqueeze(1))
        correct_logits = jnp.take_along_axis(logits, answer_token_indices[:, 0, None], axis=1)
        incorrect_logits = jnp.take_along_axis(logits, answer_token_indices[:, 1, None], axis=1)
        return (correct_logits - incorrect_logits).mean()

    clean_logits, clean_cache = model.run_with_cache(clean_tokens)
    corrupted_logits, corrupted_cache = model.run_with_cache(corrupted_tokens)
    clean_logit_diff = get_logit_diff(clean_logits, answer_token_indices).item()
    corrupted_logit_diff = get_logit_diff(corrupted_logits, answer_token_indices).item()
    out["8 logit diffs"] = [clean_logit_diff, corrupted_logit_diff]

    # cell 9
    CLEAN_BASELINE = clean_logit_diff
    CORRUPTED_BASELINE = corrupted_logit_diff

    def ioi_metric(logits, answer_token_indices=answer_token_indices):
        return (get_logit_diff(logits, answer_token_indices) - CORRUPTED_BASELINE) / (
            CLEAN_BASELINE - CORRUPTED_BASELINE
        )

    out["9 baselines"] = [ioi_metric(clean_logits), ioi_metric(corrupted_logits)]

    # cell 10
    Metric = Callable[[TT["batch_and_pos_dims", "d_model"]], float]  # noqa: F841

    # cell 11
    filter_not_qkv_input = lambda name: "_input" not in name  # noqa: E731

    def get_cache_fwd_and_bwd(model, tokens, metric):
        if FAST_API:  # one compiled forward and backward: activations and gradients at every cached hook point
            value, cache = model.run_with_cache(tokens, names_filter=filter_not_qkv_input, incl_bwd=True, metric=metric)
            return value.item(), cache, ActivationCache(cache.grad_cache().cache_dict, model)
        model.reset_hooks()
        grad_cache = {}

        def backward_cache_hook(act, hook):
            grad_cache[hook.name] = act  # jpatch: act.detach()

        output, fwd_cache = model.run_with_cache(tokens, names_filter=filter_not_qkv_input)
        value = metric(output)
        # jpatch: model.add_hook(filter_not_qkv_input, backward_cache_hook, "bwd") ... value.backward(): JAX has no
        # .backward(), so the backward hooks receive the gradient of backward_of(logits) in one more run
        model.run_with_hooks(tokens, bwd_hooks=[(filter_not_qkv_input, backward_cache_hook)], backward_of=metric,
                             return_type=None)
        model.reset_hooks()
        for key, hp in model.hook_dict.items():
            if hp.name != key and filter_not_qkv_input(key):
                if hp.name in grad_cache and key not in grad_cache:
                    grad_cache[key] = grad_cache[hp.name]
        grad_act_cache = ActivationCache(grad_cache, model)
        return value.item(), fwd_cache, grad_act_cache

    clean_value, clean_cache, clean_grad_cache = get_cache_fwd_and_bwd(model, clean_tokens, ioi_metric)
    print("Clean Activations Cached:", len(clean_cache))
    print("Clean Gradients Cached:", len(clean_grad_cache))
    assert abs(clean_value - 1.0) < 1e-5, f"Expected 1.0, got {clean_value}"
    corrupted_value, corrupted_cache, corrupted_grad_cache = get_cache_fwd_and_bwd(model, corrupted_tokens, ioi_metric)
    assert abs(corrupted_value) < 1e-5, f"Expected 0.0, got {corrupted_value}"
    out["11 values"] = [clean_value, corrupted_value, len(clean_cache), len(clean_grad_cache)]

    # cell 12
    def create_attention_attr(clean_cache, clean_grad_cache) -> TT["batch", "layer", "head_index", "dest", "src"]:
        attention_stack = jnp.stack(  # jpatch: torch.stack(..., dim=0)
            [clean_cache["pattern", l] for l in range(model.cfg.n_layers)], axis=0)
        attention_grad_stack = jnp.stack([clean_grad_cache["pattern", l] for l in range(model.cfg.n_layers)], axis=0)
        attention_attr = attention_grad_stack * attention_stack
        attention_attr = einops.rearrange(
            attention_attr, "layer batch head_index dest src -> batch layer head_index dest src"
        )
        return attention_attr

    out["12 attention_attr"] = create_attention_attr(clean_cache, clean_grad_cache)

    # cell 13
    HEAD_NAMES = [f"L{l}H{h}" for l in range(model.cfg.n_layers) for h in range(model.cfg.n_heads)]
    HEAD_NAMES_SIGNED = [f"{name}{sign}" for name in HEAD_NAMES for sign in ["+", "-"]]  # noqa: F841
    HEAD_NAMES_QKV = [f"{name}{act_name}" for name in HEAD_NAMES for act_name in ["Q", "K", "V"]]

    # cell 15
    def attr_patch_residual(clean_cache, corrupted_cache, corrupted_grad_cache) -> TT["component", "pos"]:
        clean_residual, residual_labels = clean_cache.accumulated_resid(-1, incl_mid=True, return_labels=True)
        corrupted_residual = corrupted_cache.accumulated_resid(-1, incl_mid=True, return_labels=False)
        corrupted_grad_residual = corrupted_grad_cache.accumulated_resid(-1, incl_mid=True, return_labels=False)
        residual_attr = einops.reduce(
            corrupted_grad_residual * (clean_residual - corrupted_residual),
            "component batch pos d_model -> component pos",
            "sum",
        )
        return residual_attr, residual_labels

    out["15 residual"] = attr_patch_residual(clean_cache, corrupted_cache, corrupted_grad_cache)

    # cell 16
    def attr_patch_layer_out(clean_cache, corrupted_cache, corrupted_grad_cache) -> TT["component", "pos"]:
        clean_layer_out, labels = clean_cache.decompose_resid(-1, return_labels=True)
        corrupted_layer_out = corrupted_cache.decompose_resid(-1, return_labels=False)
        corrupted_grad_layer_out = corrupted_grad_cache.decompose_resid(-1, return_labels=False)
        layer_out_attr = einops.reduce(
            corrupted_grad_layer_out * (clean_layer_out - corrupted_layer_out),
            "component batch pos d_model -> component pos",
            "sum",
        )
        return layer_out_attr, labels

    out["16 layer out"] = attr_patch_layer_out(clean_cache, corrupted_cache, corrupted_grad_cache)

    # cell 17
    def attr_patch_head_out(clean_cache, corrupted_cache, corrupted_grad_cache) -> TT["component", "pos"]:
        labels = HEAD_NAMES
        clean_head_out = clean_cache.stack_head_results(-1, return_labels=False)
        corrupted_head_out = corrupted_cache.stack_head_results(-1, return_labels=False)
        corrupted_grad_head_out = corrupted_grad_cache.stack_head_results(-1, return_labels=False)
        head_out_attr = einops.reduce(
            corrupted_grad_head_out * (clean_head_out - corrupted_head_out),
            "component batch pos d_model -> component pos",
            "sum",
        )
        return head_out_attr, labels

    head_out_attr, head_out_labels = attr_patch_head_out(clean_cache, corrupted_cache, corrupted_grad_cache)
    sum_head_out_attr = einops.reduce(head_out_attr, "(layer head) pos -> layer head", "sum",
                                      layer=model.cfg.n_layers, head=model.cfg.n_heads)
    out["17 head out"] = [head_out_attr, head_out_labels, sum_head_out_attr]

    # cell 18
    def stack_head_vector_from_cache(cache, activation_name: Literal["q", "k", "v", "z"]
                                     ) -> TT["layer_and_head_index", "batch", "pos", "d_head"]:
        stacked_head_vectors = jnp.stack(  # jpatch: torch.stack(..., dim=0)
            [cache[activation_name, l] for l in range(model.cfg.n_layers)], axis=0)
        stacked_head_vectors = einops.rearrange(
            stacked_head_vectors, "layer batch pos head_index d_head -> (layer head_index) batch pos d_head"
        )
        return stacked_head_vectors

    def attr_patch_head_vector(clean_cache, corrupted_cache, corrupted_grad_cache,
                               activation_name: Literal["q", "k", "v", "z"]) -> TT["component", "pos"]:
        labels = HEAD_NAMES
        clean_head_vector = stack_head_vector_from_cache(clean_cache, activation_name)
        corrupted_head_vector = stack_head_vector_from_cache(corrupted_cache, activation_name)
        corrupted_grad_head_vector = stack_head_vector_from_cache(corrupted_grad_cache, activation_name)
        head_vector_attr = einops.reduce(
            corrupted_grad_head_vector * (clean_head_vector - corrupted_head_vector),
            "component batch pos d_head -> component pos",
            "sum",
        )
        return head_vector_attr, labels

    head_vector_attr_dict = {}
    for activation_name, activation_name_full in [("k", "Key"), ("q", "Query"), ("v", "Value"), ("z", "Mixed Value")]:
        head_vector_attr_dict[activation_name], head_vector_labels = attr_patch_head_vector(
            clean_cache, corrupted_cache, corrupted_grad_cache, activation_name
        )
    out["18 head vectors"] = head_vector_attr_dict

    # cell 19
    def stack_head_pattern_from_cache(cache) -> TT["layer_and_head_index", "batch", "dest_pos", "src_pos"]:
        stacked_head_pattern = jnp.stack(  # jpatch: torch.stack(..., dim=0)
            [cache["pattern", l] for l in range(model.cfg.n_layers)], axis=0)
        stacked_head_pattern = einops.rearrange(
            stacked_head_pattern,
            "layer batch head_index dest_pos src_pos -> (layer head_index) batch dest_pos src_pos",
        )
        return stacked_head_pattern

    def attr_patch_head_pattern(clean_cache, corrupted_cache, corrupted_grad_cache
                                ) -> TT["component", "dest_pos", "src_pos"]:
        labels = HEAD_NAMES
        clean_head_pattern = stack_head_pattern_from_cache(clean_cache)
        corrupted_head_pattern = stack_head_pattern_from_cache(corrupted_cache)
        corrupted_grad_head_pattern = stack_head_pattern_from_cache(corrupted_grad_cache)
        head_pattern_attr = einops.reduce(
            corrupted_grad_head_pattern * (clean_head_pattern - corrupted_head_pattern),
            "component batch dest_pos src_pos -> component dest_pos src_pos",
            "sum",
        )
        return head_pattern_attr, labels

    out["19 head pattern"] = attr_patch_head_pattern(clean_cache, corrupted_cache, corrupted_grad_cache)[0]

    # cell 20
    def get_head_vector_grad_input_from_grad_cache(grad_cache, activation_name: Literal["q", "k", "v"], layer: int
                                                   ) -> TT["batch", "pos", "head_index", "d_model"]:
        vector_grad = grad_cache[activation_name, layer]
        ln_scales = grad_cache["scale", layer, "ln1"]
        attn_layer_object = model.blocks[layer].attn
        if activation_name == "q":
            W = attn_layer_object.W_Q
        elif activation_name == "k":
            W = attn_layer_object.W_K
        elif activation_name == "v":
            W = attn_layer_object.W_V
        else:
            raise ValueError("Invalid activation name")
        return einsum(
            "batch pos head_index d_head, batch pos, head_index d_model d_head -> batch pos head_index d_model",
            vector_grad,
            ln_scales.squeeze(-1),
            W,
        )

    def get_stacked_head_vector_grad_input(grad_cache, activation_name: Literal["q", "k", "v"]
                                           ) -> TT["layer", "batch", "pos", "head_index", "d_model"]:
        return jnp.stack(  # jpatch: torch.stack(..., dim=0)
            [get_head_vector_grad_input_from_grad_cache(grad_cache, activation_name, l)
             for l in range(model.cfg.n_layers)], axis=0)

    def get_full_vector_grad_input(grad_cache) -> TT["qkv", "layer", "batch", "pos", "head_index", "d_model"]:
        return jnp.stack(  # jpatch: torch.stack(..., dim=0)
            [get_stacked_head_vector_grad_input(grad_cache, activation_name) for activation_name in ["q", "k", "v"]],
            axis=0)

    def attr_patch_head_path(clean_cache, corrupted_cache, corrupted_grad_cache
                             ) -> TT["qkv", "dest_component", "src_component", "pos"]:
        start_labels = HEAD_NAMES
        end_labels = HEAD_NAMES_QKV
        full_vector_grad_input = get_full_vector_grad_input(corrupted_grad_cache)
        clean_head_result_stack = clean_cache.stack_head_results(-1)
        corrupted_head_result_stack = corrupted_cache.stack_head_results(-1)
        diff_head_result = einops.rearrange(
            clean_head_result_stack - corrupted_head_result_stack,
            "(layer head_index) batch pos d_model -> layer batch pos head_index d_model",
            layer=model.cfg.n_layers,
            head_index=model.cfg.n_heads,
        )
        path_attr = einsum(
            "qkv layer_end batch pos head_end d_model, layer_start batch pos head_start d_model -> qkv layer_end head_end layer_start head_start pos",  # noqa: E501
            full_vector_grad_input,
            diff_head_result,
        )
        correct_layer_order_mask = (  # jpatch: torch.arange, .to(device)
            jnp.arange(model.cfg.n_layers)[None, :, None, None, None, None]
            > jnp.arange(model.cfg.n_layers)[None, None, None, :, None, None]
        )
        zero = jnp.zeros(1)  # jpatch: torch.zeros(1, device=...)
        path_attr = jnp.where(correct_layer_order_mask, path_attr, zero)  # jpatch: torch.where
        path_attr = einops.rearrange(
            path_attr,
            "qkv layer_end head_end layer_start head_start pos -> (layer_end head_end qkv) (layer_start head_start) pos",
        )
        return path_attr, end_labels, start_labels

    head_path_attr, end_labels, start_labels = attr_patch_head_path(clean_cache, corrupted_cache, corrupted_grad_cache)
    out["20 head path"] = [head_path_attr, end_labels, start_labels]

    # cell 21
    # jpatch: head_out_values, head_out_indices = head_out_attr.sum(-1).abs().sort(descending=True)
    head_out_indices = jnp.argsort(-jnp.abs(head_out_attr.sum(-1)))
    head_out_values = jnp.abs(head_out_attr.sum(-1))[head_out_indices]
    line(head_out_values)
    top_head_indices = jnp.sort(head_out_indices[:22])  # jpatch: .sort().values
    top_end_indices = []
    top_end_labels = []
    top_start_indices = []
    top_start_labels = []
    for i in top_head_indices:
        i = i.item()
        top_start_indices.append(i)
        top_start_labels.append(start_labels[i])
        for j in range(3):
            top_end_indices.append(3 * i + j)
            top_end_labels.append(end_labels[3 * i + j])
    # jpatch: Python lists as indices are arrays
    top_end_indices, top_start_indices = jnp.array(top_end_indices), jnp.array(top_start_indices)
    out["21 top heads"] = [head_out_values, top_head_indices, top_end_labels,
                           head_path_attr[top_end_indices, :][:, top_start_indices].sum(-1)]

    # cells 22-23
    out["22 per composition"] = [head_path_attr[top_end_indices, :][:, top_start_indices][j::3].sum(-1)
                                 for j in range(3)]
    out["23 top head path"] = einops.rearrange(
        head_path_attr[top_end_indices, :][:, top_start_indices].sum(-1),
        "(head_end qkv) head_start -> qkv head_end head_start",
        qkv=3,
    )

    # cell 25
    attribution_cache_dict = {}
    shared_keys = (
        set(corrupted_grad_cache.cache_dict.keys())
        & set(clean_cache.cache_dict.keys())
        & set(corrupted_cache.cache_dict.keys())
    )
    for key in shared_keys:
        attribution_cache_dict[key] = corrupted_grad_cache.cache_dict[key] * (
            clean_cache.cache_dict[key] - corrupted_cache.cache_dict[key]
        )
    attr_cache = ActivationCache(attribution_cache_dict, model)

    # cell 26
    str_tokens = model.to_str_tokens(clean_tokens[0])
    out["26 context_length"] = len(str_tokens)

    # cells 27-28
    every_block_act_patch_result = (patching.get_act_patch_block_every(model, corrupted_tokens, clean_cache, ioi_metric)
                                    if act_patching else None)

    def get_attr_patch_block_every(attr_cache):
        resid_pre_attr = einops.reduce(attr_cache.stack_activation("resid_pre"),
                                       "layer batch pos d_model -> layer pos", "sum")
        attn_out_attr = einops.reduce(attr_cache.stack_activation("attn_out"),
                                      "layer batch pos d_model -> layer pos", "sum")
        mlp_out_attr = einops.reduce(attr_cache.stack_activation("mlp_out"),
                                     "layer batch pos d_model -> layer pos", "sum")
        return jnp.stack([resid_pre_attr, attn_out_attr, mlp_out_attr], axis=0)  # jpatch: torch.stack(dim=0)

    out["27-28 block every"] = [every_block_act_patch_result, get_attr_patch_block_every(attr_cache)]

    # cells 30-31
    every_head_all_pos_act_patch_result = patching.get_act_patch_attn_head_all_pos_every(
        model, corrupted_tokens, clean_cache, ioi_metric
    ) if act_patching else None

    def get_attr_patch_attn_head_all_pos_every(attr_cache):
        reduce = lambda name, pattern: einops.reduce(attr_cache.stack_activation(name), pattern, "sum")  # noqa: E731
        head_out_all_pos_attr = reduce("z", "layer batch pos head_index d_head -> layer head_index")
        head_q_all_pos_attr = reduce("q", "layer batch pos head_index d_head -> layer head_index")
        head_k_all_pos_attr = reduce("k", "layer batch pos head_index d_head -> layer head_index")
        head_v_all_pos_attr = reduce("v", "layer batch pos head_index d_head -> layer head_index")
        head_pattern_all_pos_attr = reduce("pattern", "layer batch head_index dest_pos src_pos -> layer head_index")
        return jnp.stack([head_out_all_pos_attr, head_q_all_pos_attr, head_k_all_pos_attr,  # jpatch: torch.stack
                          head_v_all_pos_attr, head_pattern_all_pos_attr])

    out["30-31 head all pos every"] = [every_head_all_pos_act_patch_result,
                                       get_attr_patch_attn_head_all_pos_every(attr_cache)]

    # cells 34-35
    if act_patching:
        every_head_by_pos_act_patch_result = patching.get_act_patch_attn_head_by_pos_every(
            model, corrupted_tokens, clean_cache, ioi_metric
        )
        every_head_by_pos_act_patch_result = einops.rearrange(
            every_head_by_pos_act_patch_result, "act_type layer pos head -> act_type (layer head) pos"
        )
    else:
        every_head_by_pos_act_patch_result = None

    def get_attr_patch_attn_head_by_pos_every(attr_cache):
        reduce = lambda name, pattern: einops.reduce(attr_cache.stack_activation(name), pattern, "sum")  # noqa: E731
        head_out_by_pos_attr = reduce("z", "layer batch pos head_index d_head -> layer pos head_index")
        head_q_by_pos_attr = reduce("q", "layer batch pos head_index d_head -> layer pos head_index")
        head_k_by_pos_attr = reduce("k", "layer batch pos head_index d_head -> layer pos head_index")
        head_v_by_pos_attr = reduce("v", "layer batch pos head_index d_head -> layer pos head_index")
        head_pattern_by_pos_attr = reduce("pattern", "layer batch head_index dest_pos src_pos -> layer dest_pos head_index")
        return jnp.stack([head_out_by_pos_attr, head_q_by_pos_attr, head_k_by_pos_attr,  # jpatch: torch.stack
                          head_v_by_pos_attr, head_pattern_by_pos_attr])

    every_head_by_pos_attr_patch_result = einops.rearrange(
        get_attr_patch_attn_head_by_pos_every(attr_cache), "act_type layer pos head -> act_type (layer head) pos"
    )
    out["34-35 head by pos every"] = [every_head_by_pos_act_patch_result, every_head_by_pos_attr_patch_result]
    model.set_use_attn_result(False)
    return out


def transformer_lens_cells(model, act_patching=True):
    """The same cells as the notebook writes them, on TransformerLens's HookedTransformer (loaded with
    from_pretrained's processing, as enable_compatibility_mode() does; the Bridge workarounds dropped;
    the filter also leaves out hook_attn_in / hook_mlp_in, which HookedTransformer refuses to hook
    unless they are turned on)."""
    import torch

    from fancy_einsum import einsum
    from transformer_lens import ActivationCache
    from transformer_lens import patching

    torch.set_grad_enabled(True)
    out = {}
    model.set_use_attn_result(True)
    prompts = [
        "When John and Mary went to the shops, John gave the bag to",
        "When John and Mary went to the shops, Mary gave the bag to",
        "When Tom and James went to the park, James gave the ball to",
        "When Tom and James went to the park, Tom gave the ball to",
        "When Dan and Sid went to the shops, Sid gave an apple to",
        "When Dan and Sid went to the shops, Dan gave an apple to",
        "After Martin and Amy went to the park, Amy gave a drink to",
        "After Martin and Amy went to the park, Martin gave a drink to",
    ]
    answers = [(" Mary", " John"), (" John", " Mary"), (" Tom", " James"), (" James", " Tom"), (" Dan", " Sid"),
               (" Sid", " Dan"), (" Martin", " Amy"), (" Amy", " Martin")]
    clean_tokens = model.to_tokens(prompts)
    corrupted_tokens = clean_tokens[[(i + 1 if i % 2 == 0 else i - 1) for i in range(len(clean_tokens))]]
    answer_token_indices = torch.tensor(
        [[model.to_single_token(answers[i][j]) for j in range(2)] for i in range(len(answers))],
        device=model.cfg.device)
    out["7 answer_token_indices"] = answer_token_indices

    def get_logit_diff(logits, answer_token_indices=answer_token_indices):
        if len(logits.shape) == 3:
            logits = logits[:, -1, :]
        correct_logits = logits.gather(1, answer_token_indices[:, 0].unsqueeze(1))
        incorrect_logits = logits.gather(1, answer_token_indices[:, 1].unsqueeze(1))
        return (correct_logits - incorrect_logits).mean()

    clean_logits, clean_cache = model.run_with_cache(clean_tokens)
    corrupted_logits, corrupted_cache = model.run_with_cache(corrupted_tokens)
    clean_logit_diff = get_logit_diff(clean_logits, answer_token_indices).item()
    corrupted_logit_diff = get_logit_diff(corrupted_logits, answer_token_indices).item()
    out["8 logit diffs"] = [clean_logit_diff, corrupted_logit_diff]
    CLEAN_BASELINE, CORRUPTED_BASELINE = clean_logit_diff, corrupted_logit_diff

    def ioi_metric(logits, answer_token_indices=answer_token_indices):
        return (get_logit_diff(logits, answer_token_indices) - CORRUPTED_BASELINE) / (
            CLEAN_BASELINE - CORRUPTED_BASELINE)

    out["9 baselines"] = [ioi_metric(clean_logits), ioi_metric(corrupted_logits)]
    filter_not_qkv_input = lambda name: "_input" not in name and not name.endswith(("attn_in", "mlp_in"))  # noqa

    def get_cache_fwd_and_bwd(model, tokens, metric):
        model.reset_hooks()
        grad_cache = {}

        def backward_cache_hook(act, hook):
            # HookedTransformer runs ln1's hooks once per q / k / v input, so this hook fires three times
            # there, each with one part of the gradient; the notebook's `grad_cache[hook.name] = act.detach()`
            # keeps the last part (its head path attribution, cell 20, reads ln1.hook_scale's). Their sum is
            # the gradient (what jpatch's backward hooks receive).
            grad_cache[hook.name] = grad_cache.get(hook.name, 0) + act.detach()

        model.add_hook(filter_not_qkv_input, backward_cache_hook, "bwd")
        output, fwd_cache = model.run_with_cache(tokens, names_filter=filter_not_qkv_input)
        value = metric(output)
        value.backward()
        model.reset_hooks()
        for key, hp in model.hook_dict.items():
            if hp.name != key and filter_not_qkv_input(key):
                if hp.name in grad_cache and key not in grad_cache:
                    grad_cache[key] = grad_cache[hp.name]
        return value.item(), fwd_cache, ActivationCache(grad_cache, model)

    clean_value, clean_cache, clean_grad_cache = get_cache_fwd_and_bwd(model, clean_tokens, ioi_metric)
    corrupted_value, corrupted_cache, corrupted_grad_cache = get_cache_fwd_and_bwd(model, corrupted_tokens, ioi_metric)
    out["11 values"] = [clean_value, corrupted_value, len(clean_cache), len(clean_grad_cache)]
    torch.set_grad_enabled(False)
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    stack = lambda cache, name: torch.stack([cache[name, l] for l in range(n_layers)], dim=0)  # noqa: E731
    out["12 attention_attr"] = einops.rearrange(stack(clean_grad_cache, "pattern") * stack(clean_cache, "pattern"),
                                                "layer batch head_index dest src -> batch layer head_index dest src")
    HEAD_NAMES = [f"L{l}H{h}" for l in range(n_layers) for h in range(n_heads)]
    HEAD_NAMES_QKV = [f"{name}{act_name}" for name in HEAD_NAMES for act_name in ["Q", "K", "V"]]

    clean_residual, residual_labels = clean_cache.accumulated_resid(-1, incl_mid=True, return_labels=True)
    out["15 residual"] = [einops.reduce(
        corrupted_grad_cache.accumulated_resid(-1, incl_mid=True)
        * (clean_residual - corrupted_cache.accumulated_resid(-1, incl_mid=True)),
        "component batch pos d_model -> component pos", "sum"), residual_labels]
    clean_layer_out, labels = clean_cache.decompose_resid(-1, return_labels=True)
    out["16 layer out"] = [einops.reduce(
        corrupted_grad_cache.decompose_resid(-1) * (clean_layer_out - corrupted_cache.decompose_resid(-1)),
        "component batch pos d_model -> component pos", "sum"), labels]
    head_out_attr = einops.reduce(
        corrupted_grad_cache.stack_head_results(-1) * (clean_cache.stack_head_results(-1)
                                                        - corrupted_cache.stack_head_results(-1)),
        "component batch pos d_model -> component pos", "sum")
    out["17 head out"] = [head_out_attr, HEAD_NAMES, einops.reduce(head_out_attr, "(layer head) pos -> layer head",
                                                                   "sum", layer=n_layers, head=n_heads)]

    def stack_heads(cache, name):
        return einops.rearrange(stack(cache, name), "layer batch pos head_index d_head -> (layer head_index) batch pos d_head")

    out["18 head vectors"] = {name: einops.reduce(
        stack_heads(corrupted_grad_cache, name) * (stack_heads(clean_cache, name) - stack_heads(corrupted_cache, name)),
        "component batch pos d_head -> component pos", "sum") for name in ("k", "q", "v", "z")}

    def stack_patterns(cache):
        return einops.rearrange(stack(cache, "pattern"),
                                "layer batch head_index dest_pos src_pos -> (layer head_index) batch dest_pos src_pos")

    out["19 head pattern"] = einops.reduce(
        stack_patterns(corrupted_grad_cache) * (stack_patterns(clean_cache) - stack_patterns(corrupted_cache)),
        "component batch dest_pos src_pos -> component dest_pos src_pos", "sum")

    def get_head_vector_grad_input_from_grad_cache(grad_cache, activation_name, layer):
        vector_grad = grad_cache[activation_name, layer]
        ln_scales = grad_cache["scale", layer, "ln1"]
        W = getattr(model.blocks[layer].attn, {"q": "W_Q", "k": "W_K", "v": "W_V"}[activation_name])
        return einsum(
            "batch pos head_index d_head, batch pos, head_index d_model d_head -> batch pos head_index d_model",
            vector_grad, ln_scales.squeeze(-1), W)

    full_vector_grad_input = torch.stack([torch.stack(
        [get_head_vector_grad_input_from_grad_cache(corrupted_grad_cache, name, l) for l in range(n_layers)], dim=0)
        for name in ["q", "k", "v"]], dim=0)
    diff_head_result = einops.rearrange(
        clean_cache.stack_head_results(-1) - corrupted_cache.stack_head_results(-1),
        "(layer head_index) batch pos d_model -> layer batch pos head_index d_model", layer=n_layers,
        head_index=n_heads)
    path_attr = einsum(
        "qkv layer_end batch pos head_end d_model, layer_start batch pos head_start d_model -> qkv layer_end head_end layer_start head_start pos",  # noqa: E501
        full_vector_grad_input, diff_head_result)
    correct_layer_order_mask = (torch.arange(n_layers)[None, :, None, None, None, None]
                                > torch.arange(n_layers)[None, None, None, :, None, None]).to(path_attr.device)
    path_attr = torch.where(correct_layer_order_mask, path_attr, torch.zeros(1, device=path_attr.device))
    head_path_attr = einops.rearrange(
        path_attr,
        "qkv layer_end head_end layer_start head_start pos -> (layer_end head_end qkv) (layer_start head_start) pos")
    start_labels, end_labels = HEAD_NAMES, HEAD_NAMES_QKV
    out["20 head path"] = [head_path_attr, end_labels, start_labels]

    head_out_values, head_out_indices = head_out_attr.sum(-1).abs().sort(descending=True)
    top_head_indices = head_out_indices[:22].sort().values
    top_end_indices, top_end_labels, top_start_indices = [], [], []
    for i in top_head_indices:
        i = i.item()
        top_start_indices.append(i)
        for j in range(3):
            top_end_indices.append(3 * i + j)
            top_end_labels.append(end_labels[3 * i + j])
    top = head_path_attr[top_end_indices, :][:, top_start_indices]
    out["21 top heads"] = [head_out_values, top_head_indices, top_end_labels, top.sum(-1)]
    out["22 per composition"] = [top[j::3].sum(-1) for j in range(3)]
    out["23 top head path"] = einops.rearrange(top.sum(-1), "(head_end qkv) head_start -> qkv head_end head_start",
                                               qkv=3)

    shared_keys = (set(corrupted_grad_cache.cache_dict.keys()) & set(clean_cache.cache_dict.keys())
                   & set(corrupted_cache.cache_dict.keys()))
    attr_cache = ActivationCache({key: corrupted_grad_cache.cache_dict[key] * (
        clean_cache.cache_dict[key] - corrupted_cache.cache_dict[key]) for key in shared_keys}, model)
    out["26 context_length"] = len(model.to_str_tokens(clean_tokens[0]))

    def reduce(name, pattern):
        return einops.reduce(attr_cache.stack_activation(name), pattern, "sum")

    act = (lambda fn: fn(model, corrupted_tokens, clean_cache, ioi_metric)) if act_patching else (lambda fn: None)
    out["27-28 block every"] = [
        act(patching.get_act_patch_block_every),
        torch.stack([reduce(name, "layer batch pos d_model -> layer pos") for name in ("resid_pre", "attn_out",
                                                                                       "mlp_out")], dim=0)]
    heads = [("z", "layer batch pos head_index d_head"), ("q", "layer batch pos head_index d_head"),
             ("k", "layer batch pos head_index d_head"), ("v", "layer batch pos head_index d_head"),
             ("pattern", "layer batch head_index dest_pos src_pos")]
    out["30-31 head all pos every"] = [
        act(patching.get_act_patch_attn_head_all_pos_every),
        torch.stack([reduce(name, f"{axes} -> layer head_index") for name, axes in heads])]
    by_pos = [reduce(name, f"{axes} -> layer {'dest_pos' if name == 'pattern' else 'pos'} head_index")
              for name, axes in heads]
    out["34-35 head by pos every"] = [
        act_patching and einops.rearrange(act(patching.get_act_patch_attn_head_by_pos_every),
                                          "act_type layer pos head -> act_type (layer head) pos") or None,
        einops.rearrange(torch.stack(by_pos), "act_type layer pos head -> act_type (layer head) pos")]
    model.set_use_attn_result(False)
    return out


def run(model, tl_model=None, act_patching=True):
    """{cell: numbers} of the ported cells on the jpatch `model`; with `tl_model` (TransformerLens,
    the same weights), (jpatch's, TransformerLens's). act_patching: see `cells`."""
    ours = cells(model, act_patching)
    return ours if tl_model is None else (ours, transformer_lens_cells(tl_model, act_patching))


if __name__ == "__main__":
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from test_tl_notebooks import build_models  # a small random GPT-2 with GPT-2's vocabulary

    for cell, numbers in run(build_models()[0]).items():
        print(cell, str(numbers)[:200])
