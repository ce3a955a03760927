"""TransformerLens's demo notebooks (Main_Demo, Exploratory_Analysis_Demo, Attribution_Patching_Demo),
ported in examples/tl_*.py, run on jpatch and, as the notebooks write them, on TransformerLens 3.9's
HookedTransformer with the same weights (a small random GPT-2 over GPT-2's vocabulary, processed as
the notebooks load theirs): every number each ported cell produces agrees."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
PROCESSED = dict(fold_ln=True, center_writing_weights=True, center_unembed=True, fold_value_biases=True)


def build_models(**tl_settings):
    """(jpatch model, TransformerLens HookedTransformer) of one small random GPT-2 (2 layers, d_model 64,
    4 heads, GPT-2's tokenizer), both with from_pretrained's weight processing (TransformerLens's own,
    jpatch's `process_weights`); tl_settings: more of TransformerLens's load_and_process_state_dict."""
    import jpatch
    import reference
    from jpatch.model.convert import config_from_hf, from_hf_state_dict

    hf = reference.hf_model(seed=1, vocab_size=50257, n_embd=64, n_head=4, n_positions=256)
    hf.config.bos_token_id = hf.config.eos_token_id = 50256
    jp = jpatch.process_weights(from_hf_state_dict(reference.hf_state_dict(hf), config_from_hf(hf.config)),
                                **PROCESSED)
    return jp, lambda **more: tl_twin(hf, **tl_settings, **more)


def tl_twin(hf, **tl_settings):
    import reference
    from test_front import hf_gpt2_tokenizer

    global TOKENIZER
    if TOKENIZER is None:
        TOKENIZER = hf_gpt2_tokenizer()
    tl = reference.tl_model(hf, **{**PROCESSED, **tl_settings})
    tl.set_tokenizer(TOKENIZER, default_padding_side="right")
    tl.cfg.default_prepend_bos = True
    return tl


TOKENIZER = None


def example(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def as_numpy(x):
    if hasattr(x, "detach"):
        x = x.detach().numpy()
    return np.asarray(x)


def assert_same(ours, theirs, where, atol=1e-4):
    """Numbers equal within atol (eigenvalues in any order), strings, shapes and labels exactly."""
    if isinstance(theirs, (list, tuple)) and not (isinstance(theirs, tuple) and all(isinstance(t, int) for t in theirs)):
        assert len(ours) == len(theirs), where
        for i, (a, b) in enumerate(zip(ours, theirs)):
            assert_same(a, b, f"{where}[{i}]", atol)
        return
    if isinstance(theirs, dict):
        assert list(ours) == list(theirs), where
        for key in theirs:
            assert_same(ours[key], theirs[key], f"{where}[{key}]", atol)
        return
    if theirs is None:
        assert ours is None, where
        return
    if isinstance(theirs, str):  # a FactoredMatrix's repr names torch.Size
        theirs = theirs.replace("torch.Size([", "(").replace("])", ")")
    if isinstance(theirs, (str, bool)) or (isinstance(theirs, tuple)):
        assert tuple(ours) == theirs if isinstance(theirs, tuple) else ours == theirs, (where, ours, theirs)
        return
    a, b = as_numpy(ours), as_numpy(theirs)
    assert a.shape == b.shape, (where, a.shape, b.shape)
    if np.iscomplexobj(b):
        a, b = np.sort_complex(a.ravel()), np.sort_complex(b.ravel())
    np.testing.assert_allclose(a, b, atol=atol, rtol=1e-4, err_msg=where)


def compare(ours, theirs):
    """Every cell's numbers; the failures listed together."""
    assert set(ours) == set(theirs), set(ours) ^ set(theirs)
    failed = []
    for cell in theirs:
        try:
            assert_same(ours[cell], theirs[cell], cell)
        except AssertionError as e:
            failed.append(f"{cell}: {str(e)[:300]}")
    assert not failed, "\n".join(failed)


@pytest.fixture(scope="module")
def models(one_torch_thread):
    """The jpatch model (shared by the notebooks, its hooks and settings reset after each) and a
    function building its TransformerLens twin."""
    return build_models()


@pytest.fixture
def jp(models):
    model = models[0]
    yield model
    model.reset_hooks()
    model.set_use_attn_result(False)


def test_main_demo(models, jp):
    ours, theirs = example("tl_main_demo").run(jp, models[1](), sample=False)  # sampling: test_tl_idioms
    # TransformerLens's folded layer norms (LayerNormPre) have no weights; jpatch lists them (ones, zeros)
    folded = [(name, shape) for name, shape in ours["23 params"] if name not in dict(theirs["23 params"])]
    assert [name for name, _ in folded] == [f"blocks.0.{ln}.{p}" for ln in ("ln1", "ln2") for p in "wb"] + \
        ["ln_final.w", "ln_final.b"]
    ours["23 params"] = [item for item in ours["23 params"] if item not in folded]
    # HookedTransformer runs ln1's hooks once per q / k / v input; jpatch has unembed.hook_in / hook_out too
    hooked = ours["25 hook names and shapes"]
    assert hooked[-2:] == [("unembed.hook_in", (1, 10, 64)), ("unembed.hook_out", (1, 10, 50257))]
    ours["25 hook names and shapes"] = hooked[:-2]
    theirs["25 hook names and shapes"] = list(dict.fromkeys(theirs["25 hook names and shapes"]))
    compare(ours, theirs)


def test_exploratory_demo(models, jp):
    """Loaded as the notebook loads GPT-2: TransformerLens also refactors the factored attention
    matrices (which jpatch does not offer); no ported cell's number depends on it."""
    ours, theirs = example("tl_exploratory_demo").run(jp, models[1](refactor_factored_attn_matrices=True))
    compare(ours, theirs)


@pytest.fixture(scope="module")
def attribution_reference(models):
    """TransformerLens's numbers of the attribution demo (without the activation patching sweeps of
    cells 27 / 30 / 34, the notebook's NBVAL_SKIP, which jpatch's test_patching checks)."""
    return example("tl_attribution_demo").transformer_lens_cells(models[1](), act_patching=False)


@pytest.mark.parametrize("fast_api", [False, True])
def test_attribution_demo(jp, attribution_reference, fast_api):
    """The notebook's recipe (backward hooks) and, where the script marks it, one compiled forward and
    backward per run (run_with_cache(incl_bwd=True)); TransformerLens's head path attribution with its
    ln1 backward hook's three parts summed (see the script)."""
    demo = example("tl_attribution_demo")
    demo.FAST_API = fast_api
    ours = demo.cells(jp, act_patching=False)
    if fast_api:  # one cache holds the activations and their gradients (`<name>_grad`), as TransformerLens's
        ours["11 values"][2] //= 2
    compare(ours, attribution_reference)
