"""Metrics against NumPy hand computations (float64 softmax / log-softmax by hand) on
logits of TransformerLens runs patched with its hooks, reduced the way `sweep` reports
them: per prompt (each prompt normalized) and over prompts (normalized after averaging);
`Metric.compare`, `read_positions` and input errors."""

import types

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import reference
from jpatch.methods import metrics
from jpatch import patching
V = reference.TINY["vocab_size"]
B, T, L = 3, 7, 2
CHANGED = (2, 3)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def assert_close(actual, expected, tol, what=""):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    err = float(np.abs(actual - expected).max()) if actual.size else 0.0
    assert err <= tol, f"{what}: max abs error {err:.3g} > {tol}"


# --- NumPy references ----------------------------------------------------------------------


def log_softmax(x):
    x = np.asarray(x, np.float64)
    shifted = x - x.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def pick(x, ids):
    """x [..., B, V], ids [B] -> [..., B]."""
    ids = np.asarray(ids)
    return x[..., np.arange(len(ids)), ids]


def hand_scores(name, logits, clean_logits, answers, contrasts):
    """Raw per-prompt score of [..., B, V] logits (float64)."""
    if name == "logit_diff":
        return pick(logits, answers) - pick(logits, contrasts)
    if name == "probability":
        return pick(np.exp(log_softmax(logits)), answers)
    if name == "logprob":
        return pick(log_softmax(logits), answers)
    if name == "kl":  # -D_KL(P_cl || P_x)
        log_p = log_softmax(clean_logits)
        return -(np.exp(log_p) * (log_p - log_softmax(logits))).sum(-1)
    raise KeyError(name)


def hand_sweep(normalize, patched, clean, corrupted, per_prompt):
    """patched [..., B]; clean, corrupted [B] -> what sweep reports."""
    if not per_prompt:
        patched, clean, corrupted = patched.mean(-1), clean.mean(), corrupted.mean()
    if normalize == "baseline":
        out = patched - corrupted
    else:
        out = (patched - corrupted) / (clean - corrupted)
    return np.moveaxis(out, -1, 0) if per_prompt else out


# --- TransformerLens patched logits -----------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tl_tiny):
    """Tokens, answers, and TransformerLens logits (float64) of the clean, corrupted and
    resid_pre-patched runs: patched[direction] is [L, T(patch pos), B, T(read pos), V]."""
    clean = reference.random_tokens(B, T, V, seed=11)
    corrupted = clean.copy()
    for p in CHANGED:
        corrupted[:, p] = (clean[:, p] + 31) % V
    with torch.no_grad():
        cl_logits, cl_cache = tl_tiny.run_with_cache(torch.tensor(clean))
        co_logits, co_cache = tl_tiny.run_with_cache(torch.tensor(corrupted))
    cl_logits, co_logits = cl_logits.double().numpy(), co_logits.double().numpy()
    # answers: the tokens whose probability / logit the corruption moves most, per prompt
    prob_gap = np.exp(log_softmax(cl_logits[:, -1])) - np.exp(log_softmax(co_logits[:, -1]))
    logit_gap = cl_logits[:, -1] - co_logits[:, -1]
    answers, contrasts = prob_gap.argmax(-1), logit_gap.argmin(-1)
    assert (answers != contrasts).all()
    patched = {}
    for direction, tokens, source in (("denoise", corrupted, cl_cache), ("noise", clean, co_cache)):
        out = np.zeros((L, T, B, T, V))
        for layer in range(L):
            name = f"blocks.{layer}.hook_resid_pre"
            for pos in range(T):
                def hook(act, hook, pos=pos, value=source[name]):
                    act = act.clone()
                    act[:, pos] = value[:, pos]
                    return act

                with torch.no_grad():
                    out[layer, pos] = tl_tiny.run_with_hooks(torch.tensor(tokens), fwd_hooks=[(name, hook)]).double().numpy()
        patched[direction] = out
    return types.SimpleNamespace(clean=clean, corrupted=corrupted, answers=answers, contrasts=contrasts,
                                 clean_logits=cl_logits, corrupted_logits=co_logits, patched=patched)


