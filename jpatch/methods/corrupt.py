"""Corruptions: the inputs a patching sweep compares the clean run with.

Every function returns a `jpatch.patching.Run` (tokens + overrides on model
sites + a number of samples), the form `sweep(model, clean, corrupted, ...)`
takes for `corrupted`:

- `gaussian_noise`: ROME's causal tracing, N(0, nu^2) noise on the token
  embeddings of chosen positions, several noise samples in one Run;
- `token_replacement` / `token_replacement_from_text`: symmetric token
  replacement (STR), the paper's recommended corruption, with checks that the
  two prompts have equal length and differ only where declared;
- `zero_ablation`, `mean_ablation`, `resample_ablation` (from `jpatch.methods.ablation`): the
  ablations in common use. Zero / mean ablation Runs override a per-layer site at every layer, so
  they are sources of patched values only: use them with direction="noise"
  (the clean run with one component set to its ablation value). `sweep`
  refuses them as the base run (direction="denoise").

All functions are pure; randomness comes from an explicit seed or key.
"""

from collections import namedtuple

import jax
import jax.numpy as jnp
import numpy as np

from jpatch.engine.inputs import Run, token_array
from jpatch.methods.ablation import mean_ablation, resample_ablation, resample_indices, zero_ablation  # noqa: F401 (the API)
from jpatch.model import padding
from jpatch.model.gpt2 import Override
from jpatch.model.types import Mask, Tokens

NOISE_SEED = 1  # the default seed of Gaussian noise (and resampling) everywhere: API, CLI, bulk, report

# --- helpers --------------------------------------------------------------------------------


def position_mask(positions, batch, pos, what="positions"):
    """Positions chosen per prompt -> a [batch, pos] boolean mask.

    positions: a [batch, pos] boolean mask, or per prompt a list / [batch, k]
    int array of positions (lists may differ in length between prompts).
    Negative positions are errors, not Python-style indices from the end.
    """
    arr = None
    try:
        arr = np.asarray(positions)
    except ValueError:  # ragged lists
        pass
    if arr is not None and arr.dtype == bool:
        if arr.shape != (batch, pos):
            raise ValueError(f"{what}: a boolean mask must have the tokens' shape {(batch, pos)}, got {arr.shape}")
        return arr.copy()
    if arr is not None and arr.dtype != object:
        if arr.ndim != 2 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
            raise ValueError(
                f"{what} must be a [batch, pos] boolean mask or [batch, k] integer positions per prompt, "
                f"got shape {arr.shape} dtype {arr.dtype}"
            )
        rows = list(arr)
    else:
        rows = list(positions)
    if len(rows) != batch:
        raise ValueError(f"{what} covers {len(rows)} prompts, the tokens have {batch}")
    mask = np.zeros((batch, pos), bool)
    for b, row in enumerate(rows):
        row = np.atleast_1d(np.asarray(row))
        if row.size and not np.issubdtype(row.dtype, np.integer):
            raise ValueError(f"{what} of prompt {b} must be integer positions, got {row.tolist()}")
        for p in row.ravel().tolist():
            if not 0 <= p < pos:
                raise ValueError(f"{what}: prompt {b} has position {p}, out of range for its {pos} tokens [0, {pos})")
            mask[b, p] = True
    return mask


# --- Gaussian noise (ROME's causal tracing) ----------------------------------------------------


