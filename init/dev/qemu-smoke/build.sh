#!/usr/bin/env bash
# Builds the smoke-test initramfs and GPT disk (root-a squashfs + verity, state ext4) in $WORK.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../../.." && pwd)
: "${KERNEL_TREE:?set KERNEL_TREE to an extracted linux-image package}"
: "${BUSYBOX:?set BUSYBOX to a static busybox binary}"
BIN=${BIN:-$REPO/target/x86_64-unknown-linux-gnu/release/plinth-init}
WORK=${WORK:-$REPO/target/qemu-smoke}
for tool in mksquashfs veritysetup mkfs.ext4 sfdisk cpio python3; do
  command -v "$tool" >/dev/null || { echo "missing host tool: $tool" >&2; exit 1; }
done
[ -x "$BIN" ] || { echo "no plinth-init at $BIN: run scripts/build-init.sh" >&2; exit 1; }
K=$(basename "$(ls -d "$KERNEL_TREE"/lib/modules/*/ | head -1)")
rm -rf "$WORK" && mkdir -p "$WORK"/{initrd,root,mods}
cd "$WORK"
cp -r "$KERNEL_TREE/lib/modules/$K" mods/ && python3 "$HERE/modidx.py" "mods/$K"
cp "$KERNEL_TREE"/boot/vmlinuz-* vmlinuz
# initramfs: /init and the modules that find and mount root
mkdir -p initrd/{dev,proc,sys,run,sysroot,lib/modules/$K}
cp "$BIN" initrd/init
python3 - "mods/$K" "initrd/lib/modules/$K" virtio_pci virtio_blk virtio_scsi sd_mod squashfs erofs dm_mod dm_verity <<'PY'
import sys, os, shutil
full, dst, want = sys.argv[1], sys.argv[2], sys.argv[3:]
dep = {}
for line in open(os.path.join(full, 'modules.dep')):
    p, _, d = line.partition(':')
    dep[os.path.basename(p)[:-3].replace('-', '_')] = (p, d.split())
keep = set()
for w in want:
    if w in dep:
        keep.add(dep[w][0]); keep.update(dep[w][1])
with open(os.path.join(dst, 'modules.dep'), 'w') as f:
    for name, (p, d) in sorted(dep.items()):
        if p in keep:
            f.write(p + ':' + ''.join(' ' + x for x in d) + '\n')
            os.makedirs(os.path.join(dst, os.path.dirname(p)), exist_ok=True)
            shutil.copy(os.path.join(full, p), os.path.join(dst, p))
names = {os.path.basename(p)[:-3].replace('-', '_') for p in keep}
with open(os.path.join(dst, 'modules.alias'), 'w') as f:
    for line in open(os.path.join(full, 'modules.alias')):
        parts = line.split()
        if len(parts) == 3 and parts[2] in names:
            f.write(line)
PY
(cd initrd && find . | sort | cpio -o -H newc --quiet) > initrd.cpio
# root: plinth-init, all modules, busybox and the fake dockerd
mkdir -p root/{usr/bin,bin,etc/docker,var,proc,sys,dev,run,tmp,usr/lib/modules}
cp "$BIN" root/usr/bin/plinth-init
cp -r "mods/$K" root/usr/lib/modules/
cp "$BUSYBOX" root/bin/busybox
cp "$HERE/fake-dockerd" root/usr/bin/dockerd
echo smoke > root/etc/hostname
ln -s ../run/machine-id root/etc/machine-id
printf 'ID=plinth\nNAME=Plinth\n' > root/etc/os-release
echo '{}' > root/etc/docker/daemon.json
# An optional tree copied over the root (e.g. extracted docker.io and its libraries).
if [ -n "${EXTRA_TREE:-}" ]; then cp -a "$EXTRA_TREE"/. root/; fi
mksquashfs root root.sqfs -comp zstd -noappend -quiet -all-root >/dev/null
veritysetup format root.sqfs verity.img > verity.txt
HASH=$(awk '/Root hash:/ {print $3}' verity.txt)
echo "$HASH" > roothash
uuid() { echo "$1" | sed -E 's/(.{8})(.{4})(.{4})(.{4})(.{12})/\1-\2-\3-\4-\5/'; }
truncate -s 64M state.img && mkfs.ext4 -q -L state state.img
rs=$(( ($(stat -c %s root.sqfs) + 1048575) / 1048576 ))
vs=$(( ($(stat -c %s verity.img) + 1048575) / 1048576 ))
truncate -s $(( 1 + 8 + 2 * (rs + vs) + 64 + 1 ))M disk.raw
sfdisk -q disk.raw <<SF
label: gpt
start=1MiB, size=8MiB, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, name=esp
size=${rs}MiB, type=4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709, name=root-a, uuid=$(uuid "${HASH:0:32}")
size=${vs}MiB, type=2C7357ED-EBD2-46D9-AEC1-23D437EC2BF5, name=verity-a, uuid=$(uuid "${HASH:32:32}")
size=${rs}MiB, type=4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709, name=root-b
size=${vs}MiB, type=2C7357ED-EBD2-46D9-AEC1-23D437EC2BF5, name=verity-b
size=64MiB, type=4D21B016-B534-45C2-A9FB-5C16E091FD2D, name=state
SF
put() { dd if="$1" of=disk.raw bs=1M seek="$2" conv=notrunc status=none; }
put root.sqfs 9
put verity.img $(( 9 + rs ))
put state.img $(( 9 + 2 * (rs + vs) ))
echo "disk $WORK/disk.raw, root hash $HASH"
