#!/usr/bin/env bash
# Runs fastpath, scapy, haproxy and none under the same wget load in one invocation, interleaved
# round by round on one fat tree; writes bench/results/compare-<time>.{md,png,json} (the table
# and chart for the README). Options: `bench/compare.sh --help`. Tears down on exit, failure,
# Ctrl-C and SIGTERM, like run_wget_load.sh (bench/driver.sh).
exec "$(dirname "$0")/driver.sh" compare.sh bench.compare "$@"
