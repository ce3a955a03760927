"""The GPT-NeoX (Pythia) family against independent references, on random tiny models built
with transformers (3 layers, d_model 64, 4 heads, rotary on 8 of 16 dims per head; 4 and
16 in the rotary variants) and the same weights in TransformerLens 3.9 (the config of
/work/shared/FAMILIES.md):

- logits vs transformers, plain and with right / left padding;
- run_with_cache vs TransformerLens's cache (the same hook names, rot_q / rot_k included);
- every TransformerLens `get_act_patch_*` that applies to NeoX, both directions, with the
  same metric as a plain callable (resid_mid is refused: the block is parallel);
- `sweep` vs brute-force TransformerLens hook runs, with the engine's shortcuts on and off,
  right-padded prompts, and patches that change nothing scoring exactly the base run (a
  per-prompt metric and a scalar callable);
- `attribute` ("atp", AtP*'s QK fix "atp-qk" through the rotary embedding, GradDrop "atp*") vs
  torch autograd through TransformerLens hooks;
- greedy generation vs transformers' `generate(do_sample=False)`.

Nothing is compared against jpatch's own output except where the claim is "the same with a
setting on and off".
"""

import types

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformer_lens.patching as tl_patching

import reference
from family_reference import assert_close
from jpatch import patching
from jpatch.methods import attribution, metrics
from jpatch.model.neox_hf import config_from_hf, from_hf_state_dict

V = reference.NEOX_TINY["vocab_size"]
L, H = reference.NEOX_TINY["num_hidden_layers"], reference.NEOX_TINY["num_attention_heads"]
B, T = 3, 10
CHANGED = (3, 7)  # the corrupted prompts differ from the clean ones at these positions
MAIN = 0.5  # rotary_pct of the model every test uses; the variants rotate 4 and all 16 dims of a head
VARIANTS = (0.25, 1.0)  # forward, cache and generation; patching on 0.25 (Pythia's) too

# TransformerLens's patching functions; resid_mid has no hook point in a parallel block.
TL_NAMES = [n for n in patching.SWEEPS if n != "resid_mid"] + ["block_every", "attn_head_all_pos_every",
                                                                "attn_head_by_pos_every"]
# site -> the index a patch writes into TransformerLens's activation, given a grid point of the
# sweep's default axes after the layer ((pos), (pos, head), or (head, query pos) for the pattern)
HOOK_INDEX = {
    "hook_resid_pre": lambda pos: (slice(None), pos),
    "hook_attn_out": lambda pos: (slice(None), pos),
    "hook_mlp_out": lambda pos: (slice(None), pos),
    "hook_resid_post": lambda pos: (slice(None), pos),
    "attn.hook_q": lambda pos, head: (slice(None), pos, head),
    "attn.hook_k": lambda pos, head: (slice(None), pos, head),
    "attn.hook_v": lambda pos, head: (slice(None), pos, head),
    "attn.hook_z": lambda pos, head: (slice(None), pos, head),
    "attn.hook_pattern": lambda head, pos: (slice(None), head, pos),  # query position
}
SWEEP_SITES = tuple(HOOK_INDEX)
PER_PROMPT_SITES = ("hook_resid_pre", "attn.hook_k", "attn.hook_z", "attn.hook_pattern")  # also with jpatch's Metric
# TransformerLens 3.9's hook points of a NeoX block (attn.hook_result only when asked)
NEOX_LAYER_HOOKS = ("hook_resid_pre", "ln1.hook_scale", "ln1.hook_normalized", "attn.hook_q", "attn.hook_k",
                    "attn.hook_v", "attn.hook_rot_q", "attn.hook_rot_k", "attn.hook_attn_scores", "attn.hook_pattern",
                    "attn.hook_z", "hook_attn_out", "ln2.hook_scale", "ln2.hook_normalized", "mlp.hook_pre",
                    "mlp.hook_post", "hook_mlp_out", "hook_resid_post")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def assert_nontrivial(result, what="", size=5e-3):
    result = np.asarray(result)
    assert np.isfinite(result).all(), what
    assert np.abs(result).max() > size, f"{what}: all results are ~0"
    assert np.ptp(result) > size, f"{what}: all results are equal"


