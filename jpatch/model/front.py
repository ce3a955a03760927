"""TransformerLens's conveniences on jpatch's GPT2: tokens <-> text, weights in
TransformerLens's shapes, and `generate`. A mixin of plain methods: the model stays
a pure function of (params, tokens, overrides)."""

import jax.numpy as jnp
import numpy as np

from jpatch.model.tokenizer import EOS_ID, VOCAB_SIZE, get_tokenizer


class FrontDoor:
    """Methods `GPT2` shares with TransformerLens's HookedTransformer."""

    # --- text and tokens -------------------------------------------------------------

    @property
    def tokenizer(self):
        """GPT-2's tokenizer (`jpatch.model.tokenizer.GPT2Tokenizer`: encode, decode, to_str_tokens, ...)."""
        if self.config.d_vocab != VOCAB_SIZE:
            raise ValueError(f"this model's vocabulary has {self.config.d_vocab} tokens, not GPT-2's {VOCAB_SIZE}: "
                             "the GPT-2 tokenizer does not apply; pass token ids")
        return get_tokenizer()

    def check_gpt2_ids(self, what):
        """Refuse `what` (token ids made by GPT-2's tokenizer: the paper rerun's tasks) on a family with
        another vocabulary: they would be valid ids of the wrong tokens, and every number computed from
        them wrong. (The command line's tasks and datasets are read with the model's own tokenizer.)"""
        if self.config.family != "gpt2":
            raise ValueError(f"{what} are tokenized with GPT-2's tokenizer, and this is a {self.sites.family} model "
                             "with its own vocabulary: build prompts with model.to_tokens (or read a dataset with "
                             "jpatch.data.dataset.read_dataset(path, tokenizer=model.tokenizer)) and use the Python API, "
                             "or the command line's tasks (jpatch sweep / demo / attribute / circuit / bulk), which use "
                             "the model's own tokenizer")

    @property
    def pad_id(self):
        """The id texts of different lengths are padded with: the tokenizer's (GPT-2's 50256), else the
        vocabulary's last id. Prompts given without an attention_mask whose rows end in it in some rows
        only are refused as hidden padding (`jpatch.engine.inputs.batch_mask`)."""
        try:
            return self.tokenizer.pad_id
        except ValueError:  # no tokenizer for this model
            return self.config.d_vocab - 1

    @property
    def default_prepend_bos(self):
        """Whether text gets BOS first by default: TransformerLens's `default_prepend_bos` for the
        family (True; False for Qwen 2 / 3)."""
        return getattr(self.config, "default_prepend_bos", True)

    def to_tokens(self, input, prepend_bos=None, padding_side="right"):
        """Text -> int32 tokens [batch, pos], with the tokenizer's BOS first when prepend_bos
        (GPT-2's and Pythia's <|endoftext|>: 50256, 0; None: `default_prepend_bos`), as
        TransformerLens's `to_tokens`. A list of texts of different token lengths is padded (with
        the tokenizer's `pad_id`, on `padding_side`) and returns (tokens, attention_mask)."""
        prepend_bos = self.default_prepend_bos if prepend_bos is None else prepend_bos
        tok = self.tokenizer
        bos, pad = tok.bos_id, tok.pad_id
        if prepend_bos and bos is None:
            raise ValueError("this model's tokenizer has no BOS token: pass prepend_bos=False")
        texts = [input] if isinstance(input, str) else list(input)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise TypeError(f"to_tokens takes a str or a non-empty list of str, got {input!r:.80}")
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        ids = [[bos] * bool(prepend_bos) + tok.encode(t) for t in texts]
        for t, i in zip(texts, ids):
            if not i:
                raise ValueError(f"{t!r} has no tokens (pass prepend_bos=True or a non-empty text)")
        n = max(map(len, ids))
        tokens = np.full((len(ids), n), pad, np.int32)
        mask = np.zeros((len(ids), n), np.int32)
        for b, i in enumerate(ids):
            at = slice(0, len(i)) if padding_side == "right" else slice(n - len(i), n)
            tokens[b, at], mask[b, at] = i, 1
        if mask.all():
            return jnp.asarray(tokens)
        return jnp.asarray(tokens), jnp.asarray(mask)

    def to_str_tokens(self, input, prepend_bos=None):
        """Each token as its own string: of a text (tokenized as `to_tokens`), a list of texts
        (a list per text) or tokens ([pos] or [1, pos])."""
        tok = self.tokenizer
        if isinstance(input, str):
            return tok.to_str_tokens(np.asarray(self.to_tokens(input, prepend_bos))[0])
        if isinstance(input, (list, tuple)) and input and all(isinstance(t, str) for t in input):
            return [self.to_str_tokens(t, prepend_bos) for t in input]
        ids = np.asarray(input)
        if ids.ndim == 2 and ids.shape[0] == 1:
            ids = ids[0]
        if ids.ndim != 1:
            raise ValueError(f"to_str_tokens takes [pos] or [1, pos] tokens, got shape {ids.shape}")
        return tok.to_str_tokens(ids)

    def to_string(self, tokens):
        """Tokens [pos] -> str; [batch, pos] -> list of str (special tokens kept)."""
        ids = np.asarray(tokens)
        if ids.ndim == 2:
            return [self.to_string(row) for row in ids]
        return self.tokenizer.decode(np.atleast_1d(ids))

    def to_single_token(self, string):
        """The id of a one-token string (" Mary" -> 5335); a clear error naming the pieces otherwise."""
        return self.tokenizer.token_id(string)

    def as_tokens(self, tokens, attention_mask=None):
        """A model input (text, list of texts, [pos] or [batch, pos] ids) -> ([batch, pos] tokens, mask)."""
        if isinstance(tokens, str) or (isinstance(tokens, (list, tuple)) and tokens
                                       and all(isinstance(t, str) for t in tokens)):
            out = self.to_tokens(tokens)
            if isinstance(out, tuple):
                if attention_mask is not None:
                    raise ValueError("texts of different lengths make their own attention_mask; do not pass one")
                return out
            return out, attention_mask
        if isinstance(tokens, tuple) and len(tokens) == 2 and all(hasattr(t, "shape") for t in tokens):
            raise TypeError("got a (tokens, attention_mask) pair: to_tokens of texts of different lengths returns "
                            "both (TransformerLens returns the tokens only); unpack it: tokens, mask = "
                            "model.to_tokens(texts), then model(tokens, attention_mask=mask)")
        tokens = jnp.asarray(tokens)
        if tokens.ndim == 1:
            tokens = tokens[None]
            if attention_mask is not None:
                attention_mask = jnp.asarray(attention_mask).reshape(1, -1)
        return tokens, attention_mask

    def tokens_to_residual_directions(self, tokens):
        """The unembedding direction(s) of `tokens` (a one-token str, an id or an array of ids): [..., d_model]."""
        if isinstance(tokens, str):
            tokens = self.to_single_token(tokens)
        return jnp.moveaxis(self.W_U[:, jnp.asarray(tokens)], 0, -1)

    # --- generation ------------------------------------------------------------------

    def generate(self, input, max_new_tokens=10, *, do_sample=True, temperature=1.0, top_k=None, seed=None,
                 stop_at_eos=True, eos_token_id=None, prepend_bos=None, return_type="input", verbose=True,
                 use_past_kv_cache=True, top_p=None, freq_penalty=0.0):
        """Continue text or tokens, as TransformerLens's `generate`: see `jpatch.model.generate.generate`.

        seed: None (default) draws a fresh sample every call, as TransformerLens does from torch's
        global generator; an int reproduces its sample. eos_token_id: default the tokenizer's
        end-of-text token (GPT-2: 50256 whatever its vocabulary); a model with neither a tokenizer
        nor an `eos_token_id` does not stop at EOS. return_type: "input" (text for text, tokens for
        tokens), "str" or "tokens". verbose: accepted (the loop is one compiled call, with no
        progress bar). use_past_kv_cache: accepted; jpatch always uses its key-value cache, which
        gives the tokens of the uncached loop. top_p, freq_penalty: TransformerLens's (nucleus sampling
        when top_k is None; each token's logit lowered by freq_penalty x its count so far)."""
        from jpatch.model.generate import generate

        prepend_bos = self.default_prepend_bos if prepend_bos is None else prepend_bos
        if return_type not in ("input", "str", "tokens"):
            raise ValueError(f"return_type must be 'input', 'str' or 'tokens', got {return_type!r}")
        if eos_token_id is None:
            try:
                eos_token_id = self.tokenizer.eos_id
            except ValueError:  # no tokenizer: GPT-2's id for GPT-2, as before; else nothing to stop at
                eos_token_id = EOS_ID if self.config.family == "gpt2" else None
            if eos_token_id is None:
                stop_at_eos, eos_token_id = False, -1
        tokens_out = return_type == "tokens" and isinstance(input, str)
        out = generate(self, self.to_tokens(input, prepend_bos=prepend_bos) if tokens_out else input, max_new_tokens,
                       do_sample=do_sample, temperature=temperature, top_k=top_k, seed=seed, stop_at_eos=stop_at_eos,
                       eos_token_id=eos_token_id, prepend_bos=prepend_bos, top_p=top_p, freq_penalty=freq_penalty)
        if return_type == "str" and not isinstance(input, str):
            texts = [self.tokenizer.decode([t for t in row if t != self.tokenizer.eos_id]) for row in np.asarray(out)]
            return texts[0] if len(texts) == 1 else texts
        return out

    # --- positions --------------------------------------------------------------------

    def get_token_position(self, single_token, input, mode="first", prepend_bos=None, padding_side="right"):
        """The position of `single_token` (a one-token str or an id) in a text (tokenized as
        `to_tokens`) or tokens [pos] / [1, pos]: its first (mode="first") or last ("last")
        occurrence, as TransformerLens's; a clear error when it does not occur."""
        tokens = self.to_tokens(input, prepend_bos=prepend_bos, padding_side=padding_side) \
            if isinstance(input, str) else input
        tokens = np.asarray(tokens)
        if tokens.ndim == 2:
            if tokens.shape[0] != 1:
                raise ValueError(f"If tokens are rank two, they must have shape [1, seq_len], not {tokens.shape}")
            tokens = tokens[0]
        if tokens.ndim != 1:
            raise ValueError(f"get_token_position takes a text or [pos] / [1, pos] tokens, got shape {tokens.shape}")
        if isinstance(single_token, str):
            single_token = self.to_single_token(single_token)
        single_token = int(np.asarray(single_token).item() if hasattr(single_token, "item") else single_token)
        found = np.flatnonzero(tokens == single_token)
        if not found.size:
            raise ValueError(f"The token {single_token} does not occur in the prompt")
        if mode not in ("first", "last"):
            raise ValueError(f"mode must be 'first' or 'last', not {mode}")
        return int(found[0] if mode == "first" else found[-1])
