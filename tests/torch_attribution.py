"""Hand-written torch.autograd references for attribution patching on transformers' GPT2LMHeadModel.

Hooks record every site's activation and the gradient of a summed per-prompt metric
with respect to it; AtP is then (source - base) . gradient, by hand. Nothing here
uses jpatch. Layouts follow jpatch.attribution: [layer, batch, pos] for residual
sites, [layer, batch, pos, head] for q/k/v/z, [layer, batch, head, query, key] for the pattern.
"""

import contextlib

import numpy as np
import torch
import transformers.models.gpt2.modeling_gpt2 as hf_gpt2

SITES = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out",
         "attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_z", "attn.hook_pattern")


def _first(out):
    return out[0] if isinstance(out, tuple) else out


@contextlib.contextmanager
def recording(hf, store, edits=None, drop_layer=None):
    """Record activations (tensors kept in the graph, grads retained) into `store[site][layer]`.

    edits: {(site, layer): fn(tensor) -> tensor} replaces q / k before attention
    (site "attn.hook_q" / "attn.hook_k", tensors [B, T, H, d_head]).
    drop_layer: cut the gradient through that layer's attention and MLP outputs (GradDrop)."""
    H = hf.config.n_head
    handles = []
    original = hf_gpt2.eager_attention_forward
    keep = lambda site, l, t: (t.retain_grad() if t.requires_grad else None, store.setdefault(site, {}).__setitem__(l, t))

    for l, block in enumerate(hf.transformer.h):
        def pre_block(mod, args, kwargs, l=l):
            keep("hook_resid_pre", l, args[0] if args else kwargs["hidden_states"])

        def post_block(mod, args, kwargs, out, l=l):
            keep("hook_resid_post", l, _first(out))

        def attn_out(mod, args, out, l=l):
            if drop_layer == l:
                out = (out[0].detach(),) + tuple(out[1:])
            keep("hook_attn_out", l, out[0])
            return out

        def mlp_out(mod, args, out, l=l):
            if drop_layer == l:
                out = out.detach()
            keep("hook_mlp_out", l, out)
            return out

        def qkv(mod, args, out, l=l):
            B, T, three_d = out.shape
            q, k, v = out.split(three_d // 3, dim=-1)
            heads = lambda t: t.reshape(B, T, H, -1)
            q, k, v = heads(q), heads(k), heads(v)
            for site, t in (("attn.hook_q", q), ("attn.hook_k", k)):
                if edits and (site, l) in edits:
                    t = edits[site, l](t)
                if site == "attn.hook_q":
                    q = t
                else:
                    k = t
            flat = lambda t: t.reshape(B, T, -1)
            new = torch.cat([flat(q), flat(k), flat(v)], dim=-1)
            new.retain_grad() if new.requires_grad else None
            store.setdefault("qkv", {})[l] = new
            return new

        def z_in(mod, args, l=l):
            keep("z_flat", l, args[0])

        handles += [
            block.register_forward_pre_hook(pre_block, with_kwargs=True),
            block.register_forward_hook(post_block, with_kwargs=True),
            block.attn.register_forward_hook(attn_out),
            block.mlp.register_forward_hook(mlp_out),
            block.attn.c_attn.register_forward_hook(qkv),
            block.attn.c_proj.register_forward_pre_hook(z_in),
        ]

    def attention(module, *args, **kwargs):
        out, weights = original(module, *args, **kwargs)
        keep("attn.hook_pattern", module.layer_idx, weights)
        return out, weights

    hf_gpt2.eager_attention_forward = attention
    try:
        yield
    finally:
        hf_gpt2.eager_attention_forward = original
        for h in handles:
            h.remove()


def _collect(store, n_layer, n_head, grad):
    """{site: [L, ...] array} of activations (grad=False) or gradients (grad=True)."""
    # a tensor cut from the graph (GradDrop) has no gradient: zero
    get = (lambda t: torch.zeros_like(t) if t.grad is None else t.grad) if grad else (lambda t: t)
    out = {}
    for site in ("hook_resid_pre", "hook_resid_post", "hook_attn_out", "hook_mlp_out", "attn.hook_pattern"):
        out[site] = np.stack([get(store[site][l]).detach().double().numpy() for l in range(n_layer)])
    qkv = np.stack([get(store["qkv"][l]).detach().double().numpy() for l in range(n_layer)])
    L, B, T, three_d = qkv.shape
    for i, site in enumerate(("attn.hook_q", "attn.hook_k", "attn.hook_v")):
        out[site] = qkv[..., i * three_d // 3:(i + 1) * three_d // 3].reshape(L, B, T, n_head, -1)
    z = np.stack([get(store["z_flat"][l]).detach().double().numpy() for l in range(n_layer)])
    out["attn.hook_z"] = z.reshape(L, B, T, n_head, -1)
    if grad:  # resid_mid = resid_pre + attn_out feeds only what attn_out feeds
        out["hook_resid_mid"] = out["hook_attn_out"]
    else:
        out["hook_resid_mid"] = out["hook_resid_pre"] + out["hook_attn_out"]
    return out


def last_logit_diff(logits, answers, contrasts):
    rows = torch.arange(len(answers))
    last = logits[:, -1]
    return last[rows, torch.tensor(answers)] - last[rows, torch.tensor(contrasts)]


def run(hf, tokens, answers, contrasts, *, edits=None, drop_layer=None, grad=True):
    """Per-prompt logit differences, activations and (if grad) gradients of their sum."""
    store = {}
    with torch.enable_grad(), recording(hf, store, edits, drop_layer):
        hf.zero_grad()
        logits = hf(torch.tensor(np.asarray(tokens))).logits
        ld = last_logit_diff(logits, answers, contrasts)
        if grad:
            ld.sum().backward()
    c = hf.config
    acts = _collect(store, c.n_layer, c.n_head, grad=False)
    grads = _collect(store, c.n_layer, c.n_head, grad=True) if grad else None
    return ld.detach().double().numpy(), acts, grads


def atp(base_acts, source_acts, grads):
    """AtP per site at full resolution: (source - base) . gradient over the feature axis."""
    out = {}
    for site in SITES:
        prod = (source_acts[site] - base_acts[site]) * grads[site]
        out[site] = prod if site == "attn.hook_pattern" else prod.sum(-1)
    return out
