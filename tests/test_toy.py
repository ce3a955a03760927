"""The bundled toy model (weights/toy/, trained by scripts/train_toy.py) solves the three
paper tasks on held-out prompts, over the full vocabulary, in bfloat16: IOI on held-out
templates x held-out names (of different lengths, names at different positions), with and
without a leading <|endoftext|>; both the held-out templates made of train words (split
"test") and those none of whose words but the names an IOI training prompt holds (split
"novel", `ioi.FILLER_HELD_OUT_TEMPLATES`: the IO / S decision rests on the names alone).

The figures are recomputed here from the model, independently of training.json, and
then compared with the numbers training.json records."""

import importlib.util
import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

import jpatch
from jpatch.model.checkpoint import resolve
from jpatch.data.tasks import factual, greater_than, ioi

N_IOI = N_GT = 1000  # the sets training.json's figures were computed on (seed 123, test splits)
SEED = 123


@pytest.fixture(scope="module")
def model():
    return jpatch.load("toy")


@pytest.fixture(scope="module")
def record():
    return json.loads((resolve("toy") / "training.json").read_text())


def last_logits(model, tokens, lengths=None):
    """Logits at each prompt's last real token (right padding: causal attention never reads it)."""
    tokens = jnp.asarray(tokens)
    ends = np.full(tokens.shape[0], tokens.shape[1]) if lengths is None else np.asarray(lengths)
    return np.asarray(model(tokens, logits_at=jnp.asarray(ends - 1)[:, None])[:, 0])


@pytest.fixture(scope="module")
def figures(model):
    out = {}
    for split, templates, name in (("test", ioi.TEST_TEMPLATES, "ioi"), ("novel", ioi.NOVEL_TEMPLATES, "ioi_novel")):
        for bos in (False, True):
            task = ioi.ioi_task(N_IOI, seed=SEED, split=split, bos=bos)
            held_out = {get_id(n) for n in ioi.split_names()[1]}
            assert set(task.answers) <= held_out and set(task.contrasts) <= held_out  # held-out names only
            assert set(task.info["template"]) == set(templates)  # every held-out template, no other
            assert len(set(task.lengths)) >= 3 and len({tuple(k) for k in task.key_positions.tolist()}) >= 4
            assert (task.clean_tokens[:, 0] == 50256).all() == bos
            logits = last_logits(model, task.clean_tokens, task.lengths)
            n = np.arange(len(task))
            right = logits[n, task.answers] - logits[n, task.contrasts] > 0
            key = f"{name}_bos" if bos else name
            out[f"{key}_logit_diff_positive_frac"] = float(right.mean())
            out[f"{key}_worst_template_positive_frac"] = min(float(right[task.info["template"] == t].mean())
                                                             for t in templates)

    # the train templates with held-out names: the name hold-out alone
    task = ioi.ioi_task(2 * N_IOI, seed=321, names=ioi.split_names()[1], split="all")
    task = task.select(np.flatnonzero(~np.isin(task.info["template"], ioi.TEST_TEMPLATES))[:N_IOI])
    logits = last_logits(model, task.clean_tokens, task.lengths)
    n = np.arange(len(task))
    out["ioi_train_templates_logit_diff_positive_frac"] = float(
        (logits[n, task.answers] - logits[n, task.contrasts] > 0).mean())

    ok = {}
    for task in factual.factual_task():
        top1 = last_logits(model, task.clean_tokens).argmax(-1)  # over all 50257 tokens
        for pair, hit in zip(task.info["pair"], top1 == task.answers):
            ok[int(pair)] = ok.get(int(pair), True) and bool(hit)
    assert len(ok) == len(factual.load_pairs())
    out["factual_pair_top1"] = float(np.mean(list(ok.values())))

    task = greater_than.greater_than_task(N_GT, seed=SEED, split="test")
    assert set(np.unique([p.split()[1] for p in task.prompts])) <= set(greater_than.split_nouns()[1])
    logits = last_logits(model, task.clean_tokens).astype(np.float64)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs = probs / probs.sum(-1, keepdims=True)
    years = probs[:, greater_than.YEAR_TOKEN_IDS]
    greater = np.arange(100)[None, :] > task.info["yy"][:, None]
    out["greater_than_prob_diff"] = float((np.where(greater, years, 0).sum(-1) - np.where(greater, 0, years).sum(-1)).mean())
    return out


