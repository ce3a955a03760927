"""The paper's three patching tasks as clean / corrupted token batches.

A `Task` is one batch of equal-length prompts with their symmetric token
replacement (STR) corruptions, the answer and contrast tokens of a logit
difference, the key positions a Gaussian-noise corruption should perturb, and
the task's default metric::

    task = get_task("ioi", n_prompts=64)
    task.clean_tokens.shape            # (64, 15)
    sweep(model, task.clean_tokens, task.corrupted_tokens, "resid_pre", task.metric())

Loaders (`TASKS`): "ioi" (`ioi.ioi_task`), "factual" (`factual.factual_task`,
one Task per token-length bucket: a list), "greater-than"
(`greater_than.greater_than_task`). `get_task` also takes a path to a
paired-facts file or to a file written by `Task.to_jsonl`.
"""

import dataclasses
import json
import os
from typing import Callable, Optional

import numpy as np

from jpatch.methods import metrics as _metrics
from jpatch.model import padding
from jpatch.model.tokenizer import get_tokenizer


@dataclasses.dataclass(frozen=True, eq=False)
class Task:
    """N prompts of one token length T, clean and STR-corrupted.

    clean_tokens, corrupted_tokens: [N, T] int32, differing only at corrupted tokens.
    answers, contrasts: [N] token ids (the clean answer, and the answer the
        corrupted prompt calls for).
    key_positions: [N, k] the tokens a Gaussian-noise corruption perturbs
        (IOI names, factual subject tokens, the greater-than YY token).
    last_key_position: [N] the last key token (e.g. the last subject token).
    prompts, corrupted_prompts: [N] texts.
    metric_fn: `metric_fn(task, **kw) -> Metric` for tasks whose default metric is
        not the normalized logit difference of answers vs contrasts.
    info: per-prompt arrays with a leading N axis (template ids, years, ...).
    tokenizer: what made the tokens (None: GPT-2's), for their text (`text_tokenizer`).
    """

    name: str
    clean_tokens: np.ndarray
    corrupted_tokens: np.ndarray
    answers: np.ndarray
    contrasts: np.ndarray
    key_positions: np.ndarray
    last_key_position: np.ndarray
    prompts: tuple
    corrupted_prompts: tuple
    metric_fn: Optional[Callable] = None
    info: dict = dataclasses.field(default_factory=dict)
    attention_mask: Optional[np.ndarray] = None
    tokenizer: Optional[object] = None

    def __post_init__(self):
        as_int = lambda name: object.__setattr__(self, name, np.asarray(getattr(self, name), dtype=np.int32))
        for name in ("clean_tokens", "corrupted_tokens", "answers", "contrasts", "key_positions", "last_key_position"):
            as_int(name)
        object.__setattr__(self, "prompts", tuple(self.prompts))
        object.__setattr__(self, "corrupted_prompts", tuple(self.corrupted_prompts))
        clean, corrupted = self.clean_tokens, self.corrupted_tokens
        if clean.ndim != 2 or corrupted.shape != clean.shape:
            raise ValueError(f"task {self.name!r}: clean tokens {clean.shape} and corrupted tokens "
                             f"{corrupted.shape} must be the same [N, T] shape")
        n, t = clean.shape
        for name in ("answers", "contrasts", "last_key_position"):
            if getattr(self, name).shape != (n,):
                raise ValueError(f"task {self.name!r}: {name} has shape {getattr(self, name).shape}, expected ({n},)")
        if self.key_positions.ndim != 2 or self.key_positions.shape[0] != n:
            raise ValueError(f"task {self.name!r}: key_positions has shape {self.key_positions.shape}, expected ({n}, k)")
        for name in ("key_positions", "last_key_position"):
            pos = getattr(self, name)
            if pos.size and (pos.min() < 0 or pos.max() >= t):
                raise ValueError(f"task {self.name!r}: {name} out of range for {t} tokens")
        if len(self.prompts) != n or len(self.corrupted_prompts) != n:
            raise ValueError(f"task {self.name!r}: {len(self.prompts)} prompts and {len(self.corrupted_prompts)} "
                             f"corrupted prompts for {n} token rows")
        for key, value in self.info.items():
            if np.shape(value)[:1] != (n,):
                raise ValueError(f"task {self.name!r}: info[{key!r}] has shape {np.shape(value)}, expected ({n}, ...)")
        if self.attention_mask is not None:
            lengths = padding.lengths_of(self.attention_mask, (n, t), f"task {self.name!r}: attention_mask")
            for name in ("key_positions", "last_key_position"):
                pos = getattr(self, name).reshape(n, -1)
                if (pos >= lengths[:, None]).any():
                    raise ValueError(f"task {self.name!r}: {name} point into padding")

    def __len__(self):
        return self.clean_tokens.shape[0]

    @property
    def seq_len(self):
        """T, the token length of the batch (of the longest prompt when padded)."""
        return self.clean_tokens.shape[1]

    @property
    def lengths(self):
        """[N] each prompt's real token length."""
        if self.attention_mask is None:
            return np.full(len(self), self.seq_len)
        return np.asarray(self.attention_mask).sum(1)

    def __repr__(self):
        n, t = self.clean_tokens.shape
        return f"Task({self.name!r}, prompts={n}, tokens={t}, key_positions={self.key_positions.shape[1]})"

    def metric(self, **kw):
        """The task's default jpatch Metric (normalized logit difference of answers
        vs contrasts at the last position, unless the task defines its own)."""
        if self.metric_fn is not None:
            return self.metric_fn(self, **kw)
        return _metrics.logit_diff(self.answers, self.contrasts, **kw)

    def select(self, indices):
        """A Task of the prompts at `indices` (ints, a slice or a boolean mask), its padding cut to the
        longest prompt selected (no attention mask when they share one length)."""
        idx = np.arange(len(self))[indices]
        idx = np.atleast_1d(idx)
        mask, t = None, self.seq_len
        if self.attention_mask is not None:
            mask = np.asarray(self.attention_mask)[idx]
            t = int(mask.sum(1).max()) if len(idx) else t
            mask = None if mask[:, :t].all() else mask[:, :t]
        return dataclasses.replace(
            self,
            clean_tokens=self.clean_tokens[idx, :t], corrupted_tokens=self.corrupted_tokens[idx, :t],
            answers=self.answers[idx], contrasts=self.contrasts[idx],
            key_positions=self.key_positions[idx], last_key_position=self.last_key_position[idx],
            prompts=[self.prompts[i] for i in idx], corrupted_prompts=[self.corrupted_prompts[i] for i in idx],
            info={k: np.asarray(v)[idx] for k, v in self.info.items()},
            attention_mask=mask,
        )

    def key_counts(self):
        """[N] how many key positions each prompt declares (a prompt of a file line without
        `key_positions` declares none; `combine` fills its row with its last key position)."""
        if "key_count" in self.info:
            return np.asarray(self.info["key_count"])
        return np.full(len(self), self.key_positions.shape[1])

    def key_mask(self):
        """[N, T] bool, True at the key positions (the other form `jpatch.corrupt` takes)."""
        mask = np.zeros(self.clean_tokens.shape, dtype=bool)
        mask[np.arange(len(self))[:, None], self.key_positions] = True
        return mask

    def key_token_ids(self):
        """The clean token ids at the key positions of every prompt, every occurrence counted:
        the `std_tokens` of Gaussian noise (ROME's rule, `jpatch.methods.corrupt.embedding_std`;
        the CLI, bulk and the report all measure the std this way)."""
        return np.take_along_axis(self.clean_tokens, self.key_positions, axis=1).ravel()

    @property
    def text_tokenizer(self):
        """The tokenizer of the tokens: `tokenizer`, or GPT-2's."""
        return get_tokenizer() if self.tokenizer is None else self.tokenizer

    def examples(self):
        """One dict per prompt, in the `to_jsonl` format."""
        tok = self.text_tokenizer
        answers = tok.to_str_tokens(self.answers)
        contrasts = tok.to_str_tokens(self.contrasts)
        return [
            {"clean": self.prompts[i], "corrupted": self.corrupted_prompts[i], "answer": answers[i],
             "contrast": contrasts[i], "key_positions": self.key_positions[i].tolist(),
             "last_key_position": int(self.last_key_position[i])}
            for i in range(len(self))
        ]

    def to_jsonl(self, path):
        """Write one example per line: {"clean", "corrupted", "answer", "contrast",
        "key_positions", "last_key_position"} (answer/contrast as token strings)."""
        with open(path, "w", encoding="utf-8") as f:
            for example in self.examples():
                f.write(json.dumps(example) + "\n")
        return path


