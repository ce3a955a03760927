"""What the engine needs to know about a metric: a `Metric` (score function, per-prompt data,
the logit positions it reads, its normalization), and plain callables made into Metrics.

A callable written TransformerLens's way (`lambda logits: logits[:, -1, ...]`) sees full
logits; its program is traced to find the positions and vocabulary columns it reads
(`jpatch.engine.reads`), so the engine unembeds only those (`narrowed`, `on_columns`). Concrete
metrics live in `jpatch.methods.metrics`.
"""

import dataclasses
from typing import Callable, Union

import jax
import jax.numpy as jnp
import numpy as np

from jpatch.engine import aggregate
from jpatch.engine.inputs import prompt_lengths
from jpatch.engine.reads import callable_reads, read_logits  # noqa: F401 (callable_reads: the API)
from jpatch.model.captured import MAX_LIFTED, captured_state, lift

NORMALIZATIONS = ("none", "baseline", "range")


@dataclasses.dataclass(frozen=True, eq=False)
class Metric:
    """score(logits [B, K, V], clean_logits [B, K, V], data) -> [B]; `data` holds
    per-prompt arrays (answer ids, ...) with a leading batch axis, so a sweep can
    chunk prompts and reuse one compiled `score` for new data.
    vocab_keys: the data keys holding every vocabulary id `score` reads (its logits at other ids
    never matter, so a sweep computes only those: `on_columns`); () when it may read any."""

    name: str
    score: Callable
    data: dict = dataclasses.field(default_factory=dict)
    positions: Union[None, str, np.ndarray] = None
    normalize: str = "range"
    vocab_keys: tuple = ()

    def __post_init__(self):
        if self.normalize not in NORMALIZATIONS:
            raise ValueError(f"unknown normalize={self.normalize!r}; valid: {', '.join(NORMALIZATIONS)}")
        if not isinstance(self.vocab_keys, tuple):
            raise ValueError(f"metric {self.name!r}: vocab_keys must be a tuple of data keys, got {self.vocab_keys!r}")
        for key in self.vocab_keys:  # a sweep computes only the logits at these ids: they must be ids
            value = self.data.get(key)
            dtype = value.dtype if hasattr(value, "dtype") else np.asarray(value).dtype  # no device copy
            if value is None or not np.issubdtype(dtype, np.integer):
                raise ValueError(f"metric {self.name!r}: vocab_keys names {key!r}, which is not an array of token ids "
                                 f"in its data (keys: {', '.join(map(repr, self.data)) or 'none'})")

    def read_positions(self, batch, pos, lengths=None):
        """The [batch, K] positions this metric reads for [batch, pos] tokens (None: all).

        lengths: [batch] real lengths of a right-padded batch; the default reads each
        prompt's last real token, and explicit positions must lie within each prompt.
        """
        if isinstance(self.positions, str):
            if self.positions != "all":
                raise ValueError(f"positions must be None, 'all' or an array, got {self.positions!r}")
            return None
        ends = np.full(batch, pos) if lengths is None else np.asarray(lengths)
        if self.positions is None:
            return (ends - 1)[:, None]
        positions = np.asarray(self.positions)
        positions = positions.reshape(positions.shape[0], -1) if positions.ndim else np.full((batch, 1), positions)
        if positions.shape[0] != batch:
            raise ValueError(f"metric positions cover {positions.shape[0]} prompts, the batch has {batch}")
        if (positions < 0).any() or (positions >= pos).any():
            raise ValueError(f"metric positions {positions.ravel().tolist()} out of range for {pos} tokens")
        past = np.argwhere(positions >= ends[:, None])
        if len(past):
            b = past[0, 0]
            raise ValueError(f"metric position {int(positions[b, past[0, 1]])} of prompt {b} is padding: "
                             f"the prompt has {int(ends[b])} real tokens")
        return positions

    def batch_data(self, batch):
        """`data` checked to have one entry per prompt."""
        for key, value in self.data.items():
            if np.shape(value)[:1] != (batch,):
                raise ValueError(f"metric {self.name!r}: {key} has shape {np.shape(value)}, expected one per prompt ({batch})")
        return {k: jnp.asarray(v) for k, v in self.data.items()}

    def normalized(self, patched, clean, corrupted):
        """Raw scores (any shape, broadcasting) normalized against the two baselines, by `self.normalize`."""
        return aggregate.normalize(self.normalize, patched, clean, corrupted)


