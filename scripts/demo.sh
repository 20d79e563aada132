#!/usr/bin/env bash
# `make demo`: what a newcomer sees. Checks the host (which machine back end `auto` picks and
# why), shows the guest kernel on the builtin VMM, then runs a real pod through a private
# containerd's CRI with runtime handler kubevirt: boot time, the guest's `uname -r` beside the
# host's, and the pod IP answering.
set -euo pipefail
cd "$(dirname "$0")/.."
vmm=target/release/kubevirt-vmm
guest=target/guest
step() { printf '\n== %s\n' "$*"; }

step "host check: $vmm doctor"
$vmm doctor
backend=$($vmm doctor --verdict)

step "builtin VMM: boot $guest/vmlinux (first lines of the console)"
if [ "$backend" = builtin ]; then
  $vmm run --kernel $guest/vmlinux --initrd $guest/test-initramfs.img --vcpus 2 \
    --cmdline "console=ttyS0 reboot=k panic=1" | grep -E "Linux version|Command line|kubevirt-test-init"
else
  echo "KVM here emulates guest code, so Linux cannot reach user space on the builtin VMM;"
  echo "it still boots far enough to show it is our kernel, our command line and our e820 map:"
  timeout 20 $vmm run --kernel $guest/vmlinux --vcpus 2 --cpu-hide xsave,cx16 \
    --cmdline "console=ttyS0 earlyprintk=serial,ttyS0,115200 reboot=k panic=1 demo=builtin" \
    2>&1 | grep -m 6 -E "Linux version|Command line:|BIOS-e820|Processors:|Hypervisor" || true
fi

step "a pod through containerd's CRI, in a microVM (target/release/kubevirt-demo)"
target/release/kubevirt-demo
