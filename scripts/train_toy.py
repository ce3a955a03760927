"""Train the toy GPT-2 in weights/toy/ on the three paper tasks (IOI, factual recall,
greater-than), with the real GPT-2 tokenizer, and save it in bfloat16.

    .venv/bin/python scripts/train_toy.py            # train, save weights/toy/, evaluate
    .venv/bin/python scripts/train_toy.py --eval-only

How it stays fast and still evaluates honestly over the full 50257-token vocabulary:

* The loss is the cross-entropy of the answer token only (the last position of each
  prompt), over a compact vocabulary: the token ids that occur in the training data.
  Every other row of the tied embedding `wte` keeps its random initialisation
  (normal(0, 0.02)), so a token never seen in training can only win by chance; the
  evaluation below is over the full vocabulary of the saved bf16 model.
* Strict IOI hold-out: the held-out names (`ioi.split_names()[1]`) never occur in the
  training data's IOI prompts. To make the model learn a *generic* copying mechanism,
  every "name" in a training IOI prompt is drawn from a large pool (the train-split
  names plus a few thousand other capitalised single-token words), and the embedding
  rows of all name tokens (pool and IOI `NAMES`, held-out ones included) and of the
  greater-than nouns are FROZEN at their random initialisation. A held-out name is
  then, to the model, exactly like a training name: a random init-scale vector it has
  learned to copy. Greater-than nouns are likewise replaced half the time by pool words.
  (One held-out name, " Angela", occurs in a factual prompt, "Angela Merkel"; its row is
  frozen like every name's, so it too stays at its init.)
* No BOS token: `Task.clean_tokens` carry none, so neither does the training data.
* Prompts are right-padded to one length and the logits are read at each prompt's
  last real token (causal attention: padding after it changes nothing).

Figures written to weights/toy/training.json are computed on the saved bf16 model
loaded back with `jpatch.load`.
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

CONFIG = GPT2Config(n_layer=4, n_head=4, d_model=128, d_mlp=512, n_ctx=64, d_vocab=50257)
IOI_LEN, GT_LEN = ioi.PROMPT_LEN, greater_than.PROMPT_LEN
N_EXTRA_NAMES = 3000  # extra capitalised words used as IOI names (frozen embeddings)
THRESHOLDS = {"ioi_logit_diff_positive_frac": 0.95, "factual_pair_top1": 0.90, "greater_than_prob_diff": 0.5}


# --- data ------------------------------------------------------------------------------


def build_data(seed, n_ioi=20000, n_gt=20000):
    """Token arrays (prompt without answer, answer id) per task, and the frozen / trainable vocab."""
    tok = get_tokenizer()
    ioi_ids = np.array([tok.encode(t) for t in ioi.ioi_prompts_text(n_ioi, seed=seed, split="train")], np.int32)
    assert ioi_ids.shape[1] == IOI_LEN + 2, ioi_ids.shape  # prompt, " IO", "."
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
    assert not test_names & set(ioi_ids.ravel().tolist()), "a held-out name leaked into the IOI training prompts"

    # Tokens that are not names: template words, years, facts.
    used = set(ioi_ids[:, [i for i in range(IOI_LEN + 2) if i not in (2, 4, 10, IOI_LEN)]].ravel().tolist())
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
    return dict(ioi=ioi_ids, gt=gt_ids, fact_prompts=fact_prompts, fact_answers=fact_answers,
                name_pool=name_pool, noun_pool=noun_pool, frozen=frozen, trainable=trainable,
                n_fact_prompts=len(fact_prompts))


class Sampler:
    """Mixed batches (IOI / greater-than / factual), right-padded to IOI_LEN, in compact ids."""

    def __init__(self, data, seed, batch):
        self.d, self.rng = data, np.random.default_rng(seed + 1)
        self.n_ioi, self.n_gt = batch // 2, batch // 4
        self.n_fact = batch - self.n_ioi - self.n_gt
        self.compact = np.full(CONFIG.d_vocab, -1, np.int64)
        order = np.concatenate([data["trainable"], data["frozen"]])
        self.compact[order] = np.arange(len(order))
        self.fact = np.zeros((len(data["fact_prompts"]), IOI_LEN), np.int32)
        self.fact_len = np.array([len(p) for p in data["fact_prompts"]])
        for i, p in enumerate(data["fact_prompts"]):
            self.fact[i, :len(p)] = p
        assert self.fact_len.max() <= IOI_LEN

    def __call__(self):
        d, rng = self.d, self.rng
        # IOI: replace (IO, S) by two distinct pool words at positions 2, 4, 10 and the answer.
        rows = d["ioi"][rng.integers(len(d["ioi"]), size=self.n_ioi)].copy()
        io, s = rows[:, IOI_LEN].copy(), rows[:, ioi.S2_POS].copy()
        new = np.stack([rng.choice(d["name_pool"], size=2, replace=False) for _ in range(self.n_ioi)])
        is_io, is_s = rows == io[:, None], rows == s[:, None]
        rows = np.where(is_io, new[:, :1], np.where(is_s, new[:, 1:], rows))
        ioi_x, ioi_y = rows[:, :IOI_LEN], rows[:, IOI_LEN]
        # Greater-than: half the nouns replaced by pool words.
        rows = d["gt"][rng.integers(len(d["gt"]), size=self.n_gt)].copy()
        swap = rng.random(self.n_gt) < 0.5
        rows[swap, 1] = rng.choice(d["noun_pool"], size=int(swap.sum()))
        gt_x = np.pad(rows[:, :GT_LEN], ((0, 0), (0, IOI_LEN - GT_LEN)), constant_values=rows[0, 0])
        gt_y = rows[:, GT_LEN]
        # Factual: uniform over the 434 prompts.
        idx = rng.integers(len(self.fact), size=self.n_fact)
        x = np.concatenate([ioi_x, gt_x, self.fact[idx]])
        y = np.concatenate([ioi_y, gt_y, d["fact_answers"][idx]])
        last = np.concatenate([np.full(self.n_ioi, IOI_LEN - 1), np.full(self.n_gt, GT_LEN - 1), self.fact_len[idx] - 1])
        task = np.concatenate([np.zeros(self.n_ioi), np.ones(self.n_gt), np.full(self.n_fact, 2)]).astype(np.int32)
        cx, cy = self.compact[x], self.compact[y]
        cx = np.where(cx < 0, 0, cx)  # padding ids outside the compact vocab (never read)
        assert (cy >= 0).all()
        return cx.astype(np.int32), cy.astype(np.int32), last[:, None].astype(np.int32), task


# --- model -----------------------------------------------------------------------------


def compact_model(params, frozen_rows):
    """The compact-vocabulary GPT2: trainable rows then frozen rows of wte."""
    wte = jnp.concatenate([params.wte, frozen_rows])
    cfg = GPT2Config(**{**CONFIG.to_dict(), "d_vocab": wte.shape[0]})
    return GPT2(cfg, wte, params.wpe, params.blocks, params.ln_f)


def loss_fn(params, frozen_rows, x, y, last, task):
    logits = compact_model(params, frozen_rows)(x, logits_at=last)[:, 0]
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    per_task = jnp.stack([jnp.sum(jnp.where(task == t, nll, 0.0)) / jnp.maximum(jnp.sum(task == t), 1)
                          for t in range(3)])
    return per_task.sum(), per_task


def train(seed, steps, batch, lr, log_every=100):
    t0 = time.time()
    data = build_data(seed)
    full = GPT2.init(CONFIG, key=jax.random.PRNGKey(seed))
    trainable, frozen = jnp.asarray(data["trainable"]), jnp.asarray(data["frozen"])
    params = GPT2(CONFIG, full.wte[trainable], full.wpe, full.blocks, full.ln_f)
    frozen_rows = full.wte[frozen]
    sampler = Sampler(data, seed, batch)
    decay_mask = jax.tree_util.tree_map(lambda a: a.ndim == 3, params)  # block matrices only
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, min(200, steps // 10), steps, lr / 20)
    opt = optax.chain(optax.clip_by_global_norm(1.0),
                      optax.adamw(schedule, b1=0.9, b2=0.98, weight_decay=0.05, mask=decay_mask))
    opt_state = opt.init(params)

    @jax.jit
    def step(params, opt_state, x, y, last, task):
        (loss, per_task), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, frozen_rows, x, y, last, task)
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
                        "factual": per_task[2], "seconds": round(time.time() - t_train, 1)})
            print(log[-1], flush=True)
    wte = full.wte.at[trainable].set(params.wte)  # untrained rows keep their init
    model = GPT2(CONFIG, wte, params.wpe, params.blocks, params.ln_f)
    info = {"seed": seed, "steps": steps, "batch": batch, "lr": lr, "train_seconds": round(time.time() - t_train, 1),
            "total_seconds": round(time.time() - t0, 1), "losses": log,
            "trainable_embedding_rows": int(len(data["trainable"])), "frozen_embedding_rows": int(len(data["frozen"])),
            "extra_pool_names": N_EXTRA_NAMES}
    return model, info


# --- evaluation (full vocabulary) ------------------------------------------------------


def last_logits(model, tokens):
    tokens = jnp.asarray(tokens)
    return model(tokens, logits_at=jnp.full((tokens.shape[0], 1), tokens.shape[1] - 1))


def evaluate(model, n_ioi=1000, n_gt=1000):
    """The three figures on held-out prompts, over the full vocabulary."""
    out = {}
    task = ioi.ioi_task(n_ioi, seed=123, split="test")
    logits = last_logits(model, task.clean_tokens)[:, 0]
    n = np.arange(len(task))
    ld = np.asarray(logits[n, task.answers] - logits[n, task.contrasts])
    out["ioi_logit_diff_positive_frac"] = float((ld > 0).mean())
    out["ioi_logit_diff_mean"] = float(ld.mean())
    out["ioi_top1_is_io"] = float((np.asarray(logits.argmax(-1)) == task.answers).mean())

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
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--out", default=str(ROOT / "weights" / "toy"))
    ap.add_argument("--eval-only", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    if not args.eval_only:
        model, info = train(args.seed, args.steps, args.batch, args.lr)
        jpatch.save(model.astype(jnp.bfloat16), out, overwrite=True, extra_config={
            "source": "scripts/train_toy.py (toy model trained on IOI / factual / greater-than)",
            "bos": False, "ioi_holdout": "strict"})
    else:
        info = json.loads((out / "training.json").read_text())
    saved = jpatch.load(str(out))
    figures = evaluate(saved)
    info.update({"config": CONFIG.to_dict(), "saved_dtype": str(saved.dtype), "bos": False,
                 "ioi_holdout": "strict: held-out names never occur in IOI training prompts (nor anywhere else, "
                                "except ' Angela' in the factual prompt 'The mother tongue of Angela Merkel is'); "
                                "every IOI name and greater-than noun embedding row, held-out or not, stays frozen "
                                "at its random init; training IOI names are drawn from the train-split names plus "
                                f"{N_EXTRA_NAMES} other capitalised single-token words (also frozen)",
                 "eval": figures, "thresholds": THRESHOLDS,
                 "eval_sets": {"ioi": "ioi_task(1000, seed=123, split='test')", "factual": "all pairs",
                               "greater_than": "greater_than_task(1000, seed=123, split='test')"}})
    (out / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    safety.write_marker(out, "model")  # training.json is jpatch's too: a retrain may replace the folder
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
