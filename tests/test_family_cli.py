"""`jpatch demo / sweep / attribute / circuit / bulk` on converted Llama and Pythia folders: the
built-in tasks in the folder's own tokenizer.json (a small byte-level BPE trained here, so that the
IOI test names are single tokens and the two-digit years are not) with the family's BOS, the numbers
compared with `transformers` on the same folder (logit differences and a hand-hooked resid_pre
sweep), and answers that are not single tokens, inexact tokenizers and folders without a tokenizer
refused by name."""

import json
import shutil

import numpy as np
import pytest
import torch

import reference
from jpatch.data.tasks import get_task, ioi
from jpatch.face import cli
from jpatch.model.convert import convert_hf
from jpatch.model.hf_tokenizer import HFTokenizer

SPECIAL = ["<|endoftext|>", "<s>", "</s>"]  # Pythia's BOS; Llama's BOS and EOS (its tokenizer_config.json)
N = 4  # prompts


def train_tokenizer(path):
    """A byte-level BPE of 500 tokens on IOI's held-out names and sentences: every test name one token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    names = ioi.split_names()[1]
    tok.train_from_iterator([" ".join(" " + n for n in names)] * 40 + ioi.ioi_prompts_text(200, split="test"), trainer)
    tok.save(str(path))
    return tok.get_vocab_size()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """{family: (transformers model, its reference tokenizer, converted jpatch folder)}."""
    from transformers import PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("family_cli")
    vocab = train_tokenizer(root / "tokenizer.json")
    out = {}
    for family, bos in (("llama", "<s>"), ("neox", "<|endoftext|>")):
        if family == "llama":
            hf = reference.llama_hf_model("llama", seed=1, vocab_size=vocab, max_position_embeddings=64)
        else:
            hf = reference.neox_hf_model(seed=1, vocab_size=vocab, num_hidden_layers=2)
        hf_tok = PreTrainedTokenizerFast(tokenizer_file=str(root / "tokenizer.json"), bos_token=bos,
                                         eos_token="</s>" if family == "llama" else bos)
        src = root / f"hf-{family}"
        hf.save_pretrained(src)
        hf_tok.save_pretrained(src)  # tokenizer.json + tokenizer_config.json naming BOS and EOS
        out[family] = (hf, hf_tok, convert_hf(src, root / family))
    return out


def run(argv, capsys):
    """`jpatch argv` in this process -> (exit status, stdout, stderr)."""
    try:
        code = cli.main([str(a) for a in argv]) or 0
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def hf_logit_diffs(hf, tokens, mask, answers, contrasts, patch=None):
    """transformers' logit(answer) - logit(contrast) at each prompt's last real token, and the
    hidden states; patch=(layer, pos, hidden states): that layer's input at pos replaced by theirs."""
    layers = hf.model.layers if hasattr(hf, "model") else hf.gpt_neox.layers
    handle = None
    if patch is not None:
        layer, pos, source = patch

        def pre(module, args, kwargs):
            h = (args[0] if args else kwargs["hidden_states"]).clone()
            h[:, pos] = source[layer][:, pos]
            return ((h, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": h})

        handle = layers[layer].register_forward_pre_hook(pre, with_kwargs=True)
    try:
        with torch.no_grad():
            out = hf(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask), output_hidden_states=True)
    finally:
        if handle is not None:
            handle.remove()
    rows = np.arange(len(tokens))
    last = out.logits.float().numpy()[rows, np.asarray(mask).sum(1) - 1]
    return last[rows, answers] - last[rows, contrasts], out.hidden_states


def hf_ioi(hf, hf_tok, model_folder):
    """The CLI's IOI prompts tokenized by transformers' tokenizer (BOS as the text's first token) and
    their resid_pre denoising sweep [layer, pos] by hand-hooked transformers runs."""
    from jpatch.face.cli import load_task
    import jpatch

    task = load_task("ioi", N, 0, jpatch.load(model_folder))
    def encode(texts):  # right-padded with id 0 (masked)
        ids = [hf_tok(t, add_special_tokens=False)["input_ids"] for t in texts]
        return np.array([i + [0] * (max(map(len, ids)) - len(i)) for i in ids]), np.array(
            [[1] * len(i) + [0] * (max(map(len, ids)) - len(i)) for i in ids])

    (tokens, mask), (corrupted, _) = encode(task.prompts), encode(task.corrupted_prompts)
    live = mask.astype(bool)
    assert tokens[:, 0].tolist() == [hf_tok.bos_token_id] * N  # the family's BOS (Llama, Pythia: prepended)
    assert (np.where(live, tokens, 0) == np.where(live, task.clean_tokens, 0)).all()
    assert (np.where(live, corrupted, 0) == np.where(live, task.corrupted_tokens, 0)).all()
    for a, c, prompt in zip(task.answers, task.contrasts, task.prompts):  # the names, one token each
        assert hf_tok.decode([a]).strip() in prompt and hf_tok(hf_tok.decode([a]), add_special_tokens=False)[
            "input_ids"] == [a] and a != c
    ans, con = np.asarray(task.answers), np.asarray(task.contrasts)
    clean, clean_h = hf_logit_diffs(hf, tokens, mask, ans, con)
    base, _ = hf_logit_diffs(hf, corrupted, mask, ans, con)
    expected = np.zeros((hf.config.num_hidden_layers, tokens.shape[1]))
    for layer in range(len(expected)):
        for pos in range(tokens.shape[1]):  # jpatch's aggregate: the prompts that reach pos, by their baselines
            live = mask[:, pos] > 0
            patched = hf_logit_diffs(hf, corrupted, mask, ans, con, (layer, pos, clean_h))[0]
            expected[layer, pos] = ((patched[live].mean() - base[live].mean())
                                    / (clean[live].mean() - base[live].mean()))
    return task, clean, base, expected


def only_array(path):
    with np.load(path) as z:
        (name,) = z.files
        return z[name]


@pytest.mark.parametrize("family", ["llama", "neox"])
def test_commands_on_a_converted_folder_match_transformers(folders, family, tmp_path, capsys):
    hf, hf_tok, folder = folders[family]
    task, clean, base, expected = hf_ioi(hf, hf_tok, folder)
    assert expected.shape[1] == task.seq_len and np.abs(expected).max() > 0.1

    code, out, err = run(["demo", "--model", folder, "--out", tmp_path / "demo", "--n-prompts", N], capsys)
    assert code == 0, err
    assert task.prompts[0] in out  # the prompts in the model's tokenizer, BOS text first
    np.testing.assert_allclose(only_array(tmp_path / "demo" / "resid_pre" / "result.npz"), expected, atol=2e-4)
    assert np.isfinite(only_array(tmp_path / "demo" / "heads" / "result.npz")).all()

    code, _, err = run(["sweep", "--model", folder, "--task", "ioi", "--site", "resid_pre", "--n-prompts", N,
                        "--out", tmp_path / "sweep"], capsys)
    assert code == 0, err
    np.testing.assert_allclose(only_array(tmp_path / "sweep" / "result.npz"), expected, atol=2e-4)

    code, _, err = run(["attribute", "--model", folder, "--task", "ioi", "--site", "resid_pre", "--n-prompts", N,
                        "--compare-exact", "--out", tmp_path / "attr"], capsys)
    assert code == 0, err
    np.testing.assert_allclose(only_array(tmp_path / "attr" / "exact" / "result.npz"), expected, atol=2e-4)
    assert np.isfinite(only_array(tmp_path / "attr" / "estimate" / "result.npz")).all()

    # bulk: a dataset of the same prompts (BOS written as its text); its baselines are transformers'
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"clean": p, "corrupted": q, "answer": hf_tok.decode([a]),
                                        "contrast": hf_tok.decode([c])}) + "\n"
                            for p, q, a, c in zip(task.prompts, task.corrupted_prompts, task.answers,
                                                  task.contrasts)))
    code, _, err = run(["bulk", "--model", folder, "--data", data, "--out", tmp_path / "bulk", "--no-progress"],
                       capsys)
    assert code == 0, err
    from jpatch.runs.results import load_result

    got = load_result(tmp_path / "bulk")
    np.testing.assert_allclose(got.clean_score, clean, atol=2e-4)
    np.testing.assert_allclose(got.corrupted_score, base, atol=2e-4)


