"""A sweep's inputs: `Run`s (tokens, right-padding mask, overrides such as Gaussian noise),
checked to pair up, their padding mask and real lengths, and the patching directions."""

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from jpatch.model import hooks, padding, sites

DIRECTIONS = ("denoise", "noise")  # denoise: corrupted run, clean values patched in; noise: the reverse


def check_direction(direction):
    if direction not in DIRECTIONS:
        raise ValueError(f"unknown direction {direction!r}; valid: {', '.join(DIRECTIONS)}")
    return direction


def token_array(tokens, what="tokens"):
    """[batch, pos] integer token ids as a NumPy array, or a clear error."""
    t = np.asarray(tokens)
    if t.ndim != 2 or not np.issubdtype(t.dtype, np.integer):
        raise ValueError(f"{what} must be a [batch, pos] array of integer token ids, got shape {t.shape} dtype {t.dtype}")
    return t


@dataclasses.dataclass(frozen=True)
class Run:
    """One input to the model: tokens plus model overrides on its global sites
    (e.g. Gaussian noise on `hook_embed`). `samples` runs of the same `batch`
    prompts are stacked sample-major: tokens has samples x batch rows.
    attention_mask: [rows, pos] right-padding mask of a ragged batch (None: no padding)."""

    tokens: np.ndarray
    overrides: dict = dataclasses.field(default_factory=dict)
    samples: int = 1
    attention_mask: Optional[np.ndarray] = None

    @property
    def batch(self):
        return self.tokens.shape[0] // self.samples

    def tiled(self, samples):
        """The same run repeated to `samples` x batch rows."""
        if self.samples == samples:
            return self
        if self.samples != 1:
            raise ValueError(f"cannot pair a run of {self.samples} samples with one of {samples}")
        if set(self.overrides) - set(sites.GLOBAL_SITES):
            raise ValueError("only a run whose overrides are on global sites (e.g. hook_embed) can be tiled over samples")
        tile = lambda a: jnp.tile(a, (samples,) + (1,) * (a.ndim - 1))  # global sites: batch is axis 0
        overrides = {k: jax.tree_util.tree_map(tile, v) for k, v in self.overrides.items()}
        mask = None if self.attention_mask is None else np.tile(self.attention_mask, (samples, 1))
        return Run(np.tile(self.tokens, (samples, 1)), overrides, samples, mask)


def as_run(x, what):
    run = x if isinstance(x, Run) else None
    tokens = np.asarray(x.tokens if run else x)
    if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"{what} must be [batch, pos] token ids or a Run, got shape {tokens.shape} {tokens.dtype}")
    if 0 in tokens.shape:
        raise ValueError(f"{what} holds no tokens (shape {tokens.shape}): need at least one prompt of at least one token")
    return run or Run(tokens)


def check_base(base):
    """Refuse a base run (patched, or differentiated) with overrides past the embeddings: each patched
    run starts from the base run's cache and recomputes later layers without its overrides."""
    late = sorted(set(base.overrides) - {"hook_embed", "hook_pos_embed"})
    if late:
        raise ValueError(
            f"the base run (the corrupted run when denoising, the clean run when noising) overrides "
            f"{', '.join(late)}; a base run may only override hook_embed / hook_pos_embed. Use such a run "
            "(e.g. a zero / mean ablation) as the source of patched values: direction='noise'")


def paired_runs(clean, corrupted):
    """The clean and corrupted inputs of a sweep as Runs, checked to pair up: one clean sample,
    the same [batch, pos] shape (the corrupted run may stack several noise samples)."""
    clean, corrupted = as_run(clean, "clean"), as_run(corrupted, "corrupted")
    if clean.samples != 1:
        raise ValueError("the clean run must have a single sample")
    if clean.tokens.shape[1:] != corrupted.tokens.shape[1:] or clean.batch != corrupted.batch:
        raise ValueError(f"clean tokens {clean.tokens.shape} and corrupted tokens {corrupted.tokens.shape} "
                         f"({corrupted.samples} sample(s)) must have the same [batch, pos] shape")
    return clean, corrupted