def hand_ld(last_logits, answers, contrasts):
    rows = np.arange(len(answers))
    return last_logits[rows, answers] - last_logits[rows, contrasts]


# --- models and data -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def family():
    """rotary_pct -> the same random NeoX in transformers, TransformerLens and jpatch (built once)."""
    memo = {}

    def get(rotary_pct=MAIN):
        if rotary_pct not in memo:
            hf = reference.neox_hf_model(seed=3, rotary_pct=rotary_pct)
            tl = reference.neox_tl_model(hf)
            jp = from_hf_state_dict(reference.hf_state_dict(hf), config_from_hf(hf.config.to_dict()))
            assert jp.config.rotary_dim == tl.cfg.rotary_dim == int(16 * rotary_pct)
            memo[rotary_pct] = types.SimpleNamespace(hf=hf, tl=tl, jp=jp)
        return memo[rotary_pct]

    return get


def make_setup(m):
    """Tokens, answers chosen from TransformerLens's logits (every prompt's clean logit difference
    well above its corrupted one), TransformerLens caches, and the metric for both libraries."""
    clean = reference.random_tokens(B, T, V - 1, seed=5)  # V - 1 is the pad (and eos) token
    corrupted = clean.copy()
    for p in CHANGED:
        corrupted[:, p] = (clean[:, p] + 17 + p) % (V - 1)
    with torch.no_grad():
        clean_logits, clean_cache = m.tl.run_with_cache(torch.tensor(clean))
        corr_logits, corr_cache = m.tl.run_with_cache(torch.tensor(corrupted))
    gap = (clean_logits[:, -1] - corr_logits[:, -1]).double().numpy()
    answers, contrasts = gap.argmax(-1), gap.argmin(-1)
    ld_clean = hand_ld(clean_logits[:, -1].double().numpy(), answers, contrasts)
    ld_corr = hand_ld(corr_logits[:, -1].double().numpy(), answers, contrasts)
    assert (ld_clean - ld_corr > 0.2).all()
    CL, CO = float(ld_clean.mean()), float(ld_corr.mean())
    ans_t, con_t, rows_t = torch.tensor(answers), torch.tensor(contrasts), torch.arange(B)
    ans_j, con_j, rows_j = jnp.asarray(answers), jnp.asarray(contrasts), jnp.arange(B)

    def tl_metric(logits):  # the normalized logit difference a TransformerLens user writes
        last = logits[:, -1]
        return ((last[rows_t, ans_t] - last[rows_t, con_t]).mean() - CO) / (CL - CO)

    def jp_callable(logits):  # the same, in jnp: a plain Python callable on [batch, pos, vocab]
        last = logits[:, -1]
        return ((last[rows_j, ans_j] - last[rows_j, con_j]).mean() - CO) / (CL - CO)

    jp_caches = {"clean": m.jp.run_with_cache(clean)[1], "corrupted": m.jp.run_with_cache(corrupted)[1]}
    return types.SimpleNamespace(
        clean=clean, corrupted=corrupted, answers=answers, contrasts=contrasts, ld_clean=ld_clean, ld_corr=ld_corr,
        CL=CL, CO=CO, tl_cache={"clean": clean_cache, "corrupted": corr_cache}, tl_metric=tl_metric,
        jp_callable=jp_callable, jp_metric=metrics.logit_diff(answers, contrasts), jp_cache=jp_caches)


@pytest.fixture(scope="module")
def setups(family):
    memo = {}

    def get(rotary_pct=MAIN):
        if rotary_pct not in memo:
            memo[rotary_pct] = make_setup(family(rotary_pct))
        return memo[rotary_pct]

    return get


def roles(setup, direction, tl=True):
    """(tokens patched into, cache the values come from): TransformerLens's denoising patches the
    clean cache into the corrupted run; noising swaps the roles."""
    base, source = ("corrupted", "clean") if direction == "denoise" else ("clean", "corrupted")
    return getattr(setup, base), (setup.tl_cache if tl else setup.jp_cache)[source]


# --- forward, cache, generation -------------------------------------------------------------


