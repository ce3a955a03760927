"""Corruptions against independent references: Gaussian noise through a
TransformerLens hook on hook_embed and Hugging Face inputs_embeds, embedding std
in NumPy, sweeps with noise / zero / mean ablation runs against TransformerLens
run_with_hooks, and the STR / resample checks and errors."""

import dataclasses

import jax
import numpy as np
import pytest
import torch

import reference
from jpatch.methods import corrupt
from jpatch.methods import metrics
from jpatch import patching
from jpatch.model.tokenizer import get_tokenizer
from jpatch.engine.inputs import Run

TOL = 1e-4
PROB_TOL = 1e-6  # probabilities are ~1/V here: compare them tightly
V = reference.TINY["vocab_size"]
B, T, S = 2, 6, 3
NOISE_POSITIONS = [[1, 2], [3]]  # per prompt; ragged on purpose
ANSWERS = [5, 17]


def assert_close(actual, expected, tol=TOL, what=""):
    actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    err = float(np.abs(actual - expected).max()) if actual.size else 0.0
    assert err <= tol, f"{what}: max abs error {err:.3g} > {tol}"


@pytest.fixture(scope="module")
def tokens():
    return reference.random_tokens(B, T, V, seed=3)


@pytest.fixture(scope="module")
def noise_run(jp_tiny, tokens):
    return corrupt.gaussian_noise(jp_tiny, tokens, NOISE_POSITIONS, n_samples=S, seed=1)


def noise_of(run, hf):
    """The noise a GN run adds: its hook_embed value minus the HF token embedding [rows, pos, d]."""
    wte = hf.transformer.wte.weight.detach().numpy()
    return np.asarray(run.overrides["hook_embed"].value) - wte[run.tokens]


def add_noise_hook(noise):
    return ("hook_embed", lambda act, hook: act + torch.tensor(noise))


def raw(metric):
    """The metric's raw score (no comparison with the baselines)."""
    return dataclasses.replace(metric, normalize="none")


def tl_last_prob(logits, answers):
    return torch.softmax(logits[:, -1], -1)[torch.arange(len(answers)), torch.tensor(answers)].numpy()


# --- embedding std ----------------------------------------------------------------------------


def test_embedding_std_matches_numpy_and_torch(jp_tiny, hf_tiny):
    wte = hf_tiny.transformer.wte.weight.detach()
    ids = np.array([[3, 9, 9], [40, 3, 100]])  # repeats count each time, as in ROME
    expected = np.std(wte.numpy()[ids.ravel()].astype(np.float64), ddof=1)
    assert corrupt.embedding_std(jp_tiny, ids) == pytest.approx(expected, rel=1e-6)
    # ROME: torch.stack(rows).std() (Bessel-corrected)
    assert corrupt.embedding_std(jp_tiny, ids) == pytest.approx(wte[torch.tensor(ids.ravel())].std().item(), rel=1e-5)
    assert corrupt.embedding_std(jp_tiny) == pytest.approx(np.std(wte.numpy().astype(np.float64), ddof=1), rel=1e-6)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        corrupt.embedding_std(jp_tiny, [1, V])
    with pytest.raises(ValueError, match="at least one token"):
        corrupt.embedding_std(jp_tiny, [])


# --- Gaussian noise -----------------------------------------------------------------------------


def test_noise_only_on_token_embedding_at_positions(jp_tiny, tokens, noise_run):
    assert noise_run.samples == S and noise_run.tokens.shape == (S * B, T)
    assert (noise_run.tokens == np.tile(tokens, (S, 1))).all()
    _, clean = jp_tiny.run_with_cache(noise_run.tokens)
    _, noisy = jp_tiny.run_with_cache(noise_run.tokens, overrides=noise_run.overrides)
    diff = np.asarray(noisy["hook_embed"] - clean["hook_embed"])  # [S*B, T, d]
    chosen = np.zeros((B, T), bool)
    for b, ps in enumerate(NOISE_POSITIONS):
        chosen[b, ps] = True
    chosen = np.tile(chosen, (S, 1))
    assert (diff[~chosen] == 0).all()
    assert (np.abs(diff[chosen]).min(-1) > 0).all()
    assert (np.asarray(noisy["hook_pos_embed"]) == np.asarray(clean["hook_pos_embed"])).all()
    # independent samples: sample 0 and sample 1 of prompt 0 differ
    assert not np.allclose(diff[0], diff[B])


