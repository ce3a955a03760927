"""Gemma 2 against independent references, on a random tiny Gemma2ForCausalLM (tests/reference.py:
2 layers, layer 0 local with a window of 6, layer 1 global; d_model 64, 4 query / 2 key-value
heads of 16 dims, query_pre_attn_scalar 24, soft caps 5 on the scores and 3 on the logits, every
norm perturbed) and the same weights in TransformerLens 3.9 (convert_gemma_weights, the config of
/work/shared/FAMILIES.md):

- logits vs transformers, plain and right-padded, on prompts longer than the window;
- run_with_cache vs TransformerLens (every hook name: ln1_post / ln2_post included);
- get_act_patch_* vs TransformerLens's own, both directions. TransformerLens 3.9 ignores sliding
  windows, so those prompts are no longer than the window; past it, resid_pre and k sweeps are
  compared with transformers patched by torch hooks (no-op patches scoring exactly the base run);
- `attribute` of k vs torch autograd; greedy generation vs transformers past the window;
- a saved folder converted, and settings jpatch cannot reproduce refused by name.
"""

import json
import shutil

import numpy as np
import pytest
import torch
import transformer_lens.patching as tl_patching

import family_reference
import jpatch
import reference
from family_reference import assert_close, assert_nontrivial
from jpatch import patching
from jpatch.methods import attribution, metrics
from jpatch.model.convert import convert_hf
from jpatch.model.gemma2 import Gemma2
from jpatch.model.gemma2_hf import config_from_hf, from_hf_state_dict

TINY = reference.GEMMA2_TINY
V, L, KV = TINY["vocab_size"], TINY["num_hidden_layers"], TINY["num_key_value_heads"]
WINDOW = TINY["sliding_window"]
B, T, LONG, CHANGED = 3, WINDOW, 2 * WINDOW, 2

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def m():
    import types

    hf = reference.gemma2_hf_model(seed=3)
    jp = from_hf_state_dict(reference.hf_state_dict(hf), config_from_hf(hf.config.to_dict()))
    return types.SimpleNamespace(hf=hf, jp=jp, tl=reference.gemma2_tl_model(hf))


def prompts(n_pos, seed=5):
    return family_reference.prompts(B, n_pos, V, CHANGED, seed)


@pytest.fixture(scope="module")
def s(m):
    return family_reference.patching_setup(m, *prompts(T))


def test_config(m):
    c = m.jp.config
    assert isinstance(m.jp, Gemma2) and c.windows() == [WINDOW, TINY["max_position_embeddings"]]
    assert (c.attn_softcap, c.final_softcap, c.query_pre_attn_scalar, c.d_head) == (5.0, 3.0, 24.0, 16)
    assert np.asarray(m.jp.blocks.window).tolist() == c.windows()


def test_logits_match_transformers(m):
    tokens = reference.random_tokens(3, LONG, V - 1, seed=2)
    expected = reference.hf_logits(m.hf, tokens)
    assert np.abs(expected).max() > 0.5 * TINY["final_logit_softcapping"]  # the cap bends these logits
    assert_close(m.jp(tokens), expected, what="logits")
    lengths = np.array([LONG, 9, 4])
    mask = (np.arange(LONG) < lengths[:, None]).astype(int)
    padded = np.where(mask, tokens, V - 1)
    got, expected = np.asarray(m.jp(padded, attention_mask=mask)), reference.hf_logits(m.hf, padded, mask)
    for b, n in enumerate(lengths):
        assert_close(got[b, :n], expected[b, :n], what=f"right-padded prompt {b}")


def test_cache_matches_transformer_lens(m):
    tokens = reference.random_tokens(2, T, V, seed=1)
    logits, cache = m.jp.run_with_cache(tokens)
    with torch.no_grad():
        tl_logits, tl_cache = m.tl.run_with_cache(torch.tensor(tokens))
    assert set(cache.keys()) == set(tl_cache.keys())
    assert "blocks.0.ln1_post.hook_normalized" in cache.keys() and "blocks.1.ln2_post.hook_scale" in cache.keys()
    for name in cache.keys():
        assert_close(cache[name], tl_cache[name].numpy(), what=name)
    assert_close(logits, tl_logits.numpy(), what="logits")
    ours, theirs = m.jp.named_parameters(), list(m.tl.named_parameters())  # (1 + w) norms, scaled W_E
    assert [n for n, _ in ours] == [n for n, _ in theirs]
    for (name, w), (_, t) in zip(ours, theirs):
        assert_close(w, t.detach().numpy(), tol=0, what=name)


def test_greedy_generate_equals_transformers(m):
    family_reference.check_greedy_generate(m, V - 1)


