#!/usr/bin/env bash
# Builds the static plinth-init and plinth-update binaries (glibc with crt-static).
set -euo pipefail
cd "$(dirname "$0")/.."
release=target/x86_64-unknown-linux-gnu/release
hooks=target/test-hooks/x86_64-unknown-linux-gnu/release
export RUSTFLAGS="-C target-feature=+crt-static"
# First the binaries with the QEMU tests' hooks (init's `test-hooks` feature), copied to a folder
# of their own; only test images use these. Both builds share one target folder, so the
# dependencies are compiled once, and cargo keeps each feature set's binaries apart in `deps/`,
# so switching between them relinks nothing that is up to date.
cargo build --release -p init --target x86_64-unknown-linux-gnu --features test-hooks "$@"
mkdir -p "$hooks"
for bin in plinth-init plinth-update; do
  cp "$release/$bin" "$hooks/$bin.tmp"
  mv "$hooks/$bin.tmp" "$hooks/$bin"
done
cargo build --release -p init --target x86_64-unknown-linux-gnu "$@"
