"""Shape buckets (jpatch.engine.buckets): a sweep padded to its bucket (batch 9 -> 10, 9 tokens -> 10)
equals the same sweep unbucketed and TransformerLens 3.9 (its patching functions; ragged batches
prompt by prompt), for every site family, both directions, a callable and a `Metric`; and a new
shape inside a bucket compiles nothing."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformer_lens.patching as tl_patching

import reference
from jpatch import patching
from jpatch.engine import buckets
from jpatch.methods import metrics
from jpatch.model import padding

V = reference.TINY["vocab_size"]
B, T = 9, 9  # bucket (10, 10): one padded prompt, one padded position
TOL = 1e-5  # of the raw metric; a normalized value's error is the raw one over the clean-corrupted gap
FUNCTIONS = ("resid_pre", "attn_head_out_all_pos", "attn_head_out_by_pos", "mlp_out", "attn_head_v_by_pos")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_bucket_sizes():
    assert [buckets.size(n) for n in (1, 7, 8, 9, 11, 16, 17, 33, 60, 65)] == [1, 7, 8, 10, 12, 16, 20, 40, 64, 80]
    assert max(buckets.size(n) / n for n in range(1, 3000)) <= 1.25


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(5)
    clean = rng.integers(0, V - 1, (B, T))
    corrupted = clean.copy()
    corrupted[:, 2] = (clean[:, 2] + 31) % (V - 1)
    answers, contrasts = rng.integers(0, V, B), rng.integers(0, V, B)
    return clean, corrupted, answers, contrasts


def mean_ld(answers, contrasts, rows):
    """TransformerLens's style: the mean logit difference at the last position, over `rows`."""
    return lambda logits: (logits[rows, -1, answers] - logits[rows, -1, contrasts]).mean()


@pytest.mark.parametrize("name", FUNCTIONS)
def test_get_act_patch_bucketed_equals_unbucketed_and_transformer_lens(jp_tiny, tl_tiny, data, name):
    clean, corrupted, answers, contrasts = data
    with torch.no_grad():
        clean_logits, tl_cache = tl_tiny.run_with_cache(torch.tensor(clean))
        ld = mean_ld(torch.tensor(answers), torch.tensor(contrasts), torch.arange(B))
        cl, co = ld(clean_logits).item(), ld(tl_tiny(torch.tensor(corrupted))).item()
        raw = getattr(tl_patching, f"get_act_patch_{name}")(tl_tiny, torch.tensor(corrupted), tl_cache, ld).numpy()
    _, cache = jp_tiny.run_with_cache(clean)
    fn = getattr(patching, f"get_act_patch_{name}")
    scale = TOL * max(1, np.abs(raw).max())
    for metric, expected, tol in ((mean_ld(answers, contrasts, np.arange(B)), raw, scale),  # a callable: raw values
                                  (metrics.logit_diff(answers, contrasts), (raw - co) / (cl - co),  # normalized mean
                                   scale / abs(cl - co))):
        got = {b: np.asarray(fn(jp_tiny, corrupted, cache, metric, progress=False, buckets=b)) for b in (True, False)}
        assert np.ptp(expected) > 0.01  # the patches move the metric
        for b in (True, False):
            np.testing.assert_allclose(got[b], expected, atol=tol, rtol=0, err_msg=f"{name} buckets={b}")
        np.testing.assert_allclose(got[True], got[False], atol=tol, rtol=0)


LENGTHS = (9, 4, 7, 3, 8, 5, 9, 6, 4)  # ragged: bucket (10, 10) as well


