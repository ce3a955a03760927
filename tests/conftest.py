"""Shared fixtures: one tiny random GPT-2 as Hugging Face, TransformerLens and jpatch models."""

import os

# Tiny models cost almost nothing to recompute, so the engine would merge every sweep's layer
# stages into one; keep them, so the tests exercise the skipped layers (test_engine tests the
# merging). Set before jpatch is imported, and inherited by the tests' subprocesses, so that
# in-process and subprocess runs plan alike.
os.environ["JPATCH_STAGE_COMPILE_FLOPS"] = "0"
# The suite's time is mostly XLA compiling tiny programs: LLVM's optimization level 0 compiles
# them about a quarter faster, and XLA:CPU's loop emitters instead of its fusion emitters about
# twice as fast again. Both change code generation, not the operations; every number is
# checked against an independent reference (within its tolerance) or against jpatch under the
# same flags (subprocesses inherit them). scripts/bench.py runs at XLA's default.
os.environ["XLA_FLAGS"] = (f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0"
                           " --xla_cpu_use_fusion_emitters=false").strip()

# The suite compiles from scratch: a persistent compilation cache kept between runs would make the
# tests that count compiles depend on what an earlier run left (tests/test_compile_cache.py turns it
# on in its own subprocesses, with their own folders).
os.environ["JPATCH_COMPILE_CACHE"] = "0"

import pytest  # noqa: E402
import torch  # noqa: E402

import reference  # noqa: E402
from jpatch.model.convert import config_from_hf, from_hf_state_dict


@pytest.fixture(scope="session")
def hf_tiny():
    """Random tiny `transformers` GPT2LMHeadModel (reference.TINY shape, perturbed layer norms)."""
    return reference.hf_model()


@pytest.fixture(scope="session")
def tl_tiny(hf_tiny):
    """The same weights in TransformerLens's HookedTransformer (no weight processing)."""
    return reference.tl_model(hf_tiny)


@pytest.fixture(scope="session")
def jp_tiny(hf_tiny):
    """The same weights as a jpatch `GPT2` (float32)."""
    return from_hf_state_dict(reference.hf_state_dict(hf_tiny), config_from_hf(hf_tiny.config))


@pytest.fixture(scope="module")
def one_torch_thread():
    """TransformerLens's many tiny forwards run tens of times slower with several torch threads
    on a shared, busy CPU; restore the setting after the module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True, scope="module")
def restore_torch_grad_mode():
    """TransformerLens notebooks call torch.set_grad_enabled(False) at module level, and so do their
    ports' reference runs (examples/tl_*_demo.py): keep that from reaching the next test module."""
    enabled = torch.is_grad_enabled()
    yield
    torch.set_grad_enabled(enabled)


@pytest.fixture(autouse=True, scope="module")
def release_compiled_programs():
    """Drop JAX's compiled programs after each test module. The suite compiles thousands of
    programs in one process; kept alive by the jit caches, they once made XLA's CPU compiler
    crash (segmentation fault) late in the run."""
    yield
    import jax

    jax.clear_caches()


# pytest-xdist (--dist loadfile) hands out whole files in collection order, so a slow file collected
# late keeps one worker busy while the other idles: collect the slowest first (measured in CI runs;
# every other file keeps its place after them).
SLOW_FILES_FIRST = ("test_engine.py", "test_ragged.py", "test_sharding.py", "test_multihost.py", "test_llama.py",
                    "test_circuits.py", "test_paper.py", "test_bulk.py", "test_view_browser.py", "test_precision.py",
                    "test_neox.py", "test_tl_notebooks.py", "test_examples.py", "test_faults.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOW_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FILES_FIRST)))
