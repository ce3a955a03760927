"""Train the toy GPT-2 in weights/toy/ on the three paper tasks (IOI, factual recall,
greater-than), with the real GPT-2 tokenizer, and save it in bfloat16.

    .venv/bin/python scripts/train_toy.py            # train, save weights/toy/, evaluate
    .venv/bin/python scripts/train_toy.py --eval-only
    .venv/bin/python scripts/train_toy.py --init OLD --steps N --lr 1e-3   # go on training a saved toy

The bundled model (4 layers x 8 heads, batches of 96 prompts, 70% IOI, --s2-weight 0.5,
--max-shift 6, --crop 0.3, --prefix-words 0.3) was made in three runs on the shared 2-core CPU:
the previous toy, with the defaults (8000 steps, --word-noise 0.05, 19 min); then on from it
`--steps 2000 --lr 1.5e-3 --wide-fillers --grammar 0.6 --word-noise 0.15 --name-vector`, stopped
at its step-1000 snapshot (17 min); then on from that snapshot, with the N2-S gap rule below,
`--steps 1000 --lr 1e-3` and the same flags (17 min). weights/toy/training.json holds the last
command, settings, timings and figures, and under "init" the first two runs' commands and times.
(The previous toy's extra pool names were drawn before held-out "novel" words were kept out of
the pool: 15 of those words, capitalised with a leading space, e.g. " Both", " Since", were among
its 3000 frozen pool names; no token of the novel templates was. The runs going on from it drew
their pool anew, without those words; every row it never trained, theirs included, was still at
its random init.)

How it stays fast and still evaluates honestly over the full 50257-token vocabulary:

* The loss is the cross-entropy of the answer token only (the last real token of each
  prompt), over a compact vocabulary: the token ids that occur in the training data.
  Every other row of the tied embedding `wte` keeps its random initialisation
  (normal(0, 0.02)), so a token never seen in training can only win by chance; the
  evaluation below is over the full vocabulary of the saved bf16 model.
* IOI with the IOI paper's variety (`jpatch.tasks.ioi`): 28 templates of 12-21 tokens,
  BABA and ABBA orders, names at different positions, half the prompts with a leading
  <|endoftext|>; so no positional rule solves it, the model has to find the name that
  is not repeated. Training uses the train templates only; the evaluation uses the
  held-out ones (`ioi.TEST_TEMPLATES`, made of words the train templates use).
* IOI that does not rest on the words around the names: held-out templates of a second kind
  (`ioi.FILLER_HELD_OUT_TEMPLATES`, the split "novel") use no word, place, object or
  punctuation mark that any IOI training prompt holds (`ioi.filler_held_out_words`, checked
  in `build_data` and tests/test_toy.py); to the model their words are untrained random rows,
  like names (but for " for", which the factual prompts train). Only the repetition of S tells
  IO from S there, and only if the model knows which tokens are names: a held-out name's row and
  an unknown word's row are alike random init vectors, so on a sentence of untrained words the
  name that is not repeated is no better defined than any other untrained word that is not.
  Hence --name-vector: one learnt vector, at a fixed norm (NAME_NORM, a random row's), is added
  to the frozen row of every name token (pool and IOI `NAMES`, held-out ones included): the model
  knows which tokens are names, as a pretrained model does, and nothing about any one name.
  --wide-fillers and --grammar widen the training text: with --grammar G, that share of the IOI
  prompts are sentences from a grammar (`Sampler.generated`: [<|endoftext|>] W* N1 W+ N2 W+ [P] W*
  S W+ -> IO, random lengths and both name orders, IO also read after each word past S), and with
  --wide-fillers every filler word W (word noise, prefix words, generated sentences) is, with a
  per-prompt chance (1 a quarter of the time), one of N_UNKNOWN lowercase GPT-2 words whose
  embedding rows stay FROZEN at init (never-seen words), else a template word, one of N_BROAD other
  lowercase GPT-2 words (trained) or a token of the factual / greater-than prompts (none of them a
  "novel" word); a generated sentence's last word is such a token half the time.
  What was tried (2-core CPU, 2026-12-06): without the name vector, going on from the previous toy
  2500 steps at --lr 1e-3, --word-noise 0.15, --grammar 0.5: novel templates 34% / 35%; from
  scratch with the name vector, 1000 steps: IOI still at chance (loss 7.5, from scratch the previous
  toy needed ~2500 steps to learn IOI on its templates). Going on from the previous toy with the
  name vector (learnt in ~300 steps): with no other tasks' words among the fillers, novel 69% / 65%
  after 1000 steps, 0-65% on the four templates ending in " for" and 97-100% on the others (the
  step-1500 model of a run with those words as fillers anywhere: 76% on the " for" templates, 96%
  with " for" replaced by an untrained word); hence the last-word rule above. That run's step-1000
  model still failed one template ("... bumped into [A] so [B] bought ...": 7-48%), whose second
  name and S are one word apart, which the grammar then made 1 sentence in 48 (100% with two words
  inserted there); hence the gap rule (1-7 tokens about evenly). After 1000 steps more with it:
  novel templates 98.6% / 97.7% (worst template 90% / 85%), held-out templates 99.8% / 99.9%.
* Strict IOI name hold-out: the held-out names (`ioi.split_names()[1]`) never occur in
  the training data's IOI prompts. To make the model learn a *generic* copying mechanism,
  every "name" in a training IOI prompt is drawn from a large pool (the train-split
  names plus a few thousand other capitalised single-token words), and the embedding
  rows of all name tokens (pool and IOI `NAMES`, held-out ones included) and of the
  greater-than nouns are FROZEN at their random initialisation (names plus the shared name
  vector, with --name-vector). A held-out name is then, to the model, exactly like a training
  name: a random init-scale vector it has learned to copy. Greater-than nouns are likewise replaced half the time by pool
  words. (One held-out name, " Angela", occurs in a factual prompt, "Angela Merkel"; its
  row is frozen like every name's.)
* The loss also has, with weight `--s2-weight`, the ordinary next-token loss of IOI prompts at
  the token before the repeated subject S2: the next token there is one of the two names
  already seen, so it teaches copying a name from context (without it the answer loss
  learnt slowly: IOI loss 7.1 after 600 steps vs 5.4 with it, one seed each).
* Half the IOI prompts start after 1 to --max-shift extra tokens (<|endoftext|>, or with
  chance --prefix-words random template words), and with chance --crop a prompt first loses
  1..all of the words before its first name; so each template is seen at several lengths
  and absolute positions, and with many different first tokens. Without the shift, a held-out
  template whose length only one train template has was solved by that template's positions
  and failed; with the shift but no crop or word prefix (the previous toy), two held-out
  templates whose first name follows their first word ("After [B] and [A] went ...",
  "Today [B] met [A] ...") failed on ~60% of prompts without BOS: 84% / 94% held-out IOI
  (without / with BOS). Five trial runs with crop and word prefixes (on a GPU, 4000 steps,
  seeds 0/1, 4 or 6 layers, word noise 0 or 0.05) all reached 97.7-100% / 99.2-100%.
* Factual and greater-than prompts carry no BOS token (`Task.clean_tokens` carry none).
* Prompts are right-padded to one length and the logits are read at each prompt's
  last real token (causal attention: padding after it changes nothing).

Figures written to weights/toy/training.json are computed on the saved bf16 model
loaded back with `jpatch.load`: IOI on held-out templates x held-out names, with and
without BOS.
"""

