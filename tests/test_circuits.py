"""Circuits against TransformerLens 3.9 hooks (split q/k/v inputs, per-head results, MLP inputs):
the edge-level forward, exact path patching (Wang et al.'s two passes written with hooks),
faithfulness and ACDC on a random 3-layer model."""

import json
import warnings

import numpy as np
import pytest
import torch

import reference
from jpatch.methods import circuits
from jpatch.methods import metrics
from jpatch.model.convert import config_from_hf, from_hf_state_dict
from jpatch.methods.edges import edge_attribution, graph_names

L, H, B, T, V = 3, 4, 3, 6, 211
ANSWERS, CONTRASTS = [3, 7, 11], [5, 9, 13]


@pytest.fixture(scope="module")
def models(one_torch_thread):
    hf = reference.hf_model(seed=3, n_layer=L, n_head=H)
    tl = reference.tl_model(hf)
    tl.set_use_split_qkv_input(True)
    tl.set_use_attn_result(True)
    tl.set_use_hook_mlp_in(True)
    return tl, from_hf_state_dict(reference.hf_state_dict(hf), config_from_hf(hf.config))


@pytest.fixture(scope="module")
def tokens():
    return reference.random_tokens(B, T, V, seed=5), reference.random_tokens(B, T, V, seed=6)


def tl_writes(tl, tokens):
    """writer name -> [B, T, d] of a TransformerLens run (heads' hook_result exclude b_O)."""
    _, cache = tl.run_with_cache(torch.tensor(tokens))
    out = {"embed": cache["hook_embed"] + cache["hook_pos_embed"]}
    for l in range(L):
        for h in range(H):
            out[f"a{l}.h{h}"] = cache[f"blocks.{l}.attn.hook_result"][:, :, h]
        out[f"m{l}"] = cache[f"blocks.{l}.hook_mlp_out"]
    return out


def tl_edge_forward(tl, tokens, mask, source):
    """Every reader's input rebuilt with hooks from this run's writes (recorded as the forward goes)
    and `source`'s writes, mixed by mask [writers, readers]."""
    writers, readers, valid = graph_names(tl.cfg_jp)
    own = {}
    b_o = [tl.blocks[l].attn.b_O.detach() for l in range(L)]

    def mixed(r, bias):
        x = bias.clone()
        for w, name in enumerate(writers):
            if valid[w, r]:
                m = float(mask[w, r])
                x = x + m * own[name] + (1 - m) * source[name]
        return x

    def rec_embed(x, hook):
        own["embed"] = x if "embed" not in own else own["embed"] + x

    def inputs(l, c):
        def hook(x, hook):
            bias = sum(b_o[:l], torch.zeros_like(b_o[0]))
            return torch.stack([mixed(readers.index(f"a{l}.h{h}<{c}>"), bias) for h in range(H)], dim=2)
        return hook

    def rec_result(l):
        def hook(x, hook):
            for h in range(H):
                own[f"a{l}.h{h}"] = x[:, :, h]
        return hook

    def mlp_in(l):
        return lambda x, hook: mixed(readers.index(f"m{l}"), sum(b_o[:l + 1]))

    def rec_mlp(l):
        def hook(x, hook):
            own[f"m{l}"] = x
        return hook

    hooks = [("hook_embed", rec_embed), ("hook_pos_embed", rec_embed)]
    for l in range(L):
        hooks += [(f"blocks.{l}.hook_{c}_input", inputs(l, c)) for c in "qkv"]
        hooks += [(f"blocks.{l}.attn.hook_result", rec_result(l)), (f"blocks.{l}.hook_mlp_in", mlp_in(l)),
                  (f"blocks.{l}.hook_mlp_out", rec_mlp(l))]
    hooks.append((f"blocks.{L - 1}.hook_resid_post", lambda x, hook: mixed(len(readers) - 1, sum(b_o))))
    with torch.no_grad():
        return tl.run_with_hooks(torch.tensor(tokens), fwd_hooks=hooks).numpy()


