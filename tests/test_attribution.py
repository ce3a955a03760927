"""Attribution patching (AtP, AtP*'s QK fix and GradDrop) against hand-written
torch.autograd references on transformers' GPT2LMHeadModel with the same weights
(tests/torch_attribution.py: hooks record activations and gradients). The expected
values are aggregated and normalized here by hand, from the reference's per-prompt
logit differences; nothing is compared with jpatch's own output."""

import json
import types

import numpy as np
import pytest
import torch

import reference
import torch_attribution as ref
from jpatch.methods import attribution
from jpatch.methods import corrupt
from jpatch.methods import edges
from jpatch.methods import metrics
from jpatch import patching
TOL = 1e-4
V = reference.TINY["vocab_size"]
B, T = 3, 7
L, H = reference.TINY["n_layer"], reference.TINY["n_head"]
SHORT = {"hook_resid_pre": "resid_pre", "hook_resid_mid": "resid_mid", "hook_resid_post": "resid_post",
         "hook_attn_out": "attn_out", "hook_mlp_out": "mlp_out", "attn.hook_q": "q", "attn.hook_k": "k",
         "attn.hook_v": "v", "attn.hook_z": "z", "attn.hook_pattern": "pattern"}


def assert_close(actual, expected, tol=TOL, what=""):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert np.isfinite(expected).all() and np.abs(expected).max() > 1e-3, f"{what}: trivial reference"
    err = float(np.abs(actual - expected).max())
    assert err <= tol, f"{what}: max abs error {err:.3g} > {tol}"


@pytest.fixture(scope="module")
def setup(hf_tiny):
    clean = reference.random_tokens(B, T, V, seed=5)
    corrupted = clean.copy()
    for p in (1, 4):
        corrupted[:, p] = (clean[:, p] + 17 + p) % V
    gap = reference.hf_logits(hf_tiny, clean)[:, -1] - reference.hf_logits(hf_tiny, corrupted)[:, -1]
    answers, contrasts = gap.argmax(-1), gap.argmin(-1)
    runs = {}
    for name, tokens in (("clean", clean), ("corrupted", corrupted)):
        runs[name] = ref.run(hf_tiny, tokens, answers, contrasts)  # (ld [B], acts, grads)
    ld_clean, ld_corr = runs["clean"][0], runs["corrupted"][0]
    assert (ld_clean - ld_corr > 0.2).all()
    return types.SimpleNamespace(clean=clean, corrupted=corrupted, answers=answers, contrasts=contrasts, runs=runs,
                                 ld_clean=ld_clean, ld_corr=ld_corr, metric=metrics.logit_diff(answers, contrasts))


def reference_atp(setup, direction):
    base, source = ("corrupted", "clean") if direction == "denoise" else ("clean", "corrupted")
    return ref.atp(setup.runs[base][1], setup.runs[source][1], setup.runs[base][2])


def by_prompt_default_axes(site, delta):
    """Full-resolution per-prompt estimates -> [batch, *sweep's default grid]."""
    if site == "attn.hook_pattern":  # [L, B, H, Tq, Tk] -> [B, layer, head, pos]
        return np.moveaxis(delta.sum(-1), 1, 0)
    return np.moveaxis(delta, 1, 0)  # [B, layer, pos(, head)]


@pytest.mark.parametrize("site", ref.SITES)
def test_atp_matches_torch(jp_tiny, setup, site):
    delta = reference_atp(setup, "denoise")[site]
    gap = setup.ld_clean - setup.ld_corr
    # per prompt, (layer, pos[, head]) grid: the denoised score minus corrupted, over the gap
    expected = by_prompt_default_axes(site, delta)
    expected = expected / gap.reshape((B,) + (1,) * (expected.ndim - 1))
    got = attribution.attribute(jp_tiny, setup.clean, setup.corrupted, SHORT[site], setup.metric, per_prompt=True)
    assert_close(got, expected, what=f"{site} per prompt")
    # mean over prompts, every position patched at once: the estimates add over positions
    axes = ("layer", "head") if site.startswith("attn.") else ("layer",)
    summed = delta.sum((3, 4)) if site == "attn.hook_pattern" else delta.sum(2)  # [L, B(, H)]
    expected = summed.mean(1) / gap.mean()
    got = attribution.attribute(jp_tiny, setup.clean, setup.corrupted, site, setup.metric, axes=axes)
    assert_close(got, expected, what=f"{site} {axes}")


