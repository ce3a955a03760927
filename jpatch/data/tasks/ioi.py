"""Indirect object identification (Wang et al. 2022) with the "ABC" STR corruption.

Clean prompts follow the IOI templates: two names, then the subject repeated,
and the model should complete with the other name (the indirect object, IO)::

    BABA: "Then, John and Mary went to the store. John gave a drink to" -> " Mary"
    ABBA: "Then, Mary and John went to the store. John gave a drink to" -> " Mary"

The corrupted prompt replaces the three names (IO, S1, S2) with three other
distinct names (the paper's "ABC" distribution), so the repeated name that
identifies the subject is gone. Answer = IO, contrast = S.

Every template here tokenizes to the same 15 tokens with the names at the same
positions (2, 4 and 10), so prompts from all templates and both orders share
one batch and position-wise patching results line up across prompts.
"""

import numpy as np

from jpatch.model.tokenizer import get_tokenizer

# BABA form: [B] is the subject (named twice), [A] the indirect object. Written for
# jpatch in the style of Wang et al.'s templates; each is 15 GPT-2 tokens with
# single-token names, places and objects.
BABA_TEMPLATES = (
    "Then, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to",
    "Later, [B] and [A] walked to the [PLACE]. [B] handed a [OBJECT] to",
    "Then, [B] and [A] arrived at the [PLACE]. [B] passed a [OBJECT] to",
    "Today, [B] and [A] met at the [PLACE]. [B] brought a [OBJECT] to",
    "Yesterday, [B] and [A] worked at the [PLACE]. [B] sent a [OBJECT] to",
    "Once, [B] and [A] were at the [PLACE]. [B] offered a [OBJECT] to",
    "Finally, [B] and [A] returned to the [PLACE]. [B] showed a [OBJECT] to",
    "Earlier, [B] and [A] stopped by the [PLACE]. [B] tossed a [OBJECT] to",
    "Next, [B] and [A] stayed at the [PLACE]. [B] threw a [OBJECT] to",
    "Meanwhile, [B] and [A] waited at the [PLACE]. [B] handed a [OBJECT] to",
    "Soon, [B] and [A] ran to the [PLACE]. [B] gave a [OBJECT] to",
    "Tonight, [B] and [A] sat in the [PLACE]. [B] lent a [OBJECT] to",
)
# ABBA form: the same sentences with the first two names swapped.
ABBA_TEMPLATES = tuple(t.replace("[B] and [A]", "[A] and [B]", 1) for t in BABA_TEMPLATES)

# Token positions shared by every template: first name, second name, repeated subject.
FIRST_NAME_POS, SECOND_NAME_POS, S2_POS = 2, 4, 10
PROMPT_LEN = 15

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

SPLITS = ("all", "train", "test")


def split_names(names=NAMES):
    """(train, test): every 4th name (indices 3, 7, ...) is held out for test."""
    names = tuple(names)
    return tuple(n for i, n in enumerate(names) if i % 4 != 3), tuple(names[3::4])


def _pool(names, split):
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    names = tuple(NAMES if names is None else names)
    tok = get_tokenizer()
    bad = [n for n in names if not isinstance(n, str) or not tok.is_single_token(" " + n.strip())]
    if bad:
        raise ValueError(f"IOI names must be single GPT-2 tokens with a leading space; not single tokens: {bad}")
    names = tuple(dict.fromkeys(n.strip() for n in names))
    if split != "all":
        names = split_names(names)[split == "test"]
    if len(names) < 5:
        raise ValueError(f"the IOI ABC corruption needs at least 5 distinct names, the {split!r} split has {len(names)}")
    return names


def _render(template, a, b, place, obj):
    # Placeholders follow a space in the templates, so fillers carry none.
    return template.replace("[A]", a).replace("[B]", b).replace("[PLACE]", place).replace("[OBJECT]", obj)


