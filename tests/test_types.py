"""The public functions' jaxtyping shape annotations, checked at run time: jpatch is imported
through jaxtyping's import hook with beartype (in a fresh process, so the hook sees every
module), the public API runs on a tiny model, and a call with mismatched shapes is refused."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("beartype")
ROOT = Path(__file__).resolve().parent.parent

SCRIPT = r"""
from jaxtyping import install_import_hook

with install_import_hook("jpatch", "beartype.beartype"):
    import jpatch
    from jpatch import corrupt, metrics, patching

import jax
import numpy as np
from jaxtyping import TypeCheckError

cfg = jpatch.GPT2Config(n_layer=2, n_head=2, d_model=16, d_mlp=32, n_ctx=16, d_vocab=64)
model = jpatch.GPT2.init(cfg, key=jax.random.PRNGKey(0), std=0.1)
clean, mask = jpatch.pad([np.array([1, 2, 3, 4, 5]), np.array([6, 7, 8])], pad_id=63)
corrupted = clean.copy()
corrupted[:, 0] = 9
answers, contrasts = np.array([10, 11]), np.array([12, 13])
metric = metrics.logit_diff(answers, contrasts)

logits = model(clean, attention_mask=mask)
assert logits.shape == (2, 5, 64)
logits, cache = model.run_with_cache(clean, attention_mask=mask)
run = corrupt.token_replacement(clean, corrupted, attention_mask=mask)
noisy = corrupt.gaussian_noise(model, clean, [[0], [0]], n_samples=2, std=0.1, attention_mask=mask)
grid = jpatch.sweep(model, clean, run, "resid_pre", metric, attention_mask=mask, progress=False)
assert grid.shape == (2, 5)
grid = jpatch.sweep(model, clean, noisy, "resid_pre", metric, attention_mask=mask, progress=False)
tl = patching.get_act_patch_resid_pre(model, corrupted, cache, metric, attention_mask=mask, progress=False)
assert tl.shape == (2, 5)
heads = patching.get_act_patch_attn_head_out_all_pos(model, corrupted, cache, metric, attention_mask=mask,
                                                     progress=False)
assert heads.shape == (2, 2)
estimate = jpatch.attribute(model, clean, corrupted, "resid_pre", metric, attention_mask=mask)
assert estimate.shape == (2, 5)

# The checker is live: clean and corrupted tokens of different lengths share the name "pos".
try:
    corrupt.token_replacement(clean, corrupted[:, :4])
except TypeCheckError as e:
    assert "pos" in str(e), e
else:
    raise AssertionError("a [2, 5] / [2, 4] token pair passed the shape check")
# ... and answers must be one id per prompt ("batch").
try:
    metrics.logit_diff(np.array([[1, 2]]), contrasts)
except TypeCheckError:
    pass
else:
    raise AssertionError("2-d answers passed the shape check")
print("ok")
"""


def test_public_functions_satisfy_their_shape_annotations():
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, cwd=ROOT, env=env,
                         timeout=600)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stdout[-3000:] + out.stderr[-5000:]
