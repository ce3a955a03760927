"""Add / Scale / Apply interventions as data, against TransformerLens hooks doing the same
and torch autograd, composition in order, and a vmap of steering coefficients in one compile."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jpatch
import reference

V = reference.TINY["vocab_size"]
L, D, H = reference.TINY["n_layer"], reference.TINY["n_embd"], reference.TINY["n_head"]


def tl_run(tl, tokens, hooks):
    with torch.no_grad():
        return tl.run_with_hooks(torch.tensor(tokens), fwd_hooks=hooks).numpy()


def close(a, b, tol=1e-4):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=tol)


@pytest.fixture(scope="module")
def vector():
    return np.random.default_rng(0).normal(size=D).astype(np.float32)


def test_steering_vector_equals_transformer_lens_hook(jp_tiny, tl_tiny, vector):
    tokens = reference.random_tokens(2, 7, V, seed=30)
    steered = jp_tiny(tokens, overrides={"blocks.1.hook_resid_pre": jpatch.Add(vector)})
    expected = tl_run(tl_tiny, tokens, [("blocks.1.hook_resid_pre", lambda act, hook: act + torch.tensor(vector))])
    close(steered, expected)
    assert np.abs(np.asarray(steered) - np.asarray(jp_tiny(tokens))).max() > 1e-2
    # only at position 3, via a mask over [batch, pos, d_model]
    at3 = np.arange(7)[:, None] == 3
    masked = jp_tiny(tokens, overrides={("resid_pre", 1): jpatch.Add(vector, mask=at3)})

    def hook(act, hook):
        act[:, 3] += torch.tensor(vector)
        return act

    close(masked, tl_run(tl_tiny, tokens, [("blocks.1.hook_resid_pre", hook)]))


def test_scale_apply_and_new_hook_points_equal_transformer_lens(jp_tiny, tl_tiny):
    tokens = reference.random_tokens(2, 6, V, seed=31)
    head_mask = np.arange(H)[:, None] == 2  # [head, d_head] broadcast: head 2 of z
    overrides = {
        "blocks.0.attn.hook_z": jpatch.Scale(0.0, mask=head_mask),  # ablate head 0.2
        "blocks.1.mlp.hook_post": jpatch.Apply(lambda a: jnp.maximum(a, 0.1)),
        ("attn_scores", 1): jpatch.Add(0.5 * np.tril(np.ones((6, 6)), -1)),
        "ln_final.hook_scale": jpatch.Scale(1.5),
    }

    def z_hook(act, hook):
        act[:, :, 2] = 0.0
        return act

    def scores_hook(act, hook):
        return act + 0.5 * torch.tril(torch.ones(6, 6), -1)

    expected = tl_run(tl_tiny, tokens, [
        ("blocks.0.attn.hook_z", z_hook),
        ("blocks.1.mlp.hook_post", lambda a, hook: torch.clamp(a, min=0.1)),
        ("blocks.1.attn.hook_attn_scores", scores_hook),
        ("ln_final.hook_scale", lambda a, hook: a * 1.5),
    ])
    close(jp_tiny(tokens, overrides=overrides), expected)
    for key, iv in overrides.items():  # each one matters
        assert np.abs(np.asarray(jp_tiny(tokens, overrides={key: iv})) - np.asarray(jp_tiny(tokens))).max() > 1e-4, key


def test_per_head_result_intervention_equals_transformer_lens(jp_tiny, tl_tiny):
    tokens = reference.random_tokens(1, 5, V, seed=32)
    scale = np.array([1.0, -1.0, 0.5, 2.0], np.float32)[:, None]  # [head, 1] over [batch, pos, head, d_model]
    ours = jp_tiny(tokens, overrides={("result", 0): jpatch.Scale(scale)})
    tl_tiny.set_use_attn_result(True)
    try:
        expected = tl_run(tl_tiny, tokens, [("blocks.0.attn.hook_result", lambda a, hook: a * torch.tensor(scale))])
    finally:
        tl_tiny.set_use_attn_result(False)
    close(ours, expected)


def test_interventions_compose_in_order(jp_tiny, tl_tiny, vector):
    tokens = reference.random_tokens(2, 5, V, seed=33)
    add_then_scale = [jpatch.Add(vector), jpatch.Scale(2.0)]
    expected = tl_run(tl_tiny, tokens, [("blocks.0.hook_mlp_out", lambda a, hook: (a + torch.tensor(vector)) * 2)])
    close(jp_tiny(tokens, overrides={"blocks.0.hook_mlp_out": add_then_scale}), expected)
    other = jp_tiny(tokens, overrides={"blocks.0.hook_mlp_out": add_then_scale[::-1]})
    assert np.abs(np.asarray(other) - expected).max() > 1e-3
    # an all-layer key (leading layer axis) and a one-layer key on the same site: in the order given
    every = jpatch.Add(np.stack([vector, -vector]))
    both = jp_tiny(tokens, overrides={"resid_post": every, "blocks.1.hook_resid_post": jpatch.Scale(0.5)})
    expected = tl_run(tl_tiny, tokens, [
        ("blocks.0.hook_resid_post", lambda a, hook: a + torch.tensor(vector)),
        ("blocks.1.hook_resid_post", lambda a, hook: (a - torch.tensor(vector)) * 0.5),
    ])
    close(both, expected)


def test_vmap_over_steering_coefficients_is_one_compile(jp_tiny, tl_tiny, vector):
    tokens = reference.random_tokens(2, 6, V, seed=34)
    coefficients = jnp.array([-4.0, -1.0, 0.0, 2.5, 8.0])
    traces = []

    @jax.jit
    def steer(model, coefficients):
        traces.append(1)
        run = lambda c: model(tokens, overrides={"blocks.1.hook_resid_pre": jpatch.Add(c * vector)})
        return jax.vmap(run)(coefficients)

    out = np.asarray(steer(jp_tiny, coefficients))
    assert out.shape == (5, 2, 6, V) and len(traces) == 1
    for c, logits in zip(np.asarray(coefficients), out):
        expected = tl_run(tl_tiny, tokens, [("blocks.1.hook_resid_pre",
                                             lambda a, hook, c=c: a + float(c) * torch.tensor(vector))])
        close(logits, expected)


def test_gradients_at_every_layer_equal_torch_autograd(jp_tiny, tl_tiny):
    """Attribution: the gradient of a logit with respect to an Add of zeros at every layer at once."""
    tokens = reference.random_tokens(1, 5, V, seed=35)
    target = 17

    def logit(delta):
        return jp_tiny(tokens, overrides={"resid_mid": jpatch.Add(delta)})[0, -1, target]

    grads = np.asarray(jax.grad(logit)(jnp.zeros((L, 1, 5, D))))
    deltas = [torch.zeros(1, 5, D, requires_grad=True) for _ in range(L)]
    hooks = [(f"blocks.{l}.hook_resid_mid", lambda a, hook, d=deltas[l]: a + d) for l in range(L)]
    tl_tiny.run_with_hooks(torch.tensor(tokens), fwd_hooks=hooks)[0, -1, target].backward()
    close(grads, np.stack([d.grad.numpy() for d in deltas]), tol=1e-4)
    assert np.abs(grads).max() > 1e-3


def test_intervention_errors(jp_tiny):
    tokens = reference.random_tokens(1, 4, V)
    with pytest.raises(ValueError, match=r"blocks.1.hook_resid_pre.*value \(3,\)"):
        jp_tiny(tokens, overrides={"blocks.1.hook_resid_pre": jpatch.Add(np.ones(3))})
    with pytest.raises(ValueError, match="leading layer axis"):
        jp_tiny(tokens, overrides={"hook_resid_pre": jpatch.Add(np.ones(D))})
    with pytest.raises(ValueError, match="Apply at 'blocks.0.hook_mlp_out'.*shape"):
        jp_tiny(tokens, overrides={"blocks.0.hook_mlp_out": jpatch.Apply(lambda a: a.sum(-1))})
    with pytest.raises(TypeError, match="expected Override, Add, Scale or Apply"):
        jp_tiny(tokens, overrides={"z": np.ones(3)})


def test_every_hook_point_is_an_override_site(jp_tiny, tl_tiny):
    """Rewriting any hook point (at layer 1 for block sites) equals the TransformerLens hook that does it
    (a nonlinear rewrite: a layer norm would undo a plain scaling of the last residual)."""
    from jpatch.model import sites
    tokens = reference.random_tokens(1, 5, V, seed=36)
    plain = np.asarray(jp_tiny(tokens))
    tl_tiny.set_use_attn_result(True)
    try:
        for site in sites.ALL_SITES:
            name = sites.full_name(site, 1) if site in sites.LAYER_SITES else site
            ours = np.asarray(jp_tiny(tokens, overrides={name: jpatch.Apply(lambda a: 1.25 * a + 0.1 * jnp.tanh(a))}))
            close(ours, tl_run(tl_tiny, tokens, [(name, lambda a, hook: 1.25 * a + 0.1 * torch.tanh(a))]), tol=2e-4)
            assert np.abs(ours - plain).max() > 1e-3, f"rewriting {name} changed nothing"
    finally:
        tl_tiny.set_use_attn_result(False)
