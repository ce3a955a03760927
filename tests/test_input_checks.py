"""Issue 21's silent wrong results, each refused with a clear message: one input check shared by every
method (token ids past the vocabulary or negative, clean == corrupted under a "range" metric, a NaN or
[batch, 5] metric, a batch that looks right-padded without a mask), and model / dataset files (NaN or
inf weights, an integer load dtype, a bfloat16 cast past its range, a flipped byte, invalid UTF-8).
Inputs are built by hand; nothing is compared with jpatch's own output."""

import json
import re

import equinox as eqx
import jax.numpy as jnp
import numpy as np
import pytest

import reference
from jpatch import patching
from jpatch.data.dataset import read_dataset
from jpatch.engine.sweep import sweep
from jpatch.methods import agreement, attribution, circuits, edges, metrics
from jpatch.model import checkpoint
from jpatch.model.convert import convert_hf

V = reference.TINY["vocab_size"]
B, T = 3, 6
PAD = V - 1  # the tiny model's pad id: the vocabulary's last (it has no tokenizer)


def tokens():
    """Clean and corrupted [B, T] tokens, none ending in the pad id."""
    clean = (np.arange(B * T).reshape(B, T) * 7 + 3) % (V - 1)
    corrupted = clean.copy()
    corrupted[:, 1] = (clean[:, 1] + 19) % (V - 1)
    return clean.astype(np.int32), corrupted.astype(np.int32)


METRIC = metrics.logit_diff([1, 2, 3], [4, 5, 6])


def every_method(jp, metric=METRIC):
    """name -> call(clean, corrupted) of each method that takes clean and corrupted inputs."""
    cache = lambda clean: jp.run_with_cache(jnp.asarray(clean))[1]
    return {
        "sweep": lambda c, k: sweep(jp, c, k, "resid_pre", metric, progress=False),
        "get_act_patch": lambda c, k: patching.get_act_patch_resid_pre(jp, k, cache(tokens()[0]), metric,
                                                                       progress=False),
        "get_attr_patch": lambda c, k: attribution.get_attr_patch_resid_pre(jp, k, cache(tokens()[0]), metric),
        "attribute": lambda c, k: attribution.attribute(jp, c, k, "resid_pre", metric),
        "edge_attribution": lambda c, k: edges.edge_attribution(jp, c, k, metric),
        "path_patch": lambda c, k: circuits.path_patch(jp, c, k, "heads", "logits", metric),
        "faithfulness": lambda c, k: circuits.faithfulness(jp, c, k, {"embed"}, metric),
        "acdc": lambda c, k: circuits.acdc(jp, c, k, threshold=0.1),
        "agreement": lambda c, k: agreement.subset_effects(jp, c, k, "resid_pre", metric, ("layer", "pos"), []),
    }


@pytest.mark.parametrize("bad_id", [V + 89, -5])
def test_token_ids_outside_the_vocabulary_are_refused_by_every_method(jp_tiny, bad_id):
    # In a compiled forward the embedding lookup clamps V + 89 to V - 1 and wraps -5 to V - 5.
    clean, corrupted = tokens()
    bad = corrupted.copy()
    bad[1, 2] = bad_id
    for name, call in every_method(jp_tiny).items():
        with pytest.raises(ValueError, match=rf"token id {bad_id} at \[batch 1, pos 2\] is outside the vocabulary"):
            call(clean, bad)
            pytest.fail(f"{name} accepted token id {bad_id}")
        if name not in ("get_act_patch", "get_attr_patch"):  # these take the clean run as a cache
            with pytest.raises(ValueError, match=rf"token id {bad_id} .* outside the vocabulary"):
                call(bad, corrupted)
                pytest.fail(f"{name} accepted clean token id {bad_id}")


def test_a_batch_that_looks_right_padded_is_refused_by_every_method(jp_tiny):
    clean, corrupted = tokens()
    clean[0, -2:] = corrupted[0, -2:] = PAD  # prompt 0 ends in pad ids, the others do not
    for name, call in every_method(jp_tiny).items():
        with pytest.raises(ValueError, match=rf"prompts \[0\] end in the pad token {PAD} .* looks right-padded"):
            call(clean, corrupted)
            pytest.fail(f"{name} accepted a batch that looks padded")


@pytest.mark.filterwarnings("ignore:.*encountered in divide:RuntimeWarning")
def test_identical_clean_and_corrupted_runs_are_refused_under_a_range_metric(jp_tiny):
    """clean == corrupted: the clean - corrupted gap is 0 (or float32 rounding, from two programs),
    so a "range" metric's normalized value would be noise over noise."""
    clean, _ = tokens()
    calls = every_method(jp_tiny)
    same = r"scores the clean and corrupted runs the same( for prompt \d+)? up to float32 rounding"
    for name in ("attribute", "edge_attribution", "path_patch", "agreement"):
        with pytest.raises(ValueError, match=same):
            calls[name](clean, clean)
            pytest.fail(f"{name} normalized by a zero gap")
    # an exactly 0 gap (the sweep's; attribute's on some CPUs) makes every patch 0 / 0, named as not finite
    exactly_zero = rf"{same}|not finite for \d+ patch\(es\).*baselines are equal"
    with pytest.raises((ValueError, FloatingPointError), match=exactly_zero):
        attribution.attribute(jp_tiny, clean, clean, "z", METRIC, per_prompt=True)
    with pytest.raises((ValueError, FloatingPointError), match=exactly_zero):
        calls["sweep"](clean, clean)


