"""GPT-NeoX (Pythia) files: Hugging Face folders (float32, bfloat16, sharded safetensors) ->
`convert_hf` / `jpatch convert` -> `jpatch.load`, compared with `transformers`' logits; settings
jpatch cannot reproduce refused before anything is written; the folder's tokenizer.json, compared
with `transformers.PreTrainedTokenizerFast` on the same file (BOS prepended as TransformerLens does);
family-aware config.json."""

import copy
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jpatch
from jpatch.face import cli
from jpatch.model import checkpoint, convert
from jpatch.model.convert import convert_hf
from jpatch.model.neox import NeoX

EOT = "<|endoftext|>"
TEXTS = ["When Mary and John went to the store, John gave a drink to Mary.",
         " The Eiffel Tower is in Paris",
         "héllo wörld ✓ zebra",  # unseen bytes and multi-byte characters: split tokens decode to U+FFFD
         f"two{EOT}documents"]
TRAIN = ["When Mary and John went to the store, John gave a drink to Mary.",
         "The Eiffel Tower is in Paris. The Colosseum is in Rome.",
         "héllo wörld, the quick brown fox jumps over the lazy dog"]


def build_tokenizer(path):
    """A small byte-level BPE (as Pythia's) trained here, with <|endoftext|> as special token 0."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=330, special_tokens=[EOT, "<|padding|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TRAIN, trainer)
    assert tok.token_to_id(EOT) == 0
    tok.save(str(path))
    return tok.get_vocab_size()


def neox_model(vocab_size, seed=0):
    """A random tiny GPTNeoXForCausalLM whose every parameter moves the output (large initial
    weights, layer norms perturbed away from 1 and 0, biases nonzero), untied unembedding."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    config = GPTNeoXConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=128,
                           vocab_size=vocab_size, max_position_embeddings=64, rotary_pct=0.25,
                           initializer_range=0.1, bos_token_id=0, eos_token_id=0, attn_implementation="eager")
    model = GPTNeoXForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" in name or "layer_norm" in name:
                p.add_(0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.add_(0.05 * torch.randn_like(p))
    return model


def hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor(np.asarray(tokens))).logits.float().numpy()


