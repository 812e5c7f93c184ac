"""The README's quick start, typed as a newcomer types it: every shell command of its code
blocks runs as written, in two "terminals" (bash reading the lines one by one), inside a network
namespace of this test's own, in a fresh copy of the checkout; outputs the README shows are
checked against what the commands print.

Two commands are not run, and the test says why: the `apt-get` line would change the host, so
the packages it names are checked to be installed instead; `bash tests/run.sh` is what runs this
test. The venv install runs as typed but outside the namespace, which has no way to the package
index; it writes only into the copy of the checkout. A README edit that changes the blocks'
shape fails here until this test follows it.
"""

from __future__ import annotations

import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

import pytest

from tests.integration.conftest import require_tools
from tests.integration.netns import Namespace, Network
from tests.uproxy_process import REPO

pytestmark = pytest.mark.root

README = REPO / "README.md"
# "# prints a b a b or b a b a (why)": what a command's output must be, word for word.
PRINTS = re.compile(r"\s#\s+prints (?P<outputs>.+?)(?:\s+\(.*\))?$")
PORT = re.compile(r"\b(\d{4,5})\b")


def section(heading: str) -> str:
    text = README.read_text()
    start = text.index(f"\n## {heading}")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else None]


def sh_blocks(text: str) -> list[list[str]]:
    blocks = re.findall(r"^```sh\n(.*?)^```", text, re.M | re.S)
    return [[line for line in block.splitlines() if line.strip()] for block in blocks]


def expected_outputs(line: str) -> list[list[str]] | None:
    match = PRINTS.search(line)
    if match is None:
        return None
    return [choice.split() for choice in match.group("outputs").split(" or ")]


def clean_env() -> dict[str, str]:
    """A login-like environment: no venv on PATH, as in a new terminal."""
    venv_bin = str(Path(sys.executable).parent)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    path = [p for p in env.get("PATH", "").split(os.pathsep) if p and p != venv_bin]
    env["PATH"] = os.pathsep.join([*path, "/usr/sbin", "/sbin"])
    return env


