"""Indirect object identification (Wang et al. 2022) with the "ABC" STR corruption.

Clean prompts follow the IOI templates: two names, then the subject repeated,
and the model should complete with the other name (the indirect object, IO)::

    BABA: "Then, John and Mary went to the store. John gave a drink to" -> " Mary"
    ABBA: "Then, Mary and John went to the store. John gave a drink to" -> " Mary"

The corrupted prompt replaces the three names (IO, S1, S2) with three other
distinct names (the paper's "ABC" distribution), so the repeated name that
identifies the subject is gone. Answer = IO, contrast = S.

The templates have the IOI paper's variety: 28 sentences of 12 to 21 tokens
(22 with a leading <|endoftext|>), the names at different positions, both
orders. Prompts of different lengths share one batch right-padded with an
`attention_mask`; each prompt's name positions are in `key_positions` and
`info` ("io_position", "s1_position", "s2_position", "end_position").
Templates are split into train and held-out (`TEST_TEMPLATES`) like the names
(`split_names`), so a model trained on the train split can be tested on
sentences and names it never saw. The held-out templates reuse the train
templates' words; the split "novel" (`FILLER_HELD_OUT_TEMPLATES`, with their own
places and objects) holds 8 more whose words, names aside, no train prompt uses
(`filler_held_out_words()` is disjoint from `train_words()`).
"""

import numpy as np

from jpatch.data.tasks import wording
from jpatch.model import padding

# BABA form: [B] is the subject (named twice), [A] the indirect object; the answer
# (IO) follows the final " to". The first 15 are Wang et al.'s BABA templates
# (ioi_dataset.py) less the answer; the rest are written for jpatch in their style.
BABA_TEMPLATES = (
    "Then, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to",
    "Then, [B] and [A] had a lot of fun at the [PLACE]. [B] gave a [OBJECT] to",
    "Then, [B] and [A] were working at the [PLACE]. [B] decided to give a [OBJECT] to",
    "Then, [B] and [A] were thinking about going to the [PLACE]. [B] wanted to give a [OBJECT] to",
    "Then, [B] and [A] had a long argument, and afterwards [B] said to",
    "After [B] and [A] went to the [PLACE], [B] gave a [OBJECT] to",
    "When [B] and [A] got a [OBJECT] at the [PLACE], [B] decided to give it to",
    "When [B] and [A] got a [OBJECT] at the [PLACE], [B] decided to give the [OBJECT] to",
    "While [B] and [A] were working at the [PLACE], [B] gave a [OBJECT] to",
    "While [B] and [A] were commuting to the [PLACE], [B] gave a [OBJECT] to",
    "After the lunch, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to",
    "Afterwards, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to",
    "Then, [B] and [A] had a long argument. Afterwards [B] said to",
    "The [PLACE] [B] and [A] went to had a [OBJECT]. [B] gave it to",
    "Friends [B] and [A] found a [OBJECT] at the [PLACE]. [B] gave it to",
    "Later, [B] and [A] walked to the [PLACE]. [B] handed a [OBJECT] to",
    "Today, [B] and [A] met at the [PLACE]. [B] brought a [OBJECT] to",
    "Yesterday, [B] and [A] worked at the [PLACE]. [B] sent a [OBJECT] to",
    "Once, [B] and [A] were at the [PLACE]. [B] offered a [OBJECT] to",
    "Finally, [B] and [A] returned to the [PLACE]. [B] showed a [OBJECT] to",
    "Meanwhile, [B] and [A] waited at the [PLACE]. [B] handed a [OBJECT] to",
    "Tonight, [B] and [A] sat in the [PLACE]. [B] lent a [OBJECT] to",
    "Today [B] met [A] at the [PLACE]. [B] gave a [OBJECT] to",
    "Then [B] and [A] went to the [PLACE], and [B] handed the [OBJECT] to",
    "At the [PLACE], [B] saw [A] with a [OBJECT]. Later, [B] sent it to",
    "In the [PLACE], [B] and [A] found a [OBJECT]. Then [B] gave the [OBJECT] to",
    "Yesterday [B] called [A] from the [PLACE], and today [B] brought a [OBJECT] to",
    "The [OBJECT] was at the [PLACE] when [B] met [A]. [B] gave it to",
)
# ABBA form: the same sentences with the first two names swapped.
def _swap(t):
    return t.replace("[B]", "[X]", 1).replace("[A]", "[B]", 1).replace("[X]", "[A]", 1)


