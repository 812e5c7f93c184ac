"""`uproxy check`, as a real process, on every kind of malformed file: exit 1, the file named,
no traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.bad_manifests import BAD_FILES


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_check_answers_every_bad_file(tmp_path: Path, case: str) -> None:
    name, data, phrase = BAD_FILES[case]
    path = tmp_path / name
    path.write_bytes(data)
    done = subprocess.run(
        [sys.executable, "-m", "uproxy", "check", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert "Traceback" not in output
    assert f"error: {path}" in output and phrase in output
