"""GPT-2 as a pure function of (params, tokens, overrides).

Weights follow the Hugging Face GPT-2 layout (Conv1D weights are [in, out],
the unembedding is tied to `wte`); blocks are stacked along a leading layer
axis and run with `jax.lax.scan`. An override is data, not a hook: for a site
it gives a mask of the entries to replace and the values to put there, so
`jax.vmap` over a stack of overrides runs many patched forwards in one call.
"""

import dataclasses
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from jpatch.model.types import Logits, Mask, Tokens
from jpatch.model import analysis

from jpatch.model import interventions

from jpatch.model import sites
from jpatch.model.front import FrontDoor
from jpatch.model.interventions import Override  # noqa: F401  (re-exported: jpatch.model.Override)

ACTIVATIONS = {
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
}


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    n_layer: int = 12
    n_head: int = 12
    d_model: int = 768
    d_mlp: int = 3072
    n_ctx: int = 1024
    d_vocab: int = 50257
    layer_norm_eps: float = 1e-5
    activation: str = "gelu_new"

    def __post_init__(self):
        for name in ("n_layer", "n_head", "d_model", "d_mlp", "n_ctx", "d_vocab"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"GPT2Config {name} must be an integer >= 1, got {value!r}")
        eps = self.layer_norm_eps
        if isinstance(eps, bool) or not isinstance(eps, (int, float, np.number)) or not 0 < eps < math.inf:
            raise ValueError(f"GPT2Config layer_norm_eps must be a finite number > 0, got {eps!r}")
        if not isinstance(self.activation, str):
            raise ValueError(f"GPT2Config activation must be a string, got {self.activation!r}")
        if self.d_model % self.n_head:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_head={self.n_head}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}; valid: {', '.join(ACTIVATIONS)}")

    @property
    def d_head(self):
        return self.d_model // self.n_head

    # TransformerLens's field names beside jpatch's own.
    n_layers = property(lambda self: self.n_layer)
    n_heads = property(lambda self: self.n_head)
    act_fn = property(lambda self: self.activation)
    eps = property(lambda self: self.layer_norm_eps)

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d):
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown GPT2Config fields {sorted(unknown)}; valid: {sorted(names)}")
        return cls(**d)


def normalize(x, eps):
    """Layer norm without its affine part, computed in float32."""
    x = x.astype(jnp.float32)
    x = x - x.mean(-1, keepdims=True)
    return x * jax.lax.rsqrt((x * x).mean(-1, keepdims=True) + eps)


def no_edit(site, act):
    return act


def normalize_hooked(x, eps, edit, name):
    """`normalize` through TransformerLens's hook points <name>.hook_scale [..., 1] and <name>.hook_normalized."""
    x = x.astype(jnp.float32)
    x = x - x.mean(-1, keepdims=True)
    scale = edit(f"{name}.hook_scale", jnp.sqrt((x * x).mean(-1, keepdims=True) + eps))
    return edit(f"{name}.hook_normalized", x / scale)


class LayerNorm(eqx.Module):
    weight: jax.Array
    bias: jax.Array

    def __call__(self, x, eps, edit=no_edit, name="ln"):
        return (normalize_hooked(x, eps, edit, name) * self.weight + self.bias).astype(x.dtype)


class Attention(eqx.Module):
    c_attn_w: jax.Array  # [d_model, 3 * d_model]: q, k, v, heads contiguous within each
    c_attn_b: jax.Array
    c_proj_w: jax.Array  # [d_model, d_model]
    c_proj_b: jax.Array

    def qkv(self, x, n_head):
        """x [..., d] -> q, k, v each [..., n_head, d_head]."""
        qkv = x @ self.c_attn_w + self.c_attn_b
        q, k, v = jnp.split(qkv, 3, axis=-1)
        split = lambda t: t.reshape(*t.shape[:-1], n_head, -1)
        return split(q), split(k), split(v)

    def out(self, z, edit=no_edit):
        """z [..., n_head, d_head] -> [..., d]; per-head attn.hook_result [..., n_head, d] when `edit` wants it."""
        if not getattr(edit, "wants_result", False):
            return z.reshape(*z.shape[:-2], -1) @ self.c_proj_w + self.c_proj_b
        w = self.c_proj_w.reshape(z.shape[-2], z.shape[-1], -1)  # [n_head, d_head, d]
        result = edit("attn.hook_result", jnp.einsum("...hd,hdm->...hm", z, w))
        return result.sum(-2) + self.c_proj_b


