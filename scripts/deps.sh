#!/usr/bin/env bash
# Installs the Debian packages the build, tests and benchmarks need; quick when present.
set -euo pipefail

pkgs=(
  build-essential binutils cpio xz-utils     # tiny test guests, initramfs
  busybox-static                               # device tests' guest (devtest-initramfs)
  linux-source-6.1 flex bison bc libelf-dev libssl-dev patch  # guest kernel
  qemu-system-x86                              # `qemu` back end, benchmark peer
  erofs-utils e2fsprogs                        # container image layers (EROFS), scratch disks (ext4)
  libseccomp-dev                               # the agent applies container seccomp profiles
  containerd containernetworking-plugins       # end-to-end tests and `make demo`: a private containerd, CNI
  protobuf-compiler                            # the CRI client of the tests (k8s-cri builds its protos)
  python3-venv                                 # the manifests' schema check (kubernetes-validate)
  curl                                         # containerd 2.x below
  librsvg2-bin fonts-dejavu-core               # the benchmark report's PNG chart (rsvg-convert)
)
# kubectl for the manifests' `apply --dry-run=client` test: Debian's, unless one is there.
command -v kubectl >/dev/null || pkgs+=(kubernetes-client)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
  if [ "$(id -u)" -ne 0 ]; then
    echo "deps: missing packages ${missing[*]}; run as root (apt-get install) or install them" >&2
    exit 1
  fi
  echo "deps: installing ${missing[*]}"
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
# The Kubernetes schema checker (PyPI), in a venv kept in the cache.
venv=${KUBEVIRT_CACHE:-/var/cache/kubevirt-shim}/venv-kubernetes-validate-1.37.0
if [ ! -f "$venv/.complete" ]; then
  echo "deps: installing kubernetes-validate 1.37.0 in $venv"
  rm -rf "$venv"  # a venv cannot be moved into place: build it where it stays
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q kubernetes-validate==1.37.0
  touch "$venv/.complete"
fi
# containerd 2.x, for the installer test (does a real containerd 2 accept our version 3
# drop-in?): the binary of Debian unstable's package, kept in the cache.
c2=${KUBEVIRT_CACHE:-/var/cache/kubevirt-shim}/containerd2
if [ ! -x "$c2/usr/bin/containerd" ]; then
  echo "deps: fetching containerd 2.x (Debian unstable's package) into $c2"
  mirror=http://deb.debian.org/debian
  file=$(curl -fsSL "$mirror/dists/sid/main/binary-amd64/Packages.xz" | xz -dc |
    awk '/^Package: containerd$/ {p = 1} p && /^Filename:/ && !f {f = $2} END {print f}')
  [ -n "$file" ] || { echo "deps: no containerd in Debian unstable's index" >&2; exit 1; }
  rm -rf "$c2.tmp" && mkdir -p "$c2.tmp"
  curl -fsSL -o "$c2.tmp/containerd.deb" "$mirror/$file"
  dpkg-deb -x "$c2.tmp/containerd.deb" "$c2.tmp" && rm -f "$c2.tmp/containerd.deb"
  rm -rf "$c2" && mv "$c2.tmp" "$c2"
fi
command -v cargo >/dev/null || { echo "deps: cargo not found on PATH" >&2; exit 1; }