import argparse
import json
import re
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jpatch  # noqa: E402
from jpatch import GPT2, GPT2Config
from jpatch.files import safety  # noqa: E402
from jpatch.data.tasks import factual, greater_than, ioi  # noqa: E402
from jpatch.model.tokenizer import get_tokenizer  # noqa: E402

CONFIG = GPT2Config(n_layer=4, n_head=8, d_model=128, d_mlp=512, n_ctx=64, d_vocab=50257)
GT_LEN = greater_than.PROMPT_LEN
N_EXTRA_NAMES = 3000  # extra capitalised words used as IOI names (frozen embeddings)
N_BROAD = 4000  # lowercase GPT-2 words used as IOI filler words, embeddings trained
N_UNKNOWN = 4000  # lowercase GPT-2 words used as IOI filler words, embeddings frozen at init ("unseen" words)
EXTRA_READS = 3  # answer reads after S2 in a generated IOI sentence, besides its end (W{1-4} after S2)
NAME_NORM = 0.02 * 128 ** 0.5  # the name vector's norm: a random init row's (normal(0, 0.02) in d_model 128)
PUNCTUATION = (",", ".", ":", "!")  # between the clauses of a generated IOI sentence
THRESHOLDS = {"ioi_logit_diff_positive_frac": 0.95, "ioi_bos_logit_diff_positive_frac": 0.95,
              "ioi_novel_logit_diff_positive_frac": 0.95, "ioi_novel_bos_logit_diff_positive_frac": 0.95,
              "factual_pair_top1": 0.90, "greater_than_prob_diff": 0.5}


def word(token):
    """A GPT-2 token's word: lowercased, without its leading space."""
    return token.lstrip("\u0120").lower()


def ioi_filler_candidates(exclude):
    """Lowercase single-token GPT-2 words (" word", 3+ letters) whose word is none of the
    "novel" IOI split's (`ioi.filler_held_out_words`), nor a name, nor in `exclude` (token ids)."""
    held_out, names = ioi.filler_held_out_words(), {n.lower() for n in ioi.NAMES}
    vocab = get_tokenizer().backend.get_vocab()
    return sorted(i for t, i in vocab.items() if re.fullmatch("\u0120[a-z]{3,}", t) and i not in exclude
                  and word(t) not in held_out and word(t) not in names)


# --- data ------------------------------------------------------------------------------


