"""A compiled program is reused for a user's callable only while what it reads is unchanged
(jpatch.model.captured): a notebook that rebinds `answers` and reuses its metric lambda, or changes
the vector an `Apply` adds, gets the new numbers (TransformerLens and an `Add` override as the
references), and an unchanged callable compiles nothing new."""

import jax
import numpy as np
import torch
from transformer_lens import patching as tl_patching

import jpatch
import reference
from jpatch import patching

B, T, V = 3, 7, reference.TINY["vocab_size"]
ROWS = np.arange(B)
answers = np.array([3, 5, 7])  # rebound by the test, read by the metric below as a global


def metric(logits):
    return logits[ROWS, -1, answers].mean()


def swept(jp_tiny, tl_tiny, position):
    """Corrupted tokens (changed at `position`) and both tools' clean caches."""
    clean = reference.random_tokens(B, T, V, seed=5)
    corrupted = clean.copy()
    corrupted[:, position] = (corrupted[:, position] + 7) % V
    _, cache = jp_tiny.run_with_cache(clean)
    with torch.no_grad():
        _, tl_cache = tl_tiny.run_with_cache(torch.tensor(clean))
    return corrupted, cache, tl_cache


def test_a_reused_metric_reads_the_rebound_global(jp_tiny, tl_tiny):
    global answers
    corrupted, cache, tl_cache = swept(jp_tiny, tl_tiny, 2)
    for ids in ([3, 5, 7], [9, 11, 13]):
        answers = np.array(ids)
        got = np.asarray(patching.get_act_patch_resid_pre(jp_tiny, corrupted, cache, metric, progress=False))
        with torch.no_grad():
            expected = tl_patching.get_act_patch_resid_pre(
                tl_tiny, torch.tensor(corrupted), tl_cache,
                lambda logits: logits[torch.tensor(ROWS), -1, torch.tensor(answers)].mean()).numpy()
        np.testing.assert_allclose(got, expected, atol=1e-5, err_msg=f"answers {ids}")
    compiles = []
    listener = lambda event, duration, **kw: compiles.append(event) if "backend_compile" in event else None
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        patching.get_act_patch_resid_pre(jp_tiny, corrupted, cache, metric, progress=False)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert not compiles  # nothing it reads changed: the compiled programs are reused


position = -1  # rebound by the test below, read by its metric as a global


def metric_at(logits):
    return logits[ROWS, position, 4].mean()


def test_a_reused_metric_reads_the_rebound_position(jp_tiny, tl_tiny):
    """The logit positions (and vocabulary ids) a callable reads are traced anew for each call: JAX's
    cached trace of the function kept the global of the first (fails before that)."""
    global position
    corrupted, cache, tl_cache = swept(jp_tiny, tl_tiny, 1)
    for position in (-1, 3):
        got = np.asarray(patching.get_act_patch_resid_pre(jp_tiny, corrupted, cache, metric_at, progress=False))
        with torch.no_grad():
            expected = tl_patching.get_act_patch_resid_pre(
                tl_tiny, torch.tensor(corrupted), tl_cache, lambda logits: logits[torch.tensor(ROWS), position, 4].mean()
            ).numpy()
        np.testing.assert_allclose(got, expected, atol=1e-5, err_msg=f"position {position}")


def test_apply_reads_the_changed_vector(jp_tiny):
    tokens = reference.random_tokens(B, T, V, seed=6)
    v = np.zeros(reference.TINY["n_embd"], np.float32)
    add = lambda act: act + v
    for value in (0.5, -1.5):
        v[:] = value  # changed in place, the same array object
        got = jp_tiny(tokens, overrides={"blocks.1.hook_resid_pre": jpatch.Apply(add)})
        expected = jp_tiny(tokens, overrides={"blocks.1.hook_resid_pre": jpatch.Add(np.full_like(v, value))})
        np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-5)
