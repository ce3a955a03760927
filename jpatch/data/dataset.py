"""The dataset format of `jpatch bulk` and `jpatch sweep --task FILE`: JSONL, one example per line::

    {"clean": "When Mary and John went to the store, John gave a drink to",
     "corrupted": "When Tom and Bob went to the store, Bob gave a drink to",   # STR only
     "answer": " Mary", "contrast": " John",      # single GPT-2 tokens
     "key_positions": [1, 3, 9]}                   # Gaussian noise goes here (required for "noise")

`read_dataset` checks every line (JSON, fields, single-token answers, lengths against the
model's context, equal clean / corrupted token lengths for STR, key positions in range) before
anything runs, and names the line of each error. Prompts are tokenized as they are (no BOS
token; write "<|endoftext|>" into the text for one).
"""

import dataclasses
import functools
import hashlib
import json
import os
from pathlib import Path

import numpy as np

from jpatch.data import short_repr
from jpatch.methods import corrupt, metrics

FILE_CORRUPTIONS = ("str", "noise")  # the corruptions a dataset line describes (of corrupt.FILE_CORRUPTIONS)
MAX_ERRORS = 20  # bad lines listed in one error


@dataclasses.dataclass(frozen=True)
class Example:
    """One validated dataset line: token ids ([T] int32), answer / contrast ids (or None)."""

    line: int
    clean: np.ndarray
    corrupted: np.ndarray  # None for Gaussian noise
    answer: int
    contrast: int
    key_positions: tuple


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Validated examples plus a hash of their content (`content_hash`)."""

    examples: list
    corruption: str
    content_hash: str
    source: str = None
    n_ctx: int = None
    fields: tuple = ()

    def __len__(self):
        return len(self.examples)

    @functools.cached_property
    def lengths(self):
        """Token length of each clean prompt [n]."""
        return np.array([len(e.clean) for e in self.examples], np.int64)


def jsonl_records(path):
    """(line number, raw bytes) of a JSONL file, lines split at b"\\n" only: the one reader of
    dataset files (bulk and `jpatch sweep --task FILE`), so line numbers always agree."""
    path = Path(path).expanduser()
    try:
        f = open(path, "rb")
    except OSError as e:
        raise FileNotFoundError(f"cannot open dataset {path}: {e.strerror}") from e
    with f:
        for number, raw in enumerate(f, 1):
            yield number, raw


def canonical_json(obj):
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def parse_examples(records, *, corruption="str", metric=None, n_ctx=None, source="<examples>", tokenizer=None):
    """Validate (line number, JSON text or dict) records into a `Dataset`; see `read_dataset`."""
    if corruption not in FILE_CORRUPTIONS:
        raise ValueError(f"unknown corruption {corruption!r}; valid: {', '.join(FILE_CORRUPTIONS)}")
    if metric is not None and metric not in metrics.METRICS:
        raise ValueError(f"unknown metric {metric!r}; valid: {', '.join(metrics.METRICS)}")
    required = metrics.METRICS[metric] if metric is not None else ("answer", "contrast")
    if tokenizer is None:
        from jpatch.model.tokenizer import get_tokenizer

        tokenizer = get_tokenizer()
    examples, errors = [], []
    digest = hashlib.sha256()
    offset = 0  # of the line in the file, when the records are a file's lines (`jsonl_records`)
    for number, raw in records:
        line_errors = []
        start, offset = offset, offset + (len(raw) if isinstance(raw, bytes) else 0)

        def bad(reason):
            line_errors.append(f"line {number}: {reason}")

        if isinstance(raw, dict):
            obj = raw
        else:
            try:  # strictly: a replaced byte would silently change a prompt
                text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
            except UnicodeDecodeError as e:
                errors.append(f"line {number}: invalid UTF-8 at byte offset {start + e.start} of the file "
                              f"(byte {raw[e.start]:#04x})")
                continue
            if not text.strip():
                continue  # blank lines are allowed
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                errors.append(f"line {number}: malformed JSON: {e.msg} (column {e.colno})")
                continue
            except RecursionError:
                errors.append(f"line {number}: malformed JSON: nested too deeply")
                continue
        if not isinstance(obj, dict):
            errors.append(f"line {number}: expected a JSON object, got {type(obj).__name__}")
            continue
        digest.update(canonical_json(obj).encode() + b"\n")

        def prompt(field):
            value = obj.get(field)
            if value is None:
                bad(f"missing field {field!r}")
                return None
            if not isinstance(value, str):
                bad(f"{field!r} must be a string, got {type(value).__name__}")
                return None
            ids = np.asarray(tokenizer.encode(value), np.int32)
            if tokenizer.decode(ids) != value:  # an unknown-word token, a normalizer: not the file's text
                bad(f"the {field} prompt {value!r:.80} is not encoded exactly by this model's tokenizer (its tokens "
                    f"decode to {tokenizer.decode(ids)!r:.80})")
                return None
            if len(ids) == 0:
                bad(f"the {field} prompt is empty")
                return None
            if n_ctx is not None and len(ids) > n_ctx:
                bad(f"the {field} prompt is {len(ids)} tokens, longer than the model's context n_ctx={n_ctx}")
                return None
            return ids

        def token(field):
            value = obj.get(field)
            if value is None:
                if field in required:
                    bad(f"missing field {field!r} (needed by metric {metric or 'logit-diff'!r})")
                return None
            if not isinstance(value, str):
                bad(f"{field!r} must be a string (one token, e.g. ' Mary'), got {type(value).__name__}")
                return None
            try:
                return int(tokenizer.token_id(value))
            except ValueError as e:
                bad(f"{field}: {e}")
                return None

        clean = prompt("clean")
        corrupted = prompt("corrupted") if corruption == "str" else None
        answer, contrast = token("answer"), token("contrast")
        if metric in (None, "logit-diff") and answer is not None and answer == contrast:
            bad("answer and contrast are the same token: their logit difference is always 0")
        if clean is not None and corrupted is not None:
            if len(corrupted) != len(clean):
                bad(
                    f"the corrupted prompt is {len(corrupted)} tokens but the clean prompt is {len(clean)}; "
                    "symmetric token replacement needs replacements of the same token length"
                )
            elif (corrupted == clean).all():
                bad("the corrupted prompt is the clean prompt: nothing is corrupted")
        positions = obj.get("key_positions")
        if positions is None:
            if corruption == "noise":
                bad("missing field 'key_positions' (the tokens Gaussian noise corrupts)")
            positions = ()
        elif (
            not isinstance(positions, list)
            or not all(isinstance(p, int) and not isinstance(p, bool) for p in positions)
        ):
            bad(f"'key_positions' must be a list of integer token positions, got {short_repr(positions)}")
            positions = ()
        else:
            if corruption == "noise" and not positions:
                bad("'key_positions' is empty: Gaussian noise needs at least one position to corrupt")
            if clean is not None:
                out = [p for p in positions if not 0 <= p < len(clean)]
                if out:
                    bad(f"key position(s) {short_repr(out)} out of range for the clean prompt's {len(clean)} tokens [0, {len(clean)})")
            positions = tuple(sorted(set(positions)))
        if line_errors:
            errors += line_errors
            continue
        examples.append(Example(number, clean, corrupted, answer, contrast, positions))
    if errors:
        shown = errors[:MAX_ERRORS]
        more = f"\n  ... and {len(errors) - MAX_ERRORS} more" if len(errors) > MAX_ERRORS else ""
        raise ValueError(f"invalid dataset {source}: {len(errors)} error(s)\n  " + "\n  ".join(shown) + more)
    if not examples:
        raise ValueError(f"dataset {source} has no examples")
    fields = tuple(f for f in ("answer", "contrast") if all(getattr(e, f) is not None for e in examples))
    return Dataset(examples, corruption, digest.hexdigest(), source, n_ctx, fields)


def read_dataset(path, *, corruption="str", metric=None, n_ctx=None, tokenizer=None):
    """Read and validate a JSONL dataset; every problem is reported before any compute.

    Each line: {"clean": str, "corrupted": str (corruption "str"; ignored for "noise"),
    "answer": str, "contrast": str, "key_positions": [int] (required for "noise")}.
    answer / contrast must be single tokens of `tokenizer` (default GPT-2's; a prompt it cannot
    encode exactly is refused); `metric` says which are required
    (None: both). Blank lines are skipped; other fields are ignored. Raises
    ValueError listing each bad line ("line 7: ...") with its reason.
    """
    return parse_examples(jsonl_records(path), corruption=corruption, metric=metric, n_ctx=n_ctx,
                          source=str(path), tokenizer=tokenizer)


def as_dataset(dataset, corruption, metric, n_ctx, tokenizer=None):
    if isinstance(dataset, Dataset):
        if dataset.corruption != corruption:
            raise ValueError(f"the dataset was read for corruption {dataset.corruption!r}, the sweep uses {corruption!r}")
        missing = [f for f in metrics.METRICS[metric] if f not in dataset.fields]
        if missing:
            raise ValueError(f"metric {metric!r} needs {' and '.join(missing)} for every example")
        long = [e.line for e in dataset.examples if len(e.clean) > n_ctx]
        if long:
            raise ValueError(f"dataset {dataset.source}: line(s) {long[:MAX_ERRORS]} longer than the model's n_ctx={n_ctx}")
        return dataset
    if isinstance(dataset, (str, os.PathLike)):
        return read_dataset(dataset, corruption=corruption, metric=metric, n_ctx=n_ctx, tokenizer=tokenizer)
    records = [(i, r) for i, r in enumerate(dataset, 1)]
    return parse_examples(records, corruption=corruption, metric=metric, n_ctx=n_ctx, tokenizer=tokenizer)


def key_token_std(model, dataset):
    """ROME's embedding std over the key tokens of every clean prompt (each occurrence counted)."""
    ids = np.concatenate([e.clean[list(e.key_positions)] for e in dataset.examples if e.key_positions] or [[]])
    if ids.size == 0:
        raise ValueError("the dataset has no key positions to measure the embedding std over; pass noise_std")
    return corrupt.embedding_std(model, ids.astype(np.int64))
