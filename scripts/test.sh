#!/usr/bin/env bash
# Runs every check and test: formatting, lints, unit, image and QEMU tests.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/host-packages.sh
echo "==> cargo fmt --check"
cargo fmt --all -- --check
echo "==> cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
echo "==> static plinth-init"
scripts/build-init.sh
echo "==> cargo test"
cargo test --workspace --no-fail-fast -- --test-threads=2