@pytest.mark.parametrize("site", ["hook_resid_pre", "attn.hook_z"])
def test_atp_noising_matches_torch(jp_tiny, setup, site):
    delta = reference_atp(setup, "noise")[site]
    gap = setup.ld_clean - setup.ld_corr
    # noising patches the clean run: 1 + (estimated change) / gap, averaged as the sweep does
    expected = (setup.ld_clean + np.moveaxis(delta, 1, -1)).mean(-1)
    expected = (expected - setup.ld_corr.mean()) / gap.mean()
    got = attribution.attribute(jp_tiny, setup.clean, setup.corrupted, site, setup.metric, direction="noise")
    assert_close(got, expected, what=f"{site} noising")


def exact_pattern_change(hf, setup, site, layer, pos, head):
    """The base (corrupted) run's pattern at `layer` with one q (or k) entry set to the clean run's,
    from a real torch forward."""
    source = torch.tensor(setup.runs["clean"][1][site][layer])  # [B, T, H, d_head]

    def edit(t):
        t = t.clone()
        index = (slice(None), slice(None) if pos is None else pos, head)
        t[index] = source[index].to(t.dtype)
        return t

    _, acts, _ = ref.run(hf, setup.corrupted, setup.answers, setup.contrasts, edits={(site, layer): edit},
                         grad=False)
    return acts["attn.hook_pattern"][layer]  # [B, H, Tq, Tk]


def qk_fix_reference(hf, setup, site, grad_pattern, by_position=True):
    """sum (A' - A) . grad_pattern with A' from torch runs patched at one (layer, pos, head) of q / k
    ([L, B, T, H]), or at every position of one (layer, head) at once ([L, B, H])."""
    base = setup.runs["corrupted"][1]["attn.hook_pattern"]
    out = np.zeros((L, B, T, H) if by_position else (L, B, H))
    for layer in range(L):
        for head in range(H):
            for pos in range(T) if by_position else [None]:
                change = exact_pattern_change(hf, setup, site, layer, pos, head) - base[layer]
                out[(layer, slice(None)) + ((pos,) if by_position else ()) + (head,)] = (
                    change * grad_pattern[layer]).sum((1, 2, 3))
    return out


@pytest.mark.parametrize("site", ["attn.hook_q", "attn.hook_k"])
def test_qk_fix_is_the_exact_pattern_change(hf_tiny, jp_tiny, setup, site):
    """AtP*'s QK fix: sum (A' - A) . dM/dA with A' the pattern of a torch run patched at q / k."""
    grads = setup.runs["corrupted"][2]["attn.hook_pattern"]
    gap = setup.ld_clean - setup.ld_corr
    expected = np.moveaxis(qk_fix_reference(hf_tiny, setup, site, grads), 1, 0)
    got = attribution.attribute(jp_tiny, setup.clean, setup.corrupted, site, setup.metric, method="atp-qk",
                                per_prompt=True)
    assert_close(got, expected / gap[:, None, None, None], what=f"{site} QK fix by position")
    # every position at once (the all_pos sweeps): one recompute of the whole pattern
    expected = qk_fix_reference(hf_tiny, setup, site, grads, by_position=False).mean(1)
    got = attribution.attribute(jp_tiny, setup.clean, setup.corrupted, site, setup.metric, method="atp-qk",
                                axes=("layer", "head"))
    assert_close(got, expected / gap.mean(), what=f"{site} QK fix, all positions")
    # plain AtP differs from the QK fix (the softmax is not linear): the test can tell them apart
    plain = attribution.attribute(jp_tiny, setup.clean, setup.corrupted, site, setup.metric, axes=("layer", "head"))
    assert np.abs(plain - got).max() > 1e-4


