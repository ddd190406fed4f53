#!/usr/bin/env bash
# Runs fastpath, scapy, haproxy and none under the same wget load in one invocation, interleaved
# round by round on one fat tree; writes bench/results/compare-<time>.{md,png,json} (the table
# and chart for the README). Options: `bench/compare.sh --help`. Tears down on exit, failure,
# Ctrl-C and SIGTERM, like run_wget_load.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
  echo "compare.sh: run as root (mininet, namespaces and raw sockets need it): sudo $0 $*" >&2
  exit 2
fi
case " $* " in
  *" -h "*|*" --help "*) ;;
  *) ./install.sh ;;
esac
PY=.venv/bin/python

"$PY" -m bench.compare "$@" &
child=$!
trap 'kill -TERM "$child" 2>/dev/null || true' INT TERM
rc=0
while kill -0 "$child" 2>/dev/null; do
  wait "$child" && rc=0 || rc=$?
done
trap - INT TERM
if [ "$rc" -gt 128 ] && [ "$rc" -ne 130 ]; then
  "$PY" -m bench.wget_load --cleanup || true
fi
exit "$rc"
