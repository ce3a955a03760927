"""TransformerLens's weight processing (fold_ln, center_writing_weights, center_unembed,
fold_value_biases) against TransformerLens 3.9's own `load_and_process_state_dict` on the same
random weights (biases and norms perturbed so that every step moves something): the processed
weights, logits and every activation a notebook reads, for GPT-2 and GPT-NeoX."""

import numpy as np
import pytest
import torch

import jpatch
import reference
from jpatch.model import analysis

ALL = dict(fold_ln=True, center_writing_weights=True, center_unembed=True, fold_value_biases=True)
SETTINGS = [ALL] + [{step: True} for step in ALL]
TOL = 1e-4
WEIGHTS = ("W_E", "W_Q", "W_K", "W_V", "b_Q", "b_K", "b_V", "W_O", "b_O", "W_in", "b_in", "W_out", "b_out", "W_U",
           "b_U")
SITES = ("hook_embed", "hook_resid_pre", "hook_resid_mid", "hook_resid_post", "attn.hook_q", "attn.hook_k",
         "attn.hook_v", "attn.hook_z", "attn.hook_pattern", "hook_attn_out", "hook_mlp_out", "mlp.hook_pre",
         "ln1.hook_normalized", "ln2.hook_normalized")


def with_random_biases(hf, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("bias") and "norm" not in name and "ln" not in name:
                p.add_(0.1 * torch.randn_like(p))
    return hf


@pytest.fixture(scope="module", params=["gpt2", "neox"])
def family(request):
    if request.param == "gpt2":
        hf = with_random_biases(reference.hf_model(seed=7), 8)
        return hf, reference.tl_model, hf.config.vocab_size
    hf = with_random_biases(reference.neox_hf_model(seed=7), 8)
    return hf, reference.neox_tl_model, hf.config.vocab_size


def tl_weight(tl, name):
    w = getattr(tl, name)
    return w.detach().numpy() if name in ("W_E", "W_U", "b_U", "W_pos") else np.stack(
        [getattr(block.attn if name[2:] in ("Q", "K", "V", "O") else block.mlp, name).detach().numpy()
         for block in tl.blocks])


def tl_site(cache, site, n_layer):
    if site == "hook_embed":
        return cache[site].numpy()
    return np.stack([cache[f"blocks.{l}.{site}"].numpy() for l in range(n_layer)])


@pytest.mark.parametrize("steps", SETTINGS, ids=lambda s: "+".join(s))
def test_processing_equals_transformer_lens(family, steps):
    hf, tl_of, vocab = family
    if tl_of is reference.neox_tl_model and steps is not ALL:
        pytest.skip("each step alone is checked on GPT-2; NeoX runs all four (the suite's time)")
    tl = tl_of(hf, **steps)
    model = jpatch.process_weights(jpatch.from_hf(hf), **steps)
    for name in WEIGHTS:
        np.testing.assert_allclose(np.asarray(getattr(model, name)), tl_weight(tl, name), atol=1e-5, rtol=0,
                                   err_msg=name)
    tokens = reference.random_tokens(3, 6, vocab, seed=4)
    with torch.no_grad():
        tl_logits, tl_cache = tl.run_with_cache(torch.tensor(tokens))
    logits, cache = model.run_with_cache(tokens)
    np.testing.assert_allclose(np.asarray(logits), tl_logits.numpy(), atol=TOL, rtol=0)
    for site in [s for s in SITES if s == "hook_embed" or s in cache.stacks]:  # NeoX has no resid_mid
        np.testing.assert_allclose(np.asarray(cache.stacked(site) if site != "hook_embed" else cache[site]),
                                   tl_site(tl_cache, site, tl.cfg.n_layers), atol=TOL, rtol=0, err_msg=site)
    # what notebooks read off the residual stream: the logit lens through the final norm
    lens = analysis.accumulated_resid(cache, apply_ln=True)
    tl_lens = tl_cache.accumulated_resid(apply_ln=True)
    np.testing.assert_allclose(np.asarray(lens), tl_lens.detach().numpy(), atol=TOL, rtol=0)


def test_processing_keeps_the_log_probabilities(family):
    hf, _, vocab = family
    tokens = reference.random_tokens(3, 6, vocab, seed=5)
    log_probs = lambda m: np.asarray(jax_log_softmax(np.asarray(m(tokens), np.float64)))
    plain = jpatch.from_hf(hf)
    expected = jax_log_softmax(reference.hf_logits(hf, tokens).astype(np.float64))
    np.testing.assert_allclose(log_probs(plain), expected, atol=TOL, rtol=0)
    np.testing.assert_allclose(log_probs(jpatch.process_weights(plain, **ALL)), expected, atol=TOL, rtol=0)


def jax_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_load_processes_and_save_refuses_a_processed_model(jp_tiny, tmp_path):
    folder = jpatch.save(jp_tiny, tmp_path / "plain")
    processed = jpatch.load(folder, **ALL)
    np.testing.assert_allclose(np.asarray(processed.W_U), np.asarray(jpatch.process_weights(jp_tiny, **ALL).W_U),
                               atol=1e-6)
    assert jpatch.load(folder).b_u is None  # unprocessed by default
    with pytest.raises(ValueError, match="unprocessed weights only"):
        jpatch.save(processed, tmp_path / "processed")
    assert not (tmp_path / "processed").exists()
    with pytest.raises(TypeError, match="fold_ln must be True or False"):
        jpatch.load(folder, fold_ln="yes")
