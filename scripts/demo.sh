#!/usr/bin/env bash
# `make demo`: what a newcomer sees today. Checks the host, then boots the project's guest
# kernel on the builtin VMM and on the qemu back end, and shows the guest's kernel release
# beside the host's. (Running a pod through containerd arrives with the shim.)
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

step "qemu back end (QEMU microvm, TCG here): boot to the guest's init"
start=$(date +%s.%N)
out=$(timeout 120 qemu-system-x86_64 -M microvm,acpi=off,x-option-roms=off,rtc=off -accel tcg \
  -cpu max -m 256 -smp 2 -nodefaults -no-user-config -display none -no-reboot -serial stdio \
  -kernel $guest/vmlinux -initrd $guest/test-initramfs.img -append "console=ttyS0 reboot=k panic=-1")
end=$(date +%s.%N)
echo "$out" | grep -E "kubevirt-test-init"
printf 'boot to init and back: %.1f s\n' "$(echo "$end - $start" | bc)"
printf '\nguest kernel: %s\nhost kernel:  %s\n' "$(cat $guest/kernel.release)" "$(uname -r)"
