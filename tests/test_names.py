"""One resolver for every spelling of a hook name: jpatch.utils.get_act_name against
TransformerLens's, the cache and overrides over the whole table of spellings."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformer_lens import utilities as tl_utils

import jpatch
import reference
from jpatch.model import sites
from jpatch.model.names import get_act_name

V = reference.TINY["vocab_size"]
L = reference.TINY["n_layer"]

GET_ACT_NAME_CASES = [
    ("k", 6, "a"), ("pre", 2), ("embed",), ("normalized", 27, "ln2"), ("k6",), ("scale4ln1",), ("pre5",),
    ("z", 0), ("resid_pre", 3), ("attn", 1), ("attn_logits", 2), ("key", 0), ("query", 1), ("value", 2),
    ("mlp_pre", 0), ("mlp_post", 1), ("scale",), ("normalized",), ("pattern",), ("resid_mid", 1, "b"),
    ("scale", 2, "ln1"), ("attn_out", 0), ("mlp_out", 11), ("result", 3), ("blocks.0.attn.hook_z",),
    ("hook_embed",), ("ln_final.hook_scale",), ("q", 2, "attention"), ("post", 1, "m"), ("attn_scores", 0),
]


@pytest.mark.parametrize("args", GET_ACT_NAME_CASES, ids=str)
def test_get_act_name_equals_transformer_lens(args):
    assert get_act_name(*args) == tl_utils.get_act_name(*args)


def shorthand(site, layer):
    """TransformerLens's shorthand for a site, as its cache's tuple key takes it."""
    prefix, hook = site.rsplit("hook_", 1)
    prefix = prefix.rstrip(".")
    if layer is None:
        return (hook,)
    return (hook, layer, prefix) if prefix in ("ln1", "ln2") else (hook, layer)


def spellings(site, layer):
    """Every spelling of (site, layer) that jpatch accepts."""
    full = sites.full_name(site, layer)
    out = [full, (site, layer) if layer is not None else (site,)]
    short = shorthand(site, layer)
    if layer is None:
        out += [site]
        if get_act_name(*short) == site:
            out += [short[0], short]
    else:
        out += [short, (short[0], layer - L, *short[2:])]  # negative layer
        if short[0].isalpha():  # TransformerLens's "z1", "scale1ln1" (not for names with "_")
            out += [f"{short[0]}{layer}{''.join(short[2:])}"]
    return out


ALL_NAMES = [(s, l) for s in sites.LAYER_SITES for l in range(L)] + [(s, None) for s in sites.GLOBAL_SITES]


def test_cache_answers_every_spelling_as_transformer_lens(jp_tiny, tl_tiny):
    tokens = reference.random_tokens(2, 5, V, seed=20)
    tl_tiny.set_use_attn_result(True)
    try:
        _, tl_cache = tl_tiny.run_with_cache(torch.tensor(tokens))
    finally:
        tl_tiny.set_use_attn_result(False)
    _, cache = jp_tiny.run_with_cache(tokens, names_filter=lambda name: True)
    checked = 0
    for site, layer in ALL_NAMES:
        full = sites.full_name(site, layer)
        assert sites.resolve(full) == (site, layer)
        expected = tl_cache[full].numpy()
        for spelling in spellings(site, layer):
            assert sites.resolve(spelling, L) == (site, layer), spelling
            got = np.asarray(cache[spelling])
            np.testing.assert_allclose(got, expected, atol=1e-4, err_msg=str(spelling))
            if not isinstance(spelling, str) or "." not in spelling or spelling == full:
                try:  # TransformerLens's cache takes the same key (a site without layer prefix is jpatch's)
                    theirs = tl_cache[spelling]
                except KeyError:
                    continue
                np.testing.assert_allclose(got, theirs.numpy(), atol=1e-4, err_msg=str(spelling))
                checked += 1
    assert checked > 3 * len(ALL_NAMES)


def test_full_name_builds_valid_keys():
    assert sites.full_name("z", 3) == "blocks.3.attn.hook_z"
    assert sites.full_name("blocks.0.attn.hook_z".split(".", 2)[2], 1) == "blocks.1.attn.hook_z"
    assert sites.full_name("resid_pre", 0) == "blocks.0.hook_resid_pre"
    assert sites.full_name("scale") == "ln_final.hook_scale"
    for site, layer in ALL_NAMES:
        assert sites.resolve(sites.full_name(site, layer)) == (site, layer)
    with pytest.raises(KeyError, match="no layer"):
        sites.full_name("hook_embed", 2)


def test_overrides_accept_every_spelling(jp_tiny):
    clean = reference.random_tokens(2, 6, V, seed=21)
    corrupt = reference.random_tokens(2, 6, V, seed=22)
    _, cache = jp_tiny.run_with_cache(clean)
    layer = 1
    value = cache["z", layer]
    # the all-layer form: a leading layer axis, masked to one layer
    stacked = jpatch.Override(cache.stacked("z"), jnp.arange(L)[:, None, None, None, None] == layer)
    expected = np.asarray(jp_tiny(corrupt, overrides={"attn.hook_z": stacked}))
    assert np.abs(expected - np.asarray(jp_tiny(corrupt))).max() > 1e-3
    for key in ("z", "attn.hook_z", ("z",)):
        np.testing.assert_allclose(jp_tiny(corrupt, overrides={key: stacked}), expected, atol=1e-6, err_msg=str(key))
    one_layer = jpatch.Override(value, True)
    for key in ("blocks.1.attn.hook_z", ("z", 1), ("z", -1), "z1", ("attn.hook_z", 1)):
        np.testing.assert_allclose(jp_tiny(corrupt, overrides={key: one_layer}), expected, atol=1e-6,
                                   err_msg=str(key))


def test_name_errors(jp_tiny):
    tokens = reference.random_tokens(1, 4, V)
    _, cache = jp_tiny.run_with_cache(tokens)
    with pytest.raises(KeyError, match="name the same site"):
        jp_tiny(tokens, overrides={"z": jpatch.Scale(jnp.ones(L)), "attn.hook_z": jpatch.Scale(jnp.ones(L))})
    with pytest.raises(KeyError, match="needs a layer"):
        cache["z"]
    with pytest.raises(KeyError, match="out of range"):
        cache["z", 2]
    with pytest.raises(KeyError, match="out of range"):
        cache["z", -3]
    with pytest.raises(KeyError, match="unknown site 'blocks.0.hook_z'"):
        cache["blocks.0.hook_z"]
    with pytest.raises(KeyError, match="names one layer"):
        sites.canonical("blocks.0.attn.hook_z")
