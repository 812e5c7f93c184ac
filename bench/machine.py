"""What the run happened on, and what may have limited it."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


def _first_line(argv: Sequence[str]) -> str:
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "not installed"
    text = (proc.stdout or proc.stderr).strip()
    return text.splitlines()[0] if text else "unknown"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _distro() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    return "unknown"


def _mem_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / (1 << 20)
    except OSError:
        pass
    return 0.0


def cpu_times() -> list[int]:
    """The aggregate `cpu` line of /proc/stat: user nice system idle iowait irq softirq steal."""
    line = Path("/proc/stat").read_text().splitlines()[0]
    return [int(x) for x in line.split()[1:]]


@dataclass
class Machine:
    cores: int
    cpu: str
    kernel: str
    distro: str
    memory_gib: float
    python: str
    tools: dict[str, str]
    started: str
    loadavg_start: tuple[float, float, float]
    loadavg_end: tuple[float, float, float] = (0.0, 0.0, 0.0)
    steal_fraction: float = 0.0  # of all CPU time during the run: a VM's neighbours at work
    ipvs: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        return (
            f"{self.cores} cores ({self.cpu}), Linux {self.kernel}, {self.distro}, "
            f"{self.memory_gib:.0f} GiB RAM; {self.tools.get('haproxy', '?')}, "
            f"{self.tools.get('nginx', '?')}, {self.tools.get('iperf3', '?')}, "
            f"{self.tools.get('wrk', '?')}; Python {self.python}"
        )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def describe() -> Machine:
    tools = {
        "haproxy": _first_line(["haproxy", "-v"]).split(" - ")[0],
        "nginx": _first_line(["nginx", "-v"]).replace("nginx version: ", ""),
        "iperf3": _first_line(["iperf3", "-v"]).split(" (")[0],
        "wrk": " ".join(_first_line(["wrk", "-v"]).split()[:2]),
    }
    machine = Machine(
        cores=os.cpu_count() or 0,
        cpu=_cpu_model(),
        kernel=platform.release(),
        distro=_distro(),
        memory_gib=_mem_gib(),
        python=platform.python_version(),
        tools=tools,
        started=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        loadavg_start=os.getloadavg(),
        ipvs=Path("/proc/net/ip_vs").exists(),
    )
    machine.extra["cpu_times_start"] = cpu_times()
    return machine


def finish(machine: Machine) -> None:
    machine.loadavg_end = os.getloadavg()
    start = machine.extra.pop("cpu_times_start", None)
    if start:
        end = cpu_times()
        delta = [b - a for a, b in zip(start, end, strict=False)]
        total = sum(delta[:8]) or 1
        machine.steal_fraction = delta[7] / total if len(delta) > 7 else 0.0


def limit_notes(machine: Machine, quick: bool) -> list[str]:
    notes = []
    if machine.cores < 6:
        notes.append(
            f"The load generator, the backend and the proxy share {machine.cores} cores: every "
            "figure is what a proxy achieves while competing with its own load for CPU, so "
            "absolute numbers understate all contenders; the ratios compare them fairly."
        )
    if machine.loadavg_start[0] > 0.5 * max(1, machine.cores):
        notes.append(
            f"The machine was busy before the run (load average {machine.loadavg_start[0]:.2f} "
            f"on {machine.cores} cores; {machine.loadavg_end[0]:.2f} at the end): other work "
            "shared the cores, so absolute figures drift; rely on the per-round ratios."
        )
    if machine.steal_fraction > 0.02:
        notes.append(
            f"The hypervisor took {machine.steal_fraction:.1%} of CPU time (steal) during the run."
        )
    if quick:
        notes.append("--quick: one short round per figure; a smoke test, not a measurement.")
    return notes