def test_noise_scale_and_seed(jp_tiny, hf_tiny, tokens):
    big = corrupt.gaussian_noise(jp_tiny, tokens, NOISE_POSITIONS, n_samples=400, seed=5)
    noise = noise_of(big, hf_tiny).reshape(400, B, T, -1)
    picked = np.concatenate([noise[:, b, ps] for b, ps in enumerate(NOISE_POSITIONS)], axis=1)  # 76,800 values
    wte = hf_tiny.transformer.wte.weight.detach().numpy()
    subject = np.concatenate([tokens[b, ps] for b, ps in enumerate(NOISE_POSITIONS)])
    nu = 3 * np.std(wte[subject].astype(np.float64), ddof=1)
    assert picked.std() == pytest.approx(nu, rel=0.02)
    assert abs(picked.mean()) < 0.02 * nu
    given = corrupt.gaussian_noise(jp_tiny, tokens, NOISE_POSITIONS, n_samples=400, std=0.5, scale=2.0, seed=5)
    assert noise_of(given, hf_tiny).std() * np.sqrt(T * B / 3) == pytest.approx(1.0, rel=0.02)  # nu = 1, 3 of 12 noised
    same = corrupt.gaussian_noise(jp_tiny, tokens, NOISE_POSITIONS, n_samples=S, seed=1)
    other = corrupt.gaussian_noise(jp_tiny, tokens, NOISE_POSITIONS, n_samples=S, seed=2)
    keyed = corrupt.gaussian_noise(jp_tiny, tokens, NOISE_POSITIONS, n_samples=S, key=jax.random.PRNGKey(1))
    a, b_ = np.asarray(same.overrides["hook_embed"].value), np.asarray(other.overrides["hook_embed"].value)
    again = np.asarray(corrupt.gaussian_noise(jp_tiny, tokens, NOISE_POSITIONS, n_samples=S, seed=1)
                       .overrides["hook_embed"].value)
    assert (a == again).all() and (a == np.asarray(keyed.overrides["hook_embed"].value)).all()
    assert not np.allclose(a, b_)


def test_noisy_logits_match_transformer_lens_and_hugging_face(jp_tiny, tl_tiny, hf_tiny, noise_run):
    noise = noise_of(noise_run, hf_tiny)
    logits = np.asarray(jp_tiny(noise_run.tokens, overrides=noise_run.overrides))
    with torch.no_grad():
        tl = tl_tiny.run_with_hooks(torch.tensor(noise_run.tokens), fwd_hooks=[add_noise_hook(noise)]).numpy()
        embeds = hf_tiny.transformer.wte(torch.tensor(noise_run.tokens)) + torch.tensor(noise)
        hf = hf_tiny(inputs_embeds=embeds).logits.numpy()
    assert_close(logits, tl, what="GN logits vs TransformerLens")
    assert_close(logits, hf, what="GN logits vs Hugging Face inputs_embeds")