METRICS = [  # (id, constructor, hand name, normalize)
    ("logit_diff", lambda r: metrics.logit_diff(r.answers, r.contrasts), "logit_diff", "range"),
    ("logit_diff_raw", lambda r: metrics.logit_diff(r.answers, r.contrasts, normalize=False), "logit_diff", "baseline"),
    ("probability", lambda r: metrics.probability(r.answers), "probability", "baseline"),
    ("probability_norm", lambda r: metrics.probability(r.answers, normalize=True), "probability", "range"),
    ("logprob", lambda r: metrics.logprob(r.answers), "logprob", "baseline"),
    ("logprob_norm", lambda r: metrics.logprob(r.answers, normalize=True), "logprob", "range"),
    ("kl", lambda r: metrics.kl(), "kl", "baseline"),
    ("kl_norm", lambda r: metrics.kl(normalize=True), "kl", "range"),
]


def expected_sweep(r, hand, normalize, direction, per_prompt, read=None):
    """The hand-computed sweep result; `read` [B] are the positions the metric reads (default last)."""
    read = np.full(B, T - 1) if read is None else np.asarray(read)
    at = lambda logits: logits[..., np.arange(B), read, :]  # [..., B, T, V] -> [..., B, V]
    clean_logits = at(r.clean_logits)
    score = lambda logits: hand_scores(hand, logits, clean_logits, r.answers, r.contrasts)
    return hand_sweep(normalize, score(at(r.patched[direction])), score(clean_logits),
                      score(at(r.corrupted_logits)), per_prompt)


def tolerance(expected):
    return 1e-4 * max(1.0, float(np.abs(expected).max()))


@pytest.mark.parametrize("direction", ["denoise", "noise"])
@pytest.mark.parametrize("metric_id,make,hand,normalize", METRICS, ids=[m[0] for m in METRICS])
def test_metric_in_sweep_matches_numpy(jp_tiny, runs, metric_id, make, hand, normalize, direction):
    metric = make(runs)
    assert metric.normalize == normalize
    for per_prompt in (False, True):
        got = patching.sweep(jp_tiny, runs.clean, runs.corrupted, "resid_pre", metric, direction=direction,
                             per_prompt=per_prompt, progress=False)
        expected = expected_sweep(runs, hand, normalize, direction, per_prompt)
        assert np.ptp(expected) > 1e-3, "the patches must change the metric"
        assert_close(got, expected, tolerance(expected), f"{metric_id} {direction} per_prompt={per_prompt}")


def test_no_op_and_full_patches_give_0_and_1(jp_tiny, runs):
    """Denoising at layer 0 of an unchanged position is a no-op (normalized 0); patching the
    last layer's resid_post at the last position restores the clean logits there (1)."""
    unchanged = [p for p in range(T) if p not in CHANGED]
    for make in (lambda r: metrics.logit_diff(r.answers, r.contrasts), lambda r: metrics.kl(normalize=True),
                 lambda r: metrics.probability(r.answers, normalize=True),
                 lambda r: metrics.logprob(r.answers, normalize=True)):
        metric = make(runs)
        got = patching.sweep(jp_tiny, runs.clean, runs.corrupted, "resid_pre", metric, progress=False)
        assert_close(got[0, unchanged], np.zeros(len(unchanged)), 1e-5, f"{metric.name}: no-op patches")
        got = patching.sweep(jp_tiny, runs.clean, runs.corrupted, "resid_post", metric, layers=[L - 1],
                             positions=[T - 1], per_prompt=True, progress=False)
        assert_close(got, np.ones((B, 1, 1)), 1e-4, f"{metric.name}: full patch")


@pytest.mark.parametrize("read", [[4, 5, 6], [3, 1, 5]])
def test_explicit_read_positions(jp_tiny, runs, read):
    """A metric reading other positions than the last: patches after the read position change nothing."""
    for metric, hand in ((metrics.logit_diff(runs.answers, runs.contrasts, positions=read, normalize=False),
                          "logit_diff"), (metrics.kl(positions=read), "kl")):
        for per_prompt in (False, True):
            got = patching.sweep(jp_tiny, runs.clean, runs.corrupted, "resid_pre", metric, per_prompt=per_prompt,
                                 progress=False)
            expected = expected_sweep(runs, hand, "baseline", "denoise", per_prompt, read=read)
            assert np.ptp(expected) > 1e-3
            assert_close(got, expected, tolerance(expected), f"{hand} read at {read}, per_prompt={per_prompt}")


