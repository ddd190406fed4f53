#!/usr/bin/env bash
# Installs what this project needs on a Debian machine, idempotently: Debian packages (mininet,
# iproute2, ...) and a virtualenv in .venv that sees Debian's mininet module and holds the pip
# packages. Run as root. Safe to run again: it only does what is missing.
set -euo pipefail
cd "$(dirname "$0")"

if [ "$(id -u)" -ne 0 ]; then
  echo "install.sh: run as root (mininet, namespaces and raw sockets need it): sudo $0" >&2
  exit 1
fi

# Debian packages, by the command or file that proves each is present.
APT_PACKAGES=(
  mininet iproute2 iputils-ping tcpdump ethtool nftables php-cli wget curl haproxy
  netsniff-ng python3-venv python3-dev procps bird2
  prometheus chromium chromium-driver
)
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "install.sh: installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # haproxy's, bird2's and prometheus' packages would start system services (a BIRD in the
  # root namespace would be a router of its own on this machine); policy-rc.d keeps them from
  # doing so. The project runs its BIRDs itself, one per mininet node (controller/bgp.py), and
  # `up --monitor` its own prometheus, stopped by PID.
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d.l4lb
  chmod +x /usr/sbin/policy-rc.d.l4lb
  had_policy=0; [ -e /usr/sbin/policy-rc.d ] && had_policy=1
  [ $had_policy -eq 1 ] || cp /usr/sbin/policy-rc.d.l4lb /usr/sbin/policy-rc.d
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  [ $had_policy -eq 1 ] || rm -f /usr/sbin/policy-rc.d
  rm -f /usr/sbin/policy-rc.d.l4lb
fi

# The virtualenv: Debian's python3 with system site-packages, so `import mininet` works.
PY=/usr/bin/python3
stamp_src=$(cat setup.cfg pyproject.toml install.sh | sha256sum | cut -d' ' -f1)
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import mininet' 2>/dev/null; then
  rm -rf .venv
  echo "install.sh: creating .venv (system site-packages, for Debian's mininet)"
  "$PY" -m venv --system-site-packages .venv
fi
if [ "$(cat .venv/.l4lb-stamp 2>/dev/null)" != "$stamp_src" ]; then
  echo "install.sh: installing Python packages into .venv"
  # compat mode puts the repository on sys.path, so packages added later import without a reinstall.
  .venv/bin/pip install -q --disable-pip-version-check \
    --config-settings editable_mode=compat -e ".[test,bench]"
  echo "$stamp_src" > .venv/.l4lb-stamp
fi
