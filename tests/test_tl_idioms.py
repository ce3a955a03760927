"""TransformerLens 3.9 idioms that notebooks use beyond the patching API (issue 22 item 5): the
cache as a mapping, FactoredMatrix / model.OV / model.QK, sampling, run_with_cache's
stop_at_layer / remove_batch_dim, utils. Each against TransformerLens on the same weights."""

import jax.numpy as jnp
import numpy as np

import jpatch
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
    whole = jpatch.ActivationCache(dict(tl_cache.cache_dict), jp_tiny)  # torch tensors, every layer
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


# --- FactoredMatrix, model.OV / model.QK ------------------------------------------------------


def sorted_eig(values):
    values = np.asarray(values.detach().numpy() if isinstance(values, torch.Tensor) else values)
    return np.sort(np.abs(values), axis=-1), np.sort(values.real, axis=-1)


@pytest.mark.parametrize("circuit", ["OV", "QK"])
def test_ov_qk_factored_matrices(tl_tiny, jp_tiny, circuit):
    ours, theirs = getattr(jp_tiny, circuit), getattr(tl_tiny, circuit)
    assert ours.shape == tuple(theirs.shape) and ours.ndim == theirs.ndim and ours.mdim == theirs.mdim
    assert repr(ours) == "FactoredMatrix: Shape((2, 4, 64, 64)), Hidden Dim(16)"
    close(ours.AB, theirs.AB)
    close(ours.BA, theirs.BA)
    close(ours.T.AB, theirs.T.AB)
    close(ours.transpose(-2, -1).AB, theirs.AB.transpose(-2, -1))
    close(ours.S, theirs.S)
    close(ours.norm(), theirs.norm())
    U, S, V = ours.svd()
    close(U @ (S[..., None] * jnp.swapaxes(V, -1, -2)), theirs.AB)
    close(jnp.abs(U.swapaxes(-1, -2) @ np.asarray(theirs.U.detach())), np.eye(16) + 0 * S[..., None], atol=2e-3)
    for a, b in zip(sorted_eig(ours.eigenvalues), sorted_eig(theirs.eigenvalues)):
        close(a, b, atol=1e-3)
    close(ours.make_even().AB, theirs.make_even().AB)
    assert ours.collapse_l().shape == tuple(theirs.collapse_l().shape)  # singular vectors: up to sign
    close(jnp.abs(ours.collapse_l()), theirs.collapse_l().abs(), atol=1e-3)
    close(jnp.abs(ours.collapse_r()), theirs.collapse_r().abs(), atol=1e-3)
    close(ours.get_corner(2), theirs.get_corner(2))
    close(ours.unsqueeze(0).AB, theirs.unsqueeze(0).AB)
    for idx in [1, (1, 2), (0, 3, 5), (0, 3, 5, 7), (1, 2, slice(3, 9)), (-1, -1, -1, -1), (0, slice(1, 3))]:
        got, want = ours[idx], theirs[idx]
        assert got.shape == tuple(want.shape), idx
        close(got.AB, want.AB)
    head = ours[np.int64(1), np.int64(2)]
    close(head.AB, theirs[1, 2].AB)


def test_factored_matrix_products(tl_tiny, jp_tiny):
    from transformer_lens import FactoredMatrix as TLFactored

    from jpatch import FactoredMatrix  # the top-level name, as TransformerLens exports it

    rng = np.random.default_rng(0)
    A, B = rng.normal(size=(3, 10, 4)).astype(np.float32), rng.normal(size=(4, 7)).astype(np.float32)
    ours, theirs = FactoredMatrix(A, B), TLFactored(torch.tensor(A), torch.tensor(B))
    assert ours.shape == tuple(theirs.shape)
    M, v, L = (rng.normal(size=s).astype(np.float32) for s in [(7, 12), (7,), (5, 10)])
    C, D = M[:, :3], L[:3, :3]
    for a, b in [(ours @ M, theirs @ torch.tensor(M)), (L @ ours, torch.tensor(L) @ theirs),
                 (ours @ ours.T, theirs @ theirs.T), (ours * 2.5, theirs * 2.5), (3 * ours, 3 * theirs),
                 (ours @ FactoredMatrix(C, D), theirs @ TLFactored(torch.tensor(C), torch.tensor(D)))]:
        assert a.shape == tuple(b.shape)
        close(a.AB, b.AB)
    close(ours @ v, theirs @ torch.tensor(v))
    w = rng.normal(size=10).astype(np.float32)
    close(w @ ours, torch.tensor(w) @ theirs)
    with pytest.raises(ValueError, match="inner dimension"):
        FactoredMatrix(A, B.T)
    with pytest.raises(ValueError, match="inner dimension"):
        ours @ L
    with pytest.raises(ValueError, match="ldim == rdim"):
        ours.BA