ABBA_TEMPLATES = tuple(_swap(t) for t in BABA_TEMPLATES)
# Held-out templates: every word of them also occurs in a train template (checked in
# tests/test_tasks.py), so a model trained on the others knows the words, not the sentences.
TEST_TEMPLATES = (2, 5, 7, 13, 22, 23)
# Held-out templates of another kind (the split "novel"): no word of them but the names, nor
# their places and objects, nor their punctuation (";", "&"), occurs in the train templates,
# `PLACES` or `OBJECTS` (checked by `train_words` / `filler_held_out_words` in tests), and the
# final word is never " to"; so a model can solve them only by which name is repeated, not by
# the words around the names. Same form as `BABA_TEMPLATES` ([B] the subject, [A] the IO).
FILLER_HELD_OUT_TEMPLATES = (
    "Early this evening [B] joined [A] inside our [PLACE]; eventually [B] poured [OBJECT] for",
    "During breakfast [B] chatted beside [A] near their [PLACE] so [B] baked [OBJECT] for",
    "Whenever [B] visited [A] during summer holidays [B] cooked [OBJECT] for",
    "Last winter [B] hired [A] because our [PLACE] needed help; soon [B] paid",
    "Every morning [B] phoned [A] before breakfast because [B] really missed",
    "Both [B] plus [A] enjoy painting portraits but only [B] ever praises",
    "Outside our [PLACE] [B] bumped into [A] so [B] bought [OBJECT] for",
    "Since [B] & [A] moved into this [PLACE] last spring [B] regularly thanks",
)
FILLER_HELD_OUT_PLACES = ("bakery", "stadium", "harbor", "pharmacy", "warehouse", "cinema", "kitchen", "garage",
                          "studio", "castle", "cottage", "village")
FILLER_HELD_OUT_OBJECTS = ("soup", "pasta", "noodles", "sandwich", "cookies", "tea", "coffee", "pancakes")
BOS_ID = padding.PAD_ID  # <|endoftext|>, GPT-2's BOS

# Single GPT-2 tokens with a leading space (checked in tests/test_tasks.py).
NAMES = (
    "Mary", "John", "Michael", "Sarah", "David", "Jessica", "James", "Emily", "Robert", "Laura",
    "William", "Anna", "Thomas", "Rachel", "Daniel", "Rebecca", "Matthew", "Alice", "Andrew", "Helen",
    "Joseph", "Susan", "Richard", "Lisa", "Charles", "Karen", "Steven", "Nancy", "Paul", "Amy",
    "Mark", "Kate", "George", "Emma", "Peter", "Grace", "Kevin", "Julia", "Brian", "Linda",
    "Eric", "Diana", "Jason", "Angela", "Ryan", "Megan", "Adam", "Lucy", "Scott", "Victoria",
    "Henry", "Sophie", "Frank", "Maria", "Jack", "Kelly", "Tim", "Jane", "Martin", "Amanda",
    "Simon", "Nicole", "Samuel", "Ashley", "Edward", "Heather", "Patrick", "Andrea", "Kyle", "Michelle",
    "Aaron", "Erin", "Roger", "Jennifer", "Carl", "Stephanie", "Louis", "Christine", "Walter", "Katie",
)
PLACES = (
    "store", "park", "school", "garden", "hospital", "restaurant", "station", "office", "house", "beach",
    "church", "library", "market", "museum", "airport", "cafe", "theater", "hotel", "gym", "lake",
    "zoo", "farm", "mall", "bank",
)
OBJECTS = (
    "drink", "ring", "book", "ball", "gift", "letter", "bottle", "phone", "key", "cake",
    "cup", "hat", "bag", "pen", "card", "basket", "flower", "coin", "toy", "camera",
    "box", "watch", "pie", "shirt", "doll", "banana", "candle", "map", "ticket", "necklace",
    "snack", "computer",
)