class Terminal:
    """bash reading commands from a pipe, one line at a time, as a terminal feeds them."""

    DONE = re.compile(r"^@@done (\d+)$")

    def __init__(self, argv: list[str], cwd: Path) -> None:
        self.proc = subprocess.Popen(
            argv,
            cwd=cwd,
            env=clean_env(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # its own process group, as a terminal's shell has
        )
        self.lines: list[str] = []
        # (stream, line): what a command "prints" is its stdout; stderr (the backends' request
        # logs, say) shows on a terminal too, but is not part of it.
        self._new: queue.Queue[tuple[str, str]] = queue.Queue()
        self._readers = [
            threading.Thread(target=self._read, args=(name, stream), daemon=True)
            for name, stream in (("out", self.proc.stdout), ("err", self.proc.stderr))
        ]
        for reader in self._readers:
            reader.start()

    def _read(self, name: str, stream: TextIO | None) -> None:
        assert stream is not None
        for line in stream:
            self.lines.append(line.rstrip("\n"))
            self._new.put((name, self.lines[-1]))

    def type(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{line}\nprintf '\\n@@done %s\\n' $?\n")
        self.proc.stdin.flush()

    def wait_for(self, pattern: str, timeout: float, *, stdout_only: bool = False) -> list[str]:
        """The lines printed until one matches `pattern` (that one last)."""
        seen: list[str] = []
        deadline = time.monotonic() + timeout
        while True:
            try:
                stream, line = self._new.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(
                    f"no line matching {pattern!r}; output:\n" + "\n".join(self.lines[-40:])
                ) from None
            if stdout_only and stream != "out":
                continue
            seen.append(line)
            if re.search(pattern, line):
                return seen

    def run(self, line: str, timeout: float = 120) -> tuple[int, list[str]]:
        """Type `line`, wait until it is done: its exit status and what it printed."""
        self.type(line)
        return self.wait_done(timeout)

    def wait_done(self, timeout: float) -> tuple[int, list[str]]:
        printed = self.wait_for(self.DONE.pattern, timeout, stdout_only=True)
        match = self.DONE.match(printed[-1])
        assert match is not None
        return int(match.group(1)), [p for p in printed[:-1] if p]

    def ctrl_c(self) -> None:
        os.killpg(self.proc.pid, signal.SIGINT)

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        for reader in self._readers:
            reader.join(timeout=5)
        for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()


@pytest.fixture
def checkout() -> Iterator[Path]:
    """A fresh copy of the checkout, as a clone would be (no venv, no caches); outside /tmp,
    which the second terminal replaces with a tmpfs of its own."""
    parent = Path(tempfile.mkdtemp(prefix="uproxy-readme-", dir="/var/tmp"))
    ignore = shutil.ignore_patterns(".venv", ".git", "__pycache__", "*_cache", "*.egg-info")
    try:
        copy = parent / "uproxy"
        shutil.copytree(REPO, copy, ignore=ignore)
        yield copy
    finally:
        shutil.rmtree(parent, ignore_errors=True)


@pytest.fixture
def host(net: Network) -> Namespace:
    """A namespace shaped like a host: loopback, and a default route to a gateway (a second
    namespace), so the virtual IPs are routable as on any host."""
    ns, gateway = net.namespace("readme"), net.namespace("gateway")
    net.link(ns, "192.0.2.10/24", gateway, "192.0.2.1/24")
    ns.route("default", via="192.0.2.1")
    return ns


def uproxy_rules(ns: Namespace) -> list[str]:
    lines: list[str] = []
    for tool in ("iptables-legacy-save", "iptables-nft-save"):
        lines += [x for x in ns.run(tool, check=False).stdout.splitlines() if "UPROXY" in x]
    return lines


def check_packages_installed(line: str) -> None:
    match = re.fullmatch(r"apt-get update && apt-get install -y ((?:[a-z0-9.+-]+ ?)+)", line)
    assert match, f"the install line changed shape: {line!r}"
    for package in match.group(1).split():
        status = subprocess.run(
            ["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True
        ).stdout
        assert status == "install ok installed", f"{package} (from the README) is not installed"


def wait_listening(ns: Namespace, ports: list[str], timeout: float = 30) -> None:
    """What a person does between starting servers and calling them: wait until they listen."""
    deadline = time.monotonic() + timeout
    while True:
        listening = ns.run("ss", "-ltnH").stdout
        if all(f":{port} " in listening for port in ports):
            return
        assert time.monotonic() < deadline, f"{ports} not listening:\n{listening}"
        time.sleep(0.1)


def check_outputs(line: str, code: int, printed: list[str]) -> None:
    assert code == 0, (line, printed)
    expected = expected_outputs(line)
    if expected is not None:
        words = " ".join(printed).split()
        assert words in expected, f"{line}\nprinted {words}, the README says one of {expected}"


def readme_status_header() -> list[str]:
    """The header of the `uproxy status` table the README shows (section Operating it)."""
    text = section("Operating it")
    table = re.search(r"^```\n(SERVICE PORT.*?)\n", text, re.M)
    assert table, "the README's uproxy status example is gone"
    return table.group(1).split()


def test_quick_start_as_typed(host: Namespace, checkout: Path) -> None:
    require_tools("bash", "curl", "ss", "unshare", "iptables-legacy-save", "iptables-nft-save")
    blocks = sh_blocks(section("Quick start"))
    assert len(blocks) == 4, blocks
    install, suite, example, after = blocks
    assert suite == ["bash tests/run.sh"]  # what runs this test: not run again from here
    assert len(install) == 4 and install[2:] == [". .venv/bin/activate", "uproxy run"], install

    shell = ["bash", "--noprofile", "--norc", "-s"]
    first = Terminal(host.argv(*shell), cwd=checkout)
    # The second terminal's /tmp is its own, so the example's /tmp/a and /tmp/b stay in here.
    private_tmp = "mount -t tmpfs tmpfs /tmp && exec bash --noprofile --norc -s"
    second = Terminal(
        host.argv("unshare", "--mount", "--propagation", "private", "sh", "-c", private_tmp),
        cwd=checkout,
    )
    try:
        check_packages_installed(install[0])
        installer = Terminal(shell, cwd=checkout)
        try:
            code, printed = installer.run(install[1], timeout=600)
        finally:
            installer.close()
        assert code == 0, printed
        code, printed = first.run(install[2])
        assert code == 0, printed
        first.type(install[3])
        first.wait_for(r'"event": "sync_done"', timeout=60)
        assert uproxy_rules(host), "uproxy run installed no portals"

        for line in example:
            if line.split("#")[0].rstrip().endswith("&"):
                code, printed = second.run(line)
                assert code == 0, (line, printed)
                wait_listening(host, PORT.findall(line))
                continue
            code, printed = second.run(line)
            check_outputs(line, code, printed)
            if "uproxy status" in line:
                assert printed[0].split() == readme_status_header(), printed
                web = next(p for p in printed if p.startswith("default/web:http"))
                assert web.split()[2] == "10.96.0.10:80", printed

        first.ctrl_c()
        code, printed = first.wait_done(timeout=60)  # uproxy run's exit status
        assert code == 0, printed[-20:]
        assert any('"event": "stopped"' in line for line in printed), printed[-20:]
        for line in after:
            code, printed = first.run(line)
            check_outputs(line, code, printed)
        assert uproxy_rules(host) == []
        # Validating manifests (section Configuration: manifests), in the same terminal.
        (validate,) = sh_blocks(section("Configuration: manifests"))
        assert validate == ["uproxy check --config examples/"]
        code, printed = first.run(validate[0])
        assert code == 0 and printed[0].startswith("SERVICE PORT"), printed
        assert len(printed) == 4, printed  # the bundled example's three service ports
    finally:
        first.close()
        second.close()