@pytest.mark.parametrize("site", ["attn.hook_z", "attn.hook_k"])
def test_graddrop_matches_torch(hf_tiny, jp_tiny, setup, site):
    """GradDrop: (1/(L-1)) sum_l |estimate with layer l's attention and MLP outputs cut from the backward pass|."""
    gap = setup.ld_clean - setup.ld_corr
    base_acts = setup.runs["corrupted"][1]
    source_acts = setup.runs["clean"][1]
    sizes = np.zeros((B, L, T, H))
    for drop in range(L):
        _, acts, grads = ref.run(hf_tiny, setup.corrupted, setup.answers, setup.contrasts, drop_layer=drop)
        if site == "attn.hook_z":
            est = ((source_acts[site] - acts[site]) * grads[site]).sum(-1)  # [L, B, T, H]
        else:  # QK fix with the dropped gradient at the pattern
            est = qk_fix_reference(hf_tiny, setup, site, grads["attn.hook_pattern"])
        sizes += np.abs(np.moveaxis(est, 1, 0))
    sizes /= L - 1
    got = attribution.attribute(jp_tiny, setup.clean, setup.corrupted, site, setup.metric, method="atp*",
                                per_prompt=True)
    assert_close(got, sizes / np.abs(gap)[:, None, None, None], what=f"{site} GradDrop")
    assert (got >= 0).all()


def test_right_padded_prompts_match_unpadded_torch_runs(hf_tiny, jp_tiny, setup):
    """With an attention mask, each prompt equals the torch reference on its unpadded tokens, NaN after its end."""
    lengths = np.array([7, 5, 4])
    mask = (np.arange(T) < lengths[:, None]).astype(int)
    clean = np.where(mask, setup.clean, 0)
    corrupted = np.where(mask, setup.corrupted, 0)
    answers, contrasts = setup.answers, setup.contrasts
    metric = metrics.logit_diff(answers, contrasts)
    got = attribution.attribute(jp_tiny, clean, corrupted, "z", metric, per_prompt=True, attention_mask=mask)
    deltas, gaps = [], []
    for p, n in enumerate(lengths):
        ans, con = answers[p:p + 1], contrasts[p:p + 1]
        ld_c, acts_c, _ = ref.run(hf_tiny, clean[p:p + 1, :n], ans, con)
        ld_x, acts_x, grads_x = ref.run(hf_tiny, corrupted[p:p + 1, :n], ans, con)
        delta = ((acts_c["attn.hook_z"] - acts_x["attn.hook_z"]) * grads_x["attn.hook_z"]).sum(-1)[:, 0]
        assert_close(got[p][:, :n], delta / (ld_c - ld_x), what=f"prompt {p} ({n} tokens)")
        assert np.isnan(got[p][:, n:]).all()
        deltas.append(np.pad(delta, ((0, 0), (0, T - n), (0, 0))))
        gaps.append((ld_c - ld_x)[0])
    # the mean over prompts (the sweep's aggregate): at each position, over the prompts that have it
    has = np.arange(T)[None, :] < lengths[:, None]  # [B, T]
    total = np.einsum("bt,blth->lth", has, np.stack(deltas))
    expected = total / np.einsum("bt,b->t", has, np.array(gaps))[None, :, None]
    got = attribution.attribute(jp_tiny, clean, corrupted, "z", metric, attention_mask=mask)
    assert_close(got, expected, what="mean over the prompts that have each position")


def test_gaussian_noise_samples_match_torch(hf_tiny, jp_tiny, setup):
    """A noise Run (2 samples): per-row estimates on the noisy runs, averaged per prompt as sweep does."""
    S = 2
    run = corrupt.gaussian_noise(jp_tiny, setup.clean, [[1, 4]] * B, n_samples=S, std=0.5, seed=0)
    ov = run.overrides["hook_embed"]
    tokens = np.tile(setup.clean, (S, 1))
    wte = hf_tiny.transformer.wte.weight.detach().numpy()[tokens]
    shift = np.where(np.asarray(ov.mask), np.asarray(ov.value), wte) - wte  # the noise, by hand
    answers, contrasts = np.tile(setup.answers, S), np.tile(setup.contrasts, S)
    ld_noisy, noisy, grads = ref.run(hf_tiny, tokens, answers, contrasts, embed_shift=shift)
    clean = setup.runs["clean"][1]["attn.hook_z"]
    delta = ((np.tile(clean, (1, S, 1, 1, 1)) - noisy["attn.hook_z"]) * grads["attn.hook_z"]).sum(-1)  # [L, S*B, T, H]
    per_prompt = lambda a: a.reshape(a.shape[:1] + (S, B) + a.shape[2:]).mean(1)
    # unnormalized ("baseline": patched - corrupted): the mean over samples of each row's estimate
    expected = np.moveaxis(per_prompt(delta), 1, 0)
    metric = metrics.logit_diff(setup.answers, setup.contrasts, normalize=False)
    got = attribution.attribute(jp_tiny, setup.clean, run, "z", metric, per_prompt=True)
    assert_close(got, expected, what="z, Gaussian noise, 2 samples")


