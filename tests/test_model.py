"""jpatch's GPT-2 forward against Hugging Face and TransformerLens: caches, padding,
logits_at, overrides (vmapped under one jit) and input errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import reference
from family_reference import assert_close
from jpatch.model import sites
from jpatch.model.gpt2 import Override, override_from_cache

V = reference.TINY["vocab_size"]


# --- cache parity -----------------------------------------------------------------------


def test_cache_matches_transformer_lens(jp_tiny, tl_tiny):
    tokens = reference.random_tokens(2, 9, V, seed=1)
    logits, cache = jp_tiny.run_with_cache(tokens)
    tl_logits, tl_cache = tl_tiny.run_with_cache(torch.tensor(tokens))
    L = jp_tiny.config.n_layer
    # every hook point of TransformerLens's GPT-2 (attn.hook_result only when asked: below)
    assert set(cache.keys()) == set(tl_cache.keys())
    assert set(cache.keys()) == {sites.full_name(s, l) for s in sites.LAYER_SITES if s != "attn.hook_result"
                                 for l in range(L)} | set(sites.GLOBAL_SITES)
    for name in cache.keys():
        assert_close(cache[name], tl_cache[name].numpy(), what=name)
    assert_close(logits, tl_logits.detach().numpy(), what="logits")
    # shapes follow TransformerLens: [batch, pos, head, d_head] and [batch, head, query, key]
    assert cache["blocks.0.attn.hook_z"].shape == (2, 9, 4, 16)
    assert cache["blocks.1.attn.hook_pattern"].shape == (2, 4, 9, 9)
    assert cache.stacked("resid_pre").shape == (L, 2, 9, 64)


def test_per_head_result_and_names_filter_match_transformer_lens(jp_tiny, tl_tiny):
    tokens = reference.random_tokens(2, 6, V, seed=3)
    tl_tiny.set_use_attn_result(True)
    try:
        _, tl_cache = tl_tiny.run_with_cache(torch.tensor(tokens))
    finally:
        tl_tiny.set_use_attn_result(False)
    _, cache = jp_tiny.run_with_cache(tokens, names_filter=["result", "blocks.1.ln2.hook_scale"])
    assert set(cache.stacks) == {"attn.hook_result", "ln2.hook_scale"}  # nothing else kept
    for l in range(jp_tiny.config.n_layer):
        assert_close(cache["result", l], tl_cache[f"blocks.{l}.attn.hook_result"].numpy(), what=f"result {l}")
        assert_close(cache[f"blocks.{l}.ln2.hook_scale"], tl_cache[f"blocks.{l}.ln2.hook_scale"].numpy())
    assert cache["result", 0].shape == (2, 6, 4, 64)
    # a TransformerLens-style filter function on full names
    _, cache = jp_tiny.run_with_cache(tokens, names_filter=lambda name: name.endswith("hook_pattern"))
    assert list(cache.keys()) == ["blocks.0.attn.hook_pattern", "blocks.1.attn.hook_pattern"]
    _, cache = jp_tiny.run_with_cache(tokens, names_filter=lambda name: name == "blocks.1.mlp.hook_post")
    assert set(cache.stacks) == {"mlp.hook_post"}  # kept at every layer: a site is one stacked array
    with pytest.raises(KeyError, match="only when asked"):
        jp_tiny.run_with_cache(tokens)[1]["blocks.0.attn.hook_result"]


def test_logits_match_hugging_face(jp_tiny, hf_tiny):
    tokens = reference.random_tokens(3, 12, V, seed=2)
    assert_close(jp_tiny(tokens), reference.hf_logits(hf_tiny, tokens), what="logits")


# --- padding and logits_at ----------------------------------------------------------------

PROMPT_LENGTHS = (5, 8, 3)


def padded_batch(side, pad_id=7):
    prompts = [reference.random_tokens(1, n, V, seed=10 + i)[0] for i, n in enumerate(PROMPT_LENGTHS)]
    T = max(PROMPT_LENGTHS)
    tokens = np.full((len(prompts), T), pad_id)
    mask = np.zeros((len(prompts), T), int)
    spans = []
    for b, p in enumerate(prompts):
        start = T - len(p) if side == "left" else 0
        tokens[b, start : start + len(p)] = p
        mask[b, start : start + len(p)] = 1
        spans.append(slice(start, start + len(p)))
    return prompts, tokens, mask, spans


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_matches_unpadded_prompts(jp_tiny, hf_tiny, side):
    prompts, tokens, mask, spans = padded_batch(side)
    logits = np.asarray(jp_tiny(tokens, attention_mask=mask))
    assert np.isfinite(logits).all()
    for b, prompt in enumerate(prompts):
        alone = np.asarray(jp_tiny(prompt[None]))[0]
        assert_close(logits[b, spans[b]], alone, what=f"{side} padded prompt {b} vs jpatch alone")
        assert_close(logits[b, spans[b]], reference.hf_logits(hf_tiny, prompt[None])[0], what=f"prompt {b} vs HF")


def test_padding_matches_hugging_face_with_position_ids(jp_tiny, hf_tiny):
    _, tokens, mask, spans = padded_batch("left")
    position_ids = np.maximum(np.cumsum(mask, 1) - 1, 0)
    with torch.no_grad():
        hf = hf_tiny(
            torch.tensor(tokens), attention_mask=torch.tensor(mask), position_ids=torch.tensor(position_ids)
        ).logits.numpy()
    logits = np.asarray(jp_tiny(tokens, attention_mask=mask))
    for b, span in enumerate(spans):
        assert_close(logits[b, span], hf[b, span], what=f"prompt {b}")


def test_logits_at_equals_gathered_full_logits(jp_tiny):
    tokens = reference.random_tokens(2, 8, V, seed=3)
    at = np.array([[0, 7, 3], [5, 5, 1]])
    full = np.asarray(jp_tiny(tokens))
    assert_close(jp_tiny(tokens, logits_at=at), np.take_along_axis(full, at[..., None], 1), tol=1e-6)
    # with right padding, the last real token of each prompt
    _, padded, mask, spans = padded_batch("right")
    last = np.array([[s.stop - 1] for s in spans])
    full = np.asarray(jp_tiny(padded, attention_mask=mask))
    got = jp_tiny(padded, attention_mask=mask, logits_at=last)
    assert got.shape == (3, 1, V)
    assert_close(got, np.take_along_axis(full, last[..., None], 1), tol=1e-6)


# --- overrides ---------------------------------------------------------------------------

# (site, layers, positions, heads): six patches of four different sites.
PATCHES = [
    ("hook_resid_pre", [0], [2], None),
    ("hook_resid_pre", [1], [0, 4], None),
    ("hook_resid_pre", [1], [6], None),
    ("attn.hook_z", [1], [3], [2]),
    ("attn.hook_pattern", [0], [5], [1]),
    ("hook_mlp_out", [0], [1, 3], None),
]


def tl_patch_hooks(site, layers, positions, heads, tl_clean_cache):
    """TransformerLens hooks writing the clean activation at the same place (the independent reference)."""

    def make_hook(clean):
        def hook(act, hook):
            act = act.clone()
            for p in positions:
                if site == "attn.hook_pattern":  # [batch, head, query, key]
                    for h in heads:
                        act[:, h, p, :] = clean[:, h, p, :]
                elif heads is not None:  # [batch, pos, head, d_head]
                    for h in heads:
                        act[:, p, h, :] = clean[:, p, h, :]
                else:  # [batch, pos, d_model]
                    act[:, p] = clean[:, p]
            return act

        return hook

    return [(f"blocks.{l}.{site}", make_hook(tl_clean_cache[f"blocks.{l}.{site}"])) for l in layers]


def test_vmapped_overrides_match_separate_runs_and_transformer_lens(jp_tiny, tl_tiny):
    clean = reference.random_tokens(2, 7, V, seed=4)
    corrupt = reference.random_tokens(2, 7, V, seed=5)
    _, cache = jp_tiny.run_with_cache(clean)
    single = [override_from_cache(cache, s, layers=l, positions=p, heads=h) for s, l, p, h in PATCHES]
    used = sorted({s for s, *_ in PATCHES})
    values = {s: cache.stacked(s) for s in used}
    # one dict per patch over all used sites (all-False masks elsewhere), stacked along a patch axis
    masks = {
        s: jnp.stack([ov.mask if ps == s else jnp.zeros(values[s].shape, bool) for (ps, *_), ov in zip(PATCHES, single)])
        for s in used
    }
    traces = []

    @jax.jit
    def sweep(model, masks):
        traces.append(1)
        run = lambda m: model(corrupt, overrides={s: Override(values[s], m[s]) for s in used})
        return jax.vmap(run)(masks)

    swept = np.asarray(sweep(jp_tiny, masks))
    assert swept.shape == (len(PATCHES), 2, 7, V) and len(traces) == 1

    unpatched = np.asarray(jp_tiny(corrupt))
    _, tl_clean_cache = tl_tiny.run_with_cache(torch.tensor(clean))
    for i, ((site, layers, positions, heads), ov) in enumerate(zip(PATCHES, single)):
        separate = np.asarray(jp_tiny(corrupt, overrides={site: ov}))
        assert_close(swept[i], separate, what=f"patch {i} vmapped vs separate")
        with torch.no_grad():
            tl = tl_tiny.run_with_hooks(
                torch.tensor(corrupt), fwd_hooks=tl_patch_hooks(site, layers, positions, heads, tl_clean_cache)
            ).numpy()
        assert_close(swept[i], tl, what=f"patch {i} ({site}) vs TransformerLens")
        assert np.abs(swept[i] - unpatched).max() > 1e-3, f"patch {i} changed nothing"


def test_override_everything_reproduces_clean_run(jp_tiny):
    clean = reference.random_tokens(2, 6, V, seed=6)
    corrupt = reference.random_tokens(2, 6, V, seed=7)
    clean_logits, cache = jp_tiny.run_with_cache(clean)
    patched = jp_tiny(corrupt, overrides={"hook_resid_pre": override_from_cache(cache, "resid_pre", layers=[0])})
    assert_close(patched, clean_logits, what="resid_pre at layer 0, every position")


# --- errors ------------------------------------------------------------------------------


def test_token_out_of_vocabulary(jp_tiny):
    with pytest.raises(ValueError, match=rf"token id {V}\b.*\[0, {V}\)"):
        jp_tiny(np.array([[1, 2, V]]))
    with pytest.raises(ValueError, match="token id -1"):
        jp_tiny(np.array([[-1, 2]]))


def test_sequence_longer_than_n_ctx(jp_tiny):
    n_ctx = jp_tiny.config.n_ctx
    with pytest.raises(ValueError, match=rf"length {n_ctx + 1} exceeds .*n_ctx={n_ctx}"):
        jp_tiny(np.zeros((1, n_ctx + 1), int))


def test_tokens_1d_or_2d(jp_tiny, hf_tiny):
    tokens = reference.random_tokens(1, 5, V, seed=8)
    assert_close(jp_tiny(tokens[0]), reference.hf_logits(hf_tiny, tokens), what="1-D tokens")
    with pytest.raises(ValueError, match=r"\[batch, pos\].*\(1, 1, 5\)"):
        jp_tiny(tokens[None])


def test_unknown_site_names(jp_tiny):
    _, cache = jp_tiny.run_with_cache(reference.random_tokens(1, 4, V))
    for name in ("blocks.0.hook_resid", "hook_resid", "blocks.0.attn.hook_zz"):
        with pytest.raises(KeyError, match="valid sites: hook_resid_pre, .*hook_resid_mid"):
            cache[name]
    with pytest.raises(KeyError, match="valid sites: .*attn.hook_pattern"):
        override_from_cache(cache, "resid")
    with pytest.raises(KeyError, match="out of range"):
        cache["blocks.2.hook_resid_pre"]


def test_override_shape_mismatch_names_the_site(jp_tiny):
    tokens = reference.random_tokens(1, 4, V)
    _, cache = jp_tiny.run_with_cache(tokens)
    L = jp_tiny.config.n_layer
    wrong = Override(jnp.zeros((L, 1, 4, 32)), jnp.ones((L, 1, 4, 32), bool))
    with pytest.raises(ValueError, match="hook_mlp_out"):
        jp_tiny(tokens, overrides={"hook_mlp_out": wrong})
    no_layer_axis = Override(cache["blocks.0.attn.hook_z"], jnp.ones((1, 4, 4, 16), bool))
    with pytest.raises(ValueError, match="attn.hook_z.*n_layer"):
        jp_tiny(tokens, overrides={"attn.hook_z": no_layer_axis})
    # an override built from a different prompt length
    longer = jp_tiny.run_with_cache(reference.random_tokens(1, 6, V))[1]
    with pytest.raises(ValueError, match="hook_resid_post"):
        jp_tiny(tokens, overrides={"hook_resid_post": override_from_cache(longer, "resid_post", layers=[1])})
