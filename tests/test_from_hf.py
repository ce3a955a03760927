"""jpatch.from_hf: a model built from a transformers model in memory (or its state dict and config)
gives transformers' logits; what `jpatch convert` refuses is refused here too."""

import numpy as np
import pytest
import torch

import jpatch
import reference

TOKENS = reference.random_tokens(2, 7, reference.TINY["vocab_size"], seed=1)


@pytest.fixture(scope="module")
def hf():
    return reference.hf_model(seed=4)


def test_a_transformers_model_gives_its_own_logits(hf):
    model = jpatch.from_hf(hf)
    np.testing.assert_allclose(np.asarray(model(TOKENS)), reference.hf_logits(hf, TOKENS), atol=1e-4, rtol=0)


def test_a_state_dict_with_its_config_object_or_dict(hf):
    expected = reference.hf_logits(hf, TOKENS)
    for config in (hf.config, hf.config.to_dict()):
        model = jpatch.from_hf(hf.state_dict(), config)  # torch tensors
        np.testing.assert_allclose(np.asarray(model(TOKENS)), expected, atol=1e-4, rtol=0)
    numpy_state = reference.hf_state_dict(hf)
    np.testing.assert_allclose(np.asarray(jpatch.from_hf(numpy_state, hf.config)(TOKENS)), expected, atol=1e-4, rtol=0)


def test_bfloat16_weights_in_and_out(hf):
    bf16 = reference.hf_model(seed=4).to(torch.bfloat16)
    model = jpatch.from_hf(bf16, dtype="bfloat16")
    assert model.blocks.attn.c_attn_w.dtype == jax_bf16()
    # The bfloat16 weights, exactly: each equals transformers' bfloat16 tensor.
    np.testing.assert_array_equal(np.asarray(model.wte, np.float32), bf16.transformer.wte.weight.detach().float().numpy())


def jax_bf16():
    import jax.numpy as jnp

    return jnp.bfloat16


def test_a_neox_model_gives_its_own_logits():
    hf = reference.neox_hf_model(seed=2)
    tokens = reference.random_tokens(2, 6, hf.config.vocab_size, seed=3)
    model = jpatch.from_hf(hf)
    assert model.config.family == "neox"
    np.testing.assert_allclose(np.asarray(model(tokens)), reference.hf_logits(hf, tokens), atol=1e-4, rtol=0)


def test_what_convert_refuses_is_refused(hf):
    state = {k: v.clone() for k, v in hf.state_dict().items()}
    state["transformer.h.1.mlp.c_fc.weight"][0, 3] = float("nan")
    with pytest.raises(ValueError, match=r"c_fc.*non-finite value"):
        jpatch.from_hf(state, hf.config)
    big = {k: v.clone() for k, v in hf.state_dict().items()}
    big["transformer.h.0.attn.c_proj.weight"][0, 0] = 3.4e38  # finite in float32, past bfloat16 (max 3.39e38): inf
    jpatch.from_hf(big, hf.config)  # float32: kept
    with pytest.raises(ValueError, match="non-finite value"):
        jpatch.from_hf(big, hf.config, dtype="bfloat16")
    short = {k: v for k, v in hf.state_dict().items() if k != "transformer.ln_f.bias"}
    with pytest.raises(KeyError, match="ln_f.bias"):
        jpatch.from_hf(short, hf.config)
    wrong = dict(hf.state_dict(), **{"transformer.wpe.weight": torch.zeros(3, 3)})
    with pytest.raises(ValueError, match="wpe.weight.*shape"):
        jpatch.from_hf(wrong, hf.config)
    unsupported = dict(hf.config.to_dict(), model_type="mamba")  # not a family jpatch converts
    with pytest.raises(ValueError, match="model_type='mamba'"):
        jpatch.from_hf(hf.state_dict(), unsupported)
    with pytest.raises(ValueError, match="needs its config"):
        jpatch.from_hf(hf.state_dict())
    with pytest.raises(ValueError, match="dtype must be one of float32, bfloat16"):
        jpatch.from_hf(hf, dtype="int8")
