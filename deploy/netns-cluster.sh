#!/usr/bin/env bash
# A 3-host lockd cluster on one machine, one network namespace per server, to try
# partitions for real: each server has its own address on a bridge, and a partition
# takes its link down, so Raft, nodes and lockctl all lose it at once.
#
#   root namespace: bridge lkd-br0 198.51.100.254/24
#     |-- veth lkd-s1-h <-> eth0 in netns lkd-s1: 198.51.100.11, lockd --id 1
#     |-- veth lkd-s2-h <-> eth0 in netns lkd-s2: 198.51.100.12, lockd --id 2
#     `-- veth lkd-s3-h <-> eth0 in netns lkd-s3: 198.51.100.13, lockd --id 3
#
# Addresses come from a TEST-NET range (RFC 5737: documentation-only, never routed on
# the Internet): 198.51.100.0/24 by default, or LOCKD_NETNS_SUBNET=192.0.2 or
# 203.0.113. Before creating anything the script refuses a range that this machine
# already uses (some sandboxes and labs number their own LAN from TEST-NET-1), and
# after creating the bridge it checks that the servers' addresses route through it,
# so no packet meant for these servers leaves the machine.
# Needs root (ip netns, veth, bridge). A manual tool, not a test.
#
# Usage: deploy/netns-cluster.sh up         build (unless LOCKD_BIN_DIR), create, start
#        deploy/netns-cluster.sh status     processes, links, lockctl status
#        deploy/netns-cluster.sh partition ID   cut server ID off (its link goes down)
#        deploy/netns-cluster.sh heal       bring every link back up
#        deploy/netns-cluster.sh down       stop the servers, delete everything created
#
# Environment: LOCKD_BIN_DIR=dir uses dir/lockd and dir/lockctl instead of building
# (default: cargo build --release, then ${CARGO_TARGET_DIR:-target}/release);
# LOCKD_NETNS_DIR (default /tmp/lockd-netns) holds the config, data, logs and pids;
# LOCKD_NETNS_SUBNET picks the TEST-NET /24 (first three octets, default 198.51.100).
set -euo pipefail

prefix=lkd
bridge=$prefix-br0
subnet=${LOCKD_NETNS_SUBNET:-198.51.100}
ids=(1 2 3)
port=7100
state=${LOCKD_NETNS_DIR:-/tmp/lockd-netns}
repo=$(cd "$(dirname "$0")/.." && pwd)

die() {
  echo "netns-cluster: $*" >&2
  exit 1
}

if [ "$(id -u)" -ne 0 ]; then
  die "needs root: it creates network namespaces, veth pairs and a bridge (try: sudo $0 ${*:-up})"
fi
command -v ip >/dev/null || die "needs the 'ip' command (iproute2)"
case $subnet in
  192.0.2 | 198.51.100 | 203.0.113) ;;
  *) die "LOCKD_NETNS_SUBNET must be a TEST-NET /24: 192.0.2, 198.51.100 or 203.0.113" ;;
esac

addr_of() { echo "$subnet.$((10 + $1))"; }
servers_list() {
  local out="" i
  for i in "${ids[@]}"; do out=${out:+$out,}$(addr_of "$i"):$port; done
  echo "$out"
}

bin_dir() {
  if [ -n "${LOCKD_BIN_DIR:-}" ]; then
    echo "$LOCKD_BIN_DIR"
  else
    echo "${CARGO_TARGET_DIR:-$repo/target}/release"
  fi
}

write_config() {
  local i
  {
    echo '[cluster]'
    echo 'name = "netns"'
    echo 'id = 4242'
    echo
    for i in "${ids[@]}"; do
      echo '[[servers]]'
      echo "id = $i"
      echo "addr = \"$(addr_of "$i"):$port\""
      echo "metrics_addr = \"$(addr_of "$i"):9100\""
      echo
    done
    for i in 1 2 3 4; do
      echo '[[nodes]]'
      echo "name = \"node$i\""
      echo
    done
    echo '[storage]'
    echo "data_dir = \"$state/data\""
  } >"$state/cluster.toml"
}