# Every template by index: `BABA_TEMPLATES` (0..27), then `FILLER_HELD_OUT_TEMPLATES` (28..35,
# the split "novel"; info["template"] carries these indices).
_ALL_BABA = BABA_TEMPLATES + FILLER_HELD_OUT_TEMPLATES
_ALL_ABBA = tuple(_swap(t) for t in _ALL_BABA)
NOVEL_TEMPLATES = tuple(range(len(BABA_TEMPLATES), len(_ALL_BABA)))

SPLITS = ("all", "train", "test", "novel")


def split_names(names=NAMES):
    """(train, test): every 4th name (indices 3, 7, ...) is held out for test."""
    names = tuple(names)
    return tuple(n for i, n in enumerate(names) if i % 4 != 3), tuple(names[3::4])


def _words(text):
    """The lowercased words and punctuation marks of a text."""
    import re

    return set(re.findall(r"[a-z]+|[^a-z\s]", text.lower()))


def train_words():
    """Every word (lowercased) and punctuation mark of the train templates, `PLACES` and
    `OBJECTS`: the vocabulary of IOI prompts of the "train" split, names aside."""
    train = split_templates()[0]
    text = " ".join(BABA_TEMPLATES[i].replace("[A]", "").replace("[B]", "").replace("[PLACE]", "")
                    .replace("[OBJECT]", "") for i in train)
    return _words(" ".join([text, *PLACES, *OBJECTS]))


def filler_held_out_words():
    """Every word (lowercased) and punctuation mark of the "novel" split's templates, places
    and objects, names aside: none of them is in `train_words()`."""
    text = " ".join(t.replace("[A]", "").replace("[B]", "").replace("[PLACE]", "").replace("[OBJECT]", "")
                    for t in FILLER_HELD_OUT_TEMPLATES)
    return _words(" ".join([text, *FILLER_HELD_OUT_PLACES, *FILLER_HELD_OUT_OBJECTS]))


def split_templates():
    """(train, test) template indices: `TEST_TEMPLATES` are held out. (The split "novel",
    `NOVEL_TEMPLATES`, is a third set, outside both.)"""
    return tuple(i for i in range(len(BABA_TEMPLATES)) if i not in TEST_TEMPLATES), TEST_TEMPLATES


def _check_split(split):
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")


def _pool(names, split, tok=None):
    _check_split(split)
    names = tuple(NAMES if names is None else names)
    tok = wording.resolve(tok)
    if not all(isinstance(n, str) for n in names):
        raise ValueError(f"IOI names must be strings, got {[n for n in names if not isinstance(n, str)]!r:.200}")
    names = tuple(dict.fromkeys(n.strip() for n in names))
    if split != "all":
        names = split_names(names)[split in ("test", "novel")]
    bad = [n for n in names if not wording.is_one_token(tok, " " + n)]
    if bad:  # the names are the answers (and contrasts): each one token with its leading space
        wording.single_token(tok, " " + bad[0], "IOI", hint=f"; IOI names must be single tokens with a leading "
                             f"space ({len(bad)} of the {split!r} split's are not: {bad[:10]}{' ...' * (len(bad) > 10)})")
    if len(names) < 5:
        raise ValueError(f"the IOI ABC corruption needs at least 5 distinct names, the {split!r} split has {len(names)}")
    return names


def _templates(split, length=None, bos=False, tok=None):
    _check_split(split)
    if split == "novel":
        templates = NOVEL_TEMPLATES
    else:
        templates = tuple(range(len(BABA_TEMPLATES))) if split == "all" else split_templates()[split == "test"]
    if length is None:
        return templates
    by_length = template_lengths(split, bos, tok)
    if length not in by_length:
        raise ValueError(f"no {split!r} IOI template has {length!r} tokens{' with the BOS' if bos else ''}; "
                         f"lengths: {sorted(by_length)}")
    return by_length[length]