def test_edge_forward_matches_transformerlens(models, tokens):
    tl, jp = models
    tl.cfg_jp = jp.config
    clean, corrupted = tokens
    _, source = circuits.run_writes(jp, corrupted)
    valid = graph_names(jp.config)[2]
    with torch.no_grad():
        tl_clean, tl_corrupted = (tl(torch.tensor(t)).numpy() for t in (clean, corrupted))
    ones = np.ones(valid.shape, np.float32)
    np.testing.assert_allclose(circuits.edge_forward(jp, clean, ones, source), tl_clean, atol=1e-4)
    np.testing.assert_allclose(circuits.edge_forward(jp, clean, 0 * ones, source), tl_corrupted, atol=1e-4)
    # A random mix of kept, ablated and fractional edges against the hook-built reference.
    rng = np.random.default_rng(0)
    mask = np.where(rng.random(valid.shape) < 0.5, 1.0, 0.0)
    mask[rng.random(valid.shape) < 0.1] = 0.3
    src = tl_writes(tl, corrupted)
    expected = tl_edge_forward(tl, clean, mask, src)
    got = circuits.edge_forward(jp, clean, mask.astype(np.float32), source)
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert np.abs(expected - tl_clean).max() > 0.1 and np.abs(expected - tl_corrupted).max() > 0.1


def test_edge_forward_gradient_is_eap(models, tokens):
    """d metric / d mask at the clean run is the edges' (clean - corrupted) . gradient: minus EAP noising."""
    import jax

    _, jp = models
    clean, corrupted = tokens
    metric = metrics.logit_diff(ANSWERS, CONTRASTS, normalize=False)
    _, source = circuits.run_writes(jp, corrupted)
    valid = graph_names(jp.config)[2]

    def ld(mask):
        logits = circuits.edge_forward(jp, clean, mask, source, np.full((B, 1), T - 1))
        return metric.score(logits, logits, metric.batch_data(B)).mean()

    grad = np.asarray(jax.grad(ld)(np.ones(valid.shape, np.float32)))
    eap = edge_attribution(jp, clean, corrupted, metric, direction="noise")
    np.testing.assert_allclose(np.where(valid, grad, 0), -eap.scores, atol=1e-4)


# --- path patching -------------------------------------------------------------------------


def logit_diffs(logits):
    last = logits[:, -1]
    return last[np.arange(B), ANSWERS] - last[np.arange(B), CONTRASTS]


@pytest.mark.parametrize("receivers,freeze_mlps,direction", [
    (["logits"], False, "noise"),
    (["logits"], True, "noise"),
    (["a1.h2<q>", "a2.h0", "a2.h3<k>"], False, "noise"),
    (["a2.h1<v>", "m1", "logits"], True, "noise"),
    (["a1.h0", "a2.h2<q>", "m2"], False, "denoise"),
    (["a2.h1<q>", "a2.h2<k>"], False, "noise"),  # queries and keys alone: only the pattern changes
])
def test_path_patching_matches_transformerlens_two_passes(models, tokens, receivers, freeze_mlps, direction):
    tl, jp = models
    clean, corrupted = tokens
    base, source = (clean, corrupted) if direction == "noise" else (corrupted, clean)
    metric = metrics.logit_diff(ANSWERS, CONTRASTS)
    got = circuits.path_patch(jp, clean, corrupted, "heads", receivers, metric, direction=direction,
                              freeze_mlps=freeze_mlps)
    assert got.shape == (L, H)
    with torch.no_grad():
        ld_clean, ld_corrupted = (logit_diffs(tl(torch.tensor(t)).numpy()).mean() for t in (clean, corrupted))
    expected = np.array([[(logit_diffs(reference.tl_path_patch(tl, base, source, (l, h), receivers, freeze_mlps)).mean()
                           - ld_corrupted) / (ld_clean - ld_corrupted) for h in range(H)] for l in range(L)])
    np.testing.assert_allclose(got, expected, atol=1e-4)
    unpatched = 1.0 if direction == "noise" else 0.0
    assert np.abs(expected - unpatched).max() > 1e-2  # the test can fail: some sender matters


def test_path_patching_sender_lists_and_groups(models, tokens):
    _, jp = models
    clean, corrupted = tokens
    metric = metrics.logit_diff(ANSWERS, CONTRASTS)
    grid = circuits.path_patch(jp, clean, corrupted, "heads", "logits", metric)
    some = circuits.path_patch(jp, clean, corrupted, ["a0.h1", "a2.h3"], "logits", metric)
    np.testing.assert_allclose(some, [grid[0, 1], grid[2, 3]], atol=1e-5)
    # Every writer patched together with MLPs frozen is the corrupted run's final residual.
    everything = [w for w in graph_names(jp.config)[0]]
    together = circuits.path_patch(jp, clean, corrupted, [everything], "logits", metric, freeze_mlps=True)
    np.testing.assert_allclose(together, [0.0], atol=1e-4)