@pytest.mark.parametrize("direction", ["denoise", "noise"])
@pytest.mark.parametrize("name", ["resid_pre", "attn_head_out_all_pos", "attn_head_k_all_pos"])
def test_get_act_patch_matches_transformer_lens(m, s, name, direction):
    base, source = ("corrupted", "clean") if direction == "denoise" else ("clean", "corrupted")
    with torch.no_grad():
        expected = getattr(tl_patching, f"get_act_patch_{name}")(
            m.tl, torch.tensor(getattr(s, base)), s.tl_cache[source], s.metric).double().numpy()
    assert_nontrivial(expected, f"TransformerLens {name}")
    got = getattr(patching, f"get_act_patch_{name}")(m.jp, getattr(s, base), s.jp_cache[source], s.metric,
                                                     progress=False)
    assert_close(got, expected, what=f"{name} {direction}")


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_sweeps_past_the_window_match_transformers(m, direction):
    """resid_pre by (layer, pos) and k by (layer, pos, key-value head), prompts twice the window,
    per prompt: transformers (local layer masked to its window) patched by torch hooks."""
    family_reference.check_sweeps_past_the_window(m, direction, *prompts(LONG, seed=8), CHANGED)


def test_attribute_k_matches_torch_autograd(m, s):
    expected = family_reference.tl_k_attribution(m, s)
    assert_nontrivial(expected, "k")
    got = attribution.attribute(m.jp, s.clean, s.corrupted, "k", metrics.logit_diff(s.ans, s.con), per_prompt=True)
    assert_close(got, expected, what="k attribution")
    with pytest.raises(ValueError, match="not implemented for Gemma 2"):
        attribution.attribute(m.jp, s.clean, s.corrupted, "k", metrics.logit_diff(s.ans, s.con), method="atp-qk")


def test_convert_a_folder_and_refuse_what_is_not_reproduced(m, tmp_path):
    m.hf.save_pretrained(tmp_path / "hf")
    model = jpatch.load(convert_hf(tmp_path / "hf", tmp_path / "jp"))
    assert isinstance(model, Gemma2) and json.loads((tmp_path / "jp" / "config.json").read_text())["family"] == "gemma2"
    tokens = reference.random_tokens(2, LONG, V, seed=4)
    assert_close(model(tokens), reference.hf_logits(m.hf, tokens), what="converted logits")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    for changes, field in (({"hidden_activation": "gelu"}, "hidden_activation='gelu'"),
                           ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}},
                            "rope_type='linear'"),
                           ({"layer_types": ["sliding_attention", "chunked_attention"]}, "chunked_attention")):
        src = tmp_path / "src"
        shutil.rmtree(src, ignore_errors=True)
        shutil.copytree(tmp_path / "hf", src)
        (src / "config.json").write_text(json.dumps({**config, **changes}))
        with pytest.raises(ValueError, match=f"{src / 'config.json'}.*{field}"):
            convert_hf(src, tmp_path / "out")
        assert not (tmp_path / "out").exists()


def test_edge_methods_refuse_post_norms(m, s):
    """Gemma 2 normalizes the attention and MLP outputs before adding them to the residual stream,
    so the heads' writes do not add up to it: the edge graph's methods refuse, naming why."""
    from jpatch.methods import acdc, circuits, edges

    metric = metrics.logit_diff(s.ans, s.con)
    for call in (lambda: edges.edge_attribution(m.jp, s.clean, s.corrupted, metric),
                 lambda: circuits.path_patch(m.jp, s.clean, s.corrupted, "heads", ["logits"], metric),
                 lambda: acdc.acdc(m.jp, s.clean, s.corrupted, threshold=0.1)):
        with pytest.raises(ValueError, match="Gemma 2: its attention and MLP outputs are normalized"):
            call()


def test_a_bfloat16_load_keeps_each_layers_window(m, tmp_path):
    """A layer's window is an integer array: loading in bfloat16 keeps it exact (it was cast with the
    weights, so a window of 4095 became 4096, and a key one position too far was seen)."""
    import dataclasses

    import jax
    import jax.numpy as jnp

    from jpatch.model.checkpoint import save

    config = dataclasses.replace(m.jp.config, sliding_window=4095, n_ctx=4099)  # neither exact in bfloat16
    save(Gemma2.init(config, key=jax.random.key(0)), tmp_path / "m")
    for dtype in ("bfloat16", "float32", None):
        loaded = jpatch.load(tmp_path / "m", dtype=dtype)
        assert loaded.blocks.window.dtype == jnp.int32 and loaded.blocks.window.tolist() == [4095, 4099], dtype
    assert loaded.dtype == jnp.float32 and jpatch.load(tmp_path / "m", dtype="bfloat16").dtype == jnp.bfloat16
