"""Independent references for parity tests: random Hugging Face GPT-2 models and
the same weights in TransformerLens 3.9. Nothing here uses jpatch's forward."""

import warnings

import numpy as np
import torch

TINY = dict(n_layer=2, n_head=4, n_embd=64, n_positions=32, vocab_size=211)
SMALL = dict(n_layer=12, n_head=12, n_embd=768, n_positions=1024, vocab_size=50257)


def hf_model(seed=0, initializer_range=0.08, **shape):
    """A random GPT2LMHeadModel (eager attention) whose every parameter moves the output:
    large initial weights, and layer-norm weights and biases perturbed away from 1 and 0."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    shape = {**TINY, **shape}
    last = shape["vocab_size"] - 1  # GPT-2's 50256 is outside a tiny vocabulary
    config = GPT2Config(
        **shape, initializer_range=initializer_range, bos_token_id=last, eos_token_id=last, attn_implementation="eager"
    )
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln" in name:
                p.add_(0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.add_(0.05 * torch.randn_like(p))
    return model


def hf_state_dict(model):
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def hf_logits(model, tokens, attention_mask=None):
    with torch.no_grad():
        kwargs = {}
        if attention_mask is not None:
            kwargs["attention_mask"] = torch.tensor(np.asarray(attention_mask))
        return model(torch.tensor(np.asarray(tokens)), **kwargs).logits.numpy()


UNPROCESSED = dict(fold_ln=False, center_writing_weights=False, center_unembed=False, fold_value_biases=False)


def tl_model(hf, **processing):
    """The same weights in TransformerLens 3.9's HookedTransformer, unprocessed (or with the
    `processing` steps of its load_and_process_state_dict turned on)."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights

    c = hf.config
    cfg = HookedTransformerConfig(
        n_layers=c.n_layer,
        d_model=c.n_embd,
        n_ctx=c.n_positions,
        d_head=c.n_embd // c.n_head,
        n_heads=c.n_head,
        d_mlp=c.n_inner or 4 * c.n_embd,
        d_vocab=c.vocab_size,
        act_fn="gelu_new",
        normalization_type="LN",
        eps=c.layer_norm_epsilon,
        positional_embedding_type="standard",
        default_prepend_bos=False,
        device="cpu",
    )
    with warnings.catch_warnings():  # "HookedTransformer is deprecated": it is the reference users know
        warnings.simplefilter("ignore", DeprecationWarning)
        model = HookedTransformer(cfg)
    model.load_and_process_state_dict(
        convert_gpt2_weights(hf, cfg),
        **{**UNPROCESSED, **processing},
    )
    return model.eval()


def random_tokens(batch, pos, vocab, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, size=(batch, pos))


