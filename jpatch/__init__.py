"""jpatch: fast, batched activation patching for GPT-2 models in JAX.

Zhang & Nanda, "Towards Best Practices of Activation Patching in Language
Models: Metrics and Methods" (ICLR 2024), as a library of pure functions.
"""

import os

import jax

from jpatch.files import compile_cache
from jpatch.version import __version__  # noqa: F401

# Compiled programs survive the process (JPATCH_COMPILE_CACHE=0: off); before anything compiles.
compile_cache.enable()


def _full_precision_matmuls():
    """float32 means float32: on GPUs (TF32) and TPUs (bfloat16 passes) JAX's default matmul
    precision is lower, which moved patching results by ~5e-3 on an H200. Unless the user chose
    a precision (JAX_DEFAULT_MATMUL_PRECISION or jax.config), jpatch asks for the highest."""
    if jax.config.jax_default_matmul_precision is None:
        jax.config.update("jax_default_matmul_precision", "highest")


_full_precision_matmuls()


def _quick_gpu_compiles():
    """At 'highest' precision XLA's GPU autotuner spent minutes per program on an H200: GPT-2
    small's forward took 17.7 s to compile and the resid_pre patching program had not compiled
    after 70 s; with autotuning off, 1.2 s and 20 s (then 0.32 s per warm sweep). Unless the
    user chose an autotune level in XLA_FLAGS, jpatch turns it off. XLA reads the flag at its
    first compile, so this holds when jpatch is imported before anything is compiled on a GPU."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_gpu_autotune_level" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_gpu_autotune_level=0".strip()


_quick_gpu_compiles()

import sys  # noqa: E402

from jpatch.model.gpt2 import GPT2, GPT2Config, Cache, override_from_cache  # noqa: E402
from jpatch.model.factored import FactoredMatrix  # noqa: E402
ActivationCache = Cache  # TransformerLens's name for it
from jpatch.model.interventions import Add, Apply, Override, Scale  # noqa: E402
from jpatch.model.checkpoint import load, save  # noqa: E402
from jpatch.model.convert import convert_hf  # noqa: E402
from jpatch.model.in_memory import from_hf  # noqa: E402
from jpatch.model.processing import process_weights  # noqa: E402
from jpatch.model.padding import pad  # noqa: E402
from jpatch.model.tokenizer import get_tokenizer  # noqa: E402
from jpatch.model import names as utils, sites  # noqa: E402
from jpatch.face import prompt_check  # noqa: E402

utils.test_prompt = prompt_check.test_prompt  # TransformerLens's utils.test_prompt prints: it lives in the face
from jpatch.engine.inputs import Run  # noqa: E402
from jpatch.engine.sweep import sweep  # noqa: E402
from jpatch.engine.aggregate import SweepResult  # noqa: E402
from jpatch.engine import patching  # noqa: E402
from jpatch.methods import attribution, circuits, corrupt, edges, metrics  # noqa: E402
from jpatch.methods.attribution import attribute  # noqa: E402
from jpatch.methods.edges import Edges, edge_attribution  # noqa: E402
from jpatch.methods.circuits import path_patch  # noqa: E402
from jpatch.data import tasks  # noqa: E402
from jpatch.data.tasks import factual, greater_than, ioi  # noqa: E402
from jpatch.runs.results import load_result  # noqa: E402
from jpatch.runs.bulk import bulk_sweep  # noqa: E402

# The public module names of jpatch 0.1 (`import jpatch.metrics`, `from jpatch.tasks import
# ioi_task`, TransformerLens-style `jpatch.patching` / `jpatch.utils`) keep working: each is
# the module that now lives in its layer, registered under its old name (not a copy).
for _name, _module in {"utils": utils, "sites": sites, "patching": patching, "metrics": metrics,
                       "corrupt": corrupt, "attribution": attribution, "edges": edges, "circuits": circuits,
                       "tasks": tasks, "tasks.ioi": ioi, "tasks.factual": factual,
                       "tasks.greater_than": greater_than}.items():
    sys.modules[f"{__name__}.{_name}"] = _module
del _name, _module, factual, greater_than, ioi
