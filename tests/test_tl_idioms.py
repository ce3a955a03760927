"""TransformerLens 3.9 idioms that notebooks use beyond the patching API (issue 22 item 5): the
cache as a mapping, FactoredMatrix / model.OV / model.QK, sampling, run_with_cache's
stop_at_layer / remove_batch_dim, utils. Each against TransformerLens on the same weights."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jpatch.model.architecture import Cache

TOKENS = np.array([[5, 17, 3, 99, 140, 7, 60], [8, 1, 2, 3, 4, 5, 6]])


def close(a, b, atol=1e-4):
    b = b.detach().numpy() if isinstance(b, torch.Tensor) else np.asarray(b)
    np.testing.assert_allclose(np.asarray(a), b, atol=atol, rtol=1e-4)


@pytest.fixture(scope="module")
def caches(tl_tiny, jp_tiny):
    with torch.no_grad():
        _, tl_cache = tl_tiny.run_with_cache(torch.tensor(TOKENS))
    _, jp_cache = jp_tiny.run_with_cache(TOKENS)
    return tl_cache, jp_cache


def test_cache_is_a_mapping_like_activation_cache(caches):
    tl_cache, jp_cache = caches
    assert len(jp_cache) == len(tl_cache)
    assert list(jp_cache) == list(tl_cache)
    assert list(jp_cache.keys()) == list(tl_cache.keys())
    assert list(jp_cache.cache_dict) == list(tl_cache.cache_dict)
    for (name, value), tl_value in zip(jp_cache.items(), tl_cache.values()):
        close(value, tl_value)
    for name in tl_cache:
        close(jp_cache[name], tl_cache[name])
    assert "Cache with keys" in repr(jp_cache)


@pytest.mark.parametrize("key", [("pattern", 0, "attn"), ("pattern", 1), ("attn", 0), ("resid_pre", -1),
                                 ("scale", 1, "ln2"), ("normalized", 0, "ln1"), "pattern1", "blocks.1.hook_mlp_out"])
def test_cache_keys_as_transformer_lens_spells_them(caches, key):
    tl_cache, jp_cache = caches
    close(jp_cache[key], tl_cache[key])


@pytest.mark.parametrize("layer", [np.int64(1), np.int32(0), jnp.int32(1), torch.tensor(1)])
def test_cache_layer_of_any_integer_type(caches, layer):
    tl_cache, jp_cache = caches
    close(jp_cache["pattern", layer], tl_cache["pattern", int(layer)])
    close(jp_cache["resid_post", layer, None], tl_cache["resid_post", int(layer), None])
    with pytest.raises(KeyError, match="integer"):
        jp_cache["pattern", 1.5]


@pytest.mark.parametrize("name,layer,sub", [("resid_pre", -1, None), ("pattern", 1, "attn"), ("scale", 2, "ln1"),
                                            ("mlp_out", None, None)])
def test_stack_activation(caches, name, layer, sub):
    tl_cache, jp_cache = caches
    close(jp_cache.stack_activation(name, layer, sub), tl_cache.stack_activation(name, layer, sub))


def test_cache_from_dict_and_model(caches, jp_tiny, tl_tiny):
    from transformer_lens import ActivationCache

    tl_cache, _ = caches
    whole = Cache(dict(tl_cache.cache_dict), jp_tiny)  # torch tensors, every layer
    assert list(whole) == list(tl_cache)
    close(whole["z", 1], tl_cache["z", 1])
    close(whole.accumulated_resid(layer=-1), tl_cache.accumulated_resid(layer=-1))
    part = {k: v for k, v in tl_cache.items() if k.startswith("blocks.0.") or k == "hook_embed"}
    ours, theirs = Cache(part, jp_tiny), ActivationCache(part, tl_tiny)
    assert list(ours) == list(theirs) and len(ours) == len(theirs)
    close(ours["pattern", 0], theirs["pattern", 0])
    with pytest.raises(KeyError):
        theirs["pattern", 1]
    with pytest.raises(KeyError, match="not cached"):
        ours["pattern", 1]
    unbatched = Cache({"blocks.0.hook_resid_pre": tl_cache["resid_pre", 0][0]}, jp_tiny, False)
    assert not unbatched.has_batch_dim and unbatched["resid_pre", 0].shape == (TOKENS.shape[1], 64)
    with pytest.raises(KeyError, match="unknown site"):
        Cache({"blocks.0.attn.hook_nonsense": tl_cache["resid_pre", 0]}, jp_tiny)
    with pytest.raises(TypeError, match="jpatch model"):
        Cache({"hook_embed": tl_cache["hook_embed"]}, tl_tiny)


def test_run_with_cache_names_filter_function_keeps_those_names(tl_tiny, jp_tiny):
    want = lambda name: name in ("blocks.0.attn.hook_pattern", "hook_embed", "blocks.1.hook_resid_post")
    with torch.no_grad():
        _, tl_cache = tl_tiny.run_with_cache(torch.tensor(TOKENS), names_filter=want)
    _, jp_cache = jp_tiny.run_with_cache(TOKENS, names_filter=want)
    assert list(jp_cache) == list(tl_cache)
    for name in tl_cache:
        close(jp_cache[name], tl_cache[name])


@pytest.mark.parametrize("stop", [0, 1, 2, -1])
def test_run_with_cache_stop_at_layer(tl_tiny, jp_tiny, stop):
    with torch.no_grad():
        tl_out, tl_cache = tl_tiny.run_with_cache(torch.tensor(TOKENS), stop_at_layer=stop)
    jp_out, jp_cache = jp_tiny.run_with_cache(TOKENS, stop_at_layer=stop)
    close(jp_out, tl_out)
    assert list(jp_cache) == list(tl_cache)
    for name in tl_cache:
        close(jp_cache[name], tl_cache[name])


def test_run_with_cache_remove_batch_dim(tl_tiny, jp_tiny):
    with torch.no_grad():
        tl_logits, tl_cache = tl_tiny.run_with_cache(torch.tensor(TOKENS[:1]), remove_batch_dim=True)
    jp_logits, jp_cache = jp_tiny.run_with_cache(TOKENS[:1], remove_batch_dim=True)
    close(jp_logits, tl_logits)
    assert list(jp_cache) == list(tl_cache) and not jp_cache.has_batch_dim
    for name in tl_cache:
        close(jp_cache[name], tl_cache[name])
    close(jp_cache.stack_activation("resid_post"), tl_cache.stack_activation("resid_post"))
    with pytest.raises(ValueError, match="batch axis"):
        jp_cache.accumulated_resid()
    with pytest.raises(ValueError, match="batch size"):
        jp_tiny.run_with_cache(TOKENS, remove_batch_dim=True)
