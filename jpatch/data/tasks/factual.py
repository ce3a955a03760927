"""Factual recall with paired facts (the paper's PairedFacts format).

A paired-facts file is JSONL, one pair per line::

    {"pair": ["The capital of France is", "The capital of Japan is"], "answer": [" Paris", " Tokyo"]}

The two prompts share one template and differ only in the subject, whose two
versions have the same GPT-2 token length; the answers are two distinct single
tokens (with their leading space). Each pair gives two STR examples: prompt 1
clean / prompt 2 corrupted (answer a1, contrast a2), and the reverse.

The subject span is where the two token sequences differ: from the first to the
last differing token. A line may add "subject": [s1, s2] to name the subjects
when they share edge tokens ("Michael Jordan" / "Michael Phelps"); the span is
then the subject's tokens.

`data/paired_facts.jsonl` ships 217 pairs written for jpatch (capitals, cities,
languages, athletes, musicians, products, companies, landmarks, ...).
"""

import dataclasses
import importlib.resources
import json

from jpatch.data.tasks import wording


def default_path():
    """The bundled `data/paired_facts.jsonl` (a Traversable)."""
    return importlib.resources.files("jpatch.data.tasks") / "data" / "paired_facts.jsonl"


@dataclasses.dataclass(frozen=True)
class FactPair:
    """One validated line: prompts, answers, their token ids, and the subject span
    [start, stop) (the same token positions in both prompts)."""

    prompts: tuple
    answers: tuple
    tokens: tuple
    answer_ids: tuple
    subject: tuple
    line: int


def _subject_span(text, offsets, subject):
    """Token span [start, stop) of the first occurrence of `subject` in `text`
    (`offsets`: each token's character range), or None."""
    at = text.find(subject)
    if at < 0:
        return None
    end = at + len(subject)
    covering = [i for i, (s, e) in enumerate(offsets) if s < end and e > at]
    return (covering[0], covering[-1] + 1) if covering else None


