"""TransformerLens's `utils.get_act_name`, so notebooks that build hook names keep working."""

import re

_LAYER_TYPE_ALIAS = {"a": "attn", "m": "mlp", "b": "", "block": "", "blocks": "", "attention": "attn"}
_ACT_NAME_ALIAS = {
    "attn": "pattern",
    "attn_logits": "attn_scores",
    "key": "k",
    "query": "q",
    "value": "v",
    "mlp_pre": "pre",
    "mlp_mid": "mid",
    "mlp_post": "post",
}
_ATTN_NAMES = ("k", "v", "q", "z", "rot_k", "rot_q", "result", "pattern", "attn_scores")
_MLP_NAMES = ("pre", "post", "mid", "pre_linear")


def get_act_name(name, layer=None, layer_type=None):
    """Shorthand -> hook name, exactly as TransformerLens 3.9's `utils.get_act_name`.

    get_act_name("k", 6, "a") == "blocks.6.attn.hook_k"; get_act_name("pre", 2) == "blocks.2.mlp.hook_pre";
    get_act_name("embed") == "hook_embed"; get_act_name("normalized", 3, "ln2") == "blocks.3.ln2.hook_normalized";
    get_act_name("k6") == "blocks.6.attn.hook_k"; get_act_name("scale4ln1") == "blocks.4.ln1.hook_scale".
    The result is a name, not a check: `jpatch.sites.resolve` says whether the model has it.
    """
    if ("." in name or name.startswith("hook_")) and layer is None and layer_type is None:
        return name  # already a full name
    match = re.match(r"([a-z]+)(\d+)([a-z]?.*)", name)
    if match is not None:
        name, layer, layer_type = match.groups(0)
    name = _ACT_NAME_ALIAS.get(name, name)
    full = "" if layer is None else f"blocks.{layer}."
    if name in _ATTN_NAMES:
        layer_type = "attn"
    elif name in _MLP_NAMES:
        layer_type = "mlp"
    elif layer_type in _LAYER_TYPE_ALIAS:
        layer_type = _LAYER_TYPE_ALIAS[layer_type]
    if layer_type:
        full += f"{layer_type}."
    full += f"hook_{name}"
    if name in ("scale", "normalized") and layer is None:
        full = f"ln_final.{full}"
    return full


# --- TransformerLens's other utils that notebooks call ------------------------------------------


def to_numpy(tensor):
    """An array (JAX, numpy, torch, a list or tuple, a Python scalar or str) as a numpy array, as
    TransformerLens's `utils.to_numpy` (torch's bfloat16 read as float32)."""
    import numpy as np

    if isinstance(tensor, np.ndarray):
        return tensor
    if isinstance(tensor, (list, tuple)):
        return np.array(tensor)
    if hasattr(tensor, "detach") and hasattr(tensor, "cpu"):  # torch
        tensor = tensor.detach().cpu()
        return (tensor.float() if str(tensor.dtype) == "torch.bfloat16" else tensor).numpy()
    if isinstance(tensor, (int, float, bool, str)):
        return np.array(tensor)
    if hasattr(tensor, "__array__") and hasattr(tensor, "dtype"):  # a JAX array
        return np.asarray(tensor)
    raise ValueError(f"Input to to_numpy has invalid type: {type(tensor)}")


def get_device():
    """JAX's default device (a `jax.Device`: a GPU when JAX has one, else the CPU), for
    TransformerLens's `utils.get_device()`. jpatch models and arrays live there already: there is
    no `model.to(device)` to call."""
    import jax

    return jax.devices()[0]


def test_prompt(prompt, answer, model, prepend_space_to_answer=True, print_details=True, prepend_bos=None,
                top_k=10):
    """Print how the model ranks `answer` after `prompt` (rank, logit, probability of each answer
    token, and the top_k tokens), as TransformerLens's `utils.test_prompt`. A list of answers compares
    their first tokens. prepend_bos None: True (the to_tokens default). Returns None."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    prepend_bos = True if prepend_bos is None else prepend_bos
    answers = [answer] if isinstance(answer, str) else list(answer)
    if not answers:
        raise ValueError("test_prompt needs an answer")
    if prepend_space_to_answer:
        answers = [a if a.startswith(" ") else " " + a for a in answers]
    several = len(answers) > 1
    prompt_ids = np.asarray(model.to_tokens(prompt, prepend_bos=prepend_bos))[0]
    answer_ids = [np.asarray(model.to_tokens(a, prepend_bos=False))[0] for a in answers]
    if several:
        answer_ids = [a[:1] for a in answer_ids]
    tokens = np.stack([np.concatenate([prompt_ids, a]) for a in answer_ids])
    prompt_str = model.to_str_tokens(prompt, prepend_bos=prepend_bos)
    answer_strs = [model.to_str_tokens(a, prepend_bos=False) for a in answers]
    n_prompt, n_answer = len(prompt_ids), len(answer_ids[0])
    if print_details:
        print("Tokenized prompt:", prompt_str)
        print("Tokenized answers:" if several else "Tokenized answer:", answer_strs if several else answer_strs[0])
    logits = np.asarray(model(jnp.asarray(tokens)), np.float32)
    probs = np.asarray(jax.nn.softmax(jnp.asarray(logits), axis=-1))
    ranks = []
    for index in range(n_prompt, n_prompt + n_answer):
        want = tokens[:, index]
        p = probs[:, index - 1]
        order = np.argsort(-p, axis=-1, kind="stable")
        rank = [int(np.flatnonzero(order[i] == want[i])[0]) for i in range(len(answers))]
        strs = [a[index - n_prompt] for a in answer_strs]
        ranks.append(list(zip(strs, rank)))
        if print_details:
            print(f"Performance on answer token{'s' if several else ''}:")
            for i in range(len(answers)):
                print(f"Rank: {rank[i]: <8} Logit: {logits[i, index - 1, want[i]]:5.2f} Prob: "
                      f"{p[i, want[i]]:6.2%} Token: |{strs[i]}|")
            for i in range(top_k):
                t = order[0, i]
                print(f"Top {i}th token. Logit: {logits[0, index - 1, t]:5.2f} Prob: {p[0, t]:6.2%} "
                      f"Token: |{model.to_string(t)}|")
    print("Ranks of the answer tokens:", [r[0] for r in ranks] if not several else ranks)


test_prompt.__test__ = False  # not a pytest test
