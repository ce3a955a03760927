"""The architecture interface across families: each family's site table matches its forward,
a site a family lacks is refused by name, and family-specific weight names stay in their
family's modules (no method re-derives a layer)."""

import re
import tokenize
from pathlib import Path

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

import jpatch
from jpatch.model import families, sites
from jpatch.model.neox import NeoX, NeoXConfig

ROOT = Path(__file__).resolve().parent.parent
NEOX = NeoXConfig(n_layer=2, n_head=4, d_model=32, d_mlp=64, n_ctx=32, d_vocab=50, rotary_pct=0.5)


@pytest.fixture(scope="module")
def neox():
    return NeoX.init(NEOX, key=jax.random.PRNGKey(0), std=0.1)


@pytest.mark.parametrize("name", list(families.FAMILIES))
def test_site_table_lists_exactly_what_the_forward_caches_with_its_shapes(name):
    family = families.by_name(name)
    config = family.config(n_layer=2, n_head=4, d_model=32, d_mlp=64, n_ctx=32, d_vocab=50)
    model = family.model.init(config, key=jax.random.PRNGKey(1))
    tokens, table = jnp.zeros((3, 5), jnp.int32), config.sites
    # Asking for the per-head q/k/v inputs splits the norm before them per head (ln1's hooks get a
    # head axis, as in TransformerLens's use_split_qkv_input): those are checked on their own.
    _, cache = model.run_with_cache(tokens, names_filter=[s for s in table.all_sites
                                                         if s not in sites.SPLIT_INPUT_SITES])
    _, split_cache = model.run_with_cache(tokens, names_filter=list(sites.SPLIT_INPUT_SITES))
    assert set(cache.stacks) | set(split_cache.stacks) == set(table.all_sites)
    for site in table.all_sites:
        lead = (config.n_layer,) if site in table.layer else ()
        got = (split_cache if site in sites.SPLIT_INPUT_SITES else cache).stacks[site]
        assert got.shape == lead + sites.activation_shape(config, site, 3, 5), site


def test_a_site_the_family_lacks_is_refused_by_name(neox):
    tokens = jnp.zeros((1, 4), jnp.int32)
    with pytest.raises(KeyError, match="GPT-NeoX has no hook point 'hook_resid_mid'"):
        neox(tokens, overrides={"blocks.0.hook_resid_mid": jpatch.Add(jnp.zeros(32))})
    with pytest.raises(KeyError, match="GPT-NeoX has no hook point 'hook_pos_embed'"):
        neox.run_with_cache(tokens, names_filter="hook_pos_embed")
    with pytest.raises(ValueError, match="GPT-NeoX has no hook point 'hook_resid_mid'; sweepable: hook_resid_pre"):
        jpatch.sweep(neox, tokens, tokens, "resid_mid", lambda logits: logits[:, -1, 0].mean())


def test_an_unknown_family_or_model_type_is_refused():
    with pytest.raises(ValueError, match="unknown model family 'mamba'"):
        families.by_name("mamba")
    with pytest.raises(ValueError, match="model_type='mamba' is not a family jpatch converts"):
        families.by_hf_type("mamba")


GPT2_WEIGHT_NAMES = re.compile(r"(c_attn\w*|c_proj\w*|c_fc\w*|wte|wpe|ln_1|ln_2|ln_f)")
GPT2_FILES = {"jpatch/model/gpt2.py", "jpatch/model/convert.py"}


def test_gpt2_weight_names_appear_only_in_the_gpt2_family():
    """No code outside GPT-2's module and conversion reaches into GPT-2's weights (identifiers
    only: docstrings may name them)."""
    found = []
    for path in sorted((ROOT / "jpatch").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel in GPT2_FILES:
            continue
        with open(path, "rb") as f:
            for tok in tokenize.tokenize(f.readline):
                if tok.type == tokenize.NAME and GPT2_WEIGHT_NAMES.fullmatch(tok.string):
                    found.append(f"{rel}:{tok.start[0]}: {tok.line.strip()}")
    assert not found, "GPT-2 weight names outside the GPT-2 family:\n" + "\n".join(found)


def test_the_weight_name_check_finds_a_planted_name(tmp_path):
    """The check above can fail: it finds an identifier planted in a module."""
    planted = tmp_path / "m.py"
    planted.write_text('"""c_attn_w in a docstring is fine."""\nw = model.blocks.attn.c_attn_w\n')
    with open(planted, "rb") as f:
        names = [t.string for t in tokenize.tokenize(f.readline) if t.type == tokenize.NAME]
    assert [n for n in names if GPT2_WEIGHT_NAMES.fullmatch(n)] == ["c_attn_w"]


def _matmul_flops(jaxpr):
    """2 x the multiply-adds of every dot_general in a jaxpr (a scan's body times its length)."""
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (lhs_contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2 * np.prod(eqn.outvars[0].aval.shape) * np.prod([lhs[i] for i in lhs_contract])
        times = eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            total += times * _matmul_flops(sub)
    return int(total)


@pytest.mark.parametrize("name", list(families.FAMILIES))
def test_cost_model_counts_the_forwards_matmuls(name):
    """The planner's FLOPs per block row equal the dot products the forward itself traces on one
    token (minus attention's two per head, which scale with the keys, and the unembedding)."""
    family = families.by_name(name)
    config = family.config(n_layer=3, n_head=4, d_model=32, d_mlp=48, n_ctx=32, d_vocab=50)
    model = family.model.init(config, key=jax.random.PRNGKey(1))
    jaxpr = jax.make_jaxpr(lambda tokens: model(tokens))(jnp.zeros((1, 1), jnp.int32)).jaxpr
    attention = 2 * 2 * config.n_head * config.d_head  # q.k and pattern.v against one key
    unembed = 2 * config.d_model * config.d_vocab
    per_block = (_matmul_flops(jaxpr) - unembed) / config.n_layer - attention
    assert per_block == config.block_flops_per_row()
