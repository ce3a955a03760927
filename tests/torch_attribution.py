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
def recording(hf, store, edits=None, drop_layer=None, shifts=None):
    """Record activations (tensors kept in the graph, grads retained) into `store[site][layer]`.

    edits: {(site, layer): fn(tensor) -> tensor} replaces q / k before attention
    (site "attn.hook_q" / "attn.hook_k", tensors [B, T, H, d_head]).
    drop_layer: cut the gradient through that layer's attention and MLP outputs (GradDrop).
    shifts: {("hook_attn_out" | "hook_mlp_out", layer): tensor} added to those outputs."""
    shifts = shifts or {}
    H = hf.config.n_head
    handles = []
    original = hf_gpt2.eager_attention_forward

    def keep(site, layer, t):
        if t.requires_grad:
            t.retain_grad()
        store.setdefault(site, {})[layer] = t


    for l, block in enumerate(hf.transformer.h):
        def pre_block(mod, args, kwargs, l=l):
            keep("hook_resid_pre", l, args[0] if args else kwargs["hidden_states"])

        def post_block(mod, args, kwargs, out, l=l):
            keep("hook_resid_post", l, _first(out))

        def attn_out(mod, args, out, l=l):
            if ("hook_attn_out", l) in shifts:
                out = (out[0] + shifts["hook_attn_out", l],) + tuple(out[1:])
            if drop_layer == l:
                out = (out[0].detach(),) + tuple(out[1:])
            keep("hook_attn_out", l, out[0])
            return out

        def mlp_out(mod, args, out, l=l):
            if ("hook_mlp_out", l) in shifts:
                out = out + shifts["hook_mlp_out", l]
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


def run(hf, tokens, answers, contrasts, *, edits=None, drop_layer=None, grad=True, shifts=None, embed_shift=None):
    """Per-prompt logit differences, activations and (if grad) gradients of their sum.
    embed_shift [B, T, d]: added to the token embeddings (inputs_embeds)."""
    store = {}
    with torch.enable_grad(), recording(hf, store, edits, drop_layer, shifts):
        hf.zero_grad()
        tokens = torch.tensor(np.asarray(tokens))
        if embed_shift is None:
            logits = hf(tokens).logits
        else:
            embeds = hf.transformer.wte(tokens) + torch.tensor(embed_shift, dtype=torch.float32)
            logits = hf(inputs_embeds=embeds).logits
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


# --- edges ------------------------------------------------------------------------------


def edge_mask(n_layer, n_head):
    """Which writer feeds which reader, by layer (writers: embed, per layer heads then MLP;
    readers: per layer q, k, v heads then MLP, then the logits)."""
    writers = [("embed", -1)] + [(kind, l) for l in range(n_layer) for kind in ["head"] * n_head + ["mlp"]]
    readers = [(kind, l) for l in range(n_layer) for kind in ["attn"] * 3 * n_head + ["mlp"]] + [("logits", n_layer)]

    def feeds(w, r):
        (wk, wl), (rk, rl) = w, r
        if wk == "embed" or rk == "logits":
            return True
        if rk == "attn":
            return wl < rl
        return wl < rl or (wl == rl and wk == "head")  # an MLP reads its own layer's attention

    return np.array([[feeds(w, r) for r in readers] for w in writers])


def reader_input_grads(hf, acts, grads):
    """dM/d(input of each reader) [n_readers, B, T, d] by torch.autograd.grad through each
    reader's own layer norm and projection (one head's columns for q / k / v)."""
    c = hf.config
    d, H = c.n_embd, c.n_head
    dh = d // H
    out = []
    for l, block in enumerate(hf.transformer.h):
        x = torch.tensor(acts["hook_resid_pre"][l], dtype=torch.float32, requires_grad=True)
        for i, site in enumerate(("attn.hook_q", "attn.hook_k", "attn.hook_v")):
            for h in range(H):
                cols = slice(i * d + h * dh, i * d + (h + 1) * dh)
                y = block.ln_1(x) @ block.attn.c_attn.weight[:, cols] + block.attn.c_attn.bias[cols]
                g = torch.tensor(grads[site][l][:, :, h], dtype=torch.float32)
                out.append(torch.autograd.grad(y, x, g)[0].double().numpy())
        x = torch.tensor(acts["hook_resid_mid"][l], dtype=torch.float32, requires_grad=True)
        y = block.mlp(block.ln_2(x))
        out.append(torch.autograd.grad(y, x, torch.tensor(grads["hook_mlp_out"][l], dtype=torch.float32))[0]
                   .double().numpy())
    out.append(grads["hook_resid_post"][-1])
    return np.stack(out)


def writes(hf, base_acts, source_acts):
    """Source - base writes [n_writers, B, T, d]: embeddings, each head's z_h W_O[h], each MLP."""
    c = hf.config
    d, H = c.n_embd, c.n_head
    dh = d // H
    out = [source_acts["hook_resid_pre"][0] - base_acts["hook_resid_pre"][0]]
    for l, block in enumerate(hf.transformer.h):
        w_o = block.attn.c_proj.weight.detach().double().numpy()
        dz = source_acts["attn.hook_z"][l] - base_acts["attn.hook_z"][l]  # [B, T, H, dh]
        out += [dz[:, :, h] @ w_o[h * dh:(h + 1) * dh] for h in range(H)]
        out.append(source_acts["hook_mlp_out"][l] - base_acts["hook_mlp_out"][l])
    return np.stack(out)
