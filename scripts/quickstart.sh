#!/usr/bin/env bash
# Builds the default image and boots it under QEMU, forwarding the demo page to 127.0.0.1:8080.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/host-packages.sh
scripts/build-init.sh
cargo build --release -p builder
plinth=target/release/plinth
[ -f images/qemu.lock ] || "$plinth" lock images/qemu.toml
"$plinth" build images/qemu.toml --init target/x86_64-unknown-linux-gnu/release/plinth-init
version=$(sed -n 's/^version = "\(.*\)"/\1/p' images/qemu.toml | head -1)
exec "$plinth" run "out/qemu-$version.raw" --forward 8080:8080 --snapshot
