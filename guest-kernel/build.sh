#!/usr/bin/env bash
# Builds the guest kernel (vmlinux, bzImage) and the test initramfs, cached outside the clone.
#
#   guest-kernel/build.sh OUTDIR
#   guest-kernel/build.sh --key    prints the kernel cache key and whether it is cached
#
# Inputs (environment):
#   KERNEL_SRC_TARBALL  Linux source tarball (default /usr/src/linux-source-6.1.tar.xz,
#                       from the Debian package linux-source-6.1)
#   KERNEL_SRC          a clean kernel source directory instead of the tarball
#   KUBEVIRT_CACHE      cache root (default /var/cache/kubevirt-shim)
#   KUBEVIRT_JOBS       parallel make jobs (default: nproc)
#   KUBEVIRT_FRAGMENT   config fragment (default guest-kernel/config.fragment)
#
# guest-kernel/patches/*.patch are applied, in name order, to a copy of the source.
#
# Cache layout (every entry is written to a temporary directory and renamed into place):
#   $KUBEVIRT_CACHE/guest/<kernel key>/      vmlinux bzImage config kernel.release
#                                            gen_init_cpio build.log inputs.txt
#   $KUBEVIRT_CACHE/guest/initramfs/<initramfs key>/  test-initramfs.img init files.list
#   $KUBEVIRT_CACHE/guest/devtest/<devtest key>/      devtest-initramfs.img init vsock-test
#                                                     files.list
#   $KUBEVIRT_CACHE/build/<kernel key>/      extracted source + objects while building
#   $KUBEVIRT_CACHE/build/<kernel key>.log   full make log of the current/last build
#   $KUBEVIRT_CACHE/guest.lock               flock: one build at a time
# kernel key    = sha256(source identity, config.fragment, patches, build.sh, compiler version)
# initramfs key = sha256(kernel key, test-init.c, build.sh, compiler version)
# devtest key   = sha256(kernel key, devtest-init.sh, vsock-test.c, build.sh, compiler
#                 version, busybox binary)
#
# OUTDIR receives symlinks into the cache: vmlinux bzImage config kernel.release
# test-initramfs.img devtest-initramfs.img.
#
# devtest-initramfs.img is the device tests' guest (tests/tests/devices_qemu.rs): Debian's
# static busybox (package busybox-static) with its applet links, /bin/vsock-test (traffic
# generator and checker for vsock and TCP, vsock-test.c) and /init (devtest-init.sh), which
# runs the shell commands given on the kernel command line and reboots.
set -euo pipefail

log() { printf 'guest-kernel: %s\n' "$*"; }
die() { printf 'guest-kernel: error: %s\n' "$*" >&2; exit 1; }

