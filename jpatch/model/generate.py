"""Text generation with a key-value cache, as TransformerLens's `model.generate`.

The prompt runs once through the ordinary forward (keeping each layer's keys and
values); each new token then runs one position through the same `Block`, attending
to the cached keys and values. The whole loop is one jitted `lax.scan`.
"""

import math
import secrets

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from jpatch.model.layers import expand_kv, in_window, no_edit, soft_cap


def _step_attention(K, V, t):
    """`attend` for one new position t: writes its k, v into the caches and attends to keys 0..t
    (those inside the sliding window, when the block has one)."""
    out = {}

    def attend(q, k, v, window=None, softcap=None):  # q [B, 1, H, d_head]; k, v [B, 1, n_kv, d_head]; K, V [B, S, n_kv, d_head]
        out["K"] = jax.lax.dynamic_update_slice_in_dim(K, k.astype(K.dtype), t, axis=1)
        out["V"] = jax.lax.dynamic_update_slice_in_dim(V, v.astype(V.dtype), t, axis=1)
        keys, values = expand_kv(q, out["K"]), expand_kv(q, out["V"])
        # float32 accumulation, as `model.causal_attention`
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, keys, preferred_element_type=jnp.float32) / math.sqrt(q.shape[-1])
        scores = soft_cap(scores, softcap)
        scores = jnp.where(in_window(t, jnp.arange(K.shape[1]), window), scores, jnp.finfo(jnp.float32).min)
        pattern = jax.nn.softmax(scores, axis=-1)
        return jnp.einsum("bhqk,bkhd->bqhd", pattern, values, preferred_element_type=jnp.float32).astype(q.dtype)

    return attend, out


def sampling_logits(logits, temperature, top_k=None, top_p=None, freq_penalty=0.0, counts=None):
    """The logits [B, vocab] sampling draws from, as TransformerLens's `sample_logits`: divided by
    `temperature`, minus `freq_penalty` x how often each token occurs so far (`counts` [B, vocab]),
    then only the `top_k` most likely tokens kept, or else (top_k None) the fewest most likely
    tokens whose probabilities sum past `top_p` (nucleus sampling); the rest are -inf."""
    logits = logits / temperature
    if freq_penalty:
        logits = logits - freq_penalty * counts
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        return jnp.where(logits < kth, -jnp.inf, logits)
    if top_p is not None:
        order = jnp.argsort(-logits, axis=-1)
        probs = jax.nn.softmax(jnp.take_along_axis(logits, order, axis=-1), axis=-1)
        # dropped: a token whose more likely tokens already sum past top_p (the first is always kept)
        drop = (jnp.cumsum(probs, axis=-1) - probs) > top_p
        return jnp.where(jnp.take_along_axis(drop, jnp.argsort(order, axis=-1), axis=-1), -jnp.inf, logits)
    return logits


def _choose(logits, key, counts, temperature, sampling):
    """Next tokens [B] from float32 logits [B, vocab]. sampling: (do_sample, top_k, top_p,
    freq_penalty), static; greedy takes the argmax of the logits as they are (TransformerLens's)."""
    do_sample, top_k, top_p, freq_penalty = sampling
    if not do_sample:
        return jnp.argmax(logits, axis=-1)
    return jax.random.categorical(key, sampling_logits(logits, temperature, top_k, top_p, freq_penalty, counts),
                                  axis=-1)


@eqx.filter_jit
def _generate(model, tokens, key, temperature, *, n_new, sampling):
    cfg = model.config
    B, T = tokens.shape
    S = T + n_new
    logits, cache = model.run_with_cache(tokens, names_filter=[model.KEY_SITE, "attn.hook_v"])
    pad = lambda a: jnp.pad(a, [(0, 0), (0, 0), (0, n_new), (0, 0), (0, 0)])  # [L, B, S, H, d_head]
    K, V = pad(cache.stacked(model.KEY_SITE)), pad(cache.stacked("attn.hook_v"))
    keys = jax.random.split(key, n_new + 1)
    # How often each token occurs in the sequence so far, prompt included (the frequency penalty's).
    counts = jax.vmap(lambda row: jnp.bincount(row, length=cfg.d_vocab))(tokens).astype(jnp.float32)
    count = lambda counts, token: counts.at[jnp.arange(B), token].add(1.0)
    first = _choose(logits[:, -1], keys[0], counts, temperature, sampling)

    def step(carry, key):
        K, V, token, t, counts = carry  # token [B] sits at position t; counts include it

        def layer(x, per_layer):
            block, K_l, V_l = per_layer
            attend, new = _step_attention(K_l, V_l, t)
            x = block(x, position, cfg, attend, no_edit)
            return x, (new["K"], new["V"])

        position = jnp.full((B, 1), t)
        x = model.embed(token[:, None], position).astype(model.dtype)  # [B, 1, d]
        x, (K, V) = jax.lax.scan(layer, x, (model.blocks, K, V))
        nxt = _choose(model.unembed(x)[:, -1], key, counts, temperature, sampling)
        return (K, V, nxt, t + 1, count(counts, nxt)), token

    _, out = jax.lax.scan(step, (K, V, first, T, count(counts, first)), keys[1:])
    return jnp.concatenate([tokens, out.T], axis=1)


