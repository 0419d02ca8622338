#!/usr/bin/env bash
# lockd's performance benchmark (BRIEF §4.1): builds the release binaries, starts a
# throw-away 3-server cluster on 127.0.0.1, runs lockd-bench's workloads W1-W5 against
# it with the worker counts of shared/bench/etcd-workloads.sh, and stops the cluster.
#
# Usage: deploy/bench.sh [--compare] [seconds per workload, default 10] [lockd-bench flags...]
#   deploy/bench.sh                        # everything, W4 with 1,000,000 held locks
#   deploy/bench.sh --compare 10           # etcd, ZooKeeper, then lockd, back to back:
#                                          # one table with the ratios and issue #17's goals
#   deploy/bench.sh 10 --workload w1,w2,w3 # the etcd-comparable workloads only
#   deploy/bench.sh 5 --locks 100000       # a quicker W4
# Later flags override the defaults given here (see target/release/lockd-bench --help).
#
# Environment: LOCKD_BENCH_BASE_PORT (default 7300: servers on 127.0.0.1:7301-7303),
# LOCKD_BENCH_KEEP=1 keeps the data directory and the server logs,
# LOCKD_BENCH_SERVER_LOG sets the servers' RUST_LOG (default info),
# LOCKD_BENCH_BIN_DIR=dir runs dir/lockd and dir/lockd-bench instead of building,
# LOCKD_BENCH_REFERENCES (default ../shared/bench) holds etcd-workloads.sh and
# zk-workloads.sh for --compare (they install Debian's etcd-server and zookeeper if
# missing, so --compare needs root the first time).
# Every run also measures fdatasync of 2.3 KB appends in the data directory first.
set -euo pipefail
cd "$(dirname "$0")/.."

compare=""
if [ "${1:-}" = --compare ]; then
  compare=1
  shift
fi
secs=${1:-10}
[ $# -gt 0 ] && shift
case $secs in
  '' | *[!0-9]*) echo "usage: $0 [--compare] [seconds per workload] [lockd-bench flags...]" >&2; exit 2 ;;
esac
base=${LOCKD_BENCH_BASE_PORT:-7300}

if [ -n "${LOCKD_BENCH_BIN_DIR:-}" ]; then
  bin=$LOCKD_BENCH_BIN_DIR # prebuilt lockd and lockd-bench: no build
else
  cargo build --release -p lockd-server -p lockctl
  bin=${CARGO_TARGET_DIR:-target}/release
fi
lockd=$bin/lockd
bench=$bin/lockd-bench

servers=""
for i in 1 2 3; do
  addr=127.0.0.1:$((base + i))
  if ss -ltn | grep -q " $addr "; then
    echo "$addr is in use; pick other ports with LOCKD_BENCH_BASE_PORT" >&2
    exit 1
  fi
  servers=${servers:+$servers,}$addr
done

dir=$(mktemp -d /tmp/lockd-bench.XXXXXX)
refs=()
if [ -n "$compare" ]; then
  # The references first, each with the machine to itself; their lines are kept.
  references=${LOCKD_BENCH_REFERENCES:-../shared/bench}
  for sys in etcd zk; do
    echo "bench.sh: running $references/$sys-workloads.sh $secs" >&2
    "$references/$sys-workloads.sh" "$secs" | tee "$dir/$sys.txt" >&2
    refs+=(--reference "$dir/$sys.txt")
  done
fi
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for _ in $(seq 50); do
    alive=0
    for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
    [ $alive = 0 ] && break
    sleep 0.1
  done
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  if [ -n "${LOCKD_BENCH_KEEP:-}" ]; then
    echo "bench.sh: kept $dir (config, data, server logs)" >&2
  else
    rm -rf "$dir"
  fi
}
trap cleanup EXIT

# The default timing, 16 nodes (node1..node16) as in `lockd dev`.
{
  printf '[cluster]\nname = "bench"\nid = 1\n\n'
  # /metrics on base+11..13: lockd_commit_seconds (a proposal's append to apply on the
  # leader) and lockd_fsync_seconds split a W3 latency into replication and the rest.
  for i in 1 2 3; do
    printf '[[servers]]\nid = %d\naddr = "127.0.0.1:%d"\nmetrics_addr = "127.0.0.1:%d"\n\n' \
      "$i" $((base + i)) $((base + 10 + i))
  done
  for i in $(seq 16); do printf '[[nodes]]\nname = "node%d"\n\n' "$i"; done
  printf '[storage]\ndata_dir = "%s"\n' "$dir"
} >"$dir/cluster.toml"
"$lockd" check-config --config "$dir/cluster.toml" >/dev/null

# Each server in its own session, so a Ctrl-C reaches only lockd-bench (which then logs
# out); the trap stops the servers.
for i in 1 2 3; do
  RUST_LOG=${LOCKD_BENCH_SERVER_LOG:-info} setsid "$lockd" run --config "$dir/cluster.toml" --bootstrap \
    --id "$i" >"$dir/server-$i.log" 2>&1 &
  pids+=($!)
done
disown -a # W5 kills one of them: no "Killed" notice from the shell
echo "bench.sh: servers $servers, pids ${pids[*]}, data $dir, metrics on 127.0.0.1:$((base + 11))-$((base + 13))" >&2

"$bench" --servers "$servers" --pids "$(IFS=,; echo "${pids[*]}")" \
  --workload all --duration "$secs" --fsync-probe "$dir" "${refs[@]}" "$@"