def test_metric_closures_compile_once_in_path_patching_and_edge_scores(models, tokens):
    """A notebook's `lambda logits: ...` defined anew per call, over new answer ids: path_patch and
    mask_scorer reuse the first closure's program and give each closure's own numbers (TransformerLens
    two-pass and hook references)."""
    tl, jp = models
    tl.cfg_jp = jp.config
    clean, corrupted = tokens
    rows = np.arange(B)
    closure = lambda a, c: (lambda logits: (logits[rows, -1, a] - logits[rows, -1, c]).mean())
    pairs = [(np.array(ANSWERS), np.array(CONTRASTS)), (np.array([4, 8, 12]), np.array([6, 10, 1]))]
    senders, receivers = ["a0.h1", "a1.h3"], ["a2.h0", "logits"]
    writers, readers, valid = graph_names(jp.config)
    mask = (np.random.default_rng(0).random(valid.shape) < 0.5) * valid
    src = tl_writes(tl, corrupted)
    for i, (a, c) in enumerate(pairs):
        got, n_path = reference.count_compiles(lambda: circuits.path_patch(jp, clean, corrupted, senders, receivers, closure(a, c)))
        scored, n_edges = reference.count_compiles(lambda: circuits.edge_scores(jp, clean, corrupted, mask[None], closure(a, c)))
        diff = lambda logits: (logits[rows, -1, a] - logits[rows, -1, c]).mean()
        expected = [diff(reference.tl_path_patch(tl, clean, corrupted, tuple(int(x) for x in s[1:].split(".h")),
                                                 receivers)) for s in senders]
        np.testing.assert_allclose(np.asarray(got), expected, atol=1e-4)
        np.testing.assert_allclose(scored[0], diff(tl_edge_forward(tl, clean, mask, src)), atol=1e-4)
        if i:  # the second closure: same form, new values, nothing compiled
            assert (n_path, n_edges) == (0, 0)


@pytest.mark.parametrize("reads", ["last position", "every position"])
def test_path_patching_to_logits_with_a_callable_matches_transformerlens(models, tokens, reads):
    """A plain callable is narrowed to the logit positions it reads, as in sweeps, so path patching
    to the logits runs both passes there alone (it ran them at every position before): TransformerLens's
    two passes give the same numbers, for a callable reading the last position and one reading all."""
    tl, jp = models
    clean, corrupted = tokens
    rows, a, c = np.arange(B), np.array(ANSWERS), np.array(CONTRASTS)
    if reads == "last position":
        metric = lambda logits: (logits[rows, -1, a] - logits[rows, -1, c]).mean()
    else:
        metric = lambda logits: (logits[:, :, a[0]] - logits[:, :, c[0]]).mean()
    senders = ["a0.h1", "a1.h3", "a2.h2"]
    got = circuits.path_patch(jp, clean, corrupted, senders, "logits", metric)
    expected = [metric(reference.tl_path_patch(tl, clean, corrupted, tuple(int(x) for x in s[1:].split(".h")),
                                               ["logits"])) for s in senders]
    np.testing.assert_allclose(np.asarray(got), [float(e) for e in expected], atol=1e-4)


def test_path_patching_refusals(models, tokens):
    _, jp = models
    clean, corrupted = tokens
    metric = metrics.logit_diff(ANSWERS, CONTRASTS)
    with pytest.raises(ValueError, match="unknown writer"):
        circuits.path_patch(jp, clean, corrupted, ["a9.h0"], "logits", metric)
    with pytest.raises(ValueError, match="unknown receiver"):
        circuits.path_patch(jp, clean, corrupted, "heads", "a1.h1<x>", metric)
    with pytest.raises(ValueError, match="direction"):
        circuits.path_patch(jp, clean, corrupted, "heads", "logits", metric, direction="sideways")
    with pytest.raises(ValueError, match="same shape"):
        circuits.path_patch(jp, clean, corrupted[:, :-1], "heads", "logits", metric)


# --- faithfulness ----------------------------------------------------------------------------


