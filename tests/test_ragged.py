"""Ragged batches: prompts of different lengths, right-padded with an attention mask, equal
each prompt swept alone, and TransformerLens run prompt by prompt; baselines and the
default aggregate (normalize the mean over prompts) checked by hand."""

import numpy as np
import pytest
import torch
import transformer_lens.patching as tl_patching

import reference
from jpatch.methods import corrupt
from jpatch.methods import metrics
from jpatch.model import padding
from jpatch import patching
V = reference.TINY["vocab_size"]
# Three distinct lengths (each prompt swept alone compiles one program per length): positions 0-3,
# 4-5 and 6 are reached by different sets of prompts, and two prompts share a padded length.
LENGTHS = (7, 4, 6, 6)
PAD = V - 1  # <|endoftext|> of the tiny vocabulary; the corrupted prompts pad with another id

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(3)
    clean = [rng.integers(0, V, n) for n in LENGTHS]
    corrupted = [c.copy() for c in clean]
    for c in corrupted:
        c[1] = (c[1] + 29) % V  # STR-like: one token replaced in every prompt
    answers, contrasts = rng.integers(0, V, len(LENGTHS)), rng.integers(0, V, len(LENGTHS))
    return clean, corrupted, answers, contrasts


def ragged(prompts):
    clean, corrupted, answers, contrasts = prompts
    clean_tokens, mask = padding.pad(clean, pad_id=PAD)
    corrupted_tokens, _ = padding.pad(corrupted, pad_id=PAD - 1)
    return clean_tokens, corrupted_tokens, mask, metrics.logit_diff(answers, contrasts)


def alone(prompts, b):
    clean, corrupted, answers, contrasts = prompts
    return clean[b][None], corrupted[b][None], metrics.logit_diff(answers[b : b + 1], contrasts[b : b + 1])


SWEEPS = [("resid_pre", {}), ("attn_out", {}), ("z", {}), ("pattern", {}), ("v", {"axes": ("layer", "head")}),
          ("mlp_out", {"window": 2})]


@pytest.mark.parametrize("site,kwargs", SWEEPS, ids=[s for s, _ in SWEEPS])
@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_ragged_equals_each_prompt_alone(jp_tiny, prompts, site, kwargs, direction):
    clean, corrupted, mask, metric = ragged(prompts)
    run = lambda c, x, m, **k: patching.sweep(jp_tiny, c, x, site, m, direction=direction, progress=False, **kwargs, **k)
    together = run(clean, corrupted, metric, attention_mask=mask, per_prompt=True)
    T = clean.shape[1]
    for b, n in enumerate(LENGTHS):
        own = np.asarray(run(*alone(prompts, b), per_prompt=True))[0]
        got = np.asarray(together[b])
        pos_axes = [i for i, a in enumerate(together.axes) if a in ("pos", "src")]
        index = tuple(slice(0, n) if i in pos_axes else slice(None) for i in range(got.ndim))
        # float32 rounding differs between batch shapes: agreement to 1e-4 of the clean-corrupted gap
        np.testing.assert_allclose(got[index], own, atol=1e-4, rtol=0)
        assert np.isfinite(got[index]).all()
        for i in pos_axes:  # NaN past the prompt's end
            past = tuple(slice(n, T) if j == i else slice(None) for j in range(got.ndim))
            assert np.isnan(got[past]).all()


def tl_ld(logits, answer, contrast):
    return (logits[0, -1, answer] - logits[0, -1, contrast]).item()


