"""The architecture interface: what every model family provides, and the one forward built on it.

A family (`jpatch.model.gpt2`, `jpatch.model.neox`) is a final subclass of `Transformer` that owns

- its config (a frozen dataclass with `n_layer, n_head, d_head, d_model, d_mlp, d_vocab, n_ctx`)
  whose `sites` is the family's `SiteTable`: every hook point and its axes;
- `embed(tokens, positions, edit)`, its stacked `Block`s called as `block(x, positions, config,
  attend, edit, rows=None)`, and `unembed(x, edit, columns=None)`: the only code that computes a
  layer. The plain forward, the patching engine, gradients and generation all run through them,
  supplying `attend(q, k, v, **options) -> z` (how positions mix) and `edit(site, act) -> act` (where
  overrides, caching and patches act); `rows` keeps only those rows after attention
  (`layers.take_rows`), `columns` computes only those vocabulary ids' logits;
- `KEY_SITE`: the site whose values attention scores against (GPT-2's `attn.hook_k`; a rotary
  family's rotated `attn.hook_rot_k`), which the engine and generation cache;
- the weights in TransformerLens's shapes (`W_E`, `W_U`, `W_Q`, ...), its Hugging Face conversion
  (`jpatch.model.families`) and its tokenizer.
"""

import abc
import dataclasses
import math
import operator
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from jpatch.model import backward, interventions, sites
from jpatch.model import hooks as hook_functions
from jpatch.model.cache import Cache  # noqa: F401  (jpatch.model.architecture.Cache, as before)
from jpatch.model.front import FrontDoor
from jpatch.model.interventions import Override
from jpatch.model.layers import ACTIVATIONS, causal_attention, no_edit
from jpatch.model.types import Logits, Mask, Tokens
from jpatch.model.views import TransformerLensViews, attn_result_sites


class Config:
    """What every family's config (a frozen dataclass subclassing this) shares: the checks of
    its sizes, TransformerLens's field names beside jpatch's, and the dict round trip."""

    SIZES: ClassVar[tuple] = ("n_layer", "n_head", "d_model", "d_mlp", "n_ctx", "d_vocab")
    POSITIVE: ClassVar[tuple] = ("layer_norm_eps",)  # finite numbers > 0

    def __post_init__(self):
        kind = type(self).__name__
        for name in self.SIZES:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{kind} {name} must be an integer >= 1, got {value!r}")
        for name in self.POSITIVE:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not 0 < value < math.inf:
                raise ValueError(f"{kind} {name} must be a finite number > 0, got {value!r}")
        if not isinstance(self.activation, str):
            raise ValueError(f"{kind} activation must be a string, got {self.activation!r}")
        if self.d_model % self.n_head:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_head={self.n_head}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}; valid: {', '.join(ACTIVATIONS)}")

    @property
    def d_head(self):
        return self.d_model // self.n_head

    # The cost model: what the planner and every memory budget read of a family's block.
    @property
    def n_kv_head(self):
        """Key/value heads (fewer than n_head under grouped-query attention)."""
        return self.n_head

    @property
    def d_mlp_in(self):
        """Width of the MLP's input projection (twice d_mlp for a gated MLP)."""
        return self.d_mlp

    def block_flops_per_row(self):
        """FLOPs of one block's matmuls (q, k, v, output, MLP in and out) on one row."""
        d, dh = self.d_model, self.d_head
        return 2 * (d * dh * (2 * self.n_head + 2 * self.n_kv_head) + d * (self.d_mlp_in + self.d_mlp))

    def block_floats_per_row(self):
        """Floats one block holds per row besides attention scores: q, k, v, the MLP's hidden
        units and four residual-width vectors (input, normed, attention and MLP outputs)."""
        return self.d_head * (self.n_head + 2 * self.n_kv_head) + self.d_mlp_in + 4 * self.d_model

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
            raise ValueError(f"unknown {cls.__name__} fields {sorted(unknown)}; valid: {sorted(names)}")
        return cls(**d)


