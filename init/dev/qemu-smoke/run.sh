#!/usr/bin/env bash
# Boots the smoke disk (TCG, direct kernel boot); $HASH overrides the root hash, $EXTRA adds
# kernel arguments, $TIMEOUT bounds the run. The serial console goes to stdout.
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
WORK=${WORK:-$(cd "$HERE/../../.." && pwd)/target/qemu-smoke}
cd "$WORK"
HASH=${HASH:-$(cat roothash)}
rm -f mon.sock
exec timeout "${TIMEOUT:-120}" qemu-system-x86_64 -accel tcg -m 768 -smp 1 -nographic -no-reboot \
  -kernel vmlinuz -initrd initrd.cpio \
  -append "console=ttyS0 plinth.slot=a plinth.version=0.1 plinth.roothash=$HASH ${EXTRA:-}" \
  -drive file=disk.raw,if=virtio,format=raw \
  -netdev user,id=n0,restrict=on -device virtio-net-pci,netdev=n0 \
  -monitor unix:mon.sock,server,nowait
