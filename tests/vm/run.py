#!/usr/bin/env python3
"""Boot Debian's stock kernel in QEMU and run the IPVS suite inside it; exit with its status.

    python3 tests/vm/run.py                      # pytest tests/vm_ipvs inside the VM
    python3 tests/vm/run.py -- -k nodeport -x    # extra pytest arguments
    python3 tests/vm/run.py --prepare-only       # download and build, do not boot

Why a VM: IPVS is a kernel feature, and the kernels of the machines this project is developed and
tested on do not have it. Debian's linux-image-amd64 ships it as a module, so this script boots
that kernel under QEMU and runs the tests against a real IP Virtual Server.

How (every step measured on those machines):

* The host's root filesystem is shared read-only over 9p and the project directory read-write at
  the same path, so the host's Python and .venv run unchanged inside; nothing is installed into
  an image. The guest's own root is a tiny initramfs (busybox and the 9p/virtio modules) whose
  /init mounts the shares under /host and runs the tests in `chroot /host`.
* The kernel package is downloaded (`apt-get download`) and unpacked into a cache directory,
  never installed: the host keeps its own kernel. Its modules are depmod'ed there, and the guest's
  module autoload goes through a helper that runs the host's modprobe in the shared root with
  `-d CACHE` (/proc/sys/kernel/modprobe), so ip_vs, the schedulers, nf_tables, veth ... load on
  demand exactly as on a real node.
* KVM does not work on these machines: TCG only. CPU work is ~20x slower, so one pytest process
  runs per boot (importing pyroute2 alone takes ~10 s in there).
* The guest writes the pytest exit status into a results directory shared read-write; this
  script exits with it (125 when the VM itself could not run or report).

Needs root (for apt-get when packages are missing) and network access the first time; after
that, everything comes from the cache (/var/cache/uproxy-vm, or $UPROXY_VM_CACHE).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import gzip
import hashlib
import io
import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("UPROXY_VM_CACHE", "/var/cache/uproxy-vm"))
VM_FAILED = 125  # the VM did not produce a test result (not a test failure)

# Debian packages the host needs: QEMU to boot, kmod for depmod/modprobe, and every tool the
# in-VM tests drive (they run from the host's root filesystem, so they must be installed here).
HOST_PACKAGES = (
    "qemu-system-x86",
    "kmod",
    "ipvsadm",
    "iproute2",
    "iptables",
    "conntrack",
    "socat",
    "procps",
)
KERNEL_META = "linux-image-amd64"
BUSYBOX = "busybox-static"
# What the initramfs must load before it can mount the 9p shares (all modules in Debian's
# kernel); their dependencies are resolved with modprobe --show-depends.
BOOT_MODULES = ("virtio_pci", "9pnet_virtio", "9p", "virtio-rng")

INIT = r"""#!/bin/busybox sh
# uproxy test VM init: mount the host's shares, run the test script in chroot /host, power off.
bb=/bin/busybox
$bb mkdir -p /proc /sys /dev /host /tmp
$bb mount -t proc proc /proc
$bb mount -t sysfs sysfs /sys
$bb mount -t devtmpfs devtmpfs /dev
for m in $($bb cat /modules.order); do
  $bb insmod /modules/$m || echo "uproxy-vm: insmod $m failed"
