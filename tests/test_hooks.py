"""TransformerLens's hook functions on jpatch (jpatch.model.hooks) against TransformerLens 3.9 running
the same hooks (written with torch there, jax.numpy here) on the same weights."""

from functools import partial

import jax
import numpy as np
import pytest
import torch

import reference
from jpatch.engine.sweep import sweep
from jpatch.methods import metrics

V = reference.TINY["vocab_size"]
B, T = 3, 7
TOL = 1e-5


@pytest.fixture(scope="module")
def runs(jp_tiny, tl_tiny):
    clean, corrupted = reference.random_tokens(B, T, V, seed=11), reference.random_tokens(B, T, V, seed=12)
    _, cache = jp_tiny.run_with_cache(clean)
    with torch.no_grad():
        _, tl_cache = tl_tiny.run_with_cache(torch.tensor(clean))
    return clean, corrupted, cache, tl_cache


def tl_run(tl, tokens, fwd_hooks=(), **kwargs):
    with torch.no_grad():
        out = tl.run_with_hooks(torch.tensor(tokens), fwd_hooks=list(fwd_hooks), **kwargs)
    return out.numpy() if isinstance(out, torch.Tensor) else out


def close(a, b, tol=TOL):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape and (np.isinf(a) == np.isinf(b)).all()  # attention scores: -inf above the diagonal
    a, b = np.where(np.isinf(a), 0, a), np.where(np.isinf(b), 0, b)
    assert np.abs(a - b).max() <= tol, np.abs(a - b).max()


@pytest.mark.parametrize("site", ["hook_resid_pre", "attn.hook_z", "attn.hook_pattern", "hook_mlp_out"])
def test_a_patching_loop_of_new_closures_equals_transformer_lens(jp_tiny, tl_tiny, runs, site):
    clean, corrupted, cache, tl_cache = runs

    def patch(act, hook, pos):  # the Exploratory demo's hook, in jax.numpy
        return act.at[:, pos].set(cache[hook.name][:, pos]) if site != "attn.hook_pattern" else \
            act.at[:, :, pos].set(cache[hook.name][:, :, pos])

    def tl_patch(act, hook, pos):
        index = (slice(None), slice(None), pos) if site == "attn.hook_pattern" else (slice(None), pos)
        act[index] = tl_cache[hook.name][index]
        return act

    for layer in range(2):
        for pos in (1, 5):
            name = f"blocks.{layer}.{site}"
            got = jp_tiny.run_with_hooks(corrupted, fwd_hooks=[(name, partial(patch, pos=pos))])
            close(got, tl_run(tl_tiny, corrupted, [(name, partial(tl_patch, pos=pos))]))


def test_a_loop_of_closures_compiles_once(jp_tiny, runs):
    clean, corrupted, cache, _ = runs
    hook = lambda pos: lambda act, hook: act.at[:, pos].set(cache[hook.name][:, pos])
    jp_tiny.run_with_hooks(corrupted, fwd_hooks=[("blocks.0.hook_resid_pre", hook(0))])  # warm
    compiles = []
    listener = lambda event, duration, **kw: compiles.append(event) if "backend_compile" in event else None
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        for layer in range(2):
            for pos in range(T):
                jp_tiny.run_with_hooks(corrupted, fwd_hooks=[(f"blocks.{layer}.hook_resid_pre", hook(pos))])
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert len(compiles) <= 2, compiles  # not one per closure (14), nor per layer