def from_callable(fn, *, normalize="none", name=None):
    """Wrap a jittable `fn(logits [batch, pos, vocab]) -> [batch] or scalar`
    (a TransformerLens-style metric); it sees the logits at every position."""
    if isinstance(fn, Metric):
        return fn
    if not callable(fn):
        raise TypeError(f"metric must be a jpatch Metric or a callable on logits, got {type(fn).__name__}")
    return Metric(name or getattr(fn, "__name__", "custom"), _CallOnLogits(fn), {}, "all", normalize)


class _CallOnLogits:
    """A user callable as a `score`, equal (so jit reuses its compile) for the same callable reading
    the same values (`captured_state`, taken when the metric is wrapped); or, once `lifted`, for
    every callable of the same structure (`captured.lift`): its captured arrays then come in
    `data` (`CAPTURED`), one copy per prompt row, as arguments of the compiled program."""

    def __init__(self, fn, lifted=None):
        self.fn, self.lifted = fn, lifted
        self.state = captured_state(fn) if lifted is None else lifted.key

    def function(self, data):
        """The callable, its captured arrays taken from `data` when lifted."""
        if self.lifted is None:
            return self.fn
        names = [CAPTURED.format(i) for i in range(len(self.lifted.leaves))]
        if any(n not in data for n in names):  # never trace the callable's own values under a shared key
            raise RuntimeError("a lifted metric callable was scored without its captured arrays in `data`; "
                               "bind it with readout.prepare_metric and pass metric.batch_data(...)")
        values = [data[n] for n in names]
        if not any(isinstance(v, jax.core.Tracer) for v in values):  # called eagerly: its own values
            return self.fn
        return self.lifted.build([v[0] for v in values])

    def __call__(self, logits, clean_logits, data):
        return self.function(data)(logits)

    def __hash__(self):
        return hash((self.lifted is None, self.state) + ((id(self.fn),) if self.lifted is None else ()))

    def __eq__(self, other):
        return (isinstance(other, _CallOnLogits) and (other.lifted is None) == (self.lifted is None)
                and other.state == self.state and (self.lifted is not None or other.fn is self.fn))


CAPTURED = "captured.{}"  # the data key of a lifted callable's i-th captured array
LIFT_BYTES = 4 << 20  # at most this many bytes of captured arrays copied over the prompt rows


