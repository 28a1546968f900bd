#!/bin/sh
# Builds the project's Linux test guest kernel from Debian's
# linux-source-6.1, with this directory's configuration fragment (`config`)
# and patch (`pvm-quirks.patch`: what this host's KVM cannot do in guest
# ring 0). Nothing of Linux's source lands in the checkout: the kernel is
# built and cached outside it, keyed by a hash of the inputs (these files
# and the source package's version), so a second run is a no-op and any
# change to an input rebuilds.
#
# Prints the cache directory, which holds:
#   vmlinux   the uncompressed ELF with a PVH note (direct boot)
#   bzImage   the same kernel for the Linux boot protocol
#   config    the complete .config it was built with
#
# About 6 minutes on 2 cores, plus unpacking the source (~140 MB).
set -eu

here=$(cd "$(dirname "$0")" && pwd)
log() { echo "linux-kernel: $*" >&2; }

SUDO=""
[ "$(id -u)" = 0 ] || SUDO=sudo

# What the build needs: the source, and the kernel's own build tools
# (flex/bison for Kconfig, bc for the timeconst header, libelf for
# objtool).
missing=""
for p in linux-source-6.1 flex bison bc libelf-dev make gcc xz-utils; do
    dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"
done
if [ -n "$missing" ]; then
    log "installing$missing"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $missing >&2
fi

TARBALL=/usr/src/linux-source-6.1.tar.xz
SRCVER=$(dpkg-query -W -f '${Version}' linux-source-6.1)
KEY=$( { echo "$SRCVER"; cat "$here/build.sh" "$here/config" "$here/pvm-quirks.patch"; } |
    sha256sum | cut -c1-16)
CACHE=${STRATA_GUEST_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/strata/linux-kernel}
OUT=$CACHE/$KEY
if [ -f "$OUT/vmlinux" ] && [ -f "$OUT/bzImage" ]; then
    echo "$OUT"
    exit 0
fi

mkdir -p "$CACHE"
# Tests and `make` may ask at the same time: one build, the others wait.
exec 8>"$CACHE/.lock"
flock 8
if [ -f "$OUT/vmlinux" ] && [ -f "$OUT/bzImage" ]; then
    echo "$OUT"
    exit 0
fi

log "building Linux $SRCVER into $OUT (takes several minutes)"
start=$(date +%s)
WORK=$CACHE/work-$KEY
# An interrupted or failed build leaves its tree (~1.5 GB): drop them all.
rm -rf "$CACHE"/work-*
mkdir -p "$WORK/build"
tar -C "$WORK" -xf "$TARBALL"
SRC=$WORK/linux-source-6.1
patch -s -d "$SRC" -p1 <"$here/pvm-quirks.patch"

B=$WORK/build
make -s -C "$SRC" O="$B" ARCH=x86_64 tinyconfig >"$WORK/config.log" 2>&1
# Later lines win: Kconfig warns about each override (kept in the log).
cat "$here/config" >>"$B/.config"
make -s -C "$SRC" O="$B" ARCH=x86_64 olddefconfig >>"$WORK/config.log" 2>&1

# olddefconfig drops what an unmet dependency forbids without a word: check
# that every line of the fragment holds in the result. (Some options cannot
# be turned off at all: tinyconfig's EXPERT selects DEBUG_KERNEL, x86
# selects PERF_EVENTS; the fragment does not ask.)
bad=0
while IFS= read -r l; do
    case "$l" in
    CONFIG_*=*)
        grep -qxF "$l" "$B/.config" || { log "not in the result: $l"; bad=1; } ;;
    "# CONFIG_"*" is not set")
        o=${l#"# "}; o=${o%" is not set"}
        if grep -q "^$o=" "$B/.config"; then log "still set: $o"; bad=1; fi ;;
    esac
done <"$here/config"
[ "$bad" = 0 ] || { log "the configuration fragment does not hold"; exit 1; }

make -s -C "$SRC" O="$B" ARCH=x86_64 -j"$(nproc)" vmlinux bzImage >&2

mkdir -p "$OUT.tmp"
cp "$B/vmlinux" "$B/arch/x86/boot/bzImage" "$OUT.tmp/"
cp "$B/.config" "$OUT.tmp/config"
rm -rf "$OUT"
mv "$OUT.tmp" "$OUT"
rm -rf "$WORK"
log "built in $(($(date +%s) - start)) s"
echo "$OUT"
