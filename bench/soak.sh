#!/usr/bin/env bash
# The soak (bench/soak.py): clients fetch in a loop over the fat tree while web servers are
# killed and restored; prints failed requests, kill-to-last-new-flow times, the LBs' RSS and,
# last, one JSON object. `bench/soak.sh --help` lists the options. Everything started is torn
# down on exit, failure, Ctrl-C and SIGTERM (bench/driver.sh, as for the wget load).
exec "$(dirname "$0")/driver.sh" soak.sh bench.soak "$@"