def test_circuit_runs_on_llama(folders, tmp_path, capsys):
    _, _, folder = folders["llama"]
    code, _, err = run(["circuit", "--model", folder, "--n-prompts", 2, "--ig-steps", 2, "--top", 1,
                        "--out", tmp_path / "circuit"], capsys)
    assert code == 0, err
    figures = json.loads((tmp_path / "circuit" / "figures.json").read_text())
    assert np.isfinite(np.asarray(figures["to_logits"], float)).all()


@pytest.mark.parametrize("task, refusal", [
    ("greater-than", r"greater-than: year answer '00' is 2 tokens in this model's tokenizer \(\['0', '0'\]\)"),
    ("factual", r"answer ' \w+' is \d tokens in this model's tokenizer"),
])
def test_multi_token_answers_are_refused_by_name(folders, task, refusal, tmp_path, capsys):
    code, _, err = run(["sweep", "--model", folders["llama"][2], "--task", task, "--out", tmp_path / "s"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert pytest.importorskip("re").search(refusal, err), err
    assert not (tmp_path / "s").exists()


def test_an_ioi_name_of_two_tokens_is_refused_by_name(folders):
    tok = HFTokenizer(folders["llama"][2] / "tokenizer.json")
    with pytest.raises(ValueError, match=r"IOI: answer ' Mary' is \d tokens in this model's tokenizer"):
        ioi.ioi_task(4, split="train", tokenizer=tok)  # the train names were not trained into the vocabulary


def test_a_folder_without_a_tokenizer_is_refused(folders, tmp_path, capsys):
    bare = tmp_path / "bare"
    shutil.copytree(folders["neox"][2], bare)
    (bare / "tokenizer.json").unlink()
    code, _, err = run(["sweep", "--model", bare, "--out", tmp_path / "s"], capsys)
    assert code == 2 and "has no tokenizer" in err and len(err.strip().splitlines()) == 1


def test_a_tokenizer_that_cannot_encode_the_text_exactly_is_refused(tmp_path):
    """A word-level vocabulary whose words are the names, places and objects maps the rest of a
    prompt to [UNK]: the prompts would not be the task's, so the task refuses rather than patch
    other text."""
    from tokenizers import Tokenizer, models

    words = [" " + w for w in (*ioi.split_names()[1], *ioi.PLACES, *ioi.OBJECTS)]
    vocab = {w: i for i, w in enumerate(["[UNK]", *words, "<s>"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>"}))
    words = HFTokenizer(tmp_path / "tokenizer.json")
    with pytest.raises(ValueError, match="IOI: .*encode.* exactly"):  # its names after "Then," already
        get_task("ioi", n_prompts=2, split="test", tokenizer=words, bos=True)