def batch_mask(attention_mask, *runs, pad_id=padding.PAD_ID, names=("clean", "corrupted")):
    """The [batch, pos] right-padding mask of a sweep's prompts, or None when the batch is not padded.

    It is `attention_mask`, or the one the runs carry (they must agree). Without any, a batch whose
    rows end in pad ids (<|endoftext|>, the vocabulary's last id) in some rows only is refused: it looks padded.
    """
    B, T = runs[0].batch, runs[0].tokens.shape[1]
    given = [("attention_mask", attention_mask)] + [(f"the {w} run's attention_mask", r.attention_mask)
                                                    for w, r in zip(names, runs)]
    given = [(w, np.asarray(m)[:B].astype(bool)) for w, m in given if m is not None]
    if not given:
        for what, run in zip(names, runs):
            padding.refuse_hidden_padding(run.tokens, f"{what} tokens", pad_id)
        return None
    for what, m in given[1:]:
        if m.shape != given[0][1].shape or (m != given[0][1]).any():
            raise ValueError(f"{what} differs from {given[0][0]}: the clean and corrupted prompts must have the same "
                             "real lengths")
    padding.lengths_of(given[0][1], (B, T), given[0][0])
    return given[0][1]


def checked_inputs(model, clean, corrupted, attention_mask=None):
    """The one input check of every method (sweep, get_act_patch_*, attribute, edge_attribution,
    path_patch, faithfulness, acdc, agreement): (clean, corrupted, mask), the inputs as paired `Run`s
    (`paired_runs`), token ids the model can run, and the batch's right-padding mask (`batch_mask`:
    a batch that looks padded without one is refused). clean None: only the corrupted run is given
    (TransformerLens's functions take the clean run as a cache). A model with hooks added by add_hook is
    refused: the methods run their own compiled forwards, without them."""
    hooks.refuse_hooked(model)
    if clean is None:
        corrupted = as_run(corrupted, "corrupted_tokens")
        runs, names = (corrupted,), ("corrupted",)
    else:
        clean, corrupted = paired_runs(clean, corrupted)
        runs, names = (clean, corrupted), ("clean", "corrupted")
    for run in runs:
        # Here, not only in the forward: a method whose forward is compiled sees traced tokens, and
        # the embedding lookup clamps an id past the vocabulary (50300 -> 50256) or wraps a negative one.
        model.check_tokens(run.tokens)
    return clean, corrupted, batch_mask(attention_mask, *runs, pad_id=model.pad_id, names=names)


ROUNDING = 1e-5  # one number computed by two float32 programs agrees to this, relative to its size


def rounding_equal(a, b):
    """Whether float32 results a and b are the same number up to rounding (elementwise). Relative to
    their own size, not to 1: a probability of 1.76e-5 against 1.75e-5 is a real gap."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b) <= ROUNDING * np.maximum(np.abs(a), np.abs(b))


def check_baselines(metric, clean_score, corrupted_score, rows, *, per_prompt=False, samples=1):
    """Refuse what a metric's clean and corrupted baselines say it cannot measure: a metric returns a
    scalar or one finite value per prompt row (`rows`, samples x batch), and a "range" metric divides
    by clean - corrupted, which must not be zero up to rounding (e.g. clean == corrupted: the quotient
    would be rounding noise over rounding noise). per_prompt: each prompt (its noise samples averaged)
    is normalized by its own gap. corrupted_score None: only the clean run's score is checked."""
    for what, score in (("clean", clean_score), ("corrupted", corrupted_score)):
        if score is None:
            continue
        score = np.asarray(score)
        if score.shape not in ((), (rows,)):
            raise ValueError(f"metric {metric.name!r} must return a scalar or one value per prompt ({rows}), got "
                             f"shape {score.shape}")
        if not np.isfinite(score).all():
            raise FloatingPointError(f"metric {metric.name!r} is not finite on the {what} run: check the metric")
    if metric.normalize != "range" or corrupted_score is None:
        return
    by_prompt = (lambda a: np.asarray(a, np.float64).reshape(samples, -1).mean(0)) if per_prompt else np.mean
    clean_score, corrupted_score = by_prompt(clean_score), by_prompt(corrupted_score)
    same = np.flatnonzero(rounding_equal(clean_score, corrupted_score))
    if len(same):
        which = f" for prompt {same[0]}" if clean_score.ndim else ""
        raise ValueError(
            f"metric {metric.name!r} scores the clean and corrupted runs the same{which} up to float32 rounding "
            f"({float(clean_score.flat[same[0]]):g} and {float(corrupted_score.flat[same[0]]):g}): a 'range' metric "
            "cannot be normalized by their difference (are clean and corrupted the same inputs?)")


def prompt_lengths(mask, batch, pos):
    """[batch] real lengths: the mask's row sums, or `pos` for every prompt of an unpadded batch."""
    return np.full(batch, pos) if mask is None else mask.sum(1)
