"""The circuit methods on GPT-NeoX (parallel attention + MLP, partial rotary) against references
that do not use jpatch's forward: a random tiny NeoX in transformers (3 layers, d_model 64, 4
heads, rotary on 8 of 16 dims per head, layer norms perturbed) and the same weights in
TransformerLens 3.9 with split q/k/v inputs, per-head results and MLP inputs hooked.

- `edge_forward`: the all-ones mask is transformers' logits, the all-zeros mask the corrupted
  run's; a targeted mask (edges into one head's key input and into one MLP flipped) and a random
  fractional one equal an edge forward written with TransformerLens hooks, whose graph is built
  here from the block's definition (on a parallel block MLP l reads the residual before layer
  l's heads, so neither layer l's heads nor their b_O reach it);
- `path_patch` (every head as sender) vs Wang et al.'s two passes written with TransformerLens
  hooks (`reference.tl_path_patch`: TransformerLens's own parallel block recomputes the MLPs
  from the block's input in pass 1), receivers the logits, an MLP and one head's q, k and v
  inputs, both directions, and MLPs frozen;
- `edge_attribution` (EAP both directions, EAP-IG activations) vs torch autograd through the same
  TransformerLens hooks: gradients at every reader's input dotted with the writes' differences;
- `acdc` runs and recovers a planted circuit (silenced heads and an MLP are never kept).
"""

import types

import numpy as np
import pytest
import torch

import reference
from jpatch.methods import circuits, metrics
from jpatch.methods.edges import edge_attribution, graph_names
from jpatch.model.neox_hf import config_from_hf, from_hf_state_dict