up() {
  [ -e "$state/up" ] && die "already up (state in $state); run '$0 down' first"
  ip link show "$bridge" >/dev/null 2>&1 && die "$bridge exists already; run '$0 down' first"
  if [ -z "${LOCKD_BIN_DIR:-}" ]; then
    (cd "$repo" && cargo build --release -p lockd-server -p lockctl)
  fi
  local bin
  bin=$(bin_dir)
  [ -x "$bin/lockd" ] || die "$bin/lockd is missing"
  # The range must be free here: a route or address in it would send the servers'
  # traffic somewhere else (for instance out of the machine's own LAN interface).
  if ip -4 addr show | grep -q "inet $subnet\." ||
    ip -4 route show | grep -v '^default' | grep -q "^$subnet\."; then
    die "$subnet.0/24 is already in use on this machine (see 'ip -4 route'); pick another with LOCKD_NETNS_SUBNET=192.0.2|198.51.100|203.0.113"
  fi
  mkdir -p "$state/data"
  touch "$state/up"
  write_config
  "$bin/lockd" check-config --config "$state/cluster.toml" >/dev/null

  ip link add "$bridge" type bridge
  ip addr add "$subnet.254/24" dev "$bridge"
  ip link set "$bridge" up
  local i ns
  for i in "${ids[@]}"; do
    ip route get "$(addr_of "$i")" | grep -q "dev $bridge" ||
      die "$(addr_of "$i") does not route through $bridge; not starting (run '$0 down')"
  done
  for i in "${ids[@]}"; do
    ns=$prefix-s$i
    ip netns add "$ns"
    ip link add "$ns-h" type veth peer name "$ns-n"
    ip link set "$ns-h" master "$bridge"
    ip link set "$ns-h" up
    ip link set "$ns-n" netns "$ns"
    ip -n "$ns" link set "$ns-n" name eth0
    ip -n "$ns" addr add "$(addr_of "$i")/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" link set lo up
  done
  for i in "${ids[@]}"; do
    ns=$prefix-s$i
    # setsid: the server outlives this script and gets its own process group.
    RUST_LOG=${RUST_LOG:-info} setsid ip netns exec "$ns" \
      "$bin/lockd" run --config "$state/cluster.toml" --id "$i" --bootstrap \
      </dev/null >>"$state/server-$i.log" 2>&1 &
    echo $! >"$state/server-$i.pid"
  done
  echo "3 servers started in namespaces $prefix-s1..3 (logs: $state/server-N.log)"
  echo
  echo "From this (root) namespace:"
  echo "  $bin/lockctl --servers $(servers_list) status"
  echo "  export LOCKD_SERVERS=$(servers_list)"
  echo "  $bin/lockctl lock --node node1 fs1 inode-1 -- sleep 5"
  echo "From inside a server's namespace:"
  echo "  ip netns exec $prefix-s1 $bin/lockctl --servers $(servers_list) status"
  echo "Then: $0 partition 1 | $0 heal | $0 down"
}

pid_of() { cat "$state/server-$1.pid" 2>/dev/null || true; }

status() {
  local i pid
  for i in "${ids[@]}"; do
    pid=$(pid_of "$i")
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
      echo "server $i ($(addr_of "$i"):$port): running, pid $pid, link $(cat /sys/class/net/$prefix-s$i-h/operstate 2>/dev/null || echo '?')"
    else
      echo "server $i ($(addr_of "$i"):$port): not running"
    fi
  done
  local bin
  bin=$(bin_dir)
  if [ -x "$bin/lockctl" ]; then
    echo
    "$bin/lockctl" --servers "$(servers_list)" status || true
  fi
}

check_id() {
  case ${1:-} in
    1 | 2 | 3) ;;
    *) die "usage: $0 partition <1|2|3>" ;;
  esac
}

partition() {
  check_id "${1:-}"
  ip link set "$prefix-s$1-h" down
  echo "server $1 ($(addr_of "$1")) is cut off from the other servers, the nodes and lockctl"
}

heal() {
  local i
  for i in "${ids[@]}"; do
    ip link set "$prefix-s$i-h" up 2>/dev/null || true
  done
  echo "every server's link is up again"
}

down() {
  local i pid pids=()
  for i in "${ids[@]}"; do
    pid=$(pid_of "$i")
    # `ip netns exec` execs lockd, so the pid is lockd's own.
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
      kill -TERM "$pid" 2>/dev/null || true
      pids+=("$pid")
    fi
  done
  for _ in $(seq 100); do
    local alive=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [ $alive -eq 0 ] && break
    sleep 0.1
  done
  for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
  for i in "${ids[@]}"; do
    # Deleting the namespace deletes its veth end, and with it the pair.
    ip netns del "$prefix-s$i" 2>/dev/null || true
    ip link del "$prefix-s$i-h" 2>/dev/null || true
  done
  ip link del "$bridge" 2>/dev/null || true
  rm -rf "$state"
  echo "stopped; namespaces, veths, bridge and $state removed"
}

case ${1:-} in
  up) up ;;
  status) status ;;
  partition) partition "${2:-}" ;;
  heal) heal ;;
  down) down ;;
  *)
    echo "usage: $0 up | status | partition <1|2|3> | heal | down" >&2
    exit 2
    ;;
esac