def generate(model, input, max_new_tokens=10, *, do_sample=True, temperature=1.0, top_k=None, seed=None,
             stop_at_eos=True, eos_token_id=50256, prepend_bos=True, top_p=None, freq_penalty=0.0):
    """Continue `input` by `max_new_tokens` tokens.

    input: a text (tokenized with `prepend_bos`; returns the text with its continuation)
    or tokens [pos] / [batch, pos] of one length (returns tokens [batch, pos + new]).
    do_sample=False or temperature=0: greedy (equal to `transformers`' greedy generate);
    else sampling at `temperature` from the `top_k` most likely tokens (or else the nucleus of
    probability `top_p`), each token's logit lowered by `freq_penalty` x its count in the sequence
    so far, as TransformerLens's `sample_logits` (`sampling_logits`), from PRNG `seed` (None: a
    fresh seed every call, so repeated calls sample differently). Greedy ignores top_k, top_p and
    freq_penalty, as TransformerLens does.
    stop_at_eos: after a sequence emits `eos_token_id` the rest of it is `eos_token_id`,
    and generation stops (earlier) once every sequence has, as in TransformerLens.
    """
    if isinstance(input, str):
        tokens = model.to_tokens(input, prepend_bos=prepend_bos)
    elif isinstance(input, (list, tuple)) and input and all(isinstance(t, str) for t in input):
        raise ValueError("generate takes one text or tokens of one length; generate each text on its own")
    else:
        tokens = model.as_tokens(input)[0]
    model.check_tokens(tokens)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if tokens.shape[1] + max_new_tokens > model.config.n_ctx:
        raise ValueError(f"{tokens.shape[1]} prompt tokens + {max_new_tokens} new exceed the model's "
                         f"n_ctx={model.config.n_ctx}")
    if do_sample and temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and not 1 <= top_k <= model.config.d_vocab:
        raise ValueError(f"top_k must be in [1, {model.config.d_vocab}], got {top_k}")
    if top_p is not None and not (isinstance(top_p, (int, float, np.number)) and 0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if isinstance(freq_penalty, bool) or not isinstance(freq_penalty, (int, float, np.number)) or freq_penalty < 0:
        # TransformerLens ignores a negative penalty, which would look like a reward for repeating
        raise ValueError(f"freq_penalty must be a number >= 0, got {freq_penalty!r}")
    if seed is None:
        seed = secrets.randbits(31)
    elif isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int or None, got {seed!r}")
    sampling = (bool(do_sample and temperature != 0), top_k, None if top_p is None else float(top_p),
                float(freq_penalty))
    out = np.array(_generate(model, jnp.asarray(tokens), jax.random.PRNGKey(int(seed)), float(temperature),
                             n_new=max_new_tokens, sampling=sampling))
    if stop_at_eos:
        new = out[:, tokens.shape[1]:]
        done = np.cumsum(new == eos_token_id, axis=1) > 0
        after = np.concatenate([np.zeros((len(new), 1), bool), done[:, :-1]], axis=1)
        new[after] = eos_token_id
        all_done = np.flatnonzero(done.all(0))
        if all_done.size:
            new = new[:, : all_done[0] + 1]
        out = np.concatenate([out[:, : tokens.shape[1]], new], axis=1)
    if isinstance(input, str):
        return model.to_string(out[0, 1:] if prepend_bos else out[0])
    return jnp.asarray(out)
