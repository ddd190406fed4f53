#!/usr/bin/env bash
# The README's main job: installs what is missing, then runs the wget load over the fat tree
# (bench/wget_load.py: options and environment variables in `bench/run_wget_load.sh --help`).
# Everything started is torn down on exit, failure, Ctrl-C and SIGTERM: the driver does it in a
# `finally`; the trap below forwards signals to it and, if it was killed outright, cleans up
# after it (`--cleanup` stops only what that run recorded).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
  echo "run_wget_load.sh: run as root (mininet, namespaces and raw sockets need it): sudo $0 $*" >&2
  exit 2
fi
case " $* " in
  *" -h "*|*" --help "*) ;;  # help needs nothing installed beyond the venv
  *) ./install.sh ;;
esac
PY=.venv/bin/python

"$PY" -m bench.wget_load "$@" &
child=$!
trap 'kill -TERM "$child" 2>/dev/null || true' INT TERM
rc=0
# `wait` returns early when a trapped signal arrives: keep waiting until the driver has ended.
while kill -0 "$child" 2>/dev/null; do
  wait "$child" && rc=0 || rc=$?
done
trap - INT TERM
if [ "$rc" -gt 128 ] && [ "$rc" -ne 130 ]; then
  # Killed outright (not a clean interrupt): nothing ran its `finally`.
  "$PY" -m bench.wget_load --cleanup || true
fi
exit "$rc"
