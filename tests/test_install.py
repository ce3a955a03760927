"""Installed like a library: a wheel of this checkout, installed non-editable into a fresh
virtual environment, runs `jpatch demo` and `jpatch.load("toy")` from a folder that is not the
repository (the bundled model ships inside the package as `jpatch.weights`).

The fresh environment gets jpatch's dependencies from the test environment through a .pth
line (no download), so the test runs offline; jpatch itself comes only from the wheel."""

import os
import shutil
import site
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(args, **kw):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # jpatch only from the install
    out = subprocess.run(args, capture_output=True, text=True, timeout=900, env=env, **kw)
    assert out.returncode == 0, f"{args}\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}"
    return out


@pytest.fixture(scope="module")
def fresh_install(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("install")
    src = tmp / "src"  # build from a copy: the build writes build/ and *.egg-info beside the sources
    files = _run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "jpatch", "weights",
                  "pyproject.toml", "README.md"], cwd=ROOT).stdout.split()
    for name in files:
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    wheels = tmp / "wheels"
    build = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels),
                  str(src)], cwd=tmp)
    (wheel,) = wheels.glob("jpatch-*.whl")
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)])
    purelib = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    # The dependencies only (the test environment's site-packages, whose own .pth files, among them
    # an editable jpatch, are not processed from a .pth line).
    deps = [p for p in site.getsitepackages() + [sysconfig.get_paths()["purelib"]] if Path(p).is_dir()]
    (purelib / "test-dependencies.pth").write_text("\n".join(dict.fromkeys(deps)) + "\n")
    return venv, wheel, build


def test_wheel_ships_the_bundled_model_and_no_setuptools_warning(fresh_install):
    venv, wheel, build = fresh_install
    names = zipfile.ZipFile(wheel).namelist()
    assert "jpatch/weights/toy/config.json" in names
    assert any(n.startswith("jpatch/weights/toy/checkpoint/") for n in names)
    assert "jpatch/data/tasks/data/paired_facts.jsonl" in names
    assert "License" not in build.stderr and "SetuptoolsDeprecationWarning" not in build.stderr, build.stderr[-3000:]


def test_installed_package_loads_the_toy_and_runs_the_demo(fresh_install, tmp_path):
    venv, _, _ = fresh_install
    python, jpatch_cli = venv / "bin" / "python", venv / "bin" / "jpatch"
    where = _run([str(python), "-c", "import jpatch; m = jpatch.load('toy'); print(jpatch.__file__); "
                  "print(m.config.n_layer)"], cwd=tmp_path).stdout.split()
    assert Path(where[0]).is_relative_to(venv), f"jpatch imported from {where[0]}, not the fresh install"
    # 4 prompts instead of the default 32: what is checked is the installed package, not the sweep
    demo = _run([str(jpatch_cli), "demo", "--n-prompts", "4", "--out", "demo-out"], cwd=tmp_path)
    assert "top hook_resid_pre components" in demo.stdout
    assert (tmp_path / "demo-out" / "resid_pre.png").is_file()