class MLP(eqx.Module):
    c_fc_w: jax.Array  # [d_model, d_mlp]
    c_fc_b: jax.Array
    c_proj_w: jax.Array  # [d_mlp, d_model]
    c_proj_b: jax.Array

    def __call__(self, x, activation, edit=no_edit):
        pre = edit("mlp.hook_pre", x @ self.c_fc_w + self.c_fc_b)
        return edit("mlp.hook_post", ACTIVATIONS[activation](pre)) @ self.c_proj_w + self.c_proj_b


def causal_attention(q, k, v, key_mask=None, edit=no_edit):
    """q, k, v [..., T, H, d_head] -> z [..., T, H, d_head]; key_mask [..., T] marks real tokens."""
    T = q.shape[-3]
    # Scores, softmax and the pattern-weighted sum accumulate in float32 even for bfloat16 weights.
    scores = jnp.einsum("...qhd,...khd->...hqk", q, k, preferred_element_type=jnp.float32) / math.sqrt(q.shape[-1])
    allowed = jnp.tril(jnp.ones((T, T), bool))
    if key_mask is not None:
        allowed = allowed & key_mask[..., None, None, :].astype(bool)
    scores = edit("attn.hook_attn_scores", jnp.where(allowed, scores, -jnp.inf))  # -inf as TransformerLens
    # A finite fill keeps fully masked rows (left padding) finite instead of NaN.
    scores = jnp.where(allowed, scores, jnp.finfo(jnp.float32).min)
    pattern = edit("attn.hook_pattern", jax.nn.softmax(scores, axis=-1))
    z = jnp.einsum("...hqk,...khd->...qhd", pattern, v, preferred_element_type=jnp.float32)
    return z.astype(q.dtype)


class Block(eqx.Module):
    ln_1: LayerNorm
    attn: Attention
    ln_2: LayerNorm
    mlp: MLP

    def __call__(self, x, config, attend, edit=no_edit):
        """One block on rows x [..., d].

        attend(q, k, v) -> z mixes positions (and applies the pattern edit);
        edit(site, activation) -> activation is where overrides and caching happen.
        Both are supplied by the caller, so the same block runs a plain forward
        and the patching engine's packed rows.
        """
        eps = config.layer_norm_eps
        x = edit("hook_resid_pre", x)
        q, k, v = self.attn.qkv(self.ln_1(x, eps, edit, "ln1"), config.n_head)
        q, k, v = edit("attn.hook_q", q), edit("attn.hook_k", k), edit("attn.hook_v", v)
        z = edit("attn.hook_z", attend(q, k, v))
        x = edit("hook_resid_mid", x + edit("hook_attn_out", self.attn.out(z, edit)))
        mlp_out = edit("hook_mlp_out", self.mlp(self.ln_2(x, eps, edit, "ln2"), config.activation, edit))
        return edit("hook_resid_post", x + mlp_out)


def apply_override(override, act, site):
    """One intervention (or None) on `act`, for callers that build their own forward."""
    return act if override is None else override(act, site)


def _editor(plan, cache, record, layer=None):
    """An `edit(site, act)` that applies the interventions of `plan` (see
    `interventions.normalize`) and stores the sites in `record` into `cache`."""

    def edit(site, act):
        act = interventions.apply(plan.get(site, ()), site, act, layer)
        if site in record:
            cache[site] = act
        return act

    edit.wants_result = "attn.hook_result" in record or "attn.hook_result" in plan
    return edit


def record_sites(names_filter, n_layer):
    """run_with_cache's names_filter -> the frozenset of sites to record.

    None: every site except the per-head attn.hook_result (only when asked); a name or
    list of names in any spelling; or a function of a full hook name (TransformerLens's
    filter), asked about every layer's name. A site is kept at every layer if any is asked.
    """
    if names_filter is None:
        return frozenset(sites.ALL_SITES) - frozenset(sites.ON_REQUEST_SITES)
    if callable(names_filter):
        full = lambda s: [sites.full_name(s, l) for l in range(n_layer)] if s in sites.LAYER_SITES else [s]
        return frozenset(s for s in sites.ALL_SITES if any(names_filter(n) for n in full(s)))
    names = [names_filter] if isinstance(names_filter, (str, tuple)) else list(names_filter)
    return frozenset(sites.resolve(n)[0] for n in names)