@pytest.mark.parametrize("rotary_pct", (MAIN,) + VARIANTS)
def test_logits_match_transformers(family, rotary_pct):
    m = family(rotary_pct)
    tokens = reference.random_tokens(3, 12, V, seed=2)
    assert_close(m.jp(tokens), reference.hf_logits(m.hf, tokens), what="logits")
    # right padding: each prompt's real positions
    lengths = np.array([12, 7, 4])
    mask = (np.arange(12) < lengths[:, None]).astype(int)
    padded = np.where(mask, tokens, V - 1)
    got = np.asarray(m.jp(padded, attention_mask=mask))
    expected = reference.hf_logits(m.hf, padded, mask)
    for b, n in enumerate(lengths):
        assert_close(got[b, :n], expected[b, :n], what=f"right-padded prompt {b}")
        assert_close(got[b, :n], reference.hf_logits(m.hf, tokens[b : b + 1, :n])[0], what=f"prompt {b} alone")
    # left padding: positions counted over the real tokens (transformers given the same position ids)
    left = np.zeros_like(tokens)
    left_mask = np.zeros_like(mask)
    for b, n in enumerate(lengths):
        left[b], left[b, 12 - n:] = V - 1, tokens[b, :n]
        left_mask[b, 12 - n:] = 1
    with torch.no_grad():
        expected = m.hf(torch.tensor(left), attention_mask=torch.tensor(left_mask),
                        position_ids=torch.tensor(np.maximum(np.cumsum(left_mask, 1) - 1, 0))).logits.numpy()
    got = np.asarray(m.jp(left, attention_mask=left_mask))
    for b, n in enumerate(lengths):
        assert_close(got[b, 12 - n:], expected[b, 12 - n:], what=f"left-padded prompt {b}")


@pytest.mark.parametrize("rotary_pct", (MAIN,) + VARIANTS)
def test_cache_matches_transformer_lens(family, rotary_pct):
    m = family(rotary_pct)
    tokens = reference.random_tokens(2, 9, V, seed=1)
    logits, cache = m.jp.run_with_cache(tokens)
    with torch.no_grad():
        tl_logits, tl_cache = m.tl.run_with_cache(torch.tensor(tokens))
    assert set(cache.keys()) == set(tl_cache.keys())
    assert set(cache.keys()) == ({f"blocks.{l}.{s}" for s in NEOX_LAYER_HOOKS for l in range(L)}
                                 | {"hook_embed", "ln_final.hook_scale", "ln_final.hook_normalized", "unembed.hook_in",
                                    "unembed.hook_out"})
    assert "blocks.2.attn.hook_rot_k" in cache and "blocks.0.attn.hook_rot_q" in cache
    for name in cache.keys():
        assert_close(cache[name], tl_cache[name].numpy(), what=name)
    assert_close(logits, tl_logits.numpy(), what="logits")
    assert cache["blocks.1.attn.hook_pattern"].shape == (2, H, 9, 9)
    assert cache["blocks.1.attn.hook_rot_q"].shape == (2, 9, H, 16)
    # rotary leaves the dims past rotary_dim alone, and moves the ones before it
    r = m.jp.config.rotary_dim
    q, rot = np.asarray(cache["blocks.0.attn.hook_q"]), np.asarray(cache["blocks.0.attn.hook_rot_q"])
    assert (q[..., r:] == rot[..., r:]).all() and np.abs(q[:, 1:, :, :r] - rot[:, 1:, :, :r]).max() > 1e-3
    # the per-head result, only when asked
    m.tl.set_use_attn_result(True)
    try:
        with torch.no_grad():
            _, tl_cache = m.tl.run_with_cache(torch.tensor(tokens))
    finally:
        m.tl.set_use_attn_result(False)
    _, cache = m.jp.run_with_cache(tokens, names_filter="result")
    for l in range(L):
        assert_close(cache["result", l], tl_cache[f"blocks.{l}.attn.hook_result"].numpy(), what=f"result {l}")


