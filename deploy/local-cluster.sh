#!/usr/bin/env bash
# Starts a local 3-server cluster on loopback (127.0.0.1:7101-7103) with a throw-away
# data directory; Ctrl-C stops it. Same as `cargo run -p lockd-server --bin lockd -- dev`.
set -euo pipefail
cd "$(dirname "$0")/.."
exec cargo run --release -p lockd-server --bin lockd -- dev "$@"