done
for word in $($bb cat /proc/cmdline); do
  case $word in
    uproxy.project=*) project=${word#*=} ;;
    uproxy.results=*) results=${word#*=} ;;
    uproxy.cache=*) cache=${word#*=} ;;
  esac
done
ok=1
# cache=loose: the guest may cache what it reads (a run takes minutes; nobody expects it to see
# edits made meanwhile), which makes Python's imports over 9p several times faster.
p9=trans=virtio,version=9p2000.L,msize=512000
$bb mount -t 9p -o $p9,cache=loose,ro hostroot /host || ok=0
$bb mount -t proc proc /host/proc
$bb mount -t sysfs sysfs /host/sys
$bb mount -t devtmpfs devtmpfs /host/dev
$bb mkdir -p /host/dev/pts /host/dev/shm
$bb mount -t devpts devpts /host/dev/pts
$bb mount -t tmpfs tmpfs /host/dev/shm
$bb mount -t tmpfs tmpfs /host/run
$bb mount -t tmpfs tmpfs /host/tmp
# The project after the tmpfs mounts, so that a checkout under /tmp or /run stays visible.
$bb mkdir -p /host$project
$bb mount -t 9p -o $p9,cache=loose project /host$project || ok=0
$bb mkdir -p /host$results
$bb mount -t 9p -o $p9 results /host$results || ok=0
# Module autoload: the host's modprobe, in the shared root, on the unpacked kernel's modules.
$bb cat > /sbin/modprobe-host <<EOF
#!/bin/busybox sh
exec /bin/busybox chroot /host /sbin/modprobe -d $cache "\$@"
EOF
$bb chmod 755 /sbin/modprobe-host
echo /sbin/modprobe-host > /proc/sys/kernel/modprobe
$bb hostname uproxy-vm
$bb ip link set lo up
if [ $ok = 1 ]; then
  echo "uproxy-vm: up after $($bb cut -d' ' -f1 /proc/uptime)s"
  $bb chroot /host /bin/sh $results/guest.sh
  echo "uproxy-vm: tests exited with $?"
else
  echo "uproxy-vm: mounting the 9p shares failed"
fi
$bb sync
$bb umount /host$results
$bb poweroff -f
"""

GUEST_SCRIPT = """#!/bin/sh
# Runs inside the VM, in the host's root filesystem: the test command, its status to the host.
cd {project}
export HOME=/tmp PATH={project}/.venv/bin:/usr/sbin:/usr/bin:/sbin:/bin
export PYTHONUNBUFFERED=1 UPROXY_IN_VM=1 UPROXY_VM_CACHE={cache} TERM=dumb
{command}
status=$?
echo $status > {results}/status.tmp && mv {results}/status.tmp {results}/status
exit $status
"""


def say(message: str) -> None:
    print(f"== vm: {message}", flush=True)


def run(argv: Sequence[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), check=True, text=True, **kwargs)  # type: ignore[call-overload,no-any-return]


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Several test runs may prepare the cache at once; the first does the work."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# -- host packages ---------------------------------------------------------------------------


def installed(package: str) -> bool:
    proc = subprocess.run(
        ["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True, check=False
    )
    return "install ok installed" in proc.stdout


def apt_get(*args: str) -> None:
    # Waits for another apt-get (other engineers' runs) instead of failing on the dpkg lock.
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run(["apt-get", "-o", "DPkg::Lock::Timeout=600", "-q", *args], env=env)


def ensure_packages() -> None:
    if shutil.which("dpkg-query") is None:
        return  # not Debian: the caller provides the tools
    missing = [p for p in HOST_PACKAGES if not installed(p)]
    if not missing:
        return
    if os.geteuid() != 0:
        raise SystemExit(f"missing Debian packages {missing}; run as root to install them")
    say(f"installing {' '.join(missing)}")
    apt_get("update", "-qq")
    apt_get("install", "-y", "-qq", "--no-install-recommends", *missing)


# -- the kernel and busybox, unpacked into the cache -----------------------------------------


def download(package: str, into: Path) -> Path:
    """`apt-get download` a package (never installs it); refreshes stale package lists once."""
    into.mkdir(parents=True, exist_ok=True)
    for attempt in (1, 2):
        proc = subprocess.run(
            ["apt-get", "download", "-q", package],
            cwd=into,
            capture_output=True,
            text=True,
            check=False,
        )
        debs = sorted(into.glob(f"{package}_*.deb"), key=lambda p: p.stat().st_mtime)
        if proc.returncode == 0 and debs:
            return debs[-1]
        if attempt == 1:
            apt_get("update", "-qq")
    raise SystemExit(f"apt-get download {package} failed:\n{proc.stdout}{proc.stderr}")


def kernel_package() -> str:
    """The versioned image package linux-image-amd64 currently depends on."""
    out = run(["apt-cache", "depends", KERNEL_META], capture_output=True).stdout
    match = re.search(r"Depends: (linux-image-[0-9][^\s]*)", out)
    if match is None:
        raise SystemExit(f"cannot tell which kernel {KERNEL_META} depends on:\n{out}")
    return match.group(1)


def cached_kernel() -> Path | None:
    ready = sorted(CACHE.glob("kernel-*/ready"), key=lambda p: p.stat().st_mtime)
    return ready[-1].parent if ready else None


def prepare_kernel() -> Path:
    """CACHE/kernel-VERSION with boot/vmlinuz-VERSION and lib/modules/VERSION, depmod'ed."""
    found = cached_kernel()
    if found is not None:
        return found
    package = kernel_package()
    say(f"downloading {package} (unpacked into {CACHE}, not installed)")
    deb = download(package, CACHE / "debs")
    version = package.removeprefix("linux-image-")
    root = CACHE / f"kernel-{version}"
    shutil.rmtree(root, ignore_errors=True)
    run(["dpkg-deb", "-x", str(deb), str(root)])
    run(["depmod", "-b", str(root), version])
    (root / "ready").write_text(version + "\n")
    deb.unlink()  # ~70 MB; the unpacked tree is what is used
    return root


def prepare_busybox() -> Path:
    target = CACHE / "busybox"
    if target.exists():
        return target
    say("downloading busybox-static (unpacked, not installed)")
    deb = download(BUSYBOX, CACHE / "debs")
    with tempfile.TemporaryDirectory() as tmp:
        run(["dpkg-deb", "-x", str(deb), tmp])
        shutil.copy2(Path(tmp, "bin/busybox"), target.with_suffix(".tmp"))
    target.with_suffix(".tmp").rename(target)
    deb.unlink()
    return target


def kernel_version(kernel: Path) -> str:
    return (kernel / "ready").read_text().strip()


def boot_modules(kernel: Path, version: str) -> list[Path]:
    """The .ko files for BOOT_MODULES with their dependencies, in load order."""
    order: list[Path] = []
    for module in BOOT_MODULES:
        out = run(
            ["modprobe", "-d", str(kernel), "-S", version, "--show-depends", module],
            capture_output=True,
        ).stdout
        for line in out.splitlines():
            parts = line.split()
            if parts[:1] == ["insmod"] and Path(parts[1]) not in order:
                order.append(Path(parts[1]))
    return order


def _cpio_entry(out: io.BytesIO, name: str, mode: int, data: bytes = b"", ino: int = 0) -> None:
    """One "newc" cpio record (what the kernel unpacks an initramfs from)."""
    encoded = name.encode() + b"\0"
    fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(encoded), 0]
    out.write(b"070701" + b"".join(f"{f:08X}".encode() for f in fields) + encoded)
    out.write(b"\0" * (-(110 + len(encoded)) % 4))
    out.write(data)
    out.write(b"\0" * (-len(data) % 4))


