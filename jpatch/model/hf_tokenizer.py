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

import numpy as np
import tokenizers

from jpatch.model.tokenizer import EOS_TOKEN, check_str

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


class HFTokenizer:
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

    @property
    def backend(self):
        """The underlying ``tokenizers.Tokenizer``."""
        return self._tok

    def _check_ids(self, ids, what):
        if isinstance(ids, (str, bytes)):
            raise TypeError(f"{what} expects a sequence of token ids, got {type(ids).__name__}: {ids!r:.80}")
        arr = np.asarray(ids)
        if arr.size == 0:
            return []
        if arr.ndim != 1 or arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
            raise TypeError(f"{what} expects a 1-D sequence of integer token ids, got {type(ids).__name__} "
                            f"with shape {arr.shape} and dtype {arr.dtype}")
        bad = arr[(arr < 0) | (arr >= self.vocab_size)]
        if bad.size:
            raise ValueError(f"token id {int(bad[0])} is outside the vocabulary of {self.path} [0, {self.vocab_size})")
        return arr.tolist()

    def encode(self, text):
        """``str`` -> token ids (``list[int]``); special tokens in the text encode to their ids."""
        check_str(text, "encode")
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids):
        """Token ids ([pos] list or 1-D array) -> ``str``; special tokens are kept."""
        return self._tok.decode(self._check_ids(ids, "decode"), skip_special_tokens=False)

    def encode_batch(self, texts, *, padding_side="right", pad_id=None):
        """Encode ``texts`` and pad to the longest (with ``pad_id``, default `self.pad_id`):
        (tokens, attention_mask), int32 [batch, pos], as `GPT2Tokenizer.encode_batch`."""
        if isinstance(texts, str) or not hasattr(texts, "__iter__"):
            raise TypeError(f"encode_batch expects a list of str, got {type(texts).__name__}: {texts!r:.80}")
        texts = list(texts)
        for t in texts:
            check_str(t, "encode_batch")
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        pad_id = self.pad_id if pad_id is None else pad_id
        if isinstance(pad_id, bool) or not isinstance(pad_id, (int, np.integer)) or not 0 <= pad_id < self.vocab_size:
            raise ValueError(f"pad_id must be an int in [0, {self.vocab_size}), got {pad_id!r}")
        encoded = [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]
        pos = max((len(ids) for ids in encoded), default=0)
        tokens = np.full((len(encoded), pos), pad_id, dtype=np.int32)
        mask = np.zeros((len(encoded), pos), dtype=np.int32)
        for i, ids in enumerate(encoded):
            if ids:
                sl = slice(0, len(ids)) if padding_side == "right" else slice(pos - len(ids), pos)
                tokens[i, sl], mask[i, sl] = ids, 1
        return tokens, mask

    def is_single_token(self, word):
        """Whether ``word`` encodes to exactly one token."""
        check_str(word, "is_single_token")
        return len(self.encode(word)) == 1

    def token_id(self, word):
        """The id of ``word`` if it is exactly one token; a ValueError showing its split otherwise."""
        check_str(word, "token_id")
        ids = self.encode(word)
        if len(ids) != 1:
            raise ValueError(f"{word!r} is not a single token of {self.path}: it encodes to {len(ids)} tokens "
                             f"{self.to_str_tokens(ids)!r} (ids {ids})")
        return ids[0]

    def to_str_tokens(self, ids):
        """Each token decoded on its own ([pos] strs); a str is encoded first."""
        if isinstance(ids, str):
            ids = self.encode(ids)
        ids = self._check_ids(ids, "to_str_tokens")
        return self._tok.decode_batch([[i] for i in ids], skip_special_tokens=False)

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