def lifted(metric, shape, rows):
    """A plain callable metric on logits `shape` keyed by its structure, with its captured arrays
    (`captured.lift`) as data [rows, ...] (one copy per prompt, so any consumer's row chunks see them
    whole): a closure defined anew for each call reuses the compiled program. Unchanged (keyed by
    its values) when it has none to pass, or traces differently with them passed (Python control
    flow or NumPy on a captured array, ...): the lifted function must give the same output types."""
    score = metric.score
    if not isinstance(score, _CallOnLogits) or score.lifted is not None:
        return metric
    split = lift(score.fn, min(MAX_LIFTED, LIFT_BYTES // (4 * max(shape[0], 1))))
    if split is None:
        return metric
    logits = jax.ShapeDtypeStruct(tuple(shape), jnp.float32)
    try:
        want = jax.eval_shape(score.fn, logits)
        got = jax.eval_shape(lambda lg, leaves: split.build(leaves)(lg), logits,
                             [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in split.leaves])
    except Exception:  # it needs its captured values concrete: keep them baked in
        return metric
    kinds = lambda tree: (jax.tree_util.tree_structure(tree),
                          [(a.shape, a.dtype, a.weak_type) for a in jax.tree_util.tree_leaves(tree)])
    if kinds(want) != kinds(got):
        return metric
    data = {CAPTURED.format(i): np.broadcast_to(a, (rows,) + a.shape) for i, a in enumerate(split.leaves)}
    return dataclasses.replace(metric, score=_CallOnLogits(score.fn, split), data={**metric.data, **data})


class _OnReadLogits:
    """A user callable (`_CallOnLogits`) fed only the logits it reads: [B, K, V] logits at its read
    positions are spread back to [B, T, V] by `data["slot"]` (the K index of each
    position; unread positions repeat a read one). The callable indexes that full-shaped
    array, so XLA computes only the gathered entries and never the unread positions."""

    def __init__(self, inner):
        self.inner = inner

    @property
    def fn(self):
        return self.inner.fn

    def __call__(self, logits, clean_logits, data):
        return self.inner(jnp.take_along_axis(logits, data["slot"][..., None], axis=1), clean_logits, data)

    def __hash__(self):
        return hash((_OnReadLogits, self.inner))

    def __eq__(self, other):
        return isinstance(other, _OnReadLogits) and other.inner == self.inner


class _OnColumns:
    """A user callable (`_CallOnLogits` or `_OnReadLogits`) fed only the vocabulary columns it reads:
    logits [B, K, C] at the ids `data[COLUMNS]` ([B, C], every row the same) are spread back to
    [B, K, vocab] (an unread column repeats a read one), which the callable indexes."""

    def __init__(self, inner, vocab):
        self.inner, self.vocab = inner, vocab

    @property
    def fn(self):
        return self.inner.fn

    def __call__(self, logits, clean_logits, data):
        columns = data[COLUMNS][0]
        slot = jnp.zeros(self.vocab, jnp.int32).at[columns].set(jnp.arange(columns.shape[0], dtype=jnp.int32))
        return self.inner(jnp.take(logits, slot, axis=-1), clean_logits, data)

    def __hash__(self):
        return hash((_OnColumns, self.inner, self.vocab))

    def __eq__(self, other):
        return isinstance(other, _OnColumns) and other.inner == self.inner and other.vocab == self.vocab


def is_user_callable(metric):
    """Whether `metric` wraps a plain callable (written for the whole batch, narrowed or not)."""
    return isinstance(metric.score, (_CallOnLogits, _OnReadLogits, _OnColumns))


COLUMNS = "columns"  # data key: the vocabulary ids whose logits a column-narrowed metric is fed
CALLABLE_COLUMNS = "callable_columns"  # data key: the ids a plain callable was traced to read


def _id_rows(ids, rows):
    """Distinct vocabulary ids [n] as [rows, C], each row the same: C a power of two, at least two per
    row (the first id repeated), so that new ids, two per prompt at most, keep the shape (and so the
    compiled programs that take them). None when there are none."""
    if not len(ids):
        return None
    size = 1 << (max(len(ids), 2 * rows) - 1).bit_length()
    return np.broadcast_to(np.concatenate([ids, np.full(size - len(ids), ids[0])]), (rows, size))


def on_columns(metric, vocab):
    """(`metric` fed only the logits of the vocabulary ids it reads, those ids [C]): a Metric's ids in
    `vocab_keys` become positions among them, a plain callable sees them spread back; C as `_id_rows`
    pads it. (metric, None) when it may read any id, or C would be over half the vocabulary."""
    if not metric.vocab_keys:
        return metric, None
    ids = np.unique(np.concatenate([np.asarray(metric.data[k]).ravel() for k in metric.vocab_keys]))
    rows = len(metric.data[metric.vocab_keys[0]])
    columns = _id_rows(ids, rows)
    if columns is None or 2 * columns.shape[1] > vocab:
        return metric, None
    data = {**metric.data, COLUMNS: columns}
    if is_user_callable(metric):
        return dataclasses.replace(metric, score=_OnColumns(metric.score, vocab), data=data), columns[0]
    data.update({k: np.searchsorted(ids, metric.data[k]) for k in metric.vocab_keys})
    return dataclasses.replace(metric, data=data), columns[0]


def narrowed(metric, shape, read=False):
    """A callable metric on full logits `shape` [batch, pos, vocab], as one reading only
    the positions it uses (`read`: its [batch, pos] reads when already known, else found by
    `callable_reads`); any other metric unchanged."""
    if not isinstance(metric.score, _CallOnLogits) or not isinstance(metric.positions, str):
        return metric
    read = callable_reads(metric.score.fn, shape) if read is False else read
    if read is None:
        return metric
    batch, pos = read.shape
    k = max(1, int(read.sum(1).max()))
    positions = np.zeros((batch, k), int)
    slot = np.zeros((batch, pos), np.int32)
    for b in range(batch):
        ids = np.flatnonzero(read[b])
        if len(ids):
            positions[b, : len(ids)], positions[b, len(ids) :] = ids, ids[0]
            slot[b, ids] = np.arange(len(ids))
    return dataclasses.replace(metric, score=_OnReadLogits(metric.score), positions=positions,
                               data={**metric.data, "slot": slot})


def checked_metric(metric, d_vocab):
    """`metric` as a Metric, its token ids checked against the vocabulary."""
    metric = from_callable(metric)
    for key in ("answer", "contrast"):
        ids = np.asarray(metric.data.get(key, []))
        if ids.size and ids.max() >= d_vocab:
            raise ValueError(f"metric {metric.name!r}: {key} token id {int(ids.max())} is outside the vocabulary "
                             f"[0, {d_vocab})")
    return metric


def prepare_metric(metric, d_vocab, batch, pos, mask, samples=1):
    """The metric checked and bound to this batch: its data and read positions (each prompt's
    last real token unless told otherwise) tiled over `samples` noise samples. A plain callable
    is traced once, here, for the positions and vocabulary ids it reads, and narrowed to those
    positions (`narrowed`; the ids go in its data for `on_columns`); its captured arrays become
    data, so a new closure of the same form reuses its program (`lifted`)."""
    metric = checked_metric(metric, d_vocab)
    if isinstance(metric.positions, str):  # a plain callable: its captured arrays as data, when it can
        metric = lifted(metric, (samples * batch, pos, d_vocab), batch)
    lengths = prompt_lengths(mask, batch, pos)
    reads, columns = False, None  # not traced
    if isinstance(metric.positions, str) and hasattr(metric.score, "fn"):
        reads, columns = read_logits(metric.score.fn, (samples * batch, pos, d_vocab))
    if isinstance(metric.positions, str) and mask is not None and (lengths < pos).any():
        # A plain callable on a padded batch: allowed only where it provably reads no padding.
        padded = np.tile(np.arange(pos) >= lengths[:, None], (samples, 1))
        if reads is None or reads is False or (reads & padded).any():
            where = "every position" if reads is None or reads is False else f"position {int(np.argmax((reads & padded).any(0)))}"
            raise ValueError(
                f"metric {metric.name!r} reads the logits at {where}, which is padding for some prompts of this "
                "batch. Use a jpatch Metric (jpatch.metrics.logit_diff, probability, kl, ...), which reads each "
                "prompt's last real token, or sweep prompts of one length without attention_mask"
            )
    read = metric.read_positions(batch, pos, None if mask is None else lengths)
    tile = lambda a: np.tile(np.asarray(a), (samples,) + (1,) * (np.ndim(a) - 1))
    data = {k: tile(v) for k, v in metric.batch_data(batch).items()}
    if columns is not None:  # the same ids for every prompt row
        data[CALLABLE_COLUMNS] = _id_rows(np.flatnonzero(columns), samples * batch)
    metric = dataclasses.replace(metric, data=data, positions="all" if read is None else tile(read),
                                 vocab_keys=metric.vocab_keys if columns is None else (CALLABLE_COLUMNS,))
    return narrowed(metric, (samples * batch, pos, d_vocab), reads)