def test_denoising_sweep_with_noise_matches_transformer_lens(jp_tiny, tl_tiny, hf_tiny, tokens, noise_run):
    # sweep averages the RAW score of each patched run over the noise samples of a
    # prompt (and the baselines likewise), then compares: here the un-normalized
    # probability, P_pt - P_*, i.e. mean_s P_pt(s) - mean_s P_*(s) per prompt.
    metric = metrics.probability(ANSWERS)
    got = patching.sweep(jp_tiny, tokens, noise_run, "resid_pre", metric, per_prompt=True, progress=False)
    noise = noise_of(noise_run, hf_tiny)
    rows = torch.tensor(noise_run.tokens)
    answers = ANSWERS * S
    with torch.no_grad():
        _, clean_cache = tl_tiny.run_with_cache(rows)
        corrupted = tl_last_prob(tl_tiny.run_with_hooks(rows, fwd_hooks=[add_noise_hook(noise)]), answers)
        expected = np.zeros((B, jp_tiny.config.n_layer, T))
        for layer in range(jp_tiny.config.n_layer):
            name = f"blocks.{layer}.hook_resid_pre"
            for p in range(T):
                def patch(act, hook, p=p, name=name):
                    act[:, p] = clean_cache[name][:, p]
                    return act

                logits = tl_tiny.run_with_hooks(rows, fwd_hooks=[add_noise_hook(noise), (name, patch)])
                per_sample = (tl_last_prob(logits, answers) - corrupted).reshape(S, B)
                expected[:, layer, p] = per_sample.mean(0)
    assert np.abs(expected).max() > 100 * PROB_TOL, "the reference must move"
    assert_close(got, expected, PROB_TOL, what="GN denoising resid_pre sweep vs TransformerLens")


def test_noise_errors(jp_tiny, tokens):
    with pytest.raises(ValueError, match="prompt 1 has position 6, out of range"):
        corrupt.gaussian_noise(jp_tiny, tokens, [[1], [6]])
    with pytest.raises(ValueError, match="prompt 0 has position -1"):
        corrupt.gaussian_noise(jp_tiny, tokens, [[-1], [2]])
    with pytest.raises(ValueError, match="n_samples must be an integer >= 1"):
        corrupt.gaussian_noise(jp_tiny, tokens, NOISE_POSITIONS, n_samples=0)
    with pytest.raises(ValueError, match=r"boolean mask must have the tokens' shape \(2, 6\)"):
        corrupt.gaussian_noise(jp_tiny, tokens, np.ones((2, 5), bool))
    with pytest.raises(ValueError, match="covers 3 prompts, the tokens have 2"):
        corrupt.gaussian_noise(jp_tiny, tokens, [[1], [2], [3]])
    with pytest.raises(ValueError, match=r"tokens must be a \[batch, pos\]"):
        corrupt.gaussian_noise(jp_tiny, tokens[0], [1])
    mask = np.zeros((B, T), bool)
    mask[:, 2] = True
    run = corrupt.gaussian_noise(jp_tiny, tokens, mask, n_samples=2, std=0.1)
    assert run.overrides["hook_embed"].mask[:, :, 0].tolist() == np.tile(mask, (2, 1)).tolist()


# --- symmetric token replacement ---------------------------------------------------------------


def test_token_replacement_checks(tokens):
    corrupted = tokens.copy()
    corrupted[0, 2] = (tokens[0, 2] + 1) % V
    corrupted[1, 4] = (tokens[1, 4] + 1) % V
    run = corrupt.token_replacement(tokens, corrupted, positions=[[2], [4, 5]])
    assert isinstance(run, Run) and (run.tokens == corrupted).all() and run.samples == 1
    mask = np.zeros((B, T), bool)
    mask[0, 2] = mask[1, 4] = True
    corrupt.token_replacement(tokens, corrupted, positions=mask)
    with pytest.raises(ValueError, match=rf"prompt 1: .*differ at position 4 \(clean id {tokens[1, 4]}, "
                                         rf"corrupted id {corrupted[1, 4]}\)"):
        corrupt.token_replacement(tokens, corrupted, positions=[[2], [3]])
    with pytest.raises(ValueError, match=r"clean tokens \(2, 6\) and corrupted tokens \(2, 7\)"):
        corrupt.token_replacement(tokens, np.zeros((2, 7), int))