def test_faithfulness_against_transformerlens(models, tokens):
    tl, jp = models
    tl.cfg_jp = jp.config
    clean, corrupted = tokens
    metric = metrics.logit_diff(ANSWERS, CONTRASTS)
    circuit = [("embed", "a0.h1"), ("a0.h1", "a2.h3<q>"), ("a2.h3", "logits"), ("m1", "logits"), ("embed", "m0")]
    got = circuits.faithfulness(jp, clean, corrupted, circuit, metric)
    writers, readers, valid = graph_names(jp.config)
    mask = np.zeros(valid.shape)
    for w, r in [("embed", "a0.h1<q>"), ("embed", "a0.h1<k>"), ("embed", "a0.h1<v>"), ("a0.h1", "a2.h3<q>"),
                 ("a2.h3", "logits"), ("m1", "logits"), ("embed", "m0")]:
        mask[writers.index(w), readers.index(r)] = 1
    assert got.n_edges == mask.sum()
    for ablation, src in (("corrupted", tl_writes(tl, corrupted)),
                          ("mean", {k: v.mean(0, keepdim=True) for k, v in tl_writes(tl, clean).items()})):
        got = circuits.faithfulness(jp, clean, corrupted, circuit, metric, ablation=ablation)
        circ, full, empty = (logit_diffs(tl_edge_forward(tl, clean, m, src)).mean() for m in (mask, valid, 0 * mask))
        assert got.circuit == pytest.approx(circ, abs=1e-4)
        assert got.full == pytest.approx(full, abs=1e-4)
        assert got.empty == pytest.approx(empty, abs=1e-4)
        assert got.faithfulness == pytest.approx((circ - empty) / (full - empty), abs=1e-4)
    nodes = circuits.faithfulness(jp, clean, corrupted, {"embed", "a0.h1", "m0", "m1", "m2"}, metric)
    assert nodes.n_edges == valid[[writers.index(n) for n in ("embed", "a0.h1", "m0", "m1", "m2")]].sum()
    with pytest.raises(ValueError, match="does not exist"):
        circuits.faithfulness(jp, clean, corrupted, [("a2.h0", "a1.h0<q>")], metric)
    with pytest.raises(ValueError, match="ablation"):
        circuits.faithfulness(jp, clean, corrupted, ["embed"], metric, ablation="zero")
    with pytest.raises(ValueError, match="undefined"):
        circuits.faithfulness(jp, clean[:1], corrupted[:1], ["embed"], metrics.logit_diff(ANSWERS[:1], CONTRASTS[:1]),
                              ablation="mean")


# --- ACDC ------------------------------------------------------------------------------------


def tl_acdc(tl, clean, corrupted, threshold):
    """Conmy et al.'s sequential loop, one hooked TransformerLens forward per tested edge."""
    writers, readers, valid = graph_names(tl.cfg_jp)
    src = tl_writes(tl, corrupted)
    with torch.no_grad():
        ref = torch.log_softmax(tl(torch.tensor(clean))[:, -1], -1)

    def cost(mask):
        logp = torch.log_softmax(torch.tensor(tl_edge_forward(tl, clean, mask, src))[:, -1], -1)
        return float((ref.exp() * (ref - logp)).sum(-1).mean())

    mask = valid.astype(float)
    current = cost(mask)
    for r in reversed(range(len(readers))):
        for w in sorted(np.flatnonzero(mask[:, r]), reverse=True):
            mask[w, r] = 0.0
            new = cost(mask)
            if new - current < threshold:
                current = new
            else:
                mask[w, r] = 1.0
    return mask.astype(bool)


def test_acdc_matches_the_sequential_algorithm(models, tokens, tmp_path):
    from jpatch.methods.circuits import acdc

    tl, jp = models
    tl.cfg_jp = jp.config
    clean, corrupted = tokens
    got = acdc(jp, clean, corrupted, threshold=0.01)
    expected = tl_acdc(tl, clean, corrupted, 0.01)
    assert 0 < expected.sum() < got.valid.sum()  # some edges kept, some removed
    np.testing.assert_array_equal(got.keep, expected)
    assert got.n_tested == got.valid.sum() and got.n_calls < got.n_tested
    data = json.loads(got.to_json(tmp_path / "acdc.json"))
    assert data["n_edges"] == expected.sum() == len(data["edges"])
    assert {(e["writer"], e["reader"]) for e in data["edges"]} == {
        (got.writers[i], got.readers[j]) for i, j in zip(*np.nonzero(expected))}
    got.plot(tmp_path / "acdc.png")
    assert (tmp_path / "acdc.png").stat().st_size > 1000


