"""scripts/big_model_run.py on a tiny shape: its exactness check is real. The checked resid_pre patches'
raw logit differences (jpatch, float32) match transformers patched by a forward pre-hook within the
script's tolerance, and each patch moves transformers' value by far more than that tolerance, so a jpatch
that patched the wrong layer or position, or not at all, would fail the comparison. Without the bfloat16
sweeps (--check-only), to stay cheap; the full runs are in the README. Llama with the check in this
process, Gemma 2 with each side in a fresh one (--fresh-check, the Gemma-2-2B run's)."""

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "scripts" / "big_model_run.py"
# Gemma's d_model 36: sqrt(36) = 1.5 x 4, not a power of two, as Gemma-2-2B's sqrt(2304) = 48 (its stored
# scaled embedding is exact in bfloat16 only through the script's 6-bit embedding)
TINY = dict(layers=2, d_model=64, heads=4, kv_heads=2, head_dim=16, d_mlp=128, vocab=256)
TINY_GEMMA = {**TINY, "d_model": 36}


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("big_model_run", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["big_model_run"] = module  # as an import would: --fresh-check's processes pickle its functions
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("big_model_run", None)


@pytest.mark.parametrize("family, shape, fresh", [("llama", TINY, False), ("gemma2", TINY_GEMMA, True)],
                         ids=["llama-in-process", "gemma2-fresh-processes"])
def test_exactness_check_is_real(script, tmp_path, family, shape, fresh):
    report = script.main(["--family", family, *[f"--{k.replace('_', '-')}={v}" for k, v in shape.items()],
                          "--prompts", "2", "--check-only", "--out", str(tmp_path / "run")] + ["--fresh-check"] * fresh)
    ex = report["exactness"]
    assert report["exact"], ex
    assert len(ex["patches"]) >= 3 and len({(r["layer"], r["pos"]) for r in ex["patches"]}) == len(ex["patches"])
    for row in ex["patches"]:
        assert row["float32_max_abs_err"] <= ex["tol"], row
        assert row["patch_effect"] > 10 * ex["tol"], row  # the comparison could fail
    assert ex["clean_minus_corrupted_mean_abs"] > 100 * ex["tol"]
    assert all(p["peak_rss_gb"] > 0 for p in report["phases"].values())
    checks = [p for name, p in report["phases"].items() if "float32" in name]
    assert len(checks) == 2 and all((p.get("process") == "fresh") == fresh for p in checks)