def template_lengths(split="all", bos=False, tokenizer=None):
    """{token length: template indices} of the `split`'s templates (with the BOS when `bos`) in
    `tokenizer` (default GPT-2's); names, places and objects are single tokens, so a template has
    one length."""
    tok = wording.resolve(tokenizer)
    names, out = _pool(None, split, tok)[:2], {}
    for i in _templates(split):
        places, objects = _fillers(split, tok)
        n = len(tok.encode(_prompt(i, False, *names, places[0], objects[0]))) + bool(bos)
        out[n] = out.get(n, ()) + (i,)
    return out


def _fillers(split, tok):
    """(places, objects) of a split's prompts: those that are single tokens (with their space) in
    `tok` (all of them in GPT-2's), so that a template has one token length."""
    places, objects = (FILLER_HELD_OUT_PLACES, FILLER_HELD_OUT_OBJECTS) if split == "novel" else (PLACES, OBJECTS)
    places, objects = ([w for w in words if wording.is_one_token(tok, " " + w)] for words in (places, objects))
    if not places or not objects:
        raise ValueError(f"IOI: no {'place' if not places else 'object'} of the {split!r} split is a single token "
                         "in this model's tokenizer")
    return places, objects


def _render(template, a, b, place, obj):
    # Placeholders follow a space in the templates, so fillers carry none.
    return template.replace("[A]", a).replace("[B]", b).replace("[PLACE]", place).replace("[OBJECT]", obj)


def _sample(n_prompts, seed, names, split, length=None, bos=False, tok=None):
    """Per prompt: (template index, abba, io, s, place, object, (c, d, e) corrupted names)."""
    if isinstance(n_prompts, bool) or not isinstance(n_prompts, (int, np.integer)) or n_prompts < 1:
        raise ValueError(f"n_prompts must be a positive int, got {n_prompts!r}")
    pool, templates = _pool(names, split, tok), _templates(split, length, bos, tok)
    places, objects = _fillers(split, wording.resolve(tok))
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(int(n_prompts)):
        io, s, c, d, e = rng.choice(len(pool), size=5, replace=False)
        rows.append((int(templates[rng.integers(len(templates))]), i % 2 == 0, pool[io], pool[s],
                     places[rng.integers(len(places))], objects[rng.integers(len(objects))],
                     (pool[c], pool[d], pool[e])))
    return rows


def _prompt(template_idx, abba, io, s, place, obj):
    templates = _ALL_ABBA if abba else _ALL_BABA
    return _render(templates[template_idx], io, s, place, obj)


def _abc_prompt(template_idx, abba, c, d, e, place, obj):
    """The template with first name c, second name d and repeated subject e."""
    t = (_ALL_ABBA if abba else _ALL_BABA)[template_idx]
    first, second = ("[A]", "[B]") if abba else ("[B]", "[A]")
    t = t.replace(first, "[C]", 1).replace(second, "[D]", 1).replace("[B]", "[E]")
    return t.replace("[C]", c).replace("[D]", d).replace("[E]", e).replace("[PLACE]", place).replace("[OBJECT]", obj)


def _name_positions(ids, io, s, prompt):
    """(io, s1, s2) token positions; refuses a prompt whose names are not where the template puts them."""
    ids = np.asarray(ids)
    io_at, s_at = np.flatnonzero(ids == io), np.flatnonzero(ids == s)
    if len(io_at) != 1 or len(s_at) != 2:
        raise ValueError(f"IOI prompt {prompt!r}: expected the IO name once and the subject twice as tokens "
                         "(a name that is also a template word?)")
    return int(io_at[0]), int(s_at[0]), int(s_at[1])


