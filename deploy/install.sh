#!/usr/bin/env bash
# Installs (or, with --uninstall, removes) kubevirt-shim on a node: the shim, kubevirt-vmm,
# the guest kernel and initramfs, the shim's config and containerd's drop-in for runtime
# handler `kubevirt`. Run as root on the node, or from the installer DaemonSet with the
# node's root mounted (--root /host). Idempotent: a second run changes nothing.
#
#   install.sh [--root DIR] [--payload DIR] [--no-restart] [--uninstall]
#
# Layout (paths as the node sees them):
#   /opt/kubevirt-shim/versions/<id>/{bin,share}  one directory per payload (id: its hash),
#                                                 so running pods keep what they started with
#   /opt/kubevirt-shim/current -> versions/<id>   what new pods use
#   /usr/local/bin/{containerd-shim-kubevirt-v1,kubevirt-vmm} -> /opt/kubevirt-shim/current/bin/...
#   /etc/kubevirt-shim/config.toml                written once; the admin's afterwards
#   /etc/containerd/conf.d/kubevirt.toml          the drop-in; config.toml gets an `imports`
#                                                 entry, the original kept as
#                                                 config.toml.kubevirt-backup
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=/
PAYLOAD=$HERE/payload
RESTART=1
ACTION=do_install
while [ $# -gt 0 ]; do
	case "$1" in
	--root) ROOT=$2; shift ;;
	--payload) PAYLOAD=$2; shift ;;
	--no-restart) RESTART=0 ;;
	--uninstall) ACTION=do_uninstall ;;
	-h | --help) sed -n '2,20p' "$0"; exit 0 ;;
	*) echo "install.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
	esac
	shift
done
ROOT=${ROOT%/}
OPT=/opt/kubevirt-shim
CONTAINERD_CONFIG=/etc/containerd/config.toml
DROPIN=/etc/containerd/conf.d/kubevirt.toml
IMPORT_ENTRY=conf.d/kubevirt.toml # relative: containerd resolves it next to config.toml
BACKUP=$CONTAINERD_CONFIG.kubevirt-backup
SHIM_CONFIG=/etc/kubevirt-shim/config.toml
BINARIES=(containerd-shim-kubevirt-v1 kubevirt-vmm)
GUEST=(vmlinux initramfs.img)

say() { echo "kubevirt-shim: $*"; }
die() { echo "kubevirt-shim: error: $*" >&2; exit 1; }

# The config's version: 3 is containerd 2.x, 2 is 1.6/1.7; no file: a new version 2 one.
config_version() {
	local f=$ROOT$CONTAINERD_CONFIG
	[ -f "$f" ] || { echo 2; return; }
	local v
	v=$(sed -n 's/^[[:space:]]*version[[:space:]]*=[[:space:]]*\([0-9]\+\).*/\1/p' "$f" | head -1)
	case "$v" in
	2 | 3) echo "$v" ;;
	"") die "$f has no 'version = 2' or 'version = 3' line (version 1 configs are not supported)" ;;
	*) die "$f: unsupported config version $v" ;;
	esac
}

