"""The package layout's rules (ARCHITECTURE.md), enforced by reading the source.

- Each layer imports only the layers below it: files < model < engine < methods < data < runs < face
  (and jpatch/version.py); only the face may import the package root (the public API).
- Only the face layer parses arguments or prints (progress bars, which callers can turn off, aside).
- Modules stay small (about 400 lines at most).
- pyproject.toml lists every package (it lists them by hand to ship weights/ as jpatch.weights).
"""

import ast
import re
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "jpatch"
LAYERS = ("files", "model", "engine", "methods", "data", "runs", "face")
MAX_LINES = 420  # "about 400"
# Top-level modules every layer may import: they import nothing else from jpatch.
FOUNDATION = {"jpatch.version"}


def _modules():
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def _dotted(path):
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(dotted):
    """The layer index of a jpatch module, None for the package root (the public API)."""
    parts = dotted.split(".")
    if dotted in FOUNDATION:
        return -1
    if len(parts) < 2:
        return None
    return LAYERS.index(parts[1]) if parts[1] in LAYERS else None


def _imports(path):
    """(line, imported jpatch module) for every import in the file, function bodies included."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("jpatch"):
                    yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("jpatch") and node.level == 0:
            for alias in node.names:  # `from jpatch.model import sites` imports jpatch.model.sites
                sub = f"{node.module}.{alias.name}"
                is_module = (ROOT / Path(*sub.split("."))).with_suffix(".py").exists() or (
                    ROOT / Path(*sub.split("."))).is_dir()
                yield node.lineno, sub if is_module else node.module


def test_every_module_is_in_a_layer():
    stray = [_dotted(p) for p in _modules() if _layer(_dotted(p)) is None and _dotted(p) != "jpatch"]
    assert not stray, f"modules outside the layers {LAYERS}: {stray}"


def test_layers_import_only_lower_layers():
    bad = []
    for path in _modules():
        here = _dotted(path)
        mine = _layer(here)
        if mine is None:
            continue  # jpatch/__init__.py assembles the public API from every layer
        for line, target in _imports(path):
            theirs = _layer(target)
            if theirs is None and LAYERS[mine] == "face":
                continue  # the face may use the public API
            if theirs is None or theirs > mine:
                where = "the package root (import the module itself)" if theirs is None else f"layer {target.split('.')[1]}"
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {target} ({where}) from layer "
                           f"{LAYERS[mine] if mine >= 0 else 'foundation'}")
    assert not bad, "imports against the layering (lower layers never import higher ones):\n" + "\n".join(bad)


_PRINTS = re.compile(r"^(?!\s*#).*\b(print\(|argparse|sys\.std(out|err))", re.M)


def test_only_the_face_parses_arguments_or_prints():
    bad = []
    for path in _modules():
        dotted = _dotted(path)
        if dotted.startswith("jpatch.face"):
            continue
        for m in _PRINTS.finditer(path.read_text()):
            line = path.read_text().count("\n", 0, m.start()) + 1
            bad.append(f"{path.relative_to(ROOT)}:{line}: {m.group(0).strip()}")
    assert not bad, "only jpatch/face/ parses arguments or prints:\n" + "\n".join(bad)


def test_no_private_names_across_modules():
    """`from jpatch.x import _helper` or `x._helper` from another module: a shared helper gets a public name."""
    bad = []
    for path in _modules():
        tree = ast.parse(path.read_text())
        aliases = set()  # names bound to jpatch modules in this file
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("jpatch") and node.level == 0:
                for alias in node.names:
                    if alias.name.startswith("_") and not alias.name.startswith("__"):
                        bad.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {node.module}.{alias.name}")
                    elif (ROOT / Path(*f"{node.module}.{alias.name}".split("."))).with_suffix(".py").exists():
                        aliases.add(alias.asname or alias.name)
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno} uses {node.value.id}.{node.attr}")
    assert not bad, "private names used across modules:\n" + "\n".join(bad)


def test_modules_stay_small():
    big = [(str(p.relative_to(ROOT)), n) for p in _modules() if (n := len(p.read_text().splitlines())) > MAX_LINES]
    assert not big, f"modules over {MAX_LINES} lines (split them by job): {big}"


def test_pyproject_lists_every_package():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    packages = {_dotted(p) for p in PACKAGE.rglob("__init__.py")}
    assert packages <= listed, f"packages missing from pyproject.toml's list: {sorted(packages - listed)}"
    assert config["package-dir"]["jpatch.weights"] == "weights"


@pytest.mark.parametrize("bad_import, layer", [("from jpatch.face import cli", "model"),
                                               ("import jpatch.runs.bulk", "engine"),
                                               ("from jpatch import sweep", "methods")])
def test_the_rule_catches_a_violation(tmp_path, bad_import, layer, monkeypatch):
    """The checker itself: an upward import (or one through the package root) is reported."""
    fake_root = tmp_path
    (fake_root / "jpatch" / layer).mkdir(parents=True)
    for name in LAYERS:
        (fake_root / "jpatch" / name).mkdir(exist_ok=True)
        (fake_root / "jpatch" / name / "__init__.py").write_text("")
    (fake_root / "jpatch" / "face" / "cli.py").write_text("")
    (fake_root / "jpatch" / "runs" / "bulk.py").write_text("")
    (fake_root / "jpatch" / "__init__.py").write_text("")
    (fake_root / "jpatch" / layer / "offender.py").write_text(bad_import + "\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", fake_root)
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake_root / "jpatch")
    with pytest.raises(AssertionError, match=f"jpatch/{layer}/offender.py:1"):
        test_layers_import_only_lower_layers()
