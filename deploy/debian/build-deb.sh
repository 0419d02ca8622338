#!/usr/bin/env bash
# Builds the lockd .deb: lockd and lockctl, the systemd unit, the example configs in
# /etc/lockd, man pages (lockd(8), lockctl(8) and one per command) and lockctl's shell
# completions. Needs cargo-deb (`cargo install cargo-deb --locked`).
#
#   deploy/debian/build-deb.sh            # release build -> target/debian/lockd_*.deb
#   LOCKD_DEB_PROFILE=dev deploy/debian/build-deb.sh
#       packs the debug build instead (what .ci/run does, to reuse its test build;
#       not for production)
set -euo pipefail
cd "$(dirname "$0")/../.."
profile="${LOCKD_DEB_PROFILE:-release}"
case "$profile" in
  release) bin_dir=release ;;
  dev) bin_dir=debug ;;
  *) echo "LOCKD_DEB_PROFILE must be release or dev, not $profile" >&2; exit 2 ;;
esac
target="${CARGO_TARGET_DIR:-target}"
cargo build --profile "$profile" -p lockd-server --bin lockd -p lockctl --bin lockctl

assets="$target/deb-assets"
rm -rf "$assets"
mkdir -p "$assets/man" "$assets/completions"
"$target/$bin_dir/lockd" manpages "$assets/man"
"$target/$bin_dir/lockctl" manpages "$assets/man"
gzip -9n "$assets"/man/*.8
"$target/$bin_dir/lockctl" completions bash > "$assets/completions/lockctl.bash"
"$target/$bin_dir/lockctl" completions zsh > "$assets/completions/_lockctl"
"$target/$bin_dir/lockctl" completions fish > "$assets/completions/lockctl.fish"

# Stripped: the debug build's symbols would make a 50 MB package and minutes of xz.
fast=()
[ "$profile" = dev ] && fast=(--fast)
cargo deb -p lockd-server --no-build --profile "$profile" --strip "${fast[@]}"
ls -1 "$target"/debian/lockd_*.deb