def max_err(a, b):
    return float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max())


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The Hugging Face folders (each with tokenizer.json and tokenizer_config.json, as
    transformers saves a tokenizer), the models they hold, and the reference tokenizer."""
    from transformers import PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("neox")
    n_tokens = build_tokenizer(root / "tokenizer.json")
    hf_tok = PreTrainedTokenizerFast(tokenizer_file=str(root / "tokenizer.json"), bos_token=EOT)
    hf = neox_model(n_tokens + 6)  # more embedding rows than tokens, as Pythia's 50304 for 50277
    bf16 = neox_model(n_tokens + 6, seed=1).to(torch.bfloat16)
    dirs = {"f32": root / "f32", "bf16": root / "bf16", "sharded": root / "sharded", "bare": root / "bare"}
    hf.save_pretrained(dirs["f32"])
    bf16.save_pretrained(dirs["bf16"])
    hf.save_pretrained(dirs["sharded"], max_shard_size="100KB")
    hf.save_pretrained(dirs["bare"])  # no tokenizer
    for name in ("f32", "bf16", "sharded"):
        hf_tok.save_pretrained(dirs[name])
    assert (dirs["sharded"] / "model.safetensors.index.json").is_file()
    assert len(list(dirs["sharded"].glob("model-*.safetensors"))) > 1
    data = (dirs["bf16"] / "model.safetensors").read_bytes()  # an 8-byte header length, then the JSON header
    header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"BF16"}
    tokens = np.random.default_rng(3).integers(0, hf.config.vocab_size, size=(2, 12))
    return dict(dirs=dirs, hf=hf, bf16=bf16, hf_tok=hf_tok, tokens=tokens, logits=hf_logits(hf, tokens))


@pytest.fixture(scope="module")
def converted(files, tmp_path_factory):
    return convert_hf(files["dirs"]["f32"], tmp_path_factory.mktemp("jp") / "model")


@pytest.fixture(scope="module")
def model(converted):
    return jpatch.load(converted)


# --- conversion: logits against transformers ------------------------------------------------------


def test_convert_and_load_match_transformers(files, converted, model):
    assert sorted(p.name for p in converted.iterdir()) == [".jpatch-output.json", "checkpoint", "config.json",
                                                           "tokenizer.json", "tokenizer_config.json"]
    config = json.loads((converted / "config.json").read_text())
    assert config["family"] == "neox" and config["dtype"] == "float32" and config["rotary_pct"] == 0.25
    assert config["source"] == str(files["dirs"]["f32"].resolve())
    assert (converted / "tokenizer.json").read_bytes() == (files["dirs"]["f32"] / "tokenizer.json").read_bytes()
    assert isinstance(model, NeoX) and model.dtype == jnp.float32
    assert model.tokenizer_file == str((converted / "tokenizer.json").absolute())
    assert max_err(model(files["tokens"]), files["logits"]) < 1e-4


def test_sharded_safetensors(files, tmp_path):
    model = jpatch.load(convert_hf(files["dirs"]["sharded"], tmp_path / "out"))
    assert max_err(model(files["tokens"]), files["logits"]) < 1e-4


def test_bfloat16_checkpoint(files, tmp_path):
    """A bfloat16 safetensors checkpoint. Its weights converted to float32 are exactly the bf16
    values (bf16 -> f32 is exact), so it must match the HF model with those weights cast to
    float32 as tightly as a float32 checkpoint does; kept in bfloat16 (convert --dtype bfloat16,
    load dtype=None) too, since jpatch runs its residual stream in float32 whatever the weights'
    dtype. Against the HF model running in bfloat16, which rounds every activation to bf16's
    8-bit mantissa, only ~1% of the logits' scale holds (0.6% measured)."""
    upcast = hf_logits(copy.deepcopy(files["bf16"]).float(), files["tokens"])  # .float() is in place
    model = jpatch.load(convert_hf(files["dirs"]["bf16"], tmp_path / "f32"))
    assert json.loads((tmp_path / "f32" / "config.json").read_text())["dtype"] == "float32"
    assert max_err(model(files["tokens"]), upcast) < 1e-4

    stored = jpatch.load(convert_hf(files["dirs"]["bf16"], tmp_path / "bf16", dtype="bfloat16"), dtype=None)
    assert stored.dtype == jnp.bfloat16
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    ours = np.asarray(stored(files["tokens"]), np.float32)
    assert max_err(ours, upcast) < 1e-4
    theirs = hf_logits(files["bf16"], files["tokens"])
    assert max_err(theirs, upcast) > 1e-3  # the reference really ran in bfloat16
    assert max_err(ours, theirs) < 0.01 * float(np.abs(upcast).max())


def test_cli_convert(files, tmp_path, capsys):
    cli.main(["convert", str(files["dirs"]["f32"]), str(tmp_path / "jp")])
    assert "converted" in capsys.readouterr().out
    model = jpatch.load(tmp_path / "jp")
    assert max_err(model(files["tokens"]), files["logits"]) < 1e-4
    assert (tmp_path / "jp" / "tokenizer.json").is_file()
    with pytest.raises(SystemExit, match="use_parallel_residual"):
        cli.main(["convert", str(edited(files, tmp_path / "serial", use_parallel_residual=False)),
                  str(tmp_path / "jp2")])
    assert not (tmp_path / "jp2").exists()


# --- refusals, before anything is written -------------------------------------------------------------


def edited(files, folder, **changes):
    """A copy of the float32 folder whose config.json has `changes` (None deletes a key)."""
    shutil.copytree(files["dirs"]["f32"], folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}))
    return folder


@pytest.mark.parametrize("changes, field", [
    ({"model_type": "mamba"}, "model_type='mamba'"),
    ({"use_parallel_residual": False}, "use_parallel_residual"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_scaling"),
    ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0,
                          "partial_rotary_factor": 0.25}}, "rope_type='linear'"),
    ({"attention_bias": False}, "attention_bias"),
    ({"hidden_size": None}, "missing hidden_size"),
])
def test_refused_naming_the_field_before_writing(files, tmp_path, monkeypatch, changes, field):
    src = edited(files, tmp_path / "src", **changes)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=f"{src / 'config.json'}.*{field}"):
        convert_hf(src, out)
    assert not out.exists()
    # checked first: before the target (a foreign folder, otherwise refused) and before reading weights
    monkeypatch.setattr(convert, "_read_weights", lambda path: pytest.fail("read the weights"))
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=field):
        convert_hf(src, tmp_path / "foreign")
    assert [p.name for p in (tmp_path / "foreign").iterdir()] == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["foreign", "src"]


