"""Tasks: IOI, paired facts and greater-than data, corruptions, splits, metric, files."""

import json

import jax
import numpy as np
import pytest

from jpatch.data.tasks import TASKS, Task, combine, get_task, read_jsonl
from jpatch.data.tasks import factual, greater_than, ioi
from jpatch.model.tokenizer import get_tokenizer

tok = get_tokenizer()


def ids(words):
    return [tok.token_id(" " + w) for w in words]


# --- IOI ---------------------------------------------------------------------------------------

def test_ioi_words_are_single_tokens():
    assert len(ioi.NAMES) >= 40 and len(set(ioi.NAMES)) == len(ioi.NAMES)
    for words in (ioi.NAMES, ioi.PLACES, ioi.OBJECTS):
        bad = [w for w in words if not tok.is_single_token(" " + w)]
        assert not bad


def test_ioi_templates_vary_in_length_and_name_positions():
    assert len(ioi.BABA_TEMPLATES) >= 15 and len(ioi.ABBA_TEMPLATES) == len(ioi.BABA_TEMPLATES)
    a, b = " Mary", " John"
    lengths, positions = set(), set()
    for abba in (False, True):
        for i in range(len(ioi.BABA_TEMPLATES)):
            toks = tok.to_str_tokens(tok.encode(ioi._prompt(i, abba, a.strip(), b.strip(), "store", "drink")))
            at = lambda name: [p for p, t in enumerate(toks) if t == name]
            assert len(at(a)) == 1 and len(at(b)) == 2 and toks[-1] == " to"
            first = min(at(a) + at(b))
            assert toks[first] == (a if abba else b)  # ABBA names the IO first, BABA the subject
            assert at(b)[1] > at(a)[0]  # the subject is repeated after both names
            lengths.add(len(toks))
            positions.add((first, at(b)[1]))
    assert len(lengths) >= 5 and len(positions) >= 8


def test_ioi_template_split():
    train, test = ioi.split_templates()
    assert set(train).isdisjoint(test) and sorted(train + test) == list(range(len(ioi.BABA_TEMPLATES)))
    assert len(test) >= 5 and len(train) >= 15
    # every word of a held-out template occurs in a train template (only the sentences are new)
    words = lambda i: set(tok.encode(ioi._prompt(i, False, "Mary", "John", "store", "drink")))
    seen = set().union(*(words(i) for i in train))
    for i in test:
        assert words(i) - set(ids(["Mary", "John", "store", "drink"])) <= seen, ioi.BABA_TEMPLATES[i]
    for split, templates in (("train", train), ("test", test)):
        assert set(ioi.ioi_task(200, split=split).info["template"].tolist()) == set(templates)


def _unpadded(task, field):
    return [row[:n].tolist() for row, n in zip(getattr(task, field), task.lengths)]


def test_ioi_task_answers_and_abc_corruption():
    task = ioi.ioi_task(64, seed=3)
    n = len(task)
    assert task.clean_tokens.shape == task.corrupted_tokens.shape and task.clean_tokens.dtype == np.int32
    assert task.attention_mask is not None and len(set(task.lengths.tolist())) > 2  # ragged, right-padded
    assert (task.info["end_position"] == task.lengths - 1).all()
    rows = np.arange(n)
    clean, corrupted = task.clean_tokens, task.corrupted_tokens
    # answer = IO, contrast = S (named twice), and IO != S
    assert (clean[rows, task.info["io_position"]] == task.answers).all()
    assert (clean[rows, task.info["s1_position"]] == task.contrasts).all()
    assert (clean[rows, task.info["s2_position"]] == task.contrasts).all()
    assert (task.answers != task.contrasts).all()
    assert set(task.info["abba"].tolist()) == {False, True}
    first = np.minimum(task.info["io_position"], task.info["s1_position"])
    assert (task.key_positions[:, 0] == first).all()
    assert (task.last_key_position == task.info["s2_position"]).all()
    assert len(set(map(tuple, task.key_positions.tolist()))) > 4  # names at varied positions
    # corrupted differs from clean exactly at the three name positions
    key = task.key_mask()
    assert ((clean != corrupted) == key).all()
    names = set(ids(ioi.NAMES))
    for i in range(n):
        new = corrupted[i, task.key_positions[i]].tolist()
        assert len(set(new)) == 3 and set(new) <= names
        assert not set(new) & {int(task.answers[i]), int(task.contrasts[i])}
    # texts agree with tokens
    assert [tok.encode(p) for p in task.prompts] == _unpadded(task, "clean_tokens")
    assert [tok.encode(p) for p in task.corrupted_prompts] == _unpadded(task, "corrupted_tokens")
    m = task.metric()
    assert m.name == "logit_diff" and m.normalize == "range"
    assert (m.data["answer"] == task.answers).all() and (m.data["contrast"] == task.contrasts).all()