def test_two_dimensional_positions_read_the_last_column(jp_tiny, runs):
    positions = np.array([[2, 4], [1, 5], [0, 6]])
    metric = metrics.logit_diff(runs.answers, runs.contrasts, positions=positions)
    assert metric.read_positions(B, T).tolist() == positions.tolist()
    got = patching.sweep(jp_tiny, runs.clean, runs.corrupted, "resid_pre", metric, progress=False)
    expected = expected_sweep(runs, "logit_diff", "range", "denoise", False, read=[4, 5, 6])
    assert_close(got, expected, tolerance(expected), "[B, K] positions")


def test_scalar_callable_is_normalized_after_reduction(jp_tiny, runs):
    """A TransformerLens-style callable returning the mean LD, normalize='range', is the mean-then-normalize value."""
    ans, con, rows = jnp.asarray(runs.answers), jnp.asarray(runs.contrasts), jnp.arange(B)
    mean_ld = lambda logits: (logits[rows, -1, ans] - logits[rows, -1, con]).mean()
    got = patching.sweep(jp_tiny, runs.clean, runs.corrupted, "resid_pre",
                         metrics.from_callable(mean_ld, normalize="range"), progress=False)
    expected = expected_sweep(runs, "logit_diff", "range", "denoise", False)
    assert_close(got, expected, tolerance(expected), "scalar callable")
    got = patching.sweep(jp_tiny, runs.clean, runs.corrupted, "resid_pre", metrics.from_callable(mean_ld),
                         progress=False)  # normalize="none": the raw patched mean LD
    raw = hand_scores("logit_diff", runs.patched["denoise"][..., -1, :], None, runs.answers, runs.contrasts).mean(-1)
    assert_close(got, raw, tolerance(raw), "raw scalar callable")


# --- Metric pieces --------------------------------------------------------------------------------


def test_scores_on_random_logits_match_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (4, 2, 50)).astype(np.float32)
    clean = rng.normal(0, 3, (4, 2, 50)).astype(np.float32)
    answers, contrasts = np.array([0, 7, 49, 3]), np.array([1, 1, 2, 48])
    for make, hand in ((metrics.logit_diff(answers, contrasts), "logit_diff"),
                       (metrics.probability(answers), "probability"),
                       (metrics.logprob(answers), "logprob"), (metrics.kl(), "kl")):
        got = make.score(jnp.asarray(logits), jnp.asarray(clean), make.batch_data(4))
        expected = hand_scores(hand, logits[:, -1], clean[:, -1], answers, contrasts)
        assert_close(got, expected, 1e-5, hand)
    # D_KL(P || P) = 0 and D_KL >= 0
    kl = metrics.kl_divergence(jnp.asarray(logits), jnp.asarray(clean))
    assert (np.asarray(kl) >= -1e-6).all()
    assert_close(metrics.kl_divergence(jnp.asarray(logits), jnp.asarray(logits)), np.zeros((4, 2)), 1e-6, "KL(P||P)")


def test_compare_modes():
    patched = np.array([[1.0, 2.0], [3.0, 5.0]])
    clean, corrupted = np.array([3.0, 5.0]), np.array([1.0, 1.0])
    metric = lambda normalize: metrics.Metric("m", None, normalize=normalize)
    assert_close(metric("none").normalized(patched, clean, corrupted), patched, 0)
    assert_close(metric("baseline").normalized(patched, clean, corrupted), [[0.0, 1.0], [2.0, 4.0]], 0)
    assert_close(metric("range").normalized(patched, clean, corrupted), [[0.0, 0.25], [1.0, 1.0]], 0)
    assert_close(metric("range").normalized(2.0, 3.0, 1.0), 0.5, 0)
    with pytest.raises(ValueError, match=r"unknown normalize='ranged'; valid: none, baseline, range"):
        metric("ranged")
    assert metrics.logit_diff([1], [2]).normalize == "range"
    assert metrics.logit_diff([1], [2], normalize=False).normalize == "baseline"
    assert metrics.probability([1]).normalize == "baseline"
    assert metrics.kl().normalize == "baseline" and metrics.kl(normalize=True).normalize == "range"
    assert metrics.from_callable(lambda x: x).normalize == "none"


