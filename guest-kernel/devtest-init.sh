#!/bin/sh
# PID 1 of devtest-initramfs.img (the device tests' guest; packed as /init by build.sh).
#
# Mounts proc, sysfs and devtmpfs, prints `kvtest: ready`, then runs the test's shell
# commands: base64 in `kvtest.cmd=` on the kernel command line (read from /proc/cmdline:
# the kernel does not pass dotted parameters to init), else the words after `--` on the
# command line (the kernel passes them to init as arguments). Prints `kvtest: exit <status>`
# and reboots (`reboot -f`): the VMM ends with status 0 when the guest resets.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /tmp
ip link set lo up 2>/dev/null
echo "kvtest: ready"
cmd=
for w in $(cat /proc/cmdline); do
  case $w in kvtest.cmd=*) cmd=${w#kvtest.cmd=} ;; esac
done
if [ -n "$cmd" ]; then
  echo "$cmd" | base64 -d >/tmp/kvtest.sh
  sh -e /tmp/kvtest.sh
  rc=$?
elif [ $# -gt 0 ]; then
  sh -c "$*"
  rc=$?
else
  echo "kvtest: no commands (kvtest.cmd= or -- on the kernel command line)"
  rc=127
fi
echo "kvtest: exit $rc"
sync
reboot -f