@pytest.mark.parametrize("rotary_pct", (MAIN,) + VARIANTS)
def test_greedy_generate_equals_transformers(family, rotary_pct):
    m = family(rotary_pct)
    prompt = reference.random_tokens(2, 5, V, seed=11)
    with torch.no_grad():
        expected = m.hf.generate(torch.tensor(prompt), max_new_tokens=12, do_sample=False, eos_token_id=V - 1,
                                 pad_token_id=V - 1, attention_mask=torch.ones(prompt.shape, dtype=torch.long)).numpy()
    out = np.asarray(m.jp.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=V - 1))
    np.testing.assert_array_equal(out, expected)


# --- resid_mid and other sites NeoX does not have --------------------------------------------


def test_sites_of_sequential_blocks_are_refused(family, setups):
    m, s = family(), setups()
    clean, corrupted = s.clean, s.corrupted
    missing = r"hook_resid_mid.*(GPT-NeoX|NeoX)|(GPT-NeoX|NeoX).*hook_resid_mid"
    with pytest.raises((ValueError, KeyError), match=missing):
        patching.get_act_patch_resid_mid(m.jp, corrupted, s.jp_cache["clean"], s.jp_callable, progress=False)
    with pytest.raises((ValueError, KeyError), match=missing):
        patching.sweep(m.jp, clean, corrupted, "resid_mid", s.jp_metric, progress=False)
    with pytest.raises((ValueError, KeyError), match=missing):
        attribution.attribute(m.jp, clean, corrupted, "resid_mid", s.jp_metric)
    with pytest.raises(KeyError, match="GPT-NeoX has no hook point 'hook_resid_mid'"):
        m.jp.run_with_cache(clean, names_filter="resid_mid")
    with pytest.raises(KeyError, match="GPT-NeoX has no hook point 'hook_pos_embed'"):
        m.jp.run_with_cache(clean, names_filter="hook_pos_embed")
    with pytest.raises(KeyError, match="GPT-NeoX has no hook point 'hook_resid_mid'"):
        m.jp(clean, overrides={"blocks.0.hook_resid_mid": 0.0})
    with pytest.raises(KeyError):
        s.jp_cache["clean"]["blocks.0.hook_resid_mid"]
    # TransformerLens has no such hook on its parallel blocks either
    assert "blocks.0.hook_resid_mid" not in s.tl_cache["clean"]


# --- TransformerLens's patching functions ------------------------------------------------------


@pytest.fixture(scope="module")
def tl_results(family, setups):
    """TransformerLens's own patching functions, once per (rotary_pct, name, direction)."""
    memo = {}

    def get(name, direction, rotary_pct=MAIN):
        key = rotary_pct, name, direction
        if key not in memo:
            m, s = family(rotary_pct), setups(rotary_pct)
            tokens, cache = roles(s, direction)
            with torch.no_grad():
                memo[key] = getattr(tl_patching, f"get_act_patch_{name}")(
                    m.tl, torch.tensor(tokens), cache, s.tl_metric).double().numpy()
        return memo[key]

    return get


def test_transformer_lens_functions_are_all_here():
    tl_names = {n[len("get_act_patch_"):] for n in dir(tl_patching) if n.startswith("get_act_patch_")}
    assert tl_names == set(TL_NAMES) | {"resid_mid"}


@pytest.mark.parametrize("direction", ["denoise", "noise"])
@pytest.mark.parametrize("name", TL_NAMES)
def test_get_act_patch_matches_transformer_lens(family, setups, tl_results, name, direction):
    m, s = family(), setups()
    expected = tl_results(name, direction)
    assert_nontrivial(expected, f"TransformerLens {name} {direction}")
    tokens, cache = roles(s, direction, tl=False)
    got = getattr(patching, f"get_act_patch_{name}")(m.jp, tokens, cache, s.jp_callable, progress=False)
    assert_close(got, expected, what=f"{name} {direction}")


@pytest.mark.parametrize("rotary_pct", [0.25])
@pytest.mark.parametrize("name", ["attn_head_k_by_pos"])
def test_get_act_patch_other_rotary_dims(family, setups, tl_results, name, rotary_pct):
    m, s = family(rotary_pct), setups(rotary_pct)
    expected = tl_results(name, "denoise", rotary_pct)
    assert_nontrivial(expected, f"TransformerLens {name}")
    got = getattr(patching, f"get_act_patch_{name}")(m.jp, s.corrupted, s.jp_cache["clean"], s.jp_callable,
                                                     progress=False)
    assert_close(got, expected, what=f"rotary_pct {rotary_pct} {name}")


