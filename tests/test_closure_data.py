"""A metric closure is data, not code (jpatch.model.captured.lift, jpatch.engine.readout.lifted):
closures of one form over new answer ids or baselines, defined anew for each call, compile once and
each gives its own numbers (TransformerLens's patching on the same weights as the reference); what
cannot be passed exactly (float64 values, a value the callable needs concrete, a bound method of an
object) is keyed by its values instead: it recompiles and still gives its own numbers."""

import numpy as np
import pytest
import torch
from transformer_lens import patching as tl_patching

import reference
from jpatch import patching
from jpatch.engine.readout import from_callable, lifted

B, T, V = 3, 6, reference.TINY["vocab_size"]
ROWS = np.arange(B)
answers = np.array([1, 2, 3])  # a notebook's global, rebound by a test


@pytest.fixture(scope="module")
def runs(jp_tiny, tl_tiny):
    clean = reference.random_tokens(B, T, V, seed=11)
    corrupted = clean.copy()
    corrupted[:, 1] = (corrupted[:, 1] + 5) % V
    _, cache = jp_tiny.run_with_cache(clean)
    with torch.no_grad():
        _, tl_cache = tl_tiny.run_with_cache(torch.tensor(clean))
    return corrupted, cache, tl_cache


def tl_expected(tl_tiny, runs, metric):
    corrupted, _, tl_cache = runs
    with torch.no_grad():
        return tl_patching.get_act_patch_resid_pre(tl_tiny, torch.tensor(corrupted), tl_cache, metric).numpy()


def sweep(jp_tiny, runs, metric):
    """get_act_patch_resid_pre and the number of XLA compiles it caused."""
    corrupted, cache, _ = runs
    return reference.count_compiles(lambda: np.asarray(
        patching.get_act_patch_resid_pre(jp_tiny, corrupted, cache, metric, progress=False)))


def logit_diff(a, b, baseline):
    """TransformerLens's style: a fresh closure over answer ids and a baseline for each call."""
    return lambda logits: (logits[ROWS, -1, a] - logits[ROWS, -1, b]).mean() - baseline


def torch_logit_diff(a, b, baseline):
    a, b, rows = torch.tensor(a), torch.tensor(b), torch.tensor(ROWS)
    return lambda logits: (logits[rows, -1, a] - logits[rows, -1, b]).mean() - float(baseline)


def test_closures_of_one_form_compile_once(jp_tiny, tl_tiny, runs):
    values = [(np.array([3, 5, 7]), np.array([2, 4, 6]), np.float32(0.25)),
              (np.array([9, 11, 13]), np.array([20, 30, 40]), np.float32(-1.5)),
              (np.array([100, 1, 50]), np.array([7, 7, 7]), np.float32(3.0))]
    compiles = []
    for a, b, baseline in values:
        got, n = sweep(jp_tiny, runs, logit_diff(a, b, baseline))
        compiles.append(n)
        np.testing.assert_allclose(got, tl_expected(tl_tiny, runs, torch_logit_diff(a, b, baseline)), atol=1e-5,
                                   err_msg=f"answers {a} {b}, baseline {baseline}")
    assert compiles[0] > 0 and compiles[1:] == [0, 0], compiles  # one program for the three closures
    # Defaults and a rebound global (a notebook reusing its lambda) are passed the same way.
    global answers
    for ids in ([4, 8, 15], [16, 23, 42]):
        answers = np.array(ids)
        got, n = sweep(jp_tiny, runs, lambda logits, b=np.array([1, 1, 2]): (logits[ROWS, -1, answers]
                                                                             - logits[ROWS, -1, b]).mean())
        np.testing.assert_allclose(got, tl_expected(tl_tiny, runs, torch_logit_diff(answers, [1, 1, 2], 0)),
                                   atol=1e-5)
    assert n == 0


class Answers:
    def __init__(self, a, b):
        self.a, self.b = a, b

    def diff(self, logits):
        return (logits[ROWS, -1, self.a] - logits[ROWS, -1, self.b]).mean()


def test_what_cannot_be_passed_is_keyed_by_value(jp_tiny, tl_tiny, runs):
    """A callable that needs a captured value concrete (a slice bound) recompiles for each value
    and gives its own numbers."""
    def first_k(k, a):
        return lambda logits: logits[ROWS, -1, a][:k].sum()

    def torch_first_k(k, a):
        return lambda logits: logits[torch.tensor(ROWS), -1, torch.tensor(a)][:k].sum()

    for k, a in ((np.int64(2), [3, 5, 7]), (np.int64(1), [9, 9, 9])):
        got, n = sweep(jp_tiny, runs, first_k(k, np.array(a)))
        np.testing.assert_allclose(got, tl_expected(tl_tiny, runs, torch_first_k(int(k), a)), atol=1e-5)
        assert n > 0  # its own program, not the previous closure's


def test_lifting_keys_by_structure():
    """Equal for one form over new values; different for a new shape, code or baked value; a
    callable that needs a captured value concrete is not lifted."""
    score = lambda fn: lifted(from_callable(fn), (B, T, V), B).score
    total = lambda a, scale=1.0: score(lambda lg: lg[ROWS, -1, a].sum() * scale)
    a, a2 = np.array([1, 2, 3]), np.array([4, 5, 6])
    assert total(a) == total(a2) and hash(total(a)) == hash(total(a2))
    assert total(a) != total(a[:2])  # shape
    assert total(a) != total(a.astype(np.int8))  # dtype
    assert total(a, 2.0) != total(a, 3.0)  # a Python float is baked in
    assert total(a) != score(lambda lg: lg[ROWS, -1, a].sum() * 1.0)  # code
    assert total(a, np.float32(2)) == total(a, np.float32(3))  # passed
    assert total(a, np.float64(2)) != total(a, np.float64(3))  # float64 is baked (JAX would narrow it)
    assert len(total(a, np.float64(2)).lifted.leaves) == len(total(a, np.float32(2)).lifted.leaves) - 1
    first = lambda k: score(lambda lg: lg[:, -1, :k].sum())
    assert first(np.int64(2)).lifted is None and first(np.int64(2)) != first(np.int64(2))  # stays concrete
    # a bound method of an object (its arrays are attributes): keyed by the method object
    assert score(Answers(a, a2).diff).lifted is None and score(Answers(a, a2).diff) != score(Answers(a, a2).diff)