def test_token_replacement_from_text():
    clean = ["When Mary and John went to the store, John gave a drink to"]
    corrupted = ["When Alice and Bob went to the store, Bob gave a drink to"]
    out = corrupt.token_replacement_from_text(clean, corrupted, key_words=[" Mary", " John", " Alice", " Bob"])
    assert out.positions[0].nonzero()[0].tolist() == [1, 3, 9]
    assert (out.run.tokens == out.corrupted_tokens).all() and out.clean_tokens[0, 1] == 5335  # " Mary"
    per_prompt = corrupt.token_replacement_from_text(clean, corrupted, key_words=[["Mary", "Alice", "John", "Bob"]])
    assert (per_prompt.positions == out.positions).all()
    with pytest.raises(ValueError, match=r"prompt 0: .*differ at position 9 \(clean id 1757, corrupted id 5811\)"):
        corrupt.token_replacement_from_text(clean, corrupted, key_words=[" Mary", " Alice", "John went", "Bob went"])
    with pytest.raises(ValueError, match="key word ' Carol' occurs in neither"):
        corrupt.token_replacement_from_text(clean, corrupted, key_words=[[" Mary", " Carol"]])
    long = ["When Bartholomew and Bob went to the store, Bob gave a drink to"]
    with pytest.raises(ValueError, match=r"prompt 0: the clean prompt 'When Mary .*' has 14 tokens but the "
                                         r"corrupted prompt 'When Bartholomew .*' has 16"):
        corrupt.token_replacement_from_text(clean, long)
    # Prompts of different lengths are padded on the right; the Run carries their mask.
    ragged = corrupt.token_replacement_from_text(clean + ["Hi Mary"], corrupted + ["Hi Alice"])
    tok = get_tokenizer()
    assert ragged.run.attention_mask.sum(1).tolist() == [14, len(tok.encode("Hi Mary"))]
    assert ragged.clean_tokens[1, : len(tok.encode("Hi Mary"))].tolist() == tok.encode("Hi Mary")
    assert (ragged.clean_tokens[1, len(tok.encode("Hi Mary")):] == 50256).all()


# --- ablations ------------------------------------------------------------------------------------


def tl_mlp_out_sweep(tl, tokens, values):
    """Raw P(answer) of the clean run with blocks.l.hook_mlp_out[:, p] := values(l, p) [batch, d]."""
    L = tl.cfg.n_layers
    out = np.zeros((B, L, T))
    with torch.no_grad():
        for layer in range(L):
            for p in range(T):
                def put(act, hook, layer=layer, p=p):
                    act[:, p] = torch.as_tensor(values(layer, p), dtype=act.dtype)
                    return act

                logits = tl.run_with_hooks(torch.tensor(tokens), fwd_hooks=[(f"blocks.{layer}.hook_mlp_out", put)])
                out[:, layer, p] = tl_last_prob(logits, ANSWERS)
    return out


def test_zero_ablation_noising_sweep_matches_transformer_lens(jp_tiny, tl_tiny, tokens):
    run = corrupt.zero_ablation(jp_tiny, tokens, "mlp_out")
    got = patching.sweep(jp_tiny, tokens, run, "mlp_out", raw(metrics.probability(ANSWERS)), direction="noise",
                         per_prompt=True, progress=False)
    expected = tl_mlp_out_sweep(tl_tiny, tokens, lambda layer, p: np.zeros(jp_tiny.config.d_model))
    assert np.ptp(expected) > 100 * PROB_TOL, "the reference must move"
    assert_close(got, expected, PROB_TOL, what="zero-ablated mlp_out vs TransformerLens")
    # a per-layer ablation cannot be the base run (its later-layer overrides would be lost)
    with pytest.raises(ValueError, match=r"the base run \(the corrupted run when denoising.*overrides hook_mlp_out"):
        patching.sweep(jp_tiny, tokens, run, "mlp_out", metrics.probability(ANSWERS), progress=False)
    with pytest.raises(ValueError, match="pass the site without its layer"):
        corrupt.zero_ablation(jp_tiny, tokens, "blocks.0.hook_mlp_out")


