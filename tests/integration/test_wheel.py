"""A non-editable install (`pip install .`) runs `uproxy run` with no --config: the bundled
examples travel in the wheel as package data."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

from tests.uproxy_process import REPO, UproxyProcess, loopback_run_args


def test_wheel_ships_the_examples_and_runs_them(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "-q", "-w", str(tmp_path)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("uproxy-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {"uproxy/examples/services.yaml", "uproxy/examples/endpoints.yaml"} <= set(names)
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
         str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )  # fmt: skip
    # Outside the checkout, with the installed copy first on the path: the repository's
    # examples/ cannot be what is found.
    args = loopback_run_args(None)
    with UproxyProcess(args, cwd=tmp_path, env={"PYTHONPATH": str(target)}) as proc:
        bundled = proc.wait_event("bundled_examples", timeout=30)
        assert bundled["path"] == str(target / "uproxy" / "examples")
        loaded = proc.wait_event("manifests_loaded", timeout=30)
        assert (loaded["services"], loaded["slices"]) == (3, 5)
        assert proc.stop() == 0