@pytest.mark.parametrize("direction", ["denoise", "noise"])
@pytest.mark.parametrize("name", ["resid_pre", "attn_head_k_by_pos"])
def test_get_act_patch_with_a_jpatch_metric(family, setups, tl_results, name, direction):
    """jpatch's Metric takes the cache's run as 1 and the tokens' run as 0: denoising that is
    TransformerLens's clean-anchored value, noising 1 minus it."""
    m, s = family(), setups()
    tokens, cache = roles(s, direction, tl=False)
    got = getattr(patching, f"get_act_patch_{name}")(m.jp, tokens, cache, s.jp_metric, progress=False)
    expected = tl_results(name, direction)
    assert_close(got, expected if direction == "denoise" else 1 - expected, what=f"{name} {direction}")


# --- sweep vs TransformerLens hooks -------------------------------------------------------------


def tl_hook(index, source):
    def hook(act, hook):
        act = act.clone()
        act[index] = source[index]
        return act

    return hook


@pytest.fixture(scope="module")
def hook_ld(family, setups):
    """Per-prompt logit differences of TransformerLens runs patched one grid point at a time
    (the sweep's default axes), by brute force: {(site, direction): [*grid, B]}."""
    memo = {}

    def get(site, direction):
        if (site, direction) not in memo:
            m, s = family(), setups()
            tokens, cache = roles(s, direction)
            grid = (L, H, T) if site == "attn.hook_pattern" else (L, T, H) if site.startswith("attn.") else (L, T)
            out = np.zeros(grid + (B,))
            for point in np.ndindex(grid):
                name = f"blocks.{point[0]}.{site}"
                hooks = [(name, tl_hook(HOOK_INDEX[site](*point[1:]), cache[name]))]
                with torch.no_grad():
                    logits = m.tl.run_with_hooks(torch.tensor(tokens), fwd_hooks=hooks)[:, -1].double().numpy()
                out[point] = hand_ld(logits, s.answers, s.contrasts)
            memo[site, direction] = out
        return memo[site, direction]

    return get


@pytest.mark.parametrize("direction", ["denoise", "noise"])
@pytest.mark.parametrize("site", SWEEP_SITES)
def test_sweep_matches_transformer_lens_hooks(family, setups, hook_ld, site, direction):
    """The TransformerLens-style callable (normalized by the clean and corrupted means, so the same
    numbers in both directions) at every site; per prompt (each normalized by its own clean and
    corrupted runs) with jpatch's Metric, which knows which run is clean, at four of them."""
    m, s = family(), setups()
    ld = hook_ld(site, direction)
    expected = (ld.mean(-1) - s.CO) / (s.CL - s.CO)
    assert_nontrivial(expected, f"{site} {direction}")
    got = patching.sweep(m.jp, s.clean, s.corrupted, site, metrics.from_callable(s.jp_callable), direction=direction,
                         progress=False)
    assert_close(got, expected, what=f"{site} {direction} callable")
    if site in PER_PROMPT_SITES:
        expected = np.moveaxis((ld - s.ld_corr) / (s.ld_clean - s.ld_corr), -1, 0)
        got = patching.sweep(m.jp, s.clean, s.corrupted, site, s.jp_metric, direction=direction, per_prompt=True,
                             progress=False)
        assert_close(got, expected, what=f"{site} {direction} per prompt")


@pytest.mark.parametrize("site", ["attn.hook_k"])
def test_sweep_shortcuts_change_nothing(family, setups, hook_ld, site):
    """skip_layers / skip_positions (recompute only the layers and rows a patch reaches; rotary
    needs each recomputed row's own position), with a plain callable as the metric."""
    m, s = family(), setups()
    expected = (hook_ld(site, "denoise").mean(-1) - s.CO) / (s.CL - s.CO)
    for skip_layers in (True, False):
        for skip_positions in (True, False):
            got = patching.sweep(m.jp, s.clean, s.corrupted, site, metrics.from_callable(s.jp_callable),
                                 skip_layers=skip_layers, skip_positions=skip_positions, progress=False)
            assert_close(got, expected, what=f"{site} skip_layers={skip_layers} skip_positions={skip_positions}")


