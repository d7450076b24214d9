#!/usr/bin/env bash
# Builds the static plinth-init and plinth-update binaries (glibc with crt-static).
set -euo pipefail
cd "$(dirname "$0")/.."
RUSTFLAGS="-C target-feature=+crt-static" \
  cargo build --release -p init --target x86_64-unknown-linux-gnu "$@"
