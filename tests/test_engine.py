"""The engine's economies against TransformerLens 3.9: callable metrics evaluated only at
the logit positions they read, one compiled program per sweep whatever the memory budget,
base/source caches in prompt chunks, and models deeper than the 12 layer stages
(16 layers: its 16 start layers thinned to 12 stages of one and two layers, so that patches start
inside a stage). References are TransformerLens's patching functions or hooks, with
metrics written by hand in torch."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformer_lens.patching as tl_patching

import reference
from jpatch.engine import execute as engine
from jpatch.engine import plan, reads
from jpatch.engine.inputs import Run
from jpatch.engine.sweep import make_patches
from jpatch.methods import metrics
from jpatch import patching
from jpatch.model.convert import config_from_hf, from_hf_state_dict

TOL = 1e-4
V = reference.TINY["vocab_size"]
STAGE_COMPILE_FLOPS = plan.DEFAULT_STAGE_COMPILE_FLOPS  # jpatch's default (conftest sets 0 for the suite)
B, T = 3, 7

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def close(actual, expected, tol=TOL, what=""):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    err = float(np.abs(actual - expected).max())
    assert err <= tol, f"{what}: max abs error {err:.3g} > {tol}"
    assert np.ptp(expected) > 1e-3, f"{what}: the reference is constant"


def tiny(n_layer, seed):
    hf = reference.hf_model(seed=seed, n_layer=n_layer)
    return reference.tl_model(hf), from_hf_state_dict(reference.hf_state_dict(hf), config_from_hf(hf.config))


@pytest.fixture(scope="module")
def data():
    clean = reference.random_tokens(B, T, V, seed=11)
    corrupted = clean.copy()
    corrupted[:, [1, 3]] = (clean[:, [1, 3]] + 29) % V
    return types.SimpleNamespace(clean=clean, corrupted=corrupted, answers=np.array([3, 50, 100]),
                                 contrasts=np.array([7, 60, 9]))


def recorded_calls(monkeypatch):
    """The static shape of every engine call: (positions read, reads all?)."""
    calls = []
    run_layout = engine.run_layout

    def recording(model, base, source, slots, rows, metric_inputs, **kwargs):
        calls.append((metric_inputs.read_pos.shape[1], kwargs["read_all"]))
        return run_layout(model, base, source, slots, rows, metric_inputs, **kwargs)

    monkeypatch.setattr(engine, "run_layout", recording)
    return calls


# --- which logits a callable metric reads ---------------------------------------------------


def test_callable_reads_the_positions_it_indexes():
    shape = (3, 7, 11)
    rows, a, c = jnp.arange(3), jnp.array([1, 2, 3]), jnp.array([4, 5, 6])
    last = np.zeros((3, 7), bool)
    last[:, -1] = True
    diag = np.zeros((3, 7), bool)
    diag[[0, 1, 2], [1, 2, 3]] = True
    cases = {  # callable -> the positions it reads, by hand (None: every position / cannot tell)
        "TransformerLens mean LD": (lambda l: (l[rows, -1, a] - l[rows, -1, c]).mean(), last),
        "slices": (lambda l: l[:, -1, 2] - l[:, -1, 3], last),
        "log_softmax": (lambda l: jax.nn.log_softmax(l[:, -1])[:, 3], last),
        "take_along_axis": (lambda l: jnp.take_along_axis(l[:, -1], a[:, None], 1)[:, 0], last),
        "one position per prompt": (lambda l: l[rows, jnp.array([1, 2, 3])].sum(-1), diag),
        "a where": (lambda l: jnp.where(l[:, -1, 0] > 0, l[:, 2, 1], 0.0), last | (np.arange(7) == 2)),
        "strided": (lambda l: l[:, ::3, 0].sum(-1), np.broadcast_to(np.arange(7) % 3 == 0, (3, 7))),
        "every position": (lambda l: l.mean((1, 2)), None),
        "index from the logits": (lambda l: l[:, jnp.argmax(l[0, -1]) % 7, 0], None),
        "masked by a product": (lambda l: (l * jnp.zeros(shape).at[:, -1].set(1)).sum((1, 2)), None),
    }
    for name, (fn, expected) in cases.items():
        got = metrics.callable_reads(fn, shape)
        if expected is None:
            assert got is None, name
        else:
            assert got is not None and (got == expected).all(), f"{name}: {got}"


def test_callable_reads_the_columns_it_indexes():
    shape = (3, 7, 11)
    rows, a, c = jnp.arange(3), jnp.array([1, 2, 3]), jnp.array([4, 5, 3])
    ids = lambda *i: np.isin(np.arange(11), i)
    cases = {  # callable -> the vocabulary ids it reads, by hand (None: every id / cannot tell)
        "TransformerLens mean LD": (lambda l: (l[rows, -1, a] - l[rows, -1, c]).mean(), ids(1, 2, 3, 4, 5)),
        "slices, a negative id": (lambda l: l[:, -1, 2] - l[:, 0, -1], ids(2, 10)),
        "a range of ids": (lambda l: l[:, -1, 4:7].sum(-1), ids(4, 5, 6)),
        "take_along_axis": (lambda l: jnp.take_along_axis(l[:, -1], a[:, None], 1)[:, 0], ids(1, 2, 3)),
        "log_softmax": (lambda l: jax.nn.log_softmax(l[:, -1])[:, 3], None),
        "a max over the vocabulary": (lambda l: l[:, -1].max(-1) - l[:, -1, 0], None),
        "an id from the logits": (lambda l: l[:, -1, jnp.argmax(l[0, -1])], None),
    }
    for name, (fn, expected) in cases.items():
        got = reads.read_logits(fn, shape)[1]
        if expected is None:
            assert got is None, name
        else:
            assert got is not None and (got == expected).all(), f"{name}: {np.flatnonzero(got)}"


def test_vocab_keys_must_name_token_ids_in_the_data():
    score = lambda logits, clean_logits, data: logits[:, -1, 0]
    for keys, data in ((("answer",), {}), ("answer", {"answer": np.arange(3)}),
                       (("answer",), {"answer": np.array([0.5, 1.0, 2.0])})):
        with pytest.raises(ValueError, match="vocab_keys"):
            metrics.Metric("mine", score, data, vocab_keys=keys)


def test_only_the_vocabulary_ids_a_metric_reads_are_unembedded(jp_tiny, tl_tiny, data, monkeypatch):
    """A logit difference (Metric or callable) is fed the logits of its ids only, padded to a power of
    two: the same numbers as TransformerLens computing every logit, for ids given by arrays and by a
    negative index; a callable summing over the vocabulary reads every id (nothing narrowed)."""
    rows, a, c = np.arange(B), data.answers, data.contrasts
    cases = [  # (metric on [B, T, V] logits, in numpy or torch, ids the engine unembeds: None for all)
        (lambda l: (l[rows, -1, a] - l[rows, -1, c]).mean(), 8),
        (lambda l: (l[:, -1, -1] - l[:, -1, 5]).mean(), 8),
        (lambda l: (l[:, -1] - l[:, -1, :1]).sum(-1).mean(), None),
    ]
    _, cache = jp_tiny.run_with_cache(data.clean)
    with torch.no_grad():
        _, tl_cache = tl_tiny.run_with_cache(torch.tensor(data.clean))
    score_rows = engine.score_rows
    for i, (fn, n_ids) in enumerate(cases + [("Metric", 8)]):
        seen = []
        monkeypatch.setattr(engine, "score_rows", lambda model, resid, inputs, **kw: seen.append(
            inputs.data.get("columns")) or score_rows(model, resid, inputs, **kw))
        if fn == "Metric":
            metric, tl_fn = metrics.logit_diff(a, c, normalize=False), lambda l: (l[rows, -1, a] - l[rows, -1, c]).mean()
            got = patching.get_act_patch_resid_pre(jp_tiny, data.corrupted, cache, metric, progress=False).patched
            # (the mean over prompts of the raw logit differences)
        else:
            metric, tl_fn = fn, lambda l: fn(l.double())
            got = patching.get_act_patch_resid_pre(jp_tiny, data.corrupted, cache, metric, progress=False)
        expected = tl_patching.get_act_patch_resid_pre(tl_tiny, torch.tensor(data.corrupted), tl_cache, tl_fn).numpy()
        close(got, expected, what=f"case {i}")
        assert seen and all((s is None) if n_ids is None else s.shape == (B, n_ids) for s in seen), (i, seen)
        monkeypatch.undo()


@pytest.fixture(scope="module")
def tl_baseline(tl_tiny, data):
    with torch.no_grad():
        clean = tl_tiny(torch.tensor(data.clean)).double()
        corrupted = tl_tiny(torch.tensor(data.corrupted)).double()
    return clean, corrupted


def test_callables_are_exact_where_narrowed_or_not(jp_tiny, tl_tiny, data, monkeypatch):
    """Callables reading one position, two positions, or a position chosen by the logits:
    the same numbers as TransformerLens with the same metric in torch, and the engine
    unembeds 1, 2 and every position."""
    rows, a, c = np.arange(B), data.answers, data.contrasts
    ld = lambda l, p: l[rows, p, a] - l[rows, p, c]
    cases = [  # (numpy/torch metric on [B, T, V] logits -> [B] or scalar, positions the engine reads)
        (lambda l: ld(l, -1).mean(), 1),
        (lambda l: ld(l, -1) + 0.5 * l[rows, 2, a], 2),
        (lambda l: l[rows, (l[:, 0, 0] > 0).long() * 3 if isinstance(l, torch.Tensor) else (l[:, 0, 0] > 0) * 3, a], None),
    ]
    _, cache = jp_tiny.run_with_cache(data.clean)
    with torch.no_grad():
        _, tl_cache = tl_tiny.run_with_cache(torch.tensor(data.clean))
    for i, (fn, reads) in enumerate(cases):
        calls = recorded_calls(monkeypatch)
        expected = tl_patching.get_act_patch_resid_pre(tl_tiny, torch.tensor(data.corrupted), tl_cache,
                                                       lambda l: fn(l.double()).mean()).numpy()
        got = patching.get_act_patch_resid_pre(jp_tiny, data.corrupted, cache, lambda l: fn(l).mean(), progress=False)
        close(got, expected, what=f"case {i}")
        assert calls and all(c == ((reads, False) if reads else (1, True)) for c in calls), (i, calls)  # (1, True): all
        monkeypatch.undo()
    # a per-prompt callable in `sweep`, per prompt: the same as the Metric it spells out
    every = patching.sweep(jp_tiny, data.clean, data.corrupted, "z", metrics.from_callable(
        lambda l: ld(l, -1), normalize="range"), per_prompt=True, progress=False)
    metric = patching.sweep(jp_tiny, data.clean, data.corrupted, "z", metrics.logit_diff(a, c), per_prompt=True,
                            progress=False)
    close(every, metric, tol=1e-5, what="per-prompt callable vs Metric")


# --- one program per sweep, caches in chunks -------------------------------------------------


def test_any_memory_budget_compiles_one_engine_program(jp_tiny, tl_tiny, data, monkeypatch):
    """Budgets from "everything at once" down to one patch of one prompt per call: one
    new engine program each (the groups share one padded layout), the same numbers."""
    rows, a, c = torch.arange(B), torch.tensor(data.answers), torch.tensor(data.contrasts)
    ld = lambda l: (l[rows, -1, a] - l[rows, -1, c]).double().mean()
    with torch.no_grad():
        _, tl_cache = tl_tiny.run_with_cache(torch.tensor(data.clean))
        corrupted_ld = ld(tl_tiny(torch.tensor(data.corrupted)))
        expected = tl_patching.get_act_patch_attn_head_out_by_pos(
            tl_tiny, torch.tensor(data.corrupted), tl_cache, lambda l: ld(l) - corrupted_ld).numpy()
    metric = metrics.logit_diff(data.answers, data.contrasts, normalize=False)  # LD_pt - LD_*
    patches, _ = make_patches(jp_tiny.config, "attn.hook_z", ("layer", "pos", "head"), T, B)
    full = plan.bytes_per_prompt(jp_tiny.config, plan.plan_layout(patches, 2, T), 1, V)
    program = engine.run_layout
    for budget in (1 << 34, full // 2, full // 7, 1):
        calls = recorded_calls(monkeypatch)
        before = program._cache_size()
        got = patching.sweep(jp_tiny, data.clean, data.corrupted, "z", metric, memory_budget=budget, progress=False)
        assert program._cache_size() - before <= 1, f"budget {budget}: several programs"
        close(got, expected, what=f"budget {budget}")
        if budget == 1:
            assert len(calls) >= len(patches) * B // 2, calls  # many groups and chunks, still one program
        monkeypatch.undo()


def test_caches_in_prompt_chunks_equal_the_whole_batch(jp_tiny, data):
    tokens = reference.random_tokens(5, T, V, seed=3)
    noise = jax.random.normal(jax.random.PRNGKey(0), (5, T, jp_tiny.config.d_model))
    from jpatch.model.gpt2 import Override

    overrides = {"hook_embed": Override(jp_tiny.wte[tokens] + noise, jnp.ones((5, T, 1), bool))}
    keep = engine.BASE_SITES + ("attn.hook_pattern",)
    _, whole = jp_tiny.run_with_cache(tokens, overrides=overrides)
    for budget in (1, 150_000):  # one prompt per chunk; two per chunk (the last overlapping)
        read = np.array([[T - 1], [2], [T - 1], [0], [5]])
        got, logits = engine.cached_run(jp_tiny, Run(tokens, overrides), keep, budget, read=read)
        np.testing.assert_allclose(logits, jp_tiny(tokens, overrides=overrides, logits_at=read), atol=1e-5,
                                   err_msg=f"logits, budget {budget}")
        for site in keep:
            want = whole.stacked("hook_resid_post")[-1] if site == "final" else whole.stacked(site)
            assert got[site].shape == want.shape, site
            np.testing.assert_allclose(got[site], want, atol=1e-5, err_msg=f"{site} budget {budget}")


def test_default_memory_budget_is_a_share_of_free_memory(monkeypatch):
    budget = plan.default_memory_budget()
    with open("/proc/meminfo") as f:
        available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    assert 0.1 * available < budget < 0.3 * available and budget & (budget - 1) == 0
    # A quarter, rounded down to a power of two: free memory that moves a little gives one budget.
    for free, expected in ((21.0e9, 4 << 30), (17.2e9, 4 << 30), (34.4e9, 8 << 30), (16.0e9, 2 << 30), (1e6, 64 << 20)):
        monkeypatch.setattr(plan, "_available_ram", lambda: int(free))
        assert plan.default_memory_budget() == expected, free


@pytest.mark.parametrize("value, expected", [("0", 0.0), ("2.5e9", 2.5e9), ("-1", None), ("many", None), ("inf", None)])
def test_stage_compile_flops_setting(monkeypatch, value, expected):
    monkeypatch.setenv("JPATCH_STAGE_COMPILE_FLOPS", value)
    if expected is None:
        with pytest.raises(ValueError, match="JPATCH_STAGE_COMPILE_FLOPS must be a number of FLOPs >= 0"):
            plan._stage_compile_flops()
    else:
        assert plan._stage_compile_flops() == expected
    monkeypatch.delenv("JPATCH_STAGE_COMPILE_FLOPS")
    assert plan._stage_compile_flops() == plan.DEFAULT_STAGE_COMPILE_FLOPS


@pytest.mark.parametrize("merge_below, starts", [(0, [0, 1, 2, 3]), (5, [0, 2, 3]), (25, [0, 3]), (1000, [0])])
def test_cheap_stages_merge_cheapest_first(merge_below, starts):
    """One patch per layer recomputing 10, 1, 10 and 100 rows (positions 90, 99, 90, 0 of 100).
    By hand: dropping the boundary at layer 1 adds 1 x 1 row-layers, at 2: 10 x 1, at 3:
    100 x 1; after the first drop, layer 2's costs 10 x 2 = 20, then layer 3's 100 x 3."""
    patches = plan.Patches("hook_resid_pre", np.arange(4), np.arange(1, 5), np.array([90, 99, 90, 0]),
                           np.full(4, -1), np.full(4, -1))
    layout = plan.plan_layout(patches, 4, 100, merge_below=merge_below)
    assert [s.first_layer for s in layout.stages] == starts


# --- deeper than the 12 layer stages ---------------------------------------------------------


@pytest.fixture(scope="module", params=[16])
def deep(request, data):
    tl, jp = tiny(request.param, seed=request.param)
    with torch.no_grad():
        clean_logits, tl_cache = tl.run_with_cache(torch.tensor(data.clean))
        corr_logits = tl(torch.tensor(data.corrupted))
    # answer / contrast: the tokens whose last logit the corruption moves most, up and down
    gap = (clean_logits[:, -1] - corr_logits[:, -1]).double()
    a, c, rows = gap.argmax(-1), gap.argmin(-1), torch.arange(B)
    ld = lambda l: (l[rows, -1, a] - l[rows, -1, c]).double().mean()
    CL, CO = float(ld(clean_logits)), float(ld(corr_logits))
    assert CL - CO > 0.1
    return types.SimpleNamespace(L=request.param, tl=tl, jp=jp, tl_cache=tl_cache, ld=ld, CL=CL, CO=CO,
                                 metric=metrics.logit_diff(a.numpy(), c.numpy()),
                                 jp_cache=jp.run_with_cache(data.clean)[1])


# The stages a deep model is planned into do not depend on the site: one residual and one per-head
# site cover them (attn_out's own sweep is checked on the shallow models).
@pytest.mark.parametrize("name, merged", [("resid_pre", False), ("attn_head_out_all_pos", False),
                                          ("resid_pre", True), ("attn_head_out_all_pos", True)])
def test_deep_models_match_transformer_lens(deep, data, name, merged, monkeypatch):
    """merged: with the engine's real STAGE_COMPILE_FLOPS, which on a tiny model merges the
    layer stages (recomputing its layers costs less than compiling them)."""
    if merged:
        monkeypatch.setattr(plan, "STAGE_COMPILE_FLOPS", STAGE_COMPILE_FLOPS)
        patches, _ = make_patches(deep.jp.config, "hook_resid_pre", ("layer", "pos"), data.clean.shape[1], B)
        layout = plan.plan_layout(patches, deep.L, data.clean.shape[1], merge_below=plan.cheap_row_layers(deep.jp.config, B))
        assert len(layout.stages) < 12
    tl_metric = lambda l: (deep.ld(l) - deep.CO) / (deep.CL - deep.CO)
    with torch.no_grad():
        expected = getattr(tl_patching, f"get_act_patch_{name}")(
            deep.tl, torch.tensor(data.corrupted), deep.tl_cache, tl_metric).numpy()
    got = getattr(patching, f"get_act_patch_{name}")(deep.jp, data.corrupted, deep.jp_cache, deep.metric,
                                                     progress=False)
    close(got, expected, what=f"{deep.L} layers {name}")


def test_deep_models_windows_match_transformer_lens_hooks(deep, data):
    window, L = 5, deep.L
    expected = np.zeros((L, T))
    for layer in range(L):
        lo, hi = max(layer - window // 2, 0), min(layer - window // 2 + window, L)
        for pos in range(T):
            def hook(act, hook, pos=pos):
                act = act.clone()
                act[:, pos] = deep.tl_cache[hook.name][:, pos]
                return act

            with torch.no_grad():
                logits = deep.tl.run_with_hooks(torch.tensor(data.corrupted),
                                                fwd_hooks=[(f"blocks.{j}.hook_mlp_out", hook) for j in range(lo, hi)])
            expected[layer, pos] = (float(deep.ld(logits)) - deep.CO) / (deep.CL - deep.CO)
    got = patching.sweep(deep.jp, data.clean, data.corrupted, "mlp_out", deep.metric, window=window, progress=False)
    close(got, expected, what=f"{L} layers, window {window}")


# --- attention on the recomputed rows only ----------------------------------------------------


@pytest.mark.parametrize("window, score_elements", [(64, 1 << 24), (3, 1 << 24), (4, 600), (1, 1)])
@pytest.mark.parametrize("starts", [[4, 0, 9, 10, 6, 4], [4, 9, 10, 6, 4, 7]])
def test_rows_attention_equals_each_patch_attended_alone(starts, window, score_elements, monkeypatch):
    """Patches starting at different positions, packed as rows that cross the attention
    windows and steps (windows shorter than the span, several steps, one row a step): each
    row's output equals torch's causal attention over that patch's own sequence (the cached
    keys/values before its start, its own rows from there on)."""
    monkeypatch.setattr(plan, "OWN_WINDOW", window)
    monkeypatch.setattr(plan, "SCORE_ELEMENTS", score_elements)
    rng = np.random.default_rng(0)
    Bq, Tq, H, dh = 2, 11, 3, 5
    starts = np.array(starts)
    patches = plan.Patches("hook_resid_pre", np.zeros(6, int), np.ones(6, int), starts, np.full(6, -1),
                           np.full(6, -1))
    layout = plan.plan_layout(patches, 1, Tq)
    (stage,) = layout.stages
    assert stage.span == Tq - starts.min() and stage.n_rows == (Tq - starts).sum()
    R = stage.n_rows
    q, k, v = (rng.normal(size=(Bq, R, H, dh)).astype(np.float32) for _ in range(3))
    k_cached, v_cached = (rng.normal(size=(Bq, Tq, H, dh)).astype(np.float32) for _ in range(2))
    got = np.asarray(engine.rows_attention(q, k, v, k_cached, v_cached, jnp.asarray(layout.row_pos),
                                           jnp.asarray(layout.row_start), stage.span, lambda p, *_: p))
    for slot in range(1, len(layout.order)):
        rows = np.flatnonzero(layout.row_patch == slot)
        s = starts[layout.order[slot]]
        seq = lambda own, cached: torch.tensor(np.concatenate([cached[:, :s], own[:, rows]], 1)).transpose(1, 2)
        full = torch.nn.functional.scaled_dot_product_attention(seq(q, k_cached), seq(k, k_cached), seq(v, v_cached),
                                                                is_causal=True).transpose(1, 2).numpy()
        np.testing.assert_allclose(got[:, rows], full[:, s:], atol=1e-5, err_msg=f"patch starting at {s}")


@pytest.fixture(scope="module")
def long_prompts(tl_tiny):
    """Two prompts of 13 tokens (longer than the span blocks of a late patch) and their baselines."""
    clean = reference.random_tokens(2, 13, V, seed=21)
    corrupted = clean.copy()
    corrupted[:, [2, 8]] = (clean[:, [2, 8]] + 31) % V
    with torch.no_grad():
        clean_logits, cache = tl_tiny.run_with_cache(torch.tensor(clean))
        corr_logits = tl_tiny(torch.tensor(corrupted))
    gap = (clean_logits[:, -1] - corr_logits[:, -1]).double()
    a, c, rows = gap.argmax(-1), gap.argmin(-1), torch.arange(2)
    ld = lambda logits: float((logits[rows, -1, a] - logits[rows, -1, c]).double().mean())
    return types.SimpleNamespace(clean=clean, corrupted=corrupted, cache=cache, ld=ld, CL=ld(clean_logits),
                                 CO=ld(corr_logits), metric=metrics.logit_diff(a.numpy(), c.numpy()))


@pytest.mark.parametrize("site,axes,hook_index", [
    ("pattern", ("layer", "pos", "head", "src"), lambda pos, head, src: (slice(None), head, pos, src)),
    ("k", ("layer", "pos", "head"), lambda pos, head: (slice(None), pos, head)),
])
@pytest.mark.parametrize("window, score_elements", [(64, 1 << 24), (3, 400)])
def test_patches_starting_at_different_positions_match_transformer_lens(jp_tiny, tl_tiny, long_prompts, site, axes,
                                                                        hook_index, window, score_elements,
                                                                        monkeypatch):
    """The attention pattern (per query and key position) and the keys patched at positions
    spread over the prompt, so the patches recompute 1 to 11 rows: TransformerLens hooks.
    Also with attention windows shorter than the span, a few rows per step (as at long lengths)."""
    monkeypatch.setattr(plan, "OWN_WINDOW", window)
    monkeypatch.setattr(plan, "SCORE_ELEMENTS", score_elements)
    engine.run_layout.clear_cache()  # the constants are read when the program is traced
    d = long_prompts
    positions, heads = [2, 6, 11, 12], [1, 3]
    name = {"pattern": "attn.hook_pattern", "k": "attn.hook_k"}[site]
    grid = [range(2), positions, heads] + ([range(13)] if site == "pattern" else [])
    expected = np.zeros([len(g) for g in grid])
    for index in np.ndindex(expected.shape):
        layer, *rest = (g[i] for g, i in zip(grid, index))
        hook_name = f"blocks.{layer}.{name}"

        def hook(act, hook, where=hook_index(*rest)):
            act = act.clone()
            act[where] = d.cache[hook_name][where]
            return act

        with torch.no_grad():
            logits = tl_tiny.run_with_hooks(torch.tensor(d.corrupted), fwd_hooks=[(hook_name, hook)])
        expected[index] = (d.ld(logits) - d.CO) / (d.CL - d.CO)
    for skip_positions in (True, False):
        got = patching.sweep(jp_tiny, d.clean, d.corrupted, site, d.metric, axes=axes, positions=positions,
                             heads=heads, skip_positions=skip_positions, progress=False)
        close(got, expected, what=f"{site} skip_positions={skip_positions}")
    engine.run_layout.clear_cache()