def test_hook_names_order_and_read_only_hooks(jp_tiny, tl_tiny, runs):
    """A filter function sees the same names in the same order, hook.layer() is the block's, a hook
    returning None changes nothing, and what read-only hooks record equals TransformerLens's."""
    _, corrupted, _, _ = runs
    seen, tl_seen = [], []
    keep = lambda name: not name.endswith(("hook_q_input", "hook_k_input", "hook_v_input", "hook_result",
                                           "hook_mlp_in", "hook_attn_in"))

    def record(store):
        def fn(act, hook):
            store.append((hook.name, np.asarray(act.detach() if isinstance(act, torch.Tensor) else act)))
        return fn

    plain = jp_tiny(corrupted)
    close(jp_tiny.run_with_hooks(corrupted, fwd_hooks=[(keep, record(seen))]), plain)
    tl_run(tl_tiny, corrupted, [(keep, record(tl_seen))])
    # TransformerLens runs ln1 once per q / k / v input, so its ln1 hooks fire three times in a row
    # (on equal values); jpatch's once.
    once = [item for i, item in enumerate(tl_seen) if i == 0 or item[0] not in (tl_seen[i - 1][0], tl_seen[i - 2][0])]
    assert [n for n, _ in seen] == [n for n, _ in once]
    for (name, a), (_, b) in zip(seen, once):
        close(a, b, 1e-4)
    layers = []
    jp_tiny.run_with_hooks(corrupted, fwd_hooks=[(lambda n: n.endswith("hook_z"), lambda a, hook: layers.append(hook.layer()))])
    assert layers == [0, 1]


def test_hooks_in_sequence_see_each_others_changes(jp_tiny, tl_tiny, runs):
    _, corrupted, _, _ = runs
    v = np.random.default_rng(0).normal(size=64).astype(np.float32)
    jp_hooks = [("blocks.0.hook_resid_post", lambda a, hook: a + v), ("blocks.1.attn.hook_z", lambda a, hook: a * 0.5),
                ("ln_final.hook_normalized", lambda a, hook: a.at[:, -1].set(0.0))]

    def tl_zero_last(a, hook):
        a[:, -1] = 0.0
        return a

    tl_hooks = [("blocks.0.hook_resid_post", lambda a, hook: a + torch.tensor(v)),
                ("blocks.1.attn.hook_z", lambda a, hook: a * 0.5), ("ln_final.hook_normalized", tl_zero_last)]
    close(jp_tiny.run_with_hooks(corrupted, fwd_hooks=list(reversed(jp_hooks))), tl_run(tl_tiny, corrupted, tl_hooks),
          1e-4)
    loss = jp_tiny.run_with_hooks(corrupted, fwd_hooks=jp_hooks, return_type="loss")
    close(loss, tl_run(tl_tiny, corrupted, tl_hooks, return_type="loss"), 1e-5)
    logits, both_loss = jp_tiny.run_with_hooks(corrupted, fwd_hooks=jp_hooks, return_type="both")
    close(both_loss, loss, 0)


def test_added_hooks_apply_until_reset_and_methods_refuse_them(jp_tiny, tl_tiny, runs):
    clean, corrupted, _, _ = runs
    double = lambda a, hook: a * 2.0
    plain = np.asarray(jp_tiny(corrupted))
    jp_tiny.add_hook("blocks.1.hook_mlp_out", double)
    try:
        tl_tiny.add_hook("blocks.1.hook_mlp_out", double)
        with torch.no_grad():
            expected = tl_tiny(torch.tensor(corrupted)).numpy()
        tl_tiny.reset_hooks()
        close(jp_tiny(corrupted), expected, 1e-4)
        logits, cache = jp_tiny.run_with_cache(corrupted)
        close(logits, expected, 1e-4)
        with pytest.raises(ValueError, match="hooks added with add_hook"):
            sweep(jp_tiny, clean, corrupted, "resid_pre", metrics.logit_diff([1] * B, [2] * B), progress=False)
    finally:
        jp_tiny.reset_hooks()
    close(jp_tiny(corrupted), plain, 0)
    with jp_tiny.hooks(fwd_hooks=[("blocks.1.hook_mlp_out", double)]):
        close(jp_tiny(corrupted), expected, 1e-4)
    close(jp_tiny(corrupted), plain, 0)
    jp_tiny.hook_dict["blocks.1.hook_mlp_out"].add_hook(double)
    close(jp_tiny(corrupted), expected, 1e-4)
    jp_tiny.hook_dict["blocks.1.hook_mlp_out"].remove_hooks()
    close(jp_tiny(corrupted), plain, 0)


