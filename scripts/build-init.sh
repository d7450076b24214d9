#!/usr/bin/env bash
# Builds the static plinth-init and plinth-update binaries (glibc with crt-static).
set -euo pipefail
cd "$(dirname "$0")/.."
RUSTFLAGS="-C target-feature=+crt-static" \
  cargo build --release -p init --target x86_64-unknown-linux-gnu "$@"
# The same with the QEMU tests' hooks (init's `test-hooks` feature), in a target folder of its own
# so that neither build invalidates the other; only test images use these.
RUSTFLAGS="-C target-feature=+crt-static" CARGO_TARGET_DIR=target/test-hooks \
  cargo build --release -p init --target x86_64-unknown-linux-gnu --features test-hooks "$@"
