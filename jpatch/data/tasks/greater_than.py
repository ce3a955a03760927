"""Greater-Than (Hanna et al. 2023): "The war lasted from the year 1732 to the year 17".

The model should put its next-token mass on two-digit years greater than the
start year YY = 32. The STR corruption sets YY to "01", after which no year is
ruled out. The metric is the probability difference over the 100 year tokens
"00".."99" at the last position:

    PD = sum_{y > YY} P(y) - sum_{y <= YY} P(y)

`greater_than_metric(yy)` returns it as a jpatch Metric (normalized by the
clean and corrupted runs unless normalize="none").

Prompts are 12 GPT-2 tokens: "The", noun, " lasted", " from", " the", " year",
" XX", "YY", " to", " the", " year", " XX", with the century XX in 11..17 and
only (XX, YY) pairs whose "XXYY" splits into the tokens " XX" + "YY" (checked
with the tokenizer for both YY and the corrupted "01").
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jpatch.data.tasks import wording
from jpatch.methods.metrics import Metric, NORMALIZATIONS

TEMPLATE = "The {noun} lasted from the year {xx}{yy} to the year {xx}"
CORRUPT_YY = 1
YY_POS = 7
PROMPT_LEN = 12
CENTURIES = tuple(range(11, 18))
YEARS = tuple(range(2, 99))  # candidate start years YY; YY + 1 must be a year token too

# GPT-2 ids of the two-digit year tokens "00".."99" (no leading space), index = year;
# every one is a single token (checked in tests/test_tasks.py).
YEAR_TOKEN_IDS = np.array([
    405, 486, 2999, 3070, 3023, 2713, 3312, 2998, 2919, 2931, 940, 1157, 1065, 1485, 1415, 1314, 1433, 1558,
    1507, 1129, 1238, 2481, 1828, 1954, 1731, 1495, 2075, 1983, 2078, 1959, 1270, 3132, 2624, 2091, 2682, 2327,
    2623, 2718, 2548, 2670, 1821, 3901, 3682, 3559, 2598, 2231, 3510, 2857, 2780, 2920, 1120, 4349, 4309, 4310,
    4051, 2816, 3980, 3553, 3365, 3270, 1899, 5333, 5237, 5066, 2414, 2996, 2791, 3134, 3104, 3388, 2154, 4869,
    4761, 4790, 4524, 2425, 4304, 3324, 3695, 3720, 1795, 6659, 6469, 5999, 5705, 5332, 4521, 5774, 3459, 4531,
    3829, 6420, 5892, 6052, 5824, 3865, 4846, 5607, 4089, 2079,
], dtype=np.int32)

# Event nouns (single GPT-2 tokens with a leading space), written for jpatch; every
# 4th (indices 3, 7, ...) is held out by split="test".
NOUNS = (
    "war", "strike", "drought", "expedition", "famine", "plague", "siege", "reign",
    "rebellion", "revolution", "occupation", "dynasty", "voyage", "journey", "crusade", "blockade",
    "boycott", "embargo", "recession", "depression", "epidemic", "pilgrimage", "campaign", "trial",
    "truce", "migration", "conflict", "dispute", "feud", "alliance", "partnership", "marriage",
    "friendship", "tournament", "festival", "exhibition", "construction", "project", "investigation", "negotiation",
    "mission", "regime", "uprising", "insurgency", "invasion", "tour", "contract", "ban",
)
SPLITS = ("all", "train", "test")


def split_nouns(nouns=NOUNS):
    """(train, test): every 4th noun is held out for test."""
    nouns = tuple(nouns)
    return tuple(n for i, n in enumerate(nouns) if i % 4 != 3), tuple(nouns[3::4])


def _splits_cleanly(xx, yy, tok):
    want = [f" {xx}", f"{yy:02d}"]
    return tok.to_str_tokens(f" {xx}{yy:02d}") == want


@functools.lru_cache(maxsize=None)
def valid_years(xx, tokenizer=None):
    """The start years YY in `YEARS` usable with century `xx`: " XXYY" and the
    corrupted " XX01" both tokenize as " XX" + two digits (in `tokenizer`, default GPT-2's)."""
    tok = wording.resolve(tokenizer)
    if not _splits_cleanly(xx, CORRUPT_YY, tok):
        return ()
    return tuple(yy for yy in YEARS if _splits_cleanly(xx, yy, tok))


def year_token_ids(tokenizer=None):
    """[100] the ids of the year tokens "00".."99" (index = year); GPT-2's are `YEAR_TOKEN_IDS`.
    A year that is not one token of `tokenizer` is refused by name: it is an answer."""
    if tokenizer is None:
        return YEAR_TOKEN_IDS
    return np.array([wording.single_token(tokenizer, f"{y:02d}", "greater-than", "year answer", after="")
                     for y in range(100)], dtype=np.int32)


def _greater_than_score(logits, clean_logits, data):
    """sum_{y > yy} P(y) - sum_{y <= yy} P(y) over the year tokens at the last read position."""
    years = data.get("years", YEAR_TOKEN_IDS)
    probs = jax.nn.softmax(logits[:, -1].astype(jnp.float32), axis=-1)[:, jnp.asarray(years)]
    greater = jnp.arange(years.shape[0])[None, :] > data["yy"][:, None]
    return jnp.sum(jnp.where(greater, probs, 0.0), axis=-1) - jnp.sum(jnp.where(greater, 0.0, probs), axis=-1)


def greater_than_metric(yy, *, normalize="range", positions=None, year_ids=None):
    """The probability-difference Metric for start years `yy` ([batch] ints in 0..99).

    normalize: "range" ((PD_pt - PD_*) / (PD_cl - PD_*), the default), "baseline"
    (PD_pt - PD_*) or "none" (the raw PD). year_ids: [100] the year tokens' ids
    (default GPT-2's `YEAR_TOKEN_IDS`; `year_token_ids(model.tokenizer)` for another vocabulary).
    """
    yy = np.asarray(yy)
    if yy.ndim != 1 or not np.issubdtype(yy.dtype, np.integer) or (yy < 0).any() or (yy > 99).any():
        raise ValueError(f"yy must be one two-digit year (0..99) per prompt, got {yy.tolist()}")
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"unknown normalize={normalize!r}; valid: {', '.join(NORMALIZATIONS)}")
    data = {"yy": yy.astype(np.int32)}
    if year_ids is not None and not np.array_equal(year_ids, YEAR_TOKEN_IDS):
        data["years"] = np.asarray(year_ids, np.int32)
    return Metric("greater_than", _greater_than_score, data, positions, normalize)


