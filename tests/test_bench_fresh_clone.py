"""bench/fresh_clone.sh: times make targets on a fresh clone and always deletes the clone."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "fresh_clone.sh"

pytestmark = pytest.mark.skipif(shutil.which("make") is None or not (REPO / ".git").exists(), reason="needs make and a git checkout")


def _run(tmp_path: Path, *targets: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    return subprocess.run(["bash", str(SCRIPT), "HEAD", *targets], capture_output=True, text=True, env=env, timeout=300)


def test_times_each_target_and_removes_the_clone(tmp_path):
    result = _run(tmp_path, "--dry-run")  # make's dry run: prints the install recipe, builds nothing
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("fresh clone of ")
    assert "make --dry-run  0 min" in result.stdout and "(exit 0)" in result.stdout
    assert list(tmp_path.iterdir()) == []  # the clone is gone


def test_a_failing_target_stops_reports_and_still_removes_the_clone(tmp_path):
    result = _run(tmp_path, "no-such-target", "--dry-run")
    assert result.returncode != 0
    assert "make no-such-target" in result.stdout and "(exit 2)" in result.stdout
    assert "No rule to make target" in result.stdout  # the log's tail is shown
    assert "--dry-run " not in result.stdout  # later targets do not run
    assert list(tmp_path.iterdir()) == []