def test_jax_array_times_factored_matrix(jp_tiny):
    x = jnp.ones((3, 64))
    close((x @ jp_tiny.OV[0, 1]).AB, x @ jp_tiny.OV.AB[0, 1])


# --- generate: fresh samples unless seeded, verbose / use_past_kv_cache / return_type ------------


def test_sampling_differs_between_calls_unless_seeded(tl_tiny, jp_tiny):
    prompt = TOKENS[:1, :3]
    kw = dict(max_new_tokens=12, stop_at_eos=False, temperature=3.0)
    with torch.no_grad():  # TransformerLens: torch's global generator moves on between calls
        tl_a, tl_b = (tl_tiny.generate(torch.tensor(prompt), verbose=False, **kw) for _ in range(2))
    assert not torch.equal(tl_a, tl_b)
    jp_a, jp_b = (np.asarray(jp_tiny.generate(prompt, verbose=False, **kw)) for _ in range(2))
    assert not np.array_equal(jp_a, jp_b)
    seeded = [np.asarray(jp_tiny.generate(prompt, seed=np.int64(7), **kw)) for _ in range(2)]
    assert np.array_equal(*seeded)
    with pytest.raises(TypeError, match="seed"):
        jp_tiny.generate(prompt, seed=1.5, **kw)


@pytest.mark.parametrize("use_past_kv_cache", [True, False])
def test_generate_accepts_verbose_and_use_past_kv_cache(tl_tiny, jp_tiny, use_past_kv_cache):
    """Both settings give TransformerLens's uncached greedy tokens (equal to transformers'). On this
    tiny model TransformerLens 3.9's own use_past_kv_cache=True loop departs from them (prompt
    [5, 17, 3, 99]: 174, 174, ... where its uncached loop and transformers give 174, 14, ...)."""
    prompt = TOKENS[:, :4]
    kw = dict(max_new_tokens=6, do_sample=False, stop_at_eos=False, use_past_kv_cache=use_past_kv_cache)
    with torch.no_grad():
        want = tl_tiny.generate(torch.tensor(prompt), verbose=False, return_type="tokens",
                                **{**kw, "use_past_kv_cache": False})
    for verbose in (True, False):
        close(jp_tiny.generate(prompt, verbose=verbose, return_type="tokens", **kw), want, atol=0)
    with pytest.raises(ValueError, match="top_p"):
        jp_tiny.generate(prompt, top_p=1.5)
    with pytest.raises(ValueError, match="freq_penalty"):
        jp_tiny.generate(prompt, freq_penalty=-1.0)
    with pytest.raises(ValueError, match="return_type"):
        jp_tiny.generate(prompt, return_type="embeds")


@pytest.mark.parametrize("kw", [dict(top_p=0.9), dict(top_p=0.3, temperature=0.7), dict(freq_penalty=1.5, top_k=5),
                                dict(freq_penalty=0.5, top_p=0.8), dict(top_k=3, top_p=0.5)])
def test_sampling_logits_are_transformer_lens_sample_logits(kw):
    """What jpatch samples from (top_k, else top_p; freq_penalty on the counts of the tokens so far)
    equals the logits TransformerLens's sample_logits hands to torch's Categorical."""
    from unittest import mock

    from transformer_lens.utilities import logits_utils

    from jpatch.model.generate import sampling_logits

    rng = np.random.default_rng(0)
    logits, tokens = 3 * rng.normal(size=(3, 211)).astype(np.float32), rng.integers(0, 211, (3, 9))
    seen = {}

    class Categorical:
        def __init__(self, logits):
            seen["logits"] = logits.numpy()

        def sample(self):
            return torch.zeros(3, dtype=torch.long)

    with mock.patch("torch.distributions.categorical.Categorical", Categorical):
        logits_utils.sample_logits(torch.tensor(logits), tokens=torch.tensor(tokens), **kw)
    counts = np.stack([np.bincount(t, minlength=211) for t in tokens]).astype(np.float32)
    ours = np.asarray(sampling_logits(jnp.asarray(logits), kw.get("temperature", 1.0), kw.get("top_k"),
                                      kw.get("top_p"), kw.get("freq_penalty", 0.0), jnp.asarray(counts)))
    theirs = seen["logits"]
    assert np.array_equal(np.isinf(ours), np.isinf(theirs)) and np.isinf(theirs).any()
    close(np.where(np.isinf(ours), 0, ours), np.where(np.isinf(theirs), 0, theirs), atol=1e-5)