def _task_metric(task, **kw):
    if "year_ids" in task.info:
        kw.setdefault("year_ids", np.asarray(task.info["year_ids"])[0])
    return greater_than_metric(task.info["yy"], **kw)


def greater_than_task(n_prompts=100, *, seed=0, split="all", nouns=None, centuries=CENTURIES, tokenizer=None,
                      bos=False):
    """`n_prompts` greater-than prompts (random noun, century XX and start year YY),
    corrupted with YY = "01"; all 12 tokens long.

    split: "all", or "train" / "test" (`split_nouns`: every 4th noun is test).
    answer = the token of YY + 1, contrast = the token of YY (for logit-difference
    metrics); the default metric is `greater_than_metric`. key_positions = [[7]]
    (the YY token); info: "yy", "xx" (and "year_ids", [N, 100], with a tokenizer other than GPT-2's).
    tokenizer: the prompts' (default GPT-2's); a year token that is not one token in it is refused.
    bos: start every prompt with its BOS token (YY then one position later).
    """
    from jpatch.data.tasks import Task

    if isinstance(n_prompts, bool) or not isinstance(n_prompts, (int, np.integer)) or n_prompts < 1:
        raise ValueError(f"n_prompts must be a positive int, got {n_prompts!r}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    tok = wording.resolve(tokenizer)
    years_ids = year_token_ids(tokenizer)
    nouns = tuple(NOUNS if nouns is None else nouns)
    bad = [n for n in nouns if not isinstance(n, str) or not tok.is_single_token(" " + n.strip())]
    if bad:
        raise ValueError(f"greater-than nouns must be single tokens with a leading space ({tok.single_token}); "
                         f"not single tokens: {bad}")
    nouns = tuple(n.strip() for n in nouns)
    if split != "all":
        nouns = split_nouns(nouns)[split == "test"]
    centuries = tuple(int(xx) for xx in centuries if valid_years(int(xx), tokenizer))
    if not nouns or not centuries:
        raise ValueError(f"no usable {'nouns' if not nouns else 'centuries'} for the greater-than task")
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(int(n_prompts)):
        xx = centuries[rng.integers(len(centuries))]
        years = valid_years(xx, tokenizer)
        rows.append((nouns[rng.integers(len(nouns))], xx, years[rng.integers(len(years))]))
    prompts = [TEMPLATE.format(noun=n, xx=xx, yy=f"{yy:02d}") for n, xx, yy in rows]
    corrupted = [TEMPLATE.format(noun=n, xx=xx, yy=f"{CORRUPT_YY:02d}") for n, xx, _ in rows]
    start = wording.bos_ids(tok, bos, "greater-than")
    clean_ids = [start + wording.encode_exact(tok, p, "greater-than") for p in prompts]
    corrupted_ids = [start + wording.encode_exact(tok, p, "greater-than") for p in corrupted]
    yy = np.array([r[2] for r in rows], dtype=np.int32)
    n, yy_pos = len(rows), YY_POS + len(start)
    if ({len(ids) for ids in clean_ids + corrupted_ids} != {PROMPT_LEN + len(start)}
            or (np.array(clean_ids)[:, yy_pos] != years_ids[yy]).any()):
        raise ValueError(f"greater-than: this model's tokenizer does not make the prompts {PROMPT_LEN} tokens "
                         f"with the year YY at token {YY_POS} (e.g. {tok.to_str_tokens(prompts[0])!r})")
    prefix = wording.bos_text(tok, bos)
    info = {"yy": yy, "xx": np.array([r[1] for r in rows], dtype=np.int32)}
    if tokenizer is not None:
        info["year_ids"] = np.tile(years_ids, (n, 1))
    clean_tokens, corrupted_tokens = np.array(clean_ids, np.int32), np.array(corrupted_ids, np.int32)
    return Task(
        name=f"greater-than-{split}" if split != "all" else "greater-than",
        clean_tokens=clean_tokens,
        corrupted_tokens=corrupted_tokens,
        answers=years_ids[yy + 1],
        contrasts=years_ids[yy],
        key_positions=np.full((n, 1), yy_pos),
        last_key_position=np.full(n, yy_pos),
        prompts=[prefix + p for p in prompts],
        corrupted_prompts=[prefix + p for p in corrupted],
        metric_fn=_task_metric,
        info=info,
        tokenizer=tokenizer,
    )


def greater_than_prompts_text(n_prompts, *, seed=0, split="train", with_answer=True):
    """Greater-than sentences for training a toy model, completed with an end year
    after the start year when `with_answer` ("... from the year 1732 to the year 1758.")."""
    task = greater_than_task(n_prompts, seed=seed, split=split)
    rng = np.random.default_rng(seed + 1)
    texts = []
    for prompt, yy in zip(task.prompts, task.info["yy"]):
        end = int(rng.integers(yy + 1, 100))
        texts.append(prompt + (f"{end:02d}." if with_answer else ""))
    return texts