# containerd 1.x merges an imported file plugin by plugin: the drop-in's CRI table replaces
# the main config's whole. So the version 2 drop-in carries the main config's CRI tables
# (those in config.toml, verbatim) and adds the kubevirt runtime; 2.x merges key by key.
cri_tables_of_main_config() {
	local f=$ROOT$CONTAINERD_CONFIG
	[ -f "$f" ] || return 0
	awk '
		/^[[:space:]]*\[/ {
			h = $0; gsub(/[[:space:]]/, "", h)
			in_cri = (h ~ /^\[+plugins\."io\.containerd\.grpc\.v1\.cri"/ || h ~ /^\[+plugins\.cri[].]/)
			if (h ~ /\.runtimes\.kubevirt[].]/) in_cri = 0
		}
		in_cri { print }
	' "$f"
}

# The runtime tables of a drop-in (deploy/containerd/kubevirt-v$1.toml without its comments
# and version line).
runtime_tables() {
	grep -v -e '^[[:space:]]*#' -e '^version' "$HERE/containerd/kubevirt-v$1.toml" | sed '/./,$!d'
}

dropin() {
	echo "# Written by kubevirt-shim's installer from deploy/containerd/kubevirt-v$1.toml;"
	echo "# removed by its uninstaller."
	echo "version = $1"
	if [ "$1" = 2 ]; then
		echo "# containerd 1.x replaces a plugin's whole table with an imported one: the CRI"
		echo "# tables of $CONTAINERD_CONFIG follow. Rerun the installer after editing them."
		cri_tables_of_main_config
	fi
	echo
	runtime_tables "$1"
}

# Adds our entry to config.toml's `imports` (creating the line, or the file, if need be).
add_import() {
	local f=$ROOT$CONTAINERD_CONFIG
	if [ ! -f "$f" ]; then
		mkdir -p "$(dirname "$f")"
		printf 'version = 2\nimports = ["%s"]\n' "$IMPORT_ENTRY" >"$f"
		return
	fi
	grep -q "\"$IMPORT_ENTRY\"\|'$IMPORT_ENTRY'" "$f" && return
	local entry=${IMPORT_ENTRY//\//\\/} # for sed's s///
	if grep -q '^[[:space:]]*imports[[:space:]]*=[[:space:]]*\[' "$f"; then
		# TOML arrays allow a trailing comma, so this holds for one or many lines.
		sed -i "0,/^\([[:space:]]*imports[[:space:]]*=[[:space:]]*\[\)/s//\1\"$entry\", /" "$f"
	else
		# A top-level key must come before the first table: right after `version`.
		sed -i "0,/^\([[:space:]]*version[[:space:]]*=.*\)$/s//\1\nimports = [\"$entry\"]/" "$f"
	fi
}

shim_config() {
	cat <<EOF
# kubevirt-shim's configuration; every key is documented in the README.
kernel = "$OPT/current/share/vmlinux"
initramfs = "$OPT/current/share/initramfs.img"
machine = "auto"
EOF
}

payload_id() {
	(cd "$PAYLOAD" && cat "${BINARIES[@]/#/bin/}" "${GUEST[@]/#/share/}") | sha256sum | cut -c1-12
}

# Whether a running process was started from version $1. Its exe reads as the node's path,
# or as ours where --root is a bind mount of the node's root.
version_in_use() {
	local exe target
	for exe in /proc/[0-9]*/exe; do
		target=$(readlink "$exe" 2>/dev/null) || continue
		case "$target" in
		"$OPT/versions/$1/"* | "$ROOT$OPT/versions/$1/"*) return 0 ;;
		esac
	done
	return 1
}

# Old versions no running process uses (a shim or VM started from them) are removed.
remove_unused_versions() {
	local current=$1 d id
	for d in "$ROOT$OPT"/versions/*/; do
		[ -d "$d" ] || continue
		id=$(basename "$d")
		[ "$id" = "$current" ] && continue
		if version_in_use "$id"; then
			say "version $id is still in use by running pods; kept"
		else
			rm -rf "$d"
			say "removed unused version $id"
		fi
	done
}

restart_containerd() {
	[ "$RESTART" = 1 ] || { say "containerd not restarted (--no-restart)"; return; }
	if [ "$ROOT" = "" ]; then
		systemctl restart containerd
	else
		nsenter --target 1 --mount --uts --ipc --net --pid -- systemctl restart containerd
	fi
	say "containerd restarted"
}

label_node() {
	[ -n "${NODE_NAME:-}" ] && command -v kubectl >/dev/null || return 0
	if [ "$1" = remove ]; then
		kubectl label node "$NODE_NAME" kubevirt.io/shim- kubevirt.io/machine- >/dev/null || true
	else
		kubectl label node "$NODE_NAME" --overwrite kubevirt.io/shim=ready \
			"kubevirt.io/machine=$1" >/dev/null
		say "node $NODE_NAME labelled kubevirt.io/shim=ready"
	fi
}

do_install() {
	for f in "${BINARIES[@]/#/bin/}" "${GUEST[@]/#/share/}"; do
		[ -f "$PAYLOAD/$f" ] || die "payload $PAYLOAD lacks $f (make payload builds it)"
	done
	local version id dir
	version=$(config_version)
	id=$(payload_id)
	dir=$OPT/versions/$id
	if [ ! -d "$ROOT$dir" ]; then
		mkdir -p "$ROOT$dir.tmp/bin" "$ROOT$dir.tmp/share"
		for b in "${BINARIES[@]}"; do install -m 0755 "$PAYLOAD/bin/$b" "$ROOT$dir.tmp/bin/$b"; done
		for g in "${GUEST[@]}"; do install -m 0644 "$PAYLOAD/share/$g" "$ROOT$dir.tmp/share/$g"; done
		mv "$ROOT$dir.tmp" "$ROOT$dir"
		say "installed version $id in $dir"
	fi
	if [ "$(readlink "$ROOT$OPT/current")" != "versions/$id" ]; then
		ln -sfn "versions/$id" "$ROOT$OPT/current.tmp"
		mv -T "$ROOT$OPT/current.tmp" "$ROOT$OPT/current" # atomic: new pods see one or the other
	fi
	mkdir -p "$ROOT/usr/local/bin"
	for b in "${BINARIES[@]}"; do
		[ "$(readlink "$ROOT/usr/local/bin/$b")" = "$OPT/current/bin/$b" ] ||
			ln -sfn "$OPT/current/bin/$b" "$ROOT/usr/local/bin/$b"
	done
	if [ ! -f "$ROOT$SHIM_CONFIG" ]; then
		mkdir -p "$(dirname "$ROOT$SHIM_CONFIG")"
		shim_config >"$ROOT$SHIM_CONFIG"
	fi
	# containerd: back up the original once, then the imports entry and the drop-in.
	if [ ! -e "$ROOT$BACKUP" ] && [ ! -e "$ROOT$BACKUP.absent" ]; then
		if [ -f "$ROOT$CONTAINERD_CONFIG" ]; then
			cp -p "$ROOT$CONTAINERD_CONFIG" "$ROOT$BACKUP"
		else
			mkdir -p "$(dirname "$ROOT$BACKUP")"
			: >"$ROOT$BACKUP.absent"
		fi
	fi
	local new
	new=$(dropin "$version")
	mkdir -p "$(dirname "$ROOT$DROPIN")"
	if [ "$(cat "$ROOT$DROPIN" 2>/dev/null)" != "$new" ]; then
		printf '%s\n' "$new" >"$ROOT$DROPIN"
		add_import
		say "containerd config version $version: $DROPIN written"
		restart_containerd
	else
		add_import
		say "containerd drop-in already current"
	fi
	remove_unused_versions "$id"
	# Which machine back end pods get here, and why (the node label says which).
	"$ROOT$dir/bin/kubevirt-vmm" doctor | sed 's/^/kubevirt-shim: doctor: /' || true
	local machine
	machine=$("$ROOT$dir/bin/kubevirt-vmm" doctor --verdict 2>/dev/null | head -1 || true)
	label_node "${machine:-unknown}"
}

do_uninstall() {
	if [ -e "$ROOT$BACKUP" ]; then
		mv -f "$ROOT$BACKUP" "$ROOT$CONTAINERD_CONFIG"
	elif [ -e "$ROOT$BACKUP.absent" ]; then
		rm -f "$ROOT$CONTAINERD_CONFIG" "$ROOT$BACKUP.absent"
	fi
	rm -f "$ROOT$DROPIN"
	rmdir "$ROOT$(dirname "$DROPIN")" 2>/dev/null || true
	for b in "${BINARIES[@]}"; do
		[ -L "$ROOT/usr/local/bin/$b" ] && rm -f "$ROOT/usr/local/bin/$b"
	done
	if [ "$(cat "$ROOT$SHIM_CONFIG" 2>/dev/null)" = "$(shim_config)" ]; then
		rm -f "$ROOT$SHIM_CONFIG"
	elif [ -f "$ROOT$SHIM_CONFIG" ]; then
		say "$SHIM_CONFIG has the admin's changes; kept"
	fi
	rmdir "$ROOT$(dirname "$SHIM_CONFIG")" 2>/dev/null || true
	rm -rf "${ROOT:?}$OPT"
	rmdir "$ROOT$(dirname "$CONTAINERD_CONFIG")" 2>/dev/null || true
	say "uninstalled"
	restart_containerd
	label_node remove
}

[ "$(id -u)" = 0 ] || die "run as root"
$ACTION
