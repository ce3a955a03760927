"""Ablations in common use, as corruptions: zero, mean (over a dataset) and resampling.

Zero / mean ablation Runs override a per-layer site at every layer, so they are sources of
patched values only: use them with direction="noise" (the clean run with one component set to
its ablation value); `sweep` refuses them as the base run. Resampling draws other prompts.
"""

import jax.numpy as jnp
import numpy as np

from jpatch.engine.inputs import Run, token_array
from jpatch.model import sites
from jpatch.model.gpt2 import Override


def _as_site(site):
    """A site without layer ("mlp_out", "hook_mlp_out", "attn.hook_z", "hook_embed")."""
    if site.startswith("blocks."):
        name = sites.parse(site)[0]
        raise ValueError(
            f"ablation runs override a site at every layer; pass the site without its layer "
            f"({name!r}, not {site!r}) and choose the layer in the sweep"
        )
    return sites.canonical(site)


def _dataset_rows(dataset_tokens, what="dataset_tokens"):
    """A [n, pos] array or a list of 1-D token sequences -> list of int arrays."""
    try:
        arr = np.asarray(dataset_tokens)
    except ValueError:
        arr = None
    if arr is not None and arr.dtype != object:
        if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"{what} must be [n, pos] token ids or a list of token sequences, got shape {arr.shape}")
        return list(arr)
    rows = [np.asarray(r) for r in dataset_tokens]
    for i, r in enumerate(rows):
        if r.ndim != 1 or not np.issubdtype(r.dtype, np.integer) or not r.size:
            raise ValueError(f"{what}: prompt {i} must be a non-empty 1-D sequence of token ids, got {r.tolist()}")
    return rows


def _ablation_run(model, tokens, site, value):
    """A Run of `tokens` whose `site` is `value` everywhere (all layers, prompts, positions).

    value broadcasts to one layer's activation; for a per-layer site it has a
    leading [n_layer] axis (the engine's override layout).
    """
    mask_shape = value.shape[:1] + (1,) * (value.ndim - 1) if site in sites.LAYER_AXES else (1,) * value.ndim
    return Run(tokens, {site: Override(value, jnp.ones(mask_shape, bool))})


def zero_ablation(model, tokens, site):
    """The clean prompts with `site` set to zero at every layer and position.

    tokens: [batch, pos]; site: a site without layer ("mlp_out", "attn.hook_z", ...).
    A source of patched values: `sweep(model, tokens, zero_ablation(model, tokens,
    site), site, metric, direction="noise")` zeroes one layer (position, head) at a
    time. (Its corrupted baseline is the run with the site zeroed everywhere.)
    Returns Run(tokens, {site: Override(zeros [n_layer, 1, ...], mask)}).
    """
    tokens = token_array(tokens)
    site = _as_site(site)
    n_dims = len(sites.activation_shape(model.config, site, *tokens.shape))
    lead = (model.config.n_layer,) if site in sites.LAYER_AXES else ()
    return _ablation_run(model, tokens, site, jnp.zeros(lead + (1,) * n_dims, model.dtype))


def _run_dataset(model, rows, site, chunk):
    """Yield the site's stacked activations ([n_layer, n, pos, ...] or [n, pos, ...])
    over the dataset prompts, grouped by length and chunked."""
    by_length = {}
    for r in rows:
        by_length.setdefault(len(r), []).append(r)
    for group in by_length.values():
        group = np.stack(group)
        for i in range(0, len(group), chunk):
            _, cache = model.run_with_cache(group[i : i + chunk], names_filter=site)
            yield cache.stacked(site).astype(jnp.float32)


