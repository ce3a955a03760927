"""The Llama family (Llama 3 with Llama 3.1's rope scaling and tied embeddings, Qwen 2's q/k/v
biases, Qwen 3's q/k norms, Mistral's sliding window) against independent references, on random
tiny models built with transformers (2 layers, d_model 64, 4 query / 2 key-value heads, vocab
256, norms and biases perturbed; tests/reference.py) and the same weights in TransformerLens 3.9
(its converter for each variant, the config of /work/shared/FAMILIES.md):

- logits vs transformers, plain and right-padded, on prompts longer than Mistral's window;
- run_with_cache vs TransformerLens (k and v with 2 key-value heads, as its hook_k / hook_v);
- get_act_patch_* (resid_pre, heads' outputs, a key-value head sweep) vs TransformerLens's own,
  both directions. TransformerLens 3.9 ignores sliding windows, so these prompts are no longer
  than Mistral's window (6); past it, Mistral's sweeps (the engine's rows-only attention, cached
  keys included) are compared with transformers patched by torch hooks;
- patches that change nothing score exactly 0; `attribute` of k vs torch autograd;
- greedy generation vs transformers (Mistral's generation runs past its window);
- a saved Hugging Face folder (bfloat16, sharded safetensors with an index) converted and loaded,
  and a config.json setting jpatch cannot reproduce refused by name before anything is written.
"""

import json
import shutil
import types

import jax.numpy as jnp
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
from jpatch.model.llama import Llama
from jpatch.model.llama_hf import config_from_hf, from_hf_state_dict

VARIANTS = tuple(reference.LLAMA_VARIANTS)
V, L = reference.LLAMA_TINY["vocab_size"], reference.LLAMA_TINY["num_hidden_layers"]
H, KV = reference.LLAMA_TINY["num_attention_heads"], reference.LLAMA_TINY["num_key_value_heads"]
WINDOW = reference.LLAMA_VARIANTS["mistral"][1]["sliding_window"]
B, T = 3, WINDOW  # the prompts compared with TransformerLens: no longer than Mistral's window
LONG = 2 * WINDOW  # past it
CHANGED = 2  # the corrupted prompts differ from the clean ones from this position on
# TransformerLens's Qwen 3 q/k norms have hook points on [batch * pos * head, d_head] reshapes;
# jpatch's q/k norms have none (as Hugging Face's): attn.hook_q / hook_k are before them, as there.
TL_ONLY = ("attn.q_norm.", "attn.k_norm.")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def family():
    """variant -> the same random model in transformers, TransformerLens and jpatch (built once)."""
    memo = {}

    def get(variant):
        if variant not in memo:
            hf = reference.llama_hf_model(variant, seed=3)
            jp = from_hf_state_dict(reference.hf_state_dict(hf), config_from_hf(hf.config.to_dict()),
                                    tied=hf.config.tie_word_embeddings)
            memo[variant] = types.SimpleNamespace(hf=hf, jp=jp, tl=None)
        m = memo[variant]
        return m

    return get


def with_tl(m):
    if m.tl is None:
        m.tl = reference.llama_tl_model(m.hf)
    return m


def prompts(n_pos, seed=5):
    return family_reference.prompts(B, n_pos, V, CHANGED, seed)


# --- forward, cache, generation ----------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_match_transformers(family, variant):
    m = family(variant)
    tokens = reference.random_tokens(3, LONG, V - 1, seed=2)
    assert_close(m.jp(tokens), reference.hf_logits(m.hf, tokens), what="logits")
    lengths = np.array([LONG, 9, 4])
    mask = (np.arange(LONG) < lengths[:, None]).astype(int)
    padded = np.where(mask, tokens, V - 1)
    got = np.asarray(m.jp(padded, attention_mask=mask))
    expected = reference.hf_logits(m.hf, padded, mask)
    for b, n in enumerate(lengths):
        assert_close(got[b, :n], expected[b, :n], what=f"right-padded prompt {b}")


