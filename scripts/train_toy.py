"""Train the toy GPT-2 in weights/toy/ on the three paper tasks (IOI, factual recall,
greater-than), with the real GPT-2 tokenizer, and save it in bfloat16.

    .venv/bin/python scripts/train_toy.py            # train, save weights/toy/, evaluate
    .venv/bin/python scripts/train_toy.py --eval-only

The bundled model was made with the defaults (4 layers x 8 heads, 8000 steps of 96 prompts,
70% IOI, --s2-weight 0.5, --max-shift 6, --crop 0.3, --prefix-words 0.3, --word-noise 0.05); the
command, settings, timings and figures are in weights/toy/training.json.

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
* Strict IOI name hold-out: the held-out names (`ioi.split_names()[1]`) never occur in
  the training data's IOI prompts. To make the model learn a *generic* copying mechanism,
  every "name" in a training IOI prompt is drawn from a large pool (the train-split
  names plus a few thousand other capitalised single-token words), and the embedding
  rows of all name tokens (pool and IOI `NAMES`, held-out ones included) and of the
  greater-than nouns are FROZEN at their random initialisation. A held-out name is then,
  to the model, exactly like a training name: a random init-scale vector it has learned
  to copy. Greater-than nouns are likewise replaced half the time by pool
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
THRESHOLDS = {"ioi_logit_diff_positive_frac": 0.95, "ioi_bos_logit_diff_positive_frac": 0.95, "factual_pair_top1": 0.90, "greater_than_prob_diff": 0.5}


# --- data ------------------------------------------------------------------------------


def build_data(seed, n_ioi=20000, n_gt=20000):
    """Token arrays (prompt without answer, answer id) per task, and the frozen / trainable vocab."""
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
    capitalised = sorted(i for t, i in vocab.items() if re.fullmatch("\u0120[A-Z][a-z]{2,}", t))
    candidates = [i for i in capitalised if i not in used and i not in names and i not in nouns]
    rng = np.random.default_rng(seed)
    extra = rng.choice(candidates, size=N_EXTRA_NAMES, replace=False).tolist()
    name_pool = np.array(sorted(set(train_names) | set(extra)), np.int32)
    noun_pool = np.array(sorted(set(train_nouns) | set(extra)), np.int32)

    frozen = np.array(sorted(names | nouns | set(extra)), np.int32)  # rows kept at their init
    trainable = np.array(sorted(used - set(frozen.tolist())), np.int32)
    words = np.unique(ioi_x[~is_name])
    return dict(ioi_words=words[words != ioi.BOS_ID], ioi_x=ioi_x, ioi_pos=ioi_pos, ioi_answer=ioi_answer, gt=gt_ids, fact_prompts=fact_prompts,
                fact_answers=fact_answers, name_pool=name_pool, noun_pool=noun_pool, frozen=frozen,
                trainable=trainable, n_fact_prompts=len(fact_prompts))


class Sampler:
    """Mixed batches (IOI / greater-than / factual), right-padded to one width, in compact ids."""

    def __init__(self, data, seed, batch, ioi_share, max_shift, word_noise, crop=0.0, prefix_words=0.0):
        self.d, self.rng, self.max_shift = data, np.random.default_rng(seed + 1), max_shift
        self.word_noise, self.crop, self.prefix_words = word_noise, crop, prefix_words
        self.n_ioi = int(round(batch * ioi_share))
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
            filler = rng.choice(self.d["ioi_words"], size=k) if rng.random() < self.prefix_words else [ioi.BOS_ID] * k
            new = np.concatenate([row[:start], filler, row[start + crop:p[3] + 1]])
            out[i, :len(new)] = new
            moved[i] = p - crop + k
        return out, moved

    def __call__(self):
        d, rng = self.d, self.rng
        # IOI: two distinct pool words replace (IO, S) at their positions and as the answer.
        idx = rng.integers(len(d["ioi_x"]), size=self.n_ioi)
        rows, pos = d["ioi_x"][idx].copy(), d["ioi_pos"][idx]
        new = np.stack([rng.choice(d["name_pool"], size=2, replace=False) for _ in range(self.n_ioi)])
        r = np.arange(self.n_ioi)
        # Word noise: some template words (never a name, nor the last token) become random template words,
        # so the model cannot key on particular words (e.g. " and" between the names) to find the names.
        cols = np.arange(rows.shape[1])[None, :]
        noisy = (rng.random(rows.shape) < self.word_noise) & (cols < pos[:, 3:4]) & (rows != ioi.BOS_ID)
        rows = np.where(noisy, rng.choice(d["ioi_words"], size=rows.shape), rows)
        rows[r, pos[:, 0]], rows[r, pos[:, 1]], rows[r, pos[:, 2]] = new[:, 0], new[:, 1], new[:, 1]
        rows, pos = self.move(rows, pos)
        ioi_x, ioi_y = rows, new[:, 0]
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
        task = np.concatenate([np.zeros(self.n_ioi), np.ones(self.n_gt), np.full(self.n_fact, 2)]).astype(np.int32)
        cx, cy = self.compact[x], self.compact[np.stack([y, y2], 1)]
        cx = np.where(cx < 0, 0, cx)  # padding ids outside the compact vocab (never read)
        assert (cy >= 0).all()
        return cx.astype(np.int32), cy.astype(np.int32), np.stack([last, before_s2], 1).astype(np.int32), task


# --- model -----------------------------------------------------------------------------


def compact_model(params, frozen_rows):
    """The compact-vocabulary GPT2: trainable rows then frozen rows of wte."""
    wte = jnp.concatenate([params.wte, frozen_rows])
    cfg = GPT2Config(**{**CONFIG.to_dict(), "d_vocab": wte.shape[0]})
    return GPT2(cfg, wte, params.wpe, params.blocks, params.ln_f)


def loss_fn(params, frozen_rows, x, y, last, task, s2_weight):
    """Per task, the answer's cross-entropy; plus s2_weight x IOI's next-token loss before S2."""
    logits = compact_model(params, frozen_rows)(x, logits_at=last)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, y)  # [B, 2]
    mean = lambda v, t: jnp.sum(jnp.where(task == t, v, 0.0)) / jnp.maximum(jnp.sum(task == t), 1)
    per_task = jnp.stack([mean(nll[:, 0], t) for t in range(3)] + [mean(nll[:, 1], 0)])
    return per_task[:3].sum() + s2_weight * per_task[3], per_task


def train(seed, steps, batch, lr, ioi_share=0.5, s2_weight=0.0, max_shift=0, word_noise=0.0, crop=0.0,
          prefix_words=0.0, log_every=100):
    t0 = time.time()
    data = build_data(seed)
    full = GPT2.init(CONFIG, key=jax.random.PRNGKey(seed))
    trainable, frozen = jnp.asarray(data["trainable"]), jnp.asarray(data["frozen"])
    params = GPT2(CONFIG, full.wte[trainable], full.wpe, full.blocks, full.ln_f)
    frozen_rows = full.wte[frozen]
    sampler = Sampler(data, seed, batch, ioi_share, max_shift, word_noise, crop, prefix_words)
    decay_mask = jax.tree_util.tree_map(lambda a: a.ndim == 3, params)  # block matrices only
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, min(200, steps // 10), steps, lr / 20)
    opt = optax.chain(optax.clip_by_global_norm(1.0),
                      optax.adamw(schedule, b1=0.9, b2=0.98, weight_decay=0.05, mask=decay_mask))
    opt_state = opt.init(params)

    @jax.jit
    def step(params, opt_state, x, y, last, task):
        (loss, per_task), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, frozen_rows, x, y, last, task,
                                                                            s2_weight)
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
                        "factual": per_task[2], "ioi_before_s2": per_task[3], "seconds": round(time.time() - t_train, 1)})
            print(log[-1], flush=True)
    wte = full.wte.at[trainable].set(params.wte)  # untrained rows keep their init
    model = GPT2(CONFIG, wte, params.wpe, params.blocks, params.ln_f)
    info = {"seed": seed, "steps": steps, "batch": batch, "lr": lr, "ioi_share": ioi_share, "train_seconds": round(time.time() - t_train, 1),
            "total_seconds": round(time.time() - t0, 1), "losses": log,
            "trainable_embedding_rows": int(len(data["trainable"])), "frozen_embedding_rows": int(len(data["frozen"])),
            "extra_pool_names": N_EXTRA_NAMES, "s2_weight": s2_weight, "max_shift": max_shift,
            "word_noise": word_noise, "crop": crop, "prefix_words": prefix_words}
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
    held-out names without and with <|endoftext|> first (and on train templates x held-out names)."""
    out = {}
    for bos in (False, True):
        figures = ioi_figures(model, ioi.ioi_task(n_ioi, seed=123, split="test", bos=bos))
        out.update({f"ioi{'_bos' if bos else ''}_{k}": v for k, v in figures.items()})
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
                    help="chance that an IOI template word is replaced by a random template word")
    ap.add_argument("--crop", type=float, default=0.3,
                    help="chance that an IOI prompt loses 1..all of the words before its first name")
    ap.add_argument("--prefix-words", type=float, default=0.3,
                    help="chance that a shifted IOI prompt is shifted by random template words, not <|endoftext|>")
    ap.add_argument("--layers", type=int, default=CONFIG.n_layer)
    ap.add_argument("--heads", type=int, default=CONFIG.n_head)
    ap.add_argument("--out", default=str(ROOT / "weights" / "toy"))
    ap.add_argument("--eval-only", action="store_true")
    args = ap.parse_args()
    for name in ("ioi_share", "crop", "prefix_words", "word_noise"):  # chances: refused before any work
        if not 0.0 <= getattr(args, name) <= 1.0:
            ap.error(f"--{name.replace('_', '-')} must be between 0 and 1, got {getattr(args, name)}")
    out = Path(args.out)
    if not args.eval_only:
        CONFIG = GPT2Config(**{**CONFIG.to_dict(), "n_layer": args.layers, "n_head": args.heads})
        model, info = train(args.seed, args.steps, args.batch, args.lr, args.ioi_share, args.s2_weight,
                            args.max_shift, args.word_noise, args.crop, args.prefix_words)
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
                                "held-out templates (ioi.TEST_TEMPLATES); "
                                "every IOI name and greater-than noun embedding row, held-out or not, stays frozen "
                                "at its random init; training IOI names are drawn from the train-split names plus "
                                f"{N_EXTRA_NAMES} other capitalised single-token words (also frozen)",
                 "eval": figures, "thresholds": THRESHOLDS,
                 "eval_sets": {"ioi": "ioi_task(1000, seed=123, split='test', bos=False / True): held-out templates x "
                                      "held-out names", "factual": "all pairs",
                               "greater_than": "greater_than_task(1000, seed=123, split='test')"}})
    (out / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    safety.write_marker(out, "model")  # training.json is jpatch's too: a retrain may replace the folder
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