@pytest.mark.parametrize("kind", ["nan", "batch x 5"])
def test_a_metric_that_is_not_one_finite_value_per_prompt_is_refused(jp_tiny, kind):
    clean, corrupted = tokens()
    fn = (lambda logits: logits[:, -1, 0] * jnp.nan) if kind == "nan" else (lambda logits: logits[:, -1, :5])
    metric = metrics.from_callable(fn)
    message = "is not finite" if kind == "nan" else rf"must return a scalar or one value per prompt \({B}\), got shape \({B}, 5\)"
    for name in ("edge_attribution", "path_patch"):
        with pytest.raises((ValueError, FloatingPointError), match=message):
            every_method(jp_tiny, metric)[name](clean, corrupted)
            pytest.fail(f"{name} accepted a {kind} metric")


# --- model and dataset files --------------------------------------------------------------------


def with_value(model, value):
    """The model with one weight (blocks.mlp.c_fc_b of layer 1, entry 3) set to `value`."""
    return eqx.tree_at(lambda m: m.blocks.mlp.c_fc_b, model, model.blocks.mlp.c_fc_b.at[1, 3].set(value))


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_load_refuses_non_finite_weights(jp_tiny, tmp_path, value):
    saved = checkpoint.save(with_value(jp_tiny, value), tmp_path / "m")
    with pytest.raises(ValueError, match=r"tensor 'blocks\.mlp\.c_fc_b' has 1 non-finite value"):
        checkpoint.load(saved)


def test_load_refuses_a_non_float_dtype(jp_tiny, tmp_path):
    saved = checkpoint.save(jp_tiny, tmp_path / "m")
    for dtype in ("int8", jnp.int32, "bool", "no-such-dtype"):
        with pytest.raises(ValueError, match="dtype must be a floating-point dtype"):
            checkpoint.load(saved, dtype=dtype)


def test_convert_checks_finiteness_after_the_cast(hf_tiny, tmp_path):
    from safetensors.numpy import save_file

    state = {k: v.copy() for k, v in reference.hf_state_dict(hf_tiny).items()}  # not the shared model's memory
    state["transformer.h.1.mlp.c_fc.bias"][3] = 3.4e38  # finite in float32, past bfloat16's largest (3.39e38)
    folder = tmp_path / "hf"
    folder.mkdir()
    hf_tiny.config.to_json_file(folder / "config.json")
    save_file(state, folder / "model.safetensors")
    with pytest.raises(ValueError, match=r"tensor 'h\.1\.mlp\.c_fc\.bias' has 1 non-finite value.* as bfloat16"):
        convert_hf(folder, tmp_path / "bf16", dtype="bfloat16")
    assert not (tmp_path / "bf16").exists()
    model = checkpoint.load(convert_hf(folder, tmp_path / "f32"))  # float32 holds it
    assert float(model.blocks.mlp.c_fc_b[1, 3]) == np.float32(3.4e38)


def test_a_flipped_byte_in_a_saved_model_is_refused(jp_tiny, tmp_path):
    saved = checkpoint.save(jp_tiny, tmp_path / "m")
    data = max((f for f in (saved / "checkpoint").rglob("*") if f.is_file()), key=lambda f: f.stat().st_size)
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    data.write_bytes(bytes(raw))
    name = data.relative_to(saved).as_posix()
    with pytest.raises(ValueError, match=rf"corrupt or unreadable checkpoint .*: {name} does not match the sha256"):
        checkpoint.load(saved)


def test_a_model_saved_without_checksums_still_loads(jp_tiny, tmp_path):
    saved = checkpoint.save(jp_tiny, tmp_path / "m")
    config = json.loads((saved / "config.json").read_text())
    del config["sha256"]  # as a folder saved before jpatch wrote the checksums
    (saved / "config.json").write_text(json.dumps(config))
    loaded = checkpoint.load(saved)
    np.testing.assert_array_equal(loaded.wte, jp_tiny.wte)
    np.testing.assert_array_equal(loaded.blocks.mlp.c_fc_w, jp_tiny.blocks.mlp.c_fc_w)


def test_invalid_utf8_in_a_dataset_names_the_file_and_byte_offset(tmp_path):
    good = json.dumps({"clean": "When Mary and John went to the store, John gave a drink to",
                       "corrupted": "When Mary and John went to the store, Mary gave a drink to",
                       "answer": " Mary", "contrast": " John"}).encode() + b"\n"
    bad = good.replace(b"store", b"st\xffre")
    path = tmp_path / "data.jsonl"
    path.write_bytes(good + bad)
    offset = len(good) + bad.index(b"\xff")
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}.*\n.*line 2: invalid UTF-8 at byte offset {offset} of the file"):
        read_dataset(path)


def test_rounding_is_relative_to_the_scores_size():
    """A tiny but real gap (the paper rerun's probabilities on the toy: 1.76374e-05 vs 1.75523e-05,
    0.5% apart) is not rounding; float32 rounding of one number is, at any size, and so is 0 vs 0."""
    from jpatch.engine.inputs import rounding_equal

    assert not rounding_equal(1.76374e-05, 1.75523e-05)
    assert rounding_equal(np.float32(1.76374e-05), np.float32(1.76374e-05) * (1 + 2 ** -23))
    assert rounding_equal(3.25, 3.25 + 1e-6) and rounding_equal(0.0, 0.0)
    assert not rounding_equal(1e-3, 1.1e-3)