@pytest.mark.parametrize("site", PER_PROMPT_SITES)
def test_no_op_patches_score_exactly_the_base_run(family, setups, site):
    """Before the first changed position the clean and corrupted runs are the same (causal
    attention): a patch there changes nothing, so it must score exactly the run patched into,
    normalized exactly 0 denoising (the corrupted run) and exactly 1 noising (the clean run)."""
    m, s = family(), setups()
    first = CHANGED[0]
    ans, con, rows = jnp.asarray(s.answers), jnp.asarray(s.contrasts), jnp.arange(B)
    per_prompt_ld = metrics.from_callable(lambda logits: logits[rows, -1, ans] - logits[rows, -1, con],
                                          normalize="range")
    cases = [(s.jp_metric, True), (s.jp_metric, False)] + [(per_prompt_ld, False)] * (site == "hook_resid_pre")
    for metric, per_prompt in cases:
        for direction, base in (("denoise", 0.0), ("noise", 1.0)):
            got = np.asarray(patching.sweep(m.jp, s.clean, s.corrupted, site, metric, direction=direction,
                                            per_prompt=per_prompt, progress=False))
            pos_axis = got.ndim - (2 if site in ("attn.hook_k", "attn.hook_z") else 1)
            before = np.take(got, np.arange(first), axis=pos_axis)
            assert (before == base).all(), (f"{site} {direction} {metric.name}: "
                                            f"max |no-op - {base}| {np.abs(before - base).max():.3g}")
            assert np.abs(np.take(got, np.arange(first, T), axis=pos_axis) - base).max() > 1e-3


def test_no_op_patches_with_a_scalar_callable_score_exactly_zero(family, setups):
    m, s = family(), setups()
    got = np.asarray(patching.sweep(m.jp, s.clean, s.corrupted, "resid_pre",
                                    metrics.from_callable(s.jp_callable, normalize="range"), progress=False))
    assert (got[:, :CHANGED[0]] == 0).all(), f"max |no-op| {np.abs(got[:, :CHANGED[0]]).max():.3g}"


def test_right_padded_prompts_match_transformer_lens_prompt_by_prompt(family):
    """Keys patched by (layer, pos, head) in prompts of different lengths, right-padded: each
    prompt as TransformerLens runs it alone (raw logit differences), NaN past its end."""
    m = family()
    lengths = (10, 6, 8)
    rng = np.random.default_rng(7)
    prompts = [rng.integers(0, V - 1, n) for n in lengths]
    clean = np.full((3, T), V - 1)
    mask = np.zeros((3, T), int)
    for b, p in enumerate(prompts):
        clean[b, :len(p)], mask[b, :len(p)] = p, 1
    corrupted = clean.copy()
    corrupted[:, 2] = (clean[:, 2] + 29) % (V - 1)
    answers, contrasts = np.array([3, 50, 70]), np.array([7, 60, 9])
    metric = metrics.logit_diff(answers, contrasts, normalize=False)  # LD_patched - LD_corrupted
    got = patching.sweep(m.jp, clean, corrupted, "k", metric, attention_mask=mask, per_prompt=True, progress=False)
    for b, n in enumerate(lengths):
        base, source = torch.tensor(corrupted[b:b + 1, :n]), torch.tensor(clean[b:b + 1, :n])
        with torch.no_grad():
            _, cache = m.tl.run_with_cache(source)
            ld = lambda logits: float(logits[0, -1, answers[b]] - logits[0, -1, contrasts[b]])
            corrupted_ld = ld(m.tl(base))
            expected = np.zeros((L, n, H))
            for layer, pos, head in np.ndindex(expected.shape):
                name = f"blocks.{layer}.attn.hook_k"
                logits = m.tl.run_with_hooks(base, fwd_hooks=[(name, tl_hook((slice(None), pos, head), cache[name]))])
                expected[layer, pos, head] = ld(logits) - corrupted_ld
        assert_nontrivial(expected, f"prompt {b}")
        assert_close(got[b][:, :n], expected, what=f"prompt {b} ({n} tokens)")
        assert np.isnan(got[b][:, n:]).all()


