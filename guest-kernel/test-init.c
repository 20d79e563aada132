// Tiny PID 1 for guest kernel boot tests (packed as /init in test-initramfs.img by build.sh).
//
// Prints one line the tests look for, then reboots: QEMU with -no-reboot and our VMM end the
// VM cleanly when the guest resets (with `reboot=k`, through the i8042 keyboard controller).
//
//   kubevirt-test-init: hello from pid 1, uname -r=<release>, cpus=<online CPUs>
//
// Built with `gcc -static -Os`; fds 0-2 are /dev/console, opened by the kernel.
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/utsname.h>
#include <unistd.h>

static void try_mount(const char *fstype, const char *target) {
  if (mount(fstype, target, fstype, 0, NULL) != 0 && errno != EBUSY)
    dprintf(2, "kubevirt-test-init: mount %s on %s: %s\n", fstype, target, strerror(errno));
}

int main(void) {
  // glibc's sysconf(_SC_NPROCESSORS_ONLN) reads /sys/devices/system/cpu/online.
  try_mount("proc", "/proc");
  try_mount("sysfs", "/sys");

  struct utsname u;
  const char *release = uname(&u) == 0 ? u.release : "unknown";
  long cpus = sysconf(_SC_NPROCESSORS_ONLN);

  dprintf(1, "kubevirt-test-init: hello from pid 1, uname -r=%s, cpus=%ld\n", release, cpus);
  if (getpid() != 1)
    return 0;  // run by hand on a host: do not reboot it

  sync();
  reboot(RB_AUTOBOOT);
  // Only reached if reboot failed; PID 1 exiting panics the kernel, which with panic=-1
  // reboots as well.
  dprintf(2, "kubevirt-test-init: reboot: %s\n", strerror(errno));
  return 1;
}
