"""IPVS mode against a real IP Virtual Server: tests/vm/run.py boots Debian's kernel (which has
IPVS, unlike these machines' own) in QEMU and runs tests/vm_ipvs inside; this runs that as part of
the normal suite. Plus what a kernel without IPVS must do: refuse at once, naming the way out."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.uproxy_process import REPO

VM_TIMEOUT = 1500.0


@pytest.mark.root
def test_ipvs_suite_passes_in_a_vm(tmp_path: Path) -> None:
    log = tmp_path / "vm.log"
    started = time.monotonic()
    with log.open("w") as out:
        proc = subprocess.run(
            [sys.executable, str(REPO / "tests" / "vm" / "run.py")],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            timeout=VM_TIMEOUT + 60,
            check=False,
        )
    lines = log.read_text(errors="replace").splitlines()
    print(f"VM suite: exit {proc.returncode} after {time.monotonic() - started:.0f}s")
    print("\n".join(line for line in lines if " PASSED" in line or " SKIPPED" in line))
    tail = "\n".join(lines[-150:])
    assert proc.returncode == 0, f"tests/vm/run.py exited {proc.returncode}:\n{tail}"
    assert any(" passed" in line for line in lines[-20:]), tail
    assert not any(" skipped" in line or " SKIPPED" in line for line in lines), tail


@pytest.mark.skipif(Path("/proc/net/ip_vs").exists(), reason="this kernel has IPVS")
def test_ipvs_mode_refuses_a_kernel_without_ipvs() -> None:
    started = time.monotonic()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "uproxy",
            "run",
            "--mode",
            "ipvs",
            "--log-format",
            "json",
            "--healthz-bind-address",
            "",
            "--metrics-bind-address",
            "",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        check=False,
    )
    elapsed = time.monotonic() - started
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output
    assert "IP_VS" in output and "--mode userspace" in output, output
    assert elapsed < 20, f"took {elapsed:.1f}s to refuse"