TOL = 1e-4
L, H, B, T = 3, 4, 3, 7
V = reference.NEOX_TINY["vocab_size"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def max_err(actual, expected):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, f"shape {actual.shape} != {expected.shape}"
    return float(np.abs(actual - expected).max())


def assert_close(actual, expected, tol=TOL, what=""):
    err = max_err(actual, expected)
    assert err <= tol, f"{what}: max abs error {err:.3g} > {tol}"
    return err


# --- models and data -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def m(one_torch_thread):
    hf = reference.neox_hf_model(seed=4, rotary_pct=0.5, num_hidden_layers=L, num_attention_heads=H)
    tl = reference.neox_tl_model(hf)
    tl.set_use_split_qkv_input(True)
    tl.set_use_attn_result(True)
    tl.set_use_hook_mlp_in(True)
    jp = from_hf_state_dict(reference.hf_state_dict(hf), config_from_hf(hf.config.to_dict()))
    assert jp.config.parallel_block and jp.config.rotary_dim == tl.cfg.rotary_dim == 8
    clean = reference.random_tokens(B, T, V - 1, seed=5)
    corrupted = reference.random_tokens(B, T, V - 1, seed=6)
    with torch.no_grad():
        tl_clean, tl_corr = (tl(torch.tensor(t)).double().numpy() for t in (clean, corrupted))
    gap = tl_clean[:, -1] - tl_corr[:, -1]
    answers, contrasts = gap.argmax(-1), gap.argmin(-1)
    rows = np.arange(B)
    ld = lambda logits: logits[rows, -1, answers] - logits[rows, -1, contrasts]
    assert (ld(tl_clean) - ld(tl_corr) > 0.2).all()
    return types.SimpleNamespace(hf=hf, tl=tl, jp=jp, clean=clean, corrupted=corrupted, answers=answers,
                                 contrasts=contrasts, ld=ld, tl_clean=tl_clean, tl_corr=tl_corr,
                                 metric=metrics.logit_diff(answers, contrasts))


# --- the graph, from the parallel block's definition ---------------------------------------


def writer_layer(name):
    """-1 for the embeddings, l for a{l}.h* and m{l}."""
    return -1 if name == "embed" else int(name[1:].split(".")[0])


def reader_layer(name, n_layer=L):
    return n_layer if name == "logits" else int(name[1:].split(".")[0].split("<")[0])


def neox_valid(writers, readers):
    """On a parallel block every reader of layer l (q, k, v of its heads and its MLP) reads the
    block's input: the writers of earlier layers; the logits read everything."""
    return np.array([[writer_layer(w) < reader_layer(r) for r in readers] for w in writers])


def test_graph_is_the_parallel_blocks(m):
    writers, readers, valid = graph_names(m.jp.config)
    np.testing.assert_array_equal(valid, neox_valid(writers, readers))
    assert not valid[writers.index("a1.h2"), readers.index("m1")]  # MLP l does not read layer l's heads
    assert valid[writers.index("a0.h2"), readers.index("m1")]


# --- edge forward --------------------------------------------------------------------------


def tl_writes(tl, tokens):
    """writer name -> [B, T, d] of a TransformerLens run (heads' hook_result exclude b_O)."""
    with torch.no_grad():
        _, cache = tl.run_with_cache(torch.tensor(tokens))
    out = {"embed": cache["blocks.0.hook_resid_pre"]}
    for l in range(tl.cfg.n_layers):
        for h in range(tl.cfg.n_heads):
            out[f"a{l}.h{h}"] = cache[f"blocks.{l}.attn.hook_result"][:, :, h]
        out[f"m{l}"] = cache[f"blocks.{l}.hook_mlp_out"]
    return out


def tl_edge_forward(tl, tokens, mask, source, writers, readers):
    """Every reader's input rebuilt with TransformerLens hooks from this run's writes (recorded as
    the forward goes) and `source`'s, mixed by mask [writers, readers]: the edges of a parallel
    block (`neox_valid`), plus the attention biases b_O of the layers before the reader's."""
    n_layer, n_head = tl.cfg.n_layers, tl.cfg.n_heads
    valid = neox_valid(writers, readers)
    own = {}
    b_o = [tl.blocks[l].attn.b_O.detach() for l in range(n_layer)]

    def mixed(r):
        x = sum(b_o[:reader_layer(readers[r], n_layer)], torch.zeros_like(b_o[0]))
        for w, name in enumerate(writers):
            if valid[w, r]:
                k = float(mask[w, r])
                x = x + k * own[name] + (1 - k) * source[name]
        return x

    def rec_embed(x, hook):
        own["embed"] = x.clone()

    def inputs(l, c):
        return lambda x, hook: torch.stack([mixed(readers.index(f"a{l}.h{h}<{c}>")) for h in range(n_head)], dim=2)

    def rec_result(l):
        def hook(x, hook):
            for h in range(n_head):
                own[f"a{l}.h{h}"] = x[:, :, h].clone()
        return hook

    def rec_mlp(l):
        def hook(x, hook):
            own[f"m{l}"] = x.clone()
        return hook

    hooks = [("blocks.0.hook_resid_pre", rec_embed)]
    for l in range(n_layer):
        hooks += [(f"blocks.{l}.hook_{c}_input", inputs(l, c)) for c in "qkv"]
        hooks += [(f"blocks.{l}.attn.hook_result", rec_result(l)),
                  (f"blocks.{l}.hook_mlp_in", lambda x, hook, l=l: mixed(readers.index(f"m{l}"))),
                  (f"blocks.{l}.hook_mlp_out", rec_mlp(l))]
    hooks.append((f"blocks.{n_layer - 1}.hook_resid_post", lambda x, hook: mixed(len(readers) - 1)))
    with torch.no_grad():
        return tl.run_with_hooks(torch.tensor(tokens), fwd_hooks=hooks).double().numpy()


@pytest.fixture(scope="module")
def sources(m):
    return circuits.run_writes(m.jp, m.corrupted)[1], tl_writes(m.tl, m.corrupted)


def test_edge_forward_all_and_nothing_match_transformers(m, sources):
    valid = graph_names(m.jp.config)[2]
    ones = np.ones(valid.shape, np.float32)
    hf_clean, hf_corr = reference.hf_logits(m.hf, m.clean), reference.hf_logits(m.hf, m.corrupted)
    e1 = assert_close(circuits.edge_forward(m.jp, m.clean, ones, sources[0]), hf_clean, what="all ones")
    e0 = assert_close(circuits.edge_forward(m.jp, m.clean, 0 * ones, sources[0]), hf_corr, what="all zeros")
    # read positions: the last position only
    e2 = assert_close(circuits.edge_forward(m.jp, m.clean, ones, sources[0], np.full((B, 1), T - 1)),
                      hf_clean[:, -1:], what="all ones, last position")
    print(f"edge_forward ones {e1:.2e}, zeros {e0:.2e}, last position {e2:.2e}")


def targeted_mask(writers, readers):
    """Everything clean except a few edges into a2.h1's key input and every edge into m1."""
    mask = neox_valid(writers, readers).astype(np.float32)
    for w in ("embed", "a0.h3", "m0", "a1.h2", "m1"):
        mask[writers.index(w), readers.index("a2.h1<k>")] = 0.0
    mask[:, readers.index("m1")] = 0.0
    return mask


def test_edge_forward_mixed_masks_match_transformerlens_hooks(m, sources):
    writers, readers, valid = graph_names(m.jp.config)
    src_jp, src_tl = sources
    errs = []
    rng = np.random.default_rng(0)
    random = np.where(rng.random(valid.shape) < 0.5, 1.0, 0.0)
    random[rng.random(valid.shape) < 0.1] = 0.3
    for what, mask in (("targeted", targeted_mask(writers, readers)), ("random", random)):
        expected = tl_edge_forward(m.tl, m.clean, mask, src_tl, writers, readers)
        got = circuits.edge_forward(m.jp, m.clean, mask.astype(np.float32), src_jp)
        errs.append(assert_close(got, expected, what=what))
        assert max_err(expected, m.tl_clean) > 1e-2 and max_err(expected, m.tl_corr) > 0.1, what  # the mask matters
    # the hook reference itself: all ones is the plain run, all zeros the corrupted one
    assert_close(tl_edge_forward(m.tl, m.clean, valid, src_tl, writers, readers), m.tl_clean, what="TL ones")
    assert_close(tl_edge_forward(m.tl, m.clean, 0 * valid, src_tl, writers, readers), m.tl_corr, what="TL zeros")
    print(f"edge_forward targeted {errs[0]:.2e}, random {errs[1]:.2e}")


# --- path patching -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tl_caches(m):
    with torch.no_grad():
        return {name: m.tl.run_with_cache(torch.tensor(getattr(m, name)))[1] for name in ("clean", "corrupted")}


# With the logits as the only receiver and MLPs recomputed, pass 1 runs at the metric's read
# positions alone (a shortcut); ["m0", "logits"] checks the same quantity without it (MLP 0 reads
# only the embeddings on a parallel block, so it receives nothing from any head).
@pytest.mark.parametrize("receivers,freeze_mlps,direction", [
    (["logits"], False, "noise"),
    (["logits"], False, "denoise"),
    (["m0", "logits"], False, "noise"),
    (["m0", "logits"], False, "denoise"),
    (["m1"], False, "noise"),
    (["m2"], False, "denoise"),
    (["a2.h1<q>"], False, "noise"),
    (["a2.h1<k>"], False, "noise"),
    (["a2.h1<v>"], False, "noise"),
    (["a2.h1"], False, "denoise"),
    (["a1.h3", "m2", "logits"], True, "noise"),
])
def test_path_patching_matches_transformerlens_two_passes(m, tl_caches, receivers, freeze_mlps, direction):
    base, source = (m.clean, m.corrupted) if direction == "noise" else (m.corrupted, m.clean)
    caches = ((tl_caches["clean"], tl_caches["corrupted"]) if direction == "noise"
              else (tl_caches["corrupted"], tl_caches["clean"]))
    got = circuits.path_patch(m.jp, m.clean, m.corrupted, "heads", receivers, m.metric, direction=direction,
                              freeze_mlps=freeze_mlps)
    assert got.shape == (L, H)
    ld_clean, ld_corr = m.ld(m.tl_clean).mean(), m.ld(m.tl_corr).mean()
    expected = np.array([[(m.ld(reference.tl_path_patch(m.tl, base, source, (l, h), receivers, freeze_mlps,
                                                         caches=caches).astype(np.float64)).mean() - ld_corr)
                          / (ld_clean - ld_corr) for h in range(H)] for l in range(L)])
    err = assert_close(got, expected, what=f"{receivers} {direction}")
    if receivers == ["m0", "logits"]:  # MLP 0 receives nothing from the heads: the logits alone
        alone = np.array([[(m.ld(reference.tl_path_patch(m.tl, base, source, (l, h), ["logits"], caches=caches)
                                 .astype(np.float64)).mean() - ld_corr) / (ld_clean - ld_corr) for h in range(H)]
                          for l in range(L)])
        assert_close(got, alone, what="the logits alone")
    unpatched = 1.0 if direction == "noise" else 0.0
    assert np.abs(expected - unpatched).max() > 1e-3  # some sender matters
    print(f"path_patch {receivers} freeze_mlps={freeze_mlps} {direction}: {err:.2e}")


# --- edge attribution ----------------------------------------------------------------------


def torch_reader_grads(tl, tokens, answers, contrasts, shifts=None):
    """Per-prompt logit differences, the run's writes and the gradient of their sum at every
    reader's input, TransformerLens hooks and torch autograd. shifts: {hook name: tensor} added
    to blocks.0.hook_resid_pre (the embeddings), hook_attn_out or hook_mlp_out."""
    shifts = shifts or {}
    store = {}

    def hook(act, hook):
        if hook.name in shifts:
            act = act + shifts[hook.name]
        act.retain_grad()
        store[hook.name] = act
        return act

    n_layer = tl.cfg.n_layers
    names = ["blocks.0.hook_resid_pre", f"blocks.{n_layer - 1}.hook_resid_post"]
    names += [f"blocks.{l}.{s}" for l in range(n_layer) for s in
              ("hook_q_input", "hook_k_input", "hook_v_input", "hook_mlp_in", "attn.hook_result", "hook_attn_out",
               "hook_mlp_out")]
    with torch.enable_grad():
        tl.zero_grad()
        logits = tl.run_with_hooks(torch.tensor(tokens), fwd_hooks=[(n, hook) for n in names])
        rows = torch.arange(len(answers))
        ld = logits[rows, -1, torch.tensor(answers)] - logits[rows, -1, torch.tensor(contrasts)]
        ld.sum().backward()
    g = lambda name: store[name].grad.double().numpy()
    readers = {}
    for l in range(n_layer):
        for c in "qkv":
            for h in range(tl.cfg.n_heads):
                readers[f"a{l}.h{h}<{c}>"] = g(f"blocks.{l}.hook_{c}_input")[:, :, h]
        readers[f"m{l}"] = g(f"blocks.{l}.hook_mlp_in")
    readers["logits"] = g(f"blocks.{n_layer - 1}.hook_resid_post")
    acts = {n: a.detach().double() for n, a in store.items()}
    return ld.detach().double().numpy(), acts, readers


def tl_edges(m, runs, direction="denoise"):
    """EAP / EAP-IG by torch autograd: (source - base writes) . (reader-input gradients averaged
    over `runs`, each a dict {group: alpha} moving "embed" / ("hook_attn_out", l) / ("hook_mlp_out", l)
    alpha of the way to the source run), the mean over prompts over the clean - corrupted gap."""
    writers, readers, _ = graph_names(m.jp.config)
    base, source = (m.corrupted, m.clean) if direction == "denoise" else (m.clean, m.corrupted)
    _, base_acts, _ = torch_reader_grads(m.tl, base, m.answers, m.contrasts)
    _, src_acts, _ = torch_reader_grads(m.tl, source, m.answers, m.contrasts)
    diff = lambda name: (src_acts[name] - base_acts[name]).float()
    grads = {r: 0.0 for r in readers}
    for alphas in runs:
        shifts = {}
        for group, a in alphas.items():
            name = "blocks.0.hook_resid_pre" if group == "embed" else f"blocks.{group[1]}.{group[0]}"
            shifts[name] = a * diff(name)
        for r, g in torch_reader_grads(m.tl, base, m.answers, m.contrasts, shifts)[2].items():
            grads[r] = grads[r] + g / len(runs)
    writes = {"embed": diff("blocks.0.hook_resid_pre")}
    for l in range(L):
        for h in range(H):
            writes[f"a{l}.h{h}"] = diff(f"blocks.{l}.attn.hook_result")[:, :, h]
        writes[f"m{l}"] = diff(f"blocks.{l}.hook_mlp_out")
    valid = neox_valid(writers, readers)
    scores = np.array([[(writes[w].double().numpy() * grads[r]).sum() if valid[i, j] else 0.0
                        for j, r in enumerate(readers)] for i, w in enumerate(writers)])
    gap = (m.ld(m.tl_clean) - m.ld(m.tl_corr)).mean()
    return scores / B / gap


def test_eap_matches_torch(m):
    expected = tl_edges(m, [{}])
    assert np.abs(expected).max() > 1e-2
    got = edge_attribution(m.jp, m.clean, m.corrupted, m.metric)
    np.testing.assert_array_equal(got.valid, neox_valid(got.writers, got.readers))
    err = assert_close(got.scores, expected, what="EAP")
    # noising: the clean run's gradients, corrupted - clean writes
    got = edge_attribution(m.jp, m.clean, m.corrupted, m.metric, direction="noise")
    err_noise = assert_close(got.scores, tl_edges(m, [{}], direction="noise"), what="EAP noising")
    print(f"EAP denoise {err:.2e}, noise {err_noise:.2e}")


def test_eap_ig_activations_matches_torch(m):
    """Each group (the embeddings, each layer's attention output, each layer's MLP output) moved in
    turn k / steps of the way to the source run; on a parallel block both of a layer's outputs are
    added to the block's input."""
    steps = 2
    groups = ["embed"] + [(site, l) for l in range(L) for site in ("hook_attn_out", "hook_mlp_out")]
    expected = tl_edges(m, [{g: k / steps} for g in groups for k in range(steps)])
    got = edge_attribution(m.jp, m.clean, m.corrupted, m.metric, method="eap-ig-activations", steps=steps)
    err = assert_close(got.scores, expected, what="EAP-IG activations")
    print(f"EAP-IG activations {err:.2e}")


# --- ACDC ------------------------------------------------------------------------------------


def test_acdc_recovers_a_planted_circuit(m):
    """Silence some heads and an MLP (their output weights zeroed): an edge from or into a silent
    component changes nothing. ACDC must keep no edge touching a silent component, and every live
    component must stay in the circuit."""
    import equinox as eqx

    from jpatch.methods.circuits import acdc

    silent = {"a0.h1", "a1.h2", "a2.h0", "m1"}
    w_o, w_out = np.array(m.jp.blocks.attn.w_o), np.array(m.jp.blocks.mlp.w_out)  # [L, H, dh, d], [L, d_mlp, d]
    for name in silent:
        if name.startswith("m"):
            w_out[int(name[1:])] = 0.0
        else:
            w_o[int(name[1]), int(name.split(".h")[1])] = 0.0
    planted = eqx.tree_at(lambda p: (p.blocks.attn.w_o, p.blocks.mlp.w_out), m.jp, (w_o, w_out))
    got = acdc(planted, m.clean, m.corrupted, threshold=1e-6)
    np.testing.assert_array_equal(got.valid, neox_valid(got.writers, got.readers))
    node = lambda name: name.split("<")[0]
    kept_writers = {got.writers[i] for i in np.flatnonzero(got.keep.any(1))}
    kept_readers = {node(got.readers[j]) for j in np.flatnonzero(got.keep.any(0))}
    assert not (kept_writers | kept_readers) & silent
    live = {w for w in got.writers if w not in silent}
    assert kept_writers == live  # every live component still reaches the logits
    assert kept_readers == (live - {"embed"}) | {"logits"}
    assert got.keep.sum() < got.valid.sum()
    # no kept edge runs from a layer's heads into the same layer's MLP (they do not exist on NeoX)
    assert all(writer_layer(got.writers[i]) < reader_layer(got.readers[j]) for i, j in zip(*np.nonzero(got.keep)))