def test_backward_hooks_get_the_gradient_transformer_lens_does(jp_tiny, tl_tiny, runs):
    _, corrupted, _, _ = runs
    answers, contrasts = np.array([1, 2, 3]), np.array([4, 5, 6])
    metric = lambda logits: (logits[np.arange(B), -1, answers] - logits[np.arange(B), -1, contrasts]).mean()
    names = lambda n: n.endswith(("hook_resid_pre", "attn.hook_z", "hook_embed"))
    grads, tl_grads = {}, {}
    store = lambda d: lambda g, hook: d.__setitem__(hook.name, np.asarray(g.detach() if isinstance(g, torch.Tensor)
                                                                          else g))
    acts, tl_acts = {}, {}  # forward hooks that read, beside the backward hooks (one forward and backward)
    logits = jp_tiny.run_with_hooks(corrupted, fwd_hooks=[("blocks.1.hook_mlp_out", store(acts))],
                                    bwd_hooks=[(names, store(grads))], backward_of=metric)
    tl_tiny.add_hook(names, store(tl_grads), dir="bwd")
    tl_tiny.add_hook("blocks.1.hook_mlp_out", store(tl_acts))
    try:
        tl_logits = tl_tiny(torch.tensor(corrupted))
        metric(tl_logits).backward()
    finally:
        tl_tiny.reset_hooks()
    assert sorted(grads) == sorted(tl_grads) and len(grads) == 5 and list(acts) == ["blocks.1.hook_mlp_out"]
    for name in grads:
        close(grads[name], tl_grads[name], 1e-5)
    close(acts["blocks.1.hook_mlp_out"], tl_acts["blocks.1.hook_mlp_out"], 1e-5)
    close(logits, tl_logits.detach().numpy(), 1e-4)
    with pytest.raises(ValueError, match="forward hooks changed"):
        jp_tiny.run_with_hooks(corrupted, fwd_hooks=[("blocks.1.hook_mlp_out", lambda act, hook: 2 * act)],
                               bwd_hooks=[(names, store(grads))], backward_of=metric)
    with pytest.raises(ValueError, match="backward_of"):
        jp_tiny.run_with_hooks(corrupted, bwd_hooks=[(names, store(grads))])
    with pytest.raises(ValueError, match=r"backward_of must return a scalar, got shape \(3,\)"):
        jp_tiny.run_with_hooks(corrupted, bwd_hooks=[(names, store(grads))], backward_of=lambda lg: lg[:, -1, 0])


def test_torch_in_a_hook_says_what_to_write(jp_tiny, runs):
    _, corrupted, _, _ = runs
    with pytest.raises(TypeError, match="not torch tensors: write the hook with jax.numpy"):
        jp_tiny.run_with_hooks(corrupted, fwd_hooks=[("blocks.0.hook_resid_pre", lambda a, hook: torch.zeros_like(a))])
    with pytest.raises(TypeError, match="immutable: return act.at"):
        jp_tiny.run_with_hooks(corrupted, fwd_hooks=[("blocks.0.hook_resid_pre", lambda a, hook: a.__setitem__(0, 1))])
    with pytest.raises(ValueError, match="returned shape"):
        jp_tiny.run_with_hooks(corrupted, fwd_hooks=[("blocks.0.hook_resid_pre", lambda a, hook: a[:, :2])])
    with pytest.raises(ValueError, match="outside the blocks"):
        jp_tiny.run_with_hooks(corrupted, fwd_hooks=[("hook_embed", lambda a, hook: hook.layer())])


def test_loss_equals_transformer_lens(jp_tiny, tl_tiny, runs):
    clean, _, _, _ = runs
    with torch.no_grad():
        expected = tl_tiny(torch.tensor(clean), return_type="loss").item()
        per_token = tl_tiny.loss_fn(tl_tiny(torch.tensor(clean)), torch.tensor(clean), per_token=True).numpy()
    close(jp_tiny(clean, return_type="loss"), expected, 1e-5)
    close(jp_tiny.loss_fn(jp_tiny(clean), clean, per_token=True), per_token, 1e-5)
    logits, loss = jp_tiny(clean, return_type="both")
    close(loss, expected, 1e-5)