def _sample(n_prompts, seed, names, split):
    """Per prompt: (template index, abba, io, s, place, object, (c, d, e) corrupted names)."""
    if isinstance(n_prompts, bool) or not isinstance(n_prompts, (int, np.integer)) or n_prompts < 1:
        raise ValueError(f"n_prompts must be a positive int, got {n_prompts!r}")
    pool = _pool(names, split)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(int(n_prompts)):
        io, s, c, d, e = rng.choice(len(pool), size=5, replace=False)
        rows.append((int(rng.integers(len(BABA_TEMPLATES))), i % 2 == 0, pool[io], pool[s],
                     PLACES[rng.integers(len(PLACES))], OBJECTS[rng.integers(len(OBJECTS))],
                     (pool[c], pool[d], pool[e])))
    return rows


def _prompt(template_idx, abba, io, s, place, obj):
    templates = ABBA_TEMPLATES if abba else BABA_TEMPLATES
    return _render(templates[template_idx], io, s, place, obj)


def _abc_prompt(template_idx, abba, c, d, e, place, obj):
    """The template with first name c, second name d and repeated subject e."""
    t = (ABBA_TEMPLATES if abba else BABA_TEMPLATES)[template_idx]
    first, second = ("[A]", "[B]") if abba else ("[B]", "[A]")
    t = t.replace(f"{first} and {second}", "[C] and [D]", 1).replace("[B]", "[E]")
    return t.replace("[C]", c).replace("[D]", d).replace("[E]", e).replace("[PLACE]", place).replace("[OBJECT]", obj)


def ioi_task(n_prompts=100, *, seed=0, names=None, split="all"):
    """`n_prompts` IOI prompts (half ABBA, half BABA, random templates, places,
    objects and names), all 15 tokens long, with the ABC corruption.

    names: the name pool (default `NAMES`); split: "all", or "train" / "test"
    for the deterministic held-out split of the pool (`split_names`: every 4th
    name is test), so a model trained on the train names can be patched on unseen
    ones. Answer = IO, contrast = S; key_positions = [first name, second name,
    repeated subject] = [2, 4, 10]; last_key_position = 10.
    info: "template" (index), "abba" (bool), "io_position", "s1_position", "s2_position".
    """
    from jpatch.data.tasks import Task

    tok = get_tokenizer()
    rows = _sample(n_prompts, seed, names, split)
    prompts = [_prompt(t, abba, io, s, place, obj) for t, abba, io, s, place, obj, _ in rows]
    corrupted = [_abc_prompt(t, abba, c, d, e, place, obj) for t, abba, io, s, place, obj, (c, d, e) in rows]
    clean_tokens, _ = tok.encode_batch(prompts)
    corrupted_tokens, _ = tok.encode_batch(corrupted)
    if clean_tokens.shape != (len(rows), PROMPT_LEN) or corrupted_tokens.shape != clean_tokens.shape:
        raise AssertionError(f"IOI prompts did not tokenize to {PROMPT_LEN} tokens each")
    n = len(rows)
    abba = np.array([r[1] for r in rows])
    io_pos = np.where(abba, FIRST_NAME_POS, SECOND_NAME_POS)
    s1_pos = np.where(abba, SECOND_NAME_POS, FIRST_NAME_POS)
    return Task(
        name=f"ioi-{split}" if split != "all" else "ioi",
        clean_tokens=clean_tokens,
        corrupted_tokens=corrupted_tokens,
        answers=[tok.token_id(" " + r[2]) for r in rows],
        contrasts=[tok.token_id(" " + r[3]) for r in rows],
        key_positions=np.tile([FIRST_NAME_POS, SECOND_NAME_POS, S2_POS], (n, 1)),
        last_key_position=np.full(n, S2_POS),
        prompts=prompts,
        corrupted_prompts=corrupted,
        info={"template": np.array([r[0] for r in rows]), "abba": abba, "io_position": io_pos,
              "s1_position": s1_pos, "s2_position": np.full(n, S2_POS)},
    )


def ioi_prompts_text(n_prompts, *, seed=0, names=None, split="train", with_answer=True):
    """`n_prompts` IOI sentences for training a toy model (names from `split`),
    completed with the IO name and a full stop when `with_answer`:
    "Then, John and Mary went to the store. John gave a drink to Mary."."""
    rows = _sample(n_prompts, seed, names, split)
    return [_prompt(t, abba, io, s, place, obj) + (f" {io}." if with_answer else "")
            for t, abba, io, s, place, obj, _ in rows]
