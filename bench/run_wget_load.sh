#!/usr/bin/env bash
# The README's main job: installs what is missing, then runs the wget load over the fat tree
# (bench/wget_load.py: options and environment variables in `bench/run_wget_load.sh --help`).
# Everything started is torn down on exit, failure, Ctrl-C and SIGTERM: the driver does it in a
# `finally`; bench/driver.sh forwards signals to it and cleans up if it was killed outright.
exec "$(dirname "$0")/driver.sh" run_wget_load.sh bench.wget_load "$@"