def test_generate_with_freq_penalty(tl_tiny, jp_tiny):
    """A deterministic case end to end: top_k=1 after the frequency penalty picks the penalized argmax, as
    TransformerLens's (uncached) loop; top_p is checked above, where it acts (sampling_logits)."""
    prompt = torch.tensor(TOKENS[:1, :4])
    tl_generate = lambda **kw: tl_tiny.generate(prompt, verbose=False, use_past_kv_cache=False, max_new_tokens=8,
                                                stop_at_eos=False, **kw)
    with torch.no_grad():
        greedy = tl_generate(do_sample=False)
        want = tl_generate(top_k=1, freq_penalty=2.0)
    assert not torch.equal(want, greedy)  # the penalty changes the tokens
    close(jp_tiny.generate(prompt.numpy(), max_new_tokens=8, stop_at_eos=False, top_k=1, freq_penalty=2.0), want,
          atol=0)


# --- module paths to weights and hook points, model(..., stop_at_layer) ------------------------


def test_block_module_paths(tl_tiny, jp_tiny):
    for l in (0, 1, -1):
        for part, names in [("attn", ["W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O"]),
                            ("mlp", ["W_in", "b_in", "W_out", "b_out"]), ("ln1", ["w", "b"]), ("ln2", ["w", "b"])]:
            for name in names:
                ours = getattr(getattr(jp_tiny.blocks[l], part), name)
                theirs = getattr(getattr(tl_tiny.blocks[l], part), name)
                assert ours.shape == tuple(theirs.shape), (l, part, name)
                close(ours, theirs, atol=1e-6)
        close(jp_tiny.blocks[l].attn.OV.AB, tl_tiny.blocks[l].attn.OV.AB)
    for ours, theirs in [(jp_tiny.embed.W_E, tl_tiny.embed.W_E), (jp_tiny.pos_embed.W_pos, tl_tiny.pos_embed.W_pos),
                         (jp_tiny.unembed.W_U, tl_tiny.unembed.W_U), (jp_tiny.unembed.b_U, tl_tiny.unembed.b_U),
                         (jp_tiny.ln_final.w, tl_tiny.ln_final.w), (jp_tiny.ln_final.b, tl_tiny.ln_final.b)]:
        assert ours.shape == tuple(theirs.shape)
        close(ours, theirs, atol=1e-6)
    assert hasattr(jp_tiny.blocks[0].attn, "hook_result") and not hasattr(jp_tiny.blocks[0].attn, "hook_nothing")
    with pytest.raises(IndexError, match="out of range"):
        jp_tiny.blocks[2]
    with pytest.raises(AttributeError, match="W_Q"):
        jp_tiny.blocks[0].mlp.W_Q
    stacked = jp_tiny.blocks
    jp_tiny.wte  # another attribute read does not unlink them
    close(stacked[1].attn.W_Q, tl_tiny.blocks[1].attn.W_Q)


def test_block_hook_points_add_hook(tl_tiny, jp_tiny):
    halve = lambda z, hook: z * 0.5
    tokens = torch.tensor(TOKENS)
    try:
        jp_tiny.blocks[1].attn.hook_z.add_hook(halve)
        tl_tiny.blocks[1].attn.hook_z.add_hook(halve)
        jp_tiny.blocks[0].hook_resid_post.add_hook(halve)
        tl_tiny.blocks[0].hook_resid_post.add_hook(halve)
        with torch.no_grad():
            want = tl_tiny(tokens)
        close(jp_tiny(TOKENS), want)
        jp_tiny.blocks[0].hook_resid_post.remove_hooks()
        tl_tiny.blocks[0].hook_resid_post.remove_hooks()
        with torch.no_grad():
            want = tl_tiny(tokens)
        close(jp_tiny(TOKENS), want)
    finally:
        jp_tiny.reset_hooks()
        tl_tiny.reset_hooks()


@pytest.mark.parametrize("stop", [0, 1, -1])
def test_model_call_stop_at_layer(tl_tiny, jp_tiny, stop):
    with torch.no_grad():
        want = tl_tiny(torch.tensor(TOKENS), stop_at_layer=stop)
    close(jp_tiny(TOKENS, stop_at_layer=stop), want)
    with pytest.raises(ValueError, match="return_type"):
        jp_tiny(TOKENS, stop_at_layer=stop, return_type="loss")