def test_the_variants_differ_where_they_should(family):
    """Each variant's feature is on in jpatch's config (so the tests above exercise it)."""
    c = {v: family(v).jp.config for v in VARIANTS}
    assert c["llama"].rope_llama3 == (8.0, 1.0, 4.0, 16.0) and c["qwen2"].qkv_bias and c["qwen3"].qk_norm
    assert c["mistral"].sliding_window == WINDOW and c["qwen3"].d_head == 24 and c["llama"].n_kv_head == KV
    assert np.array_equal(family("llama").jp.W_U, family("llama").jp.W_E.T)  # tied
    assert (c["llama"].default_prepend_bos, c["qwen2"].default_prepend_bos) == (True, False)  # TransformerLens's


@pytest.mark.parametrize("variant", VARIANTS)
def test_cache_matches_transformer_lens(family, variant):
    m = with_tl(family(variant))
    tokens = reference.random_tokens(2, T, V, seed=1)
    logits, cache = m.jp.run_with_cache(tokens)
    with torch.no_grad():
        tl_logits, tl_cache = m.tl.run_with_cache(torch.tensor(tokens))
    tl_names = {n for n in tl_cache.keys() if not any(t in n for t in TL_ONLY)}
    assert set(cache.keys()) == tl_names
    assert "blocks.1.mlp.hook_pre_linear" in tl_names and "blocks.1.hook_resid_mid" in tl_names
    for name in cache.keys():
        assert_close(cache[name], tl_cache[name].numpy(), what=name)
    assert_close(logits, tl_logits.numpy(), what="logits")
    d_head = m.jp.config.d_head
    assert cache["blocks.0.attn.hook_k"].shape == cache["blocks.0.attn.hook_rot_k"].shape == (2, T, KV, d_head)
    assert cache["blocks.0.attn.hook_q"].shape == (2, T, H, d_head)


@pytest.mark.parametrize("variant", ["llama", "mistral"])  # Mistral's runs past its window
def test_greedy_generate_equals_transformers(family, variant):
    family_reference.check_greedy_generate(family(variant), V - 1)


# --- TransformerLens's patching functions (prompts within the window) -----------------------------------

SWEEPS = ("resid_pre", "attn_head_out_all_pos", "attn_head_k_all_pos", "attn_head_v_by_pos")
# Every sweep on Llama 3; on the other variants (whose blocks differ in biases, q/k norms, the
# window) the key-value head sweep, which recomputes everything from the keys on (for the suite's time).
CASES = [("llama", name) for name in SWEEPS] + [(v, "attn_head_v_by_pos") for v in VARIANTS if v != "llama"]


@pytest.fixture(scope="module")
def setups(family):
    memo = {}

    def get(variant):
        if variant not in memo:
            memo[variant] = family_reference.patching_setup(with_tl(family(variant)), *prompts(T))
        return memo[variant]

    return get


@pytest.mark.parametrize("direction", ["denoise", "noise"])
@pytest.mark.parametrize("variant, name", CASES)
def test_get_act_patch_matches_transformer_lens(family, setups, variant, name, direction):
    m, s = family(variant), setups(variant)
    base, source = ("corrupted", "clean") if direction == "denoise" else ("clean", "corrupted")
    with torch.no_grad():
        expected = getattr(tl_patching, f"get_act_patch_{name}")(
            m.tl, torch.tensor(getattr(s, base)), s.tl_cache[source], s.metric).double().numpy()
    assert_nontrivial(expected, f"TransformerLens {name}")
    if "_k_" in name or "_v_" in name:
        assert expected.shape[-1] == KV  # one entry per key-value head, shared by its query group
    got = getattr(patching, f"get_act_patch_{name}")(m.jp, getattr(s, base), s.jp_cache[source], s.metric,
                                                     progress=False)
    assert_close(got, expected, what=f"{variant} {name} {direction}")


# --- past Mistral's window: against transformers patched by torch hooks ---------------------------------


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_mistral_sweeps_past_the_window_match_transformers(family, direction):
    """resid_pre by (layer, pos) and k by (layer, pos, key-value head) on prompts twice the window:
    each patch's normalized logit difference as transformers (sliding window mask) computes it;
    patches before the first changed position score exactly the base run."""
    family_reference.check_sweeps_past_the_window(family("mistral"), direction, *prompts(LONG, seed=8), CHANGED)