def embedding_std(model, token_ids=None):
    """Standard deviation of token embeddings, as ROME measures it.

    ROME (`collect_embedding_std`) stacks the token embedding rows of the subject
    tokens of its dataset and takes `.std()` over all their elements: a torch std,
    i.e. with Bessel's correction (ddof=1); repeated tokens count each time.
    token_ids: any-shaped int token ids (e.g. the subject tokens of every prompt),
    or None for the whole vocabulary. Returns a Python float.
    """
    vocab = model.W_E.shape[0]
    if token_ids is None:
        ids = np.arange(vocab)
    else:
        ids = np.asarray(token_ids).ravel()
        if ids.size and not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"token_ids must be integer token ids, got dtype {ids.dtype}")
        if ids.size == 0:
            raise ValueError("embedding_std needs at least one token id (got none); pass None for the whole vocabulary")
        bad = ids[(ids < 0) | (ids >= vocab)]
        if bad.size:
            raise ValueError(f"token id {int(bad[0])} is outside the vocabulary [0, {vocab})")
    # Over the distinct rows, each weighted by how often it occurs: the std of the stacked
    # rows without stacking them (a dataset's subject tokens repeat a lot).
    unique, counts = np.unique(ids.astype(np.int64), return_counts=True)
    rows = np.asarray(model.W_E[unique], np.float64)  # [u, d]
    n = counts.sum() * rows.shape[1]
    if n < 2:
        raise ValueError("embedding_std needs at least two embedding elements")
    mean = (counts[:, None] * rows).sum() / n
    return float(np.sqrt((counts[:, None] * (rows - mean) ** 2).sum() / (n - 1)))


def gaussian_noise(model, tokens: Tokens, positions, *, n_samples=10, scale=3.0, std=None, std_tokens=None,
                   seed=NOISE_SEED, key=None, attention_mask: Mask = None) -> Run:
    """ROME's causal-tracing corruption: noise on the token embeddings of chosen positions.

    tokens: [batch, pos] clean token ids.
    positions: which tokens get noise (the subject, the names): a [batch, pos]
      boolean mask, or per prompt a list / [batch, k] int array of positions.
    Noise is N(0, nu^2) with nu = scale x std; std is given, or
    `embedding_std(model, std_tokens)`, where std_tokens defaults to the tokens at
    `positions` in this batch (ROME uses the subject tokens of its whole dataset,
    with scale 3: nu = 0.1346 for GPT-2 XL). It is added to the *token* embedding
    only (site "hook_embed"), not the position embedding, independently per
    sample, prompt, position and dimension.
    n_samples: noise samples per prompt (ROME: 10), run together in one call.
    attention_mask: [batch, pos] right-padding mask of prompts of different lengths; noise on
      padding is refused, and the Run carries the mask to `sweep`.
    seed / key: the noise comes from `jax.random.normal` with `key` (or
      PRNGKey(seed)); the same seed gives the same noise. ROME draws from
      numpy RandomState(1): the distribution is reproduced, not its exact values.

    Returns Run(tokens tiled to [n_samples * batch, pos] (sample-major),
    {"hook_embed": Override(value=embed + noise [n_samples * batch, pos, d_model],
    mask [n_samples * batch, pos, 1])}, samples=n_samples).
    """
    tokens = token_array(tokens)
    model.check_tokens(jnp.asarray(tokens))
    B, T = tokens.shape
    if isinstance(n_samples, bool) or not isinstance(n_samples, (int, np.integer)) or n_samples < 1:
        raise ValueError(f"n_samples must be an integer >= 1, got {n_samples!r}")
    if not np.isfinite(scale) or scale < 0:
        raise ValueError(f"scale must be a finite number >= 0, got {scale!r}")
    mask = position_mask(positions, B, T)
    if attention_mask is not None:
        lengths = padding.lengths_of(attention_mask, (B, T))
        on_pad = np.argwhere(mask & (np.arange(T) >= lengths[:, None]))
        if len(on_pad):
            raise ValueError(f"positions: prompt {on_pad[0, 0]} gets noise at position {on_pad[0, 1]}, which is "
                             f"padding (the prompt has {int(lengths[on_pad[0, 0]])} real tokens)")
        attention_mask = np.tile(np.asarray(attention_mask), (n_samples, 1))
    if std is None:
        if std_tokens is None:
            if not mask.any():
                raise ValueError("no positions chosen for noise: cannot measure the embedding std over them; pass std=")
            std_tokens = tokens[mask]
        std = embedding_std(model, std_tokens)
    if not np.isfinite(std) or std < 0:
        raise ValueError(f"std must be a finite number >= 0, got {std!r}")
    nu = float(scale) * float(std)
    if key is None:
        key = jax.random.PRNGKey(seed)
    d = model.config.d_model
    noise = nu * jax.random.normal(key, (n_samples, B, T, d), jnp.float32)
    mask_rows = jnp.asarray(np.tile(mask, (n_samples, 1)))[..., None]  # [S * B, T, 1]
    noise = jnp.where(mask_rows, noise.reshape(n_samples * B, T, d), 0.0)
    tiled = np.tile(tokens, (n_samples, 1))
    embed = model.W_E[jnp.asarray(tiled)].astype(jnp.float32)
    return Run(tiled, {"hook_embed": Override((embed + noise).astype(model.dtype), mask_rows)}, n_samples,
               attention_mask)


