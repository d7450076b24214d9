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
echo "==> cargo test (unit and image tests)"
failed=()
cargo test --workspace --exclude qemu-tests --no-fail-fast -- --test-threads=2 || failed+=("unit and image tests")
cargo test -p qemu-tests --lib --bins || failed+=("qemu-tests units")

# The QEMU tests, at most two guests at a time (the cluster test, three, runs alone). Test
# binaries that run one guest at a time run in two lanes side by side, each line marked with its
# lane; the others run one binary after another, two tests at a time. Where one test runs at a
# time its progress lines (phases and their times) are shown as it goes.
echo "==> QEMU tests"
cargo test -p qemu-tests --tests --no-run
qemu() { cargo test -p qemu-tests --no-fail-fast "$@"; }
lane() {
  local name=$1
  shift
  "$@" 2>&1 | sed -u "s/^/[$name] /"
  return "${PIPESTATUS[0]}"
}
lane a qemu --test system --test grow --test verity -- --test-threads=1 --nocapture &
lane_a=$!
lane b qemu --test pxe -- --test-threads=1 --nocapture &
lane_b=$!
wait "$lane_a" || failed+=("system, grow, verity")
wait "$lane_b" || failed+=("pxe")
qemu --test cloud --test examples --test update -- --test-threads=2 || failed+=("cloud, examples, update")
qemu --test cluster -- --nocapture || failed+=("cluster")

if ((${#failed[@]})); then
  printf '==> failed: %s\n' "${failed[@]}"
  exit 1
fi
echo "==> all checks and tests passed"