def build_initramfs(kernel: Path, busybox: Path) -> Path:
    version = kernel_version(kernel)
    modules = boot_modules(kernel, version)
    files: list[tuple[str, int, bytes]] = [
        ("bin", stat.S_IFDIR | 0o755, b""),
        ("sbin", stat.S_IFDIR | 0o755, b""),
        ("modules", stat.S_IFDIR | 0o755, b""),
        ("bin/busybox", stat.S_IFREG | 0o755, busybox.read_bytes()),
        ("bin/sh", stat.S_IFLNK | 0o777, b"busybox"),
        ("init", stat.S_IFREG | 0o755, INIT.encode()),
        ("modules.order", stat.S_IFREG | 0o644, "\n".join(m.name for m in modules).encode()),
    ]
    files += [(f"modules/{m.name}", stat.S_IFREG | 0o644, m.read_bytes()) for m in modules]
    digest = hashlib.sha256()
    for name, mode, data in files:
        digest.update(f"{name}:{mode}:{len(data)}:".encode())
        digest.update(data)
    target = CACHE / f"initramfs-{version}-{digest.hexdigest()[:12]}.cpio.gz"
    if target.exists():
        return target
    buffer = io.BytesIO()
    for ino, (name, mode, data) in enumerate(files, start=1):
        _cpio_entry(buffer, name, mode, data, ino)
    _cpio_entry(buffer, "TRAILER!!!", 0)
    tmp = target.with_suffix(".tmp")
    tmp.write_bytes(gzip.compress(buffer.getvalue(), compresslevel=6))
    tmp.rename(target)
    for old in CACHE.glob(f"initramfs-{version}-*.cpio.gz"):
        if old != target:
            old.unlink(missing_ok=True)
    return target


def prepare() -> tuple[Path, Path, str]:
    """(kernel image, initramfs, modules root for modprobe -d), building what is missing."""
    ensure_packages()
    with locked(CACHE / ".lock"):
        kernel = prepare_kernel()
        busybox = prepare_busybox()
        initramfs = build_initramfs(kernel, busybox)
    version = kernel_version(kernel)
    return kernel / "boot" / f"vmlinuz-{version}", initramfs, str(kernel)