def record_sites(names_filter, table, n_layer):
    """run_with_cache's names_filter -> the frozenset of sites to record.

    None: every site of the family except those computed only on request (attn.hook_result);
    a name or list of names in any spelling; or a function of a full hook name (TransformerLens's
    filter), asked about every layer's name (the reader inputs hook_q_input ... hook_mlp_in only
    when named). A site is kept at every layer if any is asked.
    """
    if names_filter is None:
        return frozenset(table.all_sites) - frozenset(table.on_request)
    if callable(names_filter):
        # The reader inputs change how a block computes (q, k, v per head), so as in TransformerLens
        # (use_split_qkv_input) they are recorded only when named, never by a filter function.
        full = lambda s: [sites.full_name(s, l) for l in range(n_layer)] if s in table.layer else [s]
        return frozenset(s for s in table.all_sites
                         if s not in sites.READER_INPUT_SITES and any(names_filter(n) for n in full(s)))
    names = [names_filter] if isinstance(names_filter, (str, tuple)) else list(names_filter)
    return frozenset(table.check(sites.resolve(n)[0]) for n in names)


def editor(plan, cache, record, layer=None):
    """An `edit(site, act)` that applies the interventions of `plan` (see
    `interventions.normalize`) and stores the sites in `record` into `cache`."""

    def edit(site, act):
        act = interventions.apply(plan.get(site, ()), site, act, layer)
        if site in record:
            cache[site] = act
        return act

    return request_flags(edit, {*record, *plan})


def request_flags(edit, requested):
    """Mark `edit` with what a block computes only on request: per-head results (attn.hook_result)
    and per-head q / k / v inputs (hook_q_input ...) when any of them is among the `requested` sites."""
    edit.wants_result = "attn.hook_result" in requested
    edit.split_inputs = any(s in requested for s in sites.SPLIT_INPUT_SITES)
    return edit


