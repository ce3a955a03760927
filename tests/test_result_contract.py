"""One contract for what every method returns (jpatch.engine.aggregate.RESULT_FIELDS): the same
metadata (method, direction, normalization, axes, baselines per prompt and overall) and the same
raw views (`raw` / `patched`: patched scores per prompt / mean, `delta` / `delta_per_prompt`:
patched minus the base run). Expected values come from torch: transformers' GPT-2 with hooks
(tests/torch_attribution.py) and TransformerLens runs with hooks, never from jpatch."""

import numpy as np
import pytest
import torch

import reference
import torch_attribution as ref
from test_attribution import B, H, L, T, assert_close, by_prompt_default_axes, reference_atp, setup  # noqa: F401
from jpatch.engine.aggregate import RESULT_FIELDS
from jpatch.engine.sweep import sweep
from jpatch.methods import attribution, circuits, edges


def carries_the_contract(result, method, direction):
    for name in RESULT_FIELDS:
        assert hasattr(result, name), f"{type(result).__name__} has no {name!r}"
    assert (result.method, result.direction, result.normalization) == (method, direction, "range")


def check_baselines(result, setup):
    assert_close(result.clean_per_prompt, setup.ld_clean, what="clean baseline")
    assert_close(result.corrupted_per_prompt, setup.ld_corr, what="corrupted baseline")
    assert_close(result.clean, setup.ld_clean.mean(), what="clean mean")
    assert_close(result.corrupted, setup.ld_corr.mean(), what="corrupted mean")


def base(setup, direction):
    return setup.ld_corr if direction == "denoise" else setup.ld_clean


def tl_logit_diff(tl, tokens, setup, hooks=()):
    with torch.no_grad():
        logits = tl.run_with_hooks(torch.tensor(tokens), fwd_hooks=list(hooks))[:, -1].double().numpy()
    n = np.arange(len(tokens))
    return logits[n, setup.answers] - logits[n, setup.contrasts]


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_sweep_views_against_transformer_lens(jp_tiny, tl_tiny, setup, direction):
    got = sweep(jp_tiny, setup.clean, setup.corrupted, "resid_pre", setup.metric, direction=direction,
                progress=False)
    carries_the_contract(got, "patching", direction)
    check_baselines(got, setup)
    assert got.axes == ("layer", "pos") and not got.per_prompt
    base_tokens, source_tokens = ((setup.corrupted, setup.clean) if direction == "denoise"
                                  else (setup.clean, setup.corrupted))
    with torch.no_grad():
        _, source_cache = tl_tiny.run_with_cache(torch.tensor(source_tokens))
    for layer, pos in [(0, 1), (1, 4)]:
        name = f"blocks.{layer}.hook_resid_pre"

        def patch(act, hook, pos=pos):
            act[:, pos] = source_cache[hook.name][:, pos]
            return act

        patched = tl_logit_diff(tl_tiny, base_tokens, setup, [(name, patch)])
        assert_close(got.raw[:, layer, pos], patched, what="raw")
        assert_close(got.patched[layer, pos], patched.mean(), what="patched")
        assert_close(got.delta_per_prompt[:, layer, pos], patched - base(setup, direction), what="delta per prompt")
        assert_close(got.delta[layer, pos], (patched - base(setup, direction)).mean(), what="delta")
        gap = setup.ld_clean.mean() - setup.ld_corr.mean()
        assert_close(got[layer, pos], (patched.mean() - setup.ld_corr.mean()) / gap, what="normalized")


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_attribute_views_against_torch(jp_tiny, setup, direction):
    change = by_prompt_default_axes("hook_resid_pre", reference_atp(setup, direction)["hook_resid_pre"])
    got = attribution.attribute(jp_tiny, setup.clean, setup.corrupted, "resid_pre", setup.metric,
                                direction=direction)
    carries_the_contract(got, "atp", direction)
    check_baselines(got, setup)
    start = base(setup, direction)[:, None, None]
    assert_close(got.delta_per_prompt, change, what="delta per prompt")
    assert_close(got.delta, change.mean(0), what="delta")
    assert_close(got.raw, start + change, what="raw")
    assert_close(got.patched, (start + change).mean(0), what="patched")
    per_prompt = attribution.attribute(jp_tiny, setup.clean, setup.corrupted, "resid_pre", setup.metric,
                                       direction=direction, per_prompt=True)
    assert per_prompt.per_prompt and per_prompt.shape == (B, L, T)
    assert_close(per_prompt.delta_per_prompt, change, what="per-prompt result's delta")


def test_atp_star_carries_sizes(jp_tiny, setup):
    got = attribution.attribute(jp_tiny, setup.clean, setup.corrupted, "z", setup.metric, method="atp*")
    carries_the_contract(got, "atp*", "denoise")
    check_baselines(got, setup)
    assert got.axes == ("layer", "pos", "head")
    assert got.raw is None and got.patched is None  # sizes, not signed changes
    assert (got.delta_per_prompt >= 0).all()
    np.testing.assert_allclose(got.delta, got.delta_per_prompt.mean(0), rtol=1e-6)
    gap = setup.ld_clean.mean() - setup.ld_corr.mean()
    np.testing.assert_allclose(np.asarray(got), got.delta / abs(gap), rtol=1e-5, atol=1e-7)