def test_ioi_no_positional_rule_finds_the_answer():
    """With both orders and varied templates, no fixed token position holds the IO name (or,
    counted from the end, the last name before it) in much more than half of the prompts."""
    for split in ("train", "test"):
        for bos in (False, True):
            task = ioi.ioi_task(600, seed=7, split=split, bos=bos)
            is_io = task.clean_tokens == task.answers[:, None]
            assert is_io.mean(0).max() < 0.6
            from_end = np.stack([np.roll(row, -n)[::-1] for row, n in zip(is_io, task.lengths)])
            assert from_end.mean(0).max() < 0.6


def test_ioi_bos_prepends_endoftext():
    plain, bos = ioi.ioi_task(16, seed=5), ioi.ioi_task(16, seed=5, bos=True)
    assert (bos.clean_tokens[:, 0] == 50256).all() and (bos.corrupted_tokens[:, 0] == 50256).all()
    assert _unpadded(bos, "clean_tokens") == [[50256] + r for r in _unpadded(plain, "clean_tokens")]
    assert (bos.key_positions == plain.key_positions + 1).all() and bos.info["bos"].all()
    assert [tok.encode(p) for p in bos.prompts] == _unpadded(bos, "clean_tokens")
    with pytest.raises(ValueError, match="bos"):
        ioi.ioi_task(4, bos="yes")


def test_ioi_deterministic_and_seeded():
    a, b, c = ioi.ioi_task(20, seed=1), ioi.ioi_task(20, seed=1), ioi.ioi_task(20, seed=2)
    assert a.prompts == b.prompts and a.corrupted_prompts == b.corrupted_prompts
    assert a.prompts != c.prompts


def test_ioi_name_split_is_disjoint_and_used():
    train, test = ioi.split_names()
    assert set(train).isdisjoint(test) and set(train) | set(test) == set(ioi.NAMES)
    assert test == ioi.NAMES[3::4]
    for split, pool in (("train", train), ("test", test)):
        task = ioi.ioi_task(40, split=split)
        used = set(np.concatenate([np.take_along_axis(t, task.key_positions, 1).ravel()
                                   for t in (task.clean_tokens, task.corrupted_tokens)]).tolist())
        assert used <= set(ids(pool))
    texts = ioi.ioi_prompts_text(30, split="test")
    assert all(t.endswith(".") for t in texts)
    train_ids = set(ids(train))
    assert not any(i in train_ids for t in texts for i in tok.encode(t))


def test_ioi_bad_arguments():
    with pytest.raises(ValueError, match="Christopherson"):
        ioi.ioi_task(4, names=["Mary", "John", "Christopherson", "Anna", "Paul", "Tom"])
    with pytest.raises(ValueError, match="at least 5"):
        ioi.ioi_task(4, names=["Mary", "John", "Anna", "Paul"])
    with pytest.raises(ValueError, match="split"):
        ioi.ioi_task(4, split="dev")


# --- factual -----------------------------------------------------------------------------------

def _subject_diff(p1, p2):
    """The differing middle of two prompts (after the common prefix / suffix), widened to whole words."""
    i = 0
    while p1[i] == p2[i]:
        i += 1
    while i and p1[i - 1] != " ":
        i -= 1
    j = 0
    while p1[-1 - j] == p2[-1 - j]:
        j += 1
    while j and p1[len(p1) - j] != " ":
        j -= 1
    return p1[:i], p1[i:len(p1) - j], p2[i:len(p2) - j], p1[len(p1) - j:]