# --- symmetric token replacement ----------------------------------------------------------------


def token_replacement(clean_tokens: Tokens, corrupted_tokens: Tokens, positions=None, *,
                      attention_mask: Mask = None) -> Run:
    """Symmetric token replacement (STR): the corrupted prompts as a Run.

    clean_tokens, corrupted_tokens: [batch, pos] token ids of the same shape (a
      replacement that tokenizes to another length is an error).
    positions: optional declared key positions (per prompt a list / [batch, k]
      int array, or a [batch, pos] boolean mask); then the prompts must differ
      only there, else the error names the prompt, position and both token ids.
    attention_mask: [batch, pos] right-padding mask shared by both (each pair has one length);
      the Run carries it to `sweep`.
    Returns Run(corrupted_tokens).
    """
    clean, corrupted = token_array(clean_tokens, "clean_tokens"), token_array(corrupted_tokens, "corrupted_tokens")
    if clean.shape != corrupted.shape:
        raise ValueError(
            f"clean tokens {clean.shape} and corrupted tokens {corrupted.shape} must have the same [batch, pos] shape: "
            "symmetric token replacement needs replacements of the same token length"
        )
    if positions is not None:
        declared = position_mask(positions, *clean.shape)
        undeclared = (clean != corrupted) & ~declared
        if undeclared.any():
            b, p = np.argwhere(undeclared)[0]
            raise ValueError(
                f"prompt {b}: clean and corrupted tokens differ at position {p} (clean id {int(clean[b, p])}, "
                f"corrupted id {int(corrupted[b, p])}), which is not a declared key position "
                f"(declared: {np.flatnonzero(declared[b]).tolist()})"
            )
    if attention_mask is not None:
        padding.lengths_of(attention_mask, clean.shape)
        attention_mask = np.asarray(attention_mask).copy()
    return Run(corrupted.copy(), attention_mask=attention_mask)


Replacement = namedtuple("Replacement", "run clean_tokens corrupted_tokens positions")
Replacement.__doc__ = """token_replacement_from_text's result: the corrupted Run, the clean and
corrupted [batch, pos] token ids, and the declared key positions ([batch, pos] bool, or None)."""


def _char_offsets(tokenizer, text, ids):
    """(start, end) character span of each token of `text`."""
    backend = getattr(tokenizer, "backend", None)
    if backend is not None and hasattr(backend, "encode"):
        enc = backend.encode(text, add_special_tokens=False)
        if list(enc.ids) == list(ids):
            return list(enc.offsets)
    lengths = [len(tokenizer.decode(ids[:i])) for i in range(len(ids) + 1)]  # approximate for split characters
    return list(zip(lengths[:-1], lengths[1:]))


def _key_positions(tokenizer, text, ids, words):
    """Positions of the tokens overlapping any occurrence of any of `words` in `text`."""
    offsets = _char_offsets(tokenizer, text, ids)
    found = set()
    for word in words:
        start = text.find(word)
        while word and start >= 0:
            end = start + len(word)
            found.update(i for i, (a, b) in enumerate(offsets) if a < end and start < b)
            start = text.find(word, start + 1)
    return found