class Transformer(TransformerLensViews, FrontDoor, eqx.Module):
    """The abstract model: a family fills in the abstract parts (see the module docstring)."""

    config: eqx.AbstractVar[object]
    blocks: eqx.AbstractVar[eqx.Module]  # every leaf has a leading [n_layer] axis
    KEY_SITE: ClassVar[str] = "attn.hook_k"

    @abc.abstractmethod
    def embed(self, tokens, positions, edit=no_edit):
        """tokens [batch, pos], positions [batch, pos] -> the residual stream's start [batch, pos, d_model]."""

    @abc.abstractmethod
    def unembed(self, x, edit=no_edit, columns=None):
        """The final norm and unembedding: [..., d_model] -> float32 logits [..., d_vocab] (or [..., C])."""

    def position_qk(self, q, k, positions):
        """q, k [..., T, H, d_head] (attn.hook_q / hook_k) -> the q, k attention scores (the family's
        position encoding, e.g. rotary; none for learned absolute positions)."""
        return q, k

    @property
    def cfg(self):
        return self.config

    @property
    def sites(self):
        """The family's `SiteTable`."""
        return self.config.sites

    @property
    def dtype(self):
        return self.W_E.dtype

    # --- TransformerLens's FactoredMatrix views of the weights (jpatch.model.factored) ---

    @property
    def OV(self):
        """Each head's OV circuit W_V @ W_O as a FactoredMatrix [n_layers, n_heads, d_model, d_model]."""
        from jpatch.model.factored import FactoredMatrix

        return FactoredMatrix(self.W_V, self.W_O)

    @property
    def QK(self):
        """Each head's QK circuit W_Q @ W_K^T as a FactoredMatrix [n_layers, n_heads, d_model, d_model]
        (unrotated: a rotary family's position dependence is not in it, as in TransformerLens)."""
        from jpatch.model.factored import FactoredMatrix

        return FactoredMatrix(self.W_Q, jnp.swapaxes(self.W_K, -1, -2))

    _TL_ATTN = ("W_Q", "W_O", "b_Q", "b_O", "W_K", "W_V", "b_K", "b_V")  # TransformerLens's order
    _TL_MLP = ("W_in", "b_in", "W_out", "b_out")

    def named_parameters(self):
        """[(TransformerLens parameter name, array in its shape)] in TransformerLens's order:
        embed.W_E, pos_embed.W_pos (learned positions only), blocks.{l}.ln1.w ... attn.W_Q ...
        mlp.W_in ..., ln_final.w / .b, unembed.W_U / .b_U. Views of jpatch's weights (a list, not
        a generator; nothing to set requires_grad on: take gradients with jax.grad)."""
        out = [("embed.W_E", self.W_E)]
        if getattr(self, "W_pos", None) is not None:
            out.append(("pos_embed.W_pos", self.W_pos))
        norms = self.layer_norms()
        attn = {name: getattr(self, name) for name in self._TL_ATTN}
        mlp = {name: getattr(self, name) for name in self._TL_MLP}
        for l in range(self.config.n_layer):
            for ln in ("ln1", "ln2"):
                out += [(f"blocks.{l}.{ln}.w", norms[ln].weight[l]), (f"blocks.{l}.{ln}.b", norms[ln].bias[l])]
            out += [(f"blocks.{l}.attn.{name}", w[l]) for name, w in attn.items()]
            out += [(f"blocks.{l}.mlp.{name}", w[l]) for name, w in mlp.items()]
        out += [("ln_final.w", norms["ln_final"].weight), ("ln_final.b", norms["ln_final"].bias),
                ("unembed.W_U", self.W_U), ("unembed.b_U", self.b_U)]
        return out

    def astype(self, dtype):
        # floating weights only: integer leaves (Gemma 2's per-layer windows) keep their values
        cast = lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a
        return jax.tree_util.tree_map(cast, self)

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

    def __call__(self, tokens: Tokens, *, overrides=None, attention_mask: Mask = None, logits_at=None,
                 return_type="logits", stop_at_layer=None, prepend_bos=None) -> Logits:
        """tokens [batch, pos] (or [pos], or text: see `to_tokens`) -> logits [batch, pos, d_vocab]
        (or [batch, K, d_vocab] at `logits_at` [batch, K]).

        overrides: {site name in any spelling: Override / Add / Scale / Apply or a list of them}
        (see `jpatch.interventions`). return_type: "logits", "loss" (`loss_fn`), "both" or None,
        as TransformerLens's; so are stop_at_layer (`residual_before`) and prepend_bos (of a text)."""
        tokens = self.to_tokens(tokens, prepend_bos) if isinstance(tokens, str) and prepend_bos is not None else tokens
        if stop_at_layer is not None:
            return self.residual_before(stop_at_layer, tokens, overrides, attention_mask, logits_at, return_type)
        if return_type not in hook_functions.RETURN_TYPES:
            raise ValueError(f"return_type must be one of {hook_functions.RETURN_TYPES}, got {return_type!r}")
        if return_type in ("loss", "both") and logits_at is not None:
            raise ValueError("the loss reads every position: do not pass logits_at with return_type 'loss' / 'both'")
        if return_type in ("loss", "both"):
            tokens, attention_mask = self.as_tokens(tokens, attention_mask)
        logits = self._run(tokens, overrides, attention_mask, logits_at, record=frozenset())[0]
        if return_type == "logits":
            return logits
        if return_type is None:
            return None
        loss = self.loss_fn(logits, tokens, attention_mask)
        return loss if return_type == "loss" else (logits, loss)

    def loss_fn(self, logits, tokens, attention_mask=None, per_token=False):
        """Next-token cross-entropy of `tokens`: the mean over real positions, or [batch, pos - 1] per token."""
        return hook_functions.lm_cross_entropy_loss(logits, tokens, attention_mask, per_token)

    @backward.with_gradients
    def run_with_cache(self, tokens: Tokens, *, names_filter=None, overrides=None, attention_mask: Mask = None,
                       logits_at=None, stop_at_layer=None, remove_batch_dim=False) -> tuple[Logits, "Cache"]:
        """Logits and a `Cache` of every hook point, keyed by TransformerLens hook names.

        names_filter: None (every hook point but the per-head attn.hook_result), a name or
        list of names in any spelling, or a function of a full hook name; only those are kept.
        stop_at_layer: as TransformerLens's, return the residual stream before block
        `stop_at_layer` ([batch, pos, d_model]; negative counts from the end) instead of the
        logits, with only the hook points before it cached. remove_batch_dim: the cache without
        its batch axis (batch size 1 only); the logits keep theirs."""
        n = self.config.n_layer
        record = record_sites(names_filter, self.sites, n) | attn_result_sites(self, names_filter)
        stop = None
        if stop_at_layer is not None:
            if logits_at is not None:
                raise ValueError("stop_at_layer returns the residual stream, not logits: do not pass logits_at")
            stop = operator.index(stop_at_layer)
            stop = stop + n if stop < 0 else stop
            if not 0 <= stop <= n:
                raise ValueError(f"stop_at_layer must be in [-{n}, {n}], got {stop_at_layer}")
        asked = record
        out_site = None if stop is None else "hook_resid_pre" if stop < n else "hook_resid_post"
        if out_site is not None:
            record = record | {out_site}
        logits, cache = self._run(tokens, overrides, attention_mask, logits_at, record=record)
        keep = None
        if callable(names_filter) or stop is not None:
            layers = range(n if stop is None else stop)
            ran = lambda s: s in ("hook_embed", "hook_pos_embed") or stop is None
            keep = {sites.full_name(s, l) for s in asked if s in sites.LAYER_AXES for l in layers}
            keep |= {s for s in asked if s not in sites.LAYER_AXES and ran(s)}
            if callable(names_filter):
                keep = {name for name in keep if names_filter(name)}
        if out_site is not None:
            logits = cache.stacks[out_site][stop if stop < n else n - 1]
        cache = Cache(cache.stacks if out_site is None or out_site in asked
                      else {s: v for s, v in cache.stacks.items() if s != out_site},
                      n, self, self.sites, keep=keep)
        return logits, cache.remove_batch_dim() if remove_batch_dim else cache

    # --- TransformerLens's hook functions (jpatch.model.hooks): run eagerly, put back as overrides ---

    def run_with_hooks(self, tokens, fwd_hooks=(), bwd_hooks=(), *, return_type="logits", attention_mask=None,
                       backward_of=None, reset_hooks_end=True):
        """TransformerLens's run_with_hooks: fwd_hooks [(name or filter of full names, fn(activation, hook))],
        fn returning the new activation or None (unchanged); written with jax.numpy. Backward hooks
        receive the gradient of `backward_of(logits)` (a scalar) at their site. return_type: "logits",
        "loss" (next-token cross-entropy), "both" or None."""
        return hook_functions.run_with_hooks(self, tokens, fwd_hooks, bwd_hooks, return_type=return_type,
                                             attention_mask=attention_mask, backward_of=backward_of,
                                             reset_hooks_end=reset_hooks_end)

    def hooks(self, fwd_hooks=(), bwd_hooks=(), reset_hooks_end=True):
        """A context manager: every forward of this model inside it runs the hooks."""
        return hook_functions.hooks(self, fwd_hooks, bwd_hooks, reset_hooks_end)

    def add_hook(self, name, fn, dir="fwd"):
        """Keep fn at `name` (or every name a filter function accepts) for this model object's later
        forwards; jpatch's sweeps and methods refuse a model with hooks (they take overrides)."""
        hook_functions.add_hook(self, name, fn, dir)

    def reset_hooks(self, including_permanent=False):
        """Remove every hook added to this model object (jpatch has no permanent hooks)."""
        hook_functions.reset_hooks(self)

    @property
    def hook_dict(self):
        """{full hook name: hook point} with add_hook / remove_hooks, as TransformerLens's hook_dict."""
        return {name: hook_functions.RegisteredHook(self, name) for name in hook_functions.hook_names(self)}

    def _run(self, tokens, overrides, attention_mask, logits_at, record, hooks=True):
        tokens, attention_mask = self.as_tokens(tokens, attention_mask)
        if hooks and hook_functions.has_hooks(self):
            if overrides:
                raise ValueError("this model has hooks added with add_hook: pass the overrides as hooks too, or "
                                 "reset_hooks() first")
            logits, cache = hook_functions.run(self, tokens, attention_mask, record=record)
            if logits_at is not None:
                logits = jnp.take_along_axis(logits, jnp.asarray(logits_at)[..., None], axis=1)
            return logits, cache
        self.check_tokens(tokens)
        overrides = interventions.normalize(overrides, self.config.n_layer, self.sites)
        if logits_at is not None:
            logits_at = jnp.asarray(logits_at)
            if logits_at.ndim != 2 or logits_at.shape[0] != tokens.shape[0]:
                raise ValueError(f"logits_at must be [batch, K] positions, got shape {tuple(logits_at.shape)}")
        logits, cache = _forward(self, tokens, overrides, attention_mask, logits_at, record)
        return logits, None if cache is None else eqx.tree_at(lambda c: c.model, cache, self, is_leaf=lambda x: x is None)

    def _forward(self, tokens, overrides, attention_mask, logits_at, record):
        key_mask = None if attention_mask is None else jnp.asarray(attention_mask).astype(bool)
        positions = self.positions(tokens, attention_mask)
        cache = {}
        global_edit = editor(overrides, cache, record)

        def step(x, per_layer):
            block, layer = per_layer
            layer_cache = {}
            edit = editor(overrides, layer_cache, record, layer)
            attend = lambda q, k, v, **options: causal_attention(q, k, v, key_mask, edit, **options)
            return block(x, positions, self.config, attend, edit), layer_cache

        # The residual stream is float32 whatever the weights' dtype: bfloat16 weights save memory,
        # while every activation, and so every patched score, keeps float32 precision.
        x = self.embed(tokens, positions, global_edit).astype(jnp.float32)
        x, layer_cache = jax.lax.scan(step, x, (self.blocks, jnp.arange(self.config.n_layer)))
        if logits_at is not None:
            x = jnp.take_along_axis(x, jnp.asarray(logits_at)[..., None], axis=1)
        logits = self.unembed(x, global_edit)
        if not record:
            return logits, None
        return logits, Cache({**layer_cache, **cache}, self.config.n_layer, table=self.sites)


