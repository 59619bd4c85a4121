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
        "import flowalign\n"
        "assert flowalign.__version__ == '0.1.0', flowalign.__version__\n"
        "from flowalign.config import load_config, resolve_recipe\n"
        "assert resolve_recipe('toy_nft').is_relative_to(site) and load_config('train/configs/toy_nft.yaml').objective.name == 'nft'\n"
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


@pytest.mark.skipif(not (REPO / ".git").exists() or shutil.which("git") is None, reason="builds from the git working tree")
def test_the_sdist_carries_what_its_tests_and_docs_need(tmp_path):
    """The tests import bench/ scripts and the docs cite DESIGN.md: an sdist without them failed its own tests."""
    import tarfile

    # a copy of the working tree without build leftovers (a stale egg-info's SOURCES.txt would fill the sdist)
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, check=True, capture_output=True, text=True).stdout.split()
    tree = tmp_path / "tree"
    for rel in files:
        if (REPO / rel).is_file():
            (tree / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, tree / rel)
    subprocess.run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "-o", str(tmp_path), str(tree)],
                   check=True, capture_output=True, env={**os.environ, "PIP_NO_INDEX": "1"})
    (sdist,) = tmp_path.glob("flowalign_rl-*.tar.gz")
    names = {name.split("/", 1)[1] for name in tarfile.open(sdist).getnames() if "/" in name}
    for needed in ("DESIGN.md", "Makefile", ".ci/run", "bench/heldout_curve.py", "bench/README.md", "tests/test_bench_heldout_plot.py",
                   "assets/toy/model_index.json", "train/configs/toy_grpo.yaml", "examples/branching/branching.py",
                   "examples/branching/toy_tree_grpo.yaml"):
        assert needed in names, needed
    assert not any("__pycache__" in name for name in names)


def test_every_submodule_is_reachable_from_the_package():
    """``import flowalign; flowalign.sde.step(...)`` (it raised AttributeError without an import of each submodule)."""
    code = ("import flowalign, pkgutil\n"
            "core = {m.name for m in pkgutil.iter_modules(flowalign.__path__)} | {'pipelines', 'rewards', 'train'}\n"
            "assert core == set(flowalign._SUBMODULES), sorted(core ^ set(flowalign._SUBMODULES))\n"
            "assert callable(flowalign.sde.step) and callable(flowalign.rewards.load_reward)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