def ioi_task(n_prompts=100, *, seed=0, names=None, split="all", bos=False, length=None, tokenizer=None):
    """`n_prompts` IOI prompts (half ABBA, half BABA, random templates, places,
    objects and names) with the ABC corruption (same token length per prompt).

    names: the name pool (default `NAMES`); split: "all", or "train" / "test":
    the deterministic held-out split of both the name pool (`split_names`: every
    4th name is test) and the templates (`split_templates`), so a model trained
    on the train split can be patched on sentences and names it never saw; or
    "novel": test names in `FILLER_HELD_OUT_TEMPLATES` with `FILLER_HELD_OUT_PLACES`
    / `_OBJECTS`, sentences none of whose other words a train prompt uses ("all"
    is the 28 `BABA_TEMPLATES` only).
    bos: start every prompt with the tokenizer's BOS (GPT-2's <|endoftext|>, as TransformerLens does).
    tokenizer: the prompts' tokenizer (default GPT-2's; a model's own: `model.tokenizer`); text it
    cannot encode exactly and names that are not single tokens in it are refused by name.
    Prompts have different lengths: the batch is right-padded with an
    `attention_mask` (None when all prompts have one length). length: only the
    templates of this many tokens (`template_lengths`), for code that needs one
    length (e.g. circuits); the names are still at different positions.
    Answer = IO, contrast = S; key_positions = [first name, second name, repeated
    subject] per prompt; last_key_position = the repeated subject.
    info: "template" (index), "abba", "bos" (bool), "io_position", "s1_position",
    "s2_position", "end_position" (the last real token, where the answer is read).
    """
    from jpatch.data.tasks import Task

    if not isinstance(bos, (bool, np.bool_)):
        raise ValueError(f"bos must be True or False, got {bos!r}")
    tok = wording.resolve(tokenizer)
    rows = _sample(n_prompts, seed, names, split, length, bos, tok)
    prompts = [_prompt(t, abba, io, s, place, obj) for t, abba, io, s, place, obj, _ in rows]
    corrupted = [_abc_prompt(t, abba, c, d, e, place, obj) for t, abba, io, s, place, obj, (c, d, e) in rows]
    start = wording.bos_ids(tok, bos, "IOI")
    clean_ids = [start + wording.encode_exact(tok, p, "IOI") for p in prompts]
    corrupted_ids = [start + wording.encode_exact(tok, p, "IOI") for p in corrupted]
    if any(len(a) != len(b) for a, b in zip(clean_ids, corrupted_ids)):
        raise AssertionError("an IOI prompt and its ABC corruption tokenized to different lengths")
    answers = [wording.single_token(tok, " " + r[2], "IOI") for r in rows]
    contrasts = [wording.single_token(tok, " " + r[3], "IOI") for r in rows]
    pos = np.array([_name_positions(ids, a, c, p) for ids, a, c, p in zip(clean_ids, answers, contrasts, prompts)])
    clean_tokens, mask = padding.pad(clean_ids, pad_id=wording.pad_id(tok))
    corrupted_tokens, _ = padding.pad(corrupted_ids, pad_id=wording.pad_id(tok))
    abba = np.array([r[1] for r in rows])
    first = np.where(abba, pos[:, 0], pos[:, 1])
    second = np.where(abba, pos[:, 1], pos[:, 0])
    prefix = wording.bos_text(tok, bos)
    return Task(
        name=(f"ioi-{split}" if split != "all" else "ioi") + ("-bos" if bos else ""),
        clean_tokens=clean_tokens,
        corrupted_tokens=corrupted_tokens,
        answers=answers,
        contrasts=contrasts,
        key_positions=np.stack([first, second, pos[:, 2]], 1),
        last_key_position=pos[:, 2],
        prompts=[prefix + p for p in prompts],
        corrupted_prompts=[prefix + p for p in corrupted],
        info={"template": np.array([r[0] for r in rows]), "abba": abba, "bos": np.full(len(rows), bool(bos)),
              "io_position": pos[:, 0], "s1_position": pos[:, 1], "s2_position": pos[:, 2],
              "end_position": mask.sum(1) - 1},
        attention_mask=None if mask.all() else mask,
        tokenizer=tokenizer,
    )


def ioi_prompts_text(n_prompts, *, seed=0, names=None, split="train", with_answer=True):
    """`n_prompts` IOI sentences (names and templates from `split`), completed with
    the IO name and a full stop when `with_answer`:
    "Then, John and Mary went to the store. John gave a drink to Mary."."""
    rows = _sample(n_prompts, seed, names, split)
    return [_prompt(t, abba, io, s, place, obj) + (f" {io}." if with_answer else "")
            for t, abba, io, s, place, obj, _ in rows]
