"""The model families jpatch runs, by name and by Hugging Face `model_type`.

A family is a module on `jpatch.model.architecture` (its config, site table, blocks, embedding
and unembedding) plus its Hugging Face conversion. Adding one: see ARCHITECTURE.md.
"""

from typing import NamedTuple

from jpatch.model import convert, gemma2_hf, llama_hf, neox_hf
from jpatch.model.gpt2 import GPT2, GPT2Config
from jpatch.model.gemma2 import Gemma2, Gemma2Config
from jpatch.model.llama import Llama, LlamaConfig
from jpatch.model.neox import NeoX, NeoXConfig


class Family(NamedTuple):
    name: str  # "family" in a jpatch folder's config.json
    config: type
    model: type
    hf_model_types: tuple  # config.json "model_type" values it converts
    config_from_hf: object  # HF config dict -> config (refusing what it cannot reproduce)
    from_hf_state_dict: object  # (state dict, config, dtype, tied) -> model


def _gpt2_from_hf(state, config, dtype, tied=True):
    return convert.from_hf_state_dict(state, config, dtype=dtype)


FAMILIES = {
    "gpt2": Family("gpt2", GPT2Config, GPT2, ("gpt2",), convert.config_from_hf, _gpt2_from_hf),
    "neox": Family("neox", NeoXConfig, NeoX, ("gpt_neox",), neox_hf.config_from_hf, neox_hf.from_hf_state_dict),
    "llama": Family("llama", LlamaConfig, Llama, llama_hf.HF_MODEL_TYPES, llama_hf.config_from_hf,
                    llama_hf.from_hf_state_dict),
    "gemma2": Family("gemma2", Gemma2Config, Gemma2, gemma2_hf.HF_MODEL_TYPES, gemma2_hf.config_from_hf,
                     gemma2_hf.from_hf_state_dict),
}
# Every site some family's engine sweeps (checked before a model is loaded, e.g. on the command line).
SWEEP_SITES = tuple(dict.fromkeys(s for f in FAMILIES.values() for s in f.config.sites.sweep_sites))


def by_name(name):
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; jpatch has {', '.join(FAMILIES)}")
    return FAMILIES[name]


def by_hf_type(model_type):
    """The family converting a Hugging Face config.json `model_type`; refused naming the field."""
    for family in FAMILIES.values():
        if model_type in family.hf_model_types:
            return family
    known = ", ".join(t for f in FAMILIES.values() for t in f.hf_model_types)
    raise ValueError(f"model_type={model_type!r} is not a family jpatch converts; it converts {known}")


def of(model):
    """The family of a model instance."""
    return by_name(model.config.family)

