"""A whole-batch callable metric split at its reduction over prompts (jpatch.engine.metric_split):
scored in prompt chunks and combined, it equals the callable run by JAX on the whole batch; a
callable that mixes prompts any other way is not split."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jpatch.engine import metric_split
from jpatch.engine.readout import from_callable, lifted, narrowed

N, K, V = 4, 3, 11
rng = np.random.default_rng(0)
rows = np.arange(N)
a, c = rng.integers(0, V, N), rng.integers(0, V, N)
pair = jnp.stack([a, c], 1)

SPLIT = {
    "logit_diff_mean": lambda lg: (lg[rows, -1, a] - lg[rows, -1, c]).mean(),
    "normalized": lambda lg: ((lg[rows, -1, a] - lg[rows, -1, c]).mean() - 0.3) / 1.7,
    "per_prompt": lambda lg: lg[rows, -1, a] - lg[rows, -1, c],
    "take_and_dot": lambda lg: (jnp.take_along_axis(lg[:, -1], pair, 1) @ jnp.array([1.0, -1.0])).mean(),
    "kl_like": lambda lg: (jax.nn.softmax(lg[:, -1]) * jax.nn.log_softmax(lg[:, -1])).sum(-1).mean(),
    "std": lambda lg: (lg[rows, -1, a] - lg[rows, -1, c]).std(),
    "second_position": lambda lg: (lg[:, 1, 0] * 2.0).sum(),
    "sorted": lambda lg: jnp.sort(lg[rows, -1, a])[0],  # any mixing after the per-prompt value
}
NOT_SPLIT = {
    "two_means": lambda lg: lg[rows, -1, a].mean() - lg[rows, -1, c].mean(),  # two per-prompt values
    "rows_crossed": lambda lg: (lg[rows, -1, a] - lg[rows[::-1], -1, c]).mean(),  # prompt i reads prompt N-1-i
    "batch_mean_first": lambda lg: lg.mean(0)[-1, a[0]],
}


def chunked(split, logits, chunks):
    """The split's per-prompt values scored chunk by chunk as the engine does, then combined."""
    values = []
    for chunk in chunks:
        data = {"split.rows": jnp.asarray(split.data["split.rows"][chunk]),
                "split.full": [jnp.asarray(x[chunk]) for x in split.data["split.full"]]}
        values.append(jax.jit(split.score)(logits[jnp.asarray(chunk)], None, data))
    return split.combine(jnp.concatenate(values)[None])[0]


@pytest.mark.parametrize("name", sorted(SPLIT))
def test_split_callables_give_the_whole_batch_value(name):
    fn = SPLIT[name]
    metric = from_callable(fn)
    split = metric_split.split(metric.score, metric.batch_data(N), (N, K, V))
    assert split is not None
    logits = jnp.asarray(rng.normal(size=(N, K, V)), jnp.float32)
    for chunks in ([[0, 1], [2, 3]], [[0], [1], [2], [3]], [[0, 1, 2, 3]]):
        np.testing.assert_allclose(chunked(split, logits, chunks), np.asarray(fn(logits)), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", sorted(NOT_SPLIT))
def test_callables_mixing_prompts_otherwise_are_not_split(name):
    metric = from_callable(NOT_SPLIT[name])
    assert metric_split.split(metric.score, metric.batch_data(N), (N, K, V)) is None


def test_lifted_and_narrowed_callables_split_with_their_data():
    """A closure's captured arrays passed as data (lifted) and a callable fed only the positions it
    reads (narrowed) split too, and new answer ids give their own numbers from the same program."""
    make = lambda x, y: (lambda lg: (lg[rows, -1, x] - lg[rows, -1, y]).mean())
    logits = jnp.asarray(rng.normal(size=(N, K, V)), jnp.float32)
    scores = []
    for x, y in ((a, c), (c, a)):
        fn = make(x, y)
        metric = narrowed(lifted(from_callable(fn), (N, K, V), N), (N, K, V))
        read = jnp.take_along_axis(logits, jnp.asarray(metric.positions)[..., None], axis=1)
        split = metric_split.split(metric.score, metric.batch_data(N), read.shape)
        assert split is not None
        np.testing.assert_allclose(chunked(split, read, [[0, 2], [1, 3]]), np.asarray(fn(logits)), rtol=1e-6)
        scores.append(split.score)
    assert scores[0] == scores[1] and hash(scores[0]) == hash(scores[1])  # one compiled program for both