# --- utils and text helpers on a model with GPT-2's vocabulary ---------------------------------


@pytest.fixture(scope="module")
def gpt2_vocab(one_torch_thread):
    """A small random GPT-2 over GPT-2's vocabulary, as TransformerLens (GPT-2's tokenizer) and jpatch."""
    import reference
    from jpatch.model.convert import config_from_hf, from_hf_state_dict
    from test_front import hf_gpt2_tokenizer

    hf = reference.hf_model(seed=3, vocab_size=50257, n_embd=32, n_head=2, n_positions=48)
    hf.config.bos_token_id = hf.config.eos_token_id = 50256
    tl = reference.tl_model(hf)
    tl.set_tokenizer(hf_gpt2_tokenizer(), default_padding_side="right")
    tl.cfg.default_prepend_bos = True
    return tl, from_hf_state_dict(reference.hf_state_dict(hf), config_from_hf(hf.config))


def test_utils_to_numpy_and_get_device(jp_tiny):
    import jax
    from transformer_lens import utils as tl_utils

    from jpatch import utils

    for x in [torch.arange(6.0).reshape(2, 3), torch.ones(3, dtype=torch.bfloat16), [1, 2], (1.5, 2.5), 3, 2.0, True,
              "a", np.arange(4)]:
        ours, theirs = utils.to_numpy(x), tl_utils.to_numpy(x)
        assert type(ours) is np.ndarray and ours.dtype == theirs.dtype and np.array_equal(ours, theirs)
    assert np.array_equal(utils.to_numpy(jp_tiny.W_E), tl_utils.to_numpy(torch.tensor(np.asarray(jp_tiny.W_E))))
    with pytest.raises(ValueError, match="invalid type"):
        utils.to_numpy(object())
    assert utils.get_device() == jax.devices()[0]


@pytest.mark.parametrize("answer", ["store", " the store", ["store", " house", "bank"]])
def test_test_prompt_prints_what_transformer_lens_prints(gpt2_vocab, capsys, answer):
    from transformer_lens import utils as tl_utils

    from jpatch import utils

    tl, jp = gpt2_vocab
    with torch.no_grad():
        tl_utils.test_prompt("When John and Mary went to the", answer, tl, top_k=4)
    theirs = capsys.readouterr().out
    utils.test_prompt("When John and Mary went to the", answer, jp, top_k=4)
    ours = capsys.readouterr().out
    assert ours.split() == theirs.split()


@pytest.mark.parametrize("mode", ["first", "last"])
@pytest.mark.parametrize("prepend_bos", [True, False])
def test_get_token_position(gpt2_vocab, mode, prepend_bos):
    tl, jp = gpt2_vocab
    text = "When John and Mary went to the store, John gave a drink to"
    for token in [" John", " Mary", jp.to_single_token(" to")]:
        want = tl.get_token_position(token, text, mode=mode, prepend_bos=prepend_bos)
        assert jp.get_token_position(token, text, mode=mode, prepend_bos=prepend_bos) == want
        tokens = tl.to_tokens(text, prepend_bos=prepend_bos)
        assert jp.get_token_position(token, np.asarray(tokens), mode=mode) == want
        assert jp.get_token_position(token, np.asarray(tokens)[0], mode=mode) == want
    with pytest.raises(ValueError, match="does not occur"):
        jp.get_token_position(" Paris", text)
    with pytest.raises(ValueError, match="mode"):
        jp.get_token_position(" John", text, mode="middle")


@pytest.mark.parametrize("side", ["right", "left"])
def test_to_tokens_of_texts_of_different_lengths(gpt2_vocab, side):
    """The same tokens, pad token, side and attention mask as TransformerLens, and the same numbers at
    every real position; jpatch returns the mask beside the tokens, and refuses the pair where a
    notebook passes it on as tokens."""
    from transformer_lens.utilities import get_attention_mask

    tl, jp = gpt2_vocab
    texts = ["When John and Mary went to the store,", "Hi", "The Eiffel Tower is in"]
    # utils.get_attention_mask reads the side from the tokenizer
    tl.tokenizer.padding_side = side
    try:
        tl_tokens = tl.to_tokens(texts, padding_side=side)
        tl_mask = get_attention_mask(tl.tokenizer, tl_tokens, True)
        with torch.no_grad():
            want = tl(texts, padding_side=side).numpy()
    finally:
        tl.tokenizer.padding_side = "right"
    tokens, mask = jp.to_tokens(texts, padding_side=side)
    close(tokens, tl_tokens, atol=0)
    close(mask, tl_mask, atol=0)
    got = np.asarray(jp(tokens, attention_mask=mask))
    real = np.asarray(mask).astype(bool)
    close(got[real], want[real])
    if side == "right":
        close(np.asarray(jp(texts))[real], want[real])
    with pytest.raises(TypeError, match="unpack it"):
        jp(jp.to_tokens(texts, padding_side=side))