def combine(tasks, name=None):
    """One Task of every prompt of `tasks` (e.g. buckets of different token lengths): tokens padded
    on the right with an `attention_mask`; a prompt with fewer key positions than the most repeats
    its last one (the same positions, so corruptions are unchanged); a prompt that declares none gets its
    last key position, and info["key_count"] says how many each declares (`Task.key_counts`). Info keys
    kept are those all share."""
    tasks = list(tasks)
    if len(tasks) == 1:
        return tasks[0]
    if not tasks:
        raise ValueError("combine: no tasks")
    if len({t.metric_fn for t in tasks}) > 1:
        raise ValueError("combine: the tasks have different metrics")
    rows = lambda field: [row[: n] for t in tasks for row, n in zip(getattr(t, field), t.lengths)]
    pad_id = wording.pad_id(tasks[0].text_tokenizer)
    clean, mask = padding.pad(rows("clean_tokens"), pad_id=pad_id)
    corrupted, _ = padding.pad(rows("corrupted_tokens"), pad_id=pad_id)
    k = max(t.key_positions.shape[1] for t in tasks)
    counts = np.concatenate([t.key_counts() for t in tasks])
    last = np.concatenate([t.last_key_position for t in tasks])
    keys = [np.pad(row, (0, k - len(row)), mode="edge") if len(row) else np.full(k, end)
            for row, end in zip([row for t in tasks for row in t.key_positions], last)]
    shared = set.intersection(*(set(t.info) for t in tasks)) - {"key_count"}
    info = {key: np.concatenate([np.asarray(t.info[key]) for t in tasks]) for key in shared}
    if k and (counts == 0).any():
        info["key_count"] = counts
    cat = lambda field: np.concatenate([getattr(t, field) for t in tasks])
    return Task(
        name=name or "+".join(t.name for t in tasks), clean_tokens=clean, corrupted_tokens=corrupted,
        answers=cat("answers"), contrasts=cat("contrasts"), key_positions=np.array(keys).reshape(len(clean), k),
        last_key_position=cat("last_key_position"), prompts=[p for t in tasks for p in t.prompts],
        corrupted_prompts=[p for t in tasks for p in t.corrupted_prompts], metric_fn=tasks[0].metric_fn,
        info=info, attention_mask=mask if not mask.all() else None, tokenizer=tasks[0].tokenizer,
    )


