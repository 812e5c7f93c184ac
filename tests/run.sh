#!/usr/bin/env bash
# The whole test suite, from a fresh Debian 12 machine, as root:
#   bash tests/run.sh
# Installs the Debian packages the tests drive (iptables, iproute2, conntrack, curl, socat, dig,
# dnsmasq, chromium, podman), creates .venv with uproxy and its test tools, checks lint and types, then runs pytest.
# Extra arguments go to pytest (for example: bash tests/run.sh -k udp).
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(
  python3 python3-venv python3-dev gcc
  iptables iproute2 conntrack nftables kmod
  curl socat dnsutils dnsmasq-base iperf3 procps
  chromium
  podman runc netavark aardvark-dns debootstrap
  qemu-system-x86 ipvsadm
  haproxy nginx libnginx-mod-stream wrk
)
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  missing=()
  for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "== installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
fi

if [ ! -x .venv/bin/python ]; then
  echo "== creating .venv"
  python3 -m venv .venv
fi
echo "== installing uproxy and its test tools"
.venv/bin/pip install -q --disable-pip-version-check -e '.[test]'

echo "== ruff"
.venv/bin/ruff check uproxy tests bench
.venv/bin/ruff format --check uproxy tests bench
echo "== mypy"
.venv/bin/mypy
echo "== pytest"
# As root every root test can run, so one that skips fails the run (tests/root_skips.py).
root_args=()
if [ "$(id -u)" = 0 ]; then root_args=(--fail-root-skips); fi
.venv/bin/pytest "${root_args[@]}" "$@"