# Compiled once per shape (and family); called from Python it avoids op-by-op dispatch, inside a
# user's jit it is simply inlined.
_forward = eqx.filter_jit(lambda model, *args: model._forward(*args))


def override_from_cache(cache, site, *, layers=None, positions=None, heads=None):
    """An `Override` that puts `cache`'s values at the given layers / positions / heads of `site`.

    For "attn.hook_pattern" `positions` are query (destination) positions.
    None selects everything along that axis.
    """
    site = sites.canonical(site)
    value = cache.stacked(site)
    per_layer = site in sites.LAYER_AXES
    axes = ("layer",) * per_layer + cache.table[site].axes
    names = {"layers": ("layer",), "positions": ("query", "pos"), "heads": ("head", "kv_head")}
    mask = np.ones(value.shape, bool)
    for name, chosen in (("layers", layers), ("positions", positions), ("heads", heads)):
        if chosen is None:
            continue
        found = [axes.index(a) for a in names[name] if a in axes]
        if not found:
            raise ValueError(f"site {site!r} has no {name[:-1]} axis")
        axis = found[0]
        axis_mask = np.zeros(value.shape[axis], bool)
        axis_mask[np.asarray(chosen)] = True
        mask &= axis_mask.reshape([-1 if a == axis else 1 for a in range(value.ndim)])
    return Override(value, jnp.asarray(mask))