def test_ragged_matches_transformer_lens_prompt_by_prompt(jp_tiny, tl_tiny, prompts):
    """TransformerLens on each prompt alone (raw logit differences, no normalization there);
    the aggregate over prompts and the baselines computed here by hand."""
    clean, corrupted, mask, metric = ragged(prompts)
    _, _, answers, contrasts = prompts
    L, T = jp_tiny.config.n_layer, clean.shape[1]
    raw = np.full((len(LENGTHS), L, T), np.nan)
    clean_ld, corrupted_ld = [], []
    for b, n in enumerate(LENGTHS):
        c, x = (torch.tensor(a[b][None]) for a in prompts[:2])
        with torch.no_grad():
            clean_logits, cache = tl_tiny.run_with_cache(c)
            clean_ld.append(tl_ld(clean_logits, answers[b], contrasts[b]))
            corrupted_ld.append(tl_ld(tl_tiny(x), answers[b], contrasts[b]))
            raw[b, :, :n] = tl_patching.get_act_patch_resid_pre(
                tl_tiny, x, cache, lambda lg, b=b: lg[0, -1, answers[b]] - lg[0, -1, contrasts[b]]).numpy()
    clean_ld, corrupted_ld = np.array(clean_ld), np.array(corrupted_ld)

    got = patching.sweep(jp_tiny, clean, corrupted, "resid_pre", metric, attention_mask=mask, progress=False)
    np.testing.assert_allclose(got.clean_per_prompt, clean_ld, atol=1e-4)
    np.testing.assert_allclose(got.corrupted_per_prompt, corrupted_ld, atol=1e-4)
    assert abs(got.clean - clean_ld.mean()) < 1e-4 and got.per_prompt is False
    # The paper's aggregate: at each position, over the prompts that reach it, normalize the mean.
    expected = np.full((L, T), np.nan)
    for p in range(T):
        reach = np.array(LENGTHS) > p
        cl, co = clean_ld[reach].mean(), corrupted_ld[reach].mean()
        expected[:, p] = (raw[reach, :, p].mean(0) - co) / (cl - co)
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-4)

    per_prompt = patching.sweep(jp_tiny, clean, corrupted, "resid_pre", metric, attention_mask=mask,
                                per_prompt=True, progress=False)
    hand = (raw - corrupted_ld[:, None, None]) / (clean_ld - corrupted_ld)[:, None, None]
    np.testing.assert_allclose(np.asarray(per_prompt), hand, atol=1e-4)
    assert per_prompt.per_prompt is True

    # TransformerLens-shaped function with the mask: the same aggregate.
    _, cache = jp_tiny.run_with_cache(clean)
    tl_style = patching.get_act_patch_resid_pre(jp_tiny, corrupted, cache, metric, attention_mask=mask, progress=False)
    np.testing.assert_allclose(np.asarray(tl_style), expected, atol=1e-4)


def test_gaussian_noise_on_a_ragged_batch(jp_tiny, prompts):
    clean, _, mask, metric = ragged(prompts)
    positions = [[0, 1]] * len(LENGTHS)
    run = corrupt.gaussian_noise(jp_tiny, clean, positions, n_samples=3, std=0.5, attention_mask=mask)
    together = patching.sweep(jp_tiny, clean, run, "attn_out", metric, per_prompt=True, progress=False)
    B = len(LENGTHS)
    for b, n in enumerate(LENGTHS):
        rows = np.arange(b, 3 * B, B)  # this prompt's noise samples (sample-major)
        ov = run.overrides["hook_embed"]
        own_run = patching.Run(run.tokens[rows, :n], {"hook_embed": type(ov)(ov.value[rows, :n], ov.mask[rows, :n])}, 3)
        own = patching.sweep(jp_tiny, clean[b : b + 1, :n], own_run, "attn_out", alone(prompts, b)[2],
                             per_prompt=True, progress=False)
        np.testing.assert_allclose(np.asarray(together[b])[:, :n], np.asarray(own)[0], atol=1e-5)
    with pytest.raises(ValueError, match="prompt 1 gets noise at position 4, which is padding"):
        corrupt.gaussian_noise(jp_tiny, clean, [[0, 4]] * B, std=0.5, attention_mask=mask)


def test_padding_without_a_mask_or_that_cannot_be_exact_is_refused(jp_tiny, prompts):
    clean, corrupted, mask, metric = ragged(prompts)
    with pytest.raises(ValueError, match="look.* right-padded; pass attention_mask="):
        patching.sweep(jp_tiny, clean, corrupted, "resid_pre", metric, progress=False)
    left = np.stack([np.roll(row, -n) for row, n in zip(mask, LENGTHS)])  # real tokens last
    with pytest.raises(ValueError, match="prompt 1 is not right-padded"):
        patching.sweep(jp_tiny, clean, corrupted, "resid_pre", metric, attention_mask=left, progress=False)
    callable_metric = lambda logits: logits[:, -1, 0] - logits[:, -1, 1]
    with pytest.raises(ValueError, match=r"reads the logits at position 6, which is padding for some prompts"):
        patching.sweep(jp_tiny, clean, corrupted, "resid_pre", callable_metric, attention_mask=mask, progress=False)
    reading_padding = metrics.logit_diff(prompts[2], prompts[3], positions=np.full(len(LENGTHS), 5))
    with pytest.raises(ValueError, match="metric position 5 of prompt 1 is padding"):
        patching.sweep(jp_tiny, clean, corrupted, "resid_pre", reading_padding, attention_mask=mask, progress=False)
    with pytest.raises(ValueError, match="pad: sequence 1 is empty"):
        padding.pad([[1, 2], []])


def test_pad_is_right_padding_with_a_mask():
    tokens, mask = padding.pad([[3, 4, 5], [6]])
    assert tokens.tolist() == [[3, 4, 5], [6, 50256, 50256]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
