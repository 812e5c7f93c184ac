"""`python -m bench --quick` as CI's smoke test: every contender yields every figure it can.

Asserts that figures exist (or carry the reason they cannot), never how fast anything is: speeds
on a shared CI machine prove nothing, and the benchmark reports its targets itself.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import require_tools

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.root


def _samples(data: dict[str, Any], contender: str, load: str) -> list[dict[str, Any]]:
    return [s for s in data["samples"] if s["contender"] == contender and s["load"] == load]


def test_quick_benchmark_yields_every_figure(tmp_path: Path) -> None:
    require_tools("iperf3", "wrk", "curl", "ss", "haproxy", "nginx", "iptables-nft-restore")
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    elapsed = time.monotonic() - started
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stderr[-4000:]}"
    data = json.loads((tmp_path / "results.json").read_text())
    assert (tmp_path / "results.md").read_text().startswith("# uproxy benchmark")
    assert (tmp_path / "ratios.png").stat().st_size > 0

    assert data["samples"], "no samples at all"
    assert not [s for s in data["samples"] if s["status"] == "failed"]
    loads = data["loads"]
    for contender in data["contenders"]:
        key = contender["key"]
        if contender["skipped"]:
            # Only what this machine cannot offer may be skipped, and it must say why.
            assert key == "uproxy-ipvs", f"{key} skipped: {contender['skipped']}"
            continue
        for load in loads:
            samples = _samples(data, key, load["key"])
            assert samples, f"{key} has no {load['key']} sample"
            for figure in load["figures"]:
                measured = figure in data["summary"].get(key, {})
                reasons = [s["note"] for s in samples if s["status"] == "skipped" and s["note"]]
                assert measured or len(reasons) == len(samples), (
                    f"{key}: no {figure} figure and no reason why"
                )
    # The in-kernel contenders and UDP-less HAProxy are the only legitimate gaps.
    assert "udp_pps" in data["summary"]["uproxy-uvloop"]
    assert "idle_rss" in data["summary"]["uproxy-asyncio"]
    assert data["ratios"]["vs_reference"]["uproxy-uvloop"]["http_cps"]["n"] == 1

    cp = data["controlplane"]
    for backend in ("nft", "legacy", "ipvs", "pipeline", "nftables"):
        runs = [r for r in cp["runs"] if r["backend"] == backend]
        assert runs, f"no control-plane run for {backend}"
        if backend == "ipvs" and not data["machine"]["ipvs"]:
            assert all(r["status"] == "skipped" and r["note"] for r in runs)
            continue
        for size in ("1000", "10000"):
            figures = cp["summary"].get(backend, {}).get(size, {})
            # The whole-pipeline figure has no resync: a fresh proxier would open new listeners.
            wanted = {"full_sync_s", "change_s"} | (
                set() if backend == "pipeline" else {"resync_s"}
            )
            assert wanted <= set(figures), (backend, size)
        assert all(r["status"] == "ok" and r["rules_checked"] for r in runs)
    # Not a speed assertion about proxies: the smoke test must stay cheap for CI.
    print(f"bench --quick took {elapsed:.0f}s")
