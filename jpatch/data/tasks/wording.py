"""The tokenizer a built-in task's text goes through: GPT-2's by default, or a model's own
(`tokenizer=model.tokenizer`, e.g. a converted Llama or Pythia folder's tokenizer.json), and the
checks that keep a task exact in any vocabulary: text that does not decode back to itself and
answers that are not single tokens are refused by name, never approximated."""

from jpatch.model.tokenizer import get_tokenizer


def resolve(tokenizer):
    """`tokenizer`, or GPT-2's when None."""
    return get_tokenizer() if tokenizer is None else tokenizer


def for_model(model):
    """(tokenizer, bos) for a model's tasks: (None, False) for GPT-2 (its tasks as they always were:
    GPT-2's tokenizer, no BOS), else the model's own tokenizer and its family's BOS convention
    (`default_prepend_bos`, as TransformerLens). A model without a tokenizer raises ValueError."""
    if model.config.family == "gpt2":
        return None, False
    return model.tokenizer, bool(model.default_prepend_bos)


def encode_exact(tok, text, task):
    """`text`'s token ids, refused when they do not decode back to `text` (an unknown-word token,
    a normalizer that changes the text): the prompts would not be the task's."""
    ids = tok.encode(text)
    back = tok.decode(ids)
    if back != text:
        raise ValueError(f"{task}: this model's tokenizer cannot encode {text!r} exactly (its {len(ids)} tokens "
                         f"decode to {back!r})")
    return ids


# What an answer follows when its tokens are checked: a word is tokenized as it continues a text (a
# SentencePiece tokenizer that prefixes "▁" encodes " Mary" alone as two tokens, after a word as one).
CONTEXT = "Then,"


def answer_ids(tok, word, after=CONTEXT):
    """The ids `word` adds when it follows `after` (exactly: the longer text's ids extend the shorter's
    and decode back to it), or None when it merges into `after` or does not encode exactly."""
    head, ids = tok.encode(after), tok.encode(after + word)
    if ids[: len(head)] != head or tok.decode(ids) != after + word:
        return None
    return ids[len(head):]


def is_one_token(tok, word, after=CONTEXT):
    """Whether `word` is exactly one token of `tok` after `after` (not an unknown-word token)."""
    ids = answer_ids(tok, word, after)
    return ids is not None and len(ids) == 1


def single_token(tok, word, task, what="answer", hint="", after=CONTEXT):
    """The id of `word` when it is one token of `tok` after `after`; else ValueError naming it and its pieces."""
    ids = answer_ids(tok, word, after)
    if ids is None:
        raise ValueError(f"{task}: {what} {word!r} does not encode exactly as its own tokens after {after!r} in this "
                         f"model's tokenizer, not {tok.single_token}{hint}")
    if len(ids) != 1:
        raise ValueError(f"{task}: {what} {word!r} is {len(ids)} tokens in this model's tokenizer "
                         f"({tok.to_str_tokens(ids)!r}), not {tok.single_token}{hint}")
    return ids[0]


def bos_ids(tok, bos, task):
    """[BOS id] when `bos`, else []; refused for a tokenizer without a BOS token."""
    if not bos:
        return []
    if tok.bos_id is None:
        raise ValueError(f"{task}: this model's tokenizer has no BOS token to start the prompts with")
    return [tok.bos_id]


def bos_text(tok, bos):
    """The BOS token's text ("<|endoftext|>", "<s>", ...) that a prompt's text starts with, or ""."""
    return tok.to_str_tokens([tok.bos_id])[0] if bos else ""


def pad_id(tok):
    """The id padded prompts are filled with: the tokenizer's pad id (any id when it has none:
    a task's padding always comes with its attention mask)."""
    return 0 if tok.pad_id is None else tok.pad_id
