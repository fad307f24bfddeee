"""Packaging: the installed modules live under one namespace, ``ps3_engine.*``, and collide with nothing.

SAM2 installs a top-level ``training`` package; before the rename our ``training`` (and ``pipeline``,
``stages``, ...) were installed top-level too, and a non-editable install (what a container build does)
wrote both into one ``site-packages/training/``. The slow test builds the wheel, installs it next to SAM2
in a fresh virtual environment, and imports every module from outside the repository.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOP_LEVEL = ("pipeline", "stages", "schemas", "infra", "training")

# Run inside the fresh venv: import every module of the wheel and say where the contested names resolve.
IMPORT_EVERYTHING = """
import importlib, importlib.util, json, pkgutil, sys
import ps3_engine
failed = {}
names = []
for module in pkgutil.walk_packages(ps3_engine.__path__, "ps3_engine."):
    names.append(module.name)
    try:
        importlib.import_module(module.name)
    except Exception as exc:
        failed[module.name] = f"{type(exc).__name__}: {exc}"
import training, ps3_engine.training
print(json.dumps({
    "modules": names,
    "failed": failed,
    "training": training.__file__,
    "ours": ps3_engine.training.__file__,
    "top_level": {n: importlib.util.find_spec(n) is not None for n in ("pipeline", "stages", "schemas", "infra")},
}))
"""


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_pyproject_packages_list_every_package_folder():
    """A new sub-package folder that is not listed would be left out of the wheel (and the image)."""
    setuptools = _pyproject()["tool"]["setuptools"]
    on_disk = {
        "ps3_engine." + ".".join(init.parent.relative_to(ROOT).parts)
        for top in TOP_LEVEL
        for init in (ROOT / top).rglob("__init__.py")
        if "__pycache__" not in init.parts
    }
    assert set(setuptools["packages"]) == on_disk
    assert setuptools["package-dir"] == {f"ps3_engine.{top}": top for top in TOP_LEVEL}


def _run(command: list[str], cwd: Path, env: dict[str, str], timeout: float = 900) -> str:
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    assert result.returncode == 0, f"{command[:4]} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


@pytest.mark.slow
def test_wheel_installs_next_to_sam2_and_imports_everything_from_outside_the_repo(tmp_path):
    import json

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    # No PYTHONPATH, no editable finder of the development venv: only what the fresh venv holds.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
          "-w", str(tmp_path / "wheels"), str(ROOT)], outside, env)  # fmt: skip
    (wheel,) = (tmp_path / "wheels").glob("ps3_engine-*.whl")
    venv = tmp_path / "venv"
    # The venv module of the interpreter behind this venv: a plain venv, no system site-packages.
    _run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", str(venv)], outside, env)
    python = venv / "bin" / "python"
    purelib = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site = Path(_run([str(python), "-c", purelib], outside, env).strip())
    # Dependencies (ray, torch, ...) are not reinstalled: that takes over ten minutes on a busy 2-core
    # machine. A .pth line appends the development venv's site-packages AFTER this venv's own, so the
    # wheel's files and SAM2's win every lookup, and the development venv's editable finder never runs
    # (.pth files inside a directory added this way are not processed).
    dev_site = Path(_run([sys.executable, "-c", purelib], outside, env).strip())
    (site / "zz_dependencies.pth").write_text(f"{dev_site}\n")
    # --ignore-installed: pip would otherwise count the development venv's editable ps3-engine and its
    # SAM2 (visible through the .pth line) as already installed.
    install = [str(python), "-m", "pip", "install", "--quiet", "--no-deps", "--ignore-installed"]
    _run([*install, str(wheel)], outside, env)
    _run([*install, "--no-build-isolation", "sam2>=1.1"], outside, {**env, "SAM2_BUILD_CUDA": "0"})

    # The wheel's own metadata (its base Requires-Dist) against the versions visible there: a dependency
    # dropped from or mis-pinned in pyproject.toml fails here, not in an image build. Only our lines count:
    # the bare venv's own old setuptools is below torch's floor, which no install of ours would keep.
    check = subprocess.run([str(python), "-m", "pip", "check"], cwd=outside, env=env, capture_output=True, text=True)
    assert check.stdout.strip(), check.stderr
    assert [line for line in check.stdout.splitlines() if line.lower().startswith("ps3-engine ")] == []

    version = _run([str(venv / "bin" / "ps3-engine"), "--version"], outside, env)
    assert version.strip() == f"ps3-engine {_pyproject()['project']['version']}"

    report = json.loads(_run([str(python), "-c", IMPORT_EVERYTHING], outside, env).strip().splitlines()[-1])
    assert report["failed"] == {}
    # Every sub-package of every top-level folder came along; nothing resolved into the repository.
    packages = set(_pyproject()["tool"]["setuptools"]["packages"])
    assert packages <= set(report["modules"])
    assert Path(report["ours"]) == site / "ps3_engine" / "training" / "__init__.py"
    assert Path(report["training"]) == site / "training" / "__init__.py"
    assert (site / "sam2").is_dir() and (site / "training" / "trainer.py").is_file()  # SAM2's, untouched
    assert report["top_level"] == dict.fromkeys(("pipeline", "stages", "schemas", "infra"), False)