def mean_ablation(model, tokens, site, dataset_tokens, *, chunk=64):
    """The clean prompts with `site` set to its mean over a dataset, at every layer.

    tokens: [batch, pos]; site: a site without layer; dataset_tokens: [n, pos_d]
    token ids or a list of token sequences (e.g. prompts of the task's distribution).
    The mean is over the dataset prompts per position when every dataset prompt
    has the prompts' length pos, otherwise over all prompts and positions (not
    possible for the attention pattern, whose shape depends on the length).
    The activations are those of the unablated model. Use as a source of patched
    values (direction="noise"), like `zero_ablation`.
    Returns Run(tokens, {site: Override(mean [n_layer, 1, pos or 1, ...], mask)}).
    """
    tokens = token_array(tokens)
    site = _as_site(site)
    rows = _dataset_rows(dataset_tokens)
    if not rows:
        raise ValueError("dataset_tokens is empty")
    for i, r in enumerate(rows):
        if ((r < 0) | (r >= model.config.d_vocab)).any():
            raise ValueError(f"dataset prompt {i} has token ids outside the vocabulary [0, {model.config.d_vocab})")
    T = tokens.shape[1]
    per_layer = site in sites.LAYER_AXES
    b = 1 if per_layer else 0  # the batch axis of a stacked activation
    per_position = all(len(r) == T for r in rows)
    if not per_position and site == "attn.hook_pattern":
        lengths = sorted({len(r) for r in rows})
        raise ValueError(
            f"mean ablation of the attention pattern needs dataset prompts of the prompts' length {T}, "
            f"got lengths {lengths}"
        )
    total, count = 0.0, 0
    for acts in _run_dataset(model, rows, site, chunk):
        if per_position:
            total, count = total + acts.sum(b, keepdims=True), count + acts.shape[b]
        else:  # pool prompts and positions
            total = total + acts.sum((b, b + 1), keepdims=True)
            count += acts.shape[b] * acts.shape[b + 1]
    return _ablation_run(model, tokens, site, (total / count).astype(model.dtype))


def resample_indices(tokens, dataset_tokens, *, n_samples=1, seed=0):
    """Which dataset prompt replaces each prompt: int indices [n_samples, batch].

    Drawn uniformly (NumPy default_rng(seed)) among the dataset prompts of the
    prompt's length that are not the prompt itself (no dataset row equal to the
    prompt's tokens is drawn, so resampling from the prompts' own set never picks
    the prompt). Raises when a prompt has no candidate.
    """
    tokens = token_array(tokens)
    rows = _dataset_rows(dataset_tokens)
    if isinstance(n_samples, bool) or not isinstance(n_samples, (int, np.integer)) or n_samples < 1:
        raise ValueError(f"n_samples must be an integer >= 1, got {n_samples!r}")
    T = tokens.shape[1]
    same_length = np.array([i for i, r in enumerate(rows) if len(r) == T], int)
    if not len(same_length):
        lengths = sorted({len(r) for r in rows})
        raise ValueError(f"no dataset prompt has the prompts' length {T} tokens (dataset lengths: {lengths})")
    candidates = np.stack([rows[i] for i in same_length])  # [m, T]
    rng = np.random.default_rng(seed)
    out = np.zeros((n_samples, tokens.shape[0]), int)
    for b, prompt in enumerate(tokens):
        allowed = same_length[~(candidates == prompt).all(1)]
        if not len(allowed):
            raise ValueError(f"prompt {b}: the dataset has no prompt of length {T} other than prompt {b} itself")
        out[:, b] = rng.choice(allowed, size=n_samples)
    return out


def resample_ablation(tokens, dataset_tokens, *, n_samples=1, seed=0):
    """Resample ablation: each prompt's corrupted input is another dataset prompt.

    tokens: [batch, pos]; dataset_tokens: [n, pos_d] or a list of token sequences;
    only those of length pos are drawn, never the prompt itself (see
    `resample_indices`). n_samples > 1 draws several replacements per prompt,
    stacked sample-major; `sweep` averages over them.
    Returns Run(dataset prompts [n_samples * batch, pos], samples=n_samples).
    """
    idx = resample_indices(tokens, dataset_tokens, n_samples=n_samples, seed=seed)
    rows = _dataset_rows(dataset_tokens)
    drawn = np.stack([rows[i] for i in idx.ravel()]).astype(np.asarray(tokens).dtype)
    return Run(drawn, {}, n_samples)