def test_broken_tokenizer_is_refused_before_writing(files, tmp_path):
    src = edited(files, tmp_path / "src")
    (src / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match=f"cannot read tokenizer file {src / 'tokenizer.json'}"):
        convert_hf(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --- the tokenizer, against transformers on the same file ---------------------------------------------


def test_tokenizer_matches_transformers(files, model):
    hf_tok = files["hf_tok"]
    tok = model.tokenizer
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 0, 0)  # Pythia's: <|endoftext|> is BOS, EOS and padding
    assert tok.vocab_size == len(hf_tok)
    for text in TEXTS:
        # TransformerLens prepends BOS as text, then tokenizes (utils.get_input_with_manually_prepended_bos)
        expected = hf_tok(EOT + text, add_special_tokens=False)["input_ids"]
        assert expected[0] == hf_tok.bos_token_id == 0
        tokens = model.to_tokens(text)
        assert tokens.dtype == jnp.int32 and np.asarray(tokens).tolist() == [expected]
        assert np.asarray(model.to_tokens(text, prepend_bos=False)).tolist() == [expected[1:]]
        # TransformerLens: tokenizer.batch_decode(tokens, clean_up_tokenization_spaces=False), token by token
        assert model.to_str_tokens(text) == [hf_tok.decode([i], clean_up_tokenization_spaces=False)
                                             for i in expected]
        assert model.to_string(tokens[0]) == hf_tok.decode(expected, clean_up_tokenization_spaces=False)
        assert model.to_string(tokens) == [EOT + text]
    assert "\ufffd" in "".join(model.to_str_tokens(TEXTS[2]))
    word = next(w for w in (" Mary", " John", " the") if len(hf_tok.encode(w, add_special_tokens=False)) == 1)
    assert model.to_single_token(word) == hf_tok.convert_tokens_to_ids(hf_tok.tokenize(word))[0]
    with pytest.raises(ValueError, match="not a single token"):
        model.to_single_token(" zebra crossing")


def test_padding_matches_transformers(files, model):
    hf_tok = copy.deepcopy(files["hf_tok"])
    hf_tok.pad_token = hf_tok.bos_token  # TransformerLens pads with EOS (here BOS) when the tokenizer has none
    texts = TEXTS[:2]
    for side in ("right", "left"):
        hf_tok.padding_side = side
        expected = hf_tok([EOT + t for t in texts], padding=True, add_special_tokens=False)
        tokens, mask = model.to_tokens(texts, padding_side=side)
        assert np.asarray(tokens).tolist() == expected["input_ids"]
        assert np.asarray(mask).tolist() == expected["attention_mask"]


def test_text_input_gives_transformers_logits(files, model):
    """Text in, through the carried tokenizer and the model, against transformers on HF's own ids."""
    ids = files["hf_tok"](EOT + TEXTS[0], add_special_tokens=False, return_tensors="np")["input_ids"]
    assert max_err(model(TEXTS[0]), hf_logits(files["hf"], ids)) < 1e-4


def test_generate_stops_at_the_tokenizers_eos(model):
    """Without an eos_token_id, generation stops at the tokenizer's (Pythia: 0, not GPT-2's 50256)."""
    import equinox as eqx

    # final norm's output all ones, and an unembedding reading it into <|endoftext|> only
    d, V = model.config.d_model, model.config.d_vocab
    forced = eqx.tree_at(lambda m: (m.final_norm.weight, m.final_norm.bias, m.unembed_w), model,
                         (jnp.zeros(d), jnp.ones(d), jnp.zeros((d, V)).at[:, 0].set(1.0)))
    out = forced.generate(jnp.asarray([[5, 6, 7]]), max_new_tokens=4, do_sample=False)
    assert np.asarray(out).tolist() == [[5, 6, 7, 0]]


# --- family-aware jpatch folders ----------------------------------------------------------------------