# --- attribution vs torch autograd -------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["llama"])
def test_attribute_k_matches_torch_autograd(family, setups, variant):
    """AtP of k per (layer, pos, key-value head): (clean k - corrupted k) . d(logit diff)/dk on the
    corrupted run, by torch autograd through TransformerLens's hook_k, per prompt normalized."""
    m, s = with_tl(family(variant)), setups(variant)
    expected = family_reference.tl_k_attribution(m, s)
    assert_nontrivial(expected, "k")
    got = attribution.attribute(m.jp, s.clean, s.corrupted, "k", metrics.logit_diff(s.ans, s.con), per_prompt=True)
    assert_close(got, expected, what=f"{variant} k attribution")


def test_atp_qk_fix_of_a_key_value_head_is_its_groups_pattern_change(family, setups):
    """AtP*'s QK fix of k: sum over the query heads of the key-value head's group of (A' - A) .
    dM/dA, A' the corrupted run's pattern with that head's key at one position set to the clean
    run's (TransformerLens hooks; dM/dA by torch autograd), per prompt normalized."""
    m, s = family("llama"), setups("llama")
    rows, ans, con = torch.arange(B), torch.tensor(s.ans), torch.tensor(s.con)
    names = [f"blocks.{l}.attn.hook_pattern" for l in range(L)]
    store = {}

    def keep(act, hook):
        act.retain_grad()
        store[hook.name] = act
        return act

    with torch.enable_grad():
        logits = m.tl.run_with_hooks(torch.tensor(s.corrupted), fwd_hooks=[(n, keep) for n in names])
        ld = logits[rows, -1, ans] - logits[rows, -1, con]
        ld.sum().backward()
    with torch.no_grad():
        clean_logits = m.tl(torch.tensor(s.clean))
    gap = (clean_logits[rows, -1, ans] - clean_logits[rows, -1, con] - ld.detach()).double().numpy()
    expected = np.zeros((B, L, T, KV))
    for l, p, g in np.ndindex(L, T, KV):
        name, patterns = f"blocks.{l}.attn.hook_k", {}

        def patch(act, hook, p=p, g=g, name=name):
            act = act.clone()
            act[:, p, g] = s.tl_cache["clean"][name][:, p, g]
            return act

        with torch.no_grad():
            m.tl.run_with_hooks(torch.tensor(s.corrupted), fwd_hooks=[
                (name, patch), (names[l], lambda act, hook: patterns.__setitem__("A", act))])
        change = patterns["A"] - store[names[l]].detach()  # nonzero on the group's query heads only
        expected[:, l, p, g] = (change * store[names[l]].grad).sum((1, 2, 3)).double().numpy()
    expected /= gap[:, None, None, None]
    assert_nontrivial(expected, "QK fix")
    got = attribution.attribute(m.jp, s.clean, s.corrupted, "k", metrics.logit_diff(s.ans, s.con), method="atp-qk",
                                per_prompt=True)
    assert_close(got, expected, what="k QK fix per key-value head")


# --- files ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def folder(family, tmp_path_factory):
    """The Llama variant (tied, llama3 rope scaling) saved by transformers in bfloat16, sharded."""
    import copy

    hf = family("llama").hf
    path = tmp_path_factory.mktemp("llama") / "hf"
    copy.deepcopy(hf).to(torch.bfloat16).save_pretrained(path, max_shard_size="60KB")
    assert (path / "model.safetensors.index.json").is_file() and len(list(path.glob("model-*.safetensors"))) > 1
    # The reference: float32 with the weights rounded to bfloat16 (bfloat16 -> float32 is exact). Not
    # the bfloat16 model cast back, whose rotary frequencies were rounded to bfloat16 too.
    upcast = copy.deepcopy(hf)
    with torch.no_grad():
        for p in upcast.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    return path, upcast


