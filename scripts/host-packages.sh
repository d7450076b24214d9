#!/usr/bin/env bash
# Installs the Debian host packages that building, booting and testing Plinth images need.
set -euo pipefail
packages=(
  qemu-system-x86 ovmf qemu-utils        # booting images, output formats
  squashfs-tools erofs-utils             # root filesystem images
  e2fsprogs dosfstools mtools fdisk      # state partition, ESP and GPT oracles
  cryptsetup-bin                         # veritysetup, the dm-verity oracle
  gpgv gnupg debian-archive-keyring      # archive signatures (gnupg makes test keys)
  zstd xz-utils cpio curl binutils iproute2
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "==> installing host packages: ${missing[*]}"
  sudo_cmd=()
  [ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
  "${sudo_cmd[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
