#!/usr/bin/env bash
# Boots, waits for console text $1, sends monitor command $2 (default system_powerdown), waits
# for QEMU to exit ($DELAY seconds after the text appeared) and prints the console log and how long the shutdown took.
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
WORK=${WORK:-$(cd "$HERE/../../.." && pwd)/target/qemu-smoke}
LOG=$WORK/console.log
"$HERE/run.sh" > "$LOG" 2>&1 &
QEMU=$!
for _ in $(seq 1 150); do grep -q "$1" "$LOG" && break; sleep 1; done
grep -q "$1" "$LOG" || { cat "$LOG"; echo "never saw: $1" >&2; kill "$QEMU"; exit 1; }
sleep "${DELAY:-0}"
START=$(date +%s)
python3 -c "
import socket, sys, time
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); s.sendall((sys.argv[2] + '\n').encode()); time.sleep(1)
" "$WORK/mon.sock" "${2:-system_powerdown}"
wait "$QEMU"; RC=$?
cat "$LOG"
echo "qemu exited $RC, $(( $(date +%s) - START )) s after the request"