def test_convert_a_bfloat16_sharded_folder(folder, tmp_path):
    path, upcast = folder
    tokens = reference.random_tokens(2, LONG, V, seed=4)
    model = jpatch.load(convert_hf(path, tmp_path / "jp"))
    config = json.loads((tmp_path / "jp" / "config.json").read_text())
    assert isinstance(model, Llama) and config["family"] == "llama" and config["rope_llama3"] == [8.0, 1.0, 4.0, 16.0]
    assert model.dtype == jnp.float32
    assert_close(model(tokens), reference.hf_logits(upcast, tokens), what="converted logits")


@pytest.mark.parametrize("changes, field", [
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}}, "rope_type='yarn'"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"attention_bias": True}, "attention_bias"),
    ({"mlp_bias": True}, "mlp_bias"),
])
def test_unsupported_config_is_refused_by_name_before_writing(folder, tmp_path, changes, field):
    src = tmp_path / "src"
    shutil.copytree(folder[0], src)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, **changes}))
    with pytest.raises(ValueError, match=f"{src / 'config.json'}.*{field}"):
        convert_hf(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_mixed_sliding_layers_are_refused():
    qwen = dict(model_type="qwen2", num_hidden_layers=2, num_attention_heads=4, hidden_size=64,
                intermediate_size=96, vocab_size=256, sliding_window=4)
    assert config_from_hf({**qwen, "layer_types": ["full_attention"] * 2}).sliding_window is None
    with pytest.raises(ValueError, match="layer_types"):
        config_from_hf({**qwen, "layer_types": ["full_attention", "sliding_attention"]})
    with pytest.raises(ValueError, match="use_sliding_window"):
        config_from_hf({**qwen, "use_sliding_window": True, "max_window_layers": 1})


def test_edge_graph_reads_key_value_heads(family):
    """The edge graph's k / v readers are key-value heads ("a<l>.kv<g><k>"); a query head's k / v
    input names its group's. Every edge kept: the graph's forward is the model's (transformers)."""
    from jpatch.methods import circuits
    from jpatch.methods.edges import graph_names

    m = family("mistral")
    writers, readers, valid = graph_names(m.jp.config)
    assert readers[:H + 2 * KV + 1] == tuple([f"a0.h{h}<q>" for h in range(H)] + [f"a0.kv{g}<k>" for g in range(KV)]
                                             + [f"a0.kv{g}<v>" for g in range(KV)] + ["m0"])
    assert [readers[i] for i in circuits.reader_indices(m.jp.config, "a1.h3")] == ["a1.h3<q>", "a1.kv1<k>", "a1.kv1<v>"]
    tokens = reference.random_tokens(2, LONG, V - 1, seed=6)  # past the window
    source = np.zeros((len(writers), 2, LONG, m.jp.config.d_model), np.float32)
    got = circuits.edge_forward(m.jp, tokens, valid.astype(np.float32), source)
    assert_close(got, reference.hf_logits(m.hf, tokens), what="every edge kept")


@pytest.mark.parametrize("receivers, direction", [(["a1.h3<k>"], "noise"), (["a1.h0", "m1", "logits"], "denoise")])
def test_path_patching_matches_transformer_lens_two_passes(family, setups, receivers, direction):
    """Every head as sender, through the receivers only (a query head's k receiver is its key-value
    head's input), vs Wang et al.'s two passes with TransformerLens hooks."""
    from jpatch.methods import circuits

    m, s = with_tl(family("llama")), setups("llama")
    base, source = (s.clean, s.corrupted) if direction == "noise" else (s.corrupted, s.clean)
    metric = metrics.logit_diff(s.ans, s.con)
    got = circuits.path_patch(m.jp, s.clean, s.corrupted, "heads", receivers, metric, direction=direction)
    rows = np.arange(B)
    ld = lambda logits: (logits[rows, -1, s.ans] - logits[rows, -1, s.con]).astype(np.float64)
    with torch.no_grad():
        ld_clean, ld_corr = ld(m.tl(torch.tensor(s.clean)).numpy()), ld(m.tl(torch.tensor(s.corrupted)).numpy())
    m.tl.set_use_split_qkv_input(True)
    m.tl.set_use_hook_mlp_in(True)
    try:
        with torch.no_grad():
            caches = m.tl.run_with_cache(torch.tensor(base))[1], m.tl.run_with_cache(torch.tensor(source))[1]
        patched = np.array([[ld(reference.tl_path_patch(m.tl, base, source, (l, h), receivers, caches=caches))
                             for h in range(H)] for l in range(L)])  # [L, H, B]
    finally:
        m.tl.set_use_split_qkv_input(False)
        m.tl.set_use_hook_mlp_in(False)
    expected = (patched.mean(-1) - ld_corr.mean()) / (ld_clean.mean() - ld_corr.mean())  # normalized means
    assert_nontrivial(expected, f"{receivers}")
    assert_close(got, expected, what=f"path_patch {receivers} {direction}")


def test_eap_matches_torch_autograd(family, setups):
    """EAP: (clean - corrupted writes) . (gradient at each reader's input on the corrupted run),
    summed over positions, mean over prompts over the mean gap; a key-value reader's gradient is
    TransformerLens's hook_k_input / hook_v_input of that key-value head (torch autograd)."""
    from jpatch.methods.edges import edge_attribution

    m, s = with_tl(family("llama")), setups("llama")
    got = edge_attribution(m.jp, s.clean, s.corrupted, metrics.logit_diff(s.ans, s.con))
    sites = ["hook_q_input", "hook_k_input", "hook_v_input", "hook_mlp_in", "attn.hook_result", "hook_mlp_out"]
    names = ["blocks.0.hook_resid_pre", f"blocks.{L - 1}.hook_resid_post"] + [
        f"blocks.{l}.{x}" for l in range(L) for x in sites]
    for flag in ("set_use_split_qkv_input", "set_use_hook_mlp_in", "set_use_attn_result"):
        getattr(m.tl, flag)(True)
    try:
        runs = {}
        for name, tokens in (("clean", s.clean), ("corrupted", s.corrupted)):
            store = {}

            def keep(act, hook, store=store):
                act.retain_grad()
                store[hook.name] = act
                return act

            with torch.enable_grad():
                logits = m.tl.run_with_hooks(torch.tensor(tokens), fwd_hooks=[(n, keep) for n in names])
                rows = torch.arange(B)
                ld = logits[rows, -1, torch.tensor(s.ans)] - logits[rows, -1, torch.tensor(s.con)]
                ld.sum().backward()
            runs[name] = (ld.detach().double().numpy(), store)
    finally:
        for flag in ("set_use_split_qkv_input", "set_use_hook_mlp_in", "set_use_attn_result"):
            getattr(m.tl, flag)(False)
    act = lambda run, n: runs[run][1][n].detach().double().numpy()
    grad = lambda n: runs["corrupted"][1][n].grad.double().numpy()
    diff = lambda n: act("clean", n) - act("corrupted", n)
    writes, readers = {"embed": (diff("blocks.0.hook_resid_pre"), -1)}, {}
    for l in range(L):
        writes.update({f"a{l}.h{h}": (diff(f"blocks.{l}.attn.hook_result")[:, :, h], l) for h in range(H)})
        writes[f"m{l}"] = (diff(f"blocks.{l}.hook_mlp_out"), l + 0.5)
        readers.update({f"a{l}.h{h}<q>": (grad(f"blocks.{l}.hook_q_input")[:, :, h], l) for h in range(H)})
        for c in "kv":
            readers.update({f"a{l}.kv{g}<{c}>": (grad(f"blocks.{l}.hook_{c}_input")[:, :, g], l) for g in range(KV)})
        readers[f"m{l}"] = (grad(f"blocks.{l}.hook_mlp_in"), l + 0.5)
    readers["logits"] = (grad(f"blocks.{L - 1}.hook_resid_post"), L)
    assert tuple(readers) == got.readers and tuple(writes) == got.writers
    gap = (runs["clean"][0] - runs["corrupted"][0]).mean()
    valid = np.array([[ws < rs for rs in (r[1] for r in readers.values())] for ws in (w[1] for w in writes.values())])
    np.testing.assert_array_equal(got.valid, valid)  # a reader sees the writers before it
    expected = np.array([[(w * r).sum() / B / gap if ok else 0.0 for (r, _), ok in zip(readers.values(), row)]
                         for (w, _), row in zip(writes.values(), valid)])
    assert np.abs(expected).max() > 1e-2
    assert_close(got.scores, expected, what="EAP")


def test_qk_fix_past_the_window_is_refused(family):
    """AtP*'s QK fix recomputes full causal patterns: past Mistral's window it is refused, not approximated."""
    clean, corrupted = prompts(LONG)
    metric = metrics.logit_diff(np.arange(B), np.arange(B) + 1)
    with pytest.raises(ValueError, match="longer than the sliding window"):
        attribution.attribute(family("mistral").jp, clean, corrupted, "k", metric, method="atp-qk")


def test_weights_and_circuits_as_transformer_lens(family):
    """W_K / W_V / b_K / b_V per query head (TransformerLens repeats each key-value head for its
    group; _W_K / _W_V are the originals), and the OV / QK circuits built from them."""
    m = with_tl(family("qwen2"))
    for name in ("W_Q", "W_K", "W_V", "b_Q", "b_K", "b_V", "W_O", "_W_K", "_W_V", "_b_K", "_b_V", "W_in", "W_gate",
                 "W_out", "W_E", "W_U"):
        tl = torch.stack([getattr(b.attn, name) for b in m.tl.blocks]) if name.startswith("_") else getattr(m.tl, name)
        assert_close(getattr(m.jp, name), tl.detach().numpy(), tol=0, what=name)
    assert_close(m.jp.OV.AB, m.tl.OV.AB.detach().numpy(), tol=1e-5, what="OV")
    ours, theirs = m.jp.named_parameters(), list(m.tl.named_parameters())
    assert [n for n, _ in ours] == [n for n, _ in theirs]
    for (name, w), (_, t) in zip(ours, theirs):
        assert_close(w, t.detach().numpy(), tol=0, what=name)
    assert_close(m.jp.QK.AB, m.tl.QK.AB.detach().numpy(), tol=1e-5, what="QK")


def test_residual_decomposition_with_rms_norm_as_transformer_lens(family):
    """apply_ln_to_stack divides by the cached RMS scale without centring (TransformerLens centres
    for LayerNorm only): accumulated and decomposed residuals against TransformerLens's cache."""
    m = with_tl(family("qwen3"))
    tokens = reference.random_tokens(2, T, V, seed=1)
    _, cache = m.jp.run_with_cache(tokens)
    with torch.no_grad():
        _, tl_cache = m.tl.run_with_cache(torch.tensor(tokens))
        tl_acc = tl_cache.accumulated_resid(layer=1, apply_ln=True).numpy()
        tl_dec = tl_cache.decompose_resid(apply_ln=True).numpy()
    assert_close(cache.accumulated_resid(layer=1, apply_ln=True), tl_acc, what="accumulated_resid")
    assert_close(cache.decompose_resid(apply_ln=True), tl_dec, what="decompose_resid")


def test_text_gets_bos_as_transformer_lens_defaults(family, tmp_path):
    """to_tokens / generate prepend BOS by default for Llama and Mistral, not for Qwen 2 / 3
    (TransformerLens's default_prepend_bos per family); ids from transformers' tokenizer on the file."""
    import dataclasses

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(["When Mary and John went to the store"] * 3, trainers.BpeTrainer(
        vocab_size=200, special_tokens=["<|begin_of_text|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|begin_of_text|>"}))
    hf_tok = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"), bos_token="<|begin_of_text|>")
    text = " Mary and John"
    ids = hf_tok(text, add_special_tokens=False)["input_ids"]
    for variant, bos in (("llama", True), ("qwen2", False)):
        model = dataclasses.replace(family(variant).jp, tokenizer_file=str(tmp_path / "tokenizer.json"))
        expected = [hf_tok.bos_token_id] * bos + ids
        assert np.asarray(model.to_tokens(text)).tolist() == [expected]
        assert model.to_str_tokens(text)[0] == ("<|begin_of_text|>" if bos else hf_tok.decode(ids[:1]))
