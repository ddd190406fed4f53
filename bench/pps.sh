#!/usr/bin/env bash
# The forwarding benchmark (issue 3, "Speed"): fastpath vs the course-style scapy LB vs the kernel
# forwarding the same traffic, on a veth testbed in network namespaces it makes and removes.
#   bench/pps.sh [--rounds N] [--duration S] [--quick] [more options: bench/pps.sh --help]
# Needs root. Results: bench/results/pps-<timestamp>.{json,png}; the last stdout line is the
# summary as one JSON object.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -ne 0 ]; then
  echo "bench/pps.sh: run as root (namespaces, raw sockets): sudo $0 $*" >&2
  exit 1
fi
[ -x .venv/bin/python ] || ./install.sh
exec timeout --signal=TERM --kill-after=30 "${PPS_TIMEOUT:-3600}" .venv/bin/python -m bench.pps "$@"