def get_id(name):
    return jpatch.get_tokenizer().token_id(" " + name)


def test_bf16_and_small(model):
    assert model.dtype == jnp.float32  # stored in bfloat16, analysed in float32 by default
    stored = jpatch.load("toy", dtype=None)
    assert all(a.dtype == jnp.bfloat16 for a in jpatch.model.checkpoint.named_arrays(stored).values())
    assert model.config.d_vocab == 50257
    size = sum(f.stat().st_size for f in resolve("toy").rglob("*") if f.is_file())
    assert size < 20 * 2**20, f"weights/toy is {size / 2**20:.1f} MiB"


# Measured on the bundled model: 0.998 without BOS and 0.999 with (held-out templates x held-out
# names, 1000 prompts each); the train templates with held-out names: 0.998. The target:
# IO above S on at least 95% of them, with and without BOS.
def test_ioi_held_out_templates_and_names(figures):
    assert figures["ioi_logit_diff_positive_frac"] >= 0.95
    assert figures["ioi_bos_logit_diff_positive_frac"] >= 0.95


# Measured on the bundled model (issue 21 item 5): 98.6% without BOS and 97.7% with it; the worst
# template 90% / 85% (8 templates, 1000 prompts each setting; the previous toy, which found the IO
# by the train templates' words and positions: 20.8% / 17.7%). The target, as for the other
# held-out templates: IO above S on at least 95% of prompts, with and without BOS.
def test_ioi_filler_held_out_templates(figures):
    assert figures["ioi_novel_logit_diff_positive_frac"] >= 0.95
    assert figures["ioi_novel_bos_logit_diff_positive_frac"] >= 0.95


def _train_toy():
    spec = importlib.util.spec_from_file_location("train_toy", Path(__file__).parents[1] / "scripts" / "train_toy.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_filler_held_out_words_never_in_ioi_training():
    """No word of the "novel" templates, places and objects (names aside) is a word of the train
    templates or word lists, nor of any token an IOI training prompt of scripts/train_toy.py can
    hold (template words, broad-list and untrained filler words, the other tasks' words as fillers,
    punctuation, pool names)."""
    held_out = ioi.filler_held_out_words()
    assert len(held_out) >= 40 and not held_out & ioi.train_words()
    tok = jpatch.get_tokenizer()
    novel = ioi.ioi_task(200, seed=0, split="novel")
    names = {get_id(n) for n in ioi.NAMES}
    novel_ids = {int(t) for row, k in zip(novel.clean_tokens, novel.lengths) for t in row[:k]} - names
    train = ioi.ioi_task(400, seed=0, split="train")
    train_ids = {int(t) for row, k in zip(train.clean_tokens, train.lengths) for t in row[:k]}
    assert not novel_ids & train_ids
    toy = _train_toy()
    data = toy.build_data(0, n_ioi=200, n_gt=200, wide=True)  # asserts the same over everything it samples from
    pools = ("ioi_words", "broad", "unknown", "punctuation", "name_pool", "task_words")
    sampled = {int(t) for key in pools for t in data[key]}
    assert len(data["broad"]) == toy.N_BROAD and len(data["unknown"]) == toy.N_UNKNOWN
    assert not sampled & novel_ids
    assert not {toy.word(tok.backend.id_to_token(t)) for t in sampled} & held_out


def test_ioi_train_templates_held_out_names(figures):
    assert figures["ioi_train_templates_logit_diff_positive_frac"] >= 0.95


def test_factual_recall_full_vocab_top1(figures):
    assert figures["factual_pair_top1"] >= 0.90


def test_greater_than_prob_diff_held_out_nouns(figures):
    assert figures["greater_than_prob_diff"] >= 0.5


def test_training_json_matches(figures, record):
    for key in ("seed", "steps", "train_seconds", "losses", "eval"):
        assert key in record
    assert record["saved_dtype"] == "bfloat16"
    assert record["train_seconds"] < 45 * 60  # the budget on the project's 2-core CPU
    for key, value in figures.items():
        assert abs(record["eval"][key] - value) < 0.01, (key, record["eval"][key], value)