def build_data(seed, n_ioi=20000, n_gt=20000, wide=False):
    """Token arrays (prompt without answer, answer id) per task, and the frozen / trainable vocab;
    wide: also the broad-list filler words (N_BROAD trained, N_UNKNOWN frozen) and punctuation marks."""
    tok = get_tokenizer()
    # IOI: train templates x train names, half of them with a leading <|endoftext|>, right-padded;
    # the name positions come with each prompt (the sampler swaps in pool words there).
    half = [ioi.ioi_task(n_ioi // 2, seed=seed + b, split="train", bos=b) for b in (False, True)]
    width = max(t.seq_len for t in half)
    ioi_x = np.concatenate([np.pad(t.clean_tokens, ((0, 0), (0, width - t.seq_len)), constant_values=ioi.BOS_ID)
                            for t in half])
    ioi_pos = np.concatenate([np.stack([t.info["io_position"], t.info["s1_position"], t.info["s2_position"],
                                        t.info["end_position"]], 1) for t in half]).astype(np.int32)
    ioi_answer = np.concatenate([t.answers for t in half])
    # "... to the year 17" + "54." : the end year is the answer token (whatever BPE makes of "54.").
    gt_texts = greater_than.greater_than_prompts_text(n_gt, seed=seed, split="train")
    gt_ids = np.array([tok.encode(t[:-3]) + [greater_than.YEAR_TOKEN_IDS[int(t[-3:-1])]] for t in gt_texts], np.int32)
    assert gt_ids.shape[1] == GT_LEN + 1, gt_ids.shape
    pairs = factual.load_pairs()
    fact_prompts = [list(p.tokens[i]) for p in pairs for i in (0, 1)]
    fact_answers = np.array([p.answer_ids[i] for p in pairs for i in (0, 1)], np.int32)

    names = {tok.token_id(" " + n) for n in ioi.NAMES}
    train_names = [tok.token_id(" " + n) for n in ioi.split_names()[0]]
    test_names = {tok.token_id(" " + n) for n in ioi.split_names()[1]}
    nouns = {tok.token_id(" " + n) for n in greater_than.NOUNS}
    train_nouns = [tok.token_id(" " + n) for n in greater_than.split_nouns()[0]]
    assert not test_names & set(ioi_x.ravel().tolist()), "a held-out name leaked into the IOI training prompts"
    assert not {t.info["template"][i] for t in half for i in range(len(t))} & set(ioi.TEST_TEMPLATES)

    # Tokens that are not names: template words (and <|endoftext|>), years, facts.
    rows = np.arange(len(ioi_x))[:, None]
    is_name = np.zeros(ioi_x.shape, bool)
    is_name[rows, ioi_pos[:, :3]] = True
    used = set(ioi_x[~is_name].ravel().tolist())
    used |= set(gt_ids[:, [i for i in range(GT_LEN + 1) if i != 1]].ravel().tolist())
    used |= {t for p in fact_prompts for t in p} | set(fact_answers.tolist())
    vocab = tok.backend.get_vocab()
    held_out = ioi.filler_held_out_words()
    capitalised = sorted(i for t, i in vocab.items() if re.fullmatch("\u0120[A-Z][a-z]{2,}", t) and word(t) not in held_out)
    candidates = [i for i in capitalised if i not in used and i not in names and i not in nouns]
    rng = np.random.default_rng(seed)
    extra = rng.choice(candidates, size=N_EXTRA_NAMES, replace=False).tolist()
    # Filler words from a broad list: N_BROAD trained, N_UNKNOWN frozen at their init (to the model
    # exactly like a word it never saw, or a name); none is a word of the "novel" held-out split.
    broad = unknown = punctuation = task_words = np.zeros(0, np.int32)
    if wide:
        fill = rng.permutation(ioi_filler_candidates(used | names | nouns | set(extra)))
        broad, unknown = np.sort(fill[:N_BROAD]).astype(np.int32), np.sort(fill[N_BROAD:N_BROAD + N_UNKNOWN]).astype(np.int32)
        punctuation = np.array([tok.token_id(p) for p in PUNCTUATION], np.int32)
        # The other tasks' tokens (trained there) as fillers too: a novel template's last word " for" is
        # one of them, and a model that never met one in an IOI prompt failed at it (0-65% on the four
        # templates ending in " for" after 1000 steps, 100% on the others).
        ioi_ids = set(ioi_x[~is_name].ravel().tolist())
        task_words = np.array(sorted(i for i in used - ioi_ids - names - nouns
                                     if word(tok.backend.id_to_token(i)) not in held_out), np.int32)
    name_pool = np.array(sorted(set(train_names) | set(extra)), np.int32)
    noun_pool = np.array(sorted(set(train_nouns) | set(extra)), np.int32)

    frozen = np.array(sorted(names | nouns | set(extra) | set(unknown.tolist())), np.int32)  # rows kept at their init
    frozen_is_name = np.isin(frozen, sorted(names | set(extra)))  # every IOI name's row, held-out ones included
    trainable = np.array(sorted((used | set(broad.tolist()) | set(punctuation.tolist())) - set(frozen.tolist())), np.int32)
    words = np.unique(ioi_x[~is_name])
    words = words[words != ioi.BOS_ID]
    # Every token an IOI training prompt can hold, names aside: none is a word of the "novel" split.
    ioi_tokens = set(words.tolist()) | set(broad.tolist()) | set(task_words.tolist()) | set(unknown.tolist()) | set(punctuation.tolist()) | set(name_pool.tolist())
    leaked = {word(tok.backend.id_to_token(int(i))) for i in ioi_tokens} & held_out
    assert not leaked, f"words of the held-out 'novel' IOI templates in the IOI training text: {leaked}"
    return dict(ioi_words=words, ioi_x=ioi_x, ioi_pos=ioi_pos, ioi_answer=ioi_answer, gt=gt_ids, fact_prompts=fact_prompts,
                fact_answers=fact_answers, name_pool=name_pool, noun_pool=noun_pool, frozen=frozen, frozen_is_name=frozen_is_name,
                trainable=trainable, n_fact_prompts=len(fact_prompts), broad=broad, unknown=unknown,
                punctuation=punctuation, task_words=task_words)


class Sampler:
    """Mixed batches (IOI / greater-than / factual), right-padded to one width, in compact ids."""

    def __init__(self, data, seed, batch, ioi_share, max_shift, word_noise, crop=0.0, prefix_words=0.0, grammar=0.0):
        self.d, self.rng, self.max_shift = data, np.random.default_rng(seed + 1), max_shift
        self.word_noise, self.crop, self.prefix_words = word_noise, crop, prefix_words
        self.n_ioi = int(round(batch * ioi_share))
        self.n_grammar = int(round(self.n_ioi * grammar))  # of the IOI prompts: generated sentences
        self.wide = len(data["broad"]) > 0
        assert self.wide or not self.n_grammar, "generated sentences need the broad-list filler words (wide data)"
        self.n_gt = (batch - self.n_ioi) // 2
        self.n_fact = batch - self.n_ioi - self.n_gt
        self.compact = np.full(CONFIG.d_vocab, -1, np.int64)
        order = np.concatenate([data["trainable"], data["frozen"]])
        self.compact[order] = np.arange(len(order))
        self.width = data["ioi_x"].shape[1] + max_shift
        self.fact = np.zeros((len(data["fact_prompts"]), self.width), np.int32)
        self.fact_len = np.array([len(p) for p in data["fact_prompts"]])
        for i, p in enumerate(data["fact_prompts"]):
            self.fact[i, :len(p)] = p
        assert self.fact_len.max() <= self.width and GT_LEN <= self.width

    def fillers(self, shape, unknown):
        """Filler words: with chance `unknown` (per row) a frozen never-trained word, else a trained
        one (40% template words, 40% words of the broad list, 20% the other tasks' words)."""
        d, rng = self.d, self.rng
        if not self.wide:  # template words only (the bundled toy's recipe)
            return rng.choice(d["ioi_words"], size=shape)
        pick = rng.random(shape)
        known = np.where(pick < 0.4, rng.choice(d["ioi_words"], size=shape),
                         np.where(pick < 0.8, rng.choice(d["broad"], size=shape), rng.choice(d["task_words"], size=shape)))
        return np.where(rng.random(shape) < np.reshape(unknown, (-1,) + (1,) * (len(shape) - 1)),
                        rng.choice(d["unknown"], size=shape), known).astype(np.int32)

    def unknown_share(self, n):
        """Per prompt, the chance that a filler word is an untrained one: 0..1, and 1 a quarter of the time."""
        if not self.wide:
            return np.zeros(n)
        return np.where(self.rng.random(n) < 0.25, 1.0, self.rng.random(n))

    def generated(self, n):
        """IOI sentences from a grammar over the filler words, names from the pool:
        [<|endoftext|>] W{0-4} N1 W{1-3} N2 W{1-6} S W{1-4} -> IO, where (N1, N2) is (IO, S) or
        (S, IO), W a filler word (the last one, half the time, a word of the other tasks), half the
        time with a punctuation mark after one of the words between N2 and S; so no template, word or position tells IO from S but the repetition of S. Returns rows,
        (io, s1, s2, end) positions and the (IO, S) names."""
        rng, d = self.rng, self.d
        rows, pos = np.full((n, self.width), ioi.BOS_ID, np.int32), np.zeros((n, 4), np.int64)
        names = np.array([rng.choice(d["name_pool"], size=2, replace=False) for _ in range(n)], np.int32).reshape(n, 2)
        for i, u in enumerate(self.unknown_share(n)):
            io, s = names[i]
            w = lambda lo, hi: list(self.fillers((int(rng.integers(lo, hi + 1)),), np.array([u])))
            abba = rng.random() < 0.5
            seq = [ioi.BOS_ID] if rng.random() < 0.5 else []
            seq += w(0, 4)
            at_first = len(seq)
            seq += [io if abba else s] + w(1, 3)
            at_second = len(seq)
            gap = w(1, 6)  # between the second name and S: 1..7 tokens, about evenly (one novel template has 1)
            if rng.random() < 0.5:
                gap.insert(int(rng.integers(1, len(gap) + 1)), int(rng.choice(d["punctuation"])))
            seq += [s if abba else io] + gap
            at_s2 = len(seq)
            seq += [s] + w(1, 4)
            if rng.random() < 0.5:  # the last word one of the other tasks' (as " for" ends four novel templates)
                seq[-1] = int(rng.choice(d["task_words"]))
            rows[i, :len(seq)] = seq
            pos[i] = (at_first, at_second, at_s2, len(seq) - 1) if abba else (at_second, at_first, at_s2, len(seq) - 1)
        return rows, pos, names

    def move(self, rows, pos):
        """Each IOI prompt at new positions: half of them start after 1..max_shift extra tokens
        (<|endoftext|>, or with chance `prefix_words` random template words), and with chance `crop`
        a prompt first loses 1..all of the words before its first name (a leading <|endoftext|> stays).
        Without this a template is seen at one length and one set of positions, and a held-out
        template is solved by the positions of a train template of the same length, or fails when
        its first name sits right after its first word."""
        rng, out, moved = self.rng, np.full((len(rows), self.width), ioi.BOS_ID, np.int32), pos.copy()
        for i, (row, p) in enumerate(zip(rows, pos)):
            start = int(row[0] == ioi.BOS_ID)
            first = int(min(p[0], p[1]))
            crop = int(rng.integers(1, first - start + 1)) if first > start and rng.random() < self.crop else 0
            k = int(rng.integers(1, self.max_shift + 1)) if self.max_shift and rng.random() < 0.5 else 0
            filler = self.fillers((k,), self.unknown_share(1)) if rng.random() < self.prefix_words else [ioi.BOS_ID] * k
            new = np.concatenate([row[:start], filler, row[start + crop:p[3] + 1]])
            out[i, :len(new)] = new
            moved[i] = p - crop + k
        return out, moved

    def __call__(self):
        d, rng = self.d, self.rng
        # IOI from the train templates: two distinct pool words replace (IO, S) at their positions and as the answer.
        n_templates = self.n_ioi - self.n_grammar
        idx = rng.integers(len(d["ioi_x"]), size=n_templates)
        rows, pos = d["ioi_x"][idx].copy(), d["ioi_pos"][idx]
        new = np.stack([rng.choice(d["name_pool"], size=2, replace=False) for _ in range(n_templates)])
        r = np.arange(n_templates)
        # Word noise: some template words (never a name, nor the last token) become filler words (template
        # words, broad-list words, untrained words), so the model cannot key on particular words (e.g. " and"
        # between the names) to find the names.
        cols = np.arange(rows.shape[1])[None, :]
        noisy = (rng.random(rows.shape) < self.word_noise) & (cols < pos[:, 3:4]) & (rows != ioi.BOS_ID)
        rows = np.where(noisy, self.fillers(rows.shape, self.unknown_share(n_templates)), rows)
        rows[r, pos[:, 0]], rows[r, pos[:, 1]], rows[r, pos[:, 2]] = new[:, 0], new[:, 1], new[:, 1]
        rows, pos = self.move(rows, pos)
        g_rows, g_pos, g_new = self.generated(self.n_grammar)
        ioi_x, pos, new = np.concatenate([rows, g_rows]), np.concatenate([pos, g_pos]), np.concatenate([new, g_new])
        ioi_y = new[:, 0]
        # Greater-than: half the nouns replaced by pool words.
        rows = d["gt"][rng.integers(len(d["gt"]), size=self.n_gt)].copy()
        swap = rng.random(self.n_gt) < 0.5
        rows[swap, 1] = rng.choice(d["noun_pool"], size=int(swap.sum()))
        gt_x = np.pad(rows[:, :GT_LEN], ((0, 0), (0, self.width - GT_LEN)), constant_values=rows[0, 0])
        gt_y = rows[:, GT_LEN]
        # Factual: uniform over the 434 prompts.
        idx = rng.integers(len(self.fact), size=self.n_fact)
        x = np.concatenate([ioi_x, gt_x, self.fact[idx]])
        y = np.concatenate([ioi_y, gt_y, d["fact_answers"][idx]])
        last = np.concatenate([pos[:, 3], np.full(self.n_gt, GT_LEN - 1), self.fact_len[idx] - 1])
        # A second read per prompt: in IOI, the token before the repeated subject S2, whose next token is
        # one of the two names seen (ordinary next-token prediction there teaches copying a name).
        before_s2 = np.concatenate([pos[:, 2] - 1, last[self.n_ioi:]])
        y2 = np.concatenate([new[:, 1], y[self.n_ioi:]])
        # More answer reads in generated sentences: each word after S2 but the last ends a sentence of the
        # grammar too (S W{1-k} -> IO), so IO is its answer as well (more signal per prompt, same compute).
        more = pos[:, 2:3] + 1 + np.arange(EXTRA_READS)[None, :]
        valid = (more < pos[:, 3:4]) & (np.arange(self.n_ioi) >= n_templates)[:, None]
        more = np.concatenate([np.where(valid, more, pos[:, 3:4]), np.repeat(last[self.n_ioi:, None], EXTRA_READS, 1)])
        weight = np.concatenate([np.ones((len(x), 2)), np.pad(valid, ((0, len(x) - self.n_ioi), (0, 0)))], 1)
        task = np.concatenate([np.zeros(self.n_ioi), np.ones(self.n_gt), np.full(self.n_fact, 2)]).astype(np.int32)
        cx, cy = self.compact[x], self.compact[np.concatenate([np.stack([y, y2], 1), np.repeat(y[:, None], EXTRA_READS, 1)], 1)]
        cx = np.where(cx < 0, 0, cx)  # padding ids outside the compact vocab (never read)
        assert (cy >= 0).all()
        reads = np.concatenate([np.stack([last, before_s2], 1), more], 1)
        return cx.astype(np.int32), cy.astype(np.int32), reads.astype(np.int32), weight.astype(np.float32), task


# --- model -----------------------------------------------------------------------------


def compact_model(params, frozen_rows, name_mask):
    """The compact-vocabulary GPT2: trainable rows then frozen rows of wte, the shared name vector
    added to the frozen rows of names (`name_mask` 1 there, else 0)."""
    model, name_vec = params
    wte = jnp.concatenate([model.wte, frozen_rows + name_mask[:, None] * fixed_norm(name_vec)])
    cfg = GPT2Config(**{**CONFIG.to_dict(), "d_vocab": wte.shape[0]})
    return GPT2(cfg, wte, model.wpe, model.blocks, model.ln_f)


def fixed_norm(v):
    """The name vector at NAME_NORM: learnt unconstrained it grew to 5x a row's norm (1.1 after 300 steps),
    so two names' rows were 96% alike after layer norm (hard to tell apart, to copy)."""
    return NAME_NORM * v / jnp.maximum(jnp.linalg.norm(v), 1e-12)


def full_model(full, trainable, frozen, frozen_rows, name_mask, params):
    """The full-vocabulary GPT2: `full`'s untrained rows kept (their init), trained rows and names set."""
    model, name_vec = params
    wte = full.wte.at[trainable].set(model.wte).at[frozen].set(frozen_rows + name_mask[:, None] * fixed_norm(name_vec))
    return GPT2(CONFIG, wte, model.wpe, model.blocks, model.ln_f)


def loss_fn(params, frozen_rows, name_mask, x, y, reads, weight, task, s2_weight):
    """Per task, the answer's cross-entropy (IOI: over all its answer reads, `weight` 1); plus s2_weight x
    IOI's next-token loss before S2. Reads: [answer, before S2, EXTRA_READS more answers]."""
    logits = compact_model(params, frozen_rows, name_mask)(x, logits_at=reads)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, y) * weight  # [B, 2 + EXTRA_READS]
    answers = nll[:, :1].sum(1) + nll[:, 2:].sum(1)
    counts = weight[:, :1].sum(1) + weight[:, 2:].sum(1)
    mean = lambda v, n, t: jnp.sum(jnp.where(task == t, v, 0.0)) / jnp.maximum(jnp.sum(jnp.where(task == t, n, 0.0)), 1)
    per_task = jnp.stack([mean(answers, counts, t) for t in range(3)] + [mean(nll[:, 1], weight[:, 1], 0)])
    return per_task[:3].sum() + s2_weight * per_task[3], per_task


def train(seed, steps, batch, lr, ioi_share=0.5, s2_weight=0.0, max_shift=0, word_noise=0.0, crop=0.0,
          prefix_words=0.0, grammar=0.0, init=None, log_every=100, save_every=0, save_to=None, wide=False,
          name_vector=False):
    """Train from a random init (`init` None) or go on training a saved model (`init`: its folder; every
    embedding row it never trained, frozen ones included, is still at its random init there, names
    plus its name vector if it had one). name_vector: one learned vector added to every name's frozen row."""
    t0 = time.time()
    data = build_data(seed, wide=wide)
    if init is None:
        full = GPT2.init(CONFIG, key=jax.random.PRNGKey(seed))
    else:
        full = jpatch.load(str(init))
        assert full.config.to_dict() == CONFIG.to_dict(), (full.config, CONFIG)
    trainable, frozen = jnp.asarray(data["trainable"]), jnp.asarray(data["frozen"])
    params = (GPT2(CONFIG, full.wte[trainable], full.wpe, full.blocks, full.ln_f), 0.02 * jax.random.normal(jax.random.PRNGKey(seed + 2), (CONFIG.d_model,)))
    frozen_rows = full.wte[frozen]
    name_mask = jnp.asarray(data["frozen_is_name"] & name_vector, jnp.float32)
    if name_vector and init is not None:  # start from the names' mean row: the name vector of a toy that had one
        mean = (name_mask[:, None] * frozen_rows).sum(0) / name_mask.sum()
        frozen_rows, params = frozen_rows - name_mask[:, None] * mean, (params[0], mean)
    sampler = Sampler(data, seed, batch, ioi_share, max_shift, word_noise, crop, prefix_words, grammar)
    decay_mask = jax.tree_util.tree_map(lambda a: a.ndim == 3, params)  # block matrices only
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, min(200, steps // 10), steps, lr / 20)
    opt = optax.chain(optax.clip_by_global_norm(1.0),
                      optax.adamw(schedule, b1=0.9, b2=0.98, weight_decay=0.05, mask=decay_mask))
    opt_state = opt.init(params)

    @jax.jit
    def step(params, opt_state, x, y, reads, weight, task):
        (loss, per_task), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, frozen_rows, name_mask, x, y, reads,
                                                                            weight, task, s2_weight)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, per_task

    print(f"data: {len(data['trainable'])} trainable + {len(data['frozen'])} frozen embedding rows "
          f"({time.time() - t0:.1f}s)", flush=True)
    log, t_train = [], time.time()
    for i in range(1, steps + 1):
        params, opt_state, loss, per_task = step(params, opt_state, *sampler())
        if i % log_every == 0 or i == 1 or i == steps:
            per_task = [round(float(v), 4) for v in per_task]
            log.append({"step": i, "loss": round(float(loss), 4), "ioi": per_task[0], "greater_than": per_task[1],
                        "factual": per_task[2], "ioi_before_s2": per_task[3], "seconds": round(time.time() - t_train, 1),
                        })
            print(log[-1], flush=True)
        if save_every and i % save_every == 0 and i < steps:  # snapshots, to evaluate a long run part-way
            jpatch.save(full_model(full, trainable, frozen, frozen_rows, name_mask, params).astype(jnp.bfloat16),
                        f"{save_to}-step{i}", overwrite=True)
    model = full_model(full, trainable, frozen, frozen_rows, name_mask, params)  # untrained rows keep their init
    info = {"seed": seed, "steps": steps, "batch": batch, "lr": lr, "ioi_share": ioi_share, "train_seconds": round(time.time() - t_train, 1),
            "total_seconds": round(time.time() - t0, 1), "losses": log,
            "trainable_embedding_rows": int(len(data["trainable"])), "frozen_embedding_rows": int(len(data["frozen"])),
            "extra_pool_names": N_EXTRA_NAMES, "s2_weight": s2_weight, "max_shift": max_shift,
            "word_noise": word_noise, "crop": crop, "prefix_words": prefix_words, "grammar": grammar,
            "wide_fillers": wide, "name_vector": name_vector, "broad_filler_words": N_BROAD if wide else 0, "unknown_filler_words": N_UNKNOWN if wide else 0}
    if init is not None:  # what the starting model was: its own training record, losses left out
        record = Path(init) / "training.json"
        previous = json.loads(record.read_text()) if record.exists() else {}
        info["init"] = {"path": str(init), **{k: previous[k] for k in ("command", "seed", "steps", "train_seconds", "eval")
                                               if k in previous}}
    return model, info


# --- evaluation (full vocabulary) ------------------------------------------------------


def _train_templates_test_names(n):
    """IOI prompts from the train templates with held-out names (a check of the name hold-out alone)."""
    task = ioi.ioi_task(2 * n, seed=321, names=ioi.split_names()[1], split="all")
    return task.select(np.flatnonzero(~np.isin(task.info["template"], ioi.TEST_TEMPLATES))[:n])


def last_logits(model, tokens, ends=None):
    """Logits at each prompt's last real token (`ends`; default the last position)."""
    tokens = jnp.asarray(tokens)
    ends = np.full(tokens.shape[0], tokens.shape[1] - 1) if ends is None else np.asarray(ends)
    return model(tokens, logits_at=jnp.asarray(ends)[:, None])


def ioi_figures(model, task):
    """Logit difference IO - S at each prompt's end, over the full vocabulary."""
    logits = last_logits(model, task.clean_tokens, task.info["end_position"])[:, 0]
    n = np.arange(len(task))
    ld = np.asarray(logits[n, task.answers] - logits[n, task.contrasts])
    per_template = [float((ld[task.info["template"] == t] > 0).mean()) for t in np.unique(task.info["template"])]
    return {"logit_diff_positive_frac": float((ld > 0).mean()), "logit_diff_mean": float(ld.mean()),
            "top1_is_io": float((np.asarray(logits.argmax(-1)) == task.answers).mean()),
            "worst_template_positive_frac": min(per_template)}


def evaluate(model, n_ioi=1000, n_gt=1000):
    """The figures on held-out prompts, over the full vocabulary: IOI on held-out templates x
    held-out names without and with <|endoftext|> first, for the held-out templates made of train
    words ("test") and those made of words no IOI training prompt holds ("novel"); and on train
    templates x held-out names."""
    out = {}
    for split, key in (("test", "ioi"), ("novel", "ioi_novel")):
        for bos in (False, True):
            figures = ioi_figures(model, ioi.ioi_task(n_ioi, seed=123, split=split, bos=bos))
            out.update({f"{key}{'_bos' if bos else ''}_{k}": v for k, v in figures.items()})
    train_templates = ioi_figures(model, _train_templates_test_names(n_ioi))
    out["ioi_train_templates_logit_diff_positive_frac"] = train_templates["logit_diff_positive_frac"]

    correct = {}
    for task in factual.factual_task():
        top = np.asarray(last_logits(model, task.clean_tokens)[:, 0].argmax(-1))
        for pair, ok in zip(task.info["pair"], top == task.answers):
            correct[int(pair)] = correct.get(int(pair), True) and bool(ok)
    out["factual_pair_top1"] = float(np.mean(list(correct.values())))
    out["factual_pairs"] = len(correct)

    task = greater_than.greater_than_task(n_gt, seed=123, split="test")
    logits = last_logits(model, task.clean_tokens)
    metric = task.metric(normalize="none")
    pd = np.asarray(metric.score(logits, logits, metric.batch_data(len(task))))
    out["greater_than_prob_diff"] = float(pd.mean())
    probs = jax.nn.softmax(logits[:, 0].astype(jnp.float32), -1)
    out["greater_than_year_mass"] = float(probs[:, greater_than.YEAR_TOKEN_IDS].sum(-1).mean())
    out["passes"] = {k: out[k] >= v for k, v in THRESHOLDS.items()}
    return out


def main():
    global CONFIG
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=8000)
    ap.add_argument("--batch", type=int, default=96)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--ioi-share", type=float, default=0.7, help="fraction of each batch that is IOI")
    ap.add_argument("--s2-weight", type=float, default=0.5,
                    help="weight of the IOI next-token loss before the repeated name (0: answer only)")
    ap.add_argument("--max-shift", type=int, default=6,
                    help="half the IOI prompts start after 1..MAX_SHIFT extra <|endoftext|> tokens (0: never)")
    ap.add_argument("--word-noise", type=float, default=0.05,
                    help="chance that an IOI template word is replaced by a filler word")
    ap.add_argument("--wide-fillers", action="store_true",
                    help="filler words (word noise, prefix words, generated sentences) also from a broad list of "
                         "lowercase GPT-2 words, some with frozen never-trained embeddings (default: template words)")
    ap.add_argument("--grammar", type=float, default=0.0,
                    help="fraction of the IOI prompts generated from the filler-word grammar, not the train "
                         "templates (needs --wide-fillers)")
    ap.add_argument("--name-vector", action="store_true",
                    help="add one learned vector to every name token's frozen row (held-out names included), so "
                         "the model knows which tokens are names, as a pretrained model does")
    ap.add_argument("--crop", type=float, default=0.3,
                    help="chance that an IOI prompt loses 1..all of the words before its first name")
    ap.add_argument("--prefix-words", type=float, default=0.3,
                    help="chance that a shifted IOI prompt is shifted by random template words, not <|endoftext|>")
    ap.add_argument("--init", default=None,
                    help="a saved model's folder to go on training (default: a random init from --seed)")
    ap.add_argument("--save-every", type=int, default=0, help="also save the model every N steps to OUT-stepN")
    ap.add_argument("--layers", type=int, default=CONFIG.n_layer)
    ap.add_argument("--heads", type=int, default=CONFIG.n_head)
    ap.add_argument("--out", default=str(ROOT / "weights" / "toy"))
    ap.add_argument("--eval-only", action="store_true")
    args = ap.parse_args()
    for name in ("ioi_share", "crop", "prefix_words", "word_noise", "grammar"):  # chances: refused before any work
        if not 0.0 <= getattr(args, name) <= 1.0:
            ap.error(f"--{name.replace('_', '-')} must be between 0 and 1, got {getattr(args, name)}")
    if args.grammar and not args.wide_fillers:
        ap.error("--grammar needs --wide-fillers (its sentences are made of the broad-list filler words)")
    out = Path(args.out)
    if not args.eval_only:
        CONFIG = GPT2Config(**{**CONFIG.to_dict(), "n_layer": args.layers, "n_head": args.heads})
        model, info = train(args.seed, args.steps, args.batch, args.lr, args.ioi_share, args.s2_weight,
                            args.max_shift, args.word_noise, args.crop, args.prefix_words, args.grammar, args.init,
                            save_every=args.save_every, save_to=str(out), wide=args.wide_fillers,
                            name_vector=args.name_vector)
        info["command"] = " ".join(["scripts/train_toy.py", *sys.argv[1:]])
        jpatch.save(model.astype(jnp.bfloat16), out, overwrite=True, extra_config={
            "source": "scripts/train_toy.py (toy model trained on IOI / factual / greater-than)",
            "bos": "optional", "ioi_holdout": "strict"})
    else:
        info = json.loads((out / "training.json").read_text())
    saved = jpatch.load(str(out))
    figures = evaluate(saved)
    stored_dtype = str(jpatch.load(str(out), dtype=None).dtype)  # load() gives float32 unless asked
    info.update({"config": saved.config.to_dict(), "saved_dtype": stored_dtype, "bos": "optional",
                 "ioi_holdout": "strict: held-out names never occur in IOI training prompts (nor anywhere else, "
                                "except ' Angela' in the factual prompt 'The mother tongue of Angela Merkel is'), nor do the "
                                "held-out templates (ioi.TEST_TEMPLATES), nor any token of the 'novel' held-out templates, "
                                "places and objects (ioi.FILLER_HELD_OUT_TEMPLATES; build_data now also keeps their words "
                                "in any case, ioi.filler_held_out_words, out of the name pool and filler lists); "
                                "every IOI name and greater-than noun embedding row, held-out or not, stays frozen "
                                "at its random init" + (" (every name row, held-out ones included, plus one learnt vector "
                                "shared by all names, --name-vector: the model knows which tokens are names, nothing about "
                                "any one name)" if info.get("name_vector") else "") +
                                "; training IOI names are drawn from the train-split names plus "
                                f"{N_EXTRA_NAMES} other capitalised single-token words (also frozen)",
                 "eval": figures, "thresholds": THRESHOLDS,
                 "eval_sets": {"ioi": "ioi_task(1000, seed=123, split='test', bos=False / True): held-out templates x "
                                      "held-out names",
                               "ioi_novel": "ioi_task(1000, seed=123, split='novel', bos=False / True): held-out templates "
                                            "none of whose words but the names an IOI training prompt holds x held-out names",
                               "factual": "all pairs",
                               "greater_than": "greater_than_task(1000, seed=123, split='test')"}})
    (out / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    safety.write_marker(out, "model")  # training.json is jpatch's too: a retrain may replace the folder
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
