#!/usr/bin/env bash
# Packs the agent as /init into the pod VM's initramfs: target/guest/initramfs.img.
# Usage: guest-kernel/initramfs.sh AGENT_BINARY GUEST_DIR
# Needs the kernel built by build.sh first (its gen_init_cpio makes /dev/console without root).
# Uncompressed: unpacking is a copy, and the guest kernel need not spend time decompressing.
set -euo pipefail

agent=${1:?usage: initramfs.sh AGENT_BINARY GUEST_DIR}
out=${2:?usage: initramfs.sh AGENT_BINARY GUEST_DIR}
[[ -x $agent ]] || { echo "initramfs: agent binary $agent not found (cargo build -p agent --release)" >&2; exit 1; }
kdir=$(dirname "$(readlink -f "$out/vmlinux")")
gen=$kdir/gen_init_cpio
[[ -x $gen ]] || { echo "initramfs: $gen not found; run guest-kernel/build.sh first" >&2; exit 1; }

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
strip -o "$tmp/init" "$agent"
touch -d @0 "$tmp/init" # reproducible: gen_init_cpio takes the file's mtime
cat >"$tmp/files.list" <<LIST
dir /dev 0755 0 0
nod /dev/console 0600 0 0 c 5 1
dir /proc 0755 0 0
dir /sys 0755 0 0
dir /run 0755 0 0
dir /tmp 01777 0 0
dir /etc 0755 0 0
file /init $tmp/init 0755 0 0
LIST
"$gen" -t 0 "$tmp/files.list" >"$tmp/initramfs.img"
mv -f "$tmp/initramfs.img" "$out/initramfs.img"
echo "initramfs: $out/initramfs.img ($(du -h "$out/initramfs.img" | cut -f1), agent $(du -h "$tmp/init" | cut -f1) stripped)"
