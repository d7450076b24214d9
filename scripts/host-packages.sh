#!/usr/bin/env bash
# Installs the Debian host packages that building, booting and testing Plinth images need, then
# checks that every program and file they are installed for is there.
set -euo pipefail
packages=(
  qemu-system-x86 ovmf qemu-utils        # booting images, output formats
  ipxe-qemu                              # the NIC's iPXE ROM that network-boots the PXE tests
  squashfs-tools erofs-utils             # root filesystem images
  e2fsprogs dosfstools mtools fdisk      # state partition, ESP and GPT oracles
  cryptsetup-bin                         # veritysetup, the dm-verity oracle
  gpgv gnupg debian-archive-keyring      # archive signatures (gnupg makes test keys)
  zstd xz-utils cpio curl binutils iproute2
  dnsmasq-base genisoimage               # the cloud tests' DHCP server (in a namespace), NoCloud ISO
)
# What each package is installed for: a program (looked up like `plinth` does, on PATH and in the
# sbin folders a non-root PATH may lack) or an absolute file path.
provides=(
  qemu-system-x86:qemu-system-x86_64 qemu-utils:qemu-img
  ovmf:/usr/share/OVMF/OVMF_CODE_4M.fd ovmf:/usr/share/OVMF/OVMF_VARS_4M.fd
  ipxe-qemu:/usr/lib/ipxe/qemu/efi-virtio.rom
  squashfs-tools:mksquashfs squashfs-tools:unsquashfs erofs-utils:mkfs.erofs
  e2fsprogs:mkfs.ext4 e2fsprogs:e2fsck dosfstools:mkfs.vfat dosfstools:fsck.vfat
  mtools:mcopy mtools:mmd fdisk:sfdisk cryptsetup-bin:veritysetup
  gpgv:gpgv gnupg:gpg debian-archive-keyring:/usr/share/keyrings/debian-archive-keyring.gpg
  zstd:zstd xz-utils:xz cpio:cpio curl:curl binutils:ld binutils:objcopy iproute2:ip
  dnsmasq-base:dnsmasq genisoimage:genisoimage
)

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }

missing=()
for p in "${packages[@]}"; do
  installed "$p" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "==> missing host packages: ${missing[*]}"
  sudo_cmd=()
  [ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
  "${sudo_cmd[@]}" apt-get update -qq
  # One apt call over the whole list: every package is asked for, so apt cannot remove one of them
  # to make room for another. qemu-utils and qemu-system-x86 are built from one source and break
  # each other across versions (a newer qemu-utils, say from backports, breaks Debian's
  # qemu-system-x86): both are asked for at qemu-system-x86's version.
  if installed qemu-system-x86; then
    qemu_version=$(dpkg-query -W -f='${Version}' qemu-system-x86)
  else
    qemu_version=$(apt-cache policy qemu-system-x86 | sed -n 's/^ *Candidate: //p')
  fi
  request=("${packages[@]}")
  if [ -n "$qemu_version" ] && [ "$qemu_version" != "(none)" ]; then
    if installed qemu-utils && [ "$(dpkg-query -W -f='${Version}' qemu-utils)" != "$qemu_version" ]; then
      echo "==> qemu-utils $(dpkg-query -W -f='${Version}' qemu-utils) is replaced by $qemu_version, the version of qemu-system-x86"
    fi
    for i in "${!request[@]}"; do
      case "${request[$i]}" in
        qemu-system-x86 | qemu-utils) request[i]="${request[$i]}=$qemu_version" ;;
      esac
    done
  fi
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends \
    --allow-downgrades "${request[@]}"
fi

absent=() absent_packages=()
for entry in "${provides[@]}"; do
  package=${entry%%:*} what=${entry#*:}
  case "$what" in
    /*) [ -e "$what" ] && continue ;;
    *) PATH="$PATH:/usr/sbin:/sbin" command -v "$what" >/dev/null && continue ;;
  esac
  absent+=("$what (package $package)")
  absent_packages+=("$package")
done
if [ ${#absent[@]} -gt 0 ]; then
  echo "error: missing host tools:" >&2
  printf '  %s\n' "${absent[@]}" >&2
  echo "install them with: apt-get install --reinstall $(printf '%s\n' "${absent_packages[@]}" | sort -u | xargs)" >&2
  exit 1
fi
echo "==> host tools: all ${#provides[@]} present"
