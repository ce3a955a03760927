"""TransformerLens's Attribution_Patching_Demo recipe (jpatch.attribution's notebook functions,
run_with_cache(incl_bwd=True)) against the notebook's own code run by TransformerLens 3.9 on the
same weights, with gradients from torch autograd.

The reference gradients are torch autograd's (`.grad` of every hook point's output, retained).
The notebook's backward hooks give the same everywhere except at ln1.hook_scale and
ln1.hook_normalized: TransformerLens 3.9 applies ln1 three times (for the q, k and v inputs), so
those hook points fire three times and the hook keeps one of three partial gradients; autograd's
gradient of the hook point is their sum (asserted below, so the day it changes this test says so).
"""

import einops
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jpatch
from jpatch import attribution
from reference import hf_model, random_tokens, tl_model

TOL = 1e-5
GRAD_TOL = 3e-5  # float32 round-off of the trained toy's gradients (the tiny model's are within 1e-5)
# TransformerLens 3.9's hook points that jpatch caches only on request or not in this recipe.
TL_ONLY = ("hook_attn_in", "hook_mlp_in", "ln_final.", "unembed.")
TL_FILTER = lambda name: "_input" not in name and not name.endswith("_in")  # noqa: E731  (3.9 refuses the rest)


def tl_from_jpatch(model):
    """TransformerLens 3.9's HookedTransformer with a jpatch GPT-2's weights (named_parameters)."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    c = model.config
    cfg = HookedTransformerConfig(n_layers=c.n_layer, d_model=c.d_model, n_ctx=c.n_ctx, d_head=c.d_head,
                                  n_heads=c.n_head, d_mlp=c.d_mlp, d_vocab=c.d_vocab, act_fn=c.activation,
                                  normalization_type="LN", eps=c.layer_norm_eps, positional_embedding_type="standard",
                                  default_prepend_bos=False, device="cpu")
    tl = HookedTransformer(cfg)
    state = {name: torch.tensor(np.asarray(w, np.float32)) for name, w in model.named_parameters()}
    missing, unexpected = tl.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith(("IGNORE", "mask")) for k in missing), (missing, unexpected)
    return tl.eval()


def tl_recipe(tl, tokens, metric):
    """The notebook's get_cache_fwd_and_bwd, plus autograd's gradients of the same run."""
    from transformer_lens import ActivationCache

    tl.reset_hooks()
    cache, grad_cache, kept = {}, {}, {}

    def forward_cache_hook(act, hook):
        cache[hook.name] = act.detach()
        if act.requires_grad:
            act.retain_grad()
            kept.setdefault(hook.name, []).append(act)

    def backward_cache_hook(act, hook):
        grad_cache[hook.name] = act.detach()

    tl.add_hook(TL_FILTER, forward_cache_hook, "fwd")
    tl.add_hook(TL_FILTER, backward_cache_hook, "bwd")
    value = metric(tl(torch.tensor(tokens)))
    value.backward()
    tl.reset_hooks()
    # ln1 runs once per q / k / v input in TransformerLens: its hook points' gradient is the sum
    autograd = {name: sum(t.grad.detach() for t in ts if t.grad is not None) for name, ts in kept.items()}
    return value.item(), ActivationCache(cache, tl), ActivationCache(grad_cache, tl), ActivationCache(autograd, tl)


# --- the notebook's functions, as it writes them (torch, einops) ---


def nb_residual(clean, corrupted, grad):
    c, labels = clean.accumulated_resid(-1, incl_mid=True, return_labels=True)
    x = corrupted.accumulated_resid(-1, incl_mid=True)
    g = grad.accumulated_resid(-1, incl_mid=True)
    return einops.reduce(g * (c - x), "component batch pos d_model -> component pos", "sum"), labels


def nb_layer_out(clean, corrupted, grad):
    c, labels = clean.decompose_resid(-1, return_labels=True)
    x, g = corrupted.decompose_resid(-1), grad.decompose_resid(-1)
    return einops.reduce(g * (c - x), "component batch pos d_model -> component pos", "sum"), labels


def nb_head_out(clean, corrupted, grad):
    c, x, g = (cache.stack_head_results(-1) for cache in (clean, corrupted, grad))
    return einops.reduce(g * (c - x), "component batch pos d_model -> component pos", "sum")


def nb_head_vector(clean, corrupted, grad, name, L):
    stack = lambda cache: einops.rearrange(torch.stack([cache[name, l] for l in range(L)]),
                                           "layer batch pos head_index d_head -> (layer head_index) batch pos d_head")
    c, x, g = stack(clean), stack(corrupted), stack(grad)
    return einops.reduce(g * (c - x), "component batch pos d_head -> component pos", "sum")


def nb_head_pattern(clean, corrupted, grad, L):
    stack = lambda cache: einops.rearrange(torch.stack([cache["pattern", l] for l in range(L)]),
                                           "layer batch head_index dest src -> (layer head_index) batch dest src")
    c, x, g = stack(clean), stack(corrupted), stack(grad)
    return einops.reduce(g * (c - x), "component batch dest src -> component dest src", "sum")


def nb_head_path(tl, clean, corrupted, grad):
    L, H = tl.cfg.n_layers, tl.cfg.n_heads
    W = {"q": tl.W_Q, "k": tl.W_K, "v": tl.W_V}
    full = torch.stack([torch.stack([
        torch.einsum("bphd,bp,hmd->bphm", grad[name, l], grad["scale", l, "ln1"].squeeze(-1), W[name][l])
        for l in range(L)]) for name in "qkv"])
    diff = einops.rearrange(clean.stack_head_results(-1) - corrupted.stack_head_results(-1),
                            "(layer head_index) batch pos d_model -> layer batch pos head_index d_model", layer=L)
    path = torch.einsum("qlbphm,sbpgm->qlhsgp", full, diff)
    mask = torch.arange(L)[None, :, None, None, None, None] > torch.arange(L)[None, None, None, :, None, None]
    path = torch.where(mask, path, torch.zeros(1))
    return einops.rearrange(path, "qkv le he ls hs pos -> (le he qkv) (ls hs) pos")


def nb_every(attr, L):
    """The notebook's attr_cache and its three get_attr_patch_*_every functions."""
    stack = lambda name: torch.stack([attr[name, l] for l in range(L)])
    block = torch.stack([einops.reduce(stack(n), "layer batch pos d_model -> layer pos", "sum")
                         for n in ("resid_pre", "attn_out", "mlp_out")])
    heads = [einops.reduce(stack(n), "layer batch pos head d_head -> layer head", "sum") for n in "zqkv"]
    all_pos = torch.stack(heads + [einops.reduce(stack("pattern"), "layer batch head dest src -> layer head", "sum")])
    heads = [einops.reduce(stack(n), "layer batch pos head d_head -> layer pos head", "sum") for n in "zqkv"]
    by_pos = torch.stack(heads + [einops.reduce(stack("pattern"), "layer batch head dest src -> layer dest head",
                                                "sum")])
    return block, all_pos, by_pos