def test_bundled_paired_facts():
    lines = [json.loads(l) for l in factual.default_path().read_text().splitlines() if l.strip()]
    assert len(lines) >= 110
    assert len({tuple(d["pair"]) for d in lines}) == len(lines)
    for d in lines:
        assert set(d) == {"pair", "answer"}
        p1, p2 = d["pair"]
        a1, a2 = d["answer"]
        assert a1 != a2 and a1.startswith(" ") and a2.startswith(" ")
        assert tok.is_single_token(a1) and tok.is_single_token(a2)
        t1, t2 = tok.encode(p1), tok.encode(p2)
        assert len(t1) == len(t2), d
        # identical templates apart from the subject, and equal subject token lengths
        prefix, s1, s2, suffix = _subject_diff(p1, p2)
        assert p1 == prefix + s1 + suffix and p2 == prefix + s2 + suffix
        spans = []
        for p, s in ((p1, s1), (p2, s2)):
            offsets = tok.backend.encode(p, add_special_tokens=False).offsets
            at, end = len(prefix), len(prefix) + len(s)
            covering = [k for k, (a, b) in enumerate(offsets) if a < end and b > at]
            spans.append((covering[0], covering[-1] + 1))
        assert spans[0] == spans[1], d
        diff = [k for k in range(len(t1)) if t1[k] != t2[k]]
        assert diff and spans[0][0] <= diff[0] and diff[-1] < spans[0][1]
    pairs = factual.load_pairs()
    assert len(pairs) == len(lines)


def test_factual_task_buckets():
    pairs = factual.load_pairs()
    tasks = factual.factual_task()
    assert sum(len(t) for t in tasks) == 2 * len(pairs)
    assert [(t.seq_len, t.key_positions.shape[1]) for t in tasks] == sorted({(t.seq_len, t.key_positions.shape[1])
                                                                            for t in tasks})
    for t in tasks:
        rows = np.arange(len(t))
        differ = t.clean_tokens != t.corrupted_tokens
        key = np.zeros_like(differ)
        key[rows[:, None], t.key_positions] = True
        assert not (differ & ~key).any()  # only subject tokens differ ...
        assert differ[rows, t.key_positions[:, 0]].all() and differ[rows, t.last_key_position].all()  # ... at both ends
        assert (t.last_key_position == t.key_positions.max(1)).all()
        assert (np.diff(t.key_positions, axis=1) == 1).all()
        assert (t.answers != t.contrasts).all()
        assert [tok.encode(p) for p in t.prompts] == t.clean_tokens.tolist()
    # each pair appears both ways round
    first = tasks[0]
    by_pair = {}
    for t in tasks:
        for i in range(len(t)):
            by_pair.setdefault(int(t.info["pair"][i]), []).append((t.prompts[i], t.corrupted_prompts[i],
                                                                   int(t.answers[i]), int(t.contrasts[i])))
    for (c1, x1, a1, b1), (c2, x2, a2, b2) in by_pair.values():
        assert (c1, x1, a1, b1) == (x2, c2, b2, a2)
    one = factual.factual_task(length=first.seq_len, subject_length=first.key_positions.shape[1])
    assert one.prompts == first.prompts
    with pytest.raises(ValueError, match="available"):
        factual.factual_task(length=1000)
    texts = factual.factual_prompts_text()
    assert len(texts) == 2 * len(pairs) and texts[0] == pairs[0].prompts[0] + pairs[0].answers[0]


GOOD = {"pair": ["The capital of France is", "The capital of Japan is"], "answer": [" Paris", " Tokyo"]}


@pytest.mark.parametrize("bad, reason", [
    ('{"pair": ["a", "b"], "answer": [" x", " y"]', "not valid JSON"),
    (json.dumps({"pair": GOOD["pair"]}), "missing 'answer'"),
    (json.dumps({"pair": GOOD["pair"][:1], "answer": GOOD["answer"]}), "two strings"),
    (json.dumps({"pair": GOOD["pair"], "answer": [" Paris", " Reykjavik"]}), "not a single GPT-2 token"),
    (json.dumps({"pair": GOOD["pair"], "answer": [" Paris", " Paris"]}), "distinct"),
    (json.dumps({"pair": ["The capital of France is", "The capital of Kyrgyzstan is"], "answer": [" Paris", " Oslo"]}),
     "different token lengths"),
    (json.dumps({"pair": ["The capital of France is", "The capital of France is"], "answer": [" Paris", " Oslo"]}),
     "identical"),
    (json.dumps([1, 2]), "JSON object"),
])
def test_load_pairs_names_the_bad_line(tmp_path, bad, reason):
    path = tmp_path / "facts.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n" + bad + "\n" + json.dumps(GOOD) + "\n")
    with pytest.raises(ValueError, match=f"line 3: .*{reason}"):
        factual.load_pairs(path)
    with pytest.raises(ValueError, match="line 3"):
        get_task(str(path))