(($# == 1)) || die "usage: $0 OUTDIR | --key"

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
self=$here/build.sh
fragment=${KUBEVIRT_FRAGMENT:-$here/config.fragment}
init_src=$here/test-init.c
devinit_src=$here/devtest-init.sh
vsock_src=$here/vsock-test.c
busybox=${BUSYBOX:-/bin/busybox}
cache=${KUBEVIRT_CACHE:-/var/cache/kubevirt-shim}
jobs=${KUBEVIRT_JOBS:-$(nproc)}
# Reproducible build metadata (shows in the banner and `uname -v`).
export KBUILD_BUILD_TIMESTAMP='Mon Jan  1 00:00:00 UTC 2024'
export KBUILD_BUILD_USER=kubevirt KBUILD_BUILD_HOST=kubevirt-shim KBUILD_BUILD_VERSION=1
export SOURCE_DATE_EPOCH=1704067200
export LC_ALL=C TZ=UTC

for f in "$fragment" "$init_src" "$devinit_src" "$vsock_src"; do [[ -f $f ]] || die "missing $f"; done

# --- tools -----------------------------------------------------------------------------
need=()
for t in make:make gcc:gcc flex:flex bison:bison bc:bc tar:tar xz:xz-utils perl:perl \
         patch:patch sha256sum:coreutils flock:util-linux setsid:util-linux; do
  command -v "${t%%:*}" >/dev/null || need+=("${t#*:}")
done
[[ -f /usr/include/gelf.h ]] || need+=(libelf-dev)
((${#need[@]} == 0)) ||
  die "missing build tools; install them with: apt-get install ${need[*]} (or run make deps)"
# The device tests' initramfs needs a static busybox.
[[ -x $busybox ]] && ! readelf -l "$busybox" 2>/dev/null | grep -q INTERP ||
  die "no static busybox at $busybox: apt-get install busybox-static (or run make deps)"
# The static init needs glibc's libc.a.
[[ -n $(gcc -print-file-name=libc.a | grep /) ]] ||
  die "gcc cannot link statically (no libc.a): apt-get install libc6-dev"

# --- source identity and cache keys -------------------------------------------------------
if [[ -n ${KERNEL_SRC:-} ]]; then
  [[ -f $KERNEL_SRC/Makefile && -d $KERNEL_SRC/arch/x86 ]] ||
    die "KERNEL_SRC=$KERNEL_SRC is not a Linux source directory (no Makefile or arch/x86)"
  src_dir=$(cd "$KERNEL_SRC" && pwd)
  version=$(sed -nE 's/^(VERSION|PATCHLEVEL|SUBLEVEL|EXTRAVERSION) = ?(.*)$/\1=\2/p' \
    "$src_dir/Makefile" | head -4 | tr '\n' ' ')
  src_id="dir $src_dir $version"
else
  tarball=${KERNEL_SRC_TARBALL:-/usr/src/linux-source-6.1.tar.xz}
  [[ -f $tarball ]] || die "kernel source tarball $tarball not found: install the Debian \
package linux-source-6.1 (apt-get install linux-source-6.1, or make deps), or point \
KERNEL_SRC_TARBALL at a tarball or KERNEL_SRC at a source directory"
  src_dir=
  src_id="tarball $(basename "$tarball") size=$(stat -c %s "$tarball") mtime=$(stat -c %Y "$tarball")"
fi
sha() { sha256sum "$1" | cut -d' ' -f1; }
cc_id=$(gcc --version | head -1)
patches=("$here"/patches/*.patch)
[[ -f ${patches[0]} ]] || patches=()
patch_ids=$(for p in "${patches[@]}"; do printf '%s=%s ' "$(basename "$p")" "$(sha "$p")"; done)
kernel_inputs="kubevirt-guest-kernel v1
source: $src_id
config.fragment: $(sha "$fragment")
patches: $patch_ids
build.sh: $(sha "$self")
compiler: $cc_id"
kkey=$(printf '%s\n' "$kernel_inputs" | sha256sum | cut -d' ' -f1)
ikey=$(printf 'kubevirt-test-initramfs v1\nkernel: %s\ntest-init.c: %s\nbuild.sh: %s\ncompiler: %s\n' \
  "$kkey" "$(sha "$init_src")" "$(sha "$self")" "$cc_id" | sha256sum | cut -d' ' -f1)
dkey=$(printf 'kubevirt-devtest-initramfs v1\nkernel: %s\ndevtest-init.sh: %s\nvsock-test.c: %s\nbuild.sh: %s\ncompiler: %s\nbusybox: %s\n' \
  "$kkey" "$(sha "$devinit_src")" "$(sha "$vsock_src")" "$(sha "$self")" "$cc_id" \
  "$(sha "$busybox")" | sha256sum | cut -d' ' -f1)
kdir=$cache/guest/$kkey
idir=$cache/guest/initramfs/$ikey
ddir=$cache/guest/devtest/$dkey
if [[ $1 == --key ]]; then
  [[ -f $kdir/vmlinux ]] && state=cached || state=missing
  printf 'kernel key %s %s\n' "$kkey" "$state"
  exit 0
fi

# --- helpers ------------------------------------------------------------------------------
elapsed() { local s=$((SECONDS - $1)); printf '%dm%02ds' $((s / 60)) $((s % 60)); }

# Checks that every line of the fragment survived olddefconfig; prints those that did not.
check_config() { # fragment .config
  local bad=0 line opt
  while IFS= read -r line; do
    if [[ $line =~ ^(CONFIG_[A-Za-z0-9_]+)=(.*)$ ]]; then
      opt=${BASH_REMATCH[1]}
      grep -qxF -- "$line" "$2" && continue
      printf '  %-45s got: %s\n' "$line" "$(grep -E "^(# )?$opt[= ]" "$2" || echo '(absent: a dependency is off)')" >&2
      bad=1
    elif [[ $line =~ ^#\ (CONFIG_[A-Za-z0-9_]+)\ is\ not\ set$ ]]; then
      opt=${BASH_REMATCH[1]}
      grep -qE "^$opt=" "$2" || continue
      printf '  %-45s got: %s\n' "$line" "$(grep -E "^$opt=" "$2")" >&2
      bad=1
    fi
  done <"$1"
  return $bad
}

build_kernel() {
  local work=$cache/build/$kkey klog=$cache/build/$kkey.log t0=$SECONDS t n
  # Holding the lock, no other build runs: work trees left by failed builds can go.
  rm -rf "$cache"/build/*/ && mkdir -p "$work/obj"
  : >"$klog"
  local src=$work/src obj=$work/obj p
  kmake() { make -C "$src" O="$obj" ARCH=x86_64 "$@"; }
  fail() { tail -n 40 "$klog" >&2; die "$1 failed; full log: $klog"; }
  mkdir "$src"
  t=$SECONDS
  if [[ -n $src_dir ]]; then
    # A copy: the patches must not touch the caller's tree.
    log "copying $src_dir"
    cp -a "$src_dir/." "$src/" || die "copying $src_dir failed"
  else
    log "extracting $tarball"
    tar -C "$src" --strip-components=1 -xf "$tarball" >>"$klog" 2>&1 ||
      die "extracting $tarball failed (log: $klog)"
  fi
  log "source ready in $(elapsed $t)"
  for p in "${patches[@]}"; do
    log "applying $(basename "$p")"
    patch -d "$src" -p1 --forward <"$p" >>"$klog" 2>&1 || fail "applying $p"
  done

  log "configuring: tinyconfig + $(basename "$fragment") + olddefconfig"
  { kmake tinyconfig &&
    (cd "$obj" && "$src/scripts/kconfig/merge_config.sh" -m -O "$obj" "$obj/.config" "$fragment") &&
    kmake olddefconfig; } >>"$klog" 2>&1 || fail "kernel configuration"
  if ! check_config "$fragment" "$obj/.config"; then
    die "the options above from $fragment did not survive olddefconfig: enable their \
dependencies in the fragment (config: $obj/.config)"
  fi

  log "compiling vmlinux and bzImage with -j$jobs (log: $klog)"
  t=$SECONDS
  # Own process group (setsid), so that an interrupted script takes the whole make with it;
  # fd 9 (the lock) is not inherited.
  setsid make -C "$src" O="$obj" ARCH=x86_64 -j"$jobs" vmlinux bzImage >>"$klog" 2>&1 9>&- &
  mk=$!
  trap 'kill -TERM -- -$mk 2>/dev/null || true' EXIT
  trap "exit 130" INT TERM HUP
  while kill -0 "$mk" 2>/dev/null; do
    for _ in {1..30}; do kill -0 "$mk" 2>/dev/null && sleep 1; done
    if kill -0 "$mk" 2>/dev/null; then
      n=$(grep -cE '^  (CC|AS) ' "$klog" || true)
      log "  compiled $n files, $(elapsed $t)"
    fi
  done
  wait "$mk" || fail "kernel build"
  trap - EXIT
  # The initramfs generator (a host tool of the kernel tree), kept for test-initramfs.img.
  kmake usr/gen_init_cpio >>"$klog" 2>&1 || fail "building usr/gen_init_cpio"
  n=$(grep -cE '^  (CC|AS) ' "$klog" || true)
  log "compiled $n files in $(elapsed $t)"

  local tmp=$cache/guest/.tmp-$kkey.$$
  rm -rf "$tmp" && mkdir -p "$tmp"
  cp "$obj/vmlinux" "$tmp/vmlinux"
  cp "$obj/arch/x86/boot/bzImage" "$tmp/bzImage"
  cp "$obj/.config" "$tmp/config"
  cp "$obj/usr/gen_init_cpio" "$tmp/gen_init_cpio"
  kmake -s kernelrelease >"$tmp/kernel.release" 2>>"$klog" || fail "make kernelrelease"
  printf '%s\n' "$kernel_inputs" >"$tmp/inputs.txt"
  cp "$klog" "$tmp/build.log"
  rm -rf "$kdir" # a stale entry can only be a partial one left by hand; ours are renamed in
  mv -T "$tmp" "$kdir"
  rm -rf "$work" "$klog"
  log "kernel $(cat "$kdir/kernel.release") built in $(elapsed $t0), cached in $kdir"
}

build_initramfs() {
  local tmp=$cache/guest/initramfs/.tmp-$ikey.$$
  rm -rf "$tmp" && mkdir -p "$tmp"
  gcc -static -Os -s -Wall -Wextra -Werror -ffile-prefix-map="$here/=" \
    -o "$tmp/init" "$init_src" || die "compiling $init_src failed"
  touch -d @0 "$tmp/init" # gen_init_cpio takes a regular file's mtime from the file
  cat >"$tmp/files.list" <<EOF
dir /dev 0755 0 0
nod /dev/console 0600 0 0 c 5 1
dir /proc 0755 0 0
dir /sys 0755 0 0
file /init $tmp/init 0755 0 0
EOF
  "$kdir/gen_init_cpio" -t 0 "$tmp/files.list" >"$tmp/test-initramfs.img" ||
    die "gen_init_cpio failed on $tmp/files.list"
  sed -i "s|$tmp/|$idir/|" "$tmp/files.list"
  rm -rf "$idir"
  mv -T "$tmp" "$idir"
  log "test initramfs built, cached in $idir"
}

build_devtest_initramfs() {
  local tmp=$cache/guest/devtest/.tmp-$dkey.$$ applet dirs
  rm -rf "$tmp" && mkdir -p "$tmp"
  gcc -static -Os -s -Wall -Wextra -Werror -ffile-prefix-map="$here/=" \
    -o "$tmp/vsock-test" "$vsock_src" || die "compiling $vsock_src failed"
  cp "$devinit_src" "$tmp/init"
  cp "$busybox" "$tmp/busybox"
  touch -d @0 "$tmp/vsock-test" "$tmp/init" "$tmp/busybox"
  {
    printf '%s\n' 'dir /dev 0755 0 0' 'nod /dev/console 0600 0 0 c 5 1' 'dir /proc 0755 0 0' \
      'dir /sys 0755 0 0' 'dir /tmp 01777 0 0' 'dir /bin 0755 0 0' 'dir /sbin 0755 0 0' \
      'dir /usr 0755 0 0' 'dir /usr/bin 0755 0 0' 'dir /usr/sbin 0755 0 0'
    printf 'file /init %s 0755 0 0\n' "$tmp/init"
    printf 'file /bin/busybox %s 0755 0 0\n' "$tmp/busybox"
    printf 'file /bin/vsock-test %s 0755 0 0\n' "$tmp/vsock-test"
    # Applet links, in busybox's own (stable) order; absolute targets.
    "$tmp/busybox" --list-full | LC_ALL=C sort | while read -r applet; do
      [[ $applet == */* && $applet != bin/busybox ]] || continue
      printf 'slink /%s /bin/busybox 0777 0 0\n' "$applet"
    done
  } >"$tmp/files.list"
  "$kdir/gen_init_cpio" -t 0 "$tmp/files.list" >"$tmp/devtest-initramfs.img" ||
    die "gen_init_cpio failed on $tmp/files.list"
  sed -i "s|$tmp/|$ddir/|" "$tmp/files.list"
  rm -rf "$ddir"
  mv -T "$tmp" "$ddir"
  log "device test initramfs built, cached in $ddir"
}

# --- build what the cache lacks (under the lock), then link ---------------------------------
if [[ ! -d $kdir || ! -d $idir || ! -d $ddir ]]; then
  mkdir -p "$cache/guest/initramfs" "$cache/guest/devtest" "$cache/build"
  exec 9>"$cache/guest.lock"
  if ! flock -n 9; then
    log "waiting for another build to finish (lock $cache/guest.lock)"
    flock 9
  fi
  # Re-check: the build we waited for may have produced what we need.
  if [[ -d $kdir ]]; then
    log "kernel: cache hit $kdir"
  else
    log "kernel: cache miss, building ($src_id)"
    build_kernel
  fi
  [[ -d $idir ]] || build_initramfs
  [[ -d $ddir ]] || build_devtest_initramfs
  exec 9>&-
else
  log "cache hit: $kdir"
fi

mkdir -p "$1"
outdir=$(cd "$1" && pwd)
link() { # target name: replace OUTDIR/name atomically
  ln -sfn "$1" "$outdir/.$2.tmp.$$"
  mv -T "$outdir/.$2.tmp.$$" "$outdir/$2"
}
for f in vmlinux bzImage config kernel.release; do link "$kdir/$f" "$f"; done
link "$idir/test-initramfs.img" test-initramfs.img
link "$ddir/devtest-initramfs.img" devtest-initramfs.img

log "kernel release $(cat "$kdir/kernel.release")"
for f in vmlinux bzImage config kernel.release test-initramfs.img devtest-initramfs.img; do
  printf '  %-45s %9s bytes\n' "$outdir/$f" "$(stat -L -c %s "$outdir/$f")"
done
