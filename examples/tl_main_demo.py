"""TransformerLens's Main_Demo.ipynb (demos/, TransformerLens main at 4cd36aa), ported cell by cell.

`run(model)` runs every cell that ports on a jpatch model and returns {cell: the numbers it
produces}; `run(model, tl_model)` also runs the notebook's own code on TransformerLens (a
HookedTransformer with the same weights) and returns (jpatch's, TransformerLens's).
tests/test_tl_notebooks.py checks that the two agree on a small random GPT-2.

The notebook's code is kept as it is, except (each marked `# jpatch:`): imports and model loading;
torch calls made jnp / numpy (result stores are numpy arrays, which take in-place writes; hooks
return `act.at[...].set(...)` where they assigned into the activation); random inputs drawn with
numpy (the same in both runs). Left out: Colab / plotting / widget cells (the computation behind
a plot is kept), the cells that download other models (distilgpt2, checkpoints, evals), the
GPT-2-small-specific layer / head numbers (cell 20), and cells 53-55, which build a new model
from TransformerLens's HookPoint / HookedRootModule classes (jpatch has no generic module
framework: a jpatch model family is a jpatch module). Cell numbers count code cells from 0.

    python examples/tl_main_demo.py   # on a small random GPT-2 with GPT-2's vocabulary
"""

from functools import partial

import einops
import jax
import jax.numpy as jnp
import numpy as np
import tqdm.auto as tqdm
from jaxtyping import Float

from jpatch import FactoredMatrix, utils  # noqa: F401  (cell 4: TransformerLens's imports)
from jpatch.utils import einsum  # noqa: F401  (cell 3: fancy_einsum refuses JAX arrays)