class Cache(eqx.Module):
    """Activations keyed by TransformerLens hook names.

    `stacks[site]` holds a per-layer site as one [n_layer, ...] array;
    `cache["blocks.3.hook_resid_pre"]` gives one layer's slice.
    """

    stacks: dict
    n_layer: int = eqx.field(static=True)
    model: object = None  # the GPT2 that made it, for the analysis helpers (attached outside jit)

    # TransformerLens's ActivationCache helpers (see jpatch.analysis)
    accumulated_resid = analysis.accumulated_resid
    decompose_resid = analysis.decompose_resid
    stack_head_results = analysis.stack_head_results
    apply_ln_to_stack = analysis.apply_ln_to_stack
    logit_attrs = analysis.logit_attrs
    logit_lens = analysis.logit_lens

    def __contains__(self, name):
        try:
            self[name]
        except KeyError:
            return False
        return True

    def __getitem__(self, name):
        site, layer = sites.parse(name, self.n_layer)
        if site not in self.stacks:
            raise KeyError(f"{name!r} was not cached" + (
                " (attn.hook_result is cached only when asked: run_with_cache(names_filter=...))"
                if site in sites.ON_REQUEST_SITES else ""))
        return self.stacks[site] if layer is None else self.stacks[site][layer]

    def keys(self):
        """Full hook names in TransformerLens's (forward) order."""
        have = lambda names: [s for s in names if s in self.stacks]
        blocks = [f"blocks.{l}.{s}" for l in range(self.n_layer) for s in have(sites.LAYER_SITES)]
        return have(sites.GLOBAL_SITES[:2]) + blocks + have(sites.GLOBAL_SITES[2:])

    def items(self):
        return [(name, self[name]) for name in self.keys()]

    def stacked(self, site):
        """All layers of a site as one [n_layer, ...] array."""
        return self.stacks[sites.canonical(site)]


class GPT2(FrontDoor, eqx.Module):
    config: GPT2Config = eqx.field(static=True)
    wte: jax.Array  # [d_vocab, d_model], also the unembedding
    wpe: jax.Array  # [n_ctx, d_model]
    blocks: Block  # every leaf has a leading [n_layer] axis
    ln_f: LayerNorm

    @property
    def cfg(self):
        return self.config

    @property
    def dtype(self):
        return self.wte.dtype

    @classmethod
    def init(cls, config, *, key, std=0.02, dtype=jnp.float32):
        """Random weights as GPT-2 initialises them (normal(0, std) weights, zero biases)."""
        L, d, m = config.n_layer, config.d_model, config.d_mlp
        keys = iter(jax.random.split(key, 8))
        normal = lambda *shape: std * jax.random.normal(next(keys), shape, dtype)
        zeros = lambda *shape: jnp.zeros(shape, dtype)
        ones = lambda *shape: jnp.ones(shape, dtype)
        blocks = Block(
            ln_1=LayerNorm(ones(L, d), zeros(L, d)),
            attn=Attention(normal(L, d, 3 * d), zeros(L, 3 * d), normal(L, d, d), zeros(L, d)),
            ln_2=LayerNorm(ones(L, d), zeros(L, d)),
            mlp=MLP(normal(L, d, m), zeros(L, m), normal(L, m, d), zeros(L, d)),
        )
        return cls(config, normal(config.d_vocab, d), normal(config.n_ctx, d), blocks, LayerNorm(ones(d), zeros(d)))

    def astype(self, dtype):
        return jax.tree_util.tree_map(lambda a: a.astype(dtype), self)

    def check_tokens(self, tokens):
        """Raise a clear error for inputs the model cannot run."""
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [batch, pos], got shape {tuple(tokens.shape)}")
        if tokens.shape[1] > self.config.n_ctx:
            raise ValueError(f"sequence length {tokens.shape[1]} exceeds the model's n_ctx={self.config.n_ctx}")
        if not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise TypeError(f"tokens must be integers, got {tokens.dtype}")
        if not isinstance(tokens, jax.core.Tracer):
            t = np.asarray(tokens)
            bad = (t < 0) | (t >= self.config.d_vocab)
            if bad.any():
                b, p = np.argwhere(bad)[0]
                raise ValueError(
                    f"token id {int(t[b, p])} at [batch {b}, pos {p}] is outside the vocabulary [0, {self.config.d_vocab})"
                )

    def positions(self, tokens, attention_mask=None):
        """Position ids [batch, pos]: counted over real tokens, so left padding does not shift them."""
        if attention_mask is None:
            return jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        return jnp.maximum(jnp.cumsum(attention_mask, axis=1) - 1, 0)

    def unembed(self, x, edit=no_edit):
        """Final layer norm and tied unembedding: [..., d] -> float32 logits [..., d_vocab]."""
        normalized = normalize_hooked(x, self.config.layer_norm_eps, edit, "ln_final")
        x = edit("unembed.hook_in", normalized * self.ln_f.weight + self.ln_f.bias)
        return edit("unembed.hook_out", jnp.matmul(x, self.wte.T, preferred_element_type=jnp.float32))

    def __call__(self, tokens: Tokens, *, overrides=None, attention_mask: Mask = None, logits_at=None) -> Logits:
        """tokens [batch, pos] (or [pos], or text: see `to_tokens`) -> logits [batch, pos, d_vocab]
        (or [batch, K, d_vocab] at `logits_at` [batch, K]).

        overrides: {site name in any spelling: Override / Add / Scale / Apply or a list of them}
        (see `jpatch.interventions`)."""
        return self._run(tokens, overrides, attention_mask, logits_at, record=frozenset())[0]

    def run_with_cache(self, tokens: Tokens, *, names_filter=None, overrides=None, attention_mask: Mask = None,
                       logits_at=None) -> tuple[Logits, "Cache"]:
        """Logits and a `Cache` of every hook point, keyed by TransformerLens hook names.

        names_filter: None (every hook point but the per-head attn.hook_result), a name or
        list of names in any spelling, or a function of a full hook name; only those are kept."""
        return self._run(tokens, overrides, attention_mask, logits_at, record=record_sites(names_filter, self.config.n_layer))

    def _run(self, tokens, overrides, attention_mask, logits_at, record):
        tokens, attention_mask = self.as_tokens(tokens, attention_mask)
        self.check_tokens(tokens)
        overrides = interventions.normalize(overrides, self.config.n_layer)
        if logits_at is not None:
            logits_at = jnp.asarray(logits_at)
            if logits_at.ndim != 2 or logits_at.shape[0] != tokens.shape[0]:
                raise ValueError(f"logits_at must be [batch, K] positions, got shape {tuple(logits_at.shape)}")
        logits, cache = _forward(self, tokens, overrides, attention_mask, logits_at, record)
        return logits, None if cache is None else eqx.tree_at(lambda c: c.model, cache, self, is_leaf=lambda x: x is None)

    def _forward(self, tokens, overrides, attention_mask, logits_at, record):
        key_mask = None if attention_mask is None else jnp.asarray(attention_mask).astype(bool)
        cache = {}
        global_edit = _editor(overrides, cache, record)
        embed = global_edit("hook_embed", self.wte[tokens])
        pos_embed = global_edit("hook_pos_embed", self.wpe[self.positions(tokens, attention_mask)])

        def step(x, per_layer):
            block, layer = per_layer
            layer_cache = {}
            edit = _editor(overrides, layer_cache, record, layer)
            attend = lambda q, k, v: causal_attention(q, k, v, key_mask, edit)
            return block(x, self.config, attend, edit), layer_cache

        # The residual stream is float32 whatever the weights' dtype: bfloat16 weights save memory,
        # while every activation, and so every patched score, keeps float32 precision.
        x = (embed + pos_embed).astype(jnp.float32)
        x, layer_cache = jax.lax.scan(step, x, (self.blocks, jnp.arange(self.config.n_layer)))
        if logits_at is not None:
            x = jnp.take_along_axis(x, jnp.asarray(logits_at)[..., None], axis=1)
        logits = self.unembed(x, global_edit)
        if not record:
            return logits, None
        return logits, Cache({**layer_cache, **cache}, self.config.n_layer)