# --- attribution vs torch autograd ------------------------------------------------------------

ATTR_SITES = ("hook_resid_pre", "hook_attn_out", "hook_mlp_out", "hook_resid_post", "attn.hook_q", "attn.hook_k",
              "attn.hook_v", "attn.hook_z", "attn.hook_pattern")


def torch_run(tl, tokens, answers, contrasts, *, edits=None, drop_layer=None, grad=True):
    """TransformerLens forward with torch autograd: per-prompt last-position logit differences,
    every site's activations [L, ...] and (grad) the gradients of their sum. edits: {hook name:
    fn(act) -> act}; drop_layer: that layer's attention and MLP outputs cut from the backward pass."""
    store = {}

    def hook(act, hook):
        if hook.name in (edits or {}):
            act = edits[hook.name](act, hook)
        if drop_layer is not None and hook.name in (f"blocks.{drop_layer}.hook_attn_out",
                                                    f"blocks.{drop_layer}.hook_mlp_out"):
            act = act.detach()
        if act.requires_grad:
            act.retain_grad()
        store[hook.name] = act
        return act

    names = [f"blocks.{l}.{s}" for l in range(L) for s in ATTR_SITES]
    with torch.enable_grad():
        tl.zero_grad()
        logits = tl.run_with_hooks(torch.tensor(tokens), fwd_hooks=[(n, hook) for n in names])
        rows = torch.arange(len(answers))
        ld = logits[rows, -1, torch.tensor(answers)] - logits[rows, -1, torch.tensor(contrasts)]
        if grad:
            ld.sum().backward()
    value = lambda t: t.detach().double().numpy()
    gradient = lambda t: np.zeros(t.shape) if t.grad is None else t.grad.double().numpy()
    acts = {s: np.stack([value(store[f"blocks.{l}.{s}"]) for l in range(L)]) for s in ATTR_SITES}
    grads = {s: np.stack([gradient(store[f"blocks.{l}.{s}"]) for l in range(L)]) for s in ATTR_SITES} if grad else None
    return ld.detach().double().numpy(), acts, grads


@pytest.fixture(scope="module")
def torch_runs(family, setups):
    m, s = family(), setups()
    runs = {name: torch_run(m.tl, getattr(s, name), s.answers, s.contrasts) for name in ("clean", "corrupted")}
    np.testing.assert_allclose(runs["clean"][0], s.ld_clean, atol=1e-5)
    return runs


def atp_delta(runs, site, direction):
    """(source - base) . gradient on the base run, summed over the feature axis (not for the pattern)."""
    base, source = ("corrupted", "clean") if direction == "denoise" else ("clean", "corrupted")
    prod = (runs[source][1][site] - runs[base][1][site]) * runs[base][2][site]
    return prod if site == "attn.hook_pattern" else prod.sum(-1)  # [L, B, T(, H)] or [L, B, H, Tq, Tk]


@pytest.mark.parametrize("site", ATTR_SITES)
def test_atp_matches_torch(family, setups, torch_runs, site):
    m, s = family(), setups()
    delta = atp_delta(torch_runs, site, "denoise")
    gap = s.ld_clean - s.ld_corr
    per_prompt = np.moveaxis(delta.sum(-1) if site == "attn.hook_pattern" else delta, 1, 0)  # [B, default grid]
    expected = per_prompt / gap.reshape((B,) + (1,) * (per_prompt.ndim - 1))
    assert_nontrivial(expected, site)
    got = attribution.attribute(m.jp, s.clean, s.corrupted, site, s.jp_metric, per_prompt=True)
    assert_close(got, expected, what=f"{site} per prompt")
    if site not in ("hook_resid_pre", "attn.hook_z", "attn.hook_pattern"):
        return  # (one compile per site and axes: the sum over positions at three sites)
    # mean over prompts, every position at once
    axes = ("layer", "head") if site.startswith("attn.") else ("layer",)
    summed = delta.sum((3, 4)) if site == "attn.hook_pattern" else delta.sum(2)  # [L, B(, H)]
    got = attribution.attribute(m.jp, s.clean, s.corrupted, site, s.jp_metric, axes=axes)
    assert_close(got, summed.mean(1) / gap.mean(), what=f"{site} {axes}")


