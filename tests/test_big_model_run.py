"""scripts/big_model_run.py on a tiny shape: its exactness check is real. The checked resid_pre patches'
raw logit differences (jpatch, float32) match transformers patched by a forward pre-hook within the
script's tolerance, and each patch moves transformers' value by far more than that tolerance, so a jpatch
that patched the wrong layer or position, or not at all, would fail the comparison. Llama only, without
the bfloat16 sweeps (--check-only), to stay cheap; the full runs are in the README."""

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "scripts" / "big_model_run.py"
TINY = dict(layers=2, d_model=64, heads=4, kv_heads=2, head_dim=16, d_mlp=128, vocab=256)


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("big_model_run", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_exactness_check_is_real(script, tmp_path):
    report = script.main(["--family", "llama", *[f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()],
                          "--prompts", "2", "--check-only", "--out", str(tmp_path / "run")])
    ex = report["exactness"]
    assert report["exact"], ex
    assert len(ex["patches"]) >= 3 and len({(r["layer"], r["pos"]) for r in ex["patches"]}) == len(ex["patches"])
    for row in ex["patches"]:
        assert row["float32_max_abs_err"] <= ex["tol"], row
        assert row["patch_effect"] > 10 * ex["tol"], row  # the comparison could fail
    assert ex["clean_minus_corrupted_mean_abs"] > 100 * ex["tol"]
    assert all(p["peak_rss_gb"] > 0 for p in report["phases"].values())