def cells(model, sample=True):
    """The notebook's cells on a jpatch `model` (GPT-2's vocabulary, loaded with TransformerLens's
    weight processing: `jpatch.load(..., fold_ln=True, center_writing_weights=True,
    center_unembed=True, fold_value_biases=True)`). sample=False leaves out cell 52 (sampling 50
    tokens, whose text is random in both libraries)."""
    out = {}
    n = model.cfg.n_layers

    # cell 7
    device = utils.get_device()  # noqa: F841

    # cell 9 (cell 8 loads the model)
    model_description_text = """## Loading and Running Models

TransformerLens supports 9,000+ models across 50+ architecture families. You can load any of them in with `TransformerBridge.boot_transformers(MODEL_NAME)`. For this demo notebook we'll look at GPT-2 Small, an 80M parameter model, see the Available Models section for info on the rest.

To try the model out, let's find the loss on this text!"""  # noqa: E501
    loss = model(model_description_text, return_type="loss")
    print("Model loss:", loss)
    out["9 loss"] = loss

    # cell 10
    gpt2_text = "Natural language processing tasks, such as question answering, machine translation, reading comprehension, and summarization, are typically approached with supervised learning on taskspecific datasets."  # noqa: E501
    gpt2_tokens = model.to_tokens(gpt2_text)
    print(gpt2_tokens.device)
    gpt2_logits, gpt2_cache = model.run_with_cache(gpt2_tokens, remove_batch_dim=True)
    out["10 logits"] = gpt2_logits

    # cell 11
    print(type(gpt2_cache))
    attention_pattern = gpt2_cache["pattern", 0, "attn"]
    print(attention_pattern.shape)
    gpt2_str_tokens = model.to_str_tokens(gpt2_text)
    out["11 pattern"], out["11 str_tokens"] = attention_pattern, gpt2_str_tokens

    # cell 13
    attn_hook_name = "blocks.0.attn.hook_pattern"
    attn_layer = 0
    _, gpt2_attn_cache = model.run_with_cache(
        gpt2_tokens, remove_batch_dim=True, stop_at_layer=attn_layer + 1, names_filter=[attn_hook_name]
    )
    gpt2_attn = gpt2_attn_cache[attn_hook_name]
    assert jnp.allclose(gpt2_attn, attention_pattern)  # jpatch: torch.allclose
    out["13 attn"] = gpt2_attn

    # cell 14
    layer_to_ablate = 0
    head_index_to_ablate = 3 if model.cfg.n_heads < 9 else 8  # jpatch: head 8 needs GPT-2 small's 12 heads

    def head_ablation_hook(
        value: Float[jax.Array, "batch pos head_index d_head"], hook  # jpatch: torch.Tensor
    ) -> Float[jax.Array, "batch pos head_index d_head"]:
        print(f"Shape of the value tensor: {value.shape}")
        return value.at[:, :, head_index_to_ablate, :].set(0.0)  # jpatch: value[...] = 0.0; return value

    original_loss = model(gpt2_tokens, return_type="loss")
    ablated_loss = model.run_with_hooks(
        gpt2_tokens,
        return_type="loss",
        fwd_hooks=[(utils.get_act_name("v", layer_to_ablate), head_ablation_hook)],
    )
    print(f"Original Loss: {original_loss.item():.3f}")
    print(f"Ablated Loss: {ablated_loss.item():.3f}")
    out["14 losses"] = [original_loss, ablated_loss]

    # cell 15
    clean_prompt = "After John and Mary went to the store, Mary gave a bottle of milk to"
    corrupted_prompt = "After John and Mary went to the store, John gave a bottle of milk to"

    clean_tokens = model.to_tokens(clean_prompt)
    corrupted_tokens = model.to_tokens(corrupted_prompt)

    def logits_to_logit_diff(logits, correct_answer=" John", incorrect_answer=" Mary"):
        correct_index = model.to_single_token(correct_answer)
        incorrect_index = model.to_single_token(incorrect_answer)
        return logits[0, -1, correct_index] - logits[0, -1, incorrect_index]

    clean_logits, clean_cache = model.run_with_cache(clean_tokens)
    clean_logit_diff = logits_to_logit_diff(clean_logits)
    print(f"Clean logit difference: {clean_logit_diff.item():.3f}")
    corrupted_logits = model(corrupted_tokens)
    corrupted_logit_diff = logits_to_logit_diff(corrupted_logits)
    print(f"Corrupted logit difference: {corrupted_logit_diff.item():.3f}")
    out["15 logit diffs"] = [clean_logit_diff, corrupted_logit_diff]

    # cell 16
    def residual_stream_patching_hook(
        resid_pre: Float[jax.Array, "batch pos d_model"], hook, position: int
    ) -> Float[jax.Array, "batch pos d_model"]:
        clean_resid_pre = clean_cache[hook.name]
        return resid_pre.at[:, position, :].set(clean_resid_pre[:, position, :])  # jpatch: in place, return

    num_positions = len(clean_tokens[0])
    ioi_patching_result = np.zeros((model.cfg.n_layers, num_positions))  # jpatch: torch.zeros(..., device)

    for layer in tqdm.tqdm(range(model.cfg.n_layers)):
        for position in range(num_positions):
            temp_hook_fn = partial(residual_stream_patching_hook, position=position)
            patched_logits = model.run_with_hooks(
                # jpatch: "in" is TransformerBridge's blocks.{layer}.hook_in, its alias of hook_resid_pre
                corrupted_tokens, fwd_hooks=[(utils.get_act_name("resid_pre", layer), temp_hook_fn)]
            )
            patched_logit_diff = logits_to_logit_diff(patched_logits)  # jpatch: .detach() dropped
            ioi_patching_result[layer, position] = (patched_logit_diff - corrupted_logit_diff) / (
                clean_logit_diff - corrupted_logit_diff
            )
    out["16 ioi_patching_result"] = ioi_patching_result

    # cell 17 (the plot's labels)
    token_labels = [f"{token}_{index}" for index, token in enumerate(model.to_str_tokens(clean_tokens))]
    out["17 token_labels"] = token_labels

    # cell 18
    batch_size = 10
    seq_len = 50
    size = (batch_size, seq_len)
    input_tensor = np.random.default_rng(0).integers(1000, 10000, size)  # jpatch: torch.randint(1000, 10000, size)

    random_tokens = input_tensor
    repeated_tokens = einops.repeat(random_tokens, "batch seq_len -> batch (2 seq_len)")
    repeated_logits = model(repeated_tokens)
    correct_log_probs = model.loss_fn(repeated_logits, repeated_tokens, per_token=True)
    loss_by_position = einops.reduce(correct_log_probs, "batch position -> position", "mean")
    out["18 loss_by_position"] = loss_by_position

    # cell 19
    induction_score_store = np.zeros((model.cfg.n_layers, model.cfg.n_heads))  # jpatch: torch.zeros

    def induction_score_hook(pattern: Float[jax.Array, "batch head_index dest_pos source_pos"], hook):
        induction_stripe = pattern.diagonal(axis1=-2, axis2=-1, offset=1 - seq_len)  # jpatch: dim1 / dim2
        induction_score = einops.reduce(induction_stripe, "batch head_index position -> head_index", "mean")
        induction_score_store[hook.layer(), :] = induction_score

    pattern_hook_names_filter = lambda name: name.endswith("pattern")  # noqa: E731

    model.run_with_hooks(
        repeated_tokens,
        return_type=None,
        fwd_hooks=[(pattern_hook_names_filter, induction_score_hook)],
    )
    out["19 induction_score_store"] = induction_score_store

    # cells 23-24
    out["23 params"] = [(name, param.shape) for name, param in model.tl_named_parameters()
                        if name.startswith("blocks.0.") or not name.startswith("blocks")]
    for name, param in model.tl_named_parameters():
        if name.startswith("blocks.0."):
            print(name, param.shape)

    # cell 25
    test_prompt = "The quick brown fox jumped over the lazy dog"
    print("Num tokens:", len(model.to_tokens(test_prompt)[0]))
    seen = []

    def print_name_shape_hook_function(activation, hook):
        print(hook.name, activation.shape)
        seen.append((hook.name, tuple(activation.shape)))

    not_in_late_block_filter = lambda name: name.startswith("blocks.0.") or not name.startswith("blocks")  # noqa

    model.run_with_hooks(
        test_prompt,
        return_type=None,
        fwd_hooks=[(not_in_late_block_filter, print_name_shape_hook_function)],
    )
    out["25 hook names and shapes"] = seen

    # cells 26-27
    unembed_bias = model.unembed.b_U
    bias_indices = jnp.argsort(-unembed_bias)  # jpatch: unembed_bias.sort(descending=True)
    bias_values = unembed_bias[bias_indices]
    top_k = 20
    print(f"Top {top_k} values")
    for i in range(top_k):
        print(f"{bias_values[i].item():.2f} {repr(model.to_string(bias_indices[i]))}")
    out["27 top bias"] = [(bias_values[i].item(), model.to_string(bias_indices[i])) for i in range(top_k)]
    out["27 bottom bias"] = [(bias_values[-i].item(), model.to_string(bias_indices[-i])) for i in range(top_k, 0, -1)]

    # cell 28
    john_bias = model.unembed.b_U[model.to_single_token(" John")]
    mary_bias = model.unembed.b_U[model.to_single_token(" Mary")]
    print(f"John bias: {john_bias.item():.4f}")
    print(f"Mary bias: {mary_bias.item():.4f}")
    print(f"Prob ratio bias: {jnp.exp(john_bias - mary_bias).item():.4f}x")  # jpatch: torch.exp
    out["28 biases"] = [john_bias, mary_bias, jnp.exp(john_bias - mary_bias)]

    # cells 29-31
    example_text = "The first thing you need to figure out is *how* things are tokenized. `model.to_str_tokens` splits a string into the tokens *as a list of substrings*, and so lets you explore what the text looks like. To demonstrate this, let's use it on this paragraph."  # noqa: E501
    example_text_str_tokens = model.to_str_tokens(example_text)
    example_text_tokens = model.to_tokens(example_text)
    example_multi_text = ["The cat sat on the mat.", "The cat sat on the mat really hard."]
    example_multi_text_tokens, _ = model.to_tokens(example_multi_text)  # jpatch: (tokens, mask) of ragged texts
    out["29-31 tokens"] = [example_text_str_tokens, example_text_tokens, example_multi_text_tokens]

    # cell 32
    cat_text = "The cat sat on the mat."
    cat_logits = model(cat_text)
    cat_probs = jax.nn.softmax(cat_logits, axis=-1)  # jpatch: cat_logits.softmax(dim=-1)
    capital_the_token_index = model.to_single_token(" The")
    print(f"| The| probability: {cat_probs[0, -1, capital_the_token_index].item():.2%}")
    out["32 prob"] = cat_probs[0, -1, capital_the_token_index]

    # cell 33
    out["33 strings"] = [model.to_string(256), model.to_string(example_text_tokens.squeeze())]

    # cells 34-35
    out["34-35 positions"] = [
        model.get_token_position(" cat", "The cat sat on the mat"),
        model.get_token_position(" cat", "The cat sat on the mat", prepend_bos=False),
        model.get_token_position(" cat", "The cat sat on the mat. The mat sat on the cat.", mode="first"),
        model.get_token_position(" cat", "The cat sat on the mat. The mat sat on the cat.", mode="last"),
    ]

    # cell 36
    out["36 str tokens"] = [model.to_str_tokens("2342+2017=21445"), model.to_str_tokens("1000+1000000=999999")]

    # cell 37
    out["37 shapes"] = [model("Hello World").shape, model("Hello World", prepend_bos=True).shape,
                        model("Hello World", prepend_bos=False).shape]

    # cell 38
    ioi_logits_with_bos = model(
        "Claire and Mary went to the shops, then Mary gave a bottle of milk to", prepend_bos=True
    )
    mary_logit_with_bos = ioi_logits_with_bos[0, -1, model.to_single_token(" Mary")].item()
    claire_logit_with_bos = ioi_logits_with_bos[0, -1, model.to_single_token(" Claire")].item()
    ioi_logits_without_bos = model(
        "Claire and Mary went to the shops, then Mary gave a bottle of milk to", prepend_bos=False
    )
    mary_logit_without_bos = ioi_logits_without_bos[0, -1, model.to_single_token(" Mary")].item()
    claire_logit_without_bos = ioi_logits_without_bos[0, -1, model.to_single_token(" Claire")].item()
    out["38 logit diffs"] = [claire_logit_with_bos - mary_logit_with_bos,
                             claire_logit_without_bos - mary_logit_without_bos]

    # cell 39
    out["39 str tokens"] = [model.to_str_tokens(" Claire", prepend_bos=False),
                            model.to_str_tokens("Claire", prepend_bos=False)]

    # cell 40
    rng = np.random.default_rng(50)  # jpatch: torch.manual_seed(50)
    A = rng.standard_normal((5, 2), np.float32)  # jpatch: torch.randn(5, 2)
    B = rng.standard_normal((2, 5), np.float32)
    AB = A @ B
    AB_factor = FactoredMatrix(A, B)
    out["40 norms"] = [jnp.linalg.norm(AB), AB_factor.norm()]  # jpatch: AB.norm()
    out["40 dims"] = [AB_factor.rdim, AB_factor.ldim, AB_factor.mdim]

    # cell 41
    print("Eigenvalues:")
    print(jnp.linalg.eigvals(AB))  # jpatch: torch.linalg.eig(AB).eigenvalues
    print(AB_factor.eigenvalues)
    print("Singular Values:")
    print(jnp.linalg.svd(AB, compute_uv=False))  # jpatch: torch.linalg.svd(AB).S
    print(AB_factor.S)
    out["41 eigenvalues"] = [jnp.linalg.eigvals(AB), AB_factor.eigenvalues]  # in any order: compared sorted
    out["41 singular values"] = [jnp.linalg.svd(AB, compute_uv=False), AB_factor.S]

    # cell 42
    C = rng.standard_normal((5, 300), np.float32)  # jpatch: torch.randn(5, 300)
    ABC = AB @ C
    ABC_factor = AB_factor @ C
    out["42"] = [ABC.shape, jnp.round(jnp.linalg.norm(ABC), 3), ABC_factor.shape,  # jpatch: .norm().round()
                 jnp.round(ABC_factor.norm(), 3), ABC_factor.rdim, ABC_factor.ldim, ABC_factor.mdim]

    # cell 43
    AB_unfactored = AB_factor.AB
    out["43"] = jnp.isclose(AB_unfactored, AB).all()  # jpatch: torch.isclose

    # cells 44-46
    OV_circuit_all_heads = model.OV
    print(OV_circuit_all_heads)
    OV_circuit_all_heads_eigenvalues = OV_circuit_all_heads.eigenvalues
    print(OV_circuit_all_heads_eigenvalues.shape)
    print(OV_circuit_all_heads_eigenvalues.dtype)
    OV_copying_score = OV_circuit_all_heads_eigenvalues.sum(
        axis=-1  # jpatch: dim=-1
    ).real / jnp.abs(OV_circuit_all_heads_eigenvalues).sum(axis=-1)
    out["44-46 OV"] = [repr(OV_circuit_all_heads), OV_circuit_all_heads_eigenvalues.shape, OV_copying_score]

    # cells 48-50
    full_OV_circuit = model.embed.W_E @ OV_circuit_all_heads @ model.unembed.W_U
    print(full_OV_circuit)
    full_OV_circuit_eigenvalues = full_OV_circuit.eigenvalues
    full_OV_copying_score = full_OV_circuit_eigenvalues.sum(
        axis=-1  # jpatch: dim=-1
    ).real / jnp.abs(full_OV_circuit_eigenvalues).sum(axis=-1)
    out["48-50 full OV"] = [repr(full_OV_circuit), full_OV_circuit_eigenvalues.shape, full_OV_copying_score]

    # cell 52: sampling, whose text differs from run to run (NBVAL_IGNORE_OUTPUT): checked to run only
    if sample:
        model.generate(
            "(CNN) President Barack Obama caught in embarrassing new scandal\n",
            max_new_tokens=50,
            temperature=0.7,
        )
    return out