def test_acdc_thresholds_and_eap_order(models, tokens):
    from jpatch.methods.circuits import acdc

    _, jp = models
    clean, corrupted = tokens
    # Threshold 0 keeps every edge in exact arithmetic (KL starts at 0 and cannot fall); in float32
    # an edge whose effect is below rounding may go either way, and only such an edge.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        everything = acdc(jp, clean, corrupted, threshold=0.0)
    assert 0 < everything.noise < 1e-5
    removed = everything.valid & ~everything.keep
    assert (np.abs(everything.scores[removed]) <= everything.noise).all()
    assert removed.sum() < 0.05 * everything.valid.sum()
    # A decision within the noise of the threshold is warned about: the first edge tried (the logits'
    # latest writer) is tried from the full graph in every run, so its score is the same at any threshold.
    last = len(everything.readers) - 1
    first = max(np.flatnonzero(everything.valid[:, last]))
    with pytest.warns(RuntimeWarning, match=r"ACDC: \d+ edge decision\(s\) fell within float32 noise"):
        acdc(jp, clean, corrupted, threshold=float(everything.scores[first, last]))
    nothing = acdc(jp, clean, corrupted, threshold=1e9)
    assert not nothing.keep.any()
    eap = edge_attribution(jp, clean, corrupted, metrics.kl(), direction="noise")
    seeded = acdc(jp, clean, corrupted, threshold=0.01, order=eap, metric=metrics.logit_diff(ANSWERS, CONTRASTS))
    assert 0 < seeded.keep.sum() < seeded.valid.sum()
    with pytest.raises(ValueError, match="unknown metric"):
        acdc(jp, clean, corrupted, threshold=0.1, metric="logit-diff")


def test_acdc_recovers_a_planted_circuit(models, tokens):
    """Silence some heads and an MLP (their output weights zeroed): an edge from or into a silent
    component changes nothing, so the structure is known by construction. ACDC must keep no edge
    touching a silent component, and every live component must stay in the circuit."""
    import equinox as eqx

    from jpatch.methods.circuits import acdc

    _, jp = models
    clean, corrupted = tokens
    d_head = jp.config.d_model // H
    silent = {"a0.h1", "a1.h2", "a2.h0", "m1"}
    w_o, w_mlp = np.array(jp.blocks.attn.c_proj_w), np.array(jp.blocks.mlp.c_proj_w)
    for name in silent:
        if name.startswith("m"):
            w_mlp[int(name[1:])] = 0.0
        else:
            l, h = int(name[1]), int(name.split(".h")[1])
            w_o[l, h * d_head:(h + 1) * d_head] = 0.0
    planted = eqx.tree_at(lambda m: (m.blocks.attn.c_proj_w, m.blocks.mlp.c_proj_w), jp, (w_o, w_mlp))
    got = acdc(planted, clean, corrupted, threshold=1e-6)
    node = lambda name: name.split("<")[0]
    kept_writers = {got.writers[i] for i in np.flatnonzero(got.keep.any(1))}
    kept_readers = {node(got.readers[j]) for j in np.flatnonzero(got.keep.any(0))}
    assert not (kept_writers | kept_readers) & silent
    live = {w for w in got.writers if w not in silent}
    assert kept_writers == live  # every live component still reaches the logits
    assert kept_readers == (live - {"embed"}) | {"logits"}
    assert got.keep.sum() < got.valid.sum()


# --- the jpatch circuit report ---------------------------------------------------------------


def test_circuit_command_writes_the_report(tmp_path):
    import jax

    import jpatch
    from jpatch.data.tasks import ioi
    from jpatch.face import cli

    config = jpatch.GPT2Config(n_layer=2, n_head=2, d_model=32, d_mlp=64, n_ctx=32)
    model_dir = tmp_path / "m"
    jpatch.save(jpatch.GPT2.init(config, key=jax.random.PRNGKey(1), std=0.2), model_dir)
    out = tmp_path / "report"
    cli.main(["circuit", "--model", str(model_dir), "--n-prompts", "4", "--out", str(out),
              "--threshold", "0.001", "--top", "1", "--ig-steps", "2"])
    text = (out / "report.md").read_text()
    for section in ("heads -> logits", "S-inhibition", "## ACDC", "Faithfulness at matched size",
                    "Overlap with ACDC", "Wall times", "circuit.png"):
        assert section in text
    assert (out / "circuit.png").stat().st_size > 1000
    edges = json.loads((out / "circuit.json").read_text())
    assert edges["n_edges"] == len(edges["edges"]) and f"{edges['n_edges']} of {edges['n_valid_edges']}" in text
    task = ioi.ioi_task(4, seed=0, split="test", length=15)  # the held-out templates' most common length
    assert task.attention_mask is None
    model = jpatch.load(model_dir)
    expected = circuits.path_patch(model, task.clean_tokens, task.corrupted_tokens, "heads", "logits",
                                   task.metric())
    saved = json.loads((out / "figures.json").read_text())
    np.testing.assert_allclose(saved["to_logits"], expected, atol=1e-6)
    with pytest.raises(SystemExit):  # the folder exists: refused without --overwrite
        cli.main(["circuit", "--model", str(model_dir), "--n-prompts", "4", "--out", str(out)])
