"""float32 analysis: bfloat16 weights with float32 accumulation agree with float32 weights,
and a patch that changes nothing measures exactly 0."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jpatch
import reference
from jpatch.methods import metrics
from jpatch.model.convert import config_from_hf, from_hf_state_dict
from jpatch.data.tasks import ioi


def sweep_both(model, clean, corrupted, metric, site="resid_pre", **kwargs):
    run = lambda m: np.asarray(jpatch.sweep(m, clean, corrupted, site, metric, per_prompt=True, progress=False,
                                            **kwargs))
    return run(model.astype(jnp.float32)), run(model.astype(jnp.bfloat16))


def test_toy_bfloat16_weights_agree_with_float32():
    model = jpatch.load("toy")
    assert model.dtype == jnp.float32  # stored in bfloat16, analysed in float32
    task = ioi.ioi_task(4, seed=5, split="test", length=15)  # one length: no padding to exclude
    f32, bf16 = sweep_both(model, task.clean_tokens, task.corrupted_tokens, task.metric())
    assert np.abs(f32).max() > 0.5  # the sweep finds something
    assert np.abs(bf16 - f32).max() <= 0.01
    # STR changes the names only: every patch before the first changed position changes nothing.
    first = int(np.argmax((task.clean_tokens != task.corrupted_tokens).any(0)))
    assert first > 0 and (f32[:, :, :first] == 0).all() and (bf16[:, :, :first] == 0).all()


@pytest.fixture(scope="module")
def small_shaped():
    """A random model of GPT-2 small's shape (12 layers, d_model 768, 50257 tokens)."""
    hf = reference.hf_model(seed=1, initializer_range=0.02, **reference.SMALL)
    return from_hf_state_dict(reference.hf_state_dict(hf), config_from_hf(hf.config))


def test_gpt2_small_shape_bfloat16_weights_agree_with_float32(small_shaped):
    clean = reference.random_tokens(2, 8, 50257, seed=4)
    corrupted = clean.copy()
    corrupted[:, 3] = (clean[:, 3] + 1000) % 50257
    # Answers with a real clean-corrupted gap: the clean run's top token against the token the
    # corruption raises most.
    last = lambda tokens: np.asarray(small_shaped(jnp.asarray(tokens))[:, -1])
    clean_logits, corrupted_logits = last(clean), last(corrupted)
    answers, contrasts = clean_logits.argmax(-1), (corrupted_logits - clean_logits).argmax(-1)
    assert (answers != contrasts).all()
    f32, bf16 = sweep_both(small_shaped, clean, corrupted, metrics.logit_diff(answers, contrasts))
    assert np.abs(f32).max() > 0.5
    assert np.abs(bf16 - f32).max() <= 0.01
    assert (f32[:, :, :3] == 0).all() and (bf16[:, :, :3] == 0).all()


def test_attention_and_logits_accumulate_in_float32(small_shaped):
    """bfloat16 weights: the logits and the attention pattern come out in float32 (their matmuls
    accumulate in float32) and stay close to the float32 model's."""
    tokens = jnp.asarray(reference.random_tokens(1, 8, 50257, seed=6))
    bf16 = small_shaped.astype(jnp.bfloat16)
    logits, cache = bf16.run_with_cache(tokens)
    assert logits.dtype == jnp.float32 and cache["blocks.0.attn.hook_pattern"].dtype == jnp.float32
    exact = np.asarray(small_shaped(tokens))
    assert np.abs(np.asarray(logits) - exact).max() < 0.05 * np.abs(exact).max()
    assert jax.tree_util.tree_leaves(bf16)[0].dtype == jnp.bfloat16


def test_jpatch_asks_for_full_float32_matmuls():
    """GPUs (TF32) and TPUs (bfloat16 passes) multiply float32 at lower precision by default: on an
    H200 that moved a resid_pre sweep 4.9e-3 away from TransformerLens. jpatch asks for the highest
    unless the user chose (the environment variable wins, checked in a fresh process)."""
    import os
    import subprocess
    import sys

    assert jax.config.jax_default_matmul_precision == "highest"
    code = "import jpatch, jax; print(jax.config.jax_default_matmul_precision)"
    env = {**os.environ, "JAX_DEFAULT_MATMUL_PRECISION": "default"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "default"


def test_jpatch_turns_gpu_autotuning_off_unless_the_user_chose():
    """At 'highest' precision XLA's GPU autotuner took minutes per program on an H200 (measured);
    jpatch adds --xla_gpu_autotune_level=0 to XLA_FLAGS, keeps the user's other flags, and leaves
    a level the user set alone (fresh processes; the flag is harmless on CPU, which runs here)."""
    import os
    import subprocess
    import sys

    code = "import os, jpatch, jax.numpy as jnp; print(float(jnp.ones(2).sum())); print(os.environ['XLA_FLAGS'])"
    for given, expected in [("", "--xla_gpu_autotune_level=0"),
                            ("--xla_force_host_platform_device_count=2",
                             "--xla_force_host_platform_device_count=2 --xla_gpu_autotune_level=0"),
                            ("--xla_gpu_autotune_level=4", "--xla_gpu_autotune_level=4")]:
        env = {**os.environ, "XLA_FLAGS": given}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.split("\n")[:2] == ["2.0", expected], out.stdout
