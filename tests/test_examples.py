"""The scripts in examples/ run (each checks its own numbers with asserts) and write their figures."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = {
    "activation_patching.py": ["resid_pre.png", "block_attn_out.png", "heads.png"],
    "ioi_walkthrough.py": ["dla_heads.png", "pattern.png"],
}
# Both scripts in one process, each as __main__ with its own --out (one interpreter start, one
# import of jax and jpatch; they load the same bundled model): a failing script's traceback names it.
RUN_ALL = """
import os, runpy, sys
for script, out in zip(sys.argv[1::2], sys.argv[2::2]):
    os.makedirs(out)
    sys.argv = [script, "--out", out]
    print(f"running {script}", file=sys.stderr, flush=True)
    runpy.run_path(script, run_name="__main__")
"""


def test_examples_run(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    args = [a for script in sorted(EXAMPLES) for a in (str(ROOT / "examples" / script), str(tmp_path / script))]
    done = subprocess.run([sys.executable, "-c", RUN_ALL, *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for script, figures in EXAMPLES.items():
        for figure in figures:
            assert (tmp_path / script / figure).stat().st_size > 1000, (script, figure)
