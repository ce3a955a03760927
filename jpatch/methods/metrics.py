"""Patching metrics as jitted reductions over the logits a sweep computes.

A `Metric` has three parts:
- `score(logits, clean_logits) -> [batch]`: a raw per-prompt score of one run,
  from float32 logits at the positions it reads ([batch, K, vocab]);
- `positions`: which positions it reads ([batch, K] ids; None = the last one,
  "all" = every position, for callables written against full logits);
- `normalize`: how a patched score is compared with the clean and corrupted runs:
  "none" (the raw score), "baseline" (minus the corrupted run: P_pt - P_*),
  "range" ((s_pt - s_*) / (s_cl - s_*): 0 = corrupted, 1 = clean).

The comparison is the same whichever way a sweep patches (denoising or noising),
so 1 always means "clean behaviour", 0 "corrupted behaviour".
"""

import jax
import jax.numpy as jnp
import numpy as np

from jpatch.model.types import Ids
from jpatch.engine.readout import NORMALIZATIONS, Metric, callable_reads, from_callable, narrowed  # noqa: F401 (the API)


def _at(logits, ids):
    """logits [B, V], ids [B] -> [B]."""
    return jnp.take_along_axis(logits, ids[:, None], axis=-1)[:, 0]


def _ids(ids, what):
    ids = np.asarray(ids)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer) or (ids < 0).any():
        raise ValueError(f"{what} must be one non-negative token id per prompt, got {ids.tolist()}")
    return ids


def _logit_diff(logits, clean_logits, data):
    last = logits[:, -1]
    return _at(last, data["answer"]) - _at(last, data["contrast"])


def _probability(logits, clean_logits, data):
    return _at(jax.nn.softmax(logits[:, -1], axis=-1), data["answer"])


def _logprob(logits, clean_logits, data):
    return _at(jax.nn.log_softmax(logits[:, -1], axis=-1), data["answer"])


def kl_divergence(p_logits, q_logits):
    """D_KL(P || Q) over the last axis, from logits."""
    log_p = jax.nn.log_softmax(p_logits, axis=-1)
    log_q = jax.nn.log_softmax(q_logits, axis=-1)
    return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)


def _neg_kl(logits, clean_logits, data):
    return -kl_divergence(clean_logits[:, -1], logits[:, -1])


def logit_diff(answers: Ids, contrasts: Ids, *, positions=None, normalize=True) -> Metric:
    """LD = logit(answer) - logit(contrast) at the last read position; normalized
    (LD_pt - LD_*) / (LD_cl - LD_*) by default, as the paper recommends."""
    data = {"answer": _ids(answers, "answers"), "contrast": _ids(contrasts, "contrasts")}
    return Metric("logit_diff", _logit_diff, data, positions, "range" if normalize else "baseline",
                  vocab_keys=("answer", "contrast"))


def probability(answers: Ids, *, positions=None, normalize=False) -> Metric:
    """P(answer): P_pt(r) - P_*(r), or (P_pt - P_*) / (P_cl - P_*) when normalized."""
    return Metric("probability", _probability, {"answer": _ids(answers, "answers")}, positions,
                  "range" if normalize else "baseline")


def logprob(answers: Ids, *, positions=None, normalize=False) -> Metric:
    """log P(answer), compared with the corrupted run (or normalized)."""
    return Metric("logprob", _logprob, {"answer": _ids(answers, "answers")}, positions,
                  "range" if normalize else "baseline")


def kl(*, positions=None, normalize=False) -> Metric:
    """D_KL(P_cl || P_*) - D_KL(P_cl || P_pt) over the full next-token distribution
    (divided by D_KL(P_cl || P_*) when normalized)."""
    return Metric("kl", _neg_kl, {}, positions, "range" if normalize else "baseline")


# The metrics the command line and dataset files name, each with the per-example fields it needs.
METRICS = {"logit-diff": ("answer", "contrast"), "prob": ("answer",), "kl": (), "logprob": ("answer",)}


def by_name(name, answers=None, contrasts=None):
    """The Metric a command-line name stands for ("logit-diff" is normalized)."""
    if name == "logit-diff":
        return logit_diff(answers, contrasts)
    if name == "prob":
        return probability(answers)
    if name == "logprob":
        return logprob(answers)
    if name == "kl":
        return kl()
    raise ValueError(f"unknown metric {name!r}; valid: {', '.join(METRICS)}")