# -- booting -----------------------------------------------------------------------------------


def qemu_argv(
    vmlinuz: Path, initramfs: Path, modules_root: str, results: Path, memory: int, cpus: int
) -> list[str]:
    append = " ".join(
        [
            "console=ttyS0",
            "quiet",
            "loglevel=3",
            "panic=-1",
            "rdinit=/init",
            "random.trust_cpu=on",
            f"uproxy.project={REPO}",
            f"uproxy.results={results}",
            f"uproxy.cache={modules_root}",
        ]
    )

    def share(tag: str, path: Path | str, readonly: bool) -> list[str]:
        opts = f"local,path={path},mount_tag={tag},security_model=none,multidevs=remap"
        return ["-virtfs", opts + (",readonly=on" if readonly else "")]

    return [
        "qemu-system-x86_64",
        "-accel",
        "tcg,thread=multi",
        "-cpu",
        "max",
        "-smp",
        str(cpus),
        "-m",
        str(memory),
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
        "-chardev",
        "stdio,id=console,signal=off",
        "-serial",
        "chardev:console",
        "-kernel",
        str(vmlinuz),
        "-initrd",
        str(initramfs),
        "-append",
        append,
        *share("hostroot", "/", True),
        *share("project", REPO, False),
        *share("results", results, False),
    ]


def _pump(stream: io.TextIOBase, sink: list[str]) -> None:
    for line in stream:
        line = line.replace("\r", "")
        sink.append(line)
        sys.stdout.write(line)
        sys.stdout.flush()


def boot(command: str, *, timeout: float, memory: int, cpus: int) -> int:
    vmlinuz, initramfs, modules_root = prepare()
    # /tmp is a tmpfs inside the VM too; the results directory is mounted over its twin there.
    with tempfile.TemporaryDirectory(prefix="uproxy-vm-") as tmp:
        results = Path(tmp)
        (results / "guest.sh").write_text(
            GUEST_SCRIPT.format(
                project=shlex.quote(str(REPO)),
                results=shlex.quote(str(results)),
                cache=shlex.quote(modules_root),
                command=command,
            )
        )
        argv = qemu_argv(vmlinuz, initramfs, modules_root, results, memory, cpus)
        say(f"booting {vmlinuz.name} (TCG, {cpus} CPU, {memory} MiB): {command}")
        started = time.monotonic()
        lines: list[str] = []
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            start_new_session=True,  # our own process group: a timeout kills QEMU and only it
        )
        assert proc.stdout is not None
        reader = threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True)
        reader.start()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            say(f"timed out after {timeout:.0f}s; killing QEMU (pid {proc.pid})")
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        finally:
            reader.join(timeout=10)
        elapsed = time.monotonic() - started
        status_file = results / "status"
        if not status_file.exists():
            say(f"no test status after {elapsed:.0f}s (QEMU exit {proc.returncode})")
            return VM_FAILED
        status = int(status_file.read_text().strip() or VM_FAILED)
        say(f"tests exited with {status} after {elapsed:.0f}s in the VM")
        return status


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--timeout", type=float, default=1200.0, help="seconds for the whole VM")
    parser.add_argument("--memory", type=int, default=512, help="MiB of guest memory")
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--prepare-only", action="store_true", help="build the cache, no boot")
    parser.add_argument(
        "--shell", default=None, help="run this shell command inside instead of pytest"
    )
    parser.add_argument("pytest_args", nargs="*", help="after --: extra pytest arguments")
    args = parser.parse_args(argv)
    if args.prepare_only:
        vmlinuz, initramfs, _ = prepare()
        say(f"ready: {vmlinuz} {initramfs}")
        return 0
    if args.shell is not None:
        command = args.shell
    else:
        pytest = [
            ".venv/bin/python",
            "-m",
            "pytest",
            "tests/vm_ipvs",
            "-p",
            "no:cacheprovider",
            "-o",
            "addopts=",
            "-rfEsxXP",  # P: the passing tests' output too (figures for the log)
            "-v",
            *args.pytest_args,
        ]
        command = shlex.join(pytest)
    return boot(command, timeout=args.timeout, memory=args.memory, cpus=args.cpus)


if __name__ == "__main__":
    sys.exit(main())
