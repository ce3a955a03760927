"""Ragged batches: prompts of different lengths, right-padded, with an attention mask.

A batch holds prompts of different token lengths as [batch, pos] tokens padded on the
right and a [batch, pos] attention mask (1 on real tokens, 0 on padding), as
`tokenizer.encode_batch` and `jpatch.pad` make them. Right padding is exact for
patching: under causal attention a real position never sees a later pad, so each
prompt's values equal that prompt run alone. Left padding would shift the positions a
sweep reports, so it is refused.
"""

import numpy as np
from jaxtyping import Int

PAD_ID = 50256  # GPT-2's <|endoftext|>, what encode_batch pads with


def pad(sequences, *, pad_id=PAD_ID) -> tuple[Int[np.ndarray, "batch pos"], Int[np.ndarray, "batch pos"]]:
    """Token sequences of different lengths -> (tokens [batch, pos], attention_mask [batch, pos]).

    Right padding with `pad_id`; the mask is 1 on real tokens. Empty sequences are refused.
    """
    if isinstance(sequences, np.ndarray) and sequences.ndim == 2:
        sequences = list(sequences)
    rows = [np.asarray(s) for s in sequences]
    if not rows:
        raise ValueError("pad: no sequences given")
    for i, row in enumerate(rows):
        if row.ndim == 1 and len(row) == 0:
            raise ValueError(f"pad: sequence {i} is empty")
        if row.ndim != 1 or not np.issubdtype(row.dtype, np.integer):
            raise ValueError(f"pad: sequence {i} must be a 1-D list of integer token ids, got shape {row.shape} "
                             f"dtype {row.dtype}")
    T = max(len(r) for r in rows)
    tokens = np.full((len(rows), T), pad_id, np.int32)
    mask = np.zeros((len(rows), T), np.int32)
    for i, row in enumerate(rows):
        tokens[i, : len(row)] = row
        mask[i, : len(row)] = 1
    return tokens, mask


def lengths_of(attention_mask, shape, what="attention_mask"):
    """Each prompt's real length from a right-padding mask of the tokens' `shape`; refuses anything else."""
    mask = np.asarray(attention_mask)
    if mask.shape != tuple(shape):
        raise ValueError(f"{what} has shape {mask.shape}, the tokens have shape {tuple(shape)}")
    if mask.dtype != bool and not np.isin(mask, (0, 1)).all():
        raise ValueError(f"{what} must hold only 0 (padding) and 1 (real token)")
    mask = mask.astype(bool)
    lengths = mask.sum(1)
    right = np.arange(mask.shape[1]) < lengths[:, None]
    bad = np.flatnonzero((mask != right).any(1))
    if len(bad):
        raise ValueError(f"{what}: prompt {bad[0]} is not right-padded (its real tokens must come first, then "
                         "padding); pad on the right, e.g. jpatch.pad or encode_batch(padding_side='right')")
    empty = np.flatnonzero(lengths == 0)
    if len(empty):
        raise ValueError(f"{what}: prompt {empty[0]} has no real tokens")
    return lengths


def refuse_hidden_padding(tokens, what, pad_id=PAD_ID):
    """Without a mask, rows ending in pad ids while others do not look right-padded: refuse."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or tokens.shape[0] < 2:
        return
    ends_in_pad = tokens[:, -1] == pad_id
    if ends_in_pad.any() and not ends_in_pad.all():
        rows = np.flatnonzero(ends_in_pad)
        raise ValueError(
            f"{what}: prompts {rows[:5].tolist()}{' ...' if len(rows) > 5 else ''} end in the pad token {pad_id} "
            "while others do not, so the batch looks right-padded; pass attention_mask= (1 on real tokens, 0 on "
            "padding; jpatch.pad and encode_batch return it) so each prompt is patched and scored at its own end"
        )