@pytest.mark.parametrize("method", ["atp", "atp*"])
def test_prompt_chunks_give_the_same_estimate(jp_tiny, setup, method):
    """A tiny memory budget splits the rows (prompts x noise samples) into one-row calls."""
    noisy = corrupt.gaussian_noise(jp_tiny, setup.clean, [[1, 4]] * B, n_samples=2, std=0.5, seed=0)
    whole = attribution.attribute(jp_tiny, setup.clean, noisy, "k", setup.metric, method=method, per_prompt=True)
    rows = attribution.attribute(jp_tiny, setup.clean, noisy, "k", setup.metric, method=method, per_prompt=True,
                                 memory_budget=1)
    np.testing.assert_allclose(rows, whole, atol=TOL)  # float32 matmuls of another batch size
    assert np.abs(whole).max() > 1e-3


def test_scalar_callable_metric(jp_tiny, setup):
    """A TransformerLens-style callable on full logits returning one number for the batch."""
    import jax.numpy as jnp

    ans, con = jnp.asarray(setup.answers), jnp.asarray(setup.contrasts)
    rows = jnp.arange(B)
    mean_ld = metrics.from_callable(lambda logits: (logits[rows, -1, ans] - logits[rows, -1, con]).mean())
    delta = reference_atp(setup, "denoise")["attn.hook_z"].sum(2)  # [L, B, H]
    expected = setup.ld_corr.mean() + delta.sum(1) / B  # the callable's value, estimated: d(mean)/da = g / B
    got = attribution.attribute(jp_tiny, setup.clean, setup.corrupted, "z", mean_ld, axes=("layer", "head"))
    assert_close(got, expected, what="scalar callable")
    with pytest.raises(ValueError, match="per_prompt"):
        attribution.attribute(jp_tiny, setup.clean, setup.corrupted, "z", mean_ld, per_prompt=True)


def test_tl_shaped_functions(jp_tiny, setup):
    names = {n[len("get_act_patch_"):] for n in dir(patching) if n.startswith("get_act_patch_")}
    assert names == {n[len("get_attr_patch_"):] for n in dir(attribution) if n.startswith("get_attr_patch_")}
    _, cache = jp_tiny.run_with_cache(setup.clean)
    delta = reference_atp(setup, "denoise")["attn.hook_z"].sum(2)  # [L, B, H]: every position at once
    got = attribution.get_attr_patch_attn_head_out_all_pos(jp_tiny, setup.corrupted, cache, setup.metric)
    gap = setup.ld_clean - setup.ld_corr
    assert_close(got, delta.mean(1) / gap.mean(), what="get_attr_patch_attn_head_out_all_pos")


def test_refusals(jp_tiny, setup):
    with pytest.raises(ValueError, match="unknown method"):
        attribution.attribute(jp_tiny, setup.clean, setup.corrupted, "z", setup.metric, method="ig")
    with pytest.raises(ValueError, match="right-padded"):
        attribution.attribute(jp_tiny, setup.clean, setup.corrupted, "z", setup.metric,
                              attention_mask=np.array([[0] + [1] * (T - 1)] * B))
    mask = np.ones((B, T), int)
    mask[0, 5:] = 0
    with pytest.raises(ValueError, match="of prompt 0 is padding"):
        attribution.attribute(jp_tiny, setup.clean, setup.corrupted, "z",
                              metrics.logit_diff(setup.answers, setup.contrasts, positions=np.full(B, T - 1)),
                              attention_mask=mask)
    with pytest.raises(ValueError, match="no src axis"):
        attribution.attribute(jp_tiny, setup.clean, setup.corrupted, "z", setup.metric, axes=("layer", "src"))


