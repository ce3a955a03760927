"""Patching sweeps against TransformerLens 3.9: every `get_act_patch_*` (denoising and
noising), `sweep` (directions, per-prompt results, sliding windows, sub-grids,
per-prompt positions), the engine's shortcuts and chunking, and input errors.

The references are TransformerLens's own patching functions, or TransformerLens
`run_with_hooks` runs with hooks written here; metrics on the reference side are
written by hand in torch / NumPy. Nothing is compared against jpatch's own output
except where the claim is "the same with a shortcut on and off".
"""

import types

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformer_lens.patching as tl_patching

import reference
from jpatch.engine import execute as engine
from jpatch.engine import plan
from jpatch.engine.scores import score_whole
from jpatch.engine.sweep import make_patches
from jpatch.methods import metrics
from jpatch import patching
from jpatch.model.convert import config_from_hf, from_hf_state_dict

TOL = 1e-4
V = reference.TINY["vocab_size"]
B, T = 3, 7
CHANGED = (1, 4)  # the corrupted prompts differ from the clean ones at these positions

TL_NAMES = list(patching.SWEEPS) + ["block_every", "attn_head_all_pos_every", "attn_head_by_pos_every"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def assert_close(actual, expected, tol=TOL, what=""):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    err = float(np.abs(actual - expected).max()) if actual.size else 0.0
    assert err <= tol, f"{what}: max abs error {err:.3g} > {tol}"


def assert_nontrivial(result, what="", size=0.05):
    result = np.asarray(result)
    assert np.isfinite(result).all(), what
    assert np.abs(result).max() > size, f"{what}: all results are ~0"
    assert np.ptp(result) > size, f"{what}: all results are equal"


def corrupt(clean):
    corrupted = clean.copy()
    for p in CHANGED:
        corrupted[:, p] = (clean[:, p] + 17 + p) % V
    assert (corrupted != clean).sum() == len(CHANGED) * len(clean)
    return corrupted


def tl_last_logits(tl_model, tokens, hooks=()):
    with torch.no_grad():
        return tl_model.run_with_hooks(torch.tensor(tokens), fwd_hooks=list(hooks))[:, -1].double().numpy()


def tl_hook(index, source):
    """A TransformerLens hook writing `source[index]` into the activation."""

    def hook(act, hook):
        act = act.clone()
        act[index] = source[index]
        return act

    return hook


def hand_ld(last_logits, answers, contrasts):
    """Per-prompt logit difference from [batch, vocab] logits (NumPy)."""
    rows = np.arange(len(answers))
    return last_logits[rows, answers] - last_logits[rows, contrasts]


@pytest.fixture(scope="module")
def setup(tl_tiny):
    """Tokens, answers and the TransformerLens baselines; metrics for both libraries.

    answer / contrast are chosen from TransformerLens's logits so that every prompt's
    clean logit difference is well above its corrupted one."""
    clean = reference.random_tokens(B, T, V, seed=5)
    corrupted = corrupt(clean)
    with torch.no_grad():
        clean_logits, clean_cache = tl_tiny.run_with_cache(torch.tensor(clean))
        corr_logits, corr_cache = tl_tiny.run_with_cache(torch.tensor(corrupted))
    gap = (clean_logits[:, -1] - corr_logits[:, -1]).double().numpy()
    answers, contrasts = gap.argmax(-1), gap.argmin(-1)
    ld_clean = hand_ld(clean_logits[:, -1].double().numpy(), answers, contrasts)  # per prompt
    ld_corr = hand_ld(corr_logits[:, -1].double().numpy(), answers, contrasts)
    assert (ld_clean - ld_corr > 0.2).all()
    CL, CO = float(ld_clean.mean()), float(ld_corr.mean())
    ans_t, con_t, rows_t = torch.tensor(answers), torch.tensor(contrasts), torch.arange(B)

    def tl_metric(logits):  # the normalized logit difference a TransformerLens user writes
        last = logits[:, -1]
        return ((last[rows_t, ans_t] - last[rows_t, con_t]).mean() - CO) / (CL - CO)

    ans_j, con_j, rows_j = jnp.asarray(answers), jnp.asarray(contrasts), jnp.arange(B)

    def jp_callable(logits):  # the same metric in jnp, on full logits [batch, pos, vocab]
        last = logits[:, -1]
        return ((last[rows_j, ans_j] - last[rows_j, con_j]).mean() - CO) / (CL - CO)

    return types.SimpleNamespace(
        clean=clean, corrupted=corrupted, answers=answers, contrasts=contrasts,
        ld_clean=ld_clean, ld_corr=ld_corr, CL=CL, CO=CO,
        tl_clean_cache=clean_cache, tl_corr_cache=corr_cache, tl_metric=tl_metric,
        jp_callable=metrics.from_callable(jp_callable), jp_metric=metrics.logit_diff(answers, contrasts),
    )


@pytest.fixture(scope="module")
def jp_caches(jp_tiny, setup):
    return {"clean": jp_tiny.run_with_cache(setup.clean)[1], "corrupted": jp_tiny.run_with_cache(setup.corrupted)[1]}


@pytest.fixture(scope="module")
def tl_results(tl_tiny, setup):
    """TransformerLens's own patching functions, computed once per (name, direction)."""
    memo = {}

    def get(name, direction):
        if (name, direction) not in memo:
            fn = getattr(tl_patching, f"get_act_patch_{name}")
            if direction == "denoise":
                tokens, cache = setup.corrupted, setup.tl_clean_cache
            else:
                tokens, cache = setup.clean, setup.tl_corr_cache
            with torch.no_grad():
                memo[name, direction] = fn(tl_tiny, torch.tensor(tokens), cache, setup.tl_metric).double().numpy()
        return memo[name, direction]

    return get


# --- every TransformerLens patching function ---------------------------------------------


def test_every_transformer_lens_function_exists():
    tl_names = {n[len("get_act_patch_"):] for n in dir(tl_patching) if n.startswith("get_act_patch_")}
    assert tl_names == set(TL_NAMES)
    for name in TL_NAMES:
        assert callable(getattr(patching, f"get_act_patch_{name}"))


@pytest.mark.parametrize("direction", ["denoise", "noise"])
@pytest.mark.parametrize("name", TL_NAMES)
def test_get_act_patch_matches_transformer_lens(jp_tiny, setup, jp_caches, tl_results, name, direction):
    expected = tl_results(name, direction)
    assert_nontrivial(expected, f"TransformerLens {name} {direction}", size=5e-3)  # q, k: small effects
    fn = getattr(patching, f"get_act_patch_{name}")
    if direction == "denoise":
        tokens, cache = setup.corrupted, jp_caches["clean"]
    else:
        tokens, cache = setup.clean, jp_caches["corrupted"]
    # (b) the TransformerLens-style callable, written in jnp: the same numbers in both directions.
    got = fn(jp_tiny, tokens, cache, setup.jp_callable, progress=False)
    assert_close(got, expected, what=f"{name} {direction}, callable metric")
    # (a) jpatch's Metric normalizes between the run it patches into (0) and the run the
    # cache comes from (1) -- `get_act_patch_*` cannot know which of the two is "clean".
    # Denoising that is TransformerLens's clean-anchored value; noising it is 1 minus it.
    got = fn(jp_tiny, tokens, cache, setup.jp_metric, progress=False)
    assert_close(got, expected if direction == "denoise" else 1 - expected, what=f"{name} {direction}, jpatch Metric")


# --- sweep --------------------------------------------------------------------------------


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_sweep_directions_match_transformer_lens(jp_tiny, setup, tl_results, direction):
    got = patching.sweep(jp_tiny, setup.clean, setup.corrupted, "resid_pre", setup.jp_metric,
                         direction=direction, progress=False)
    # The sweep knows which run is clean: 1 means clean behaviour either way.
    assert_close(got, tl_results("resid_pre", direction), what=f"sweep resid_pre {direction}")
    # the hook name and the short name of a site are the same sweep; one layer's name is refused
    got2 = patching.sweep(jp_tiny, setup.clean, setup.corrupted, "hook_resid_pre", setup.jp_metric,
                          direction=direction, progress=False)
    assert_close(got2, got, tol=1e-6)
    with pytest.raises(ValueError, match=r"'blocks.0.hook_resid_pre' names one layer; .* pass the site "
                                         r"'hook_resid_pre' \(add layers=\[0\]"):
        patching.sweep(jp_tiny, setup.clean, setup.corrupted, "blocks.0.hook_resid_pre", setup.jp_metric,
                       direction=direction, progress=False)


@pytest.fixture(scope="module")
def tl_resid_pre_ld(tl_tiny, setup):
    """Per-prompt logit differences of TransformerLens runs patched at resid_pre
    [layer, pos]: {direction: [L, T, B]}."""
    L = tl_tiny.cfg.n_layers
    out = {}
    for direction in ("denoise", "noise"):
        tokens, cache = (setup.corrupted, setup.tl_clean_cache) if direction == "denoise" else (
            setup.clean, setup.tl_corr_cache)
        ld = np.zeros((L, T, B))
        for layer in range(L):
            name = f"blocks.{layer}.hook_resid_pre"
            for pos in range(T):
                logits = tl_last_logits(tl_tiny, tokens, [(name, tl_hook((slice(None), pos), cache[name]))])
                ld[layer, pos] = hand_ld(logits, setup.answers, setup.contrasts)
        out[direction] = ld
    return out


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_sweep_per_prompt_matches_hand_normalized(jp_tiny, setup, tl_resid_pre_ld, direction):
    got = patching.sweep(jp_tiny, setup.clean, setup.corrupted, "resid_pre", setup.jp_metric,
                         direction=direction, per_prompt=True, progress=False)
    ld = tl_resid_pre_ld[direction]
    expected = np.moveaxis((ld - setup.ld_corr) / (setup.ld_clean - setup.ld_corr), -1, 0)  # [B, L, T]
    assert got.shape == (B, 2, T)
    assert_nontrivial(expected)
    assert_close(got, expected, what=f"per-prompt {direction}")
    # per-prompt normalization differs from normalizing the mean, and the mean is what the default gives
    mean = patching.sweep(jp_tiny, setup.clean, setup.corrupted, "resid_pre", setup.jp_metric,
                          direction=direction, progress=False)
    assert_close(mean, (ld.mean(-1) - setup.CO) / (setup.CL - setup.CO), what="mean over prompts")


@pytest.fixture(scope="module")
def deep(setup):
    """A 4-layer tiny model (so that windows are clipped at both ends) in TransformerLens and jpatch."""
    hf = reference.hf_model(seed=1, n_layer=4)
    tl = reference.tl_model(hf)
    jp = from_hf_state_dict(reference.hf_state_dict(hf), config_from_hf(hf.config))
    with torch.no_grad():
        caches = {"clean": tl.run_with_cache(torch.tensor(setup.clean))[1],
                  "corrupted": tl.run_with_cache(torch.tensor(setup.corrupted))[1]}
    return types.SimpleNamespace(tl=tl, jp=jp, caches=caches)


@pytest.mark.parametrize("window,direction", [(3, "denoise"), (3, "noise"), (2, "denoise"), (4, "denoise")])
def test_sliding_window_matches_transformer_lens_hooks(setup, deep, window, direction):
    L = 4
    tokens, source = (setup.corrupted, deep.caches["clean"]) if direction == "denoise" else (
        setup.clean, deep.caches["corrupted"])
    base = tl_last_logits(deep.tl, setup.corrupted)
    clean_ld = hand_ld(tl_last_logits(deep.tl, setup.clean), setup.answers, setup.contrasts).mean()
    corr_ld = hand_ld(base, setup.answers, setup.contrasts).mean()
    expected = np.zeros((L, T))
    for layer in range(L):
        lo, hi = max(layer - window // 2, 0), min(layer - window // 2 + window, L)
        names = [f"blocks.{j}.hook_mlp_out" for j in range(lo, hi)]
        for pos in range(T):
            hooks = [(n, tl_hook((slice(None), pos), source[n])) for n in names]
            ld = hand_ld(tl_last_logits(deep.tl, tokens, hooks), setup.answers, setup.contrasts).mean()
            expected[layer, pos] = (ld - corr_ld) / (clean_ld - corr_ld)
    assert_nontrivial(expected)
    got = patching.sweep(deep.jp, setup.clean, setup.corrupted, "mlp_out", setup.jp_metric, window=window,
                         direction=direction, progress=False)
    assert_close(got, expected, what=f"window {window} {direction}")


# --- the engine's shortcuts and chunking --------------------------------------------------

SHORTCUT_SITES = [  # (sweep site, TransformerLens function with the same default axes)
    ("resid_pre", "resid_pre"),
    ("k", "attn_head_k_by_pos"),
    ("pattern", "attn_head_pattern_by_pos"),
]


@pytest.mark.parametrize("site,tl_name", SHORTCUT_SITES)
def test_skipping_layers_and_positions_changes_nothing(jp_tiny, setup, tl_results, site, tl_name):
    results = {}
    for skip_layers in (True, False):
        for skip_positions in (True, False):
            results[skip_layers, skip_positions] = patching.sweep(
                jp_tiny, setup.clean, setup.corrupted, site, setup.jp_metric, progress=False,
                skip_layers=skip_layers, skip_positions=skip_positions)
    for key, result in results.items():
        assert_close(result, results[False, False], tol=1e-5, what=f"{site} skip_layers, skip_positions = {key}")
        assert_close(result, tl_results(tl_name, "denoise"), what=f"{site} {key} vs TransformerLens")


def test_last_position_metric_equals_callable_on_all_positions(jp_tiny, setup):
    ans, con, rows = jnp.asarray(setup.answers), jnp.asarray(setup.contrasts), jnp.arange(B)

    def per_prompt_ld(logits):  # [B, T, V] -> [B]
        return logits[rows, -1, ans] - logits[rows, -1, con]

    callable_metric = metrics.from_callable(per_prompt_ld, normalize="range")
    for site in ("resid_pre", "z"):
        for per_prompt in (False, True):
            last = patching.sweep(jp_tiny, setup.clean, setup.corrupted, site, setup.jp_metric,
                                  per_prompt=per_prompt, progress=False)
            every = patching.sweep(jp_tiny, setup.clean, setup.corrupted, site, callable_metric,
                                   per_prompt=per_prompt, progress=False)
            assert_nontrivial(last)
            assert_close(last, every, tol=1e-5, what=f"{site} per_prompt={per_prompt}")


def count_calls(monkeypatch):
    calls = []
    run_layout = engine.run_layout

    def counting(model, base, *args, **kwargs):
        calls.append((base.final.shape[0], kwargs["stages"][-1].n_patches))  # (prompts, patches) of the call
        return run_layout(model, base, *args, **kwargs)

    monkeypatch.setattr(engine, "run_layout", counting)
    return calls


def test_small_memory_budget_gives_the_same_result(jp_tiny, setup, tl_results, monkeypatch):
    default = patching.sweep(jp_tiny, setup.clean, setup.corrupted, "resid_pre", setup.jp_metric, progress=False)
    calls = count_calls(monkeypatch)
    patches, _ = make_patches(jp_tiny.config, "hook_resid_pre", ("layer", "pos"), T, B)
    per_prompt = plan.bytes_per_prompt(jp_tiny.config, plan.plan_layout(patches, 2, T), 1, V)
    small = patching.sweep(jp_tiny, setup.clean, setup.corrupted, "resid_pre", setup.jp_metric, progress=False,
                           memory_budget=per_prompt // 3)
    assert len({n for _, n in calls}) > 1 or max(n for _, n in calls) < len(patches), "no patch groups"
    assert max(b for b, _ in calls) < B, f"no prompt chunks: {calls}"
    assert len(calls) >= 6
    assert_close(small, default, tol=1e-5, what="chunked vs default")
    assert_close(small, tl_results("resid_pre", "denoise"), what="chunked vs TransformerLens")


def test_callable_metric_runs_in_prompt_chunks(jp_tiny, setup, tl_results, monkeypatch):
    """A whole-batch callable (a mean over the prompts) under a budget below one call of every prompt:
    its patched runs go in prompt chunks, as a `Metric`'s do, and it is scored on all prompts at
    once after them; the numbers are TransformerLens's."""
    calls = count_calls(monkeypatch)
    patches, _ = make_patches(jp_tiny.config, "hook_resid_pre", ("layer", "pos"), T, B)
    per_prompt = plan.bytes_per_prompt(jp_tiny.config, plan.plan_layout(patches, 2, T), 1, V)
    got = patching.sweep(jp_tiny, setup.clean, setup.corrupted, "resid_pre", setup.jp_callable, progress=False,
                         memory_budget=per_prompt // 3, buckets=False)
    assert max(b for b, _ in calls) < B, f"no prompt chunks: {calls}"
    assert_close(got, tl_results("resid_pre", "denoise"), what="chunked callable vs TransformerLens")


def test_whole_batch_scoring_in_patch_chunks(jp_tiny, setup):
    """`score_whole` scores 7 patches' final residuals in chunks of 3 (the last overlapping) and on
    the real prompts only: equal to the logits and metric computed by hand in NumPy."""
    rng = np.random.default_rng(0)
    resid = rng.normal(size=(B + 2, 7, 1, jp_tiny.config.d_model)).astype(np.float32)  # 2 padding prompts
    x = resid[:B, :, 0].astype(np.float64)  # GPT-2's final layer norm and tied unembedding, by hand
    x = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + jp_tiny.config.layer_norm_eps)
    logits = (x * np.asarray(jp_tiny.ln_f.weight) + np.asarray(jp_tiny.ln_f.bias)) @ np.asarray(jp_tiny.wte).T
    rows = np.arange(B)
    expected = (logits[rows, :, setup.answers] - logits[rows, :, setup.contrasts]).mean(0)
    expected = (expected - setup.CO) / (setup.CL - setup.CO)
    inputs = engine.MetricInputs(None, jnp.zeros((B + 2, 1, V)), {})
    per_patch = 3 * B * 1 * V * 4
    got = score_whole(jp_tiny, jnp.asarray(resid), inputs, setup.jp_callable.score, B, 3 * per_patch)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_tiny_memory_budget_still_runs(jp_tiny, setup, tl_results):
    """A budget far below one patch of one prompt: the sweep must still run, in pieces."""
    got = patching.sweep(jp_tiny, setup.clean, setup.corrupted, "resid_pre", setup.jp_metric, progress=False,
                         layers=[1], positions=[3, 6], memory_budget=1)
    assert_close(got, tl_results("resid_pre", "denoise")[[1]][:, [3, 6]], what="memory_budget=1")


# --- sub-grids -----------------------------------------------------------------------------


def test_layers_positions_heads_select_the_sub_grid(jp_tiny, setup, tl_results):
    def run(site, **kwargs):
        return patching.sweep(jp_tiny, setup.clean, setup.corrupted, site, setup.jp_metric, progress=False, **kwargs)

    full = tl_results("resid_pre", "denoise")
    got = run("resid_pre", layers=[1], positions=[6, 1, 4])  # order as given
    assert_close(got, full[np.ix_([1], [6, 1, 4])], what="resid_pre sub-grid")
    assert_close(run("resid_pre", layers=1), full[[1]], what="one layer as an int")

    full = tl_results("attn_head_out_by_pos", "denoise")
    got = run("z", layers=[1, 0], positions=[4, 5], heads=[3, 0])
    assert_close(got, full[np.ix_([1, 0], [4, 5], [3, 0])], what="z sub-grid")

    full = tl_results("attn_head_out_all_pos", "denoise")
    assert_close(run("z", axes=("layer", "head"), heads=[2]), full[:, [2]], what="z all positions, one head")

    full = tl_results("attn_head_pattern_dest_src_pos", "denoise")
    got = run("pattern", axes=("layer", "head", "pos", "src"), heads=[1], positions=[5, 6])
    assert_close(got, full[:, [1]][:, :, [5, 6]], what="pattern dest/src sub-grid")


def test_prompt_positions_pick_each_prompts_own_position(jp_tiny, setup, tl_resid_pre_ld):
    own = np.array([1, 4, 6])
    for direction in ("denoise", "noise"):
        full = patching.sweep(jp_tiny, setup.clean, setup.corrupted, "resid_pre", setup.jp_metric,
                              direction=direction, per_prompt=True, progress=False)
        got = patching.sweep(jp_tiny, setup.clean, setup.corrupted, "resid_pre", setup.jp_metric,
                             direction=direction, per_prompt=True, prompt_positions=own, progress=False)
        assert got.shape == (B, 2, 1)
        assert_close(got[:, :, 0], full[np.arange(B), :, own], tol=1e-5, what=f"per prompt {direction}")
        # mean over prompts (normalized after averaging), from TransformerLens's per-prompt LDs
        ld = tl_resid_pre_ld[direction][:, own, np.arange(B)]  # [L, B]
        expected = (ld.mean(-1) - setup.CO) / (setup.CL - setup.CO)
        got = patching.sweep(jp_tiny, setup.clean, setup.corrupted, "resid_pre", setup.jp_metric,
                             direction=direction, prompt_positions=own, progress=False)
        assert_close(got[:, 0], expected, what=f"mean {direction}")


# --- errors --------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors(jp_tiny, setup):
    clean, corrupted, metric = setup.clean, setup.corrupted, setup.jp_metric

    def run(site="resid_pre", clean=clean, corrupted=corrupted, metric=metric, **kwargs):
        return patching.sweep(jp_tiny, clean, corrupted, site, metric, progress=False, **kwargs)

    with pytest.raises(ValueError, match=r"must have the same \[batch, pos\] shape"):
        run(corrupted=corrupted[:, :-1])
    with pytest.raises(ValueError, match=r"must have the same \[batch, pos\] shape"):
        run(corrupted=corrupted[:2])
    with pytest.raises(KeyError, match=r"unknown site 'resid_prez'; valid sites: .*hook_resid_pre.*attn.hook_z"):
        run("resid_prez")
    with pytest.raises(KeyError, match=r"valid sites"):
        run("blocks.0.hook_nonsense")
    with pytest.raises(ValueError, match=r"unknown direction 'denoising'; valid: denoise, noise"):
        run(direction="denoising")
    with pytest.raises(ValueError, match=r"layers \[2\] out of range \[0, 2\)"):
        run(layers=[0, 2])
    with pytest.raises(ValueError, match=r"layers \[-1\] out of range"):
        run(layers=[-1])
    with pytest.raises(ValueError, match=r"positions \[7\] out of range \[0, 7\)"):
        run(positions=[7])
    with pytest.raises(ValueError, match=r"heads \[4\] out of range \[0, 4\)"):
        run("z", heads=[4])
    with pytest.raises(ValueError, match=r"prompt_positions \[7\] out of range"):
        run(prompt_positions=[0, 7, 3])
    with pytest.raises(ValueError, match=r"one position per prompt \(3\)"):
        run(prompt_positions=[0, 1])
    with pytest.raises(ValueError, match=r"no pos axis"):
        run("z", axes=("layer", "head"), positions=[1])
    with pytest.raises(ValueError, match=r"window must be an integer >= 1, got 0"):
        run(window=0)
    with pytest.raises(ValueError, match=r"sliding window applies to .*not 'attn.hook_z'"):
        run("z", window=3)
    with pytest.raises(ValueError, match=r"sliding window applies to .*not 'attn.hook_pattern'"):
        run("pattern", window=2)
    with pytest.raises(ValueError, match=r"must return a scalar or one value per prompt \(3\), got shape \(3, 2\)"):
        run(metric=metrics.from_callable(lambda logits: logits[:, -1, :2]))
    with pytest.raises(ValueError, match=r"expected one per prompt \(3\)"):
        run(metric=metrics.logit_diff([1, 2], [3, 4]))


@pytest.mark.filterwarnings("ignore:.*encountered in divide:RuntimeWarning")
def test_non_finite_results_name_the_patch(jp_tiny, setup):
    # corrupted == clean: the normalized metric divides by LD_cl - LD_* = 0
    with pytest.raises(FloatingPointError, match=r"not finite for 14 patch\(es\), first at layer 0, pos 0"):
        patching.sweep(jp_tiny, setup.clean, setup.clean, "resid_pre", setup.jp_metric, progress=False)
    with pytest.raises(FloatingPointError, match=r"first at layer 0, pos 0, head 0"):
        patching.sweep(jp_tiny, setup.clean, setup.clean, "z", setup.jp_metric, per_prompt=True, progress=False)


def test_non_finite_message_names_the_first_bad_patch(jp_tiny, setup, tl_results):
    """A metric that is NaN only where the patch moved the logit difference: the
    message counts those patches (per TransformerLens) and names the first one."""
    ans, con, rows = jnp.asarray(setup.answers), jnp.asarray(setup.contrasts), jnp.arange(B)

    def nan_where_moved(logits):
        value = ((logits[rows, -1, ans] - logits[rows, -1, con]).mean() - setup.CO) / (setup.CL - setup.CO)
        return jnp.where(jnp.abs(value) > 1e-3, jnp.nan, value)

    expected = tl_results("resid_pre", "denoise")
    moved = np.argwhere(np.abs(expected) > 1e-3)
    assert 0 < len(moved) < expected.size and (np.abs(np.abs(expected) - 1e-3) > 1e-4).all()
    layer, pos = moved[0]
    with pytest.raises(FloatingPointError, match=rf"not finite for {len(moved)} patch\(es\), first at layer {layer}, pos {pos};"):
        patching.sweep(jp_tiny, setup.clean, setup.corrupted, "resid_pre", metrics.from_callable(nan_where_moved),
                       progress=False)


def test_get_act_patch_normalizes_a_scalar_callable(jp_tiny, setup, jp_caches, tl_results):
    """from_callable(normalize="range") on a raw mean-LD callable: the same as the hand-normalized TL metric."""
    ans, con, rows = jnp.asarray(setup.answers), jnp.asarray(setup.contrasts), jnp.arange(B)
    mean_ld = lambda logits: (logits[rows, -1, ans] - logits[rows, -1, con]).mean()
    for normalize, expected in (("range", tl_results("resid_pre", "denoise")),
                                ("baseline", tl_results("resid_pre", "denoise") * (setup.CL - setup.CO))):
        got = patching.get_act_patch_resid_pre(jp_tiny, setup.corrupted, jp_caches["clean"],
                                               metrics.from_callable(mean_ld, normalize=normalize), progress=False)
        assert_close(got, expected, what=f"normalize={normalize}")


def test_get_act_patch_checks_the_cache_matches_the_tokens(jp_tiny, setup, jp_caches):
    _, short = jp_tiny.run_with_cache(setup.clean[:, :-1])
    _, fewer = jp_tiny.run_with_cache(setup.clean[:2])
    for cache, shape in ((short, r"\(3, 6\)"), (fewer, r"\(2, 7\)")):
        with pytest.raises(ValueError, match=rf"clean_cache holds activations of {shape} tokens, corrupted_tokens are \(3, 7\)"):
            patching.get_act_patch_resid_pre(jp_tiny, setup.corrupted, cache, setup.jp_metric, progress=False)


def test_per_prompt_needs_a_metric_per_prompt(jp_tiny, setup):
    mean_ld = lambda logits: logits[:, -1, 0].mean()  # a scalar: no per-prompt values to report
    with pytest.raises(ValueError, match=r"per_prompt=True needs a metric with one value per prompt"):
        patching.sweep(jp_tiny, setup.clean, setup.corrupted, "resid_pre", metrics.from_callable(mean_ld),
                       per_prompt=True, progress=False)


def test_axes_must_exist_for_the_site(jp_tiny, setup, tl_results):
    def run(site, axes):
        return patching.sweep(jp_tiny, setup.clean, setup.corrupted, site, setup.jp_metric, axes=axes, progress=False)

    with pytest.raises(ValueError, match=r"site 'hook_resid_pre' has no head axis; its axes: layer, pos"):
        run("resid_pre", ("layer", "head"))
    with pytest.raises(ValueError, match=r"site 'attn.hook_z' has no src axis; its axes: layer, pos, head"):
        run("z", ("layer", "pos", "src"))
    with pytest.raises(ValueError, match=r"unknown axis 'banana'; valid: layer, pos, head, src"):
        run("resid_pre", ("layer", "banana"))
    with pytest.raises(ValueError, match=r"needs a layer axis and no repeated axis, got axes \('layer', 'layer'\)"):
        run("resid_pre", ("layer", "layer"))
    with pytest.raises(ValueError, match=r"needs a layer axis and no repeated axis, got axes \('pos',\)"):
        run("resid_pre", ("pos",))
    # any order of valid axes is the transposed grid
    assert_close(run("resid_pre", ("pos", "layer")), tl_results("resid_pre", "denoise").T, what="(pos, layer)")
    assert_close(run("z", ("head", "layer")), tl_results("attn_head_out_all_pos", "denoise").T, what="(head, layer)")


@pytest.mark.parametrize("site,axes", [("resid_post", ("layer", "pos")), ("pattern", ("layer", "head", "src"))])
@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_sweeps_without_a_transformer_lens_function(jp_tiny, tl_tiny, setup, site, axes, direction):
    """resid_post by position, and the pattern by source (key) position at every query position,
    against TransformerLens hooks."""
    tokens, source = (setup.corrupted, setup.tl_clean_cache) if direction == "denoise" else (
        setup.clean, setup.tl_corr_cache)
    H = tl_tiny.cfg.n_heads
    expected = np.zeros((2, T) if site == "resid_post" else (2, H, T))
    for index in np.ndindex(expected.shape):
        if site == "resid_post":
            name, where = f"blocks.{index[0]}.hook_resid_post", (slice(None), index[1])
        else:
            name, where = f"blocks.{index[0]}.attn.hook_pattern", (slice(None), index[1], slice(None), index[2])
        ld = hand_ld(tl_last_logits(tl_tiny, tokens, [(name, tl_hook(where, source[name]))]),
                     setup.answers, setup.contrasts).mean()
        expected[index] = (ld - setup.CO) / (setup.CL - setup.CO)
    assert_nontrivial(expected, size=5e-3)
    got = patching.sweep(jp_tiny, setup.clean, setup.corrupted, site, setup.jp_metric, axes=axes,
                         direction=direction, progress=False)
    assert_close(got, expected, what=f"{site} {axes} {direction}")
