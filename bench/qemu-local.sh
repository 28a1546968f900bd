#!/bin/sh
# Fetches Debian's qemu-system-x86 (7.2) and the libraries it needs into
# bench/out/qemu without installing them, so that benchmarks can run QEMU
# side by side with Strata without replacing the machine's qemu-utils.
# Prints the path of a wrapper script that runs qemu-system-x86_64.
#
# qemu-system-common is fetched only for its modules: Debian builds the
# TCG accelerator as one (accel-tcg-x86_64.so), and without it `-accel tcg`
# fails with "could not load module for type 'tcg-accel-ops'". The wrapper
# points QEMU_MODULE_DIR at the fetched copy; the machine's own
# /usr/lib/x86_64-linux-gnu/qemu holds qemu-block-extra's modules of
# another QEMU version, which 7.2 must not load.
#
# Exit status 75 (EX_TEMPFAIL): the packages could not be downloaded for
# lack of network; tests skip on it (and only on it).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
dest="$here/out/qemu"
wrapper="$dest/qemu-system-x86_64"
moddir="$dest/root/usr/lib/x86_64-linux-gnu/qemu"
# A copy fetched before the TCG module was is refetched.
if [ -x "$wrapper" ] && [ -f "$moddir/accel-tcg-x86_64.so" ]; then echo "$wrapper"; exit 0; fi
mkdir -p "$dest/debs" "$dest/root"
# Tests in parallel processes may all ask at once: one fetch, the others
# wait for it.
exec 9>"$dest/.lock"
flock 9
if [ -x "$wrapper" ] && [ -f "$moddir/accel-tcg-x86_64.so" ]; then echo "$wrapper"; exit 0; fi
cd "$dest/debs"
pkgs="qemu-system-x86 qemu-system-data libcapstone4 libfdt1 libpmem1 librdmacm1 libibverbs1 \
libslirp0 libvdeplug2 libnl-3-200 libnl-route-3-200 libndctl6 libdaxctl1"
errs="$dest/apt-errors.log"
# apt's words for a host it cannot reach (a 404 is not one: that fails).
offline() {
    cat "$errs" >&2
    grep -qiE 'temporary failure resolving|could not resolve|unable to connect|could not connect|network is unreachable|connection timed out' "$errs" || exit 1
    echo "qemu-local.sh: cannot download QEMU 7.2: no network" >&2
    exit 75
}
# shellcheck disable=SC2086
if ! apt-get download -q $pkgs >/dev/null 2>"$errs"; then
    apt-get update -qq >/dev/null 2>>"$errs" || true
    # shellcheck disable=SC2086
    apt-get download -q $pkgs >/dev/null 2>>"$errs" || offline
fi
# The modules must come from the very build of the binary that loads them.
ver=$(dpkg-deb -f qemu-system-x86_*.deb Version)
apt-get download -q "qemu-system-common=$ver" >/dev/null 2>>"$errs" || offline
for f in *.deb; do
    case "$f" in
    # Only its modules: the rest (keymaps, helpers) is not needed here.
    qemu-system-common_*)
        rm -rf "$dest/common"
        dpkg -x "$f" "$dest/common"
        mkdir -p "$moddir"
        cp "$dest/common/usr/lib/x86_64-linux-gnu/qemu/"*.so "$moddir/"
        rm -rf "$dest/common"
        ;;
    *) dpkg -x "$f" "$dest/root" ;;
    esac
done
cat > "$wrapper" <<EOW
#!/bin/sh
export LD_LIBRARY_PATH="$dest/root/usr/lib/x86_64-linux-gnu:$dest/root/lib/x86_64-linux-gnu"
export QEMU_MODULE_DIR="$moddir"
exec "$dest/root/usr/bin/qemu-system-x86_64" -L "$dest/root/usr/share/qemu" "\$@"
EOW
chmod +x "$wrapper"
echo "$wrapper"