# --- edges ------------------------------------------------------------------------------


def reference_edges(hf, setup, runs):
    """EAP / EAP-IG in torch: the base (corrupted) run's writes and the reader-input gradients
    averaged over `runs` ({"embed": alpha, ("hook_attn_out", l): alpha, ...}: each group moved
    alpha of the way to the clean run), normalized like the sweep's mean."""
    _, base, _ = setup.runs["corrupted"]
    _, source, _ = setup.runs["clean"]
    diff = lambda site, l: torch.tensor(source[site][l] - base[site][l], dtype=torch.float32)
    readers = 0
    for alphas in runs:
        shifts = {key: a * diff(*key) for key, a in alphas.items() if key != "embed"}
        embed_shift = alphas.get("embed", 0.0) * (source["hook_resid_pre"][0] - base["hook_resid_pre"][0])
        _, acts, grads = ref.run(hf, setup.corrupted, setup.answers, setup.contrasts, shifts=shifts,
                                 embed_shift=embed_shift)
        readers = readers + ref.reader_input_grads(hf, acts, grads)
    scores = np.einsum("wbtd,rbtd->wr", ref.writes(hf, base, source), readers / len(runs))
    scores = scores / B / (setup.ld_clean - setup.ld_corr).mean()
    return np.where(ref.edge_mask(L, H), scores, 0.0)


def test_eap_matches_torch(hf_tiny, jp_tiny, setup):
    got = edges.edge_attribution(jp_tiny, setup.clean, setup.corrupted, setup.metric)
    assert got.scores.shape == (1 + L * (H + 1), L * (3 * H + 1) + 1)
    assert_close(got.scores, reference_edges(hf_tiny, setup, [{}]), what="EAP")
    assert (got.valid == ref.edge_mask(L, H)).all()


def test_eap_ig_matches_torch(hf_tiny, jp_tiny, setup):
    steps = 3
    expected = reference_edges(hf_tiny, setup, [{"embed": k / steps} for k in range(steps)])
    got = edges.edge_attribution(jp_tiny, setup.clean, setup.corrupted, setup.metric, method="eap-ig-inputs",
                                 steps=steps)
    assert_close(got.scores, expected, what="EAP-IG inputs")
    steps = 2
    groups = ["embed"] + [(site, l) for l in range(L) for site in ("hook_attn_out", "hook_mlp_out")]
    expected = reference_edges(hf_tiny, setup, [{g: k / steps} for g in groups for k in range(steps)])
    got = edges.edge_attribution(jp_tiny, setup.clean, setup.corrupted, setup.metric, method="eap-ig-activations",
                                 steps=steps)
    assert_close(got.scores, expected, what="EAP-IG activations")


def test_eap_ig_inputs_at_hanna_et_al_step_placements(jp_tiny, hf_tiny, setup):
    """hannamw/EAP-IG scores (corrupted - clean) . mean gradient over the points corrupted +
    (k/steps)(clean - corrupted): k in range(0, steps) in its src/eap code, range(1, steps + 1) in
    its earlier code (a copy of each placement, in torch). The first is jpatch's denoise scores
    with the sign flipped, the second jpatch's noise scores (edges.py's docstring)."""
    steps = 3
    hanna = lambda ks: -reference_edges(hf_tiny, setup, [{"embed": k / steps} for k in ks])  # (corrupted - clean) . g
    run = lambda direction: edges.edge_attribution(jp_tiny, setup.clean, setup.corrupted, setup.metric,
                                                   method="eap-ig-inputs", steps=steps, direction=direction).scores
    assert_close(-run("denoise"), hanna(range(0, steps)), what="src/eap placement")
    assert_close(run("noise"), hanna(range(1, steps + 1)), what="earlier placement")
    # Its EAP: the gradient at the clean run (the corrupted embeddings moved all the way).
    eap_noise = edges.edge_attribution(jp_tiny, setup.clean, setup.corrupted, setup.metric, direction="noise")
    assert_close(eap_noise.scores, -reference_edges(hf_tiny, setup, [{"embed": 1.0}]), what="EAP")


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_edge_sums_are_node_atp(jp_tiny, setup, direction):
    """Each writer's scores summed over its readers equal AtP of the writer (a head's z, an MLP's
    output, the embeddings = resid_pre at layer 0), and EAP-IG with one step is EAP."""
    eap = edges.edge_attribution(jp_tiny, setup.clean, setup.corrupted, setup.metric, direction=direction)
    totals = eap.scores.sum(1)
    node = lambda site, axes: attribution.attribute(jp_tiny, setup.clean, setup.corrupted, site, setup.metric,
                                                    axes=axes, direction=direction)
    unpatched = 0.0 if direction == "denoise" else 1.0  # the normalized score of the base run
    per_layer = totals[1:].reshape(L, H + 1)
    assert_close(totals[0], node("resid_pre", ("layer",))[0] - unpatched, what="embeddings")
    assert_close(per_layer[:, :H], node("z", ("layer", "head")) - unpatched, what="heads")
    assert_close(per_layer[:, H], node("mlp_out", ("layer",)) - unpatched, what="MLPs")
    if direction == "denoise":
        for method in ("eap-ig-inputs", "eap-ig-activations"):
            one = edges.edge_attribution(jp_tiny, setup.clean, setup.corrupted, setup.metric, method=method, steps=1)
            np.testing.assert_allclose(one.scores, eap.scores, atol=1e-6)


