#!/usr/bin/env bash
# Runs a Python benchmark driver as root after ./install.sh, forwarding Ctrl-C/SIGTERM to it
# and, if it was killed outright, cleaning up after it (`bench.wget_load --cleanup` stops only
# what that run recorded). Usage: bench/driver.sh NAME MODULE [ARGS...] (NAME for messages).
set -euo pipefail
name=$1 module=$2
shift 2
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
  echo "$name: run as root (mininet, namespaces and raw sockets need it): sudo bench/$name $*" >&2
  exit 2
fi
case " $* " in
  *" -h "*|*" --help "*) ;;  # help needs nothing installed beyond the venv
  *) ./install.sh ;;
esac
PY=.venv/bin/python

"$PY" -m "$module" "$@" &
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
