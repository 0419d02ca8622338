#!/usr/bin/env bash
# Installs the built lockd .deb with dpkg on this machine (root), checks what an
# operator uses first — the binaries on PATH, `man lockctl` / `man lockd`, the lockd
# user, the unit, `lockd check-config` of the installed example, the completions —
# and removes it again (purge), whatever the outcome. Used by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/../.."
deb="$(ls -1 "${CARGO_TARGET_DIR:-target}"/debian/lockd_*.deb | tail -1)"
if dpkg -s lockd >/dev/null 2>&1; then
  echo "lockd is already installed here; not touching it" >&2
  exit 1
fi
trap 'dpkg --purge lockd >/dev/null || true' EXIT
dpkg -i "$deb"

check() { echo "-- $*"; "$@"; }
check test "$(command -v lockd)" = /usr/bin/lockd
check test "$(command -v lockctl)" = /usr/bin/lockctl
check lockd --version
check lockctl --version
# man-db may be missing or its excludes may drop man pages (minimal images).
if command -v man >/dev/null; then
  MANWIDTH=80 man lockctl | grep -q "lockctl is lockd's operator tool"
  MANWIDTH=80 man lockd | grep -q "Raft-replicated quorum lock manager"
  MANWIDTH=80 man lockctl-nodes | grep -q "every node of the cluster config"
  echo "-- man lockctl, man lockd, man lockctl-nodes: ok"
else
  echo "man is not installed here" >&2
  exit 1
fi
check getent passwd lockd
check test -f /lib/systemd/system/lockd@.service
check test -d /etc/lockd
check lockd check-config --config /etc/lockd/cluster.toml.example
check test -s /usr/share/bash-completion/completions/lockctl
check test -s /usr/share/doc/lockd/prometheus/lockd-rules.yml
if command -v systemd-analyze >/dev/null; then
  check systemd-analyze verify /lib/systemd/system/lockd@.service 2>&1 | grep -v "^$" || true
fi
check dpkg --purge lockd
trap - EXIT
check test ! -e /usr/bin/lockd
echo "lockd .deb: installed, checked and removed"