@pytest.mark.parametrize("site", ["attn.hook_k"])
def test_atp_noising_matches_torch(family, setups, torch_runs, site):
    m, s = family(), setups()
    delta = atp_delta(torch_runs, site, "noise")  # [L, B, T(, H)]
    expected = (s.ld_clean + np.moveaxis(delta, 1, -1)).mean(-1)
    expected = (expected - s.ld_corr.mean()) / (s.ld_clean - s.ld_corr).mean()
    got = attribution.attribute(m.jp, s.clean, s.corrupted, site, s.jp_metric, direction="noise")
    assert_close(got, expected, what=f"{site} noising")


def qk_fix_reference(m, s, site, grad_pattern):
    """sum (A' - A) . grad_pattern, A' the corrupted run's pattern with one (layer, pos, head) of
    q / k (before rotary, as jpatch's site) set to the clean run's: [B, L, T, H]."""
    base = torch_run(m.tl, s.corrupted, s.answers, s.contrasts, grad=False)[1]["attn.hook_pattern"]
    source = s.tl_cache["clean"]
    out = np.zeros((B, L, T, H))
    for layer, pos, head in np.ndindex(L, T, H):
        name = f"blocks.{layer}.{site}"
        edit = {name: tl_hook((slice(None), pos, head), source[name].to(torch.float32))}
        patched = torch_run(m.tl, s.corrupted, s.answers, s.contrasts, edits=edit, grad=False)[1]
        change = patched["attn.hook_pattern"][layer] - base[layer]  # [B, H, Tq, Tk]
        out[:, layer, pos, head] = (change * grad_pattern[layer]).sum((1, 2, 3))
    return out


@pytest.mark.parametrize("site", ["attn.hook_q", "attn.hook_k"])
def test_atp_qk_fix_is_the_exact_pattern_change(family, setups, torch_runs, site):
    m, s = family(), setups()
    gap = s.ld_clean - s.ld_corr
    got = attribution.attribute(m.jp, s.clean, s.corrupted, site, s.jp_metric, method="atp-qk", per_prompt=True)
    expected = qk_fix_reference(m, s, site, torch_runs["corrupted"][2]["attn.hook_pattern"])
    assert_close(got, expected / gap[:, None, None, None], what=f"{site} QK fix")
    plain = attribution.attribute(m.jp, s.clean, s.corrupted, site, s.jp_metric, per_prompt=True)
    assert np.abs(np.asarray(plain) - np.asarray(got)).max() > 1e-4  # the test tells the two apart


@pytest.mark.parametrize("site", ["attn.hook_z", "attn.hook_k"])
def test_graddrop_matches_torch(family, setups, torch_runs, site):
    """AtP*: (1/(L-1)) sum_l |estimate with layer l's attention and MLP outputs cut from the backward pass|."""
    m, s = family(), setups()
    gap = s.ld_clean - s.ld_corr
    got = attribution.attribute(m.jp, s.clean, s.corrupted, site, s.jp_metric, method="atp*", per_prompt=True)
    sizes = np.zeros((B, L, T, H))
    for drop in range(L):
        _, acts, grads = torch_run(m.tl, s.corrupted, s.answers, s.contrasts, drop_layer=drop)
        if site == "attn.hook_z":
            est = np.moveaxis(((torch_runs["clean"][1][site] - acts[site]) * grads[site]).sum(-1), 1, 0)
        else:
            est = qk_fix_reference(m, s, site, grads["attn.hook_pattern"])
        sizes += np.abs(est)
    sizes /= L - 1
    assert_close(got, sizes / np.abs(gap)[:, None, None, None], what=f"{site} GradDrop")
    assert (np.asarray(got) >= 0).all()
