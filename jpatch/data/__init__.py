"""Datasets: the JSONL dataset format and its validation (dataset) and the paper's tasks
(tasks: IOI, factual recall, Greater-Than)."""

MAX_QUOTED = 80  # characters of a value quoted in an error message


def short_repr(value, limit=MAX_QUOTED):
    """repr(value) cut to `limit` characters (a dataset line may hold a million key positions)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"
