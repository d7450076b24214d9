#!/usr/bin/env bash
# Builds the default image and boots it under QEMU, forwarding the demo page to 127.0.0.1:8080.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/host-packages.sh
scripts/build-init.sh
cargo build --release -p builder
plinth=target/release/plinth
[ -f images/qemu.lock ] || "$plinth" lock images/qemu.toml
build() { "$plinth" build images/qemu.toml --init target/x86_64-unknown-linux-gnu/release/plinth-init; }
if ! build; then
  # The archive drops superseded package versions; refresh the lock once and retry.
  echo "warning: the build failed; refreshing images/qemu.lock with 'plinth lock --update' and retrying" >&2
  "$plinth" lock --update images/qemu.toml
  build
fi
version=$(sed -n 's/^version = "\(.*\)"/\1/p' images/qemu.toml | head -1)
exec "$plinth" run "out/qemu-$version.raw" --forward 8080:8080 --snapshot