def test_named_parameters(tl_tiny, jp_tiny):
    theirs = list(tl_tiny.named_parameters())
    ours = jp_tiny.named_parameters()
    assert [name for name, _ in ours] == [name for name, _ in theirs]
    for (_, a), (_, b) in zip(ours, theirs):
        assert a.shape == tuple(b.shape)
        close(a, b, atol=1e-6)


def test_einops_on_jpatch_arrays(caches):
    """einops takes JAX arrays (fancy_einsum does not: write einops.einsum or jnp.einsum)."""
    import einops

    tl_cache, jp_cache = caches
    close(einops.rearrange(jp_cache["z", 0], "b p h d -> b p (h d)"),
          einops.rearrange(tl_cache["z", 0], "b p h d -> b p (h d)"))
    close(einops.einsum(jp_cache["z", 1], jp_cache["z", 1], "b p h d, b q h d -> b h p q"),
          einops.einsum(tl_cache["z", 1], tl_cache["z", 1], "b p h d, b q h d -> b h p q"))
    close(einops.reduce(jp_cache["pattern", 0], "b h q k -> h q", "sum"),
          einops.reduce(tl_cache["pattern", 0], "b h q k -> h q", "sum"))


def test_fancy_einsum_rejects_jax_arrays_as_the_readme_says():
    """README's porting table says to replace fancy_einsum.einsum by einops.einsum: it refuses JAX arrays."""
    fancy_einsum = pytest.importorskip("fancy_einsum")
    with pytest.raises(RuntimeError, match="Tensor type unknown"):
        fancy_einsum.einsum("a b, a b -> a", jnp.ones((2, 3)), jnp.ones((2, 3)))


@pytest.mark.parametrize("batch_slice", [1, -1, slice(0, 1), (0, 2), [1, 0], np.array([1]), None])
def test_apply_slice_to_batch_dim_and_to(caches, batch_slice):
    tl_cache, jp_cache = caches
    theirs = tl_cache.apply_slice_to_batch_dim(batch_slice)
    ours = jp_cache.apply_slice_to_batch_dim(batch_slice)
    assert ours.has_batch_dim == theirs.has_batch_dim
    assert list(ours) == list(theirs)
    for name in theirs:
        close(ours[name], theirs[name])
    moved = ours.to("cpu")
    close(moved["resid_post", 1], theirs["resid_post", 1])


def test_neox_named_parameters_ov_qk_and_cache_keys(one_torch_thread):
    """The same idioms on a GPT-NeoX model (rotary, parallel attention and MLP)."""
    import reference
    from jpatch.model.neox_hf import config_from_hf, from_hf_state_dict

    hf = reference.neox_hf_model(seed=3)
    tl = reference.neox_tl_model(hf)
    jp = from_hf_state_dict(reference.hf_state_dict(hf), config_from_hf(hf.config.to_dict()))
    theirs = list(tl.named_parameters())
    assert [n for n, _ in jp.named_parameters()] == [n for n, _ in theirs]
    for (_, a), (_, b) in zip(jp.named_parameters(), theirs):
        close(a, b, atol=1e-6)
    for name in ("W_Q", "W_O", "b_V"):
        close(getattr(jp.blocks[2].attn, name), getattr(tl.blocks[2].attn, name), atol=1e-6)
    close(jp.blocks[1].mlp.W_in, tl.blocks[1].mlp.W_in, atol=1e-6)
    close(jp.embed.W_E, tl.embed.W_E, atol=1e-6)
    close(jp.unembed.W_U, tl.unembed.W_U, atol=1e-6)
    for circuit in ("OV", "QK"):
        close(getattr(jp, circuit)[1, 0].AB, getattr(tl, circuit)[1, 0].AB)
        close(getattr(jp, circuit).S, getattr(tl, circuit).S)
    tokens = TOKENS % jp.config.d_vocab
    with torch.no_grad():
        _, tl_cache = tl.run_with_cache(torch.tensor(tokens), stop_at_layer=1)
    _, jp_cache = jp.run_with_cache(tokens, stop_at_layer=1)
    assert list(jp_cache) == list(tl_cache)
    for name in tl_cache:
        close(jp_cache[name], tl_cache[name])
