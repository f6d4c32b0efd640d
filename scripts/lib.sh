# Shared helpers for the scripts: install what is missing (Debian, as root).
# shellcheck shell=bash

need_cargo() {
  if ! command -v cargo >/dev/null 2>&1; then
    [ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
  fi
  if ! command -v cargo >/dev/null 2>&1; then
    echo "installing Rust (Debian's cargo)" >&2
    apt_install cargo rustc
  fi
}

# apt_install PKG... : installs the packages that are not installed yet.
apt_install() {
  local missing=()
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" -ne 0 ]; then
    echo "missing Debian packages: ${missing[*]} (run as root to install them)" >&2
    return 1
  fi
  echo "installing: ${missing[*]}" >&2
  if [ -z "${CDM_APT_UPDATED:-}" ]; then
    apt-get update -qq >&2
    export CDM_APT_UPDATED=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
}

# The private qemu-system (for instant VM recovery and the VM tests).
# Debian bookworm's qemu-system-x86 (7.2) conflicts with the newer
# qemu-utils the NBD tests use, so it is not installed: its packages are
# unpacked under $CDM_QEMU_DIR (default /opt/cdm-qemu), with SeaBIOS, iPXE
# and OVMF, and its libraries installed. bin/qemu-system-x86_64 there runs
# it with the private firmware directory. snapshotd looks there when no
# qemu-system-x86_64 is on PATH.
qemu_system_private() {
  local dir="${CDM_QEMU_DIR:-/opt/cdm-qemu}"
  if [ -x "$dir/bin/qemu-system-x86_64" ] && [ -d "$dir/lib/qemu" ] && "$dir/bin/qemu-system-x86_64" -version >/dev/null 2>&1; then
    return 0
  fi
  apt_install libcapstone4 libfdt1 libpmem1 librdmacm1 libibverbs1 libslirp0 libvdeplug2
  echo "unpacking qemu-system-x86 into $dir" >&2
  local tmp
  tmp="$(mktemp -d)"
  chmod 755 "$tmp"
  if [ -z "${CDM_APT_UPDATED:-}" ]; then
    apt-get update -qq >&2
    export CDM_APT_UPDATED=1
  fi
  (cd "$tmp" && apt-get download -q qemu-system-x86 qemu-system-data qemu-system-common seabios ipxe-qemu ovmf >&2) || {
    rm -rf "$tmp"
    return 1
  }
  for f in "$tmp"/*.deb; do dpkg -x "$f" "$tmp/root"; done
  rm -rf "$dir.new"
  mkdir -p "$dir.new/libexec" "$dir.new/bin" "$dir.new/share/qemu" "$dir.new/share/OVMF"
  cp "$tmp/root/usr/bin/qemu-system-x86_64" "$dir.new/libexec/"
  # Its accelerators and devices are modules of the same build (TCG among
  # them), found through QEMU_MODULE_DIR.
  mkdir -p "$dir.new/lib"
  cp -r "$tmp/root/usr/lib/x86_64-linux-gnu/qemu" "$dir.new/lib/qemu"
  # One firmware directory, links resolved (they point into /usr/share).
  (cd "$tmp/root" && for d in usr/share/qemu usr/share/seabios usr/lib/ipxe/qemu; do
    [ -d "$d" ] && cp -rL --no-preserve=ownership "$d"/. "$dir.new/share/qemu/" 2>/dev/null
  done; true)
  cp -L "$tmp/root/usr/share/OVMF/OVMF_CODE.fd" "$tmp/root/usr/share/OVMF/OVMF_VARS.fd" "$dir.new/share/OVMF/"
  cat >"$dir.new/bin/qemu-system-x86_64" <<WRAP
#!/bin/sh
QEMU_MODULE_DIR="$dir/lib/qemu" exec "$dir/libexec/qemu-system-x86_64" -L "$dir/share/qemu" "\$@"
WRAP
  chmod 755 "$dir.new/bin/qemu-system-x86_64"
  rm -rf "$tmp" "$dir"
  mv "$dir.new" "$dir"
  "$dir/bin/qemu-system-x86_64" -version >&2
}

# What the VM tests boot: a Debian kernel (unpacked, not installed), and
# busybox and extlinux to build a guest disk that boots by itself.
vm_guest_kit() {
  apt_install busybox-static extlinux syslinux-common cpio
  local dir="${CDM_QEMU_DIR:-/opt/cdm-qemu}/guest"
  [ -f "$dir/vmlinuz" ] && return 0
  local tmp
  tmp="$(mktemp -d)"
  chmod 755 "$tmp"
  if [ -z "${CDM_APT_UPDATED:-}" ]; then
    apt-get update -qq >&2
    export CDM_APT_UPDATED=1
  fi
  local pkg
  pkg="$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')"
  [ -n "$pkg" ] || { echo "no linux-image package found" >&2; return 1; }
  (cd "$tmp" && apt-get download -q "$pkg" >&2) || { rm -rf "$tmp"; return 1; }
  dpkg -x "$tmp"/*.deb "$tmp/root"
  mkdir -p "$dir.new"
  cp "$tmp"/root/boot/vmlinuz-* "$dir.new/vmlinuz"
  cp "$tmp"/root/boot/config-* "$dir.new/config"
  # The modules a guest needs to see its virtio disk, by their paths.
  (cd "$tmp"/root/lib/modules/* && tar cf "$dir.new/modules.tar" $(find kernel/drivers/block/virtio_blk.ko* kernel/drivers/virtio kernel/fs/ext4 kernel/fs/jbd2 kernel/fs/mbcache.ko* kernel/lib/crc16.ko* kernel/crypto/crc32c_generic.ko* kernel/lib/libcrc32c.ko* -name '*.ko*' 2>/dev/null))
  rm -rf "$tmp" "$dir"
  mv "$dir.new" "$dir"
}

# The S3 server the object-storage tier's tests run against on loopback:
# s3s-fs from crates.io, a real S3 implementation (SigV4, payload hashes,
# Content-MD5, ranges, ListObjectsV2, DeleteObjects) that keeps each
# object as a plain file ROOT/BUCKET/KEY. Installed once into
# ~/.cargo/bin (a few minutes on two cores). Pinned, so every run tests
# against the same server (0.17 needs a newer rustc than 1.80).
S3S_FS_VERSION=0.14.1
s3_test_server() {
  need_cargo
  local bin
  bin="$(command -v s3s-fs || echo "$HOME/.cargo/bin/s3s-fs")"
  if [ -x "$bin" ] && "$bin" --version 2>/dev/null | grep -qx "s3s-fs $S3S_FS_VERSION"; then
    return 0
  fi
  echo "installing s3s-fs $S3S_FS_VERSION (cargo install)" >&2
  cargo install "s3s-fs@$S3S_FS_VERSION" --features binary --locked >&2
}
