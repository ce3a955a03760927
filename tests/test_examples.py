"""The scripts in examples/ run (each checks its own numbers with asserts) and write their figures."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = {
    "activation_patching.py": ["resid_pre.png", "block_attn_out.png", "heads.png"],
    "ioi_walkthrough.py": ["dla_heads.png", "pattern.png"],
}


@pytest.mark.parametrize("script", sorted(EXAMPLES))
def test_example_runs(script, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(ROOT / "examples" / script), "--out", str(tmp_path)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for figure in EXAMPLES[script]:
        assert (tmp_path / figure).stat().st_size > 1000, figure