def transformer_lens_cells(model):
    """The same cells as the notebook writes them, on TransformerLens's HookedTransformer (the
    weights processed as from_pretrained's defaults; TransformerBridge's tl_named_parameters is
    HookedTransformer's named_parameters). Random inputs as `cells` draws them."""
    import torch

    from transformer_lens import FactoredMatrix
    from transformer_lens import utilities as utils

    torch.set_grad_enabled(False)
    out = {}
    model_description_text = """## Loading and Running Models

TransformerLens supports 9,000+ models across 50+ architecture families. You can load any of them in with `TransformerBridge.boot_transformers(MODEL_NAME)`. For this demo notebook we'll look at GPT-2 Small, an 80M parameter model, see the Available Models section for info on the rest.

To try the model out, let's find the loss on this text!"""  # noqa: E501
    out["9 loss"] = model(model_description_text, return_type="loss")

    gpt2_text = "Natural language processing tasks, such as question answering, machine translation, reading comprehension, and summarization, are typically approached with supervised learning on taskspecific datasets."  # noqa: E501
    gpt2_tokens = model.to_tokens(gpt2_text)
    gpt2_logits, gpt2_cache = model.run_with_cache(gpt2_tokens, remove_batch_dim=True)
    out["10 logits"] = gpt2_logits
    attention_pattern = gpt2_cache["pattern", 0, "attn"]
    out["11 pattern"], out["11 str_tokens"] = attention_pattern, model.to_str_tokens(gpt2_text)

    attn_hook_name = "blocks.0.attn.hook_pattern"
    _, gpt2_attn_cache = model.run_with_cache(
        gpt2_tokens, remove_batch_dim=True, stop_at_layer=1, names_filter=[attn_hook_name]
    )
    gpt2_attn = gpt2_attn_cache[attn_hook_name]
    assert torch.allclose(gpt2_attn, attention_pattern)
    out["13 attn"] = gpt2_attn

    layer_to_ablate = 0
    head_index_to_ablate = 3 if model.cfg.n_heads < 9 else 8

    def head_ablation_hook(value, hook):
        value[:, :, head_index_to_ablate, :] = 0.0
        return value

    original_loss = model(gpt2_tokens, return_type="loss")
    ablated_loss = model.run_with_hooks(
        gpt2_tokens, return_type="loss", fwd_hooks=[(utils.get_act_name("v", layer_to_ablate), head_ablation_hook)]
    )
    out["14 losses"] = [original_loss, ablated_loss]

    clean_tokens = model.to_tokens("After John and Mary went to the store, Mary gave a bottle of milk to")
    corrupted_tokens = model.to_tokens("After John and Mary went to the store, John gave a bottle of milk to")

    def logits_to_logit_diff(logits, correct_answer=" John", incorrect_answer=" Mary"):
        correct_index = model.to_single_token(correct_answer)
        incorrect_index = model.to_single_token(incorrect_answer)
        return logits[0, -1, correct_index] - logits[0, -1, incorrect_index]

    clean_logits, clean_cache = model.run_with_cache(clean_tokens)
    clean_logit_diff = logits_to_logit_diff(clean_logits)
    corrupted_logits = model(corrupted_tokens)
    corrupted_logit_diff = logits_to_logit_diff(corrupted_logits)
    out["15 logit diffs"] = [clean_logit_diff, corrupted_logit_diff]

    def residual_stream_patching_hook(resid_pre, hook, position):
        clean_resid_pre = clean_cache[hook.name]
        resid_pre[:, position, :] = clean_resid_pre[:, position, :]
        return resid_pre

    num_positions = len(clean_tokens[0])
    ioi_patching_result = torch.zeros((model.cfg.n_layers, num_positions), device=model.cfg.device)
    for layer in range(model.cfg.n_layers):
        for position in range(num_positions):
            temp_hook_fn = partial(residual_stream_patching_hook, position=position)
            patched_logits = model.run_with_hooks(
                corrupted_tokens, fwd_hooks=[(utils.get_act_name("resid_pre", layer), temp_hook_fn)]  # HookedTransformer
            )
            patched_logit_diff = logits_to_logit_diff(patched_logits).detach()
            ioi_patching_result[layer, position] = (patched_logit_diff - corrupted_logit_diff) / (
                clean_logit_diff - corrupted_logit_diff
            )
    out["16 ioi_patching_result"] = ioi_patching_result
    out["17 token_labels"] = [f"{token}_{index}" for index, token in enumerate(model.to_str_tokens(clean_tokens))]

    batch_size, seq_len = 10, 50
    input_tensor = torch.tensor(np.random.default_rng(0).integers(1000, 10000, (batch_size, seq_len)))
    repeated_tokens = einops.repeat(input_tensor, "batch seq_len -> batch (2 seq_len)")
    repeated_logits = model(repeated_tokens)
    correct_log_probs = model.loss_fn(repeated_logits, repeated_tokens, per_token=True)
    out["18 loss_by_position"] = einops.reduce(correct_log_probs, "batch position -> position", "mean")

    induction_score_store = torch.zeros((model.cfg.n_layers, model.cfg.n_heads), device=model.cfg.device)

    def induction_score_hook(pattern, hook):
        induction_stripe = pattern.diagonal(dim1=-2, dim2=-1, offset=1 - seq_len)
        induction_score = einops.reduce(induction_stripe, "batch head_index position -> head_index", "mean")
        induction_score_store[hook.layer(), :] = induction_score

    model.run_with_hooks(repeated_tokens, return_type=None,
                         fwd_hooks=[(lambda name: name.endswith("pattern"), induction_score_hook)])
    out["19 induction_score_store"] = induction_score_store

    out["23 params"] = [(name, tuple(param.shape)) for name, param in model.named_parameters()
                        if name.startswith("blocks.0.") or not name.startswith("blocks")]

    seen = []

    def print_name_shape_hook_function(activation, hook):
        seen.append((hook.name, tuple(activation.shape)))

    not_in_late_block_filter = lambda name: name.startswith("blocks.0.") or not name.startswith("blocks")  # noqa
    model.run_with_hooks("The quick brown fox jumped over the lazy dog", return_type=None,
                         fwd_hooks=[(not_in_late_block_filter, print_name_shape_hook_function)])
    out["25 hook names and shapes"] = seen

    unembed_bias = model.unembed.b_U
    bias_values, bias_indices = unembed_bias.sort(descending=True)
    out["27 top bias"] = [(bias_values[i].item(), model.to_string(bias_indices[i])) for i in range(20)]
    out["27 bottom bias"] = [(bias_values[-i].item(), model.to_string(bias_indices[-i])) for i in range(20, 0, -1)]

    john_bias = model.unembed.b_U[model.to_single_token(" John")]
    mary_bias = model.unembed.b_U[model.to_single_token(" Mary")]
    out["28 biases"] = [john_bias, mary_bias, torch.exp(john_bias - mary_bias)]

    example_text = "The first thing you need to figure out is *how* things are tokenized. `model.to_str_tokens` splits a string into the tokens *as a list of substrings*, and so lets you explore what the text looks like. To demonstrate this, let's use it on this paragraph."  # noqa: E501
    example_text_tokens = model.to_tokens(example_text)
    out["29-31 tokens"] = [model.to_str_tokens(example_text), example_text_tokens,
                           model.to_tokens(["The cat sat on the mat.", "The cat sat on the mat really hard."])]

    cat_probs = model("The cat sat on the mat.").softmax(dim=-1)
    out["32 prob"] = cat_probs[0, -1, model.to_single_token(" The")]
    out["33 strings"] = [model.to_string(256), model.to_string(example_text_tokens.squeeze())]
    out["34-35 positions"] = [
        model.get_token_position(" cat", "The cat sat on the mat"),
        model.get_token_position(" cat", "The cat sat on the mat", prepend_bos=False),
        model.get_token_position(" cat", "The cat sat on the mat. The mat sat on the cat.", mode="first"),
        model.get_token_position(" cat", "The cat sat on the mat. The mat sat on the cat.", mode="last"),
    ]
    out["36 str tokens"] = [model.to_str_tokens("2342+2017=21445"), model.to_str_tokens("1000+1000000=999999")]
    out["37 shapes"] = [tuple(model("Hello World").shape), tuple(model("Hello World", prepend_bos=True).shape),
                        tuple(model("Hello World", prepend_bos=False).shape)]
    ioi = "Claire and Mary went to the shops, then Mary gave a bottle of milk to"
    diffs = []
    for prepend_bos in (True, False):
        logits = model(ioi, prepend_bos=prepend_bos)
        diffs.append(logits[0, -1, model.to_single_token(" Claire")].item()
                     - logits[0, -1, model.to_single_token(" Mary")].item())
    out["38 logit diffs"] = diffs
    out["39 str tokens"] = [model.to_str_tokens(" Claire", prepend_bos=False),
                            model.to_str_tokens("Claire", prepend_bos=False)]

    rng = np.random.default_rng(50)
    A = torch.tensor(rng.standard_normal((5, 2), np.float32))
    B = torch.tensor(rng.standard_normal((2, 5), np.float32))
    AB = A @ B
    AB_factor = FactoredMatrix(A, B)
    out["40 norms"] = [AB.norm(), AB_factor.norm()]
    out["40 dims"] = [AB_factor.rdim, AB_factor.ldim, AB_factor.mdim]
    out["41 eigenvalues"] = [torch.linalg.eig(AB).eigenvalues, AB_factor.eigenvalues]
    out["41 singular values"] = [torch.linalg.svd(AB).S, AB_factor.S]
    C = torch.tensor(rng.standard_normal((5, 300), np.float32))
    ABC = AB @ C
    ABC_factor = AB_factor @ C
    out["42"] = [tuple(ABC.shape), ABC.norm().round(decimals=3), tuple(ABC_factor.shape),
                 ABC_factor.norm().round(decimals=3), ABC_factor.rdim, ABC_factor.ldim, ABC_factor.mdim]
    out["43"] = torch.isclose(AB_factor.AB, AB).all()

    OV_circuit_all_heads = model.OV
    OV_circuit_all_heads_eigenvalues = OV_circuit_all_heads.eigenvalues
    OV_copying_score = OV_circuit_all_heads_eigenvalues.sum(dim=-1).real / OV_circuit_all_heads_eigenvalues.abs().sum(
        dim=-1)
    out["44-46 OV"] = [repr(OV_circuit_all_heads), tuple(OV_circuit_all_heads_eigenvalues.shape), OV_copying_score]
    full_OV_circuit = model.embed.W_E @ OV_circuit_all_heads @ model.unembed.W_U
    full_OV_circuit_eigenvalues = full_OV_circuit.eigenvalues
    full_OV_copying_score = full_OV_circuit_eigenvalues.sum(dim=-1).real / full_OV_circuit_eigenvalues.abs().sum(
        dim=-1)
    out["48-50 full OV"] = [repr(full_OV_circuit), tuple(full_OV_circuit_eigenvalues.shape), full_OV_copying_score]
    return out


def run(model, tl_model=None, sample=True):
    """{cell: numbers} of the ported cells on the jpatch `model`; with `tl_model` (TransformerLens,
    the same weights), (jpatch's, TransformerLens's). sample: see `cells`."""
    ours = cells(model, sample)
    return ours if tl_model is None else (ours, transformer_lens_cells(tl_model))


if __name__ == "__main__":
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from test_tl_notebooks import build_models  # a small random GPT-2 with GPT-2's vocabulary

    for cell, numbers in run(build_models()[0]).items():
        print(cell, str(numbers)[:200])