def reference_edge_changes(hf, setup, einsum):
    """EAP's change per edge from torch (the corrupted run's gradients), by `einsum` of writes and readers."""
    _, corrupted, grads = setup.runs["corrupted"]
    readers = ref.reader_input_grads(hf, corrupted, grads)
    change = np.einsum(einsum, ref.writes(hf, corrupted, setup.runs["clean"][1]), readers)
    mask = ref.edge_mask(L, H)
    return np.where(mask[..., None] if change.ndim == 3 and einsum.endswith("t") else mask, change, 0.0)


def test_edges_views_against_torch(hf_tiny, jp_tiny, setup):
    change = reference_edge_changes(hf_tiny, setup, "wbtd,rbtd->bwr")  # [B, writers, readers]
    gap = setup.ld_clean - setup.ld_corr
    got = edges.edge_attribution(jp_tiny, setup.clean, setup.corrupted, setup.metric)
    carries_the_contract(got, "eap", "denoise")
    check_baselines(got, setup)
    assert got.axes == ("writer", "reader")
    assert_close(got.scores, change.mean(0) / gap.mean(), what="scores")
    assert_close(got.delta, change.mean(0), what="delta")
    assert_close(got.delta_per_prompt, change, what="delta per prompt")
    assert_close(got.patched, setup.ld_corr.mean() + change.mean(0), what="patched")
    per_prompt = edges.edge_attribution(jp_tiny, setup.clean, setup.corrupted, setup.metric, per_prompt=True)
    assert per_prompt.per_prompt and per_prompt.scores.shape == (B,) + change.shape[1:]
    assert_close(per_prompt.scores, change / gap[:, None, None], what="per-prompt scores")
    with pytest.raises(ValueError, match="per prompt"):
        per_prompt.top(3)
    by_pos = edges.edge_attribution(jp_tiny, setup.clean, setup.corrupted, setup.metric, per_position=True)
    assert by_pos.axes == ("writer", "reader", "pos") and by_pos.delta_per_prompt is None
    assert_close(by_pos.delta, reference_edge_changes(hf_tiny, setup, "wbtd,rbtd->wrt") / B, what="by position")


def test_path_patch_views_against_transformer_lens(jp_tiny, tl_tiny, setup):
    senders = ["a0.h1", "a1.h2"]
    got = circuits.path_patch(jp_tiny, setup.clean, setup.corrupted, senders, "logits", setup.metric)
    carries_the_contract(got, "path_patching", "noise")  # path patching is defined by noising
    check_baselines(got, setup)
    assert got.axes == ("sender",) and got.raw.shape == (B, 2)
    with torch.no_grad():
        caches = tl_tiny.run_with_cache(torch.tensor(setup.clean))[1], tl_tiny.run_with_cache(
            torch.tensor(setup.corrupted))[1]
    for i, sender in enumerate([(0, 1), (1, 2)]):
        logits = reference.tl_path_patch(tl_tiny, setup.clean, setup.corrupted, sender, ["logits"], caches=caches)
        logits = np.asarray(logits, np.float64)[:, -1]
        patched = logits[np.arange(B), setup.answers] - logits[np.arange(B), setup.contrasts]
        assert_close(got.raw[:, i], patched, what=f"raw {sender}")
        assert_close(got.delta_per_prompt[:, i], patched - setup.ld_clean, what=f"delta per prompt {sender}")
        assert_close(got.delta[i], (patched - setup.ld_clean).mean(), what=f"delta {sender}")
    per_prompt = circuits.path_patch(jp_tiny, setup.clean, setup.corrupted, senders, "logits", setup.metric,
                                     per_prompt=True)
    assert per_prompt.shape == (B, 2)
    assert_close(per_prompt, (got.raw - setup.ld_corr[:, None]) / (setup.ld_clean - setup.ld_corr)[:, None],
                 what="per prompt")


def test_faithfulness_views(jp_tiny, setup):
    got = circuits.faithfulness(jp_tiny, setup.clean, setup.corrupted, {"embed", "a0.h1", "m0"}, setup.metric)
    carries_the_contract(got, "faithfulness", "noise")
    # the full graph is the clean run and the fully ablated one the corrupted run (torch's scores)
    check_baselines(got, setup)
    assert got.raw.shape == (B,)
    np.testing.assert_allclose(got.patched, got.circuit, rtol=1e-6)
    np.testing.assert_allclose(got.delta_per_prompt, got.raw - got.clean_per_prompt, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got.delta, got.circuit - got.full, rtol=1e-5, atol=1e-6)