def test_load_pairs_subject_field(tmp_path):
    line = {"pair": ["Michael Jordan played the sport of", "Michael Phelps played the sport of"],
            "answer": [" basketball", " swimming"]}
    path = tmp_path / "facts.jsonl"
    path.write_text(json.dumps(line) + "\n")
    (pair,) = factual.load_pairs(path)
    assert pair.subject == (1, 2)  # only " Jordan" / " Phelps" differ
    line["subject"] = ["Michael Jordan", "Michael Phelps"]
    path.write_text(json.dumps(line) + "\n")
    (pair,) = factual.load_pairs(path)
    start, stop = pair.subject
    assert start == 0 and "".join(tok.to_str_tokens(list(pair.tokens[0][start:stop]))) == "Michael Jordan"
    line["subject"] = ["Michael Jordan", "Tiger Woods"]
    path.write_text(json.dumps(line) + "\n")
    with pytest.raises(ValueError, match="line 1: subject 'Tiger Woods' does not occur"):
        factual.load_pairs(path)


# --- greater-than ------------------------------------------------------------------------------

def test_greater_than_vocab():
    assert greater_than.YEAR_TOKEN_IDS.tolist() == [tok.token_id(f"{y:02d}") for y in range(100)]
    assert len(greater_than.NOUNS) >= 30 and len(set(greater_than.NOUNS)) == len(greater_than.NOUNS)
    assert all(tok.is_single_token(" " + n) for n in greater_than.NOUNS)
    assert all(tok.is_single_token(f" {xx}") for xx in greater_than.CENTURIES)
    train, test = greater_than.split_nouns()
    assert set(train).isdisjoint(test) and set(train) | set(test) == set(greater_than.NOUNS)


def test_greater_than_task():
    task = greater_than.greater_than_task(50, seed=0)
    n = len(task)
    assert task.clean_tokens.shape == (n, greater_than.PROMPT_LEN)
    yy, xx = task.info["yy"], task.info["xx"]
    assert ((yy >= 2) & (yy <= 98)).all() and set(xx.tolist()) <= set(greater_than.CENTURIES)
    year_ids = greater_than.YEAR_TOKEN_IDS
    assert (task.clean_tokens[:, 7] == year_ids[yy]).all()
    assert (task.corrupted_tokens[:, 7] == year_ids[1]).all()
    differ = task.clean_tokens != task.corrupted_tokens
    assert not differ[:, np.arange(12) != 7].any()
    assert (task.key_positions == 7).all() and (task.last_key_position == 7).all()
    assert (task.answers == year_ids[yy + 1]).all() and (task.contrasts == year_ids[yy]).all()
    for p, c, x, y in zip(task.prompts, task.corrupted_prompts, xx, yy):
        assert p.endswith(f"from the year {x}{y:02d} to the year {x}") and f"year {x}01 to" in c
        assert tok.to_str_tokens(p)[6:8] == [f" {x}", f"{y:02d}"]
    for split, nouns in zip(("train", "test"), greater_than.split_nouns()):
        t = greater_than.greater_than_task(30, split=split)
        assert {p.split()[1] for p in t.prompts} <= set(nouns)
    m = task.metric()
    assert m.name == "greater_than" and m.normalize == "range" and (m.data["yy"] == yy).all()
    assert task.metric(normalize="none").normalize == "none"