def tl_path_patch(tl, base, source, sender, receivers, freeze_mlps=False, caches=None):
    """Path patching (Wang et al. 2022) written with TransformerLens hooks, two passes: logits [B, T, V]
    of the `base` tokens with head `sender` = (layer, head) taking its `source` output through the
    receivers only ("logits", "m<l>", "a<l>.h<h>" or "a<l>.h<h><q>"). Pass 1 freezes every other
    head to its base value (MLPs recomputed unless freeze_mlps) and records the receivers' inputs;
    pass 2 runs the base tokens with those inputs. Needs tl.set_use_split_qkv_input(True) and
    tl.set_use_hook_mlp_in(True) for head and MLP receivers. caches: (base, source) ActivationCaches
    to reuse across senders."""
    import torch

    L = tl.cfg.n_layers
    ls, hs = sender
    toks = torch.tensor(base)
    if caches is None:
        with torch.no_grad():
            caches = tl.run_with_cache(toks)[1], tl.run_with_cache(torch.tensor(source))[1]
    base_cache, src_cache = caches

    def freeze_z(z, hook):
        z = base_cache[hook.name].clone()
        if hook.layer() == ls:
            z[:, :, hs] = src_cache[hook.name][:, :, hs]
        return z

    hooks = [(f"blocks.{l}.attn.hook_z", freeze_z) for l in range(L)]
    if freeze_mlps:
        hooks += [(f"blocks.{l}.hook_mlp_out", lambda x, hook: base_cache[hook.name]) for l in range(L)]
    recorded = {}

    def record(x, hook):
        recorded[hook.name] = x.clone()

    if receivers == ["logits"]:  # pass 2 would only repeat pass 1's final residual
        with torch.no_grad():
            return tl.run_with_hooks(toks, fwd_hooks=hooks).numpy()
    names = [f"blocks.{l}.hook_{c}_input" for l in range(L) for c in "qkv"]
    names += [f"blocks.{l}.hook_mlp_in" for l in range(L)] + [f"blocks.{L - 1}.hook_resid_post"]
    with torch.no_grad():
        tl.run_with_hooks(toks, fwd_hooks=hooks + [(n, record) for n in names])

    def replace(heads):
        def hook(x, hook):
            x = x.clone()
            for h in heads:
                x[:, :, h] = recorded[hook.name][:, :, h]
            return x
        return hook

    # grouped-query attention: a query head's k / v input is its key-value head's (hook_k_input has those)
    group = tl.cfg.n_heads // (tl.cfg.n_key_value_heads or tl.cfg.n_heads)

    hooks2 = []
    for r in receivers:
        if r == "logits":
            hooks2.append((f"blocks.{L - 1}.hook_resid_post", lambda x, hook: recorded[hook.name]))
        elif r.startswith("m"):
            hooks2.append((f"blocks.{int(r[1:])}.hook_mlp_in", lambda x, hook: recorded[hook.name]))
        else:
            layer, head = r[1:].split("<")[0].split(".h")
            chans = r.split("<")[1][0] if "<" in r else "qkv"
            hooks2 += [(f"blocks.{layer}.hook_{c}_input", replace([int(head) // (1 if c == "q" else group)]))
                       for c in chans]
    with torch.no_grad():
        return tl.run_with_hooks(toks, fwd_hooks=hooks2).numpy()


# --- GPT-NeoX (Pythia) ------------------------------------------------------------------

NEOX_TINY = dict(num_hidden_layers=3, num_attention_heads=4, hidden_size=64, intermediate_size=128, vocab_size=101,
                 max_position_embeddings=64)


def neox_hf_model(seed=0, rotary_pct=0.5, initializer_range=0.1, **shape):
    """A random GPTNeoXForCausalLM (eager attention, parallel residual) with layer-norm
    weights and biases perturbed away from 1 and 0 so that they matter."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    shape = {**NEOX_TINY, **shape}
    last = shape["vocab_size"] - 1
    config = GPTNeoXConfig(**shape, rotary_pct=rotary_pct, initializer_range=initializer_range,
                           bos_token_id=last, eos_token_id=last, attn_implementation="eager")
    model = GPTNeoXForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" in name or "layer_norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def neox_tl_model(hf, **processing):
    """The same weights in TransformerLens 3.9's HookedTransformer, unprocessed (or with the
    `processing` steps turned on), with the NeoX config of /work/shared/FAMILIES.md (which agrees
    with transformers)."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_neox_weights

    c = hf.config
    d_head = c.hidden_size // c.num_attention_heads
    rotary_pct = c.rope_parameters["partial_rotary_factor"]
    cfg = HookedTransformerConfig(
        n_layers=c.num_hidden_layers,
        d_model=c.hidden_size,
        n_ctx=c.max_position_embeddings,
        d_head=d_head,
        n_heads=c.num_attention_heads,
        d_mlp=c.intermediate_size,
        d_vocab=c.vocab_size,
        act_fn="gelu",
        normalization_type="LN",
        positional_embedding_type="rotary",
        rotary_dim=int(rotary_pct * d_head),
        rotary_base=c.rope_parameters["rope_theta"],
        parallel_attn_mlp=True,
        rotary_adjacent_pairs=False,
        original_architecture="GPTNeoXForCausalLM",
        eps=c.layer_norm_eps,
        default_prepend_bos=False,
        device="cpu",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        model = HookedTransformer(cfg)
    model.load_and_process_state_dict(
        dict(convert_neox_weights(hf, cfg)),
        **{**UNPROCESSED, **processing},
    )
    return model.eval()


# --- the Llama family: Llama 3 (llama3 rope scaling, tied), Qwen 2, Qwen 3, Mistral ----------------

LLAMA_TINY = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=96, vocab_size=256, max_position_embeddings=64, rms_norm_eps=1e-6)
# Each variant's own settings: Llama 3.1's rope scaling (original context 16, so that the short
# prompts here reach the scaled band) and tied embeddings; Qwen 3's head_dim != d_model / n_heads.
LLAMA_VARIANTS = {
    "llama": ("LlamaForCausalLM", dict(tie_word_embeddings=True, rope_parameters=dict(
        rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=16))),
    "qwen2": ("Qwen2ForCausalLM", dict(rope_parameters=dict(rope_type="default", rope_theta=20000.0))),
    "qwen3": ("Qwen3ForCausalLM", dict(head_dim=24)),
    "mistral": ("MistralForCausalLM", dict(sliding_window=6)),
}


def llama_hf_model(variant, seed=0, initializer_range=0.1, **shape):
    """A random model of a Llama-family variant (eager attention) with RMSNorm weights (q/k norms
    included) and the q/k/v biases perturbed so that they matter."""
    import transformers

    arch, own = LLAMA_VARIANTS[variant]
    torch.manual_seed(seed)
    shape = {**LLAMA_TINY, **shape}
    last = shape["vocab_size"] - 1
    config_class = getattr(transformers, arch.replace("ForCausalLM", "Config"))
    config = config_class(**shape, **own, initializer_range=initializer_range, bos_token_id=last,
                          eos_token_id=last, pad_token_id=last, attn_implementation="eager")
    model = getattr(transformers, arch)(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def llama_tl_model(hf):
    """The same weights in TransformerLens 3.9 through its converter for the variant, with the
    config of /work/shared/FAMILIES.md (+ its NTK-by-parts rope for Llama 3.1's scaling, q/k
    norms for Qwen 3). TransformerLens ignores sliding windows: Mistral agrees on prompts no
    longer than the window only."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained import weight_conversions as wc

    c = hf.config
    arch = type(hf).__name__
    rope = c.rope_parameters
    d_head = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    extra = {}
    if rope.get("rope_type") == "llama3":
        extra = dict(use_NTK_by_parts_rope=True, NTK_by_parts_factor=rope["factor"],
                     NTK_by_parts_low_freq_factor=rope["low_freq_factor"],
                     NTK_by_parts_high_freq_factor=rope["high_freq_factor"],
                     NTK_original_ctx_len=rope["original_max_position_embeddings"])
    if arch == "Qwen3ForCausalLM":
        extra["use_qk_norm"] = True
    cfg = HookedTransformerConfig(
        n_layers=c.num_hidden_layers, d_model=c.hidden_size, n_ctx=c.max_position_embeddings, d_head=d_head,
        n_heads=c.num_attention_heads, d_mlp=c.intermediate_size, d_vocab=c.vocab_size, act_fn="silu",
        normalization_type="RMS", positional_embedding_type="rotary", rotary_dim=d_head, gated_mlp=True,
        final_rms=True, n_key_value_heads=c.num_key_value_heads, rotary_adjacent_pairs=False, eps=c.rms_norm_eps,
        rotary_base=rope["rope_theta"], original_architecture=arch, default_prepend_bos=False, device="cpu",
        **extra)
    convert = {"LlamaForCausalLM": wc.convert_llama_weights, "Qwen2ForCausalLM": wc.convert_qwen2_weights,
               "Qwen3ForCausalLM": wc.convert_qwen3_weights, "MistralForCausalLM": wc.convert_mistral_weights}[arch]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        model = HookedTransformer(cfg)
    model.load_and_process_state_dict(dict(convert(hf, cfg)), **UNPROCESSED)
    return model.eval()


# --- Gemma 2 -----------------------------------------------------------------------------------------

GEMMA2_TINY = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                   intermediate_size=96, vocab_size=256, max_position_embeddings=64, rms_norm_eps=1e-6,
                   query_pre_attn_scalar=24, attn_logit_softcapping=5.0, final_logit_softcapping=3.0,
                   sliding_window=6, layer_types=["sliding_attention", "full_attention"])


def gemma2_hf_model(seed=0, initializer_range=0.1, **shape):
    """A random Gemma2ForCausalLM (eager attention; soft caps small enough to bend the scores and
    logits of these weights) with every norm perturbed."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(seed)
    shape = {**GEMMA2_TINY, **shape}
    last = shape["vocab_size"] - 1
    config = Gemma2Config(**shape, initializer_range=initializer_range, bos_token_id=last, eos_token_id=last,
                          pad_token_id=last, attn_implementation="eager")
    model = Gemma2ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def gemma2_tl_model(hf):
    """The same weights in TransformerLens 3.9 (convert_gemma_weights, the config of
    /work/shared/FAMILIES.md). It ignores sliding windows: it agrees on prompts within the window."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_gemma_weights

    c = hf.config
    cfg = HookedTransformerConfig(
        n_layers=c.num_hidden_layers, d_model=c.hidden_size, n_ctx=c.max_position_embeddings, d_head=c.head_dim,
        n_heads=c.num_attention_heads, d_mlp=c.intermediate_size, d_vocab=c.vocab_size, act_fn="gelu_pytorch_tanh",
        normalization_type="RMS", positional_embedding_type="rotary", rotary_dim=c.head_dim, gated_mlp=True,
        final_rms=True, n_key_value_heads=c.num_key_value_heads, rotary_adjacent_pairs=False, eps=c.rms_norm_eps,
        rotary_base=c.rope_parameters["rope_theta"], use_attn_scale=True, attn_scale=c.query_pre_attn_scalar ** 0.5,
        use_normalization_before_and_after=True, attn_scores_soft_cap=c.attn_logit_softcapping,
        output_logits_soft_cap=c.final_logit_softcapping, original_architecture="Gemma2ForCausalLM",
        default_prepend_bos=False, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        model = HookedTransformer(cfg)
    model.load_and_process_state_dict(dict(convert_gemma_weights(hf, cfg)), **UNPROCESSED)
    return model.eval()


def hf_patched_ld(hf, tokens, ans, con, patch):
    """Per-prompt logit differences of transformers' model with `patch` = (layer, module part, fn(act))."""
    layer, part, fn = patch
    module = hf.model.layers[layer] if part == "resid_pre" else hf.model.layers[layer].self_attn.k_proj
    if part == "resid_pre":
        handle = module.register_forward_pre_hook(
            lambda mod, args, kwargs: ((fn(args[0]),) + args[1:], kwargs) if args
            else (args, {**kwargs, "hidden_states": fn(kwargs["hidden_states"])}), with_kwargs=True)
    else:
        handle = module.register_forward_hook(lambda mod, args, out: fn(out))
    try:
        with torch.no_grad():
            logits = hf(torch.tensor(tokens)).logits[:, -1].double().numpy()
    finally:
        handle.remove()
    rows = np.arange(len(tokens))
    return logits[rows, ans] - logits[rows, con]


def count_compiles(fn):
    """(fn(), the number of XLA compiles it caused), from JAX's compile events."""
    import jax

    events = []
    listener = lambda event, secs, **kw: (events.append(event) if event ==
                                          "/jax/core/compile/backend_compile_duration" else None)
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        return fn(), len(events)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
