"""The distribution builds as a wheel that carries every subpackage and the shipped assets.

A wheel is built from the repository, installed into a scratch virtual environment (no
dependencies are downloaded: the scratch venv sees this environment's site-packages through a
``.pth`` line, but not its editable install of flowalign), and imported from there.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SUBPACKAGES = ["flowalign", "flowalign.objectives", "flowalign.pipelines", "flowalign.rewards", "flowalign.train", "flowalign.assets"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(REPO)],
        check=True,
        capture_output=True,
        env={**os.environ, "PIP_NO_INDEX": "1"},
    )
    wheels = list(out.glob("flowalign_rl-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_wheel_contains_subpackages_and_assets(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for package in SUBPACKAGES:
        init = package.replace(".", "/") + "/__init__.py"
        assert init in names, f"{init} missing from the wheel"
    # every shipped prompt set, recipe and toy-model file goes into the wheel
    for path in list((REPO / "assets").rglob("*")) + list((REPO / "train").rglob("*.yaml")):
        if path.is_file() and "__pycache__" not in path.parts and path.suffix in {".json", ".jsonl", ".txt", ".safetensors", ".yaml"}:
            top = "assets" if path.is_relative_to(REPO / "assets") else "train"
            rel = path.relative_to(REPO / top)
            assert f"flowalign/{top}/{rel.as_posix()}" in names, f"{rel} missing from the wheel"
    assert not any(n.startswith("tests/") for n in names)


def test_wheel_installs_and_imports_in_a_scratch_venv(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(subprocess.check_output([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True).strip())
    # unpack the wheel (what pip does for a pure-python wheel), then expose our dependencies
    zipfile.ZipFile(wheel).extractall(site)
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    code = (
        "import importlib, pathlib, sys\n"
        f"site = pathlib.Path({str(site)!r})\n"
        f"for name in {SUBPACKAGES!r}:\n"
        "    mod = importlib.import_module(name)\n"
        "    assert pathlib.Path(mod.__file__).is_relative_to(site), (name, mod.__file__)\n"
        "from flowalign.assets import asset_path\n"
        "print(asset_path())\n"
    )
    result = subprocess.run([python, "-c", code], capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    assert str(site) in result.stdout


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_install_refuses_before_touching_a_full_disk(tmp_path):
    """`make install` stops with a clear message, and creates no venv, when the disk lacks the space.

    ``PYTHON=false`` keeps a broken check from starting a real install: the venv step fails at once.
    """
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy(REPO / name, tmp_path / name)
    result = subprocess.run(
        ["make", "install", "MIN_FREE_GB=1000000000", "PYTHON=false"], cwd=tmp_path, capture_output=True, text=True
    )
    assert result.returncode != 0
    assert "GiB free here" in result.stderr and "MIN_FREE_GB=0" in result.stderr
    assert not (tmp_path / ".venv").exists()
    dry = subprocess.run(["make", "-n", "install"], cwd=tmp_path, capture_output=True, text=True)
    assert dry.returncode == 0 and "-m venv" in dry.stdout