def close(got, want, tol=TOL, msg=""):
    got, want = np.asarray(got, np.float64), np.asarray(want.detach() if hasattr(want, "detach") else want, np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    scale = max(1.0, float(np.abs(want).max()))
    err = float(np.abs(got - want).max()) / scale
    assert err <= tol, f"{msg} max |diff| / scale {err:.2e}"


def ioi_like(model_vocab, batch, pos, seed):
    clean = random_tokens(batch, pos, model_vocab, seed)
    corrupted = random_tokens(batch, pos, model_vocab, seed + 1)
    answers = np.random.default_rng(seed + 2).integers(0, model_vocab, (batch, 2))
    return clean, corrupted, answers


@pytest.fixture(scope="module", params=["tiny", "toy"])
def setup(request):
    if request.param == "tiny":
        hf = hf_model(seed=3)
        tl, model = tl_model(hf), jpatch.from_hf(hf)
    else:
        model = jpatch.load("toy")
        tl = tl_from_jpatch(model)
    tl.set_use_attn_result(True)
    clean, corrupted, answers = ioi_like(model.config.d_vocab, 3, 6, 11)

    def jp_metric(logits):
        last = logits[:, -1]
        a = jnp.asarray(answers)
        return (jnp.take_along_axis(last, a[:, :1], 1) - jnp.take_along_axis(last, a[:, 1:], 1)).mean()

    def tl_metric(logits):
        last, a = logits[:, -1], torch.tensor(answers)
        return (last.gather(1, a[:, :1]) - last.gather(1, a[:, 1:])).mean()

    ref = {"clean": tl_recipe(tl, clean, tl_metric), "corrupted": tl_recipe(tl, corrupted, tl_metric)}
    caches = attribution.get_caches_fwd_and_bwd(model, clean, corrupted, jp_metric)
    return dict(model=model, tl=tl, clean=clean, corrupted=corrupted, metric=jp_metric, ref=ref, caches=caches)


def test_caches_and_gradients_against_autograd(setup):
    ref, got = setup["ref"], setup["caches"]
    for run in ("clean", "corrupted"):
        value, fwd, hooks_grad, autograd = ref[run]
        assert abs(getattr(got, f"{run}_value") - value) <= TOL * max(1, abs(value))
        cache, grads = getattr(got, f"{run}_cache"), getattr(got, f"{run}_grad_cache")
        names = [n for n in fwd.cache_dict if not any(s in n for s in TL_ONLY)]
        assert set(names) == set(cache.keys()) == set(grads.keys())
        for name in names:
            want = fwd[name].numpy()
            finite = np.isfinite(want)  # attention scores are -inf past the query in both
            close(np.where(finite, cache[name], 0), np.where(finite, want, 0))
            close(grads[name], autograd[name], GRAD_TOL, msg=name)
        # TransformerLens 3.9's backward hooks agree with autograd except at ln1's scale / normalized
        off = {n for n in names if not np.allclose(hooks_grad[n].numpy(), autograd[n].numpy(), atol=1e-5, rtol=1e-4)}
        assert off and all(".ln1.hook_" in n for n in off), off


def test_notebook_functions(setup):
    ref, got, tl = setup["ref"], setup["caches"], setup["tl"]
    L = tl.cfg.n_layers
    clean, corrupted, grad = ref["clean"][1], ref["corrupted"][1], ref["corrupted"][3]  # autograd's gradients
    args = (got.clean_cache, got.corrupted_cache, got.corrupted_grad_cache)
    for jp_fn, nb_fn in ((attribution.attr_patch_residual, nb_residual), (attribution.attr_patch_layer_out,
                                                                          nb_layer_out)):
        (attr, labels), (want, want_labels) = jp_fn(*args), nb_fn(clean, corrupted, grad)
        close(attr, want)
        assert labels == want_labels
    attr, labels = attribution.attr_patch_head_out(*args)
    close(attr, nb_head_out(clean, corrupted, grad))
    assert labels == [f"L{l}H{h}" for l in range(L) for h in range(tl.cfg.n_heads)]
    for name in "qkvz":
        close(attribution.attr_patch_head_vector(*args, name)[0], nb_head_vector(clean, corrupted, grad, name, L))
    close(attribution.attr_patch_head_pattern(*args)[0], nb_head_pattern(clean, corrupted, grad, L))
    path, end, start = attribution.attr_patch_head_path(*args)
    close(path, nb_head_path(tl, clean, corrupted, grad))
    assert end[:3] == ["L0H0Q", "L0H0K", "L0H0V"] and start == labels
    close(attribution.create_attention_attr(got.clean_cache, got.clean_grad_cache),
          einops.rearrange(torch.stack([ref["clean"][1]["pattern", l] * ref["clean"][3]["pattern", l]
                                        for l in range(L)]), "layer batch h d s -> batch layer h d s"))
    # the notebook's attr_cache and its get_attr_patch_*_every(attr_cache)
    from transformer_lens import ActivationCache

    keys = set(grad.cache_dict) & set(clean.cache_dict)
    attr_cache = ActivationCache({k: grad.cache_dict[k] * (clean.cache_dict[k] - corrupted.cache_dict[k])
                                  for k in keys}, tl)
    mine = attribution.attribution_cache(*args)
    for jp_every, want in zip((attribution.get_attr_patch_block_every, attribution.get_attr_patch_attn_head_all_pos_every,
                               attribution.get_attr_patch_attn_head_by_pos_every), nb_every(attr_cache, L)):
        close(jp_every(mine), want)


def test_run_with_cache_incl_bwd(setup):
    """TransformerLens's run_with_cache(tokens, return_type="loss", incl_bwd=True): the loss and
    "<name>_grad" entries; and with metric=, the demo's gradients."""
    if setup["model"].config.n_layer != 2:
        pytest.skip("the tiny model is enough (each call shape compiles once)")
    model, tl, tokens = setup["model"], setup["tl"], setup["clean"]
    loss, cache = model.run_with_cache(tokens, return_type="loss", incl_bwd=True, names_filter=["resid_pre", "z"])
    tl.zero_grad()
    tl_loss, tl_cache = tl.run_with_cache(torch.tensor(tokens), return_type="loss", incl_bwd=True,
                                          names_filter=lambda n: n.endswith(("resid_pre", "hook_z")))
    assert abs(float(loss) - tl_loss.item()) <= TOL
    assert set(cache.keys()) == set(tl_cache.cache_dict)
    for name in tl_cache.cache_dict:
        close(cache[name], tl_cache[name])
    value, cache = model.run_with_cache(tokens, metric=setup["metric"], incl_bwd=True)
    assert abs(float(value) - setup["ref"]["clean"][0]) <= TOL * max(1, abs(setup["ref"]["clean"][0]))
    close(cache.grad_cache()["pattern", 0], setup["ref"]["clean"][3]["pattern", 0])
    with pytest.raises(ValueError, match="return_type='loss'"):
        model.run_with_cache(tokens, incl_bwd=True)
    with pytest.raises(ValueError, match="scalar"):
        model.run_with_cache(tokens, incl_bwd=True, metric=lambda logits: logits[:, -1, 0])


def test_every_functions_share_one_program(setup):
    """jpatch's get_attr_patch_*_every(model, corrupted, clean_cache, metric): the three share one
    compiled forward and backward, and equal the notebook's numbers (whose corrupted metric is
    subtracted here: jpatch's are the estimated metric, corrupted value + attribution)."""
    if setup["model"].config.n_layer != 2:
        pytest.skip("the tiny model is enough: one compile per model")
    model, tl = setup["model"], setup["tl"]
    L = tl.cfg.n_layers
    _, clean_cache = model.run_with_cache(setup["clean"])
    with pytest.raises(KeyError, match="incl_bwd=True"):
        clean_cache["blocks.0.hook_resid_pre_grad"]
    compiles = []
    listener = lambda event, secs, **kw: compiles.append(event) if event.endswith("backend_compile_duration") else None
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        block = attribution.get_attr_patch_block_every(model, setup["corrupted"], clean_cache, setup["metric"])
        first = len(compiles)
        all_pos = attribution.get_attr_patch_attn_head_all_pos_every(model, setup["corrupted"], clean_cache,
                                                                     setup["metric"])
        by_pos = attribution.get_attr_patch_attn_head_by_pos_every(model, setup["corrupted"], clean_cache,
                                                                   setup["metric"])
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert first >= 1 and len(compiles) == first, compiles  # the other two compile nothing
    ref = setup["ref"]
    clean, corrupted, grad = ref["clean"][1], ref["corrupted"][1], ref["corrupted"][3]
    keys = set(grad.cache_dict) & set(clean.cache_dict)
    from transformer_lens import ActivationCache

    attr_cache = ActivationCache({k: grad.cache_dict[k] * (clean.cache_dict[k] - corrupted.cache_dict[k])
                                  for k in keys}, tl)
    base = ref["corrupted"][0]
    for got, want in zip((block, all_pos, by_pos), nb_every(attr_cache, L)):
        close(np.asarray(got) - base, want)
