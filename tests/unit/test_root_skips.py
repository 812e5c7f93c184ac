"""`--fail-root-skips` through a real pytest run on a small test file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.uproxy_process import REPO

TESTS = """
import pytest

@pytest.mark.root
def test_root_skips():
    pytest.skip("needs a tool")

@pytest.mark.root
@pytest.mark.skip(reason="marked")
def test_root_marked_skip():
    pass

def test_plain_skip():
    pytest.skip("not a root test")

@pytest.mark.root
def test_root_passes():
    pass
"""


def run(tmp_path: Path, *args: str) -> str:
    (tmp_path / "test_sample.py").write_text(TESTS)
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "tests.root_skips", "-rA", "-q", *args],
        cwd=tmp_path,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    return done.stdout + done.stderr


def test_root_tests_that_skip_fail_with_the_option(tmp_path: Path) -> None:
    out = run(tmp_path, "-W", "ignore::pytest.PytestUnknownMarkWarning", "--fail-root-skips")
    # A skip in the call fails the test; a skip marker, in setup, errors it: both fail the run.
    assert "1 failed, 1 passed, 1 skipped, 1 error" in out, out
    assert "a root test skipped in a run that must run them all: Skipped: needs a tool" in out
    assert "must run them all: Skipped: marked" in out, out


def test_without_the_option_they_skip(tmp_path: Path) -> None:
    out = run(tmp_path, "-W", "ignore::pytest.PytestUnknownMarkWarning")
    assert "1 passed, 3 skipped" in out, out