def test_edge_chunks_add_up(jp_tiny, setup):
    """Prompts split into chunks (a tiny memory budget: one row each) give the same scores, with a
    Gaussian-noise run whose overrides are split along with its rows."""
    noisy = corrupt.gaussian_noise(jp_tiny, setup.clean, [[1, 4]] * B, n_samples=2, std=0.5, seed=0)
    whole = edges.edge_attribution(jp_tiny, setup.clean, noisy, setup.metric)
    rows = edges.edge_attribution(jp_tiny, setup.clean, noisy, setup.metric, memory_budget=1)
    np.testing.assert_allclose(rows.scores, whole.scores, atol=1e-5)
    assert np.abs(whole.scores).max() > 1e-2


def test_edges_of_right_padded_prompts_add_up_to_each_prompt_alone(jp_tiny, setup):
    """Unnormalized EAP of a padded batch is the mean over prompts of each prompt's EAP run
    unpadded (pad positions neither write differences nor get gradients)."""
    lengths = np.array([7, 5, 4])
    mask = (np.arange(T) < lengths[:, None]).astype(int)
    clean, corrupted = np.where(mask, setup.clean, V - 1), np.where(mask, setup.corrupted, V - 1)
    raw = lambda a, c: metrics.logit_diff(a, c, normalize=False)
    padded = edges.edge_attribution(jp_tiny, clean, corrupted, raw(setup.answers, setup.contrasts),
                                    attention_mask=mask)
    alone = sum(edges.edge_attribution(jp_tiny, clean[p:p + 1, :n], corrupted[p:p + 1, :n],
                                       raw(setup.answers[p:p + 1], setup.contrasts[p:p + 1])).scores
                for p, n in enumerate(lengths))
    assert_close(padded.scores, alone / B, what="padded EAP vs unpadded prompts")


def test_edges_object(jp_tiny, setup, tmp_path):
    got = edges.edge_attribution(jp_tiny, setup.clean, setup.corrupted, setup.metric, per_position=True)
    assert got.scores.shape[-1] == T
    top = got.top(5)
    sizes = [abs(s) for _, _, s in top]
    assert sizes == sorted(sizes, reverse=True)
    totals = got.totals()
    assert sizes[0] == pytest.approx(np.abs(totals[got.valid]).max())
    writer, reader, score = top[0]
    assert totals[got.writers.index(writer), got.readers.index(reader)] == pytest.approx(score)
    data = json.loads(got.to_json(tmp_path / "edges.json"))
    assert len(data["edges"]) == got.valid.sum() and len(data["edges"][0]["by_pos"]) == T
    assert json.loads((tmp_path / "edges.json").read_text()) == data
    with pytest.raises(ValueError, match="unknown method"):
        edges.edge_attribution(jp_tiny, setup.clean, setup.corrupted, setup.metric, method="acdc")