def test_read_positions():
    m = metrics.logit_diff([1, 2, 3], [4, 5, 6])
    assert m.read_positions(3, 7).tolist() == [[6], [6], [6]]
    m = metrics.logit_diff([1, 2, 3], [4, 5, 6], positions=[0, 3, 6])
    assert m.read_positions(3, 7).tolist() == [[0], [3], [6]]
    m = metrics.kl(positions=2)
    assert m.read_positions(3, 7).tolist() == [[2], [2], [2]]
    assert metrics.from_callable(lambda x: x).read_positions(3, 7) is None
    with pytest.raises(ValueError, match=r"metric positions \[0, 7, 6\] out of range for 7 tokens"):
        metrics.kl(positions=[0, 7, 6]).read_positions(3, 7)
    with pytest.raises(ValueError, match=r"out of range for 7 tokens"):
        metrics.kl(positions=[0, -1, 6]).read_positions(3, 7)
    with pytest.raises(ValueError, match=r"metric positions cover 2 prompts, the batch has 3"):
        metrics.kl(positions=[0, 1]).read_positions(3, 7)
    with pytest.raises(ValueError, match=r"positions must be None, 'all' or an array, got 'last'"):
        metrics.Metric("m", None, positions="last").read_positions(3, 7)


def test_read_position_errors_in_a_sweep(jp_tiny, runs):
    metric = metrics.logit_diff(runs.answers, runs.contrasts, positions=[1, 2, T])
    with pytest.raises(ValueError, match=rf"out of range for {T} tokens"):
        patching.sweep(jp_tiny, runs.clean, runs.corrupted, "resid_pre", metric, progress=False)


def test_bad_answer_ids():
    with pytest.raises(ValueError, match=r"answers must be one non-negative token id per prompt, got \[\[1, 2\], \[3, 4\]\]"):
        metrics.logit_diff([[1, 2], [3, 4]], [1, 2])
    with pytest.raises(ValueError, match=r"contrasts must be one non-negative token id per prompt, got \[1, -2\]"):
        metrics.logit_diff([1, 2], [1, -2])
    with pytest.raises(ValueError, match=r"answers must be one non-negative token id per prompt"):
        metrics.probability([-1])
    with pytest.raises(ValueError, match=r"answers must be one non-negative token id per prompt"):
        metrics.logprob([1.5, 2.0])
    with pytest.raises(ValueError, match=r"answers must be one non-negative token id per prompt"):
        metrics.logit_diff(3, 4)  # a scalar, not one per prompt
    with pytest.raises(ValueError, match=r"metric 'probability': answer has shape \(2,\), expected one per prompt \(3\)"):
        metrics.probability([1, 2]).batch_data(3)
    with pytest.raises(TypeError, match=r"metric must be a jpatch Metric or a callable on logits, got str"):
        metrics.from_callable("logit_diff")
    m = metrics.kl()
    assert metrics.from_callable(m) is m


def test_wrong_number_of_answers_in_a_sweep(jp_tiny, runs):
    with pytest.raises(ValueError, match=r"answer has shape \(4,\), expected one per prompt \(3\)"):
        patching.sweep(jp_tiny, runs.clean, runs.corrupted, "resid_pre", metrics.probability([1, 2, 3, 4]),
                       progress=False)


def test_answer_outside_vocabulary_is_named(jp_tiny):
    from jpatch import patching
    tokens = np.zeros((2, 4), int)
    bad = metrics.logit_diff([1, jp_tiny.config.d_vocab + 5], [2, 3])
    with pytest.raises(ValueError, match=f"answer token id {jp_tiny.config.d_vocab + 5} is outside the vocabulary"):
        patching.sweep(jp_tiny, tokens, tokens + 1, "resid_pre", bad, progress=False)