def tl_alone(tl_tiny, base, source, answer, contrast):
    """TransformerLens's resid_pre sweep of one prompt: raw logit differences, and the base run's."""
    ld = lambda lg: lg[0, -1, answer] - lg[0, -1, contrast]
    with torch.no_grad():
        _, cache = tl_tiny.run_with_cache(torch.tensor(source[None]))
        raw = tl_patching.get_act_patch_resid_pre(tl_tiny, torch.tensor(base[None]), cache, ld).numpy()
        return raw, ld(tl_tiny(torch.tensor(base[None]))).item(), ld(tl_tiny(torch.tensor(source[None]))).item()


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_ragged_sweep_bucketed_equals_unbucketed_and_transformer_lens(jp_tiny, tl_tiny, data, direction):
    clean, corrupted, answers, contrasts = data
    clean_rows = [clean[b, :n] for b, n in enumerate(LENGTHS)]
    corrupted_rows = [corrupted[b, :n] for b, n in enumerate(LENGTHS)]
    c, mask = padding.pad(clean_rows, pad_id=V - 1)
    x, _ = padding.pad(corrupted_rows, pad_id=V - 1)
    ends = np.array(LENGTHS) - 1
    rows = np.arange(B)
    per_prompt_ld = lambda logits: logits[rows, ends, answers] - logits[rows, ends, contrasts]  # reads no padding
    expected, tol = np.full((B, jp_tiny.config.n_layer, T), np.nan), np.zeros((B, 1, 1))
    for b, n in enumerate(LENGTHS):
        base, source = (x[b, :n], c[b, :n]) if direction == "denoise" else (c[b, :n], x[b, :n])
        raw, base_ld, source_ld = tl_alone(tl_tiny, base, source, answers[b], contrasts[b])
        cl, co = (source_ld, base_ld) if direction == "denoise" else (base_ld, source_ld)
        expected[b, :, :n] = (raw - co) / (cl - co)
        tol[b] = TOL * max(1, np.abs(raw).max()) / abs(cl - co)
    for metric in (metrics.logit_diff(answers, contrasts), metrics.from_callable(per_prompt_ld, normalize="range")):
        got = {b: np.asarray(patching.sweep(jp_tiny, c, x, "resid_pre", metric, attention_mask=mask, per_prompt=True,
                                            direction=direction, progress=False, buckets=b)) for b in (True, False)}
        for b in (True, False):
            assert (np.isnan(got[b]) == np.isnan(expected)).all()  # NaN past each prompt's end
            assert np.nanmax(np.abs(got[b] - expected) / tol) <= 1, f"buckets={b}"
        assert np.nanmax(np.abs(got[True] - got[False]) / tol) <= 1


def test_a_new_shape_inside_a_bucket_compiles_nothing(jp_tiny, data):
    clean, corrupted, answers, contrasts = data
    run = lambda n, t: patching.sweep(jp_tiny, clean[:n, :t], corrupted[:n, :t], "z",
                                      metrics.logit_diff(answers[:n], contrasts[:n]), progress=False)
    run(9, 9)
    _, count = reference.count_compiles(lambda: run(10, 10))  # (10, 10): the bucket of (9, 9)
    assert count == 0
    _, count = reference.count_compiles(lambda: run(9, 10))
    assert count == 0
    _, count = reference.count_compiles(lambda: run(10, 9))
    assert count == 0


def test_get_act_patch_inside_a_bucket_compiles_nothing_with_a_metric(jp_tiny, data):
    """The TransformerLens-shaped sweeps too (their clean logits are read from the cache on the host
    and unembedded at the bucket's shape); a plain callable, written for its own shape, compiles its
    three small programs (which logits it reads, its scoring of the patched runs and of the baselines)."""
    clean, corrupted, answers, contrasts = data
    caches = {(n, t): jp_tiny.run_with_cache(clean[:n, :t])[1] for n, t in ((9, 9), (10, 10), (9, 10))}

    def run(n, t, metric):
        return patching.get_act_patch_resid_pre(jp_tiny, corrupted[:n, :t], caches[n, t], metric, progress=False)

    def ld_callable(n):
        rows, a, c = jnp.arange(n), jnp.asarray(answers[:n]), jnp.asarray(contrasts[:n])
        return lambda logits: (logits[rows, -1, a] - logits[rows, -1, c]).mean()

    run(9, 9, metrics.logit_diff(answers[:9], contrasts[:9]))
    run(9, 9, ld_callable(9))
    _, count = reference.count_compiles(lambda: run(10, 10, metrics.logit_diff(answers[:10], contrasts[:10])))
    assert count == 0
    _, count = reference.count_compiles(lambda: run(9, 10, ld_callable(9)))
    assert count <= 3