def test_greater_than_metric_matches_numpy():
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    batch, vocab = 6, tok.vocab_size
    logits = rng.normal(size=(batch, 2, vocab)).astype(np.float32) * 3
    # put visible mass on the year tokens
    logits[:, :, greater_than.YEAR_TOKEN_IDS] += rng.normal(size=(batch, 2, 100)) * 2 + 6
    yy = np.array([2, 17, 32, 50, 90, 98])
    metric = greater_than.greater_than_metric(yy, normalize="none")
    got = np.asarray(metric.score(jnp.asarray(logits), None, metric.batch_data(batch)))
    last = logits[:, -1].astype(np.float64)
    probs = np.exp(last - last.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    want = []
    for b in range(batch):
        p = {y: probs[b, tok.token_id(f"{y:02d}")] for y in range(100)}
        want.append(sum(v for y, v in p.items() if y > yy[b]) - sum(v for y, v in p.items() if y <= yy[b]))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    assert greater_than.greater_than_metric(yy).normalize == "range"
    with pytest.raises(ValueError):
        greater_than.greater_than_metric([100])


# --- Task, files, registry ---------------------------------------------------------------------

def test_to_jsonl_round_trips(tmp_path):
    for task in (ioi.ioi_task(8), greater_than.greater_than_task(8), factual.factual_task()[1]):
        path = tmp_path / f"{task.name}.jsonl"
        task.to_jsonl(path)
        lines = [json.loads(l) for l in path.read_text().splitlines()]
        assert len(lines) == len(task)
        for i, ex in enumerate(lines):
            assert set(ex) >= {"clean", "corrupted", "answer", "contrast", "key_positions"}
            assert ex["clean"] == task.prompts[i] and ex["corrupted"] == task.corrupted_prompts[i]
            assert tok.token_id(ex["answer"]) == task.answers[i] and tok.token_id(ex["contrast"]) == task.contrasts[i]
            assert ex["key_positions"] == task.key_positions[i].tolist()
        back = combine(get_task(str(path)))  # read back in token-length buckets, padded together
        order = [back.prompts.index(p) for p in task.prompts]
        back = back.select(order)
        for field in ("clean_tokens", "corrupted_tokens", "answers", "contrasts", "key_positions", "last_key_position"):
            assert (getattr(back, field) == getattr(task, field)).all()


def test_read_jsonl_names_bad_line(tmp_path):
    path = tmp_path / "t.jsonl"
    good = {"clean": "When Mary and John", "corrupted": "When Anna and Paul", "answer": " Mary",
            "contrast": " John", "key_positions": [1, 3]}
    bad = dict(good, corrupted="When Christopherson and Paul")
    path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(ValueError, match="line 2: the corrupted prompt is .* tokens but the clean prompt is"):
        read_jsonl(path)


def test_get_task_registry():
    assert set(TASKS) == {"ioi", "factual", "greater-than"}
    assert isinstance(get_task("ioi", n_prompts=4), Task)
    assert isinstance(get_task("greater-than", n_prompts=4), Task)
    assert all(isinstance(t, Task) for t in get_task("factual"))
    with pytest.raises(ValueError, match="ioi, factual, greater-than"):
        get_task("iol")


def test_task_select_and_validation():
    task = ioi.ioi_task(10)
    sub = task.select([1, 3])
    assert len(sub) == 2 and sub.prompts == (task.prompts[1], task.prompts[3])
    assert (sub.info["abba"] == task.info["abba"][[1, 3]]).all()
    # every occurrence counted (ROME's rule), in prompt order
    expected = [int(task.clean_tokens[b, p]) for b in range(len(task)) for p in task.key_positions[b]]
    assert task.key_token_ids().tolist() == expected
    with pytest.raises(ValueError, match="key_positions"):
        Task("x", task.clean_tokens, task.corrupted_tokens, task.answers, task.contrasts,
             task.key_positions + 20, task.last_key_position, task.prompts, task.corrupted_prompts)


def test_to_jsonl_reads_in_bulk_sweeps(tmp_path):
    from jpatch.data.dataset import read_dataset
    task = ioi.ioi_task(6)
    path = task.to_jsonl(tmp_path / "ioi.jsonl")
    for corruption in ("str", "noise"):
        dataset = read_dataset(path, corruption=corruption)
        assert len(dataset.examples) == len(task)
        assert [e.key_positions for e in dataset.examples] == [tuple(k) for k in task.key_positions.tolist()]


def test_noise_std_is_one_rule_for_api_cli_bulk_and_report(tmp_path):
    """ROME's rule everywhere: the std over the stacked embedding rows of every key-position token,
    repeats counted, torch-style ddof=1 (computed here by hand)."""
    from jpatch import GPT2, GPT2Config
    from jpatch.data.dataset import key_token_std, read_dataset
    from jpatch.face.report_parts import subject_tokens
    from jpatch.methods import corrupt

    model = GPT2.init(GPT2Config(n_layer=1, n_head=2, d_model=16, d_mlp=32, n_ctx=32), key=jax.random.PRNGKey(3))
    task = ioi.ioi_task(6)
    ids = [int(task.clean_tokens[b, p]) for b in range(len(task)) for p in task.key_positions[b]]
    assert len(set(ids)) < len(ids)  # repeats exist, so a unique-token rule would differ
    by_hand = float(np.asarray(model.wte, np.float64)[ids].std(ddof=1))
    cli_std = corrupt.embedding_std(model, task.key_token_ids())  # what `jpatch sweep --corruption noise` uses
    report_std = corrupt.embedding_std(model, subject_tokens([task]))
    bulk_std = key_token_std(model, read_dataset(task.to_jsonl(tmp_path / "t.jsonl"), corruption="noise"))
    for got in (cli_std, report_std, bulk_std):
        assert got == pytest.approx(by_hand, rel=1e-10)