def token_replacement_from_text(clean_texts, corrupted_texts, tokenizer=None, key_words=None):
    """STR from text: tokenize both prompt lists and check them.

    clean_texts, corrupted_texts: [batch] strs, pairwise of equal token length
      (the error quotes both prompts and their lengths); prompts of different lengths are
      padded on the right and the Run carries their attention mask (`run.attention_mask`).
    tokenizer: anything with `encode(str) -> ids` (default `jpatch.model.tokenizer.get_tokenizer()`).
    key_words: the replaced words, e.g. [" Mary", " John"] for every prompt, or one
      list per prompt ([[" Mary", " John"], ...]). Tokens overlapping any occurrence
      of a key word in either prompt are the declared positions, and the prompts
      must differ only there. A per-prompt word found in neither prompt is an error.
    Returns Replacement(run, clean_tokens, corrupted_tokens, positions).
    """
    if tokenizer is None:
        from jpatch.model.tokenizer import get_tokenizer

        tokenizer = get_tokenizer()
    for what, texts in (("clean_texts", clean_texts), ("corrupted_texts", corrupted_texts)):
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError(f"{what} must be a list of str")
    clean_texts, corrupted_texts = list(clean_texts), list(corrupted_texts)
    if len(clean_texts) != len(corrupted_texts):
        raise ValueError(f"{len(clean_texts)} clean prompts but {len(corrupted_texts)} corrupted prompts")
    if not clean_texts:
        raise ValueError("no prompts given")
    clean_ids = [list(tokenizer.encode(t)) for t in clean_texts]
    corrupted_ids = [list(tokenizer.encode(t)) for t in corrupted_texts]
    for b, (c, x) in enumerate(zip(clean_ids, corrupted_ids)):
        if len(c) != len(x):
            raise ValueError(
                f"prompt {b}: the clean prompt {clean_texts[b]!r} has {len(c)} tokens but the corrupted prompt "
                f"{corrupted_texts[b]!r} has {len(x)}; symmetric token replacement needs replacements "
                "of the same token length"
            )
    if not all(clean_ids):
        raise ValueError(f"prompt {[len(c) for c in clean_ids].index(0)} is empty")
    clean, mask = padding.pad(clean_ids)
    corrupted, _ = padding.pad(corrupted_ids)
    ragged = not mask.all()
    positions = None
    if key_words is not None:
        key_words = list(key_words)
        per_prompt = not all(isinstance(w, str) for w in key_words)
        if per_prompt and len(key_words) != len(clean_texts):
            raise ValueError(f"key_words has {len(key_words)} entries, one per prompt expected ({len(clean_texts)})")
        positions = np.zeros(clean.shape, bool)
        for b in range(len(clean_texts)):
            words = key_words[b] if per_prompt else key_words
            words = [words] if isinstance(words, str) else list(words)
            for word in words:
                hit = _key_positions(tokenizer, clean_texts[b], clean_ids[b], [word]) | _key_positions(
                    tokenizer, corrupted_texts[b], corrupted_ids[b], [word]
                )
                if per_prompt and not hit:
                    raise ValueError(
                        f"prompt {b}: key word {word!r} occurs in neither {clean_texts[b]!r} nor {corrupted_texts[b]!r}"
                    )
                positions[b, sorted(hit)] = True
    run = token_replacement(clean, corrupted, positions, attention_mask=mask if ragged else None)
    return Replacement(run, clean, corrupted, positions)


# The corruptions by name (the command line, bulk datasets and reports use these names).
CORRUPTIONS = {
    "str": token_replacement,
    "noise": gaussian_noise,
    "zero": zero_ablation,
    "mean": mean_ablation,
    "resample": resample_ablation,
}