# Compiled once per shape; called from Python it avoids op-by-op dispatch, inside a
# user's jit it is simply inlined.
_forward = eqx.filter_jit(GPT2._forward)


def override_from_cache(cache, site, *, layers=None, positions=None, heads=None):
    """An `Override` that puts `cache`'s values at the given layers / positions / heads of `site`.

    For "attn.hook_pattern" `positions` are query (destination) positions.
    None selects everything along that axis.
    """
    site = sites.canonical(site)
    value = cache.stacked(site)
    per_layer = site in sites.LAYER_SITES
    b = 1 if per_layer else 0  # the batch axis
    if site == "attn.hook_pattern":
        axes = {"layers": 0, "heads": b + 1, "positions": b + 2}
    elif site in sites.HEAD_VECTOR_SITES:
        axes = {"layers": 0, "positions": b + 1, "heads": b + 2}
    else:
        axes = {"layers": 0, "positions": b + 1}
    if not per_layer:
        del axes["layers"]
    mask = np.ones(value.shape, bool)
    for name, chosen in (("layers", layers), ("positions", positions), ("heads", heads)):
        if chosen is None:
            continue
        if name not in axes:
            raise ValueError(f"site {site!r} has no {name[:-1]} axis")
        axis = axes[name]
        axis_mask = np.zeros(value.shape[axis], bool)
        axis_mask[np.asarray(chosen)] = True
        mask &= axis_mask.reshape([-1 if a == axis else 1 for a in range(value.ndim)])
    return Override(value, jnp.asarray(mask))