def _check_line(obj, tok, where):
    """A FactPair from one parsed line, or ValueError(`where`: reason)."""
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object {{\"pair\": [p1, p2], \"answer\": [a1, a2]}}, "
                         f"got {type(obj).__name__}")
    for key in ("pair", "answer"):
        value = obj.get(key)
        if key not in obj:
            raise ValueError(f"{where}: missing {key!r} (expected {{\"pair\": [p1, p2], \"answer\": [a1, a2]}})")
        if not isinstance(value, list) or len(value) != 2 or not all(isinstance(v, str) for v in value):
            raise ValueError(f"{where}: {key!r} must be a list of two strings, got {value!r:.100}")
    prompts, answers = tuple(obj["pair"]), tuple(obj["answer"])
    hint = "; answers usually need a leading space, e.g. ' Paris'"
    answer_ids = [wording.single_token(tok, a, where, hint=hint, after=p) for p, a in zip(prompts, answers)]
    if answer_ids[0] == answer_ids[1]:
        raise ValueError(f"{where}: the two answers must be distinct, both are {answers[0]!r}")
    if prompts[0] == prompts[1]:
        raise ValueError(f"{where}: the two prompts are identical")
    for p in prompts:
        wording.encode_exact(tok, p, where)
    encodings = [tok.backend.encode(p, add_special_tokens=False) for p in prompts]
    tokens = [e.ids for e in encodings]
    if len(tokens[0]) != len(tokens[1]):
        raise ValueError(f"{where}: the prompts have different token lengths ({len(tokens[0])} vs "
                         f"{len(tokens[1])} tokens): the two subjects must have the same token length and "
                         f"the rest of the prompts must be identical ({tok.to_str_tokens(tokens[0])!r} vs "
                         f"{tok.to_str_tokens(tokens[1])!r})")
    diff = [i for i, (x, y) in enumerate(zip(*tokens)) if x != y]
    if not diff:
        raise ValueError(f"{where}: the prompts tokenize identically")
    span = (diff[0], diff[-1] + 1)
    if "subject" in obj:
        subjects = obj["subject"]
        if not isinstance(subjects, list) or len(subjects) != 2 or not all(isinstance(s, str) and s for s in subjects):
            raise ValueError(f"{where}: 'subject' must be a list of two non-empty strings, got {subjects!r:.100}")
        spans = [_subject_span(p, e.offsets, s) for p, e, s in zip(prompts, encodings, subjects)]
        for p, s, sp in zip(prompts, subjects, spans):
            if sp is None:
                raise ValueError(f"{where}: subject {s!r} does not occur in prompt {p!r}")
        if spans[0] != spans[1]:
            raise ValueError(f"{where}: the subjects have different token spans {spans[0]} and {spans[1]} "
                             f"({spans[0][1] - spans[0][0]} vs {spans[1][1] - spans[1][0]} tokens); they must "
                             "have the same token length at the same position")
        if diff[0] < spans[0][0] or diff[-1] >= spans[0][1]:
            raise ValueError(f"{where}: the prompts differ outside the subjects (tokens {diff[0]}..{diff[-1]}, "
                             f"subject tokens {spans[0][0]}..{spans[0][1] - 1})")
        span = spans[0]
    return FactPair(prompts, answers, tuple(tuple(t) for t in tokens), tuple(answer_ids), span, 0)


def load_pairs(path=None, tokenizer=None):
    """Validated `FactPair`s from a paired-facts JSONL file (default: the bundled one).

    Blank lines are skipped. Raises ValueError "<path>, line <n>: <reason>" for a
    line that is not JSON, lacks "pair"/"answer" as two strings each, has an answer
    that is not one token or two equal answers, or whose prompts differ in token
    length (subjects of unequal token length). tokenizer: the prompts' (default GPT-2's).
    """
    path = default_path() if path is None else path
    tok = wording.resolve(tokenizer)
    try:
        text = path.read_text(encoding="utf-8") if hasattr(path, "read_text") else open(path, encoding="utf-8").read()
    except OSError as e:
        raise ValueError(f"cannot read paired-facts file {path}: {e}") from e
    pairs = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}, line {lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
        pairs.append(dataclasses.replace(_check_line(obj, tok, where), line=lineno))
    if not pairs:
        raise ValueError(f"{path}: no pairs")
    return pairs


def _examples(pairs, start_ids=(), start_text=""):
    """Two STR examples per pair (each prompt clean once), each prompt after `start_ids` (a BOS)."""
    examples, shift = [], len(start_ids)
    for index, p in enumerate(pairs):
        start, stop = p.subject[0] + shift, p.subject[1] + shift
        for clean, corrupt in ((0, 1), (1, 0)):
            examples.append({
                "clean": start_text + p.prompts[clean], "corrupted": start_text + p.prompts[corrupt],
                "clean_ids": [*start_ids, *p.tokens[clean]], "corrupted_ids": [*start_ids, *p.tokens[corrupt]],
                "answer": p.answer_ids[clean], "contrast": p.answer_ids[corrupt],
                "key_positions": list(range(start, stop)), "last_key_position": stop - 1,
                "info": {"line": p.line, "pair": index, "side": clean},
            })
    return examples


def factual_task(path=None, *, length=None, subject_length=None, tokenizer=None, bos=False):
    """Factual-recall Tasks from a paired-facts file (default: the bundled one).

    Prompts are grouped by (token length T, subject token length k), since a Task's
    prompts share T and its key_positions are [N, k]; returns the list of Tasks
    sorted by (T, k), named "factual-T<T>-k<k>". With `length` (T) and/or
    `subject_length` (k), returns the single Task they select (ValueError listing
    the available buckets if none or several match).
    key_positions = the subject tokens; last_key_position = the last subject token;
    info: "line" (of the file), "pair" (index), "side" (which prompt of the pair is clean).
    tokenizer: the prompts' (default GPT-2's); bos: start every prompt with its BOS token.
    """
    from jpatch.data.tasks import length_buckets

    tok = wording.resolve(tokenizer)
    start = wording.bos_ids(tok, bos, "factual")
    tasks = length_buckets(_examples(load_pairs(path, tokenizer), start, wording.bos_text(tok, bos)), "factual",
                           tokenizer=tokenizer)
    if length is None and subject_length is None:
        return tasks
    chosen = [t for t in tasks
              if (length is None or t.seq_len == length)
              and (subject_length is None or t.key_positions.shape[1] == subject_length)]
    if len(chosen) != 1:
        available = ", ".join(f"(length={t.seq_len}, subject_length={t.key_positions.shape[1]}: {len(t)} prompts)"
                              for t in tasks)
        raise ValueError(f"{len(chosen)} factual buckets match length={length}, subject_length={subject_length}; "
                         f"available: {available}")
    return chosen[0]


def factual_prompts_text(path=None, *, with_answer=True):
    """Every prompt of a paired-facts file (both of each pair), completed with its
    answer when `with_answer` ("The capital of France is Paris"): training text
    for a toy model that should learn the facts before being patched on them."""
    return [prompt + (answer if with_answer else "")
            for p in load_pairs(path) for prompt, answer in zip(p.prompts, p.answers)]
