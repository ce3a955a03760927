"""What a sweep's summary prints: its largest entries, and for noising the change from the clean run."""

import numpy as np


def top_components(result, axes, tokens=None, k=8):
    """The k entries of largest |value|, as printable lines."""
    flat = np.argsort(-np.abs(np.nan_to_num(result)).ravel())[:k]
    lines = []
    for index in flat:
        coords = np.unravel_index(index, result.shape)
        parts = dict(zip(axes, (int(c) for c in coords)))
        if set(parts) == {"layer", "head"}:
            label = f"head {parts['layer']}.{parts['head']}"
        else:
            label = ", ".join(f"{a} {c}" for a, c in parts.items())
            if tokens is not None and "pos" in parts:
                label += f" {tokens[parts['pos']]!r}"
        lines.append(f"  {label:<32} {result[coords]:+.3f}")
    return lines


def clean_value(result):
    """The metric of the unpatched clean run, compared as the sweep's values are (1 when normalized)."""
    from jpatch.engine.aggregate import normalize

    return float(normalize(result.normalization, result.clean, result.clean, result.corrupted))


def shown(result, direction):
    """What the summary shows: the metric, or for noising its change (patched - clean), since
    every patch that does nothing reads as the clean value."""
    return np.asarray(result) - clean_value(result) if direction == "noise" else np.asarray(result)


def longest_prompt_tokens(task):
    """The token strings of the task's longest prompt: labels for a position axis."""
    b = int(np.argmax(task.lengths))
    return task.text_tokenizer.to_str_tokens(task.clean_tokens[b, : task.lengths[b]])