def length_buckets(examples, name, *, metric_fn=None, tokenizer=None):
    """Tasks from examples (dicts with clean/corrupted texts and ids, answer/contrast
    ids, key_positions, last_key_position, info), one per (T, k), sorted by (T, k)."""
    groups = {}
    for ex in examples:
        groups.setdefault((len(ex["clean_ids"]), len(ex["key_positions"])), []).append(ex)
    tasks = []
    for (t, k), group in sorted(groups.items()):
        info_keys = group[0].get("info", {}).keys()
        tasks.append(Task(
            name=f"{name}-T{t}-k{k}",
            clean_tokens=np.array([ex["clean_ids"] for ex in group], dtype=np.int32).reshape(len(group), t),
            corrupted_tokens=np.array([ex["corrupted_ids"] for ex in group], dtype=np.int32).reshape(len(group), t),
            answers=[ex["answer"] for ex in group],
            contrasts=[ex["contrast"] for ex in group],
            key_positions=np.array([ex["key_positions"] for ex in group], dtype=np.int32).reshape(len(group), k),
            last_key_position=[ex["last_key_position"] for ex in group],
            prompts=[ex["clean"] for ex in group],
            corrupted_prompts=[ex["corrupted"] for ex in group],
            metric_fn=metric_fn,
            info={key: np.array([ex["info"][key] for ex in group]) for key in info_keys},
            tokenizer=tokenizer,
        ))
    return tasks