def test_save_carries_the_tokenizer(model, tmp_path):
    out = checkpoint.save(model, tmp_path / "copy")
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()
    again = jpatch.load(out)
    assert again.tokenizer_file == str((out / "tokenizer.json").absolute())
    assert again.to_str_tokens(TEXTS[0]) == model.to_str_tokens(TEXTS[0])
    for key in ("family", "rotary_pct", "dtype"):
        with pytest.raises(ValueError, match=f"extra_config may not set.*{key}"):
            checkpoint.save(model, tmp_path / "x", extra_config={key: 1})
    assert not (tmp_path / "x").exists()
    import dataclasses

    # a model whose tokenizer file has disappeared is refused, naming it
    gone = dataclasses.replace(model, tokenizer_file=str(tmp_path / "nowhere" / "tokenizer.json"))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        checkpoint.save(gone, tmp_path / "y")
    assert not (tmp_path / "y").exists()


def test_without_tokenizer(files, tmp_path):
    model = jpatch.load(convert_hf(files["dirs"]["bare"], tmp_path / "bare"))
    assert model.tokenizer_file is None and not (tmp_path / "bare" / "tokenizer.json").exists()
    assert max_err(model(files["tokens"]), files["logits"]) < 1e-4
    for call in (lambda: model.tokenizer, lambda: model.to_tokens("hi"), lambda: model(TEXTS[0])):
        with pytest.raises(ValueError, match="no tokenizer.*pass token ids"):
            call()
    # no tokenizer, so no EOS to stop at: generation runs its full length
    assert np.asarray(model.generate(jnp.asarray([[1, 2]]), max_new_tokens=3, do_sample=False)).shape == (1, 5)


def test_config_family(tmp_path):
    gpt2 = jpatch.GPT2.init(jpatch.GPT2Config(n_layer=1, n_head=2, d_model=8, d_mlp=16, n_ctx=8, d_vocab=11),
                            key=jax.random.PRNGKey(0))
    folder = checkpoint.save(gpt2, tmp_path / "gpt2")
    raw = json.loads((folder / "config.json").read_text())
    assert raw["family"] == "gpt2"
    del raw["family"]  # a folder written before jpatch had families
    (folder / "config.json").write_text(json.dumps(raw))
    assert isinstance(jpatch.load(folder), jpatch.GPT2)
    (folder / "config.json").write_text(json.dumps({**raw, "family": "mamba"}))
    with pytest.raises(ValueError, match=f"cannot read {folder / 'config.json'}.*family 'mamba'.*gpt2, neox"):
        jpatch.load(folder)


def test_gpt2_tokenizer_bos_and_pad():
    tok = jpatch.get_tokenizer()
    assert tok.bos_id == tok.pad_id == tok.eos_id == 50256


def test_hidden_padding_is_refused_with_the_tokenizers_pad_id(files, model, tmp_path):
    """A sweep of texts padded by the model's own tokenizer, given without their mask, is refused
    (the pad id is the tokenizer's, not GPT-2's 50256); without a tokenizer, the last id pads."""
    from jpatch.methods import metrics
    tokens, mask = model.to_tokens(TEXTS[:2])
    assert model.pad_id == files["hf_tok"].bos_token_id  # no pad token named: BOS pads, as TransformerLens
    metric = metrics.logit_diff(np.array([1, 2]), np.array([3, 4]))
    with pytest.raises(ValueError, match=f"end in the pad token {model.pad_id} while others do not"):
        jpatch.sweep(model, tokens, tokens, "resid_pre", metric, progress=False)
    bare = jpatch.load(convert_hf(files["dirs"]["bare"], tmp_path / "bare"))
    assert bare.pad_id == bare.config.d_vocab - 1


def test_gpt2_tokenized_paper_tasks_are_refused_on_neox(converted, model, tmp_path):
    """The paper rerun's tasks are GPT-2 token ids: valid ids of the wrong tokens on NeoX, so it
    refuses, naming the family. (The command line's tasks and bulk datasets are read with the
    model's own tokenizer: tests/test_family_cli.py.)"""
    from jpatch.face.report import run_paper

    with pytest.raises(ValueError, match="GPT-2's tokenizer, and this is a GPT-NeoX model"):
        run_paper(model, tmp_path / "paper")
    assert not (tmp_path / "paper").exists()
