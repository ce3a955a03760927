"""Checks and reference computations that the rotary families' tests (test_llama.py,
test_gemma2.py) share: comparisons, clean / corrupted prompts, TransformerLens's caches and
metric for its patching functions, and transformers patched by torch hooks past a sliding window."""

import types

import numpy as np
import torch

import reference
from jpatch import patching
from jpatch.methods import metrics


def assert_close(actual, expected, tol=1e-4, what=""):
    """Equal within `tol`, with -inf (masked attention scores) at the same entries; the error."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert (np.isneginf(actual) == np.isneginf(expected)).all(), f"{what}: -inf at different entries"
    actual, expected = np.where(np.isneginf(actual), 0, actual), np.where(np.isneginf(expected), 0, expected)
    err = float(np.abs(actual - expected).max()) if actual.size else 0.0
    assert err <= tol, f"{what}: max abs error {err:.3g} > {tol}"
    return err


def assert_nontrivial(result, what="", size=1e-3):
    """A reference worth comparing with: finite, and not all one value."""
    result = np.asarray(result)
    assert np.isfinite(result).all(), what
    assert np.ptp(result) > size, f"{what}: all results are equal"


def prompts(batch, n_pos, vocab, changed, seed=5):
    """Clean prompts (token vocab - 1 left for padding) and corrupted ones that differ from
    position `changed` on."""
    clean = reference.random_tokens(batch, n_pos, vocab - 1, seed=seed)
    corrupted = clean.copy()
    corrupted[:, changed:] = (clean[:, changed:] + 17) % (vocab - 1)
    return clean, corrupted


def answers(last_clean, last_corrupted):
    """Answer / contrast tokens that the corruption moves most apart, per prompt."""
    gap = last_clean - last_corrupted
    return gap.argmax(-1), gap.argmin(-1)


def patching_setup(m, clean, corrupted):
    """For get_act_patch_*: TransformerLens's and jpatch's caches of both runs (m.tl, m.jp), the
    answers, and the mean logit difference as metric (one function for both: it indexes either)."""
    with torch.no_grad():
        clean_logits, clean_cache = m.tl.run_with_cache(torch.tensor(clean))
        corr_logits, corr_cache = m.tl.run_with_cache(torch.tensor(corrupted))
    ans, con = answers(clean_logits[:, -1].numpy(), corr_logits[:, -1].numpy())
    rows = np.arange(len(clean))
    return types.SimpleNamespace(
        clean=clean, corrupted=corrupted, ans=ans, con=con, tl_cache={"clean": clean_cache, "corrupted": corr_cache},
        metric=lambda logits: (logits[rows, -1, ans] - logits[rows, -1, con]).mean(),
        jp_cache={"clean": m.jp.run_with_cache(clean)[1], "corrupted": m.jp.run_with_cache(corrupted)[1]})


def check_greedy_generate(m, eos):
    """jpatch's greedy generation (10 tokens) equals transformers' (m.hf, m.jp)."""
    prompt = reference.random_tokens(2, 5, eos, seed=11)
    with torch.no_grad():
        expected = m.hf.generate(torch.tensor(prompt), max_new_tokens=10, do_sample=False, eos_token_id=eos,
                                 pad_token_id=eos, attention_mask=torch.ones(prompt.shape, dtype=torch.long)).numpy()
    out = np.asarray(m.jp.generate(prompt, max_new_tokens=10, do_sample=False, eos_token_id=eos))
    np.testing.assert_array_equal(out, expected)


def check_sweeps_past_the_window(m, direction, clean, corrupted, changed):
    """resid_pre by (layer, pos) and k by (layer, pos, key-value head), per prompt, on prompts
    longer than m's sliding window: each patch's normalized logit difference as transformers
    (m.hf, its window masks) patched by torch hooks computes it, vs jpatch's sweep (m.jp);
    patches before the first changed position score exactly the base run."""
    (B, T), c = clean.shape, m.jp.config
    with torch.no_grad():
        out = {n: m.hf(torch.tensor(t), output_hidden_states=True) for n, t in (("clean", clean), ("corrupted", corrupted))}
    ans, con = answers(out["clean"].logits[:, -1].numpy(), out["corrupted"].logits[:, -1].numpy())
    rows = np.arange(B)
    ld = {n: (o.logits[rows, -1, ans] - o.logits[rows, -1, con]).double().numpy() for n, o in out.items()}
    base, source = ("corrupted", "clean") if direction == "denoise" else ("clean", "corrupted")
    tokens = corrupted if base == "corrupted" else clean
    keys, e = {}, c.d_head  # the source run's pre-rotary keys per layer (TransformerLens's hook_k)
    hooks = [m.hf.model.layers[l].self_attn.k_proj.register_forward_hook(
        lambda mod, args, o, l=l: keys.__setitem__(l, o.clone())) for l in range(c.n_layer)]
    with torch.no_grad():
        m.hf(torch.tensor(clean if source == "clean" else corrupted))
    for h in hooks:
        h.remove()

    def set_at(src, pos, cols=slice(None)):
        def fn(act):
            act = act.clone()
            act[:, pos, cols] = src[:, pos, cols]
            return act
        return fn

    normalize = lambda raw: (raw - ld["corrupted"]) / (ld["clean"] - ld["corrupted"])
    resid, k = np.zeros((B, c.n_layer, T)), np.zeros((B, c.n_layer, T, c.n_kv_head))
    for l, p in np.ndindex(c.n_layer, T):
        resid[:, l, p] = normalize(reference.hf_patched_ld(m.hf, tokens, ans, con,
                                                           (l, "resid_pre", set_at(out[source].hidden_states[l], p))))
        for g in range(c.n_kv_head):
            k[:, l, p, g] = normalize(reference.hf_patched_ld(m.hf, tokens, ans, con,
                                                              (l, "k", set_at(keys[l], p, slice(g * e, (g + 1) * e)))))
    metric = metrics.logit_diff(ans, con)  # per prompt, clean 1, corrupted 0
    for site, expected in (("resid_pre", resid), ("k", k)):
        assert_nontrivial(expected, site)
        got = np.asarray(patching.sweep(m.jp, clean, corrupted, site, metric, direction=direction, per_prompt=True,
                                        progress=False))
        assert_close(got, expected, what=f"{site} {direction}")
        no_op = 0.0 if direction == "denoise" else 1.0
        assert (got[:, :, :changed] == no_op).all(), f"{site}: a patch that changes nothing moved the score"


def tl_k_attribution(m, s):
    """AtP of k per (layer, pos, key-value head), per prompt normalized: (clean k - corrupted k) .
    d(logit diff)/dk on the corrupted run, by torch autograd through TransformerLens's hook_k
    (m.tl; s: a `patching_setup`)."""
    store, names = {}, [f"blocks.{l}.attn.hook_k" for l in range(m.tl.cfg.n_layers)]

    def keep(act, hook):
        act.retain_grad()
        store[hook.name] = act
        return act

    rows, ans, con = torch.arange(len(s.clean)), torch.tensor(s.ans), torch.tensor(s.con)
    with torch.enable_grad():
        m.tl.zero_grad()
        logits = m.tl.run_with_hooks(torch.tensor(s.corrupted), fwd_hooks=[(n, keep) for n in names])
        ld = logits[rows, -1, ans] - logits[rows, -1, con]
        ld.sum().backward()
    with torch.no_grad():
        clean = m.tl(torch.tensor(s.clean))
    gap = (clean[rows, -1, ans] - clean[rows, -1, con] - ld.detach()).double().numpy()
    delta = np.stack([((s.tl_cache["clean"][n] - store[n].detach()) * store[n].grad).sum(-1).double().numpy()
                      for n in names], 1)  # [B, L, T, KV]
    return delta / gap[:, None, None, None]