def test_mean_ablation_noising_sweep_matches_transformer_lens(jp_tiny, tl_tiny, tokens):
    dataset = reference.random_tokens(5, T, V, seed=8)
    with torch.no_grad():
        _, ds_cache = tl_tiny.run_with_cache(torch.tensor(dataset))
    means = {l: ds_cache[f"blocks.{l}.hook_mlp_out"].mean(0).numpy() for l in range(jp_tiny.config.n_layer)}  # [T, d]
    run = corrupt.mean_ablation(jp_tiny, tokens, "mlp_out", dataset)
    got = patching.sweep(jp_tiny, tokens, run, "mlp_out", raw(metrics.probability(ANSWERS)), direction="noise",
                         per_prompt=True, progress=False)
    expected = tl_mlp_out_sweep(tl_tiny, tokens, lambda layer, p: means[layer][p])
    assert np.ptp(expected) > 100 * PROB_TOL, "the reference must move"
    assert_close(got, expected, PROB_TOL, what="mean-ablated mlp_out vs TransformerLens")


def test_mean_ablation_pools_positions_for_other_lengths(jp_tiny, tl_tiny, tokens):
    dataset = [list(r) for r in reference.random_tokens(3, 4, V, seed=9)] + \
              [list(r) for r in reference.random_tokens(2, 7, V, seed=10)]
    acts = []
    with torch.no_grad():
        for group in (dataset[:3], dataset[3:]):
            _, cache = tl_tiny.run_with_cache(torch.tensor(group))
            acts.append(cache["blocks.1.attn.hook_z"].reshape(-1, *cache["blocks.1.attn.hook_z"].shape[2:]))
    expected = torch.cat(acts).mean(0).numpy()  # over all 26 (prompt, position) tokens: [head, d_head]
    run = corrupt.mean_ablation(jp_tiny, tokens, "z", dataset)
    value = np.asarray(run.overrides["attn.hook_z"].value)
    assert value.shape == (jp_tiny.config.n_layer, 1, 1) + expected.shape
    assert_close(value[1, 0, 0], expected, what="pooled mean of blocks.1.attn.hook_z")
    with pytest.raises(ValueError, match="attention pattern needs dataset prompts of the prompts' length 6"):
        corrupt.mean_ablation(jp_tiny, tokens, "pattern", dataset)


def test_resample_ablation(tokens):
    dataset = reference.random_tokens(6, T, V, seed=11)
    dataset[2] = tokens[0]  # the prompts themselves are in the dataset
    dataset[4] = tokens[1]
    idx = corrupt.resample_indices(tokens, dataset, n_samples=200, seed=0)
    assert idx.shape == (200, B)
    assert not (idx[:, 0] == 2).any() and not (idx[:, 1] == 4).any()
    assert set(idx[:, 0]) == {0, 1, 3, 4, 5}  # all other prompts are drawn
    # from the prompts' own set: never itself
    own = corrupt.resample_indices(tokens, tokens, n_samples=20, seed=1)
    assert (own == [[1, 0]]).all()
    run = corrupt.resample_ablation(tokens, dataset, n_samples=3, seed=7)
    assert run.samples == 3 and run.tokens.shape == (3 * B, T)
    again = corrupt.resample_ablation(tokens, dataset, n_samples=3, seed=7)
    other = corrupt.resample_ablation(tokens, dataset, n_samples=3, seed=8)
    assert (run.tokens == again.tokens).all() and not (run.tokens == other.tokens).all()
    drawn = corrupt.resample_indices(tokens, dataset, n_samples=3, seed=7)
    assert (run.tokens == dataset[drawn.ravel()]).all()
    with pytest.raises(ValueError, match="no dataset prompt has the prompts' length 6"):
        corrupt.resample_ablation(tokens, reference.random_tokens(4, 5, V))
    with pytest.raises(ValueError, match="prompt 0: the dataset has no prompt of length 6 other than"):
        corrupt.resample_ablation(tokens[:1], tokens[:1])


def test_corruptions_registry():
    assert set(corrupt.CORRUPTIONS) == {"str", "noise", "zero", "mean", "resample"}
    assert corrupt.CORRUPTIONS["noise"] is corrupt.gaussian_noise
