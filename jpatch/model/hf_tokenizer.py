"""A Hugging Face `tokenizer.json` (e.g. Pythia's) through the `tokenizers` library, with the
interface of `jpatch.model.tokenizer.GPT2Tokenizer` that the models' text methods use.

The special tokens come from `tokenizer_config.json` / `special_tokens_map.json` beside the
file when there is one (as `transformers` saves them), else "<|endoftext|>" when the
vocabulary has it (GPT-2's, Pythia's and GPT-NeoX-20B's convention): BOS and EOS are that
token, and padding is the pad token if one is named, else BOS (as TransformerLens pads).

Usage::

    tok = load_tokenizer("weights/pythia-70m/tokenizer.json")
    tok.bos_id, tok.encode(" Mary")
"""

import functools
import json
import os
from pathlib import Path

import tokenizers

from jpatch.model.tokenizer import EOS_TOKEN, TextTokenizer

TOKENIZER_FILE = "tokenizer.json"
# Files beside tokenizer.json naming its special tokens (transformers 5 writes the first only).
SPECIAL_TOKEN_FILES = ("tokenizer_config.json", "special_tokens_map.json")


def _token_content(value):
    """A special-token entry of tokenizer_config.json: "<|endoftext|>" or {"content": "<|endoftext|>", ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def special_tokens(path):
    """{"bos_token": str, "eos_token": ..., "pad_token": ...} named in the files beside `path`
    (tokenizer_config.json before special_tokens_map.json); {} when there are none."""
    named = {}
    for name in reversed(SPECIAL_TOKEN_FILES):
        try:
            raw = json.loads((Path(path).parent / name).read_text())
        except FileNotFoundError:
            continue
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read {Path(path).parent / name}: {e}") from e
        if isinstance(raw, dict):
            for key in ("bos_token", "eos_token", "pad_token"):
                token = _token_content(raw.get(key))
                if token is not None:
                    named[key] = token
    return named


class HFTokenizer(TextTokenizer):
    """A `tokenizer.json`: text <-> token ids in [0, vocab_size), with `bos_id`, `eos_id` and
    `pad_id` (see the module docstring). Nothing is added when encoding; `to_tokens` prepends BOS."""

    def __init__(self, path, *, bos_token=None, eos_token=None, pad_token=None):
        self.path = Path(path)
        try:
            self._tok = tokenizers.Tokenizer.from_file(str(self.path))
        except Exception as e:  # tokenizers raises its own Exception type for a bad file
            if not self.path.is_file():
                raise FileNotFoundError(f"missing tokenizer file {self.path}") from None
            raise ValueError(f"cannot read tokenizer file {self.path}: {e}") from None
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.vocabulary, self.single_token = f"the vocabulary of {self.path}", f"a single token of {self.path}"
        named = special_tokens(self.path)
        default = EOS_TOKEN if self._tok.token_to_id(EOS_TOKEN) is not None else None
        bos = bos_token or named.get("bos_token") or default
        eos = eos_token or named.get("eos_token") or bos
        pad = pad_token or named.get("pad_token")
        self.bos_id, self.eos_id, self.pad_id = (self._id(t, what) for t, what in
                                                 ((bos, "BOS"), (eos, "EOS"), (pad, "pad")))
        if self.pad_id is None:
            self.pad_id = self.bos_id

    def _id(self, token, what):
        if token is None:
            return None
        token_id = self._tok.token_to_id(token)
        if token_id is None:
            raise ValueError(f"the {what} token {token!r} is not in {self.path}'s vocabulary")
        return token_id

    def __repr__(self):
        return f"HFTokenizer({str(self.path)!r}, vocab_size={self.vocab_size}, bos_id={self.bos_id})"


@functools.lru_cache(maxsize=16)
def _cached(path, stamp):
    return HFTokenizer(path)


def load_tokenizer(path):
    """The `HFTokenizer` of `path`, shared while the file (and its special-token files) is unchanged."""
    path = Path(path).expanduser().absolute()

    def stamp(p):
        try:
            st = os.stat(p)
            return st.st_mtime_ns, st.st_size
        except FileNotFoundError:
            return None

    if stamp(path) is None:
        raise FileNotFoundError(f"missing tokenizer file {path}")
    return _cached(str(path), tuple(stamp(p) for p in (path, *(path.parent / n for n in SPECIAL_TOKEN_FILES))))