def read_jsonl(path, tokenizer=None):
    """Tasks from a file in the dataset format of `Task.to_jsonl` and `jpatch bulk`,
    one per (token length, number of key positions), sorted by those.

    Validation is `jpatch.data.dataset.read_dataset`'s (a ValueError names each bad line:
    malformed JSON, prompt pairs of unequal token lengths, answers that are not one
    token, key positions out of range); this adds the optional "last_key_position".
    The prompts are tokenized as written (no BOS added: key positions are the file's), with
    `tokenizer` (default GPT-2's).
    """
    from jpatch.data.dataset import jsonl_records, read_dataset

    dataset = read_dataset(path, tokenizer=tokenizer)
    lines = {n: json.loads(raw.decode("utf-8", errors="replace")) for n, raw in jsonl_records(path) if raw.strip()}
    examples = []
    for ex in dataset.examples:
        raw, keys = lines[ex.line], list(ex.key_positions)
        last = raw.get("last_key_position", max(keys) if keys else len(ex.clean) - 1)
        if not isinstance(last, int) or not 0 <= last < len(ex.clean):
            raise ValueError(f"{path}, line {ex.line}: last_key_position must be a token position in "
                             f"[0, {len(ex.clean)}), got {last!r}")
        examples.append({"clean": raw["clean"], "corrupted": raw["corrupted"], "clean_ids": list(ex.clean),
                         "corrupted_ids": list(ex.corrupted), "answer": ex.answer, "contrast": ex.contrast,
                         "key_positions": keys, "last_key_position": last, "info": {"line": ex.line}})
    if not examples:
        raise ValueError(f"{path}: no examples")
    return length_buckets(examples, os.path.splitext(os.path.basename(str(path)))[0], tokenizer=tokenizer)


from jpatch.data.tasks import wording  # noqa: E402
from jpatch.data.tasks.ioi import ioi_task  # noqa: E402
from jpatch.data.tasks.factual import factual_task  # noqa: E402
from jpatch.data.tasks.greater_than import greater_than_task  # noqa: E402

TASKS = {"ioi": ioi_task, "factual": factual_task, "greater-than": greater_than_task}


def _sniff(path):
    """'pairs' for a paired-facts file, 'examples' for a `to_jsonl` file."""
    from jpatch.data.dataset import jsonl_records

    for _, line in jsonl_records(path):
        if line.strip():
            try:
                first = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
                break  # read_dataset names the line
            if isinstance(first, dict) and "pair" in first:
                return "pairs"
            if isinstance(first, dict) and "clean" in first:
                return "examples"
            break
    raise ValueError(f"{path}: not a paired-facts file ({{\"pair\": [...], \"answer\": [...]}} per line) "
                     f"nor a task file ({{\"clean\": ..., \"corrupted\": ..., ...}} per line)")


def get_task(name_or_path, *, tokenizer=None, **kw):
    """The task `name_or_path` names: a key of `TASKS` (keyword arguments go to its
    loader; "factual" returns a list of Tasks, one per token-length bucket), or the
    path of a paired-facts JSONL file (-> `factual_task(path, **kw)`) or of a
    `Task.to_jsonl` file (-> `read_jsonl(path)`, a list of Tasks). tokenizer: the
    prompts' (default GPT-2's; a model's own: `model.tokenizer`)."""
    if tokenizer is not None:
        kw["tokenizer"] = tokenizer
    if name_or_path in TASKS:
        return TASKS[name_or_path](**kw)
    if isinstance(name_or_path, (str, os.PathLike)) and os.path.isfile(name_or_path):
        if _sniff(name_or_path) == "pairs":
            return factual_task(name_or_path, **kw)
        kw.pop("tokenizer", None)
        kw.pop("bos", None)  # a task file's prompts are tokenized as written: its key positions are the file's
        if kw:
            raise TypeError(f"reading a task file takes no options but tokenizer, got {sorted(kw)}")
        return read_jsonl(name_or_path, tokenizer)
    raise ValueError(f"unknown task {name_or_path!r}: valid names are {', '.join(TASKS)}, "
                     "or the path of an existing .jsonl file (paired facts or Task.to_jsonl output)")


__all__ = ["Task", "TASKS", "get_task", "read_jsonl", "ioi_task", "factual_task", "greater_than_task"]
