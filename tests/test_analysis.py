"""ActivationCache analysis helpers (accumulated_resid, decompose_resid, stack_head_results,
apply_ln_to_stack, logit_attrs, logit lens) against TransformerLens 3.9 on the same weights."""

import numpy as np
import pytest
import torch

import reference

V = reference.TINY["vocab_size"]
L = reference.TINY["n_layer"]


@pytest.fixture(scope="module")
def caches(jp_tiny, tl_tiny):
    tokens = reference.random_tokens(3, 6, V, seed=40)
    _, tl_cache = tl_tiny.run_with_cache(torch.tensor(tokens))
    return jp_tiny.run_with_cache(tokens)[1], tl_cache, tokens


def same(ours, theirs, what):
    if isinstance(theirs, tuple):
        assert ours[1] == theirs[1], f"{what}: labels"
        ours, theirs = ours[0], theirs[0]
    theirs = theirs.detach().numpy()
    assert np.shape(ours) == theirs.shape, f"{what}: shape {np.shape(ours)} != {theirs.shape}"
    np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-4, rtol=1e-4, err_msg=what)


CALLS = [
    ("accumulated_resid", {}),
    ("accumulated_resid", dict(incl_mid=True, return_labels=True)),
    ("accumulated_resid", dict(layer=1, mlp_input=True, apply_ln=True, return_labels=True)),
    ("accumulated_resid", dict(apply_ln=True, pos_slice=-1)),
    ("accumulated_resid", dict(layer=0, pos_slice=(1, 4))),
    ("decompose_resid", dict(return_labels=True)),
    ("decompose_resid", dict(layer=1, mlp_input=True, apply_ln=True)),
    ("decompose_resid", dict(mode="attn", pos_slice=[0, 2, 5], return_labels=True)),
    ("decompose_resid", dict(mode="mlp", incl_embeds=False, apply_ln=True, pos_slice=-1)),
    ("stack_head_results", dict(return_labels=True)),
    ("stack_head_results", dict(incl_remainder=True, apply_ln=True, return_labels=True)),
    ("stack_head_results", dict(layer=1, pos_slice=-1, apply_ln=True)),
]


@pytest.mark.parametrize("method,kwargs", CALLS, ids=[f"{m}-{sorted(k)}" for m, k in CALLS])
def test_stacks_equal_transformer_lens(caches, method, kwargs):
    ours, tl_cache, _ = caches
    same(getattr(ours, method)(**kwargs), getattr(tl_cache, method)(**kwargs), f"{method}({kwargs})")


def test_apply_ln_to_stack_and_logit_attrs_equal_transformer_lens(caches):
    ours, tl_cache, _ = caches
    stack = tl_cache.decompose_resid()
    for kwargs in ({}, dict(layer=1), dict(layer=0, mlp_input=True), dict(recompute_ln=True)):
        same(ours.apply_ln_to_stack(stack.numpy(), **kwargs), tl_cache.apply_ln_to_stack(stack, **kwargs), str(kwargs))
    answer, wrong = np.array([3, 50, 7]), np.array([9, 9, 120])
    last = tl_cache.decompose_resid(pos_slice=-1)
    same(ours.logit_attrs(last.numpy(), answer, pos_slice=-1),
         tl_cache.logit_attrs(last, torch.tensor(answer), pos_slice=-1), "logit_attrs")
    same(ours.logit_attrs(last.numpy(), answer, incorrect_tokens=wrong, pos_slice=-1),
         tl_cache.logit_attrs(last, torch.tensor(answer), incorrect_tokens=torch.tensor(wrong), pos_slice=-1),
         "logit difference attrs")
    heads = tl_cache.stack_head_results()
    same(ours.logit_attrs(heads.detach().numpy(), 5), tl_cache.logit_attrs(heads, 5), "one token over every position")
    with pytest.raises(ValueError, match="same shape"):
        ours.logit_attrs(last.numpy(), answer, incorrect_tokens=wrong[:2], pos_slice=-1)


def test_logit_lens_equals_transformer_lens(caches, jp_tiny, tl_tiny):
    ours, tl_cache, tokens = caches
    resid, labels = tl_cache.accumulated_resid(apply_ln=True, return_labels=True)
    expected = (resid @ tl_tiny.W_U + tl_tiny.b_U).detach()
    lens, our_labels = ours.logit_lens(return_labels=True)
    assert our_labels == labels == [f"{l}_pre" for l in range(L)] + ["final_post"]
    same(lens, expected, "logit lens")
    np.testing.assert_allclose(lens[-1], jp_tiny(tokens), atol=1e-4)  # the last entry is the model's logits
    same(ours.logit_lens(pos_slice=-1), expected[:, :, -1], "logit lens at the last position")
